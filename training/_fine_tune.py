"""Retraining from feedback: fine-tune the active model on what people said, and keep it only if it is better.

People vote on the bot's answers: a 👍 confirms the predicted label, a correction gives
the right one. The admin's ``/retrain`` turns those labelled photos into a candidate model
and promotes it only when it beats the active one on photos neither model trained on.
:func:`retrain` is that step, a pure function of the registry, the feedback and the data:

1. **The starting point**: the registry's active version, checksum-verified and rebuilt
   with its own labels and preprocessing. The candidate keeps both, so serving it changes
   nothing but the weights.
2. **The feedback**: one photo per hash (the caller de-duplicates; a repeat is skipped
   here too). A photo whose label the model does not know, or whose bytes cannot be read,
   is skipped and counted. A fixed slice of the photos, chosen by :func:`is_held_out`
   from the hash alone, is *held out*: never trained on, in this retrain or any later one.
3. **The base data** (optional): the dataset the model was made from, a folder per class
   or a CSV manifest. Its split is made once (stratified per class) and saved in
   `split_file`; every later retrain reloads it, fingerprint-checked, so the base hold-out
   is the same photos every time. Everything outside its test part trains (a retrain has
   no early stopping, so a validation part would sit idle); classes the model does not
   know are skipped and counted.
4. **The hold-out** both models are judged on: the base test part plus the held-out
   feedback, reported overall and per part.
5. **The epoch**: the base training photos once, plus the training feedback repeated an
   integer number of times so that it makes up about ``feedback_share`` of the epoch
   (at least once, at most ``max_oversample`` times): a few dozen corrections must be
   able to move a model trained on thousands of photos. A photo whose weight is under 1
   (people disagree on it, or its voters are little trusted: see
   ``training._feedback.choose_feedback``) is repeated that share as often, at least once.
   Each photo is decoded once and cached; the repeats are drawn from the cache in a fresh random order every epoch, and
   augmented (flips, small rotations, zooms, shifts, contrast) like the recipe's.
6. **Fine-tuning**: the recipe's phase 2 from the active weights: the upper
   ``finetune_fraction`` of the backbone unfrozen (BatchNorm stays frozen in inference
   mode over a pretrained backbone's statistics), SGD with momentum whose learning rate
   decays from ``lr / 5`` to ``lr / 10``. There is no head phase: the head is already
   trained. No class weights either: "balanced" weights would shrink exactly the classes
   the oversampled corrections are about. After each epoch `on_epoch` gets the epoch,
   loss, accuracy and the time left. On a GPU the model runs in mixed precision and
   XLA-compiled, on a CPU in float32, as in the recipe.
7. **The gate**: the active and the candidate model predict the same hold-out. The
   candidate passes when it is at least as accurate overall, no class of the hold-out lost
   more than ``class_margin`` of its accuracy (nor more than one photo of it, or than chance
   alone explains on that many photos: 2.5 standard errors), it is
   better than chance (``1 / labels``) on every class with at least 3 hold-out photos, *and*
   it is strictly more accurate on the feedback hold-out (compared to 6 decimals, so float
   noise cannot decide). A few people's corrections cannot buy an overall gain with one
   class's ruin. With no feedback hold-out it cannot show it learnt anything and is never
   promoted. The classes that failed it are recorded with the candidate's metrics.
8. **The candidate** is saved in the registry as `version` either way (model.json records
   where it came from, the counts, both models' metrics and the gate's decision), with the
   usual evaluation report and ``retrain_report.png``, a picture comparing both models for
   the admin. It is activated only when it passed and `promote` is true; otherwise it
   waits, inactive, for the admin to promote or discard it.

Nothing is activated when anything fails: the exception propagates, and a half-written
candidate is removed by ``ModelRegistry.staging``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from carbot.retrain_runs import REPORT_IMAGE
from model import (
    ModelRegistry,
    Preprocessing,
    RegistryConflict,
    export_variants,
    load_artefact,
    save_version,
    with_features,
)
from training._augmentation import augment_batches
from training._dataset import (
    Sample,
    Split,
    check_samples,
    load_split,
    make_tf_dataset,
    read_manifest,
    save_split,
    scan_folder,
    stratified_split,
)
from training._evaluation import Evaluation, evaluate, write_report
from training._familiarity import fit_familiarity
from training._feedback import FeedbackPhoto, is_held_out
from training._recipe import TrainConfig, epoch_lr, unfreeze_top

log = logging.getLogger(__name__)


# The gate's verdicts (RetrainOutcome.reason).
BETTER = "better"
WORSE_OVERALL = "worse_overall"
NOT_BETTER_ON_FEEDBACK = "not_better_on_feedback"
NO_FEEDBACK_HOLDOUT = "no_feedback_holdout"
NO_TRAINING_DATA = "no_training_data"
WORSE_ON_A_CLASS = "worse_on_a_class"
CHANCE_ON_A_CLASS = "chance_on_a_class"

# A class is judged "no better than chance" only with at least this many hold-out photos.
_MIN_CLASS_PHOTOS = 3
# A class's accuracy may fall by this many standard errors of the difference (about 1 % one-sided) before the
# gate calls it worse: a class with 10 hold-out photos cannot tell a 2-photo wobble from a loss.
_CLASS_NOISE_Z = 2.5

# model.json lists at most this many skipped photos (a base folder of unknown classes could hold thousands).
_MAX_LISTED_SKIPPED = 1000

# Accuracies are compared rounded to this many decimals: equal counts must compare equal.
_GATE_DECIMALS = 6

# The recipe's phase-2 settings, read from its config so that both stay the same.
_FINETUNE_LR_DIVISORS = TrainConfig.finetune_lr_divisors
_MOMENTUM = TrainConfig.momentum


@dataclass
class RetrainConfig:
    """Everything that decides a retrain (stored in the candidate's ``extra["config"]``)."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.01  # the recipe's base lr; fine-tuning decays lr/5 -> lr/10
    finetune_fraction: float = 0.3  # upper share of the backbone's layers unfrozen
    feedback_share: float = 0.5  # feedback photos make (up to) this share of each epoch, by oversampling
    max_oversample: int = 20  # most times one feedback photo is repeated per epoch
    holdout_fraction: float = 0.2  # share of feedback photos held out (see is_held_out)
    seed: int = 0
    augment: bool = True
    base_test_fraction: float = 0.15  # the base hold-out's share of each class, when the split is first made
    # The gate refuses a candidate whose accuracy on any class of the hold-out falls by more than this
    # (or by more than one photo of that class, whichever is more).
    class_margin: float = 0.05

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_oversample < 1:
            raise ValueError("epochs, batch_size and max_oversample must be at least 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, not {self.learning_rate}")
        for name in ("finetune_fraction", "holdout_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        if not 0.0 <= self.feedback_share < 1.0:
            raise ValueError(f"feedback_share must be in [0, 1), not {self.feedback_share}")
        if not 0.0 < self.base_test_fraction < 1.0:
            raise ValueError(f"base_test_fraction must be in (0, 1), not {self.base_test_fraction}")


@dataclass(frozen=True)
class RetrainProgress:
    """One finished fine-tuning epoch, for the admin's progress message."""

    epoch: int  # 1-based: epoch 1 of `epochs` is the first
    epochs: int
    loss: float  # training loss and accuracy of that epoch (augmented, oversampled photos)
    accuracy: float
    elapsed_s: float  # since retrain() started
    eta_s: float  # the remaining epochs at the mean epoch time so far


@dataclass
class RetrainOutcome:
    """What a retrain did, and why the candidate was or was not promoted."""

    base_version: str  # the active version it started from
    candidate_version: str
    promoted: bool  # activated in the registry by retrain()
    reason: str  # better, worse_overall, not_better_on_feedback, no_feedback_holdout, no_training_data
    # base_train, base_holdout, base_skipped, feedback_train, feedback_holdout,
    # feedback_skipped (unknown label, unreadable, repeated hash), oversample (repeat factor)
    counts: dict[str, int]
    # overall_accuracy, base_accuracy, feedback_accuracy (None when that part is empty),
    # overall_n, base_n, feedback_n
    active_metrics: dict[str, float | int | None]
    candidate_metrics: dict[str, float | int | None]
    report_image: Path | None  # retrain_report.png in the candidate's directory
    duration_s: float

    @property
    def saved(self) -> bool:
        """Whether the candidate was saved in the registry (all but "no_training_data")."""
        return self.reason != NO_TRAINING_DATA


def retrain(
    registry_root: Path,
    feedback: Sequence[FeedbackPhoto],
    *,
    version: str,
    base_dataset: Path | None = None,
    split_file: Path | None = None,
    config: RetrainConfig | None = None,
    on_epoch: Callable[[RetrainProgress], None] | None = None,
    promote: bool = True,
    variants: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> RetrainOutcome:
    """Fine-tune the active model on `feedback` (and `base_dataset`), gate it, and save it as `version`.

    `base_dataset` is a folder per class or a ``.csv`` manifest; its split is saved in
    `split_file` the first time and reused afterwards (without a `split_file` it is made
    again each time, identically for the same photos and seed; without a `base_dataset`
    only the feedback is used and `split_file` is ignored). `config` defaults to
    ``RetrainConfig()``. `on_epoch` is called after every epoch; an exception it raises
    stops the retrain. The candidate is activated only if it passes the gate and `promote`
    is true, and the active version is still the one it started from (a version activated
    meanwhile by an admin is not overridden; the outcome then says "better" but not
    promoted). A `version` that already exists (and is not active) is replaced. With `variants` the
    candidate gets its optimised serving variants, verified on the hold-out photos. `callbacks` are added to
    the fine-tuning's Keras ones (the train worker's gives way to photos: ``training._sharing``).

    Raises ``LookupError`` when the registry has no active version, ``ValueError`` for a
    bad `version` (or the active one), and whatever reading the data or training raises.
    """
    started = time.monotonic()
    config = config or RetrainConfig()
    registry = ModelRegistry(Path(registry_root))
    registry.path_for(version)  # a bad version name raises ValueError now, not after the training
    base = registry.active(verify=True)
    if base is None:
        raise LookupError(f"the model registry {registry.root} has no active version to retrain")
    if version == base.version:
        raise ValueError(f"the candidate cannot replace the active version {version!r}; give it a new name")
    labels = list(base.labels)
    preprocessing = base.preprocessing
    log.info("retraining %s into %s with %d feedback photos", base.version, version, len(feedback))

    # 2-4. Feedback, base data, hold-out.
    fb = _feedback_parts(feedback, labels, preprocessing, config.holdout_fraction)
    base_data = _base_parts(base_dataset, split_file, labels, preprocessing, config)
    oversample = oversample_factor(len(base_data.train), len(fb.train), config.feedback_share, config.max_oversample)
    feedback_groups = _feedback_groups(fb.train_photos, oversample)
    counts = {
        "base_train": len(base_data.train),
        "base_holdout": len(base_data.holdout),
        "base_skipped": len(base_data.skipped),
        "feedback_train": len(fb.train),
        "feedback_holdout": len(fb.holdout),
        "feedback_skipped": len(fb.skipped),
        "oversample": oversample,
        # Trained fewer times than `oversample`: their weight (trust, agreement) is under 1.
        "feedback_down_weighted": sum(photo.weight < 1.0 for photo in fb.train_photos),
    }
    log.info("retrain data: %s", counts)
    if not base_data.train and not fb.train:
        # Nothing to learn from: no model is loaded and nothing is saved.
        nothing = _metrics(None, 0)
        duration = time.monotonic() - started
        return RetrainOutcome(base.version, version, False, NO_TRAINING_DATA, counts, nothing, nothing, None, duration)
    holdout = base_data.holdout + fb.holdout  # base first: _evaluate splits the predictions there

    # 1. The active model, in mixed precision on a GPU.
    gpu = bool(tf.config.list_physical_devices("GPU"))
    previous_policy = keras.mixed_precision.global_policy().name
    if gpu:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        network = load_artefact(base.path).keras_model
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    # 7 (first half). The active model's score, before its weights change.
    evaluate_args = {"labels": labels, "preprocessing": preprocessing, "batch_size": config.batch_size}
    active_metrics, _ = _evaluate(network, holdout, len(base_data.holdout), **evaluate_args)

    # 5-6. Fine-tune.
    keras.utils.set_random_seed(config.seed)
    dataset = _training_dataset(base_data.train, feedback_groups, labels, preprocessing, config)
    pretrained = _pretrained(base.meta)
    history = _finetune(network, dataset, config, pretrained=pretrained, gpu=gpu, on_epoch=on_epoch, started=started,
                        callbacks=callbacks)  # fmt: skip

    # 7. The gate.
    candidate_metrics, evaluation = _evaluate(network, holdout, len(base_data.holdout), **evaluate_args)
    reason, failing = judge(active_metrics, candidate_metrics, num_labels=len(labels), class_margin=config.class_margin)
    if failing:  # which classes, and how each model did on them: the run's record says why
        candidate_metrics["failing_classes"] = failing
    log.info("gate: %s %s (active %s, candidate %s)", reason, failing or "", active_metrics, candidate_metrics)

    # 8. Save the candidate, with its reports; activate it if it passed.
    metrics: dict[str, Any] = dict(candidate_metrics)
    if candidate_metrics["overall_accuracy"] is not None:
        # The names `carbot models` and the recipe's artefacts use for the test score.
        metrics["test_accuracy"] = candidate_metrics["overall_accuracy"]
        metrics["test_images"] = candidate_metrics["overall_n"]
        if evaluation is not None:
            metrics["test_top3_accuracy"] = evaluation.top3_accuracy
    # The candidate's features moved with its weights: its out-of-distribution score is fitted
    # anew on what it trained on and calibrated on the hold-out (it plays no part in the gate).
    ood, ood_calibration = None, None
    familiar_train = base_data.train + fb.train
    if len(familiar_train) >= 2 and holdout:
        ood, ood_calibration = fit_familiarity(
            network, labels, preprocessing, train=familiar_train, validation=holdout, test=holdout,
            batch_size=config.batch_size,
        )  # fmt: skip
    report_image = None

    def add_files(directory: Path) -> None:
        nonlocal report_image
        if evaluation is not None:
            title = f"Model {version} (retrained from {base.version})"
            write_report(evaluation, directory, history=history, title=title)
            comparison = (base.version, version, active_metrics, candidate_metrics, reason)
            _append_gate_to_report(directory / "report.md", *comparison, counts)
            _plot_comparison(directory / REPORT_IMAGE, *comparison)
            report_image = registry.path_for(version) / REPORT_IMAGE  # where staging moves it
        if variants:
            # Verified on the hold-out (photos the candidate never trained on), calibrated on its training photos;
            # exported with the penultimate features as a second output, for the out-of-distribution score.
            export_variants(
                with_features(network), directory, preprocessing=preprocessing, labels=labels,
                verification=[(sample.path, sample.label) for sample in holdout],
                calibration=[sample.path for sample in base_data.train + fb.train],
            )  # fmt: skip

    promoted = promote and reason == BETTER
    try:  # activated only if an admin did not activate another version meanwhile: checked and done under one lock
        save_version(
            registry,
            network,
            version=version,
            add_files=add_files,
            activate=promoted,
            expect_active=base.version,
            labels=labels,
            backbone=base.backbone,
            preprocessing=preprocessing,
            dropout=float(base.meta.get("dropout", 0.1)),
            l2=float(base.meta.get("l2", 0.001)),
            metrics=metrics,
            data_fingerprint=_fingerprint(base_data.fingerprint, fb),
            extra={
                "retrained_from": base.version,
                "counts": counts,
                "gate": {
                    "reason": reason,
                    "passed": reason == BETTER,
                    "active": active_metrics,
                    "candidate": candidate_metrics,
                },
                "config": asdict(config),
                "base_dataset": str(base_dataset) if base_dataset is not None else None,
                "split_file": str(split_file) if split_file is not None else None,
                "base_split_fingerprint": base_data.fingerprint,
                "feedback_train": [photo.sha256 for photo in fb.train_photos],
                "feedback_holdout": [photo.sha256 for photo in fb.holdout_photos],
                "skipped": (base_data.skipped + fb.skipped)[:_MAX_LISTED_SKIPPED],  # all of them are counted
                "pretrained_backbone": pretrained,
                "history": history,
                "mixed_precision": gpu,
            },
            ood=ood,
            ood_calibration=ood_calibration,
        )
    except RegistryConflict as exc:  # saved, not activated
        log.warning("not activating %s: %s", version, exc)
        promoted = False
    duration = time.monotonic() - started
    log.info("retrain %s: %s, %s in %.1f s", version, reason, "promoted" if promoted else "not promoted", duration)
    return RetrainOutcome(
        base.version, version, promoted, reason, counts, active_metrics, candidate_metrics, report_image, duration
    )


def gate(
    active: dict[str, Any], candidate: dict[str, Any], *, num_labels: int | None = None, class_margin: float = 0.05
) -> str:
    """The verdict on a candidate, from both models' hold-out metrics (see :func:`retrain`, step 7)."""
    return judge(active, candidate, num_labels=num_labels, class_margin=class_margin)[0]


def judge(
    active: dict[str, Any], candidate: dict[str, Any], *, num_labels: int | None = None, class_margin: float = 0.05
) -> tuple[str, dict[str, dict[str, float | int]]]:
    """The gate's verdict and the classes that decided it (``{label: {"n", "active", "candidate"}}``, else empty).

    In order: no feedback hold-out; worse overall; worse on any class of the hold-out by more than
    `class_margin`, one photo of that class, and 2.5 standard errors of the difference of the two
    accuracies on that many photos (what chance alone could explain); no better than chance
    (``1 / num_labels``) on any class with at least 3 hold-out photos; not strictly better on the
    feedback hold-out. A class's accuracy is the share of its hold-out photos answered right.
    """
    if not candidate.get("feedback_n"):
        return NO_FEEDBACK_HOLDOUT, {}

    def score(metrics: dict[str, Any], key: str) -> float:
        return round(float(metrics[key]), _GATE_DECIMALS)

    if score(candidate, "overall_accuracy") < score(active, "overall_accuracy"):
        return WORSE_OVERALL, {}
    before, after = active.get("per_class") or {}, candidate.get("per_class") or {}

    def row(label: str) -> dict[str, float | int]:
        return {"n": after[label]["n"], "active": before.get(label, {}).get("accuracy", 0.0),
                "candidate": after[label]["accuracy"]}  # fmt: skip

    worse = {}
    for label, part in after.items():
        was = before.get(label, {}).get("accuracy")
        if was is None:
            continue
        now, n = part["accuracy"], part["n"]
        # Beyond the margin, one photo of the class, and what chance alone explains on n photos.
        noise = _CLASS_NOISE_Z * math.sqrt((was * (1 - was) + now * (1 - now)) / n)
        if round(was - now, _GATE_DECIMALS) > max(class_margin, 1.0 / n, noise):
            worse[label] = row(label)
    if worse:
        return WORSE_ON_A_CLASS, worse
    if num_labels:
        chance = 1.0 / num_labels
        judged = {label: part for label, part in after.items() if part["n"] >= _MIN_CLASS_PHOTOS}
        at_chance = {label: row(label) for label, part in judged.items()
                     if round(part["accuracy"], _GATE_DECIMALS) <= chance}  # fmt: skip
        if at_chance:
            return CHANCE_ON_A_CLASS, at_chance
    if score(candidate, "feedback_accuracy") <= score(active, "feedback_accuracy"):
        return NOT_BETTER_ON_FEEDBACK, {}
    return BETTER, {}


def oversample_factor(n_base: int, n_feedback: int, share: float, cap: int) -> int:
    """How often each training feedback photo is repeated per epoch so that it makes up about `share` of it.

    ``r * n_feedback / (n_base + r * n_feedback) = share`` solved for ``r``, rounded, kept
    within ``[1, cap]``. Without base photos the feedback is the whole epoch already: 1.
    """
    if n_feedback == 0 or n_base == 0 or share <= 0:
        return 1
    wanted = share * n_base / ((1.0 - share) * n_feedback)
    return max(1, min(cap, round(wanted)))


# --------------------------------------------------------------------------
# Data


@dataclass
class _FeedbackParts:
    train_photos: list[FeedbackPhoto] = field(default_factory=list)
    holdout_photos: list[FeedbackPhoto] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # sha256, path, label, reason

    @property
    def train(self) -> list[Sample]:
        return [Sample(Path(photo.path), photo.label) for photo in self.train_photos]

    @property
    def holdout(self) -> list[Sample]:
        return [Sample(Path(photo.path), photo.label) for photo in self.holdout_photos]


@dataclass
class _BaseParts:
    train: list[Sample] = field(default_factory=list)
    holdout: list[Sample] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # path, label, reason
    fingerprint: str | None = None  # the split's


def _feedback_parts(
    feedback: Sequence[FeedbackPhoto], labels: Sequence[str], preprocessing: Preprocessing, holdout_fraction: float
) -> _FeedbackParts:
    """Step 2: the usable feedback photos, cut into training and held-out ones."""
    parts = _FeedbackParts()
    known = set(labels)
    seen: set[str] = set()
    candidates: list[FeedbackPhoto] = []
    for photo in feedback:
        key = photo.sha256.strip().lower()
        reason = None
        if key in seen:
            reason = "the same photo (hash) is listed again"
        elif photo.label not in known:
            reason = f"label {photo.label!r} is not one of the model's labels"
        seen.add(key)
        if reason is None:
            candidates.append(photo)
        else:
            parts.skipped.append(_skip(photo, reason))
    # Decode each once, as training will: a photo that cannot be read must not stop the run.
    _, bad = check_samples([Sample(Path(photo.path), photo.label) for photo in candidates], preprocessing)
    unreadable = {str(sample.path): reason for sample, reason in bad}
    for photo in candidates:
        if str(Path(photo.path)) in unreadable:
            parts.skipped.append(_skip(photo, unreadable[str(Path(photo.path))]))
        elif is_held_out(photo.sha256, holdout_fraction):
            parts.holdout_photos.append(photo)
        else:
            parts.train_photos.append(photo)
    for entry in parts.skipped:
        log.warning("skipping feedback photo %s: %s", entry["sha256"], entry["reason"])
    return parts


def _skip(photo: FeedbackPhoto, reason: str) -> dict[str, str]:
    return {"sha256": photo.sha256, "path": str(photo.path), "label": photo.label, "reason": reason}


def _base_parts(
    base_dataset: Path | None,
    split_file: Path | None,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    config: RetrainConfig,
) -> _BaseParts:
    """Step 3: the base photos to train on and the base hold-out, from a split made once."""
    if base_dataset is None:
        return _BaseParts()
    skipped: list[dict[str, str]] = []
    split: Split
    if split_file is not None and Path(split_file).exists():
        # The saved split, checked against the photos' bytes: the same hold-out as every earlier retrain.
        split = load_split(Path(split_file))
        log.info("base data: reusing the split in %s", split_file)
    else:
        base_dataset = Path(base_dataset)
        samples = read_manifest(base_dataset) if base_dataset.suffix.lower() == ".csv" else scan_folder(base_dataset)
        samples, bad = check_samples(samples, preprocessing)
        skipped += [{"path": str(s.path), "label": s.label, "reason": reason} for s, reason in bad]
        if not samples:
            raise ValueError(f"the base dataset {base_dataset} has no readable photos")
        split = stratified_split(samples, validation=0.0, test=config.base_test_fraction, seed=config.seed)
        if split_file is not None:
            save_split(split, Path(split_file))
            log.info("base data: split saved in %s", split_file)
    known = set(labels)
    for sample in split.train + split.validation + split.test:
        if sample.label not in known:
            skipped.append({"path": str(sample.path), "label": sample.label, "reason": "not one of the model's labels"})
    return _BaseParts(
        train=[s for s in split.train + split.validation if s.label in known],
        holdout=[s for s in split.test if s.label in known],
        skipped=skipped,
        fingerprint=split.fingerprint,
    )


def _feedback_groups(photos: Sequence[FeedbackPhoto], oversample: int) -> list[tuple[list[Sample], int]]:
    """The training feedback by how often each photo is repeated: ``oversample`` times its weight, at least once."""
    groups: dict[int, list[Sample]] = {}
    for photo in photos:
        repeats = max(1, round(photo.weight * oversample))
        groups.setdefault(repeats, []).append(Sample(Path(photo.path), photo.label))
    return [(samples, repeats) for repeats, samples in sorted(groups.items(), reverse=True)]


def _training_dataset(
    base_train: list[Sample],
    feedback_groups: Sequence[tuple[list[Sample], int]],
    labels: Sequence[str],
    preprocessing: Preprocessing,
    config: RetrainConfig,
) -> tf.data.Dataset:
    """Step 5: one epoch = every base photo once and every feedback photo its repeats, mixed, batched."""
    parts: list[tf.data.Dataset] = []
    choices: list[np.ndarray] = []
    for index, (samples, repeats) in enumerate(((base_train, 1), *feedback_groups)):
        if not samples:
            continue
        # Decoded once and cached (unique photos only, so repeats cost no memory), reshuffled every pass.
        part = make_tf_dataset(
            samples,
            labels,
            preprocessing,
            batch_size=config.batch_size,
            shuffle=True,
            seed=config.seed + index,
            cache=True,
        ).unbatch()
        parts.append(part.repeat(repeats))
        choices.append(np.full(len(samples) * repeats, len(parts) - 1, dtype=np.int64))
    # Which part each of the epoch's photos comes from, in a new random order every epoch:
    # exactly the counts above, and the feedback spread through the epoch, not at its end.
    order = np.concatenate(choices)
    chooser = tf.data.Dataset.from_tensor_slices(order).shuffle(
        len(order), seed=config.seed, reshuffle_each_iteration=True
    )
    dataset = tf.data.Dataset.choose_from_datasets(parts, chooser).batch(config.batch_size)
    # Said outright (choose_from_datasets cannot know it), so that Keras knows each epoch's steps.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(math.ceil(len(order) / config.batch_size)))
    if config.augment:
        dataset = augment_batches(dataset, config.seed)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _fingerprint(base_fingerprint: str | None, fb: _FeedbackParts) -> str:
    """SHA-256 over what the candidate was made and judged with: the base split and the feedback."""
    rows = {
        "base_split": base_fingerprint,
        "train": sorted([photo.sha256.lower(), photo.label] for photo in fb.train_photos),
        "holdout": sorted([photo.sha256.lower(), photo.label] for photo in fb.holdout_photos),
    }
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------
# Training


def _pretrained(meta: dict[str, Any]) -> bool:
    """Whether the active model's backbone started from pretrained weights (its BatchNorm then stays frozen)."""
    config = (meta.get("extra") or {}).get("config")
    if isinstance(config, dict) and "weights" in config:  # a model made by training.train
        return config["weights"] is not None
    # Otherwise (the demo model, an imported one): only the tiny network has no pretrained weights at all.
    return meta.get("backbone") != "tiny"


class _Progress(keras.callbacks.Callback):
    """After each epoch: log it and tell `on_epoch`, with the time left at the mean epoch time so far."""

    def __init__(self, epochs: int, on_epoch: Callable[[RetrainProgress], None] | None, started: float) -> None:
        super().__init__()
        self.epochs = epochs
        self.on_epoch = on_epoch
        self.started = started  # retrain()'s start, for elapsed_s
        self.fit_started = started

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.fit_started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        done = epoch + 1
        now = time.monotonic()
        per_epoch = (now - self.fit_started) / done
        progress = RetrainProgress(
            epoch=done,
            epochs=self.epochs,
            loss=float(logs.get("loss", math.nan)),
            accuracy=float(logs.get("accuracy", math.nan)),
            elapsed_s=now - self.started,
            eta_s=per_epoch * (self.epochs - done),
        )
        log.info(
            "retrain epoch %d/%d: loss %.4f, accuracy %.3f, %.0f s left",
            done,
            self.epochs,
            progress.loss,
            progress.accuracy,
            progress.eta_s,
        )
        if self.on_epoch is not None:
            self.on_epoch(progress)


def _finetune(
    network: keras.Model,
    dataset: tf.data.Dataset,
    config: RetrainConfig,
    *,
    pretrained: bool,
    gpu: bool,
    on_epoch: Callable[[RetrainProgress], None] | None,
    started: float,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Step 6: the recipe's phase 2 on `network`, in place; returns the Keras history."""
    unfrozen = unfreeze_top(network.get_layer("backbone"), config.finetune_fraction, freeze_batchnorm=pretrained)
    start, end = (config.learning_rate / divisor for divisor in _FINETUNE_LR_DIVISORS)
    log.info("fine-tuning %d backbone layers for %d epochs, lr %g -> %g", unfrozen, config.epochs, start, end)
    network.compile(
        optimizer=keras.optimizers.SGD(learning_rate=start, momentum=_MOMENTUM),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=gpu,
    )
    own = [
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: epoch_lr(start, end, config.epochs, epoch)),
        # A loss gone NaN never comes back: stop spending epochs on it, and let the gate judge what is left.
        keras.callbacks.TerminateOnNaN(),
        _Progress(config.epochs, on_epoch, started),
    ]
    history = network.fit(dataset, epochs=config.epochs, callbacks=own + list(callbacks), shuffle=False, verbose=0)
    return {key: [float(value) for value in values] for key, values in history.history.items()}


# --------------------------------------------------------------------------
# Evaluation and reports


def _metrics(evaluation: Evaluation | None, n_base: int) -> dict[str, float | int | None]:
    """Accuracy overall, on the base part (the first `n_base` rows) and on the feedback part, with their sizes."""
    if evaluation is None:
        return {
            "overall_accuracy": None,
            "base_accuracy": None,
            "feedback_accuracy": None,
            "overall_n": 0,
            "base_n": 0,
            "feedback_n": 0,
        }
    parts = {
        "overall": evaluation,
        "base": Evaluation(evaluation.labels, evaluation.y_true[:n_base], evaluation.probabilities[:n_base]),
        "feedback": Evaluation(evaluation.labels, evaluation.y_true[n_base:], evaluation.probabilities[n_base:]),
    }
    metrics: dict[str, Any] = {}
    for name, part in parts.items():
        metrics[f"{name}_accuracy"] = part.accuracy if part.num_samples else None
    for name, part in parts.items():
        metrics[f"{name}_n"] = part.num_samples
    metrics["per_class"] = _per_class(evaluation)
    return metrics


def _per_class(evaluation: Evaluation) -> dict[str, dict[str, float | int]]:
    """Each class of the hold-out: how many photos it has there and the share answered right."""
    predicted = evaluation.probabilities.argmax(axis=1)
    classes = {}
    for index in np.unique(evaluation.y_true):
        mine = evaluation.y_true == index
        classes[evaluation.labels[int(index)]] = {
            "n": int(mine.sum()),
            "accuracy": float((predicted[mine] == index).mean()),
        }
    return classes


def _evaluate(
    network: keras.Model,
    holdout: list[Sample],
    n_base: int,
    *,
    labels: Sequence[str],
    preprocessing: Preprocessing,
    batch_size: int,
) -> tuple[dict[str, float | int | None], Evaluation | None]:
    """The hold-out metrics of `network`, and the overall Evaluation (None when there is no hold-out)."""
    if not holdout:
        return _metrics(None, 0), None
    # Not cached: decoded once per model, the hold-out needs no memory between the two passes.
    dataset = make_tf_dataset(holdout, labels, preprocessing, batch_size=batch_size)  # in order
    evaluation = evaluate(lambda images: network.predict_on_batch(images), dataset.as_numpy_iterator(), labels)
    return _metrics(evaluation, n_base), evaluation


_VERDICTS = {
    BETTER: "passes the gate: as good overall, better on the feedback hold-out",
    WORSE_OVERALL: "rejected: worse than the active model overall",
    NOT_BETTER_ON_FEEDBACK: "rejected: not better on the feedback hold-out",
    NO_FEEDBACK_HOLDOUT: "not promoted: no held-out feedback photo to show it learnt",
    WORSE_ON_A_CLASS: "rejected: worse than the active model on a class of the hold-out",
    CHANCE_ON_A_CLASS: "rejected: no better than chance on a class of the hold-out",
}

_PARTS = (("overall", "overall"), ("base", "base hold-out"), ("feedback", "feedback hold-out"))


def _percent(value: float | int | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _append_gate_to_report(
    report_md: Path,
    base_version: str,
    version: str,
    active: dict[str, Any],
    candidate: dict[str, Any],
    reason: str,
    counts: dict[str, int],
) -> None:
    """Add the gate's comparison to the candidate's ``report.md`` (after the evaluation write_report wrote)."""
    lines = [
        "",
        "## Retrain gate",
        "",
        f"Retrained from `{base_version}`: {counts['base_train']} base and {counts['feedback_train']} feedback photos "
        f"(each repeated {counts['oversample']}x) trained; {counts['feedback_skipped']} feedback photos skipped.",
        "",
        f"| hold-out | photos | active `{base_version}` | candidate `{version}` |",
        "|---|---|---|---|",
    ]
    for key, title in _PARTS:
        lines.append(
            f"| {title} | {candidate[f'{key}_n']} | {_percent(active[f'{key}_accuracy'])} "
            f"| {_percent(candidate[f'{key}_accuracy'])} |"
        )
    lines += ["", f"Verdict: **{reason}**, {_VERDICTS.get(reason, reason)}.", "", f"![Retrain gate]({REPORT_IMAGE})"]
    with report_md.open("a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def _plot_comparison(
    path: Path, base_version: str, version: str, active: dict[str, Any], candidate: dict[str, Any], reason: str
) -> None:
    """Grouped bars, active next to candidate, for each non-empty part of the hold-out."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    parts = [(key, title) for key, title in _PARTS if candidate[f"{key}_n"]]
    x = np.arange(len(parts))
    width = 0.38
    figure = Figure(figsize=(7.5, 4.8), dpi=100)
    axes = figure.add_subplot()
    for offset, metrics, name, colour in (
        (-width / 2, active, f"active {base_version}", "#9e9e9e"),
        (width / 2, candidate, f"candidate {version}", "#1f77b4" if reason == BETTER else "#d62728"),
    ):
        values = [100.0 * float(metrics[f"{key}_accuracy"]) for key, _ in parts]
        bars = axes.bar(x + offset, values, width, label=name, color=colour)
        axes.bar_label(bars, labels=[f"{v:.1f}%" for v in values], fontsize=9, padding=2)
    axes.set_xticks(x, labels=[f"{title}\n{candidate[f'{key}_n']} photos" for key, title in parts])
    axes.set_ylim(0, 115)
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("top-1 accuracy (%)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend(loc="upper left", ncols=2, fontsize=9)
    axes.set_title(f"Retrain {version}: {_VERDICTS.get(reason, reason)}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format="png")
