"""The SQL schema: every SQLModel table of the project, the engine factory and the Alembic upgrade.

The tables hold who asked (`Person`), what the model answered (`Prediction`),
what people said about it (`Feedback`: one changeable row per prediction and
person) and each admin-requested retrain (`RetrainRun`). The schema itself is owned by the Alembic migrations in
`carbot/migrations`; `migrate()` brings any database, SQLite or PostgreSQL, to
the latest revision, and a test keeps these models and the migrations in step.
"""

import sqlite3
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, Engine, UniqueConstraint, event, text
from sqlmodel import Field, SQLModel, create_engine

from carbot.settings import normalize_database_url

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# Stable constraint and index names, so later migrations can address them by name on both databases.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The execution option that marks a read-only engine (see `read_only`).
_READ_ONLY = "carbot_read_only"

# Any fixed number: PostgreSQL advisory lock that serialises bots migrating the same database at start-up.
_MIGRATION_LOCK_KEY = 0x63617262  # "carb"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _timestamp(*, index: bool = False) -> Any:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), nullable=False, index=index)


class Person(SQLModel, table=True):
    """Someone who talked to a bot, identified by their platform and that platform's user id."""

    __tablename__ = "people"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=16)
    platform_user_id: str = Field(max_length=64)
    language: str = Field(default="en", max_length=8)
    created_at: datetime = _timestamp()


class Prediction(SQLModel, table=True):
    """One classified photo: who sent it, where the answer went, and what the model said."""

    __tablename__ = "predictions"

    id: int | None = Field(default=None, primary_key=True)
    person_id: int = Field(foreign_key="people.id", ondelete="CASCADE", index=True)
    platform: str = Field(max_length=16)
    chat_id: str = Field(max_length=64)
    message_id: str | None = Field(default=None, max_length=64)  # the photo's message
    reply_message_id: str | None = Field(default=None, max_length=64)  # the bot's answer, which holds the buttons
    photo_sha256: str = Field(max_length=64, index=True)
    # Who sent the photo (a people.id), when not the person who asked about it (a /top3 reply, Discord's
    # "Identify car"): that person's /forget deletes this prediction too. None: the asker sent it. Not a
    # foreign key (migration 0003 says why); `bots._store` deletes these rows with their sender.
    photo_sender_id: int | None = Field(default=None, index=True)
    model_version: str = Field(max_length=128, index=True)
    top_k: list[dict] = Field(default_factory=list, sa_type=JSON, nullable=False)  # [{"label", "probability"}]
    latency_ms: float
    created_at: datetime = _timestamp(index=True)


class Feedback(SQLModel, table=True):
    """A person's verdict on a prediction: 👍 or 👎, maybe with the right label. One row per pair, updated in place."""

    __tablename__ = "feedback"
    __table_args__ = (
        # Also the index for "feedback of a prediction": prediction_id leads.
        UniqueConstraint("prediction_id", "person_id"),
        CheckConstraint("vote IN ('up', 'down')", name="vote"),
    )

    id: int | None = Field(default=None, primary_key=True)
    prediction_id: int = Field(foreign_key="predictions.id", ondelete="CASCADE")
    # Indexed so that forgetting a person and the cascade from `people` do not scan the table.
    person_id: int = Field(foreign_key="people.id", ondelete="CASCADE", index=True)
    vote: str = Field(max_length=4)
    correction: str | None = Field(default=None, max_length=128)
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()


class RunStatus(StrEnum):
    """The life of a retrain run: queued -> running -> promoted | rejected | failed; an admin may then promote a
    rejected candidate anyway (promoted_by_admin) or discard it (discarded). Stored as its text."""

    QUEUED = "queued"
    RUNNING = "running"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    PROMOTED_BY_ADMIN = "promoted_by_admin"
    DISCARDED = "discarded"


# The column's check constraint (migration 0002 wrote the same values).
RUN_STATUSES = tuple(status.value for status in RunStatus)


class RetrainRun(SQLModel, table=True):
    """One `/retrain`: who asked, on what data, how both models scored, what was decided, and how long it took."""

    __tablename__ = "retrain_runs"
    __table_args__ = (CheckConstraint(f"status IN {RUN_STATUSES}", name="status"),)

    id: int | None = Field(default=None, primary_key=True)
    # "platform:user id" and the chat to answer in; plain text, not a foreign key: the record outlives /forget.
    requested_by: str = Field(max_length=96)
    chat_id: str = Field(max_length=64)
    language: str = Field(default="en", max_length=8)
    status: str = Field(default=RunStatus.QUEUED.value, max_length=24, index=True)  # a RunStatus
    base_version: str | None = Field(default=None, max_length=128)
    candidate_version: str | None = Field(default=None, max_length=128)
    counts: dict = Field(default_factory=dict, sa_type=JSON, nullable=False)  # photos used, per source and part
    active_metrics: dict = Field(default_factory=dict, sa_type=JSON, nullable=False)
    candidate_metrics: dict = Field(default_factory=dict, sa_type=JSON, nullable=False)
    reason: str | None = Field(default=None, max_length=32)  # the gate's verdict, e.g. "better", "worse_overall"
    error: str | None = Field(default=None, max_length=2000)
    decided_by: str | None = Field(default=None, max_length=96)  # the admin who overrode the gate
    requested_at: datetime = _timestamp(index=True)
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    duration_s: float | None = None


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling is off: `_sqlite_begin` starts every transaction.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # SQLite ignores foreign keys (so ON DELETE CASCADE too) unless every connection asks for them.
    cursor.execute("PRAGMA foreign_keys = ON")
    # Write-ahead log: a commit appends to the log instead of rewriting pages behind a journal, and
    # with synchronous=NORMAL it costs no fsync. A crash of the process loses nothing committed and
    # nothing is ever half-written; only a power cut may undo the last few commits. A burst of
    # answers was waiting on those fsyncs, one writer at a time.
    _use_write_ahead_log(cursor)
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


# Switching a new database file to the write-ahead log needs its exclusive lock, and SQLite refuses at once,
# without waiting its busy timeout, a connection that would otherwise deadlock with another one switching it
# too: processes that start together on a new database (bots, their migrations) met "database is locked" in
# about 2 % of starts. Once switched, the file stays in WAL mode and later connections pass at once.
_WAL_ATTEMPTS = 20


def _use_write_ahead_log(cursor: sqlite3.Cursor) -> None:
    for attempt in range(_WAL_ATTEMPTS):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == _WAL_ATTEMPTS - 1:
                raise
            time.sleep(0.005 * (attempt + 1))  # the other connection's switch takes a few milliseconds


def _sqlite_begin(connection: Any) -> None:
    if connection.get_execution_options().get(_READ_ONLY):
        # A reader of the write-ahead log reads a snapshot: it never waits for the writer.
        connection.exec_driver_sql("BEGIN")
        return
    # Take the write lock as the transaction starts, not at its first write: a read-then-write (a vote
    # changed from 👍 to 👎) cannot interleave with another one, and a writer waits its turn within
    # the busy timeout instead of failing on a snapshot another writer made stale.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    """`engine` for transactions that only read: on SQLite they begin without taking the write lock."""
    return engine.execution_options(**{_READ_ONLY: True})


def make_engine(url: str) -> Engine:
    """A pooled engine for `url`, shareable across threads (the bots use it from `asyncio.to_thread`)."""
    parsed = normalize_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)  # a fresh data folder
        # Pool connections are handed between worker threads; the pool guarantees one user at a time.
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # A database restart or an idle-connection reaper must not turn the next vote into an error.
    return create_engine(parsed, pool_pre_ping=True)


def alembic_config(url: str | None = None) -> Any:
    """Alembic's configuration, built in code (the project has no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # The ini-style parser treats "%" as interpolation, and passwords may contain one.
        config.set_main_option("sqlalchemy.url", normalize_database_url(url).render_as_string(False).replace("%", "%%"))
    return config


def migrate(url: str) -> None:
    """Upgrade the database at `url` to the latest schema; a database already there is left alone.

    Safe when several bots start at once: they take turns (a PostgreSQL advisory
    lock; on SQLite the write lock every transaction takes as it begins) and all
    but the first find nothing to do.
    """
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.begin()
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
    finally:
        engine.dispose()
