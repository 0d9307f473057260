"""Batched prediction with a loaded artefact: probabilities and top-k labels.

The compiled forward pass only ever sees a few fixed batch sizes ("buckets": powers of
two up to `max_batch`), so it is traced once per bucket and then reused, however the
worker's batches happen to vary in size (TF Serving's `allowed_batch_sizes`).

A batch that is not a bucket size is run as a *plan* of buckets: padded up to a larger
one, or split into smaller ones. Which is cheaper depends on the hardware: a GPU takes
32 photos in about the time of 1, so padding 23 photos to 32 costs nothing; a CPU's time
grows with the batch, so padding wastes a quarter of the pass where 16 + 4 + 2 + 1 does
not. `warmup()` times every bucket on the machine at hand and picks, for every batch
size, the plan with the least measured time; until then batches are padded.

The forward pass is the Keras model's (a ``tf.function`` per bucket) or, for an optimised
variant, a runtime's (ONNX Runtime, OpenVINO: see `_runtimes`); all the above is the same on each.
The same pass also returns the penultimate features, from which the artefact's
out-of-distribution score (``_ood``) tells, for each photo, whether it looks like
the photos the model was trained on: `predict` answers both at no second pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._artefact import Artefact, ArtefactCorrupt
from ._ood import OodVerdict, load_ood
from ._preprocess import Preprocessing

if TYPE_CHECKING:  # Keras is imported only for a Keras forward pass: a variant serves without TensorFlow
    import keras

    from ._runtimes import Backend, RuntimeChoice
    from ._saving import LoadedModel

# What the forward pass returns: (probabilities, penultimate features). A variant exported before its
# network had the second output gives None for the features (and so no out-of-distribution verdict).
Outputs = tuple[np.ndarray, np.ndarray | None]

# `warmup` times the buckets in rounds: at least PLAN_ROUNDS, and more while a round still finds some
# bucket's pass faster by more than PLAN_SETTLED, up to PLAN_ROUNDS_MAX (a ResNet50's round on a 2-core
# CPU: about 1.4 s on int8, 4 s on TensorFlow). Settled by the timings, not the plans: two plans of
# about the same cost trade places on a few percent of noise.
PLAN_ROUNDS = 2
PLAN_ROUNDS_MAX = 6
PLAN_SETTLED = 0.1


@dataclass(frozen=True)
class Answer:
    """One photo's prediction: the top-k labels with probabilities, and how familiar the photo looks."""

    top_k: list[tuple[str, float]]
    ood: OodVerdict | None  # None when the model version has no out-of-distribution score


class Predictor:
    """A loaded model that answers batches of preprocessed images (from `load_image`)."""

    def __init__(
        self,
        loaded: LoadedModel | None,
        *,
        max_batch: int = 32,
        backend: Backend | None = None,
        artefact: Artefact | None = None,
    ) -> None:
        """`loaded` (a Keras model) or, for another runtime (see `_runtimes`), `backend` and `artefact`."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        if (loaded is None) == (backend is None) or (backend is not None and artefact is None):
            raise ValueError("give either a loaded Keras model, or a backend and its artefact")
        self._loaded = loaded
        self._artefact = loaded.artefact if loaded is not None else artefact
        self._backend = backend
        self.runtime_choice: RuntimeChoice | None = None  # set by `load_predictor`
        self._ood = loaded.ood if loaded is not None else load_ood(self._artefact)
        if loaded is not None:
            from ._network import with_features  # Keras: only for a Keras forward pass

            self._network = with_features(loaded.keras_model)
            features = self._network.output_shape[1][-1]
            if self._ood is not None and self._ood.num_features != features:
                raise ArtefactCorrupt(
                    f"the out-of-distribution score of {loaded.artefact.path} expects {self._ood.num_features} "
                    f"features; the network has {features}"
                )
        self._max_batch = max_batch
        self._buckets = bucket_sizes(max_batch)
        self._plans = cheapest_plans({bucket: 1.0 for bucket in self._buckets}, max_batch)
        self._bucket_ms: dict[int, float] = {}
        self._trace_count = 0
        self._forward = backend.forward if backend is not None else self._compile_forward()

    @classmethod
    def from_artefact(cls, directory: Path, *, max_batch: int = 32) -> Predictor:
        from ._saving import load_artefact

        return cls(load_artefact(directory), max_batch=max_batch)

    @property
    def artefact(self) -> Artefact:
        return self._artefact

    @property
    def runtime(self) -> str:
        """What computes the forward pass: "tensorflow" (Keras), or a variant's runtime."""
        return self._backend.name if self._backend is not None else "tensorflow"

    @property
    def version(self) -> str:
        return self.artefact.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.artefact.labels

    @property
    def preprocessing(self) -> Preprocessing:
        return self.artefact.preprocessing

    @property
    def image_size(self) -> int:
        return self.artefact.image_size

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def buckets(self) -> tuple[int, ...]:
        return self._buckets

    @property
    def bucket_ms(self) -> dict[int, float]:
        """Each bucket's measured forward time in ms (empty until a full `warmup()`)."""
        return dict(self._bucket_ms)

    def plan(self, count: int) -> tuple[int, ...]:
        """The buckets a batch of `count` images runs as (their sum minus `count` is padding)."""
        full, rest = divmod(count, self._max_batch)
        return (self._max_batch,) * full + (self._plans[rest] if rest else ())

    @property
    def trace_count(self) -> int:
        """How many times the forward pass was traced (compiled); stays put once warm."""
        return self._backend.trace_count if self._backend is not None else self._trace_count

    @property
    def has_ood(self) -> bool:
        """Whether this model version scores how familiar a photo looks (versions saved before it did not)."""
        return self._ood is not None

    def outputs(self, images: np.ndarray) -> Outputs:
        """(N, size, size, 3) uint8 images -> (N, num_classes) probabilities and (N, d) features, float32."""
        images = self._checked(images)
        chunks, start = [], 0
        for bucket in self.plan(len(images)):
            chunks.append(self._run_padded(images[start : start + bucket], bucket))
            start += bucket
        if not chunks:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0), np.float32)
        features = None if any(c[1] is None for c in chunks) else np.concatenate([c[1] for c in chunks])
        return np.concatenate([c[0] for c in chunks]), features

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """(N, size, size, 3) uint8 images -> (N, num_classes) float32 probabilities."""
        return self.outputs(images)[0]

    def predict(self, images: np.ndarray, k: int = 3) -> list[Answer]:
        """For each image, its `k` most likely labels (best first) and its out-of-distribution verdict."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        k = min(k, len(self.labels))
        probabilities, features = self.outputs(images)
        ood = self._ood
        verdicts = ood.verdicts(features) if ood is not None and features is not None else [None] * len(probabilities)
        answers = []
        for row, verdict in zip(probabilities, verdicts):
            best = np.argsort(-row, kind="stable")[:k]
            answers.append(Answer([(self.labels[i], float(row[i])) for i in best], verdict))
        return answers

    def predict_topk(self, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, the `k` most likely labels with their probabilities, best first."""
        return [answer.top_k for answer in self.predict(images, k)]

    def warmup(self, batch_sizes: Iterable[int] | None = None) -> None:
        """Compile the forward pass for the buckets that `batch_sizes` fall in.

        By default every bucket is compiled and then timed, and each batch size gets
        the plan of buckets that is fastest on this machine. The buckets are timed in
        rounds, so that a moment of other work spoils few of their timings, but the plans
        are only as good as these timings: time it while the machine is calm where you can.
        """
        sizes = self._buckets if batch_sizes is None else batch_sizes
        for bucket in sorted({self._bucket_for(min(int(n), self._max_batch)) for n in sizes}):
            self._forward(self._blank(bucket))
        if batch_sizes is None:
            self._bucket_ms, self._plans = self._timed_plans()

    def forward_ms(self, bucket: int, repeats: int = 2, *, cpu: bool = False, for_at_least_s: float = 0.0) -> float:
        """The best of `repeats` forward passes of a batch of `bucket` images, in ms: what the pass costs
        when the machine lets it run. Compile the bucket first (`warmup`), or the first pass times that.

        `cpu`: the CPU time the pass took in this process (all its threads) instead of the time it took.
        Other processes' load does not change it: a pass that waits for a core costs no CPU meanwhile.
        It says nothing of a GPU's work.
        `for_at_least_s`: more passes, until they have taken that long: the best of many short passes
        leaves out a moment when something else in the process ran (a runtime's threads finishing
        what the last one began).
        """
        clock = time.process_time if cpu else time.perf_counter
        blank, best, passes = self._blank(bucket), float("inf"), 0
        until = time.perf_counter() + for_at_least_s
        while passes < repeats or time.perf_counter() < until:
            started = clock()
            self._forward(blank)
            best = min(best, (clock() - started) * 1000)
            passes += 1
        return best

    def _timed_plans(self) -> tuple[dict[int, float], dict[int, tuple[int, ...]]]:
        """Every bucket's best pass, timed in rounds over all the buckets until they settle, and the plans.

        In turns, a moment of other work (another process starting, this worker serving while a new
        version warms up) spoils one pass of a few buckets, and a later round times them again. Timed
        back to back, both passes of one bucket could fall in it: on the benchmark's start, timings of a
        busy moment made 23 photos run padded to 32, at 1.46 times the cost of 16 + 4 + 2 + 1.
        Wall time, not CPU time: on a GPU the CPU mostly waits.
        """
        best = dict.fromkeys(self._buckets, float("inf"))
        for timed in range(1, PLAN_ROUNDS_MAX + 1):
            improved = False
            for bucket in self._buckets:
                ms = self.forward_ms(bucket, repeats=1)
                improved |= ms < best[bucket] * (1 - PLAN_SETTLED)
                best[bucket] = min(best[bucket], ms)
            if timed >= PLAN_ROUNDS and not improved:
                break
        return best, cheapest_plans(best, self._max_batch)

    def _blank(self, count: int) -> np.ndarray:
        return np.zeros((count, self.image_size, self.image_size, 3), dtype=np.uint8)

    def _checked(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), not {images.shape}")
        if images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (from load_image), not {images.dtype}")
        return images

    def _run_padded(self, chunk: np.ndarray, bucket: int) -> Outputs:
        count = len(chunk)
        if bucket > count:
            padding = np.zeros((bucket - count, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        probabilities, features = self._forward(chunk)
        return probabilities[:count], None if features is None else features[:count]

    def _bucket_for(self, count: int) -> int:
        return next(bucket for bucket in self._buckets if bucket >= count)

    def _compile_forward(self) -> Callable[[np.ndarray], Outputs]:
        import keras

        keras_model = self._network
        if keras.backend.backend() != "tensorflow":
            return self._eager_forward(keras_model)
        import tensorflow as tf

        size = self.image_size

        @tf.function
        def call(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            # Python code here runs only while TensorFlow traces.
            self._trace_count += 1
            probabilities, features = keras_model(tf.cast(images, tf.float32), training=False)
            return tf.cast(probabilities, tf.float32), tf.cast(features, tf.float32)

        # One graph per bucket, with its exact shape, traced the first time the bucket runs. Asked for
        # by shape (`get_concrete_function`), not found by calling: TensorFlow counts calls that trace,
        # and warns of "retracing" at the fifth bucket of a function called with each shape.
        traced: dict[int, Callable] = {}

        def forward(batch: np.ndarray) -> Outputs:
            bucket = len(batch)
            if bucket not in traced:
                traced[bucket] = call.get_concrete_function(tf.TensorSpec((bucket, size, size, 3), tf.uint8))
            probabilities, features = traced[bucket](tf.convert_to_tensor(batch))
            return probabilities.numpy(), features.numpy()

        return forward

    def _eager_forward(self, keras_model: keras.Model) -> Callable[[np.ndarray], Outputs]:
        # Other backends (JAX on a GPU host) compile inside predict_on_batch, once per shape;
        # count new shapes as the closest equivalent of a trace.
        seen: set[tuple[int, ...]] = set()

        def forward(batch: np.ndarray) -> Outputs:
            if batch.shape not in seen:
                seen.add(batch.shape)
                self._trace_count += 1
            probabilities, features = keras_model.predict_on_batch(batch.astype(np.float32))
            return np.asarray(probabilities, dtype=np.float32), np.asarray(features, dtype=np.float32)

        return forward


def cheapest_plans(bucket_cost: Mapping[int, float], max_batch: int) -> dict[int, tuple[int, ...]]:
    """For every batch size from 1 to `max_batch`, the buckets to run it as with the least total cost.

    A plan may pad (a bucket larger than what is left) and may split (several buckets).
    Ties go to the plan with fewer passes, then to the one with less padding, so equal
    costs (as before any timing) mean: pad up to the smallest bucket that holds the batch.

    A pass over more images never truly costs less than one over fewer, so a bucket timed
    below a smaller one (the machine was busy while the smaller one was timed: a worker warms
    up while others start) is taken at the smaller one's cost. Otherwise a lone photo could be
    padded to a pair for good, at twice the model's time (seen on a worker started beside two
    others: 24.5 ms for one photo at batch 1's 14.3).
    """
    bucket_cost = _non_decreasing(bucket_cost)
    best: dict[int, tuple[float, int, int, tuple[int, ...]]] = {0: (0.0, 0, 0, ())}
    for count in range(1, max_batch + 1):
        candidates = []
        for bucket, cost in bucket_cost.items():
            rest_cost, rest_passes, rest_size, rest_plan = best[max(0, count - bucket)]
            candidates.append((cost + rest_cost, rest_passes + 1, bucket + rest_size, (bucket, *rest_plan)))
        best[count] = min(candidates)
    return {count: tuple(sorted(plan, reverse=True)) for count, (*_, plan) in best.items() if count}


def _non_decreasing(bucket_cost: Mapping[int, float]) -> dict[int, float]:
    """Each bucket's cost raised to the highest cost of any smaller bucket."""
    costs, highest = {}, 0.0
    for bucket in sorted(bucket_cost):
        highest = max(highest, bucket_cost[bucket])
        costs[bucket] = highest
    return costs


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, then `max_batch` itself: 24 -> (1, 2, 4, 8, 16, 24)."""
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch)
    return tuple(sizes)
