"""Sharing one machine: a retrain gives way to people's photos.

In the default layouts (compose's one host, `carbot` with its embedded worker and train worker) a retrain
trains on the same CPUs, or the same GPU, as the worker that answers people. Left alone, TensorFlow's
training threads take every core they find and a photo waits behind them. The retrain's process
therefore (`share_machine`, called first thing in the retrain's child process):

1. lowers its own CPU priority (niceness 19 by default): the kernel then runs the worker whenever it has
   work, and training takes what is left. On Linux a niceness belongs to a thread, and a thread inherits
   its creator's, so every thread of the process is reniced, and TensorFlow's pools, started later,
   inherit it;
2. pauses between training steps (`GiveWay`, a Keras callback at batch boundaries) while the classify
   queue has photos waiting or being classified: the queue, RQ's intermediate list, and the jobs in its
   StartedJobRegistry whose worker still vouches for them (a dead worker's leftovers do not count).
   Redis is read at most every `poll_s` while training, every `pause_poll_s` while paused.

A step already running is not interrupted (priority covers it), and the pauses are bounded: in all, a
retrain pauses at most `pause_grace_s` plus `max_pause_ratio` times the time it has trained, so a steady
stream of photos slows a retrain (by 4x at most, with the defaults) but never stops it. A Redis that
cannot be read counts as "no photos": training goes on.

`CARBOT_RETRAIN_YIELD=false` turns both off, for a train worker on a machine of its own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
from rq import Queue
from rq.registry import StartedJobRegistry

from carbot.jobs import RedisClock
from carbot.keys import SERIALIZER

if TYPE_CHECKING:
    import keras

    from carbot.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharingPolicy:
    """How a retrain gives way. The defaults are the product's; tests and benchmarks shorten them."""

    niceness: int = 19  # the lowest CPU priority there is
    poll_s: float = 0.25  # while training: Redis is read at most this often (each read is one round trip)
    pause_poll_s: float = 0.05  # while paused: how soon training resumes after the last photo is answered
    max_pause_ratio: float = 3.0  # paused in all at most this many times the time trained ...
    pause_grace_s: float = 30.0  # ... plus this

    def __post_init__(self) -> None:
        if self.poll_s < 0 or self.pause_poll_s <= 0 or self.max_pause_ratio < 0 or self.pause_grace_s < 0:
            raise ValueError("a sharing policy's intervals and bounds must not be negative")


def photos_in_progress(connection: redis.Redis, queue_name: str, clock: RedisClock | None = None) -> int:
    """Photos on the classify queue `queue_name` not yet answered: queued, being taken, or being classified.

    One round trip. A started job counts only while its worker vouches for it (its registry score, an
    expiry on Redis's clock, is in the future): a dead worker's jobs wait for rescue, not for us.
    """
    queue = Queue(queue_name, connection=connection, serializer=SERIALIZER)
    started = StartedJobRegistry(queue_name, connection=connection, serializer=SERIALIZER)
    now = (clock or RedisClock(connection)).now()
    with connection.pipeline(transaction=False) as pipe:
        pipe.llen(queue.key)
        pipe.llen(queue.intermediate_queue_key)
        pipe.zcount(started.key, f"({now}", "+inf")
        return sum(int(count) for count in pipe.execute())


class GiveWay:
    """Between training steps: wait while photos are in progress, within the pause budget.

    `between_steps()` is the whole of it; `keras_callback()` calls it at every training batch's start.
    The counters (`pauses`, `paused_s`, `polls`, `exhausted`) say what it did, for logs, tests and the bench.
    """

    def __init__(self, connection: redis.Redis | None, queue_name: str, policy: SharingPolicy | None = None) -> None:
        self.connection = connection  # None: never pauses (yielding is off)
        self.queue_name = queue_name
        self.policy = policy or SharingPolicy()
        self._clock = RedisClock(connection) if connection is not None else None
        self._started: float | None = None  # monotonic time of the first step
        self._last_poll = -float("inf")
        self._failing = False
        self.pauses = 0
        self.paused_s = 0.0
        self.polls = 0
        self.exhausted = False  # the budget ran out: no more pauses in this run

    @property
    def enabled(self) -> bool:
        return self.connection is not None

    def allowed_pause_s(self, now: float | None = None) -> float:
        """The pause budget left at `now` (monotonic): grace plus ratio x time trained, less what was paused."""
        if self._started is None:
            return self.policy.pause_grace_s
        now = time.monotonic() if now is None else now
        trained = max(0.0, now - self._started - self.paused_s)
        return self.policy.pause_grace_s + self.policy.max_pause_ratio * trained - self.paused_s

    def between_steps(self) -> None:
        """Return when training may take its next step: at once, or once no photo is in progress."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        if not self.enabled or self.exhausted or now - self._last_poll < self.policy.poll_s:
            return
        if not self._busy():
            return
        self.pauses += 1
        began = time.monotonic()
        try:
            while True:
                left = self.allowed_pause_s(began) - (time.monotonic() - began)
                if left <= 0:
                    self.exhausted = True
                    log.warning("retrain: paused %.0f s for photos in all, its limit; training on without pausing",
                                self.paused_s + time.monotonic() - began)  # fmt: skip
                    return
                time.sleep(min(self.policy.pause_poll_s, left))
                if not self._busy():
                    return
        finally:
            self.paused_s += time.monotonic() - began

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """What to add to a Keras `fit`: the callback when yielding is on, else nothing."""
        return [self.keras_callback()] if self.enabled else []

    def keras_callback(self) -> keras.callbacks.Callback:
        """A Keras callback that calls `between_steps()` before every training batch."""
        import keras  # here: this module is imported before TensorFlow starts (see share_machine)

        give_way = self

        class _GiveWayCallback(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
                give_way.between_steps()

            def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
                if give_way.pauses:
                    log.info("retrain gave way to photos: %s", give_way.summary())

        return _GiveWayCallback()

    def summary(self) -> dict[str, Any]:
        return {"pauses": self.pauses, "paused_s": round(self.paused_s, 2), "polls": self.polls,
                "exhausted": self.exhausted}  # fmt: skip

    def _busy(self) -> bool:
        self._last_poll = time.monotonic()
        self.polls += 1
        try:
            busy = photos_in_progress(self.connection, self.queue_name, self._clock) > 0
        except redis.RedisError as exc:  # the worker cannot be served either: nothing to give way to
            if not self._failing:
                log.warning("retrain: cannot read the classify queue (%s); training on", exc)
            self._failing = True
            return False
        self._failing = False
        return busy


def lower_priority(niceness: int) -> int:
    """Give every thread of this process at least `niceness` (never raise a priority); returns the main thread's.

    Linux keeps a niceness per thread and a new thread inherits its creator's: threads started afterwards
    (TensorFlow's pools) run at this priority too.
    """
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: the process's niceness is all there is
        threads = [0]
    for tid in threads:
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            if current < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError:  # a thread that ended meanwhile
            continue
    return os.getpriority(os.PRIO_PROCESS, 0)


def share_machine(settings: Settings, connection: redis.Redis, policy: SharingPolicy | None = None) -> GiveWay:
    """The retrain process's side of sharing: lower its priority and return its `GiveWay`.

    Call it before TensorFlow is imported, so that TensorFlow's threads inherit the priority. With
    `retrain_yield` off it changes nothing and the `GiveWay` it returns never pauses.
    """
    if not settings.retrain_yield:
        return GiveWay(None, settings.classify_queue, policy)
    give_way = GiveWay(connection, settings.classify_queue, policy)
    niceness = lower_priority(give_way.policy.niceness)
    log.info("retrain: sharing the machine with the classify worker (niceness %d, pausing while photos on %r wait)",
             niceness, settings.classify_queue)  # fmt: skip
    return give_way
