"""`python -m bench faults` on a small load: each real fault, and what the people in the chat got.

One rig (a persistent private Redis, two supervised `carbot worker` processes, the
tiny test model) runs every scenario in turn; each scenario drives chat users
through the real conversation and breaks one real part part-way through. The
harness's own checks must all hold, and the figures are checked here against
the sources themselves (the SQLite file, the registry, the photo folder) where
the harness could fool itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.faults import SCENARIOS, FaultConfig, run_faults
from carbot.settings import Settings

SMALL = FaultConfig(
    users=20,
    photos_per_user=3,
    workers=2,
    ramp_s=4.0,
    redis_down_s=1.0,
    db_outage_s=4.0,
    store_patience_s=1.5,  # the person waits 1.5 s on a locked database before hearing "try again"
)  # A small load, short faults; every setting of the system at its default (30 s deadlines, 5 s heartbeats).


@pytest.fixture(scope="module")
def results(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    settings = Settings(model_registry=model_registry, data_dir=tmp_path_factory.mktemp("faults"))
    return run_faults(settings, SCENARIOS, SMALL, verbose=False)


def test_every_scenario_ran_and_lost_no_photo(results: dict) -> None:
    scenarios = results["scenarios"]
    assert list(scenarios) == list(SCENARIOS)
    for name, report in scenarios.items():
        if "not_run" in report:
            continue
        assert report["submitted"] == SMALL.users * SMALL.photos_per_user, name
        assert report["answered"] + report["answered_with_error"] + report["lost"] == report["submitted"], name
        assert report["lost"] == 0, (name, report["lost_details"])
        assert all(report["checks"].values()), (name, report["checks"])
        # Bad files are refused whatever else breaks.
        assert report["by_outcome"].get("rejected", 0) >= 1, name


def test_sigkill_mid_batch_the_batch_is_finished_by_another_worker(results: dict) -> None:
    report = results["scenarios"]["worker-sigkill"]
    assert report["killed"] and report["in_flight_at_kill"] >= 1
    assert set(report["in_flight_then"]) <= {"finished", "failed"}
    assert report["worker_restarts_so_far"] >= 1  # the process manager brought a worker back
    # The photos awaiting an answer at the kill were answered, not told to retry.
    assert set(report["in_flight_at_fault"]) <= {"answered", "rejected"}


def test_redis_restart_keeps_the_queue_and_answers_the_photos_waiting(results: dict) -> None:
    report = results["scenarios"]["redis-restart"]
    assert report["queue_before_kill"] >= 1 and report["queued_jobs_lost"] == 0
    in_flight = report["in_flight_at_fault"]
    # Each photo awaiting its answer at the kill hears something (answered, "try again", "too slow"), never
    # silence; how many of them are answered depends on where in a batch the kill falls.
    assert sum(in_flight.values()) >= 1 and set(in_flight) <= {"answered", "failed", "rejected", "timeout"}
    # Photos sent while Redis was down are told so; photos a crashed worker was draining may wait for RQ's
    # one-minute intermediate-queue cleanup and hear "too slow" at their deadline. Never silence.
    assert set(report["by_outcome"]) <= {"answered", "failed", "rejected", "timeout"}


def test_database_outage_no_vote_is_silently_dropped(results: dict) -> None:
    report = results["scenarios"]["db-outage"]
    assert report["votes_silently_dropped"] == 0 and report["votes_acknowledged"] >= 1
    assert report["votes_told_retry"] + report["answered_without_buttons"] >= 1
    assert report["votes_recorded_on_retry"] == report["votes_told_retry"]


def test_disk_full_answers_everyone_and_keeps_what_fits(results: dict) -> None:
    report = results["scenarios"]["disk-full"]
    if os.geteuid() != 0:
        assert "root" in report["not_run"]  # a small tmpfs cannot be mounted: the scenario says so
        pytest.skip("mounting a small tmpfs needs root; the scenario reported that it was not run")
    assert report["photos_not_kept_enospc"] >= 1 and report["photos_kept"] >= 1
    assert report["predictions_recorded"] == report["by_outcome"]["answered"]
    assert report["damaged_files"] == 0 and report["temporary_files_left"] == 0


def test_corrupt_model_is_refused_and_the_old_one_keeps_answering(results: dict) -> None:
    report = results["scenarios"]["corrupt-model"]
    assert report["model_versions"] == {"tiny-test": report["by_outcome"]["answered"]}
    assert report["model_refusals"] >= 1


async def test_a_vote_while_the_database_is_locked_gets_try_again_and_is_recorded_on_the_next_press(
    redis_url: str, model_registry: Path, tmp_path: Path
) -> None:
    """The db-outage scenario in miniature: SQLite held by another connection, a person presses 👍."""
    import threading

    import redis.asyncio as aioredis

    from bench.faults import hold_exclusive_lock
    from bots import Conversation, Sender, Store, text
    from carbot.photos import PhotoStore
    from worker import Candidate, ClassifyClient

    database = tmp_path / "carbot.db"
    store = Store(f"sqlite:///{database}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    ana = Sender(platform="telegram", user_id="7", chat_id="7", language_code="pt-BR")
    prediction = await store.record_prediction(
        ana,
        message_id="1",
        photo=b"x",
        model_version="tiny-test",
        top_k=[Candidate("VW GOL", 0.9)],
        latency_ms=1.0,
    )
    connection = aioredis.Redis.from_url(redis_url)
    settings = Settings(model_registry=model_registry, data_dir=tmp_path)
    async with ClassifyClient(redis_url) as client:
        conversation = Conversation(classifier=client, store=store, redis=connection, settings=settings)
        conversation.store_patience_s = 0.5
        await conversation.button(ana, f"c:{prediction}:x")  # "another model…": the next text is a correction
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold_exclusive_lock, args=(database, locked, release))
        holder.start()
        locked.wait()
        try:
            refused = await conversation.button(ana, f"v:{prediction}:u")
            typed = await conversation.text(ana, "VW GOL")  # an exact label: the correction is written at once
        finally:
            release.set()
            holder.join()
        assert refused.notice == text("store_unavailable", "pt") and refused.edit is None
        assert typed.text == text("store_unavailable", "pt")
        # The write left in its thread may land once the lock goes; either way the next press is honest.
        again = (await conversation.button(ana, f"v:{prediction}:u")).notice
        assert again in (text("thanks_up", "pt"), text("vote_unchanged", "pt"))
        assert (await store.stats())["up"] == 1
    await connection.aclose()
    await store.close()
