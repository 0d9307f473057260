"""Classifying a batch of photos: decode in parallel, compute each distinct photo once, one forward pass.

This is the part of the worker that knows about the model. The RQ side
(`_batch_worker.py`) hands it photos and gets back, for each one, either a
result dictionary or the exception that photo deserves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from carbot import _metrics as metrics
from model import CHECKSUM_FILE, ImageRejected, ModelRegistry, load_image
from worker._contract import PhotoRejected

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one batch cost; the worker logs it and adds it to the shared counters."""

    size: int = 0
    distinct: int = 0  # different photos in the batch
    computed: int = 0  # photos that went through the model
    padded: int = 0  # images the forward pass computed: `computed` plus the padding of its plan
    rejected: int = 0  # jobs whose photo could not be read
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    model_version: str = ""
    outcomes: list[dict | Exception] = field(default_factory=list)


class ModelSource:
    """The predictor to use, reloaded between batches when the registry's active model changes.

    The active model is identified by its directory and its checksum file, so both
    a newly activated version and a version rebuilt in place (`carbot demo-model
    --force`) are picked up. A new model is loaded and its checksum verified before
    it replaces the old one: a half-written or corrupt artefact never answers a
    photo, the old model keeps serving instead.
    """

    def __init__(self, *, registry: Path | None = None, artefact: Path | None = None, max_batch: int = 32):
        if (registry is None) == (artefact is None):
            raise ValueError("give exactly one of registry or artefact")
        self._registry = ModelRegistry(registry) if registry is not None else None
        self._artefact = artefact
        self._max_batch = max_batch
        self._predictor = None
        self._loaded: tuple[Path, int] | None = None
        self._failed: tuple[Path, int] | None = None  # a model that would not load is not retried every batch

    def current(self):
        """The predictor for the next batch (a `model.Predictor`)."""
        wanted = self._wanted()
        if wanted is not None and wanted not in (self._loaded, self._failed):
            self._load(wanted)
        if self._predictor is None:
            raise RuntimeError("No active model: run `carbot demo-model` or `carbot promote VERSION`.")
        return self._predictor

    def _wanted(self) -> tuple[Path, int] | None:
        """(directory, checksum file's mtime) of the model that should serve, or None when unknown right now."""
        if self._artefact is not None:
            path = self._artefact
        else:
            version = self._registry.active_version()
            if version is None:
                return None
            path = self._registry.path_for(version)
        try:
            return path, (path / CHECKSUM_FILE).stat().st_mtime_ns
        except FileNotFoundError:  # being replaced this very moment, or gone: keep what we have
            return None

    def _load(self, wanted: tuple[Path, int]) -> None:
        from model import Predictor

        try:
            predictor = Predictor.from_artefact(wanted[0], max_batch=self._max_batch)
            predictor.warmup()
        except Exception:
            if self._predictor is None:
                raise
            log.exception("could not load model %s; still serving %s", wanted[0], self._predictor.version)
            self._failed = wanted
            return
        timings = ", ".join(f"{bucket}: {ms:.1f}" for bucket, ms in predictor.bucket_ms.items())
        log.info("model %s loaded from %s; forward pass ms by batch size: %s", predictor.version, wanted[0], timings)
        metrics.model_loaded(predictor.version)
        self._predictor, self._loaded, self._failed = predictor, wanted, None


class BatchClassifier:
    """Turns photo bytes into top-k results, one forward pass per batch."""

    def __init__(self, source: ModelSource, *, decode_threads: int = 4):
        self.source = source
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")

    def classify(self, photos: Sequence[tuple[str, bytes | None]], top_k: Sequence[int]) -> BatchReport:
        """Classify `photos` (each a `(sha256, bytes or None when missing)`), asking `top_k[i]` labels for each.

        Identical photos (same hash) are decoded and computed once. A photo that
        cannot be read gets a `PhotoRejected`; the others are unaffected.
        """
        predictor = self.source.current()
        report = BatchReport(size=len(photos), model_version=predictor.version)

        distinct: dict[str, bytes | None] = dict(photos)
        report.distinct = len(distinct)

        started = time.perf_counter()
        decoded = dict(zip(distinct, self._pool.map(self._decode, distinct.values(), repeat(predictor))))
        report.decode_ms = (time.perf_counter() - started) * 1000

        good = [digest for digest, image in decoded.items() if isinstance(image, np.ndarray)]
        ranked = {}
        report.computed = len(good)
        if good:
            report.padded = sum(predictor.plan(len(good)))
            started = time.perf_counter()
            batch = np.stack([decoded[digest] for digest in good])
            # Top-k and the out-of-distribution verdict come from the same forward pass.
            predictions = predictor.predict(batch, k=max(top_k))
            report.inference_ms = (time.perf_counter() - started) * 1000
            ranked = dict(zip(good, predictions))

        for (digest, _), k in zip(photos, top_k):
            if digest in ranked:
                answer = ranked[digest]
                outcome = {
                    "model_version": predictor.version,
                    "photo": digest,
                    "top_k": [{"label": label, "probability": round(float(p), 6)} for label, p in answer.top_k[:k]],
                }
                if answer.ood is not None:
                    outcome["ood"] = answer.ood.to_dict()
                report.outcomes.append(outcome)
            else:
                report.rejected += 1
                report.outcomes.append(decoded[digest])
        return report

    @staticmethod
    def _decode(photo: bytes | None, predictor) -> np.ndarray | Exception:
        if photo is None:
            return PhotoRejected("The photo expired before it could be classified; please send it again.")
        try:
            return load_image(photo, predictor.preprocessing)
        except ImageRejected as exc:
            return PhotoRejected(str(exc))
        except Exception:
            # A decoder bug on some odd file must cost that photo only, never the worker.
            log.exception("unexpected error decoding a photo")
            return PhotoRejected("This picture could not be read; please send it as a JPEG or PNG.")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
