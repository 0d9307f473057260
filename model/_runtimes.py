"""Serving a version on the runtime that suits the host: TensorFlow, ONNX Runtime or OpenVINO.

Each optimised variant (see `_variants`) runs behind one small interface, a *backend*: a
``forward(uint8 batch) -> probabilities`` the `Predictor` calls in place of its compiled Keras
pass, so bucketed batches, timed plans, hot swap and rollback are the same on every runtime.

`load_predictor` picks the runtime (the ``CARBOT_RUNTIME`` setting):

- a named runtime serves if its variant was verified, its files match their checksums and the
  host can run it; otherwise the worker logs why and chooses as ``auto`` does among the rest;
- ``auto`` on a GPU host: TensorFlow (batching on a GPU is where the gains are);
- ``auto`` on a CPU: every verified variant the host supports is loaded and timed on a batch of
  the largest bucket, one after another, by the CPU time the pass costs (which other processes'
  load does not change); the cheapest serves, warmed up on every bucket. A
  variant whose files are missing or altered is skipped, logged; when none is left, Keras on
  TensorFlow serves (TensorFlow is not loaded otherwise).

Nothing here imports TensorFlow unless TensorFlow is to be tried: a CPU worker without it serves
a variant.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ._artefact import ArtefactCorrupt, read_artefact
from ._variants import (
    ONNXRUNTIME,
    OPENVINO_BF16,
    OPENVINO_FP32,
    OPENVINO_INT8,
    RUNTIMES,
    TENSORFLOW,
    VARIANT_FILES,
    VARIANT_RUNTIMES,
    check_variant_files,
    read_variants,
    variants_dir,
)

log = logging.getLogger(__name__)

AUTO = "auto"
# Most images in one part of a batch streamed on OpenVINO's CPU streams. Smaller parts balance the streams
# when another process takes a core for a while; measured on a 2-core CPU (AVX512 VNNI, no AMX), int8
# ResNet50, batches of 32, beside a process busy 30 % of a core: halves 89.7, parts of 8 90.0, of 4 95.2,
# of 2 98.0 images/s; beside 50 %: 84.2, 85.1, 92.9, 90.8; alone 106.7, 105.3, 108.5, 108.8 (a throw-away
# script, medians of 5 rounds; `python -m bench openvino-streams` measures the worker's pass against one stream).
STREAM_PART = 4
# The precision OpenVINO's CPU plugin computes each OpenVINO variant in (int8's is in its IR).
OPENVINO_PRECISIONS = {OPENVINO_FP32: "f32", OPENVINO_BF16: "bf16", OPENVINO_INT8: "int8"}
RUNTIME_CHOICES = (AUTO, *RUNTIMES)
# How long `auto` times each variant's pass at least (two passes at least). A ResNet50's batch of 32 takes
# longer than that on a small CPU, but a lone photo's pass (a worker with CARBOT_MAX_BATCH=1) takes about
# 11 ms: on a 2-core AMD EPYC, the best of two such passes put int8 at 40 ms of CPU instead of 22 in two
# starts of six, and one of them served bf16 (36 ms); timed for this long, six starts of six chose int8
# at 21.5-24 ms (docs/benchmarks.md).
TRIAL_S = 0.25


class RuntimeUnavailable(Exception):
    """The host cannot run this runtime (its package is not installed, or its CPU lacks the instructions)."""


@dataclass
class RuntimeChoice:
    """Which runtime serves a version, and why."""

    runtime: str
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # CPU ms of a batch on each runtime tried
    skipped: dict[str, str] = field(default_factory=dict)  # runtime -> why it does not serve


class Backend:
    """A variant's forward pass: (N, size, size, 3) uint8 -> (N, classes) float32 probabilities, and the
    (N, d) penultimate features when the variant was exported with them (None otherwise)."""

    name: str
    precision: str

    def __init__(self) -> None:
        self.trace_count = 0  # compilations, as the Predictor counts TensorFlow's traces

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class OnnxBackend(Backend):
    name, precision = ONNXRUNTIME, "fp32"

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._shapes: set[tuple[int, ...]] = set()

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if batch.shape not in self._shapes:  # ONNX Runtime plans its memory per shape
            self._shapes.add(batch.shape)
            self.trace_count += 1
        outputs = self._session.run(None, {self._input: batch.astype(np.float32)})
        return outputs[0], outputs[1] if len(outputs) > 1 else None


class OpenVinoBackend(Backend):
    """An OpenVINO IR compiled for the CPU once per batch shape (static shapes run fastest).

    A batch of at least one image a stream runs on the CPU's streams (OpenVINO's THROUGHPUT hint: on
    2 cores, 2 streams of 1 thread), as parts of at most `STREAM_PART` images that the streams take
    in turn. One stream of all the threads (the LATENCY default) waits at every layer for its
    slowest thread, so a core lent to another process for a moment stalls both; and a batch cut
    in one half a stream leaves the faster stream idle while the slower finishes its half.
    `python -m bench openvino-streams` measures this backend against one stream (docs/benchmarks.md).
    A lone photo keeps every thread on its one stream, for its latency.
    """

    def __init__(self, name: str, xml: Path, precision: str) -> None:
        super().__init__()
        import openvino as ov

        self.name, self.precision = name, precision
        self._core = ov.Core()
        self._model = _taking_bytes(self._core.read_model(str(xml)))
        self._config = {"INFERENCE_PRECISION_HINT": precision} if precision in ("bf16", "f32") else {}
        self._compiled: dict[tuple[tuple[int, ...], bool], Any] = {}  # (shape, streamed) -> compiled model
        self._requests: dict[tuple[int, ...], list[Any]] = {}  # a streamed part's shape -> one request a part
        self._streams: int | None = None
        self._shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if batch.shape not in self._shapes:  # compiled for this batch size now (one model, or a stream's part)
            self._shapes.add(batch.shape)
            self.trace_count += 1
        # The model reads the uint8 pixels where they are (`_taking_bytes`): no float copy, no copy at all.
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        part = self._part_size(len(batch), self.streams(batch.shape[1:]))
        if part:
            return self._forward_streamed(batch, part)
        compiled = self._compiled_for(batch.shape, streamed=False)
        outputs = compiled(batch, share_inputs=True)
        return outputs[0], outputs[1] if len(compiled.outputs) > 1 else None

    def streams(self, image_shape: tuple[int, ...]) -> int:
        """How many streams OpenVINO's THROUGHPUT hint gives this model on this CPU (asked once, of one image)."""
        if self._streams is None:
            probe = self._compiled_for((1, *image_shape), streamed=True)
            self._streams = max(1, int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return self._streams

    @staticmethod
    def _part_size(count: int, streams: int) -> int:
        """Images in each part of a streamed batch of `count` (the largest divisor up to `STREAM_PART` that
        gives every stream a part), or 0 when the batch runs whole on one stream."""
        if streams < 2 or count < streams:
            return 0
        return next(part for part in range(min(STREAM_PART, count // streams), 0, -1) if count % part == 0)

    def _forward_streamed(self, batch: np.ndarray, part: int) -> tuple[np.ndarray, np.ndarray | None]:
        parts = np.split(batch, len(batch) // part)
        compiled = self._compiled_for(parts[0].shape, streamed=True)
        with self._lock:  # the requests are reused: one batch at a time
            requests = self._requests.setdefault(parts[0].shape, [])
            requests += [compiled.create_infer_request() for _ in range(len(parts) - len(requests))]
            requests = requests[: len(parts)]
            for request, images in zip(requests, parts):
                # Queued: each stream takes the next part when it is free. The parts are views of `batch`,
                # which outlives the requests.
                request.start_async({0: images}, share_inputs=True)
            for request in requests:
                request.wait()
            outputs = [
                np.concatenate([request.get_output_tensor(index).data for request in requests])
                for index in range(len(compiled.outputs))
            ]
        return outputs[0], outputs[1] if len(outputs) > 1 else None

    def _compiled_for(self, shape: tuple[int, ...], *, streamed: bool) -> Any:
        compiled = self._compiled.get((shape, streamed))
        if compiled is None:
            with self._lock:
                model = self._model.clone()
                model.reshape({model.inputs[0]: list(shape)})
                hint = {"PERFORMANCE_HINT": "THROUGHPUT"} if streamed else {}
                compiled = self._core.compile_model(model, "CPU", {**self._config, **hint})
                self._compiled[(shape, streamed)] = compiled
        return compiled


def _taking_bytes(model: Any) -> Any:
    """`model` with a uint8 input, converted to its float input inside the graph.

    The worker's batches are uint8 pixels. Converted in the graph, on the streams' own threads, they
    need neither the float copy (four times their size) nor the copy into each request that the
    worker's one thread made before a stream could start; 0 to 255 are exact in float, so the
    answers are the same as the variant's verified ones.
    """
    from openvino import Type
    from openvino.preprocess import PrePostProcessor

    processor = PrePostProcessor(model)
    processor.input(0).tensor().set_element_type(Type.u8)
    return processor.build()


def open_variant(folder: Path, name: str) -> Backend:
    """A backend for the variant `name` whose files are in `folder` (no checksum check: see `open_checked`)."""
    supported, why = host_supports(name)
    if not supported:
        raise RuntimeUnavailable(why)
    if name not in VARIANT_FILES:
        raise ValueError(f"unknown variant {name!r}")
    model_file = folder / VARIANT_FILES[name][0]
    if name == ONNXRUNTIME:
        return OnnxBackend(model_file)
    return OpenVinoBackend(name, model_file, OPENVINO_PRECISIONS[name])


def host_supports(runtime: str) -> tuple[bool, str]:
    """Whether this host can run `runtime`, and if not, why."""
    if runtime == TENSORFLOW:
        return (True, "") if _installed("tensorflow") else (False, "TensorFlow is not installed")
    if runtime == ONNXRUNTIME:
        return (True, "") if _installed("onnxruntime") else (False, "onnxruntime is not installed")
    if runtime in (OPENVINO_FP32, OPENVINO_BF16, OPENVINO_INT8):
        if not _installed("openvino"):
            return False, "openvino is not installed"
        needed = {OPENVINO_BF16: "BF16", OPENVINO_INT8: "INT8"}.get(runtime)
        if needed and needed not in _openvino_cpu_capabilities():
            return False, f"this CPU has no {needed} instructions OpenVINO uses"
        return True, ""
    return False, f"unknown runtime {runtime!r}"


@cache
def _openvino_cpu_capabilities() -> frozenset[str]:
    import openvino as ov

    return frozenset(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module left half-imported, or a stand-in without a spec
        return False


# Where a GPU driver shows itself on Linux (NVIDIA's, then ROCm's): without one TensorFlow sees no GPU.
GPU_DRIVER_PATHS = (Path("/proc/driver/nvidia/gpus"), Path("/dev/nvidia0"), Path("/dev/kfd"))


def has_gpu() -> bool:
    """Whether TensorFlow is installed and sees a GPU.

    TensorFlow is imported only on a host with a GPU driver: importing it costs seconds and half a
    gigabyte that a CPU worker serving a variant would carry for nothing.
    """
    if not _installed("tensorflow") or not any(path.exists() for path in GPU_DRIVER_PATHS):
        return False
    try:
        import tensorflow as tf
    except ImportError:  # present but broken: no GPU to serve on through it
        return False
    return bool(tf.config.list_physical_devices("GPU"))


def load_predictor(directory: Path, *, runtime: str = AUTO, max_batch: int = 32, warm: bool = True):
    """A `Predictor` for the artefact in `directory` on the runtime `runtime` chooses, warmed up.

    Its ``runtime_choice`` says which runtime serves and why. Raises ArtefactCorrupt (or
    FileNotFoundError) if the artefact itself is unreadable, or if no runtime can serve it.
    """
    from ._predictor import Predictor

    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIME_CHOICES)}")
    directory = Path(directory)
    artefact = read_artefact(directory, verify=True)
    try:
        manifest = read_variants(directory)
    except ArtefactCorrupt as exc:
        log.warning("model %s: ignoring its variants: %s", artefact.version, exc)
        manifest = None
    variants = manifest.variants if manifest is not None else {}
    skipped: dict[str, str] = {}

    def build(name: str) -> Predictor:
        if name == TENSORFLOW:
            if not _installed("tensorflow"):
                raise RuntimeUnavailable("TensorFlow is not installed")
            return Predictor.from_artefact(directory, max_batch=max_batch)
        variant = variants.get(name)
        if variant is None:
            raise RuntimeUnavailable("this version has no such variant")
        if not variant.verified:
            raise RuntimeUnavailable(f"{variant.status} at verification: {variant.reason}")
        check_variant_files(directory, variant)
        backend = open_variant(variants_dir(directory), name)
        return Predictor(None, max_batch=max_batch, backend=backend, artefact=artefact)

    def attempt(name: str, prepare: Callable[[Predictor], None]) -> Predictor | None:
        try:
            predictor = build(name)
            prepare(predictor)
            return predictor
        except Exception as exc:  # a missing, altered or unloadable variant: the next runtime serves
            skipped[name] = f"{exc.__class__.__name__}: {exc}" if not isinstance(exc, RuntimeUnavailable) else str(exc)
            log.warning("model %s: runtime %s cannot serve: %s", artefact.version, name, skipped[name])
            return None

    def warmup(predictor: Predictor) -> None:
        if warm:
            predictor.warmup()

    prefix = ""
    if runtime != AUTO:
        predictor = attempt(runtime, warmup)
        if predictor is not None:
            return _chosen(predictor, RuntimeChoice(runtime, f"CARBOT_RUNTIME={runtime}", skipped=skipped))
        prefix = f"CARBOT_RUNTIME={runtime} cannot serve ({skipped[runtime]}); "

    if has_gpu():
        predictor = attempt(TENSORFLOW, warmup)
        if predictor is not None:
            return _chosen(predictor, RuntimeChoice(TENSORFLOW, prefix + "a GPU: TensorFlow", skipped=skipped))
        # TensorFlow could not load this version on the GPU: the verified variants still serve, on the CPU.
        prefix += f"a GPU, but TensorFlow cannot serve ({skipped[TENSORFLOW]}); "

    # Time every verified variant on a batch of the largest bucket (where a busy worker spends its time)
    # and serve the fastest: the one whose pass costs the least CPU, which is what bounds a busy worker's
    # photos a second on a CPU (every runtime here keeps all the cores busy through a batch). Wall time
    # would rank whoever had the machine to itself: workers starting together on one host time their
    # variants while the others load theirs, and one such start measured int8 at 976 ms against bf16's
    # 802, where alone int8 takes 310-370 ms and bf16 530-610 (docs/benchmarks.md). In a hot swap the
    # batches served meanwhile are this process's CPU too, and add to each candidate's time while it runs.
    # One candidate at a time is held: each is freed, and its memory handed back, before the next loads,
    # and only the one that serves is then loaded again and compiled for every bucket (one compilation
    # more at start than keeping it would cost). Holding two fully warmed runtimes at once took a
    # ResNet50 worker to 2 GB at start where it serves in 0.6 GB.
    # TensorFlow is not among them: it is the reference the variants were verified against, slower on
    # every CPU measured (docs/benchmarks.md), and loading it only to time it would hold its memory (over
    # a gigabyte for ResNet50, never given back) for the worker's whole life. It serves when no variant can.
    timings: dict[str, float] = {}
    for name in VARIANT_RUNTIMES:
        if name in skipped:
            continue
        if name not in variants:
            skipped[name] = "this version has no such variant"
            continue
        candidate = attempt(name, lambda p: p.warmup([max_batch]))
        if candidate is not None:
            timings[name] = round(candidate.forward_ms(max_batch, cpu=True, for_at_least_s=TRIAL_S), 3)
            del candidate
            release_freed_memory()
    for name in sorted(timings, key=timings.get):
        predictor = attempt(name, warmup)
        if predictor is not None:
            measured = ", ".join(f"{n} {ms:.1f} ms" for n, ms in sorted(timings.items(), key=lambda kv: kv[1]))
            reason = f"{prefix}fastest on this CPU at warm-up (CPU time of a batch of {max_batch}: {measured})"
            return _chosen(predictor, RuntimeChoice(name, reason, timings_ms=timings, skipped=skipped))
    if TENSORFLOW not in skipped:
        predictor = attempt(TENSORFLOW, warmup)
        if predictor is not None:
            reason = f"{prefix}no verified variant can serve on this host: Keras on TensorFlow"
            return _chosen(predictor, RuntimeChoice(TENSORFLOW, reason, skipped=skipped))
    raise ArtefactCorrupt(f"no runtime can serve model {artefact.version}: {skipped}")


def release_freed_memory(*, cycles: bool = False) -> None:
    """Hand the memory just let go (a predictor and its compiled passes) back to the system.

    glibc keeps freed memory for reuse and returns little of it by itself: without `malloc_trim`
    a runtime tried and dropped at start would stay in the worker's resident memory for its life.
    A variant's predictor is freed as soon as it is let go; `cycles` first collects what only
    reference cycles hold (a Keras model), a full collection that costs a quarter of a second
    with TensorFlow loaded.
    """
    if cycles:
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): its own freeing will do
        ctypes.CDLL(None).malloc_trim(0)


def _chosen(predictor: Any, choice: RuntimeChoice) -> Any:
    release_freed_memory()  # what compiling and timing let go, handed back before the predictor serves
    predictor.runtime_choice = choice
    not_used = "; ".join(f"{name}: {why}" for name, why in choice.skipped.items())
    log.info("model %s serves on %s: %s%s", predictor.version, choice.runtime, choice.reason,
             f" (not used: {not_used})" if not_used else "")  # fmt: skip
    return predictor
