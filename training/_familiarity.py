"""Fit, calibrate and measure a trained network's out-of-distribution score (``model.OodScorer``).

After training, the recipe asks this module for the score that tells photos like the
training photos from photos unlike them:

1. the penultimate features of the training split (unaugmented, at most
   `MAX_FIT_PER_CLASS` photos per class) fit the class means and shared covariance;
2. the validation split calibrates the threshold: `false_rejection` of its photos score
   above it (2 % by default);
3. the test split and the unlike photos (``training._unlike``: scenes, noise, text,
   textures, decoded by the worker's own ``load_image``) measure it: the share of each
   that is flagged goes into ``model.json`` and ``report.md``.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model import DEFAULT_FALSE_REJECTION, OodScorer, Preprocessing, like_photos_flagged, load_image, with_features
from training._dataset import Sample, make_tf_dataset
from training._unlike import UNLIKE_KINDS, unlike_photos

MAX_FIT_PER_CLASS = 300
UNLIKE_PER_KIND = 50
UNLIKE_SEED = 17  # the unlike photos are the same for every model, so reports compare


def fit_familiarity(
    network: keras.Model,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    *,
    train: Sequence[Sample],
    validation: Sequence[Sample],
    test: Sequence[Sample],
    batch_size: int = 32,
    false_rejection: float = DEFAULT_FALSE_REJECTION,
    unlike_per_kind: int = UNLIKE_PER_KIND,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[OodScorer, dict[str, Any]]:
    """The fitted, calibrated score of `network`, and its calibration and measurements (for ``model.json``)."""
    features_of = _feature_extractor(network)
    fit_samples = _per_class(train, MAX_FIT_PER_CLASS)
    fit_x, fit_y = _features(features_of, fit_samples, labels, preprocessing, batch_size)
    scorer = OodScorer.fit(fit_x, fit_y, len(labels))
    val_x, _ = _features(features_of, validation, labels, preprocessing, batch_size)
    scorer.calibrate(val_x, false_rejection)
    test_x, _ = _features(features_of, test, labels, preprocessing, batch_size)

    unlike: dict[str, list[np.ndarray]] = defaultdict(list)
    for kind, image in unlike_photos(unlike_per_kind, seed=UNLIKE_SEED, size=_photo_size(preprocessing)):
        unlike[kind].append(_as_served(image, preprocessing))
    flagged_unlike = {}
    for kind in UNLIKE_KINDS:
        flagged_unlike[kind] = float(np.mean(scorer.unfamiliar(features_of(np.stack(unlike[kind])))))
    flagged_unlike["all"] = float(np.mean([flagged_unlike[kind] for kind in UNLIKE_KINDS]))

    calibration = {
        "false_rejection": false_rejection,
        "fitted_on": len(fit_samples),
        "calibrated_on": len(validation),
        "flagged": {
            "validation": float(np.mean(scorer.unfamiliar(val_x))),
            "test": float(np.mean(scorer.unfamiliar(test_x))),
            "unlike": flagged_unlike,
            "unlike_per_kind": unlike_per_kind,
        },
    }
    say(
        f"out-of-distribution score: threshold {scorer.threshold:.2f}; flags {calibration['flagged']['test']:.1%} "
        f"of the test photos and {flagged_unlike['all']:.1%} of the unlike ones "
        f"({', '.join(f'{kind} {flagged_unlike[kind]:.0%}' for kind in UNLIKE_KINDS)})"
    )
    return scorer, calibration


def markdown_section(calibration: dict[str, Any], threshold: float) -> str:
    """The report's section on the score: what it flags of each photo set."""
    flagged = calibration["flagged"]
    calibrated_on = calibration["calibrated_on"]
    rate = like_photos_flagged(calibrated_on, round(flagged["validation"] * calibrated_on))
    rows = [
        ("validation split (calibration)", flagged["validation"]),
        ("test split (like the training photos)", flagged["test"]),
        *((f"unlike photos: {kind}", flagged["unlike"][kind]) for kind in UNLIKE_KINDS),
        ("unlike photos, all kinds", flagged["unlike"]["all"]),
    ]
    lines = [
        "## Photos unlike the training photos",
        "",
        f"Out-of-distribution score: Mahalanobis distance of the penultimate features (square-rooted) to the "
        "nearest class, "
        f"fitted on {calibration['fitted_on']} training photos, threshold {threshold:.3f} calibrated on "
        f"{calibrated_on} validation photos for a {calibration['false_rejection']:.0%} "
        f"false-rejection rate. Unlike photos: {flagged['unlike_per_kind']} generated per kind "
        '(training._unlike). A flagged photo is answered "this doesn\'t look like a model I know", '
        "with the top-3 still shown.",
        "",
        "| photos | flagged as unfamiliar |",
        "|---|---:|",
        *(f"| {name} | {share:.1%} |" for name, share in rows),
        "",
        f"Set on {calibrated_on} photos, the threshold flags about {rate.expected:.1%} of new "
        f"photos like them, and from {rate.low:.1%} to {rate.high:.1%} in {rate.confidence:.0%} of trainings; "
        "the test split's figure scatters around that again. More validation photos make it steadier.",
        "",
    ]
    return "\n".join(lines)


def _feature_extractor(network: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    both = with_features(network)

    def features_of(images: np.ndarray) -> np.ndarray:
        _, features = both.predict_on_batch(np.asarray(images, dtype=np.float32))
        return np.asarray(features, dtype=np.float32)

    return features_of


def _features(
    features_of: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[Sample],
    labels: Sequence[str],
    preprocessing: Preprocessing,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    dataset: tf.data.Dataset = make_tf_dataset(list(samples), list(labels), preprocessing, batch_size=batch_size)
    features, targets = [], []
    for images, batch_targets in dataset.as_numpy_iterator():
        features.append(features_of(images))
        targets.append(batch_targets)
    return np.concatenate(features), np.concatenate(targets)


def _per_class(samples: Sequence[Sample], limit: int) -> list[Sample]:
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for sample in samples:
        if taken[sample.label] < limit:
            taken[sample.label] += 1
            chosen.append(sample)
    return chosen


def _photo_size(preprocessing: Preprocessing) -> tuple[int, int]:
    # Larger than the model's input and 4:3, like a phone's photo, so serving's resize does its part.
    side = preprocessing.image_size
    return (2 * side, 3 * side // 2)


def _as_served(image: Any, preprocessing: Preprocessing) -> np.ndarray:
    """The image as the worker would see it: a JPEG decoded by ``load_image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return load_image(buffer.getvalue(), preprocessing)
