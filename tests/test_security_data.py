"""Security of what is stored and decided: issue 14's points 2, 4, 5 and 6, one attacker's test each.

- 2: nothing read from Redis is a path: forged retrain events, read by the Telegram adapter
  from the real stream, never send a file, nor anything to a chat the run's record does not name;
- 4: one account's 200 wrong corrections do not steer a retrain: the real train worker leaves
  them out or its gate refuses the candidate, and the run's record says why;
- 5: /forget forgets everything: the photos others asked about, the Redis copies, the chats'
  last photos, and no file is left behind by a prediction whose row could not be written;
- 6: a promote and a discard of the same run, from two bots at once, cannot both act, and a
  crash while the registry records a new active version leaves a consistent pair; a bot that
  cannot write the registry (its container mounts it read-only) still gets an admin's decision
  and /rollback carried out, by the train worker.

Everything real: redis-server, `carbot worker` and `carbot train-worker` processes, SQLite, the
Telegram adapter against the fake Bot API server, TensorFlow training the demo model.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from bots import Conversation, Sender, Store
from bots._retrain_desk import RetrainDesk
from bots._texts import text
from carbot import keys, retrain_runs
from carbot.keys import PHOTO_KEY_PREFIX
from carbot.photos import PhotoStore
from carbot.settings import Settings
from model import ModelRegistry
from tests import test_retrain_loop as loop
from tests import test_telegram as telegram_tests
from tests.conftest import add_version, jpeg_bytes, train_worker_running
from tests.test_telegram import ADMIN as TELEGRAM_ADMIN
from tests.test_telegram import Harness
from worker import ClassifyClient

# Fixtures of other modules, reused: pytest knows a fixture by the name it has in this module.
fake, store, telegram_bot = telegram_tests.fake, telegram_tests.store, telegram_tests.bot
base, trained_world = loop.base, loop.trained_world

ADMIN = Sender(platform="telegram", user_id="42", chat_id="900", language_code="en", is_admin=True)


# -- 2. nothing read from Redis is a path or an address -------------------------------------------------------


async def test_forged_retrain_events_send_no_file_and_nothing_to_other_chats(telegram_bot: Harness, redis_url) -> None:
    from bots._retrain_desk import follow_retrains
    from bots._telegram import deliver_event

    bot, fake = telegram_bot, telegram_bot.fake
    boss = fake.user(TELEGRAM_ADMIN, "Boss")
    await bot.conversation.retrain.subscribe("telegram")
    [queued] = await bot.reply_to(fake.send_text(fake.private_chat(boss), boss, "/retrain"))
    assert queued.params["text"].startswith("🛠️ Retrain #1 queued")
    engine = bot.store.engine
    metrics = {"overall_accuracy": 0.8, "overall_n": 50, "feedback_accuracy": 0.5, "feedback_n": 10}
    retrain_runs.update_run(engine, 1, status="rejected", reason="worse_overall", base_version="tiny-test",
                          candidate_version="r1-test", active_metrics=metrics, candidate_metrics=metrics,
                          duration_s=60.0)  # fmt: skip
    # Someone with write access to the registry's folder links the run's report picture to the bot's secrets.
    candidate = bot.settings.registry_dir / "r1-test"
    candidate.mkdir()
    (candidate / retrain_runs.REPORT_IMAGE).symlink_to("/proc/self/environ")
    secrets = Path(bot.settings.data_dir) / ".env"
    secrets.write_text("TELEGRAM_TOKEN=123:SECRET\n")

    # Someone with write access to Redis appends events that name files and another chat.
    attacker_chat = "666"
    publisher = redis.Redis.from_url(redis_url)
    forged = [
        {"run": "999", "kind": "finished", "platform": "telegram", "chat": attacker_chat, "lang": "en",
         "data": '{"report_image": "../../.env"}'},
        {"run": "1", "kind": "failed", "platform": "telegram", "chat": attacker_chat, "lang": "en",
         "data": '{"error": "x"}'},  # the run did not fail: nothing is said about it
        {"run": "1", "kind": "progress", "platform": "telegram", "chat": attacker_chat, "lang": "en",
         "data": '{"epoch": "{0.__class__}", "report_image": "/proc/self/environ"}'},  # the run is not running
        {"run": "1", "kind": "finished", "platform": "telegram", "chat": attacker_chat, "lang": "en",
         "data": f'{{"report_image": "/proc/self/environ", "photo_path": "{secrets}"}}'},
    ]  # fmt: skip
    deliver = lambda event: deliver_event(bot.application.bot, bot.conversation, event)  # noqa: E731
    following = asyncio.create_task(follow_retrains(bot.conversation.retrain, "telegram", deliver))
    try:
        for fields in forged:
            publisher.xadd(keys.RETRAIN_EVENTS_KEY, fields)
        # The last one is about a real, finished run: its summary goes to the admin who asked, from the record.
        # Events are handled in order, so once it is there every forged event before it was handled too.
        [summary] = await fake.wait_for("sendMessage", lambda call: "not promoted" in call.params["text"])
    finally:
        following.cancel()
        shutil.rmtree(candidate)
    assert str(summary.params["chat_id"]) == str(boss["id"])
    assert fake.calls_to("sendPhoto") == [] and fake.calls_to("sendDocument") == []
    others = [call for call in fake.calls if str(call.params.get("chat_id", boss["id"])) != str(boss["id"])]
    assert others == [], others
    assert all("SECRET" not in str(call.params) for call in fake.calls)


# -- 4. one account cannot steer a retrain --------------------------------------------------------------------


async def test_two_hundred_wrong_corrections_from_one_account_do_not_steer_a_retrain(trained_world, base) -> None:
    from training import synthetic_jpeg

    world = trained_world()  # the default settings: 100 photos and 25 corrections per person and retrain
    base_version = world.registry.active_version()
    world.start_workers()
    chat = await loop.open_conversation(world)
    mallory = Sender(platform="telegram", user_id="666", chat_id="666", language_code="en")
    victim, claimed = base["labels"][0], base["labels"][1]
    try:
        # Photos like the ones the model learnt the victim class from, each "corrected" to another class.
        photos = [(victim, synthetic_jpeg(victim, 10_000 + seed, loop.PHOTO_SIZE)) for seed in range(200)]
        await loop.give_feedback(chat, photos, say=lambda truth: claimed, senders=(mallory,))
        events = await loop.retrain_and_wait(chat)
        assert events[-1].kind == "finished", events[-1]
    finally:
        await loop.close_conversation(chat)

    [run] = loop.runs_table(world)
    assert run.status == "rejected" and run.reason != "better", run
    assert world.registry.active_version() == base_version
    counts = run.counts
    assert counts["feedback_votes"] == 200
    # The record says why: the votes left out (over the caps, by an untrusted account, by one voice alone) ...
    left_out = sum(counts[name] for name in ("feedback_capped", "feedback_untrusted", "feedback_single_source",
                                             "feedback_low_weight"))  # fmt: skip
    assert counts["feedback_capped"] + counts["feedback_untrusted"] >= 200 - 25, counts
    entered = counts["feedback_train"] + counts["feedback_holdout"]
    assert entered == 200 - left_out - counts["feedback_missing_photo"] - counts["feedback_skipped"]
    if entered == 0:
        assert run.reason == "no_feedback_holdout", run
    else:  # ... and the gate's verdict on what did enter, with the class it protected
        assert run.reason in ("worse_on_a_class", "worse_overall", "chance_on_a_class", "not_better_on_feedback")
        if run.reason in ("worse_on_a_class", "chance_on_a_class"):
            assert victim in run.candidate_metrics["failing_classes"], run.candidate_metrics


# -- 5. /forget forgets everything ----------------------------------------------------------------------------


@pytest.fixture
async def forgetful_chat(redis_url: str, model_registry: Path, tmp_path: Path, start_worker):
    worker = start_worker()
    config = Settings(model_registry=model_registry, data_dir=tmp_path, rate_limit_per_minute=1000)
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    async with ClassifyClient.from_settings(config, redis_url) as client:
        yield Conversation(classifier=client, store=store, redis=connection, settings=config), worker
    await connection.aclose()
    await store.close()


async def test_forget_removes_photos_others_asked_about_redis_copies_and_no_file_is_left_unreachable(
    forgetful_chat, redis_url: str, tmp_path: Path
) -> None:
    chat, worker = forgetful_chat
    alice, bob, carol = (Sender("telegram", user, "-100", language_code="en") for user in ("1", "2", "3"))
    dave = Sender("telegram", "4", "-200", language_code="en")
    database = tmp_path / "carbot.db"
    photo, other, unrecorded, daves = (jpeg_bytes(seed) for seed in (1, 2, 3, 4))
    sha = {name: hashlib.sha256(data).hexdigest() for name, data in
           (("photo", photo), ("other", other), ("unrecorded", unrecorded), ("daves", daves))}  # fmt: skip

    await chat.photo(alice, "m1", photo)
    # Carol replies /top3 to another photo of Alice's (the adapter says whose photo it is) ...
    await chat.top3(carol, "m2", other, sent_by=alice.user_id)
    # ... and Bob sends /top3 alone: the chat's last photo, which is Alice's.
    reply = await chat.top3(bob, "m3", None)
    assert reply.prediction_id is not None
    await chat.photo(dave, "m4", daves)  # another chat, another person: untouched by Alice's /forget

    # A prediction whose row cannot be written (the database breaks) leaves no photo file behind.
    with sqlite3.connect(database) as connection:
        connection.execute("ALTER TABLE predictions RENAME TO predictions_away")
    try:
        reply = await chat.photo(alice, "m5", unrecorded)
    finally:
        with sqlite3.connect(database) as connection:
            connection.execute("ALTER TABLE predictions_away RENAME TO predictions")
    assert reply.prediction_id is None and "can't take votes" in reply.text
    assert not chat.store.photos.path(sha["unrecorded"]).exists()

    # Alice sends her photo again while no worker answers: its bytes wait in Redis with the queued job.
    worker.stop()
    impatient = ClassifyClient(redis_url, timeout_s=1)  # gives up at once; the job stays queued
    chat.classifier, patient = impatient, chat.classifier
    try:
        reply = await chat.photo(alice, "m6", photo)
    finally:
        chat.classifier = patient
        await impatient.aclose()
    assert reply.text == text("timeout", "en")
    connection = redis.Redis.from_url(redis_url)
    assert connection.exists(PHOTO_KEY_PREFIX + sha["photo"])
    assert connection.exists("carbot:last-photo:telegram:-100")
    for name in ("photo", "other", "daves"):
        assert chat.store.photos.path(sha[name]).exists(), name

    reply = await chat.command(alice, "forget")
    assert reply.text.startswith("🗑️")

    # Every prediction about her photos went, whoever asked; the files and the Redis copies with them.
    with sqlite3.connect(database) as db:
        left = db.execute("SELECT person_id, photo_sha256 FROM predictions").fetchall()
    assert [photo_sha for _, photo_sha in left] == [sha["daves"]]
    assert not chat.store.photos.path(sha["photo"]).exists()
    assert not chat.store.photos.path(sha["other"]).exists()
    assert chat.store.photos.path(sha["daves"]).exists()
    assert not connection.exists(PHOTO_KEY_PREFIX + sha["photo"])
    assert not connection.exists("carbot:last-photo:telegram:-100")
    assert connection.exists("carbot:last-photo:telegram:-200")  # Dave's
    assert await chat.last_photo(bob) is None
    assert (await chat.top3(bob, "m7", None)).text == text("no_photo_yet", "en")


async def test_forget_also_removes_the_reduced_copy_still_waiting_in_redis(forgetful_chat, redis_url: str) -> None:
    """The bots queue a copy reduced for the model, under its own name: /forget finds it through the original's."""
    chat, worker = forgetful_chat
    alice = Sender("telegram", "1", "-100", language_code="en")
    photo = jpeg_bytes(5, size=(320, 240))  # many times the model's input: reduced before it is queued
    assert (await chat.photo(alice, "m0", photo)).prediction_id is not None  # answered and recorded
    worker.stop()  # no worker: the copy of the same photo sent again waits in Redis with its queued job
    impatient = ClassifyClient.from_settings(chat.settings.with_overrides(request_timeout_s=1), redis_url)
    chat.classifier, patient = impatient, chat.classifier
    try:
        assert (await chat.photo(alice, "m1", photo)).text == text("timeout", "en")
    finally:
        chat.classifier = patient
        await impatient.aclose()
    connection = redis.Redis.from_url(redis_url)
    [copy] = connection.keys(PHOTO_KEY_PREFIX + "*")
    assert copy != (PHOTO_KEY_PREFIX + hashlib.sha256(photo).hexdigest()).encode()  # reduced: another name

    assert (await chat.command(alice, "forget")).text.startswith("🗑️")
    assert connection.keys(PHOTO_KEY_PREFIX + "*") == []
    assert connection.keys(keys.photo_copies_key("*")) == []


# -- 6. registry writes are atomic ----------------------------------------------------------------------------


@pytest.fixture
async def two_bots(redis_url: str, model_registry: Path, tmp_path: Path):
    """Two bot processes' retrain desks (say Telegram's and Discord's) on one registry, database and Redis."""
    root = tmp_path / "models"
    shutil.copytree(model_registry, root)
    config = Settings(model_registry=root, data_dir=tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    desks = [RetrainDesk(redis_url, config, store.engine) for _ in range(2)]
    # The train worker carries out the decisions; the bots only record them.
    with train_worker_running(redis_url, root, f"sqlite:///{tmp_path / 'carbot.db'}", tmp_path):
        yield ModelRegistry(root), store.engine, desks
    for desk in desks:
        await desk.aclose()
    await store.close()


async def test_a_promote_and_a_discard_of_one_run_cannot_both_act(two_bots) -> None:
    registry, engine, (telegram_desk, discord_desk) = two_bots
    first_admin = Sender("telegram", "42", "900", is_admin=True)
    second_admin = Sender("discord", "43", "901", is_admin=True)
    for round_ in range(6):
        version = f"r{round_}-candidate"
        add_version(registry, version)
        was_active = registry.active_version()
        run_id = retrain_runs.create_run(engine, requested_by="telegram:42", chat_id="900", language="en")
        retrain_runs.update_run(engine, run_id, status="rejected", reason="worse_overall", candidate_version=version)
        # Both press at once: one promotes, the other discards (alternating which bot does which).
        promote_first = round_ % 2 == 0
        promoted, discarded = await asyncio.gather(
            (telegram_desk if promote_first else discord_desk).decide(run_id, first_admin, promote=True),
            (discord_desk if promote_first else telegram_desk).decide(run_id, second_admin, promote=False),
        )
        assert (promoted is None) != (discarded is None), (round_, promoted, discarded)
        run = retrain_runs.get_run(engine, run_id)
        if promoted is not None:  # the promotion won: the candidate serves, and is on disk
            assert run.status == "promoted_by_admin" and registry.active_version() == version
            assert registry.exists(version) and registry.previous_version() == was_active
        else:  # the discard won: the candidate is gone, the active model unchanged
            assert run.status == "discarded" and registry.active_version() == was_active
            assert not registry.exists(version)


# Paths that this (the bots') process must not write while the guard holds them: its registry mount is read-only.
_READ_ONLY: list[str] = []
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_WRITING_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.symlink", "shutil.rmtree",
                   "shutil.move", "os.truncate")  # fmt: skip


def _refuse_registry_writes(event: str, args: tuple) -> None:
    if not _READ_ONLY or not (event == "open" or event in _WRITING_EVENTS):
        return
    if event == "open":
        path, mode, flags = args
        if not isinstance(path, str | bytes | os.PathLike) or not (
            (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS)
        ):
            return
    paths = [arg for arg in args if isinstance(arg, str | bytes | os.PathLike)]
    for path in paths:
        resolved = os.path.abspath(os.fsdecode(path))
        if any(resolved == root or resolved.startswith(root + os.sep) for root in _READ_ONLY):
            raise PermissionError(30, f"read-only file system (the bot's registry mount): {event}", resolved)


@contextlib.contextmanager
def read_only_for_this_process(root: Path):
    """Make `root` read-only for this process only, as a `:ro` mount makes it for a bot's container."""
    if _refuse_registry_writes not in _HOOKS:  # an audit hook cannot be removed: one, switched by the list
        sys.addaudithook(_refuse_registry_writes)
        _HOOKS.append(_refuse_registry_writes)
    _READ_ONLY.append(os.path.abspath(root))
    try:
        yield
    finally:
        _READ_ONLY.clear()


_HOOKS: list = []


async def test_a_bot_that_cannot_write_the_registry_still_gets_decisions_and_rollback_done(two_bots) -> None:
    registry, engine, (desk, _) = two_bots
    admin = Sender("telegram", "42", "900", is_admin=True)
    for version in ("r1-promoted", "r2-discarded"):
        add_version(registry, version)
    before = registry.active_version()
    with read_only_for_this_process(registry.root):
        with pytest.raises(PermissionError):  # the guard holds: this process itself cannot change the registry
            registry.activate("r1-promoted")
        runs = {}
        for version in ("r1-promoted", "r2-discarded"):
            runs[version] = retrain_runs.create_run(engine, requested_by="telegram:42", chat_id="900", language="en")
            retrain_runs.update_run(engine, runs[version], status="rejected", reason="worse_overall",
                                    candidate_version=version)  # fmt: skip

        promoted = await desk.decide(runs["r1-promoted"], admin, promote=True)
        assert promoted is not None and promoted.carried_out
        assert registry.active_version() == "r1-promoted" and registry.previous_version() == before
        discarded = await desk.decide(runs["r2-discarded"], admin, promote=False)
        assert discarded is not None and discarded.carried_out
        assert not registry.exists("r2-discarded")
        assert [retrain_runs.get_run(engine, run_id).status for run_id in runs.values()] == [
            "promoted_by_admin", "discarded"]  # fmt: skip

        assert await desk.rollback() == (before, "r1-promoted")
        assert registry.active_version() == before


def test_a_crash_while_activating_leaves_a_consistent_active_and_previous_pair(
    model_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model._artefact
    import model._registry

    real_write = model._artefact.write_text_atomic
    for crash_at in (1, 2, 3):
        root = tmp_path / f"models-{crash_at}"
        shutil.copytree(model_registry, root)
        registry = ModelRegistry(root)
        add_version(registry, "v2")
        registry.activate("v2")
        add_version(registry, "v3")
        before = (registry.active_version(), registry.previous_version())
        assert before == ("v2", "tiny-test")
        monkeypatch.setattr(model._registry, "write_text_atomic", crashing_at(crash_at, real_write))
        with contextlib.suppress(SystemExit):
            registry.activate("v3")
        monkeypatch.setattr(model._registry, "write_text_atomic", real_write)
        after = (ModelRegistry(root).active_version(), ModelRegistry(root).previous_version())
        assert after in (before, ("v3", "v2")), (crash_at, after)
        # And the leftovers of a write that never finished are not versions.
        assert {p.name for p in root.iterdir() if not p.name.startswith(".")} <= {"ACTIVE", "PREVIOUS", "tiny-test",
                                                                                 "v2", "v3"}  # fmt: skip


def crashing_at(crash_at: int, real_write):
    """`write_text_atomic` in a process killed at its `crash_at`-th write: that one and later ones never land."""
    writes = 0

    def write(path: Path, text: str) -> None:
        nonlocal writes
        writes += 1
        if writes >= crash_at:
            raise SystemExit("killed")
        real_write(path, text)

    return write
