"""The bots' side of retraining: queue a run, show its progress, act on the admin's decision, follow events.

`RetrainDesk` is what the conversation calls for `/retrain`, `/rollback` and the
"promote anyway" / "discard" buttons. A bot never writes the model registry (its
container mounts it read-only): it queues the change on the train queue and waits a
little for the train worker to make it. Its blocking parts (RQ's enqueue and waits,
SQL) run in a thread. `follow_retrains` is the loop every bot
process runs beside its chat: it reads the events the retrain job appends to a
Redis stream and hands each to a `deliver` function of the platform's adapter.

Each platform reads the stream through a consumer group of its own, so every
platform sees every event once even across restarts, and two processes of one
platform share the work instead of both answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from rq import Queue
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus

from bots._messages import Sender
from carbot import keys, retrain_runs
from carbot.connections import redis_connection
from carbot.db import RetrainRun, RunStatus
from carbot.keys import DECIDE_FUNC, RETRAIN_FUNC, ROLLBACK_FUNC, SERIALIZER
from carbot.retrain_runs import RunEvent
from carbot.settings import Settings
from worker import workers_listening

log = logging.getLogger(__name__)

_RESULT_TTL_S = 7 * 86400
# How long a /retrain waits for another admin's request, caught between taking the lock and writing its run.
_PENDING_WAIT_S = 5.0
# A bot that dies between taking the lock and writing its run leaves "pending": it lapses this soon
# (well past the database's busy timeout, so a slow write does not lose the lock).
_PENDING_TTL_S = 120
_MESSAGE_TTL_S = 7 * 86400
_BLOCK_MS = 5000
# How long a button press waits for the train worker to carry out the decision before answering that it will
# (it takes well under a second when the worker is free); within the conversation's patience with a press (10 s).
_DECISION_WAIT_S = 5.0
# How long /rollback waits for the train worker to start it; a rollback job started later does nothing.
_ROLLBACK_WAIT_S = 30.0
_ROLLBACK_GRACE_S = 10.0  # beyond that, for a rollback started in time to finish (it takes milliseconds)
_POLL_S = 0.05


@dataclass(frozen=True)
class RetrainRequest:
    """What `/retrain` led to: a new run, or the one already running (with its latest progress)."""

    run_id: int | None  # None: another admin's run is being queued and has no number yet
    queued: bool  # False: a run was already in progress, nothing new was queued
    progress: dict | None = None  # the running run's latest event data ({"epoch": ..., ...}) when not queued
    workers: int = 0  # train workers listening right now (0: the run waits until one starts)


@dataclass(frozen=True)
class Decision:
    """An admin's decision on a rejected run, recorded: carried out by the train worker already, or queued for it."""

    run: RetrainRun  # as it was when the decision was recorded (its candidate version)
    carried_out: bool  # False: the train worker is busy or not running; the bots say so when it is done


class RollbackBusy(Exception):
    """No train worker took `/rollback` in time: nothing was rolled back."""


class RetrainDesk:
    """Requests, progress and decisions for one bot process."""

    def __init__(self, redis_url: str, settings: Settings, engine) -> None:
        self.settings = settings
        self._engine = engine
        self._sync = redis_connection(redis_url)
        # Reads block for up to _BLOCK_MS: the socket timeout must be longer.
        self._async = redis_connection(redis_url, asyncio=True, blocking_s=_BLOCK_MS / 1000)
        self._queue = Queue(settings.train_queue, connection=self._sync, serializer=SERIALIZER)
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True
        await self._async.aclose()
        await asyncio.to_thread(self._sync.close)

    # -- requests -------------------------------------------------------------------------------------------

    async def request(self, sender: Sender, language: str) -> RetrainRequest:
        """Queue a retrain for `sender` (an admin), unless one is running already."""
        return await asyncio.to_thread(self._request, sender, language)

    def _request(self, sender: Sender, language: str) -> RetrainRequest:
        workers = workers_listening(self._sync, self.settings.train_queue)
        running = self._take_lock_or_find_run()
        if running is not None:
            run_id = None if running == retrain_runs.PENDING else running
            return RetrainRequest(run_id=run_id, queued=False, progress=self._progress(), workers=workers)
        run_id = None
        try:
            run_id = retrain_runs.create_run(self._engine, requested_by=f"{sender.platform}:{sender.user_id}",
                                           chat_id=sender.chat_id, language=language)  # fmt: skip
            self._queue.enqueue_call(
                RETRAIN_FUNC,
                kwargs={"run_id": run_id},
                job_id=retrain_runs.job_id(run_id),
                timeout=self.settings.retrain_timeout_s,
                result_ttl=_RESULT_TTL_S,
                failure_ttl=_RESULT_TTL_S,
            )
            # Only now may the lock name the run: a /retrain that found it naming a run without a job
            # would take the run for a lost one. Held until the run ends (the job frees it), or its timeout.
            if not self._sync.set(keys.RETRAIN_LOCK_KEY, run_id, xx=True, ex=self.settings.retrain_timeout_s + 600):
                raise RuntimeError("the retrain lock lapsed while the run was being queued")
        except BaseException as exc:
            retrain_runs.release_lock(self._sync, retrain_runs.PENDING)
            if run_id is not None:  # its job, if queued, finds the run failed and does nothing
                retrain_runs.fail_run(self._sync, self._engine, run_id, f"could not queue the job: {exc}")
            raise
        log.info("retrain run %s queued by %s:%s", run_id, sender.platform, sender.user_id)
        return RetrainRequest(run_id=run_id, queued=True, workers=workers)

    def _take_lock_or_find_run(self) -> int | str | None:
        """None once this request holds the retrain lock; otherwise the id of the run in progress.

        Another admin's `/retrain` may hold the lock as "pending" for the few milliseconds it
        takes to write its run: wait for its number rather than answer without one.
        """
        deadline = time.monotonic() + _PENDING_WAIT_S
        while True:
            running = retrain_runs.running_run(self._sync, self._engine)
            if running is None and self._sync.set(
                keys.RETRAIN_LOCK_KEY, retrain_runs.PENDING, nx=True, ex=_PENDING_TTL_S
            ):
                return None
            if running is not None and (running != retrain_runs.PENDING or time.monotonic() > deadline):
                return running  # a run's id, or still PENDING after the wait
            time.sleep(0.02)

    def _progress(self) -> dict | None:
        data = self._sync.hget(keys.RETRAIN_PROGRESS_KEY, "data")
        return json.loads(data) if data else None

    # -- decisions ------------------------------------------------------------------------------------------

    async def get_run(self, run_id: int) -> RetrainRun | None:
        return await asyncio.to_thread(retrain_runs.get_run, self._engine, run_id)

    async def decide(self, run_id: int, admin: Sender, promote: bool) -> Decision | None:
        """Promote a rejected candidate anyway, or discard it. None if the run was not waiting for a decision.

        Only a run whose candidate the gate rejected is waiting for this decision; a second
        press (or a press after another admin decided) changes nothing. The train worker carries
        it out: this waits up to `_DECISION_WAIT_S` for it, and raises if the registry refused.
        """
        return await asyncio.to_thread(self._decide, run_id, f"{admin.platform}:{admin.user_id}", promote)

    def _decide(self, run_id: int, admin: str, promote: bool) -> Decision | None:
        status = RunStatus.PROMOTED_BY_ADMIN if promote else RunStatus.DISCARDED
        # Claimed first, in one conditional UPDATE: a promote and a discard of the same run (two admins, two bots)
        # cannot both act; the second is told the run is no longer waiting.
        run = retrain_runs.claim_decision(self._engine, run_id, status, admin)
        if run is None:
            return None
        try:
            # Ahead of any queued retrain: the decision takes milliseconds, a run may wait for it.
            job = self._queue.enqueue_call(DECIDE_FUNC, kwargs={"run_id": run_id}, at_front=True,
                                           result_ttl=_RESULT_TTL_S, failure_ttl=_RESULT_TTL_S)  # fmt: skip
        except BaseException:
            retrain_runs.update_run(self._engine, run_id, status=RunStatus.REJECTED, decided_by=None)
            raise
        log.info("retrain run %s: %s by %s, queued for the train worker", run_id, status, admin)
        ended = self._wait_for(job, _DECISION_WAIT_S)
        if ended is None:
            # The train worker's event will tell the admin once it is done.
            self._sync.set(keys.decision_unanswered_key(run_id), 1, ex=_RESULT_TTL_S)
            return Decision(run, carried_out=False)
        if ended != JobStatus.FINISHED:  # the registry refused: the job put the run back to "rejected"
            raise RuntimeError(f"the train worker could not carry out the decision on run {run_id} (job {ended})")
        return Decision(run, carried_out=True)

    async def take_unanswered(self, run_id: int) -> bool:
        """Whether the admin who decided run `run_id` is still to be told it was carried out (asked once only)."""
        return bool(await self._async.getdel(keys.decision_unanswered_key(run_id)))

    async def rollback(self) -> tuple[str, str | None]:
        """Make the previously active version active again; returns (now active, was active).

        The train worker does it. LookupError if there is no previous version, `RollbackBusy` if no
        train worker took the job within `_ROLLBACK_WAIT_S` (it will do nothing when it does).
        """
        return await asyncio.to_thread(self._rollback)

    def _rollback(self) -> tuple[str, str | None]:
        seconds, micros = self._sync.time()  # the job compares with Redis' clock too
        job = self._queue.enqueue_call(ROLLBACK_FUNC, kwargs={"not_after": seconds + micros / 1e6 + _ROLLBACK_WAIT_S},
                                       at_front=True, result_ttl=600, failure_ttl=_RESULT_TTL_S)  # fmt: skip
        ended = self._wait_for(job, _ROLLBACK_WAIT_S + _ROLLBACK_GRACE_S)
        if ended is None:
            with contextlib.suppress(Exception):  # taken meanwhile: it finds itself too late and does nothing
                job.cancel()
            raise RollbackBusy("no train worker took the rollback in time")
        if ended != JobStatus.FINISHED:
            raise RuntimeError(f"the train worker could not roll back (job {ended})")
        result = job.return_value(refresh=True) or {}
        if result.get("expired"):
            raise RollbackBusy("the train worker took the rollback too late")
        if result.get("now") is None:
            raise LookupError("no previous model version to roll back to")
        return result["now"], result.get("was")

    def _wait_for(self, job: Job, timeout_s: float) -> JobStatus | None:
        """How `job` ended (finished, failed, ...), or None if it had not ended within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = job.get_status(refresh=True)
            except InvalidJobOperation:  # the job is gone from Redis (flushed, say)
                return JobStatus.CANCELED
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                return status
            if time.monotonic() > deadline:
                return None
            time.sleep(_POLL_S)

    # -- the progress message -------------------------------------------------------------------------------

    async def set_progress_message(self, run_id: int, reference: str) -> None:
        """Remember the platform message that shows run `run_id`'s progress (adapters call this)."""
        key = keys.RETRAIN_MESSAGES_KEY
        await self._async.hset(key, str(run_id), reference)
        await self._async.expire(key, _MESSAGE_TTL_S)

    async def progress_message(self, run_id: int) -> str | None:
        reference = await self._async.hget(keys.RETRAIN_MESSAGES_KEY, str(run_id))
        return reference.decode() if reference is not None else None

    # -- events ---------------------------------------------------------------------------------------------

    async def subscribe(self, group: str) -> None:
        """Make sure consumer group `group` exists: from now on, every event is kept for it until acknowledged."""
        try:
            await self._async.xgroup_create(keys.RETRAIN_EVENTS_KEY, group, id="$", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def events(self, group: str, consumer: str | None = None):
        """Yield every retrain event once for consumer group `group` (one per platform), acknowledging each after use.

        Events appended before the group first existed are not replayed: they belong to earlier deployments.
        """
        consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        await self.subscribe(group)
        pending = "0"  # first what this consumer was handed but did not acknowledge before a restart
        while True:
            answer = await self._async.xreadgroup(group, consumer, {keys.RETRAIN_EVENTS_KEY: pending}, count=16,
                                                  block=None if pending == "0" else _BLOCK_MS)  # fmt: skip
            entries = answer[0][1] if answer else []
            if pending == "0" and not entries:
                pending = ">"
                continue
            for entry_id, fields in entries:
                try:
                    event = RunEvent.from_fields(fields)
                except (KeyError, ValueError) as exc:
                    log.warning("skipping a malformed retrain event %s: %s", entry_id, exc)
                else:
                    yield event
                await self._async.xack(keys.RETRAIN_EVENTS_KEY, group, entry_id)


async def follow_retrains(
    desk: RetrainDesk, group: str, handle: Callable[[RunEvent], Awaitable[None]], *, retry_s: float = 5.0
) -> None:
    """Run until cancelled or `desk` is closed: hand every retrain event of the stream to `handle`.

    A failing `handle` costs that one event (logged); a Redis outage pauses the loop until Redis is back.
    """
    while True:
        try:
            async for event in desk.events(group):
                try:
                    await handle(event)
                except Exception:
                    log.exception("could not deliver retrain event %s of run %s", event.kind, event.run_id)
        except asyncio.CancelledError:
            raise
        except (redis.RedisError, OSError) as exc:
            # redis-py can turn a cancellation that lands mid-XREADGROUP into a connection error, or hold it
            # until the connection closes: either way, a cancelled listener or a closed desk is a stop.
            if desk.closed or asyncio.current_task().cancelling():
                return
            log.warning("retrain events unavailable (%s); retrying in %.0f s", exc, retry_s)
            await asyncio.sleep(retry_s)
