"""Classifying a batch of photos: decode in parallel, compute each distinct photo once, one forward pass.

This is the part of the worker that knows about the model. The RQ side
(`_batch_worker.py`) hands it photos and gets back, for each one, either a
result dictionary or the exception that photo deserves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np

from carbot import metrics
from model import CHECKSUM_FILE, ImageRejected, ModelRegistry, load_image, pixel_count, release_freed_memory
from worker._contract import PhotoRejected, RejectReason

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
    """The predictor to use, switched between batches when the registry's active model changes.

    The active model is identified by its directory and its checksum file, so both
    a newly activated version and a version rebuilt in place (`carbot demo-model
    --force`) are picked up. The first model loads before the worker takes jobs;
    a later one loads, compiles and warms up in a background thread while the old
    one keeps serving, and replaces it between two batches once it is ready: no
    photo waits for a model to load. Its checksum is verified first: a
    half-written or corrupt artefact never answers a photo, the old model keeps
    serving instead. Each version's runtime (TensorFlow, ONNX Runtime, OpenVINO) is chosen as it loads
    (`model.load_predictor`, the `runtime` setting); a swap may change runtime, and the predictor
    behaves the same on all of them.
    """

    def __init__(
        self, *, registry: Path | None = None, artefact: Path | None = None, max_batch: int = 32, runtime: str = "auto"
    ):
        if (registry is None) == (artefact is None):
            raise ValueError("give exactly one of registry or artefact")
        self._registry = ModelRegistry(registry) if registry is not None else None
        self._artefact = artefact
        self._max_batch = max_batch
        self._runtime = runtime  # CARBOT_RUNTIME: each version's runtime is chosen as it loads (model.load_predictor)
        self._predictor = None
        self._loaded: tuple[Path, int] | None = None
        self._failed: tuple[Path, int] | None = None  # a model that would not load is not retried every batch
        self._lock = threading.Lock()  # guards the hand-over from the loading thread
        self._loading: tuple[Path, int] | None = None
        self._ready: tuple[object, tuple[Path, int]] | None = None  # loaded in the background, not yet serving

    def current(self):
        """The predictor for the next batch (a `model.Predictor`); starts loading a newly activated model."""
        self.refresh()
        if self._predictor is None:
            raise RuntimeError("No active model: run `carbot demo-model` or `carbot promote VERSION`.")
        return self._predictor

    def served(self) -> dict[str, str] | None:
        """{"version", "runtime", "reason"} of the model serving now, None before the first one loads."""
        predictor = self._predictor
        if predictor is None:
            return None
        choice = predictor.runtime_choice
        return {"version": predictor.version, "runtime": predictor.runtime, "reason": choice.reason if choice else ""}

    def refresh(self) -> None:
        """Switch to a model loaded meanwhile, and start loading the active one if it is new.

        Called between batches (and by an idle worker's maintenance, so a new model is ready before photos come).
        """
        with self._lock:
            if self._ready is not None:
                self._serve(*self._ready)
                self._ready = None
            wanted = self._wanted()
            if self._loading is not None or wanted is None or wanted in (self._loaded, self._failed):
                return
            if self._predictor is not None:
                self._loading = wanted
                loader = threading.Thread(target=self._load_in_background, args=(wanted,), name="model-load")
                loader.daemon = True
                loader.start()
                return
        # Nothing serves yet (the worker is starting): load here, before any job is taken.
        predictor = self._load(wanted)
        with self._lock:
            self._serve(predictor, wanted)

    def _serve(self, predictor, loaded: tuple[Path, int]) -> None:
        replaced, self._predictor, self._loaded = self._predictor, predictor, loaded
        if replaced is not None:  # between batches: nothing else holds the model that served until now
            del replaced
            release_freed_memory(cycles=True)
        choice = predictor.runtime_choice
        log.info("now serving model %s on %s", predictor.version, predictor.runtime)
        metrics.model_loaded(predictor.version, predictor.runtime, choice.reason if choice else "")

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

    def _load_in_background(self, wanted: tuple[Path, int]) -> None:
        try:
            predictor = self._load(wanted)
        except Exception:
            log.exception("could not load model %s; still serving %s", wanted[0], self._predictor.version)
            metrics.model_refused()
            with self._lock:
                self._failed, self._loading = wanted, None
            return
        with self._lock:
            self._ready, self._loading = (predictor, wanted), None

    def _load(self, wanted: tuple[Path, int]):
        from model import load_predictor

        # Loads, compiles and warms up (times) every runtime that may serve, and keeps the one chosen.
        predictor = load_predictor(wanted[0], runtime=self._runtime, max_batch=self._max_batch)
        timings = ", ".join(f"{bucket}: {ms:.1f}" for bucket, ms in predictor.bucket_ms.items())
        log.info("model %s loaded from %s on %s; forward pass ms by batch size: %s",
                 predictor.version, wanted[0], predictor.runtime, timings)  # fmt: skip
        return predictor


class PixelBudget:
    """How many pixels the decoding threads may hold at once: the batch's decoding memory, bounded.

    A photo may have up to `max_pixels` pixels, and decoding one costs at most a
    few bytes a pixel (24 in the worst case, a float TIFF; 3 for most JPEGs and
    PNGs). With the budget equal to `max_pixels`, the decode of a whole batch
    costs what its single largest allowed photo costs, however many threads
    decode: four phone photos still decode side by side, four giant ones in turn.
    """

    def __init__(self, pixels: int) -> None:
        self.capacity = pixels
        self._free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(max(pixels, 0), self.capacity)  # a larger photo is refused by its decoder anyway
        with self._changed:
            self._changed.wait_for(lambda: self._free >= pixels)
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


class BatchClassifier:
    """Turns photo bytes into top-k results, one forward pass per batch."""

    def __init__(self, source: ModelSource, *, decode_threads: int):
        # `decode_threads`: the worker passes `Settings.decode_threads` (one a CPU core it may use by default).
        self.source = source
        self._pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")
        self._budget: PixelBudget | None = None

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
        budget = self._budget_for(predictor.preprocessing.max_pixels)
        decoded = dict(
            zip(distinct, self._pool.map(self._decode, distinct.values(), repeat(predictor), repeat(budget)))
        )
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
                    "runtime": predictor.runtime,
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

    def _budget_for(self, max_pixels: int) -> PixelBudget:
        if self._budget is None or self._budget.capacity != max_pixels:
            self._budget = PixelBudget(max_pixels)
        return self._budget

    @staticmethod
    def _decode(photo: bytes | None, predictor, budget: PixelBudget) -> np.ndarray | Exception:
        if photo is None:
            return PhotoRejected(
                "The photo expired before it could be classified; please send it again.", RejectReason.EXPIRED
            )
        try:
            with budget.hold(pixel_count(photo)):
                return load_image(photo, predictor.preprocessing)
        except ImageRejected as exc:
            return PhotoRejected(str(exc), RejectReason(exc.reason))
        except Exception:
            # A decoder bug on some odd file must cost that photo only, never the worker.
            log.exception("unexpected error decoding a photo")
            return PhotoRejected.unreadable()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
