"""Prometheus metrics of the worker and of the bots, every one of them in this file.

Each process serves one registry on its endpoint (`carbot.health`): `WORKER` in `carbot worker`,
`BOTS` in the Telegram and Discord bots, `PLAIN` elsewhere. Each registry also carries the
process's own CPU, memory, open files and garbage-collector figures. Worker replicas are separate
processes with an endpoint each; Prometheus sums them (no multiprocess mode is involved).

The code being measured calls the small functions below, one line where the event happens:
the batch worker when jobs start, finish or fail and when a batch is done; the model source when
a model is loaded; the conversation around a photo and a button press; the store when a vote is
recorded.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

T = TypeVar("T")

# Each counter and histogram would also export a `_created` timestamp series: noise on a dashboard.
disable_created_metrics()


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


# Durations from a few milliseconds (a decoded thumbnail) to a minute (a deadline missed by far).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# -- the worker --------------------------------------------------------------------------------------------------

WORKER = _registry()

BATCH_SIZE = Histogram(
    "carbot_worker_batch_size", "Photos in one forward pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=WORKER,
)  # fmt: skip
QUEUE_WAIT = Histogram(
    "carbot_worker_queue_wait_seconds", "How long a job waited in the queue before a worker started it.",
    buckets=_SECONDS, registry=WORKER,
)  # fmt: skip
DECODE_TIME = Histogram(
    "carbot_worker_decode_seconds", "Decoding the photos of one batch (in parallel).", buckets=_SECONDS, registry=WORKER
)
INFERENCE_TIME = Histogram(
    "carbot_worker_inference_seconds", "The forward pass of one batch.", buckets=_SECONDS, registry=WORKER
)
JOB_OUTCOMES = ("finished", "rejected", "expired", "invalid", "failed")
JOBS = Counter(
    "carbot_worker_jobs", "Jobs ended by outcome; a failed job may be retried and counted again.",
    ["outcome"], registry=WORKER,
)  # fmt: skip
MODEL = Gauge("carbot_worker_model_info", "The model version this worker serves (value 1).", ["version"],
              registry=WORKER)  # fmt: skip
MODEL_REFUSALS = Counter(
    "carbot_worker_model_refusals", "Model versions this worker would not serve (failed to load or to verify); "
    "the one before kept serving.", registry=WORKER,
)  # fmt: skip
RUNTIME = Gauge("carbot_worker_runtime_info", "What runs this worker's forward pass (CARBOT_RUNTIME; value 1).",
                ["runtime"], registry=WORKER)  # fmt: skip
for _outcome in JOB_OUTCOMES:
    JOBS.labels(_outcome)  # every outcome is exported from the start, at 0, so rates work from the first scrape

_loaded_version: str | None = None
_loaded_runtime: dict[str, str] | None = None


def observe_queue_waits(waits_ms: Iterable[float]) -> None:
    """The batch's jobs have just started: how long each waited in the queue."""
    for wait_ms in waits_ms:
        QUEUE_WAIT.observe(max(wait_ms, 0.0) / 1000)


def jobs_finished(count: int) -> None:
    JOBS.labels("finished").inc(count)


def job_failed(outcome: str) -> None:
    """A job ended failed; the worker says how (one of JOB_OUTCOMES other than "finished")."""
    JOBS.labels(outcome if outcome in JOB_OUTCOMES else "failed").inc()


def observe_batch(size: int, decode_ms: float, inference_ms: float) -> None:
    """One batch went through the model (a batch of only expired or invalid jobs did not)."""
    if size:
        BATCH_SIZE.observe(size)
        DECODE_TIME.observe(decode_ms / 1000)
        INFERENCE_TIME.observe(inference_ms / 1000)


def model_loaded(version: str, runtime: str = "tensorflow", reason: str = "") -> None:
    """The worker now serves `version` on `runtime`, chosen for `reason` (at start, and after each switch)."""
    global _loaded_version, _loaded_runtime
    _loaded_version = version
    _loaded_runtime = {"runtime": runtime, "reason": reason}
    MODEL.clear()
    MODEL.labels(version).set(1)
    RUNTIME.clear()
    RUNTIME.labels(runtime).set(1)


def model_refused() -> None:
    """A newly activated model could not be loaded; the worker goes on serving the one it had."""
    MODEL_REFUSALS.inc()


def loaded_model_version() -> str | None:
    """The version this process serves, None until a model has been loaded."""
    return _loaded_version


def loaded_runtime() -> dict[str, str] | None:
    """{"runtime", "reason"} of the model this process serves, None until a model has been loaded."""
    return _loaded_runtime


# -- the bots ----------------------------------------------------------------------------------------------------

BOTS = _registry()

REQUESTS = Counter("carbot_bot_requests", "Photos and button presses received.", ["platform", "kind"], registry=BOTS)
PHOTO_OUTCOMES = ("answered", "rejected", "busy", "timeout", "failed", "not_submitted")
REPLIES = Counter(
    "carbot_bot_replies",
    "Replies to photos by outcome: answered (the top-3), rejected (unreadable photo), busy (queue full), "
    "timeout, failed, not_submitted (rate limit, Redis unreachable).",
    ["platform", "outcome"], registry=BOTS,
)  # fmt: skip
ERRORS = Counter(
    "carbot_bot_errors", "Unexpected exceptions while handling a photo or a button press (bugs).",
    ["platform", "handler"], registry=BOTS,
)  # fmt: skip
VOTES = Counter("carbot_bot_votes", "Votes recorded: up, down, correction.", ["platform", "vote"], registry=BOTS)
REPLY_TIME = Histogram(
    "carbot_bot_reply_seconds", "From a photo in hand to its top-3 ready to send (answered photos).",
    ["platform"], buckets=_SECONDS, registry=BOTS,
)  # fmt: skip

# The outcome of the photo this asyncio task is handling: the conversation notes it where it decides it
# (`photo_outcome`), `observe_photo` counts it. A context variable: the two run in the same task.
_photo_outcome: ContextVar[str] = ContextVar("carbot_photo_outcome", default="not_submitted")


class _HasPlatform(Protocol):
    platform: str


def observe_photo(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorates `Conversation.photo(sender, ...)`: counts the photo, its reply by outcome and its time."""

    @functools.wraps(handler)
    async def observed(self: Any, sender: _HasPlatform, *args: Any, **kwargs: Any) -> T:
        REQUESTS.labels(sender.platform, "photo").inc()
        token = _photo_outcome.set("not_submitted")  # what a photo that never reaches the classifier ends as
        started = time.perf_counter()
        try:
            reply = await handler(self, sender, *args, **kwargs)
            outcome = _photo_outcome.get()
        except Exception:
            ERRORS.labels(sender.platform, "photo").inc()
            raise
        finally:
            _photo_outcome.reset(token)
        REPLIES.labels(sender.platform, outcome).inc()
        if outcome == "answered":
            REPLY_TIME.labels(sender.platform).observe(time.perf_counter() - started)
        return reply

    return observed


def photo_outcome(outcome: str) -> None:
    """The photo being handled (inside `observe_photo`) ends as `outcome`, one of PHOTO_OUTCOMES."""
    if outcome not in PHOTO_OUTCOMES:
        raise ValueError(f"unknown photo outcome {outcome!r}")
    _photo_outcome.set(outcome)


def observe_button(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorates `Conversation.button(sender, ...)`: counts the press, or its exception."""

    @functools.wraps(handler)
    async def observed(self: Any, sender: _HasPlatform, *args: Any, **kwargs: Any) -> T:
        REQUESTS.labels(sender.platform, "button").inc()
        try:
            return await handler(self, sender, *args, **kwargs)
        except Exception:
            ERRORS.labels(sender.platform, "button").inc()
            raise

    return observed


def vote_recorded(platform: str, vote: str) -> None:
    """A vote was stored: "up", "down" or "correction"."""
    VOTES.labels(platform, vote).inc()


# -- any other process -------------------------------------------------------------------------------------------

PLAIN = _registry()  # e.g. the train worker: only its health and the process figures
