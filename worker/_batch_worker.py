"""An RQ worker that classifies photos in batches with a resident model.

RQ runs one job at a time (its issue #928). `BatchWorker` keeps RQ's loop,
`work()` → `dequeue_job_and_maintain_ttl()` → `execute_job()`, and changes only
what happens once a first job is in hand:

1. `drain_batch()` takes up to `max_batch - 1` more jobs: a lone photo goes at
   once, and during a burst the batch waits at most `max_wait_ms` to fill
   (TF Serving's `max_batch_size` / `batch_timeout_micros`).
2. `perform_batch()` walks every job through RQ's lifecycle: each is started
   as `prepare_execution` + `prepare_job_execution` would (Execution,
   StartedJobRegistry, heartbeat, status), the whole batch is classified in one
   forward pass, then each job is finished with its own result (what
   `_finalize_success` writes) or its own failure (RQ's `_finalize_failure`,
   with its retries), so `rq info`, rq-dashboard, results and retries stay true.
   Starting and finishing share one Redis round trip per batch instead of a few
   per job: on a GPU the per-job round trips would cost more than the model.

A worker killed mid-batch leaves its jobs in the StartedJobRegistry; their
heartbeats lapse after the job timeout and the next maintenance run of any
worker re-enqueues them (jobs are enqueued with `Retry`). A worker killed while
draining, after Redis moved photos to the queue's intermediate list but before
`start_jobs()`, leaves them there: `requeue_stranded()` sends them back within
seconds, where RQ's own cleanup waits a minute. SIGTERM is RQ's warm shutdown:
the worker marks itself busy before draining, so the current batch is finished
before it exits.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, timedelta

from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.utils import now
from rq.worker import WorkerStatus

from carbot import _metrics as metrics
from worker._contract import (
    CLASSIFY_FUNC,
    FINAL_ERRORS,
    SERIALIZER,
    STATS_KEY,
    InvalidJob,
    JobExpired,
    PhotoRequest,
)
from worker._inference import BatchClassifier, BatchReport

log = logging.getLogger(__name__)

# How long past its job timeout a started job's heartbeat lasts. RQ's SimpleWorker adds 60 s;
# a short grace is what makes a killed worker's photos come back within seconds.
HEARTBEAT_GRACE_S = 5
# While waiting up to max_wait_ms for more jobs we poll in steps this long: Redis times out
# blocking commands only every 1/hz seconds (100 ms by default), far coarser than the bound.
DRAIN_POLL_S = 0.0005
# A live worker starts what it drained within max_wait_ms and one round trip. A photo left in the
# intermediate list this long was taken by a worker that died; RQ's own cleanup waits a minute,
# longer than a person's deadline.
STRANDED_AFTER = timedelta(seconds=10)


class BatchWorker(SimpleWorker):
    """A `SimpleWorker` (no fork, the model stays loaded) that runs classify jobs in batches."""

    def __init__(self, queues, *, classifier: BatchClassifier, max_batch: int = 32, max_wait_ms: float = 5.0,
                 **kwargs) -> None:  # fmt: skip
        kwargs.setdefault("serializer", SERIALIZER)
        super().__init__(queues, **kwargs)
        self.classifier = classifier
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000

    # -- RQ's entry point -------------------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run `job` together with whatever else is queued, as one batch."""
        # Busy from here on: a SIGTERM now means "finish this batch, then stop" (RQ's warm shutdown).
        self.set_state(WorkerStatus.BUSY)
        batch, others = [], []
        for item in [(job, queue), *self.drain_batch()]:
            (batch if _is_photo_job(item[0]) else others).append(item)
        if batch:
            self.perform_batch(batch)
        for other_job, other_queue in others:
            # Not a photo: run it the plain RQ way so a shared queue still works.
            self.perform_job(other_job, other_queue, self.prepare_execution(other_job))
        self.set_state(WorkerStatus.IDLE)

    def drain_batch(self) -> list[tuple[Job, Queue]]:
        """Take up to `max_batch - 1` more queued jobs.

        What is queued is taken at once. If nothing is, the photo in hand is alone
        and goes without waiting; once a burst is under way (a second job came),
        the batch waits up to `max_wait_ms` for stragglers to fill it.
        """
        drained: list[tuple[Job, Queue]] = []
        deadline: float | None = None
        while len(drained) < self.max_batch - 1:
            item = self.queue_class.dequeue_any(
                self._ordered_queues, None, connection=self.connection,
                job_class=self.job_class, serializer=self.serializer,
            )  # fmt: skip
            if item is not None:
                drained.append(item)
                deadline = deadline or time.monotonic() + self.max_wait_s
            elif deadline is not None and time.monotonic() < deadline:
                time.sleep(DRAIN_POLL_S)
            else:
                break
        return drained

    # -- maintenance ---------------------------------------------------------------------------------------

    def clean_registries(self) -> None:
        """RQ's maintenance, then the rescue of photos a dead worker drained but never started."""
        super().clean_registries()
        for queue in self.queues:
            self.requeue_stranded(queue)

    def requeue_stranded(self, queue: Queue) -> None:
        """Send back the jobs of `queue`'s intermediate list that no worker started within `STRANDED_AFTER`.

        Like RQ's `IntermediateQueue.cleanup` (first sighting noted, the job failed
        into its `Retry` on a later one), with a threshold fit for photos. Every
        worker runs this; removing the id from the list first is what makes one
        of them, and only one, hand the job back.
        """
        intermediate = queue.intermediate_queue
        for job_id in intermediate.get_job_ids():
            if job_id in queue.started_job_registry or intermediate.set_first_seen(job_id):
                continue
            first_seen = intermediate.get_first_seen(job_id)
            if first_seen is None or now() - first_seen < STRANDED_AFTER:
                continue
            if not self.connection.lrem(intermediate.key, 1, job_id):
                continue  # another worker took it first
            job = queue.fetch_job(job_id)
            if job is not None:
                log.warning("photo job %s was taken by a worker that stopped before starting it: requeued", job_id)
                self.handle_job_failure(job, queue, exc_string="Taken from the queue by a worker that then stopped.")

    # -- one batch, job by job through RQ's lifecycle --------------------------------------------------------

    def perform_batch(self, batch: list[tuple[Job, Queue]]) -> None:
        """Start every job, classify the live ones in one pass, then finish each job with its own outcome."""
        executions = self.start_jobs(batch)
        metrics.observe_queue_waits(_queue_wait_ms(job) for job, _ in batch)
        checked_at = time.time()
        live, expired = [], 0
        for (job, queue), execution in zip(batch, executions):
            try:
                request = PhotoRequest.from_kwargs(job.kwargs)
            except InvalidJob as exc:
                self.fail_job(job, queue, execution, exc)
                continue
            if request.expired(checked_at):
                expired += 1
                self.fail_job(job, queue, execution, JobExpired())
                continue
            live.append((job, queue, execution, request))
        if not live:
            self._record(BatchReport(), expired=expired)
            return

        try:
            report = self.classify([request for _, _, _, request in live])
        except Exception as exc:  # the model itself failed: every job gets the error and RQ's retry
            log.exception("batch of %d failed", len(live))
            for job, queue, execution, _ in live:
                self.fail_job(job, queue, execution, exc)
            return

        finished = []
        for (job, queue, execution, _), outcome in zip(live, report.outcomes):
            if isinstance(outcome, Exception):
                self.fail_job(job, queue, execution, outcome)
            else:
                outcome["timings"] = self._timings(job, report)
                finished.append((job, execution, outcome))
        self.finish_jobs(finished)
        self._record(report, expired=expired, queue_wait_ms=max(_queue_wait_ms(job) for job, *_ in live))

    def start_jobs(self, batch: list[tuple[Job, Queue]]) -> list[Execution]:
        """RQ's `prepare_execution` + `prepare_job_execution` for every job of the batch, in one round trip.

        Each job gets an Execution in the StartedJobRegistry, a heartbeat, status
        `started` and its worker name, exactly as RQ's own methods write them;
        only the round trips are shared (per job they would cost more than a GPU's forward pass).
        """
        leave_intermediate_queue = len(self.queues) == 1
        executions = []
        with self.connection.pipeline() as pipe:
            for job, queue in batch:
                ttl = self.get_heartbeat_ttl(job)
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                if leave_intermediate_queue:
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                executions.append(execution)
            self.heartbeat(max(self.get_heartbeat_ttl(job) for job, _ in batch), pipeline=pipe)
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        self.procline(f"Processing a batch of {len(batch)} since {time.time()}")
        return executions

    def finish_jobs(self, finished: list[tuple[Job, Execution, dict]]) -> None:
        """RQ's `_finalize_success` for every finished job, in one round trip.

        Writes what `handle_job_success` writes for a job without dependents,
        repeats, callbacks or rate limits (a classify job has none): status
        `finished`, the result in the job's result stream, the FinishedJobRegistry,
        the job's TTL, the Execution removed and the worker's counters.
        """
        if not finished:
            return
        metrics.jobs_finished(len(finished))
        with self.connection.pipeline() as pipe:
            for job, execution, value in finished:
                job.ended_at = now()
                job._result = value
                job.heartbeat(job.ended_at, job.success_callback_timeout, pipeline=pipe)
                self.increment_successful_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - job.started_at, pipe)
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
        metrics.job_failed(exc)
        self._finalize_failure(job, queue, execution, (type(exc), exc, exc.__traceback__))

    def handle_exception(self, job: Job, *exc_info) -> None:
        # A bad photo is an everyday event, not a crash: one line instead of a traceback.
        exc = exc_info[1]
        if type(exc).__name__ in FINAL_ERRORS:
            log.info("job %s: %s: %s", job.id, type(exc).__name__, exc)
            return
        super().handle_exception(job, *exc_info)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return int(job.timeout or self.queue_class.DEFAULT_TIMEOUT) + HEARTBEAT_GRACE_S

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
        """One log line per batch, the shared counters that `carbot status` shows, and this worker's metrics."""
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
            pipe.hincrby(STATS_KEY, "rejected", report.rejected)
            pipe.hincrby(STATS_KEY, "expired", expired)
            pipe.execute()


def _is_photo_job(job: Job) -> bool:
    try:
        return job.func_name == CLASSIFY_FUNC
    except Exception:  # undecodable job data: RQ's plain path fails it on its own
        return False


def _queue_wait_ms(job: Job) -> float:
    """How long `job` waited in the queue before it started."""
    if not (job.started_at and job.enqueued_at):
        return 0.0
    return (job.started_at - job.enqueued_at.replace(tzinfo=UTC)).total_seconds() * 1000
