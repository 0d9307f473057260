"""An RQ worker that classifies photos in batches with a resident model.

RQ runs one job at a time (its issue #928). `BatchWorker` keeps RQ's loop,
`work()` → `dequeue_job_and_maintain_ttl()` → `execute_job()`, and changes only
what happens once a first job is in hand:

1. `drain_batch()` takes up to `max_batch - 1` more jobs: a lone photo goes at
   once, and during a burst the batch waits at most `max_wait_ms` to fill
   (TF Serving's `max_batch_size` / `batch_timeout_micros`). What is queued is
   taken in one round trip (`carbot.jobs.take_jobs`), each job as RQ's dequeue
   takes one.
2. Every job is checked against the allow-list before anything of it is used
   (`carbot.jobs.refusal`): a job that names another function, a callback or a
   webhook is failed as refused, and nothing it names is imported.
3. `perform_batch()` walks every job through RQ's lifecycle: each is started
   as `prepare_execution` + `prepare_job_execution` would (Execution,
   StartedJobRegistry, status), the whole batch is classified in one forward
   pass, then each job is finished with its own result (what
   `_finalize_success` writes) or its own failure (RQ's `_finalize_failure`,
   with its retries), so `rq info`, rq-dashboard, results and retries stay true.
   Starting and finishing share one Redis round trip per batch instead of a few
   per job: on a GPU the per-job round trips would cost more than the model.

Liveness comes from the worker itself, not from a job timeout: while a batch
runs, a pulse thread renews its jobs' places in the StartedJobRegistry every
`heartbeat_ttl_s / 5` seconds, each good for `heartbeat_ttl_s` (on Redis's
clock). A batch that legitimately runs for minutes keeps its jobs; a worker that
dies stops vouching for them, and within `heartbeat_ttl_s` plus one maintenance
interval any worker's maintenance hands them back (`carbot.jobs.rescue_abandoned`,
jobs are enqueued with `Retry`). A worker killed while draining, after Redis
moved photos to the queue's intermediate list but before `start_jobs()`, leaves
them there: `requeue_stranded()` sends them back within seconds, where RQ's own
cleanup waits a minute.

A job that was running when its worker died may be what killed it (a photo
that exhausts memory). Each start is counted until the job ends: a job started
once before without ending runs alone, so it cannot take innocent photos down
with it, and one started twice without ending is failed as rejected instead of
taking down a third worker.

Redis errors outside the model (a restart, a failed write) never end the
worker: the batch is abandoned to the rescue above and the worker backs off and
carries on. SIGTERM is RQ's warm shutdown: the worker marks itself busy before
draining, so the current batch is finished before it exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, timedelta

import redis
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.utils import now
from rq.worker import WorkerStatus

from carbot import metrics
from carbot.jobs import OwnJobsOnly, RedisClock, refusal, refuse, take_jobs
from carbot.keys import BATCH_SIZES_KEY, CLASSIFY_FUNC, RUNTIME_KEY, SERIALIZER, STATS_KEY, starts_key
from worker._contract import (
    FINAL_ERRORS,
    InvalidJob,
    JobExpired,
    PhotoRejected,
    PhotoRequest,
    RejectReason,
    outcome_of,
    release_photo,
)
from worker._inference import BatchClassifier, BatchReport

log = logging.getLogger(__name__)

# How long a worker's silence means it died (the default of CARBOT_HEARTBEAT_TTL_S): its batch then runs
# again elsewhere. A pulse renews its jobs five times within it, so one late pulse is not taken for death.
HEARTBEAT_TTL_S = 5.0
# While waiting up to max_wait_ms for more jobs we poll in steps this long: Redis times out
# blocking commands only every 1/hz seconds (100 ms by default), far coarser than the bound.
DRAIN_POLL_S = 0.0005
# A live worker starts what it drained within max_wait_ms and one round trip. A photo left in the
# intermediate list this long was taken by a worker that died; RQ's own cleanup waits a minute,
# longer than a person's deadline.
STRANDED_AFTER = timedelta(seconds=3)
# How long a job's count of unfinished starts is kept: far longer than any photo's deadline.
STARTS_TTL_S = 3600
# `carbot.jobs.take_jobs` moves jobs with LMOVE, which Redis has since 6.2 (RQ falls back to LPOP before it).
MIN_REDIS_VERSION = (6, 2, 0)
# Back-off after a Redis error outside the model, doubling up to the maximum.
REDIS_BACKOFF_S = (0.5, 8.0)

QUARANTINED = "This picture stopped the classifier twice, so it was set aside; please send a different photo."


class BatchWorker(OwnJobsOnly, SimpleWorker):
    """A `SimpleWorker` (no fork, the model stays loaded) that runs classify jobs in batches."""

    allowed_funcs = (CLASSIFY_FUNC,)
    stranded_after = STRANDED_AFTER

    def __init__(self, queues, *, classifier: BatchClassifier, max_batch: int = 32, max_wait_ms: float = 5.0,
                 heartbeat_ttl_s: float = HEARTBEAT_TTL_S, **kwargs) -> None:  # fmt: skip
        kwargs.setdefault("serializer", SERIALIZER)
        super().__init__(queues, **kwargs)
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.clock = RedisClock(self.connection)
        self._in_flight: list[tuple[Job, Execution]] = []  # the batch the pulse vouches for
        self._in_flight_lock = threading.Lock()
        self._pulse: threading.Thread | None = None
        self._backoff_s = REDIS_BACKOFF_S[0]
        self._published: dict | None = None  # the model and runtime `carbot status` was last told of

    # -- RQ's entry point -------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` together with whatever else is queued, as one batch or more."""
        try:
            # Busy from here on: a SIGTERM now means "finish this batch, then stop" (RQ's warm shutdown).
            self.set_state(WorkerStatus.BUSY)
            photos = []
            for item in [(job, queue), *self.drain_batch()]:
                reason = refusal(item[0], self.allowed_funcs)
                if reason is None:
                    photos.append(item)
                else:
                    metrics.job_failed(InvalidJob.outcome)
                    refuse(*item, reason)
            for batch, starts in self.plan_batches(photos):
                self.perform_batch(batch, starts)
            self.set_state(WorkerStatus.IDLE)
            self._backoff_s = REDIS_BACKOFF_S[0]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self.survive_redis_error(exc)

    def survive_redis_error(self, exc: Exception) -> None:
        """A Redis error outside the model: the batch is left to the rescue of abandoned jobs; back off, go on."""
        self._set_in_flight([])
        log.warning("Redis failed during a batch (%s); retrying in %.1f s, its photos will be handed back",
                    exc, self._backoff_s)  # fmt: skip
        time.sleep(self._backoff_s)
        self._backoff_s = min(self._backoff_s * 2, REDIS_BACKOFF_S[1])

    def drain_batch(self) -> list[tuple[Job, Queue]]:
        """Take up to `max_batch - 1` more queued jobs.

        What is queued is taken at once. If nothing is, the photo in hand is alone
        and goes without waiting; once a burst is under way (a second job came),
        the batch waits up to `max_wait_ms` for stragglers to fill it.
        """
        drained: list[tuple[Job, Queue]] = []
        deadline: float | None = None
        while len(drained) < self.max_batch - 1:
            taken = []
            for queue in self._ordered_queues:
                wanted = self.max_batch - 1 - len(drained) - len(taken)
                if wanted > 0:
                    taken += [(job, queue) for job in take_jobs(queue, wanted)]
            if taken:
                drained += taken
                deadline = deadline or time.monotonic() + self.max_wait_s
            elif deadline is not None and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
            else:
                break
        return drained

    def plan_batches(self, jobs: list[tuple[Job, Queue]]) -> list[tuple[list[tuple[Job, Queue]], list[int]]]:
        """Split `jobs` into batches, each with its jobs' counts of earlier unfinished starts.

        Jobs never started before, and jobs to be set aside (started twice), go
        together; each job that was running when a worker died goes alone.
        """
        if not jobs:
            return []
        counts = [int(n or 0) for n in self.connection.mget([starts_key(job.id) for job, _ in jobs])]
        together = [(item, n) for item, n in zip(jobs, counts) if n != 1]
        batches = [([item for item, _ in together], [n for _, n in together])] if together else []
        batches += [([item], [n]) for item, n in zip(jobs, counts) if n == 1]
        return batches

    def work(self, *args, **kwargs) -> bool:
        version = self.get_redis_server_version()
        if version < MIN_REDIS_VERSION:
            raise RuntimeError(
                f"Redis {'.'.join(map(str, version))} is too old: the classify worker needs "
                f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer (it takes jobs with LMOVE, as RQ does there)"
            )
        self._start_pulse()
        self.publish_runtime()
        return super().work(*args, **kwargs)

    # -- maintenance ---------------------------------------------------------------------------------------

    def run_maintenance_tasks(self) -> None:
        with _unless_redis_fails("maintenance"):
            super().run_maintenance_tasks()
        self.last_cleaned_at = now()
        self.classifier.source.refresh()  # an idle worker loads a newly activated model before photos come
        self.publish_runtime()

    def publish_runtime(self) -> None:
        """Tell `carbot status` which model this worker serves on which runtime, and why, when that changed."""
        served = self.classifier.source.served()
        if served is None or served == self._published:
            return
        with _unless_redis_fails("publishing the runtime"):
            self.connection.hset(RUNTIME_KEY, self.name, json.dumps(served))
            self._published = served

    def abandoned_cutoff(self) -> float:
        return self.clock.now()  # the pulse scores jobs on Redis's clock

    # RQ's loop calls these between jobs, outside the try that retries its blocking dequeue: a Redis
    # blip there would end the worker. Each is skipped with a warning instead; the loop goes on.

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        with _unless_redis_fails("worker heartbeat", pipeline):
            super().heartbeat(timeout, pipeline)

    def set_state(self, state: str, pipeline=None) -> None:
        with _unless_redis_fails("worker state", pipeline):
            super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        with _unless_redis_fails("suspension check"):
            super().check_for_suspension(burst)

    # -- the pulse: this worker vouches for the batch it runs ------------------------------------------------

    def _start_pulse(self) -> None:
        if self._pulse is None:
            self._pulse = threading.Thread(target=self._beat, name="batch-pulse", daemon=True)
            self._pulse.start()

    def _set_in_flight(self, jobs: list[tuple[Job, Execution]]) -> None:
        with self._in_flight_lock:
            self._in_flight = jobs

    def _beat(self) -> None:
        """Every `heartbeat_ttl_s / 5` seconds, renew the places of the batch in flight for `heartbeat_ttl_s`."""
        while True:
            time.sleep(self.heartbeat_ttl_s / 5)
            with self._in_flight_lock:
                jobs = list(self._in_flight)
            if not jobs:
                continue
            try:
                self.vouch_for(jobs)
            except Exception as exc:  # Redis away: the next beat tries again; the batch goes on meanwhile
                log.warning("could not renew the heartbeats of %d running photos: %s", len(jobs), exc)

    def vouch_for(self, jobs: list[tuple[Job, Execution]], pipeline=None, *, just_created: bool = False) -> None:
        """Keep `jobs` in the StartedJobRegistry for `heartbeat_ttl_s` more seconds of Redis's clock.

        `just_created`: their Executions were created in this same `pipeline` (`start_jobs`), with
        every TTL RQ's heartbeat would renew; only their scores move to Redis's clock.
        """
        score = self.clock.now() + self.heartbeat_ttl_s
        ttl = math.ceil(self.heartbeat_ttl_s) + 1
        with contextlib.ExitStack() as stack:
            pipe = pipeline if pipeline is not None else stack.enter_context(self.connection.pipeline())
            for job, execution in jobs:
                registry = job.started_job_registry
                if not just_created:
                    execution.heartbeat(registry, ttl, pipeline=pipe)  # what RQ's own heartbeat writes...
                # ...then the score on Redis's clock. xx: a job that has ended meanwhile is not put back.
                pipe.zadd(registry.key, {execution.composite_key: score}, xx=True)
            self.heartbeat(pipeline=pipe)
            if pipeline is None:
                pipe.execute()

    # -- one batch, job by job through RQ's lifecycle --------------------------------------------------------

    def perform_batch(self, batch: list[tuple[Job, Queue]], starts: list[int] | None = None) -> None:
        """Start every job, classify the live ones in one pass, then finish each job with its own outcome.

        `starts[i]` counts the earlier starts of job i that never ended; two mean it is set aside.
        """
        starts = starts or [0] * len(batch)
        executions = self.start_jobs(batch)
        try:
            self._perform_started(batch, starts, executions)
        finally:
            self._set_in_flight([])

    def _perform_started(self, batch: list[tuple[Job, Queue]], starts: list[int], executions: list[Execution]) -> None:
        metrics.observe_queue_waits(_queue_wait_ms(job) for job, _ in batch)
        checked_at = self.clock.now()
        live, refused, expired = [], [], 0
        for (job, queue), execution, earlier in zip(batch, executions, starts):
            try:
                request = PhotoRequest.from_kwargs(job.kwargs)
            except InvalidJob as exc:
                refused.append((job, queue, execution, exc))
                continue
            if earlier >= 2:
                log.warning("job %s: set aside, it was running twice when a worker died", job.id)
                refused.append((job, queue, execution, PhotoRejected(QUARANTINED, RejectReason.QUARANTINED)))
                continue
            if request.expired(checked_at):
                expired += 1
                refused.append((job, queue, execution, JobExpired()))
                continue
            live.append((job, queue, execution, request))
        if not live:
            self._record(BatchReport(), expired=expired)
            self._fail_all(refused)
            return

        try:
            report = self.classify([request for _, _, _, request in live])
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # not the model's fault: the worker survives it and the photos are handed back
        except Exception as exc:  # the model itself failed: every job gets the error and RQ's retry
            log.exception("batch of %d failed", len(live))
            self._fail_all(refused + [(job, queue, execution, exc) for job, queue, execution, _ in live])
            return

        # Counted before any outcome is published: whoever reads an answer, or a photo's refusal, finds
        # it counted too (`carbot status` read right after a refusal once missed it).
        self._record(report, expired=expired, queue_wait_ms=max(_queue_wait_ms(job) for job, *_ in live))
        finished = []
        for (job, queue, execution, _), outcome in zip(live, report.outcomes):
            if isinstance(outcome, Exception):
                refused.append((job, queue, execution, outcome))
            else:
                outcome["timings"] = self._timings(job, report)
                finished.append((job, execution, outcome))
        self._fail_all(refused)
        self.finish_jobs(finished)

    def _fail_all(self, failures: list[tuple[Job, Queue, Execution, BaseException]]) -> None:
        for job, queue, execution, exc in failures:
            self.fail_job(job, queue, execution, exc)

    def start_jobs(self, batch: list[tuple[Job, Queue]]) -> list[Execution]:
        """RQ's `prepare_execution` + `prepare_job_execution` for every job of the batch, in one round trip.

        Each job gets an Execution in the StartedJobRegistry, status `started` and
        its worker name, exactly as RQ's own methods write them, and its count of
        unfinished starts goes up by one; only the round trips are shared (per job
        they would cost more than a GPU's forward pass). From here on the pulse vouches for the batch.
        """
        executions = []
        ttl = math.ceil(self.heartbeat_ttl_s) + 1
        with self.connection.pipeline() as pipe:
            for job, queue in batch:
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                # (RQ's job.heartbeat here would write the last_heartbeat that this writes again.)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.incr(starts_key(job.id))
                pipe.expire(starts_key(job.id), STARTS_TTL_S)
                # Taken by RQ's dequeue or `take_jobs`, it waits in the intermediate list until it starts.
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                executions.append(execution)
            in_flight = [(job, execution) for (job, _), execution in zip(batch, executions)]
            # Execution.create scored the jobs on this host's clock; the pulse's scores are Redis's.
            self.vouch_for(in_flight, pipeline=pipe, just_created=True)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        self._set_in_flight(in_flight)
        self.procline(f"Processing a batch of {len(batch)} since {time.time()}")
        return executions

    def finish_jobs(self, finished: list[tuple[Job, Execution, dict]]) -> None:
        """RQ's `_finalize_success` for every finished job, in one round trip.

        Writes what `handle_job_success` writes for a job without dependents,
        repeats, callbacks or rate limits (a classify job has none): status
        `finished`, the result in the job's result stream, the FinishedJobRegistry,
        the job's TTL, the Execution removed and the worker's counters. The
        photo's bytes leave Redis with their last job.
        """
        if not finished:
            return
        metrics.jobs_finished(len(finished))
        with self.connection.pipeline() as pipe:
            working_time = timedelta()
            for job, execution, value in finished:
                job.ended_at = now()
                job._result = value
                job.heartbeat(job.ended_at, job.success_callback_timeout, pipeline=pipe)
                working_time += job.ended_at - job.started_at
                result_ttl = job.get_result_ttl(self.default_result_ttl)
                if result_ttl != 0:
                    job._handle_success(
                        result_ttl,
                        pipeline=pipe,
                        worker_name=self.name,
                        execution_id=execution.id,
                        execution_started_at=execution.created_at,
                        execution_ended_at=job.ended_at,
                    )
                job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                self.job_ended(job, pipe)
            # The worker's counters, as RQ adds them job by job, added once for the batch.
            pipe.hincrby(self.key, "successful_job_count", len(finished))
            self.increment_total_working_time(working_time, pipe)
            pipe.execute()

    def classify(self, requests: list[PhotoRequest]) -> BatchReport:
        """Fetch the photos in one round trip and classify them together."""
        photos = self.connection.mget([request.photo for request in requests])
        return self.classifier.classify(
            [(request.digest, photo) for request, photo in zip(requests, photos)],
            [request.top_k for request in requests],
        )

    def fail_job(self, job: Job, queue: Queue, execution, exc: BaseException) -> None:
        """Finish `job` as failed through RQ; an error that is the photo's fault is never retried."""
        if type(exc).__name__ in FINAL_ERRORS:
            job.retries_left = 0
        ends = not job.should_retry
        metrics.job_failed(outcome_of(exc))
        # Before RQ writes the failure: whoever reads it (the person's client) finds the job's photo
        # already gone, as a success's result and release are one round trip. Were the worker to die
        # in between, the rescued job would fail again for want of its photo, which it was about to do.
        with self.connection.pipeline() as pipe:
            if ends:
                self.job_ended(job, pipe)
            else:
                pipe.delete(starts_key(job.id))  # this attempt ended; the retry starts afresh
            pipe.execute()
        self._finalize_failure(job, queue, execution, (type(exc), exc, exc.__traceback__))

    def job_ended(self, job: Job, pipeline) -> None:
        """A job that will not run again: forget its starts and release its photo's bytes."""
        pipeline.delete(starts_key(job.id))
        with contextlib.suppress(InvalidJob):
            release_photo(pipeline, PhotoRequest.from_kwargs(job.kwargs).photo)

    def handle_exception(self, job: Job, *exc_info) -> None:
        # A bad photo is an everyday event, not a crash: one line instead of a traceback.
        exc = exc_info[1]
        if type(exc).__name__ in FINAL_ERRORS:
            log.info("job %s: %s: %s", job.id, type(exc).__name__, exc)
            return
        super().handle_exception(job, *exc_info)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return math.ceil(self.heartbeat_ttl_s) + 1

    def _install_signal_handlers(self) -> None:
        # Python only lets the main thread install signal handlers; a worker in a thread is stopped another way.
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    # -- reporting ------------------------------------------------------------------------------------------

    def _timings(self, job: Job, report: BatchReport) -> dict:
        return {
            "queue_ms": round(_queue_wait_ms(job), 1),
            "decode_ms": round(report.decode_ms, 1),
            "inference_ms": round(report.inference_ms, 1),
            "batch_size": report.size,
        }

    def _record(self, report: BatchReport, *, expired: int, queue_wait_ms: float = 0.0) -> None:
        """One log line per batch, the shared counters (`carbot status`, the benchmarks) and this worker's metrics."""
        metrics.observe_batch(report.size, report.decode_ms, report.inference_ms)
        if report.size:
            log.info(
                "batch size=%d distinct=%d rejected=%d expired=%d queue_wait_ms=%.1f decode_ms=%.1f "
                "inference_ms=%.1f padded=%d model=%s",
                report.size, report.distinct, report.rejected, expired, queue_wait_ms,
                report.decode_ms, report.inference_ms, report.padded, report.model_version,
            )  # fmt: skip
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hincrby(STATS_KEY, "batches", 1 if report.size else 0)
            pipe.hincrby(STATS_KEY, "photos", report.size)
            pipe.hincrby(STATS_KEY, "computed", report.computed)
            pipe.hincrby(STATS_KEY, "padded", report.padded)
            pipe.hincrby(STATS_KEY, "rejected", report.rejected)
            pipe.hincrby(STATS_KEY, "expired", expired)
            # Whole microseconds: every counter of the hash is an integer, and a run adds up to exact sums.
            pipe.hincrby(STATS_KEY, "decode_us", round(report.decode_ms * 1000))
            pipe.hincrby(STATS_KEY, "inference_us", round(report.inference_ms * 1000))
            if report.size:
                pipe.hincrby(BATCH_SIZES_KEY, str(report.size), 1)
            pipe.execute()
        self.publish_runtime()


@contextlib.contextmanager
def _unless_redis_fails(what: str, pipeline=None) -> Iterator[None]:
    """Log and skip a Redis error in `what`; within a pipeline nothing is sent yet, so nothing can fail."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if pipeline is not None:
            raise
        log.warning("%s skipped, Redis failed: %s", what, exc)


def _queue_wait_ms(job: Job) -> float:
    """How long `job` waited in the queue before it started."""
    if not (job.started_at and job.enqueued_at):
        return 0.0
    return (job.started_at - job.enqueued_at.replace(tzinfo=UTC)).total_seconds() * 1000
