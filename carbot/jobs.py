"""The RQ jobs this project runs, and the checks that keep any other job from running.

RQ imports whatever function a job names, and the callbacks it names too (RQ's
own failure path and its abandoned-job cleanup call them), and sends the
webhooks a job carries. Anyone who can write to Redis could therefore make a
worker run code or send requests. The project's workers look at a job's names
before anything of it is imported (`OwnJobsOnly`, mixed into both workers): a
job that is not one of the project's own, or that carries callbacks or
webhooks, is failed as refused with nothing of it run (`refusal`, `refuse`).
Their maintenance hands abandoned jobs back without calling anything a job
names (`rescue_abandoned`). A job whose hash cannot even be read (a bad date,
a key that is not a hash) is refused too, where RQ's own dequeue would raise
and end the worker (`take_jobs`, `fetch_job`). `RedisClock` is the clock that deadlines and the
batch worker's heartbeats are read on, so hosts whose clocks disagree still
agree on when a photo is late and which jobs are abandoned.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import TYPE_CHECKING

import redis
from rq.defaults import DEFAULT_FAILURE_TTL
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ReadyJobRegistry,
)
from rq.results import Result
from rq.utils import current_timestamp, now
from rq.worker_registration import clean_worker_registry

if TYPE_CHECKING:
    from redis.client import Pipeline
    from rq import Queue

log = logging.getLogger(__name__)


REFUSED = "JobRefused"  # the error name a refused job's failure records
UNREADABLE = "its data cannot be read"

# Takes up to ARGV[1] jobs in one round trip, each as RQ's non-blocking dequeue takes one: its id moved to
# the queue's intermediate list (where a worker that dies before starting it leaves it to be handed back),
# then its hash read. A key that is not a hash reads as nil, not as an error that would end the script
# after the moves. (The job keys are made here from their prefix: a single Redis, not a cluster.)
_TAKE_JOBS = """
local taken = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  local fields = redis.pcall('HGETALL', ARGV[2] .. id)
  taken[#taken + 1] = id
  if fields.err then taken[#taken + 1] = false else taken[#taken + 1] = fields end
end
return taken
"""


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
        return UNREADABLE
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


def take_jobs(queue: Queue, count: int) -> list[Job]:
    """Up to `count` jobs from the front of `queue`, in one round trip instead of two per job.

    RQ's dequeue moves a job to the queue's intermediate list, then reads its hash; so does this,
    for each job. A job whose hash is gone is skipped, as RQ skips it; one whose hash cannot be read
    is refused (`refuse_unreadable`) where RQ would raise and end the worker.
    """
    reply = queue.connection.register_script(_TAKE_JOBS)(
        keys=[queue.key, queue.intermediate_queue_key], args=[count, queue.job_class.redis_job_namespace_prefix]
    )
    jobs = []
    for raw_id, fields in zip(reply[::2], reply[1::2]):
        job_id = raw_id.decode()
        job = queue.job_class(job_id, connection=queue.connection, serializer=queue.serializer)
        try:
            if fields is None:
                raise TypeError("its key is not a hash")
            job.restore(dict(zip(fields[::2], fields[1::2])))
        except NoSuchJobError:
            continue  # deleted after it was queued (or it has no data at all)
        except Exception as exc:
            refuse_unreadable(queue, job_id, exc)
            continue
        jobs.append(job)
    return jobs


def fetch_job(queue: Queue, job_id: str) -> Job | None:
    """`queue.fetch_job`, except that a job whose hash cannot be read is refused and None returned, where RQ raises."""
    try:
        return queue.fetch_job(job_id)
    except (redis.ConnectionError, redis.TimeoutError):
        raise
    except Exception as exc:
        refuse_unreadable(queue, job_id, exc)
        return None


def refuse_unreadable(queue: Queue, job_id: str, exc: Exception) -> None:
    """Fail a job whose hash cannot be read: out of the queue's lists, in its FailedJobRegistry, a failed result.

    What `refuse` writes, by hand: RQ's failure path saves the job's hash again, which needs the data
    it could not read. Whoever waits for the job hears that it was refused; no worker meets it again.
    The hash itself is left as it was found, but for its status where it is a hash at all.
    """
    log.warning("refused job %s on queue %s: %s (%s: %s)", job_id, queue.name, UNREADABLE, type(exc).__name__, exc)
    job = queue.job_class(job_id, connection=queue.connection, serializer=queue.serializer)
    registry = FailedJobRegistry(queue=queue)
    with queue.connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 0, job_id)
        pipe.lrem(queue.key, 0, job_id)
        pipe.zadd(registry.key, {job_id: current_timestamp() + DEFAULT_FAILURE_TTL})
        Result.create_failure(job, DEFAULT_FAILURE_TTL, f"{REFUSED}: this job was refused: {UNREADABLE}", pipeline=pipe)
        pipe.execute()
    with contextlib.suppress(redis.ResponseError):  # its key is not a hash: the registry and the result say it
        queue.connection.hset(job.key, "status", JobStatus.FAILED)


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
            job = fetch_job(queue, job_id)
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

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """RQ's wait for the next job, except that a job whose hash cannot be read is refused, not fatal.

        RQ's dequeue raises what reading the hash raised, with the job's id and queue attached; RQ's
        loop would end the worker on it.
        """
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except (redis.ConnectionError, redis.TimeoutError):
                raise
            except Exception as exc:
                job_id, queue = getattr(exc, "job_id", None), getattr(exc, "queue", None)
                if job_id is None or queue is None:
                    raise
                refuse_unreadable(queue, job_id, exc)

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
            job = fetch_job(queue, job_id)
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
