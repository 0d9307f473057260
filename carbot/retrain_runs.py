"""The retrain loop's shared contract: the `train` queue, the Redis keys, the run records and their events.

Three parties meet here, none of them importing TensorFlow:

- a bot, when an admin sends `/retrain` (`bots._retrain_desk.RetrainDesk`): it takes the
  one-at-a-time lock, writes a `RetrainRun` row and enqueues the job on the train queue;
- the job (`training._train_worker.run_retrain`, run by `carbot train-worker`): it keeps the
  row, the progress hash and the lock up to date and appends an event to a Redis stream
  at each step (started, progress each epoch, finished, failed);
- every bot process, which reads that stream and tells the admin who asked: one message
  edited each epoch, then a summary.

Everything that can end a run badly goes through `fail_run`, whether the job raised, its
work horse was killed, or a bot found the lock of a job that no longer exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import redis
from rq.job import Job, JobStatus
from sqlalchemy import Engine, update
from sqlmodel import Session, col, select

from carbot.db import RetrainRun, RunStatus, utcnow
from carbot.keys import RETRAIN_EVENTS_KEY, RETRAIN_LOCK_KEY, RETRAIN_PROGRESS_KEY, SERIALIZER

log = logging.getLogger(__name__)

PENDING = "pending"
# The picture comparing both models, in the candidate's version folder. Events never carry its path:
# a bot finds it from the run's record (its candidate version), inside its own registry folder.
REPORT_IMAGE = "retrain_report.png"
_EVENTS_MAXLEN = 10_000
_ERROR_LENGTH = 2000  # the column's size
# Finished statuses: a run in one of these holds no lock and has no job to wait for.
FINAL_STATUSES = frozenset(RunStatus) - {RunStatus.QUEUED, RunStatus.RUNNING}
# What an admin may decide for a run whose candidate the gate rejected.
DECISIONS = (RunStatus.PROMOTED_BY_ADMIN, RunStatus.DISCARDED)


def job_id(run_id: int) -> str:
    """The RQ job id of a run: predictable, so a bot can look up the job that holds the lock."""
    return f"retrain-{run_id}"


def candidate_version(run_id: int, when: datetime | None = None) -> str:
    """The registry version name of a run's candidate, e.g. ``r7-20261125-1830``."""
    return f"r{run_id}-{(when or utcnow()).strftime('%Y%m%d-%H%M')}"


# -- events ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunEvent:
    """One step of a run, addressed to the admin who asked (platform, chat, language).

    Ids and numbers only, never a path: whoever can write to Redis can forge one. A bot acts on the
    run id, the kind, the platform and progress numbers; whom to tell, the error and the report picture
    it reads from the run's record (`bots._conversation.Conversation.retrain_notices`).
    """

    run_id: int
    kind: str  # "started" | "progress" | "finished" | "failed" | "decided" (an admin's decision carried out)
    platform: str
    chat_id: str
    language: str = "en"
    data: dict[str, Any] = field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        return {
            "run": str(self.run_id),
            "kind": self.kind,
            "platform": self.platform,
            "chat": self.chat_id,
            "lang": self.language,
            "data": json.dumps(self.data),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> RunEvent:
        def get(name: str) -> str:
            value = fields.get(name.encode(), fields.get(name, b""))
            return value.decode() if isinstance(value, bytes) else value

        return cls(int(get("run")), get("kind"), get("platform"), get("chat"), get("lang") or "en",
                   json.loads(get("data") or "{}"))  # fmt: skip

    @classmethod
    def for_run(cls, run: RetrainRun, kind: str, **data: Any) -> RunEvent:
        platform, _, _ = run.requested_by.partition(":")
        return cls(run.id, kind, platform, run.chat_id, run.language, data)


def publish(connection: redis.Redis, event: RunEvent) -> None:
    """Append `event` to the stream every bot reads; progress also goes to the hash a second /retrain shows."""
    with connection.pipeline() as pipe:
        pipe.xadd(RETRAIN_EVENTS_KEY, event.to_fields(), maxlen=_EVENTS_MAXLEN, approximate=True)
        if event.kind in ("started", "progress"):
            pipe.hset(
                RETRAIN_PROGRESS_KEY, mapping={"run": event.run_id, "kind": event.kind, "data": json.dumps(event.data)}
            )
        pipe.execute()


# -- run records ----------------------------------------------------------------------------------------------


def create_run(engine: Engine, *, requested_by: str, chat_id: str, language: str) -> int:
    """A new queued run; returns its id."""
    with Session(engine) as session:
        run = RetrainRun(requested_by=requested_by, chat_id=chat_id, language=language)
        session.add(run)
        session.commit()
        return run.id


def update_run(engine: Engine, run_id: int, **values: Any) -> None:
    """Set columns of run `run_id` (an unknown column is a programming error: it raises)."""
    with Session(engine) as session:
        run = session.get(RetrainRun, run_id)
        if run is None:
            raise LookupError(f"no retrain run {run_id}")
        for name, value in values.items():
            if name not in RetrainRun.model_fields:
                raise AttributeError(f"RetrainRun has no column {name!r}")
            # A RunStatus is stored as its text: drivers need not know the enum.
            setattr(run, name, value.value if isinstance(value, Enum) else value)
        session.add(run)
        session.commit()


def get_run(engine: Engine, run_id: int) -> RetrainRun | None:
    with Session(engine, expire_on_commit=False) as session:
        return session.get(RetrainRun, run_id)


def list_runs(engine: Engine, limit: int = 20) -> list[RetrainRun]:
    """The latest runs, newest first."""
    with Session(engine, expire_on_commit=False) as session:
        return list(session.exec(select(RetrainRun).order_by(col(RetrainRun.id).desc()).limit(limit)))


def claim_decision(engine: Engine, run_id: int, status: RunStatus, admin: str) -> RetrainRun | None:
    """Record an admin's decision on a rejected run, if (and only if) it is still waiting for one.

    One conditional UPDATE: of two decisions on the same run, from any processes, exactly one
    finds it "rejected" and wins; the other gets None. Returns the run as it was before.
    """
    if status not in DECISIONS:
        raise ValueError(f"not a decision: {status!r}")
    with Session(engine, expire_on_commit=False) as session:
        run = session.get(RetrainRun, run_id)
        if run is None or run.candidate_version is None:
            return None
        claimed = session.exec(
            update(RetrainRun)
            .where(col(RetrainRun.id) == run_id, col(RetrainRun.status) == RunStatus.REJECTED)
            .values(status=RunStatus(status).value, decided_by=admin)
        ).rowcount
        session.commit()
        return run if claimed == 1 else None


def fail_run(connection: redis.Redis, engine: Engine, run_id: int, error: str) -> None:
    """Mark run `run_id` failed (unless it already finished), tell its admin, and free the lock it held.

    Safe to call twice: the second call finds a finished run and changes nothing.
    """
    run = get_run(engine, run_id)
    if run is not None and run.status not in FINAL_STATUSES:
        finished = utcnow()
        started = run.started_at or run.requested_at
        duration = (finished - _aware(started)).total_seconds()
        update_run(engine, run_id, status=RunStatus.FAILED, error=error[:_ERROR_LENGTH], finished_at=finished,
                   duration_s=duration)  # fmt: skip
        publish(connection, RunEvent.for_run(run, "failed", error=error[:300]))
        log.error("retrain run %s failed: %s", run_id, error)
    release_lock(connection, run_id)


def release_lock(connection: redis.Redis, run_id: int | str) -> None:
    """Free the lock and the progress hash if (and only if) run `run_id` (or `PENDING`) holds them."""
    with connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(RETRAIN_LOCK_KEY)
                holder = pipe.get(RETRAIN_LOCK_KEY)
                pipe.multi()
                if holder is not None and holder.decode() == str(run_id):
                    pipe.delete(RETRAIN_LOCK_KEY, RETRAIN_PROGRESS_KEY)
                pipe.execute()
                return
            except redis.WatchError:
                continue


def running_run(connection: redis.Redis, engine: Engine) -> int | str | None:
    """The id of the retrain in progress, `PENDING` while a bot is queuing one, or None.

    A lock whose job is gone or finished is cleared (its run failed).
    """
    holder = connection.get(RETRAIN_LOCK_KEY)
    if holder is None:
        return None
    holder = holder.decode()
    if holder == PENDING:  # a bot is queuing a run this very moment
        return PENDING
    run_id = int(holder)
    run = get_run(engine, run_id)
    if run is not None and run.status in FINAL_STATUSES:
        # It has ended, and its lock is being freed this very moment (the event that said so may come
        # first): an admin who heard it ended may ask for the next run at once.
        release_lock(connection, run_id)
        return None
    status = _job_status(connection, run_id)
    if status in (None, JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
        fail_run(connection, engine, run_id, f"the retrain job stopped without finishing (job {status or 'missing'})")
        return None
    return run_id


def _job_status(connection: redis.Redis, run_id: int) -> JobStatus | None:
    try:
        return Job.fetch(job_id(run_id), connection=connection, serializer=SERIALIZER).get_status(refresh=False)
    except Exception:  # NoSuchJobError, or a job hash that no longer reads
        return None


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
