"""The admin retrain loop end to end: feedback in SQL → /retrain → a train worker → gate → hot swap → answers.

Real parts throughout: Redis, `carbot worker` and `carbot train-worker` processes, a
SQLite store, TensorFlow training a tiny model on the project's synthetic photos. The
admin's view is the conversation's: the replies to commands and button presses, and the
notices it makes of the job's events.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner
from PIL import Image, ImageFilter

from bots import Conversation, Sender, Store
from bots._retrain_desk import RetrainDesk
from carbot import cli, keys, retrain_runs
from carbot.db import RunStatus, make_engine
from carbot.photos import PhotoStore
from carbot.retrain_runs import RunEvent
from carbot.settings import Settings, get_settings
from model import ModelRegistry
from tests.conftest import WorkerProcess, add_version, worker_env
from worker import ClassifyClient

ADMIN = Sender(platform="telegram", user_id="42", chat_id="900", language_code="en", is_admin=True)
ALICE = Sender(platform="telegram", user_id="1", chat_id="100", language_code="en")
# A crowd of people giving feedback: what one person can put into a retrain is capped.
CROWD = tuple(
    Sender(platform="telegram", user_id=str(n), chat_id=str(100 + n), language_code="en") for n in range(1, 7)
)
PHOTO_SIZE = (96, 72)  # like the demo's photos: twice its 48 px input, 4:3


# -- the world: a trained base model, its dataset, a store, workers --------------------------------------------


@pytest.fixture(scope="module")
def base(demo_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo model (built once per session, deterministically) and a folder of photos like those it learned from."""
    from training import make_synthetic_dataset

    dataset = make_synthetic_dataset(tmp_path_factory.mktemp("retrain-base"), per_class=40, size=PHOTO_SIZE, seed=11)
    return {"registry": demo_registry, "dataset": dataset, "labels": ModelRegistry(demo_registry).active().labels}


class World:
    """One test's system: its registry copy, data folder, database, Redis, and the processes serving them."""

    def __init__(self, tmp_path: Path, redis_url: str, registry: Path, **settings: object) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.registry_root = tmp_path / "models"
        shutil.copytree(registry, self.registry_root)
        self.registry = ModelRegistry(self.registry_root)
        self.data_dir = tmp_path / "data"
        self.database_url = f"sqlite:///{tmp_path / 'carbot.db'}"
        self.settings = Settings(model_registry=self.registry_root, data_dir=self.data_dir,
                                 database_url=self.database_url, rate_limit_per_minute=1000, **settings)  # fmt: skip
        self.env = worker_env(redis_url, self.registry_root, self.data_dir, **settings)
        self.env["DATABASE_URL"] = self.database_url
        self.processes: list[WorkerProcess] = []

    def start(self, command: str, name: str) -> WorkerProcess:
        process = WorkerProcess(self.env, self.tmp_path / f"{name}.log", name, command=command)
        self.processes.append(process)
        process.wait_until_listening(redis.Redis.from_url(self.redis_url))
        return process

    def start_workers(self) -> None:
        """A classify worker and a train worker, as a GPU host runs them."""
        self.start("worker", "classifier")
        self.start("train-worker", "trainer")

    def stop(self) -> None:
        for process in self.processes:
            if process.process.poll() is None:
                process.stop(signal.SIGKILL, timeout=10)


@pytest.fixture
def world(tmp_path, redis_url, model_registry) -> Iterator[World]:
    world = World(tmp_path, redis_url, model_registry)
    yield world
    world.stop()


@pytest.fixture
def trained_world(tmp_path, redis_url, base) -> Iterator[Callable[..., World]]:
    """A world on the trained base model; its worker processes are stopped with the test (they share Redis)."""
    made: list[World] = []

    def make(**settings: object) -> World:
        made.append(World(tmp_path, redis_url, base["registry"], base_dataset=base["dataset"], **settings))
        return made[-1]

    yield make
    for world in made:
        world.stop()


@pytest.fixture
async def chat(world: World) -> AsyncIterator[Conversation]:
    conversation = await open_conversation(world)
    yield conversation
    await close_conversation(conversation)


async def open_conversation(world: World) -> Conversation:
    store = Store(world.database_url, PhotoStore(world.data_dir / "photos", 90))
    store.migrate()
    desk = RetrainDesk(world.redis_url, world.settings, store.engine)
    client = ClassifyClient(world.redis_url, timeout_s=60)
    return Conversation(classifier=client, store=store, redis=aioredis.Redis.from_url(world.redis_url),
                        settings=world.settings, retrain=desk)  # fmt: skip


async def close_conversation(conversation: Conversation) -> None:
    await conversation.retrain.aclose()
    await conversation.classifier.aclose()
    await conversation.redis.aclose()
    await conversation.store.close()


async def next_events(desk: RetrainDesk, until: str | tuple[str, ...], timeout: float = 240) -> list[RunEvent]:
    """Events of the retrain stream (read as the Telegram bots' consumer group) up to one of kind `until`."""
    until = (until,) if isinstance(until, str) else until
    seen: list[RunEvent] = []

    async def read() -> None:
        async for event in desk.events("telegram"):
            seen.append(event)
            if event.kind in until:
                return

    await asyncio.wait_for(read(), timeout)
    return seen


async def retrain_and_wait(chat: Conversation) -> list[RunEvent]:
    """An admin's /retrain, then the run's events until it finished or failed."""
    await chat.retrain.subscribe("telegram")
    await chat.command(ADMIN, "retrain")
    return await next_events(chat.retrain, ("finished", "failed"))


def runs_table(world: World) -> list:
    engine = make_engine(world.database_url)
    try:
        return retrain_runs.list_runs(engine)
    finally:
        engine.dispose()


# -- commands and buttons that need no training ----------------------------------------------------------------


async def test_non_admins_cannot_retrain_roll_back_or_decide(world, chat):
    for command in ("retrain", "rollback"):
        assert (await chat.command(ALICE, command)).text == "Sorry, that command is for the bot's admins."
    assert (await chat.button(ALICE, "r:1:p")).notice == "Sorry, that command is for the bot's admins."
    assert runs_table(world) == []
    assert redis.Redis.from_url(world.redis_url).llen("rq:queue:train") == 0


async def test_admins_sending_retrain_at_once_get_one_run_and_its_number(world, chat):
    admins = [Sender("telegram", str(42 + n), f"chat-{n}", language_code="en", is_admin=True) for n in range(6)]
    replies = await asyncio.gather(*(chat.command(admin, "retrain") for admin in admins))

    queued = [reply for reply in replies if reply.progress_of is not None]
    assert len(queued) == 1 and [run.status for run in runs_table(world)] == ["queued"]
    run_id = queued[0].progress_of
    for reply in replies:
        if reply is not queued[0]:
            assert reply.text.startswith(f"⏳ A retrain is already running (run #{run_id})"), reply.text
    connection = redis.Redis.from_url(world.redis_url)
    assert connection.get(keys.RETRAIN_LOCK_KEY) == str(run_id).encode()
    assert connection.ttl(keys.RETRAIN_LOCK_KEY) > 600  # held for the run, not for the request


async def test_a_request_that_died_holding_the_lock_blocks_retrains_for_seconds_only(world, chat, monkeypatch):
    monkeypatch.setattr("bots._retrain_desk._PENDING_WAIT_S", 1.0)  # 5 s in real life
    connection = redis.Redis.from_url(world.redis_url)
    # A bot stopped between taking the lock and writing its run; the lock lapses (2 minutes in real life, 3 s here).
    connection.set(keys.RETRAIN_LOCK_KEY, retrain_runs.PENDING, ex=3)

    reply = await chat.command(ADMIN, "retrain")  # waits for the run's number, then says what it knows
    assert reply.text == "⏳ Another admin is starting a retrain right now; one at a time."
    assert runs_table(world) == []
    await asyncio.sleep(max(0, connection.pttl(keys.RETRAIN_LOCK_KEY)) / 1000)
    assert "Retrain #1 queued" in (await chat.command(ADMIN, "retrain")).text


async def test_one_retrain_at_a_time_and_a_lost_job_frees_the_lock(world, chat):
    first = await chat.command(ADMIN, "retrain")
    assert first.progress_of == 1 and "Retrain #1 queued" in first.text
    assert "No train worker is running" in first.text  # none started in this test: it waits in the queue
    second = await chat.command(ADMIN, "retrain")
    assert second.text.startswith("⏳ A retrain is already running (run #1)") and second.progress_of is None
    assert [run.status for run in runs_table(world)] == ["queued"]

    # The job vanishes (Redis flushed by an operator, say): the next /retrain finds the lock stale.
    connection = redis.Redis.from_url(world.redis_url)
    connection.delete(f"rq:job:{retrain_runs.job_id(1)}")
    third = await chat.command(ADMIN, "retrain")
    assert "Retrain #2 queued" in third.text
    runs = {run.id: run for run in runs_table(world)}
    assert runs[1].status == "failed" and "stopped without finishing" in runs[1].error
    assert runs[2].status == "queued"


async def test_a_run_that_has_ended_holds_no_lock_even_before_it_is_freed(world, chat):
    """Its admin may hear that it ended (the event) before its lock is freed: the next /retrain is queued."""
    assert "Retrain #1 queued" in (await chat.command(ADMIN, "retrain")).text
    engine = make_engine(world.database_url)
    retrain_runs.update_run(engine, 1, status=RunStatus.FAILED)  # it ended; its lock is not released yet
    engine.dispose()
    assert "Retrain #2 queued" in (await chat.command(ADMIN, "retrain")).text


async def test_rollback_returns_to_the_previous_version_and_says_so(world, chat):
    world.start("train-worker", "trainer")  # it carries out /rollback: bots never write the registry
    assert (await chat.command(ADMIN, "rollback")).text == "There is no previous model to roll back to."
    add_version(world.registry, "tiny-copy")
    world.registry.activate("tiny-copy")

    reply = await chat.command(ADMIN, "rollback")
    assert reply.text.startswith("↩️ Rolled back: tiny-test is active again (it was tiny-copy)")
    assert world.registry.active_version() == "tiny-test"


async def test_a_decision_the_train_worker_takes_later_is_announced_when_it_is_done(world, chat, monkeypatch):
    monkeypatch.setattr("bots._retrain_desk._DECISION_WAIT_S", 0.5)  # no train worker yet: the press stops waiting
    add_version(world.registry, "r1-late")
    engine = chat.store.engine
    run_id = retrain_runs.create_run(engine, requested_by="telegram:42", chat_id="900", language="en")
    retrain_runs.update_run(engine, run_id, status="rejected", reason="worse_overall", candidate_version="r1-late")
    await chat.retrain.subscribe("telegram")
    await chat.set_progress_message(run_id, "progress-7")

    answer = await chat.button(ADMIN, f"r:{run_id}:p")
    assert answer.notice.startswith(f"⏳ Decision recorded for run #{run_id}") and answer.edit is None
    assert world.registry.active_version() == "tiny-test"  # nothing changed yet: no train worker
    assert (await chat.button(ADMIN, f"r:{run_id}:x")).notice == "That candidate is no longer waiting for a decision."

    world.start("train-worker", "trainer")
    [event] = await next_events(chat.retrain, "decided", timeout=60)
    assert world.registry.active_version() == "r1-late"
    edited, told = await chat.retrain_notices(event)
    assert edited.edit == "progress-7" and edited.reply.text.endswith(
        "✅ r1-late is active now (run #1, promoted by an admin)."
    )
    assert (told.chat_id, told.edit, told.reply.text) == (
        "900",
        None,
        "✅ r1-late is active now (run #1, promoted by an admin).",
    )
    assert len(await chat.retrain_notices(event)) == 1  # told once: a second delivery only edits


async def test_a_run_with_nothing_to_train_on_says_so_without_buttons(world, chat):
    engine = chat.store.engine
    run_id = retrain_runs.create_run(engine, requested_by="telegram:42", chat_id="900", language="pt")
    retrain_runs.update_run(engine, run_id, status="rejected", reason="no_training_data", base_version="tiny-test")
    [summary] = await chat.retrain_notices(RunEvent.for_run(retrain_runs.get_run(engine, run_id), "finished"))
    assert summary.chat_id == "900" and summary.edit is None and not summary.reply.buttons
    assert summary.reply.text.startswith(f"🚫 O retreino #{run_id} não treinou nada: não havia fotos utilizáveis")


async def test_a_candidate_refused_for_a_class_names_it_to_the_admin(world, chat):
    engine = chat.store.engine
    run_id = retrain_runs.create_run(engine, requested_by="telegram:42", chat_id="900", language="en")
    metrics = {"overall_accuracy": 0.9, "overall_n": 40, "feedback_accuracy": 0.5, "feedback_n": 10}
    failing = {"FIAT ARGO": {"n": 20, "active": 0.9, "candidate": 0.2}}
    retrain_runs.update_run(engine, run_id, status="rejected", reason="worse_on_a_class", base_version="tiny-test",
                          candidate_version="r1-x", active_metrics=metrics,
                          candidate_metrics={**metrics, "failing_classes": failing})  # fmt: skip
    [summary] = await chat.retrain_notices(RunEvent.for_run(retrain_runs.get_run(engine, run_id), "finished"))
    assert "worse than the active model on one class of the hold-out (or more) (FIAT ARGO)" in summary.reply.text
    assert summary.reply.photo_path is None  # no such version in the registry: no picture, and no error


def test_button_data_for_runs_is_parsed_strictly():
    from bots._conversation import _parse_button

    assert _parse_button("r:7:p") == ("r", 7, "p")
    assert _parse_button("r:7:x") == ("r", 7, "x")
    for forged in ("r:7:u", "r:7:3", "r::p", "r:7:p:extra", "v:7:p", "c:7:p"):
        assert _parse_button(forged) is None, forged


# -- the whole loop, with training ------------------------------------------------------------------------------


def edge_photo(label: str, seed: int) -> bytes:
    """A synthetic photo as another camera would take it (edges only): the base model gets most of them wrong."""
    from training import synthetic_jpeg

    image = Image.open(io.BytesIO(synthetic_jpeg(label, seed, PHOTO_SIZE)))
    image = image.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


async def give_feedback(
    chat: Conversation,
    photos: list[tuple[str, bytes]],
    *,
    say=lambda truth: truth,
    senders=(ALICE,),
    seconded: bool = False,
) -> dict:
    """People send each photo, then confirm a right answer (👍) or type what it really was (👎, "another model").

    `senders` take turns, photo by photo (a crowd: one person's feedback is capped per retrain).
    `seconded`: each photo is sent in a group where a friend of the sender gives the same answer
    (a crowd whose corrections corroborate each other, as trust asks of them).
    `say(truth)` is the label given; returns {"wrong": [(truth, photo), ...], "versions": {...}}.
    """
    wrong, versions = [], set()
    for number, (truth, photo) in enumerate(photos):
        sender = senders[number % len(senders)]
        voters = [sender]
        if seconded:
            friend = Sender(sender.platform, str(int(sender.user_id) + 1000), sender.chat_id, language_code="en")
            voters.append(friend)
        reply = await chat.photo(sender, f"m{number}", photo)
        record = await chat.store.get_prediction(reply.prediction_id)
        versions.add(record.model_version)
        label = say(truth)
        if record.top_k[0].label != label:
            wrong.append((truth, photo))
        for voter in voters:
            if record.top_k[0].label == label:
                await chat.button(voter, f"v:{record.id}:u")
                continue
            await chat.button(voter, f"v:{record.id}:d")
            await chat.button(voter, f"c:{record.id}:x")
            assert "Recorded as" in (await chat.text(voter, label)).text
    return {"wrong": wrong, "versions": versions}


class Load:
    """Photos classified back to back while a retrain runs and its model is swapped in: nothing may be lost."""

    def __init__(self, client: ClassifyClient, photos: list[bytes]) -> None:
        self.client, self.photos = client, photos
        self.versions: list[str] = []
        self.errors: list[BaseException] = []
        self.submitted = 0
        self._stop = asyncio.Event()

    async def run(self, concurrency: int = 4) -> None:
        async def one_user(offset: int) -> None:
            while not self._stop.is_set():
                self.submitted += 1
                try:
                    prediction = await self.client.classify(self.photos[(self.submitted + offset) % len(self.photos)])
                    self.versions.append(prediction.model_version)
                except Exception as exc:  # every failure counts against the swap
                    self.errors.append(exc)

        await asyncio.gather(*(one_user(offset) for offset in range(concurrency)))

    def stop(self) -> None:
        self._stop.set()


async def test_corrections_retrain_a_promoted_model_that_answers_them_while_nothing_is_lost(trained_world, base):
    world = trained_world(retrain_epochs=30)
    base_version = world.registry.active_version()
    world.start_workers()
    chat = await open_conversation(world)
    try:
        labels = base["labels"]
        feedback = await give_feedback(
            chat,
            [(label, edge_photo(label, seed)) for label in labels for seed in range(20)],
            senders=CROWD,
            # Corroborated: the base model is often confidently wrong on the new style, and a lone corrector
            # of confident answers loses trust (by design); two of six people were left out that way once.
            seconded=True,
        )
        assert len(feedback["wrong"]) >= 60, "the base model should get the new style mostly wrong"
        assert feedback["versions"] == {base_version}

        await chat.retrain.subscribe("telegram")
        load = Load(chat.classifier, [edge_photo(label, 500 + seed) for label in labels for seed in range(4)])
        loading = None
        queued = await chat.command(ADMIN, "retrain")
        assert queued.progress_of == 1 and "Retrain #1 queued" in queued.text
        await chat.set_progress_message(1, "900:77")

        events: list[RunEvent] = []
        async for event in chat.retrain.events("telegram"):
            events.append(event)
            if event.kind == "progress" and event.data["epoch"] == 1:
                # A second /retrain while it trains says so, with the progress.
                again = await chat.command(ADMIN, "retrain")
                assert "already running (run #1)" in again.text and "epoch 1/30" in again.text
            if event.kind == "progress" and event.data["epoch"] == 3:
                # What the admin sees now (a progress event of a run that has ended shows nothing).
                progress = await chat.retrain_notices(event)
            if event.kind == "progress" and event.data["epoch"] == 27 and loading is None:
                # People's photos from here on: the last epochs give way to them, then the swap must lose none.
                # (Not from the first epoch: a retrain that yields to a steady load for all 30 took minutes.)
                loading = asyncio.create_task(load.run())
            if event.kind in ("finished", "failed"):
                break
        assert [event.kind for event in events] == ["started"] + ["progress"] * 30 + ["finished"], events[-1]
        assert loading is not None

        # Swap under load: wait until answers carry the new version, then a little more.
        [run] = runs_table(world)
        deadline = time.monotonic() + 60
        while run.candidate_version not in load.versions[-3:] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        load.stop()
        await loading
    finally:
        await close_conversation(chat)

    print("retrain counts:", run.counts)  # shown with a failure, which pytest would otherwise abridge
    # The run's record: who, what data, both models' metrics, the decision.
    outcome = (run.status, run.reason, run.requested_by, run.base_version)
    assert outcome == ("promoted", "better", "telegram:42", base_version), (
        run.reason,
        run.candidate_metrics,
        run.active_metrics,
        run.counts,
    )
    # Every photo entered, but for a correction that only one person made to its label (one voice is not enough).
    entered = run.counts["feedback_train"] + run.counts["feedback_holdout"]
    assert entered == len(labels) * 20 - run.counts["feedback_single_source"], run.counts
    assert run.counts["feedback_single_source"] <= 5 and run.counts["feedback_capped"] == 0, run.counts
    assert run.counts["feedback_holdout"] > 0 and run.counts["base_train"] > 0
    assert run.candidate_metrics["feedback_accuracy"] > run.active_metrics["feedback_accuracy"]
    assert run.candidate_metrics["overall_accuracy"] >= run.active_metrics["overall_accuracy"]
    assert run.duration_s > 0 and run.error is None
    assert world.registry.active_version() == run.candidate_version

    # Zero lost or failed jobs across the swap; one worker moves from the old version to the new once.
    assert load.errors == [] and len(load.versions) == load.submitted
    switched = load.versions.index(run.candidate_version)
    assert set(load.versions[:switched]) == {base_version} and set(load.versions[switched:]) == {run.candidate_version}

    # What the admin saw: the progress message edited each epoch, then a summary with the report picture.
    chat = await open_conversation(world)
    try:
        assert await chat.retrain_notices(events[3]) == []  # the run is over: a stale progress event shows nothing
        assert progress[0].edit == "900:77" and "epoch 3/30" in progress[0].reply.text
        finished = await chat.retrain_notices(events[-1])
        assert finished[0].edit == "900:77" and "finished" in finished[0].reply.text
        summary = finished[1].reply
        assert f"the new model {run.candidate_version} is active now" in summary.text
        assert "held-out feedback" in summary.text and not summary.buttons
        assert summary.photo_path and Path(summary.photo_path).is_file()

        # The next answers carry the new version, and the photos people corrected are now answered right.
        trained = [(truth, photo) for truth, photo in feedback["wrong"]
                   if not _held_out(photo)]  # fmt: skip
        right = 0
        for truth, photo in trained:
            prediction = await chat.classifier.classify(photo)
            assert prediction.model_version == run.candidate_version
            right += prediction.top_k[0].label == truth
        # None of them was answered right before; a short fine-tune of a tiny model fixes most, not all.
        assert right >= 0.5 * len(trained), f"{right} of {len(trained)} corrected photos answered right; {run}"
    finally:
        await close_conversation(chat)

    # `carbot runs` lists it (the settings are read afresh: an earlier test may have cached others).
    get_settings.cache_clear()
    listed = CliRunner().invoke(cli.main, ["runs", "--json"], env={"DATABASE_URL": world.database_url})
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert row["status"] == "promoted" and row["candidate_version"] == run.candidate_version


def _held_out(photo: bytes) -> bool:
    import hashlib

    from training import is_held_out

    return is_held_out(hashlib.sha256(photo).hexdigest())


async def test_a_worse_candidate_is_not_promoted_and_the_admin_decides(trained_world, base):
    # An absurd learning rate wrecks the fine-tuned weights: the gate must catch it.
    world = trained_world(retrain_epochs=2, retrain_learning_rate=500.0)
    base_version = world.registry.active_version()
    world.start_workers()
    chat = await open_conversation(world)
    try:
        labels = base["labels"]
        photos = [(label, edge_photo(label, seed)) for label in labels for seed in range(6)]
        await give_feedback(chat, photos, senders=CROWD)
        events = await retrain_and_wait(chat)
        assert events[-1].kind == "finished", events[-1]

        [run] = runs_table(world)
        refusals = ("worse_overall", "worse_on_a_class", "chance_on_a_class", "not_better_on_feedback")
        assert run.status == "rejected" and run.reason in refusals, run
        assert world.registry.active_version() == base_version
        assert world.registry.exists(run.candidate_version)  # kept for the admin's decision
        summary = (await chat.retrain_notices(events[-1]))[-1].reply
        assert "was not promoted" in summary.text and f"{base_version} stays active" in summary.text
        promote, discard = (button.data for button in summary.buttons[0])
        assert (promote, discard) == (f"r:{run.id}:p", f"r:{run.id}:x")

        assert (await chat.button(ALICE, discard)).notice == "Sorry, that command is for the bot's admins."
        assert world.registry.exists(run.candidate_version)
        answer = await chat.button(ADMIN, discard)
        assert "was discarded" in answer.notice and answer.edit is not None
        assert not world.registry.exists(run.candidate_version)
        assert (await chat.button(ADMIN, promote)).notice == "That candidate is no longer waiting for a decision."
        assert world.registry.active_version() == base_version
        [run] = runs_table(world)
        assert (run.status, run.decided_by) == ("discarded", "telegram:42")
    finally:
        await close_conversation(chat)


async def test_a_crashing_retrain_is_marked_failed_and_the_active_model_keeps_serving(trained_world, tmp_path, base):
    world = trained_world()
    world.env["CARBOT_BASE_DATASET"] = str(tmp_path / "no-such-folder")  # what the train worker will read
    base_version = world.registry.active_version()
    world.start_workers()
    chat = await open_conversation(world)
    try:
        await give_feedback(chat, [(label, edge_photo(label, 1)) for label in base["labels"]])
        events = await retrain_and_wait(chat)
        assert events[-1].kind == "failed"
        [run] = runs_table(world)
        assert run.status == "failed" and "no-such-folder" in run.error and run.finished_at is not None
        notice = (await chat.retrain_notices(events[-1]))[-1].reply
        assert notice.text.startswith("❌ Retrain #1 failed") and "keeps serving" in notice.text
        assert world.registry.active_version() == base_version
        assert (await chat.classifier.classify(edge_photo(base["labels"][0], 2))).model_version == base_version
        # The lock is free again: the next /retrain is queued.
        assert "Retrain #2 queued" in (await chat.command(ADMIN, "retrain")).text
    finally:
        await close_conversation(chat)


async def test_a_training_process_killed_mid_run_is_marked_failed(trained_world, base):
    import psutil

    world = trained_world(retrain_epochs=50)  # long enough to be killed mid-way
    base_version = world.registry.active_version()
    world.start("worker", "classifier")
    trainer = world.start("train-worker", "trainer")
    chat = await open_conversation(world)
    try:
        await give_feedback(chat, [(label, edge_photo(label, seed)) for label in base["labels"] for seed in range(6)])
        await chat.retrain.subscribe("telegram")
        await chat.command(ADMIN, "retrain")
        await next_events(chat.retrain, "progress")
        # The work horse (RQ's child process training this run) dies as an out-of-memory kill would do it.
        [horse] = psutil.Process(trainer.process.pid).children()
        horse.kill()
        events = await next_events(chat.retrain, "failed", timeout=60)
        assert "the training process died" in events[-1].data["error"]
        [run] = runs_table(world)
        assert (run.status, run.base_version) == ("failed", base_version) and run.finished_at is not None
        assert world.registry.active_version() == base_version
        assert trainer.process.poll() is None  # the train worker itself carries on
        assert "Retrain #2 queued" in (await chat.command(ADMIN, "retrain")).text
    finally:
        await close_conversation(chat)
