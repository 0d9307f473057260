"""The RQ jobs this project runs, and the checks that keep any other job from running.

RQ imports whatever function a job names, and the callbacks it names too (RQ's
own failure path and its abandoned-job cleanup call them), and sends the
webhooks a job carries. Anyone who can write to Redis could therefore make a
worker run code or send requests. The project's workers look at a job's names
before anything of it is imported (`OwnJobsOnly`, mixed into both workers): a
job that is not one of the project's own, or that carries callbacks or
webhooks, is failed as refused with nothing of it run (`refusal`, `refuse`).
Their maintenance hands abandoned jobs back without calling anything a job
names (`rescue_abandoned`). `RedisClock` is the clock that deadlines and the
batch worker's heartbeats are read on, so hosts whose clocks disagree still
agree on when a photo is late and which jobs are abandoned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import TYPE_CHECKING

from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ReadyJobRegistry,
)
from rq.utils import now
from rq.worker_registration import clean_worker_registry

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline
    from rq import Queue

log = logging.getLogger(__name__)


REFUSED = "JobRefused"  # the error name a refused job's failure records


class RedisClock:
    """Unix time as Redis's server sees it: the one clock that every bot and worker shares.

    Deadlines and heartbeats written by one host and read by another are compared
    on this clock, so a host whose own clock is a minute off neither fails photos
    as late nor takes another worker's batch for abandoned. The offset to the
    local clock is measured with Redis's `TIME` and measured again every
    `refresh_s`; between measurements reading the clock costs nothing.
    """

    def __init__(self, connection: redis.Redis, *, refresh_s: float = 30.0) -> None:
        self._connection = connection
        self._refresh_s = refresh_s
        self._offset = 0.0
        self._measured_at: float | None = None  # time.monotonic() of the last measurement

    def now(self) -> float:
        if self._measured_at is None or time.monotonic() - self._measured_at > self._refresh_s:
            self.measure()
        return time.time() + self._offset

    def from_local(self, local_time: float) -> float:
        """A moment given on this host's clock (e.g. `time.time() + 30`), on Redis's clock."""
        return local_time + self.now() - time.time()

    def measure(self) -> None:
        """Measure the local clock's offset to Redis's (half a round trip of error at most)."""
        before = time.time()
        seconds, microseconds = self._connection.time()
        after = time.time()
        self._offset = seconds + microseconds / 1e6 - (before + after) / 2
        self._measured_at = time.monotonic()


def refusal(job: Job, allowed: Collection[str]) -> str | None:
    """Why `job` must not run on a worker that runs only `allowed` functions; None when it may.

    Reads only names: nothing the job names is imported.
    """
    try:
        func_name = job.func_name
        instance = job.instance
    except Exception:  # data that does not even deserialise
        return "its data cannot be read"
    if func_name not in allowed or instance is not None:
        return f"it names {func_name!r}, which is not a job of this worker"
    callbacks = [
        name
        for name in (
            getattr(job, "_success_callback_name", None),
            getattr(job, "_failure_callback_name", None),
            getattr(job, "_stopped_callback_name", None),
        )
        if name
    ]
    if callbacks:
        return f"it names callbacks ({', '.join(map(repr, callbacks))}), which this project never uses"
    if job.webhooks:
        return "it carries webhooks, which this project never uses"
    return None


def refuse(job: Job, queue: Queue, reason: str) -> None:
    """Fail `job` as refused: no retry, no callback, no webhook; it leaves the queue's lists."""
    log.warning("refused job %s on queue %s: %s", job.id, queue.name, reason)
    with queue.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 0, job.id)
        pipe.lrem(queue.key, 0, job.id)
        job.retries_left = 0
        record_job_failure(job, f"{REFUSED}: this job was refused: {reason}", pipe)
        pipe.execute()


def rescue_abandoned(
    queue: Queue, cutoff: float, allowed: Collection[str], *, on_final: Callable[[Job, Pipeline], None] | None = None
) -> list[str]:
    """Hand back the jobs of `queue` whose worker stopped vouching for them before `cutoff` (RQ's "abandoned" jobs).

    What RQ's `StartedJobRegistry.cleanup` does (retry the job if it has retries
    left, else fail it), except that nothing a job names is called (RQ calls its
    failure callback) and a job that is not one of `allowed` is refused.
    `on_final(job, pipeline)` is told of each job that will not run again.
    Returns the ids of the jobs handed back to the queue.
    """
    registry = queue.started_job_registry
    entries = registry.connection.zrangebyscore(registry.key, 0, cutoff)
    if not entries:
        return []
    retried = []
    with registry.connection.pipeline() as pipe:
        for entry in entries:
            job_id = registry.parse_job_id(entry.decode() if isinstance(entry, bytes) else entry)
            pipe.zrem(registry.key, entry)
            job = queue.fetch_job(job_id)
            # A leftover entry of a job that ended is not abandoned; only STARTED means its worker died.
            if job is None or job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            reason = refusal(job, allowed)
            if reason is not None:
                log.warning("refused abandoned job %s on queue %s: %s", job.id, queue.name, reason)
                job.retries_left = 0
                record_job_failure(job, f"{REFUSED}: this job was refused: {reason}", pipe)
            elif job.retries_left:
                log.warning("job %s: its worker stopped; handed back to queue %s", job.id, queue.name)
                job.retry(queue, pipe)
                retried.append(job.id)
            else:
                log.warning("job %s: its worker stopped and it has no retries left", job.id)
                record_job_failure(job, "AbandonedJobError: its worker stopped while running it", pipe)
                if on_final is not None:
                    on_final(job, pipe)
        pipe.execute()
    return retried


class OwnJobsOnly:
    """Mixed into an RQ worker class: it runs only `allowed_funcs`, and its maintenance calls nothing a job names.

    `execute_job` refuses any other job before RQ imports anything of it;
    `clean_registries` replaces RQ's (whose abandoned-job cleanup calls the
    failure callback a job names, and whose intermediate-list cleanup sends its
    webhooks) with `rescue_abandoned` and `requeue_stranded`.
    """

    allowed_funcs: tuple[str, ...] = ()
    # A job taken from the queue (RQ's intermediate list) but not started this long after was taken by a
    # worker that died. RQ's own threshold is a minute.
    stranded_after = timedelta(minutes=1)

    def execute_job(self, job: Job, queue: Queue) -> None:
        reason = refusal(job, self.allowed_funcs)
        if reason is not None:
            refuse(job, queue, reason)
            return
        super().execute_job(job, queue)

    def abandoned_cutoff(self) -> float:
        """Started jobs whose heartbeat score is below this are abandoned (RQ scores on the local clock)."""
        return time.time()

    def job_ended(self, job: Job, pipeline: Pipeline) -> None:
        """A job that will not run again (queued on `pipeline`): for subclasses that keep data per job."""

    def clean_registries(self) -> None:
        for queue in self.queues:
            if queue.acquire_maintenance_lock():
                try:
                    rescue_abandoned(queue, self.abandoned_cutoff(), self.allowed_funcs, on_final=self.job_ended)
                    clean_other_registries(queue)
                    self.requeue_stranded(queue)
                finally:
                    queue.release_maintenance_lock()
        self.last_cleaned_at = now()

    def requeue_stranded(self, queue: Queue) -> None:
        """Send back the jobs of `queue`'s intermediate list that no worker started within `stranded_after`.

        Like RQ's `IntermediateQueue.cleanup` (first sighting noted, the job failed
        into its `Retry` on a later one). Removing the id from the list first is
        what makes one worker, and only one, hand the job back.
        """
        intermediate = queue.intermediate_queue
        for job_id in intermediate.get_job_ids():
            if job_id in queue.started_job_registry or intermediate.set_first_seen(job_id):
                continue
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or now() - first_seen < self.stranded_after:
                continue
            if not self.connection.lrem(intermediate.key, 1, job_id):
                continue  # another worker took it first
            job = queue.fetch_job(job_id)
            if job is None:
                continue
            reason = refusal(job, self.allowed_funcs)
            if reason is not None:
                refuse(job, queue, reason)
                continue
            log.warning("job %s was taken by a worker that stopped before starting it: requeued", job_id)
            self.handle_job_failure(job, queue, exc_string="Taken from the queue by a worker that then stopped.")


def clean_other_registries(queue: Queue) -> None:
    """RQ's maintenance of `queue` other than its StartedJobRegistry (which `rescue_abandoned` replaces)."""
    for registry_class in (FinishedJobRegistry, FailedJobRegistry, DeferredJobRegistry, ReadyJobRegistry):
        registry_class(
            name=queue.name, connection=queue.connection, job_class=queue.job_class, serializer=queue.serializer
        ).cleanup()
    clean_worker_registry(queue)
