"""How familiar a photo looks: an out-of-distribution score on the network's penultimate features.

A softmax always names some class, and with high confidence for photos the model cannot
know (a dog, a screenshot, a car model it was never shown). What it *has* seen is a cloud
of feature vectors per class (the backbone's pooled output, the input of the head), so a
photo whose features lie far from every class's cloud is unlike the training photos,
whatever its softmax says.

The score is the smallest Mahalanobis distance from a photo's features to the class means,
with one covariance shared by the classes (Lee et al. 2018, "A simple unified framework for
detecting out-of-distribution samples"), divided by the number of features so that
familiar photos score about 1. The features are square-rooted first (keeping their sign):
pooled ReLU activations are skewed, with long tails, and a Gaussian fits their roots far
better. On the demo model this is the difference between flagging 30 % and 100 % of the
unlike photos (``training._unlike``). It is fitted on the training split's features and
*calibrated* on the validation split: the threshold is the score that a chosen share of
validation photos exceeds (the false-rejection rate, 2 % by default), so it means the same
for any dataset or backbone. A photo scoring above the threshold is "unfamiliar".

Only NumPy is needed: the worker gets the features from the same forward pass as the
probabilities (see `model.Predictor`) and scores a batch with two small matrix products.
The fitted arrays live in the artefact's ``ood.npz`` (covered by its checksum); the
threshold and how it was calibrated, in ``model.json`` under ``"ood"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OOD_FILE = "ood.npz"
METHOD = "mahalanobis-sqrt"  # Mahalanobis distance on signed square roots of the features
DEFAULT_FALSE_REJECTION = 0.02
# Shrinks the shared covariance towards a multiple of the identity: features that hardly vary
# in training (dead ReLU channels) would otherwise get near-infinite weight, and the training
# photos' features are tighter than unseen ones'. On the demo model 0.3 against 0.05 flagged
# 1.8 % of the test photos instead of 3.1 % at the same 2 % validation rate, and 100 % of the
# unlike photos either way.
SHRINKAGE = 0.3


@dataclass(frozen=True)
class OodVerdict:
    """One photo's score, the threshold it was held against, and whether it is unlike the training photos."""

    score: float
    threshold: float
    unfamiliar: bool

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "threshold": round(self.threshold, 4), "unfamiliar": self.unfamiliar}


class OodScorer:
    """Class means and a whitening matrix fitted on training features, and the calibrated threshold."""

    def __init__(self, means: np.ndarray, whitening: np.ndarray, threshold: float = float("inf")) -> None:
        means = np.asarray(means, dtype=np.float32)
        whitening = np.asarray(whitening, dtype=np.float32)
        if means.ndim != 2 or whitening.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"means (classes, d) and whitening (d, d) do not fit: {means.shape}, {whitening.shape}")
        self.means = means
        self.whitening = whitening
        self.white_means = means @ whitening  # the class means in whitened space, computed once
        self._mean_norms = np.sum(self.white_means**2, axis=1)
        self.threshold = float(threshold)

    @property
    def num_features(self) -> int:
        return self.whitening.shape[0]

    @classmethod
    def fit(
        cls, features: np.ndarray, targets: np.ndarray, num_classes: int, *, shrinkage: float = SHRINKAGE
    ) -> OodScorer:
        """Fit on (N, d) training features and their (N,) class indices; the threshold is set by `calibrate`."""
        # float32 features, float64 sums, in chunks: 57,000 ResNet50 feature vectors stay under 0.5 GB.
        x = _transform(np.asarray(features, dtype=np.float32))
        y = np.asarray(targets).astype(np.int64)
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise ValueError(f"need (N, d) features and N targets, N >= 2; got {x.shape} and {y.shape}")
        overall = x.mean(axis=0, dtype=np.float64)
        means = np.stack(
            [x[y == c].mean(axis=0, dtype=np.float64) if np.any(y == c) else overall for c in range(num_classes)]
        )
        d = x.shape[1]
        covariance = np.zeros((d, d))
        for start in range(0, len(x), 4096):
            centred = x[start : start + 4096] - means[y[start : start + 4096]]
            covariance += centred.T @ centred
        covariance /= len(x)
        covariance = (1 - shrinkage) * covariance + shrinkage * (np.trace(covariance) / d) * np.eye(d)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = np.maximum(eigenvalues, 1e-12 * max(float(eigenvalues.max()), 1e-12))
        # x @ whitening has unit covariance; divided by sqrt(d) so a typical squared norm is about 1.
        whitening = eigenvectors / np.sqrt(eigenvalues * d)
        return cls(means, whitening)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, d) features -> (N,) scores: squared distance to the nearest class, per feature (about 1 if familiar)."""
        z = _transform(np.asarray(features, dtype=np.float32)) @ self.whitening
        distances = np.sum(z**2, axis=1, keepdims=True) - 2.0 * z @ self.white_means.T + self._mean_norms
        return np.maximum(distances.min(axis=1), 0.0)

    def calibrate(self, features: np.ndarray, false_rejection: float = DEFAULT_FALSE_REJECTION) -> float:
        """Set the threshold so that `false_rejection` of these (validation) photos score above it; return it."""
        if not 0.0 < false_rejection < 1.0:
            raise ValueError(f"false_rejection must be in (0, 1), not {false_rejection}")
        scores = self.score(features)
        self.threshold = float(np.quantile(scores, 1.0 - false_rejection, method="higher"))
        return self.threshold

    def unfamiliar(self, features: np.ndarray) -> np.ndarray:
        """(N,) booleans: which photos score above the threshold."""
        return self.score(features) > self.threshold

    def verdicts(self, features: np.ndarray) -> list[OodVerdict]:
        return [OodVerdict(float(s), self.threshold, bool(s > self.threshold)) for s in self.score(features)]

    def save(self, path: Path) -> None:
        """Write the fitted arrays (not the threshold, which belongs in ``model.json``) to `path`."""
        with open(path, "wb") as f:
            np.savez(f, method=np.array(METHOD), means=self.means, whitening=self.whitening)

    @classmethod
    def load(cls, path: Path, threshold: float) -> OodScorer:
        """Read what `save` wrote. Never unpickles: a file that needs pickle is refused."""
        with np.load(path, allow_pickle=False) as arrays:
            # The method names the transform too: a file of another method is refused, never misread.
            if str(arrays["method"]) != METHOD:
                raise ValueError(f"{path} holds a {arrays['method']} score; this code reads {METHOD}")
            return cls(arrays["means"], arrays["whitening"], threshold)


@dataclass(frozen=True)
class FlagRate:
    """What share of new photos, drawn like the photos a threshold was calibrated on, it flags."""

    expected: float
    low: float  # `low` to `high` holds the share in `confidence` of calibrations
    high: float
    confidence: float


def like_photos_flagged(calibrated_on: int, flagged_there: int, confidence: float = 0.9) -> FlagRate:
    """The share of like photos flagged by a threshold that `flagged_there` of its `calibrated_on` photos exceed.

    The threshold is then the (flagged_there + 1)-th highest calibration score, and whatever the scores'
    distribution, the share of like photos above such a threshold is Beta(flagged_there + 1,
    calibrated_on - flagged_there) distributed. On few calibration photos it is far from the rate chosen:
    2 % of 228 photos gives 0.9-4.0 % in nine calibrations of ten.
    """
    if not 0 <= flagged_there < calibrated_on:
        raise ValueError(f"{flagged_there} of {calibrated_on} photos cannot be above a threshold set among them")
    r, n = flagged_there + 1, calibrated_on

    def share_at_most(x: float) -> float:
        # P(Beta(r, n + 1 - r) <= x) = P(Binomial(n, x) >= r), summed in logs: the binomial's terms overflow.
        below = sum(
            math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                     + k * math.log(x) + (n - k) * math.log1p(-x))
            for k in range(r)
        )  # fmt: skip
        return 1.0 - below

    def quantile(q: float) -> float:
        low, high = 0.0, 1.0
        for _ in range(50):  # bisection, to about 1e-15
            middle = (low + high) / 2
            low, high = (middle, high) if share_at_most(middle) < q else (low, middle)
        return (low + high) / 2

    tail = (1.0 - confidence) / 2
    return FlagRate(r / (n + 1), quantile(tail), quantile(1.0 - tail), confidence)


def _transform(features: np.ndarray) -> np.ndarray:
    """Signed square root: pooled activations' long tails pulled in, so one Gaussian per class fits."""
    return np.sign(features) * np.sqrt(np.abs(features))


def load_ood(artefact: Any) -> OodScorer | None:
    """The out-of-distribution score saved with `artefact` (a verified `Artefact`), None for a version without one."""
    from ._artefact import ArtefactCorrupt

    calibration = artefact.ood
    if calibration is None:
        return None
    try:
        return OodScorer.load(artefact.path / OOD_FILE, float(calibration["threshold"]))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ArtefactCorrupt(f"{artefact.path / OOD_FILE} cannot be read: {exc}") from exc
