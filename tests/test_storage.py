"""The SQL side of the bots: migrations, the schema, and the `Store` the conversation awaits.

Every test runs on SQLite in a temporary folder and, when CARBOT_TEST_DATABASE_URL
points at a PostgreSQL server, again on PostgreSQL in a database of its own
(created for the test and dropped after it, so parallel runs never meet).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from bots._messages import Sender
from bots._store import PredictionRecord, Store
from carbot.db import SQLModel, alembic_config, make_engine, migrate
from carbot.photos import PhotoStore
from carbot.settings import Settings
from worker import Candidate

POSTGRES_ENV = "CARBOT_TEST_DATABASE_URL"

ALICE = Sender("telegram", "1001", "chat-1", language_code="pt-BR")
BOB = Sender("discord", "2002", "channel-9", language_code="en-US")
CAROL = Sender("terminal", "carol", "terminal")
TOP_K = [
    {"label": "FIAT ARGO", "probability": 0.91},
    {"label": "VW GOL", "probability": 0.06},
    {"label": "CHEVROLET ONIX", "probability": 0.03},
]


@contextmanager
def postgres_database(base_url: str) -> Iterator[str]:
    """A new, empty database on the server at `base_url`, dropped afterwards."""
    name = f"carbot_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url).execution_options(isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield make_engine(base_url).url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                # FORCE: a connection some failed test left open must not keep the database alive.
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'carbot.db'}"
        return
    base_url = os.environ.get(POSTGRES_ENV)
    if not base_url:
        pytest.skip(f"PostgreSQL not configured: set {POSTGRES_ENV}, e.g. postgresql://postgres@127.0.0.1:5432/test")
    with postgres_database(base_url) as url:
        yield url


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(database_url, PhotoStore(tmp_path / "photos", retention_days=90))
    store.migrate()
    yield store
    await store.close()


def query(url: str, sql: str, **params: object) -> list[tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


async def record(store: Store, sender: Sender, photo: bytes = b"photo-1", version: str = "v1") -> int:
    return await store.record_prediction(
        sender,
        message_id="m-1",
        photo=photo,
        model_version=version,
        top_k=[Candidate(**c) for c in TOP_K],
        latency_ms=12.5,
    )


# Migrations and schema.


def test_migrate_from_empty_then_again_changes_nothing(database_url: str) -> None:
    migrate(database_url)
    migrate(database_url)

    engine = make_engine(database_url)
    try:
        assert {"people", "predictions", "feedback", "retrain_runs", "alembic_version"} <= set(
            inspect(engine).get_table_names()
        )
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
        assert current == ScriptDirectory.from_config(alembic_config()).get_current_head()
    finally:
        engine.dispose()


def test_the_migrations_can_be_undone(database_url: str) -> None:
    migrate(database_url)
    command.downgrade(alembic_config(database_url), "base")
    assert query(database_url, "SELECT count(*) FROM alembic_version") == [(0,)]
    engine = make_engine(database_url)
    try:
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()
    migrate(database_url)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert query(database_url, "SELECT version_num FROM alembic_version") == [(head,)]


def test_adding_the_photo_sender_keeps_every_row(database_url: str) -> None:
    # Migration 0003 adds predictions.photo_sender_id in place: a table copy would cascade-delete the feedback.
    command.upgrade(alembic_config(database_url), "0002")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO people (id, platform, platform_user_id, language, created_at) "
                    "VALUES (1, 'telegram', '1', 'en', CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(
                text(
                    "INSERT INTO predictions (id, person_id, platform, chat_id, photo_sha256, "
                    "model_version, top_k, latency_ms, created_at) VALUES (1, 1, 'telegram', '1', "
                    "'ab', 'v1', '[]', 1.0, CURRENT_TIMESTAMP)"
                )
            )
            connection.execute(text("INSERT INTO feedback (prediction_id, person_id, vote, created_at, updated_at) "
                                    "VALUES (1, 1, 'up', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))  # fmt: skip
    finally:
        engine.dispose()
    migrate(database_url)
    assert query(database_url, "SELECT id, photo_sender_id FROM predictions") == [(1, None)]
    assert query(database_url, "SELECT prediction_id, vote FROM feedback") == [(1, "up")]
    command.downgrade(alembic_config(database_url), "0002")
    assert query(database_url, "SELECT prediction_id, vote FROM feedback") == [(1, "up")]


def test_migrated_schema_matches_the_models(database_url: str) -> None:
    migrate(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, SQLModel.metadata) == []
    finally:
        engine.dispose()


def test_bots_starting_together_migrate_once(database_url: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(migrate, [database_url] * 4))
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert query(database_url, "SELECT version_num FROM alembic_version") == [(head,)]


def test_processes_opening_a_new_sqlite_database_together_never_find_it_locked(tmp_path: Path) -> None:
    """Four connections switch a new file to the write-ahead log at once; SQLite refuses one of them without
    waiting in about 2 % of such starts. 300 starts: the old code failed in nearly every run of this test."""

    def connect(url: str) -> None:
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        finally:
            engine.dispose()

    with ThreadPoolExecutor(4) as pool:
        for start in range(300):
            list(pool.map(connect, [f"sqlite:///{tmp_path / f'{start}.db'}"] * 4))


async def test_cascades_delete_a_persons_rows(store: Store, database_url: str) -> None:
    # Foreign keys are on for SQLite too, so deleting a person by hand leaves no orphans.
    prediction_id = await record(store, ALICE)
    await store.vote(prediction_id, BOB, "up")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM people WHERE platform_user_id = :user"), {"user": ALICE.user_id})
    finally:
        engine.dispose()
    assert query(database_url, "SELECT count(*) FROM predictions") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM feedback") == [(0,)]


# Predictions.


async def test_record_and_read_back_a_prediction(store: Store, database_url: str) -> None:
    before = datetime.now(UTC)
    prediction_id = await record(store, ALICE, photo=b"a car", version="v7")
    await store.set_reply_message(prediction_id, "reply-42")

    found = await store.get_prediction(prediction_id)
    assert isinstance(found, PredictionRecord)
    assert (found.id, found.platform, found.user_id, found.chat_id) == (prediction_id, "telegram", "1001", "chat-1")
    assert found.model_version == "v7"
    assert found.top_k == tuple(Candidate(**c) for c in TOP_K)
    assert found.created_at.tzinfo is not None and before <= found.created_at <= datetime.now(UTC)
    assert store.photos.get(found.photo_sha256) == b"a car"
    assert query(database_url, "SELECT message_id, reply_message_id FROM predictions") == [("m-1", "reply-42")]
    assert await store.get_prediction(prediction_id + 1000) is None


async def test_language_follows_the_client_when_it_says_one(store: Store, database_url: str) -> None:
    await record(store, ALICE)
    await record(store, CAROL)
    assert query(database_url, "SELECT platform_user_id, language FROM people ORDER BY id") == [
        ("1001", "pt"),
        ("carol", "en"),
    ]
    await record(store, Sender("telegram", "1001", "chat-1", language_code="de"))
    await record(store, Sender("telegram", "1001", "chat-1", language_code=None))
    assert query(database_url, "SELECT language FROM people WHERE platform_user_id = '1001'") == [("en",)]


async def test_first_photos_sent_at_once_make_one_person(store: Store, database_url: str) -> None:
    ids = await asyncio.gather(*(record(store, CAROL, photo=bytes([n])) for n in range(10)))
    assert len(set(ids)) == 10
    assert query(database_url, "SELECT count(*) FROM people") == [(1,)]


async def test_a_full_disk_still_records_the_prediction(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    with caplog.at_level(logging.ERROR, logger="bots._store"):
        prediction_id = await record(store, ALICE, photo=b"too big for the disk")

    found = await store.get_prediction(prediction_id)
    assert found is not None and found.top_k == tuple(Candidate(**c) for c in TOP_K)
    assert store.photos.get(found.photo_sha256) is None
    assert any("not kept" in r.getMessage() and "No space" in r.getMessage() for r in caplog.records)
    assert not [path for path in store.photos.root.rglob("*") if path.is_file()]  # no temporary file left


# Feedback.


def feedback_row(url: str, prediction_id: int, sender: Sender) -> tuple | None:
    rows = query(
        url,
        "SELECT f.vote, f.correction, f.updated_at FROM feedback f JOIN people p ON p.id = f.person_id"
        " WHERE f.prediction_id = :prediction AND p.platform_user_id = :user",
        prediction=prediction_id,
        user=sender.user_id,
    )
    return rows[0] if rows else None


async def test_votes_change_in_place_and_stats_count_them(store: Store, database_url: str) -> None:
    first = await record(store, ALICE, photo=b"one", version="v1")
    await record(store, ALICE, photo=b"two", version="v1")
    third = await record(store, BOB, photo=b"three", version="v2")

    assert await store.vote(first, ALICE, "up") is True
    assert await store.vote(first, ALICE, "down") is True
    written = feedback_row(database_url, first, ALICE)
    assert await store.vote(first, ALICE, "down") is False  # a repeated click...
    assert feedback_row(database_url, first, ALICE) == written  # ...writes nothing
    await store.correct(first, ALICE, "VW GOL")
    assert await store.vote(first, ALICE, "down") is False  # 👎 again keeps the correction
    assert feedback_row(database_url, first, ALICE)[:2] == ("down", "VW GOL")

    assert await store.vote(first, BOB, "up") is True
    assert await store.vote(third, BOB, "up") is True
    await store.correct(third, ALICE, "CHEVROLET ONIX")
    assert await store.vote(third, ALICE, "up") is True  # 👍 drops the correction
    assert feedback_row(database_url, third, ALICE)[:2] == ("up", None)
    assert query(database_url, "SELECT count(*) FROM feedback") == [(4,)]

    assert await store.stats() == {
        "people": 2,
        "predictions": 3,
        "up": 3,
        "down": 1,
        "corrections": 1,
        "accuracy_by_feedback": 0.75,
        "by_model": {
            "v1": {"predictions": 2, "up": 1, "down": 1, "corrections": 1, "accuracy_by_feedback": 0.5},
            "v2": {"predictions": 1, "up": 2, "down": 0, "corrections": 0, "accuracy_by_feedback": 1.0},
        },
    }


async def test_stats_of_an_empty_database(store: Store) -> None:
    assert await store.stats() == {
        "people": 0,
        "predictions": 0,
        "up": 0,
        "down": 0,
        "corrections": 0,
        "accuracy_by_feedback": None,
        "by_model": {},
    }


async def test_twenty_identical_clicks_at_once_leave_one_row(store: Store, database_url: str) -> None:
    prediction_id = await record(store, ALICE)
    # BOB is new too, so his person row is raced for as well as his vote.
    changed = await asyncio.gather(*(store.vote(prediction_id, BOB, "down") for _ in range(20)))
    assert changed.count(True) == 1
    assert query(database_url, "SELECT vote FROM feedback") == [("down",)]
    assert query(database_url, "SELECT count(*) FROM people") == [(2,)]


async def test_sqlite_runs_with_a_write_ahead_log(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'carbot.db'}"
    async with Store(database_url, PhotoStore(tmp_path / "photos", retention_days=90)) as store:
        store.migrate()
        await record(store, ALICE)
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert query(database_url, "PRAGMA journal_mode") == [("wal",)]


async def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'carbot.db'}"
    async with Store(database_url, PhotoStore(tmp_path / "photos", retention_days=90)) as store:
        store.migrate()
        prediction_id = await record(store, ALICE)
        writer = sqlite3.connect(tmp_path / "carbot.db", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
        try:
            found = await asyncio.wait_for(store.get_prediction(prediction_id), timeout=5)
            assert found is not None and found.id == prediction_id
            vote = asyncio.ensure_future(store.vote(prediction_id, ALICE, "up"))
            await asyncio.sleep(0.5)
            assert not vote.done()  # a writer waits its turn...
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        assert await asyncio.wait_for(vote, timeout=10) is True  # ...and gets it


async def test_twenty_clicks_changing_a_vote_at_once_are_thanked_once(store: Store, database_url: str) -> None:
    prediction_id = await record(store, ALICE)
    assert await store.vote(prediction_id, BOB, "up")
    changed = await asyncio.gather(*(store.vote(prediction_id, BOB, "down") for _ in range(20)))
    assert changed.count(True) == 1  # each click read the vote before changing it, one after another
    assert query(database_url, "SELECT vote FROM feedback") == [("down",)]


async def test_votes_are_checked_and_stale_buttons_change_nothing(store: Store, database_url: str) -> None:
    prediction_id = await record(store, ALICE)
    with pytest.raises(ValueError):
        await store.vote(prediction_id, ALICE, "sideways")
    assert await store.vote(prediction_id + 1000, BOB, "up") is False
    await store.correct(prediction_id + 1000, BOB, "VW GOL")
    assert query(database_url, "SELECT count(*) FROM feedback") == [(0,)]
    assert query(database_url, "SELECT count(*) FROM people") == [(1,)]  # BOB was not created for nothing


# A person's data and the photos.


async def test_forget_deletes_a_person_and_only_their_own_photos(store: Store, database_url: str) -> None:
    shared, own = b"a photo both sent", b"alice's own photo"
    alice_shared = await record(store, ALICE, photo=shared)
    alice_own = await record(store, ALICE, photo=own)
    bob_shared = await record(store, BOB, photo=shared)
    await store.vote(alice_shared, ALICE, "up")
    await store.vote(bob_shared, ALICE, "down")
    await store.vote(alice_own, BOB, "up")  # goes with Alice's prediction
    await store.vote(bob_shared, BOB, "up")
    shared_sha = (await store.get_prediction(bob_shared)).photo_sha256
    own_sha = (await store.get_prediction(alice_own)).photo_sha256

    assert await store.forget(ALICE) == {"predictions": 2, "votes": 2, "photos": 1, "photo_hashes": [own_sha]}

    assert store.photos.get(shared_sha) == shared
    assert not store.photos.path(own_sha).exists()
    assert query(database_url, "SELECT id FROM predictions") == [(bob_shared,)]
    assert query(database_url, "SELECT prediction_id, vote FROM feedback") == [(bob_shared, "up")]
    assert query(database_url, "SELECT platform_user_id FROM people") == [(BOB.user_id,)]
    assert await store.forget(ALICE) == {"predictions": 0, "votes": 0, "photos": 0, "photo_hashes": []}


async def test_purge_deletes_photos_past_retention(store: Store) -> None:
    old_sha = store.photos.put(b"old")
    new_sha = store.photos.put(b"new")
    long_ago = time.time() - 91 * 86400
    os.utime(store.photos.path(old_sha), (long_ago, long_ago))

    assert await store.purge_photos() == 1
    assert store.photos.get(old_sha) is None
    assert store.photos.get(new_sha) == b"new"


def test_an_in_memory_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        Store("sqlite://", PhotoStore(tmp_path, retention_days=1))


async def test_from_settings_uses_the_data_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=None, photo_retention_days=7, _env_file=None)
    store = Store.from_settings(settings)
    try:
        store.migrate()
        await record(store, CAROL)
        assert (tmp_path / "data" / "carbot.db").is_file()
        assert store.photos.root == tmp_path / "data" / "photos"
        assert store.photos.retention_days == 7
        assert (await store.stats())["predictions"] == 1
    finally:
        await store.close()


def test_the_retrain_run_statuses_are_one_enum_and_the_ones_the_migration_allows() -> None:
    import importlib

    from carbot.db import RUN_STATUSES, RunStatus
    from carbot.retrain_runs import DECISIONS, FINAL_STATUSES

    migration = importlib.import_module("carbot.migrations.versions.0002_retrain_runs")
    assert migration._STATUSES == RUN_STATUSES == tuple(status.value for status in RunStatus)
    assert set(DECISIONS) < FINAL_STATUSES and RunStatus.QUEUED not in FINAL_STATUSES
