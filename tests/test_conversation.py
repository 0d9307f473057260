"""The platform-agnostic conversation end to end: photo → Redis → worker → reply → vote → SQL row.

Real Redis, a real worker process with a real (tiny) model, a real Store on
SQLite, and on PostgreSQL when CARBOT_TEST_DATABASE_URL points to one.
"""

from __future__ import annotations

import ast
import asyncio
import io
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
import sqlalchemy
from PIL import Image
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from bots import Conversation, Sender, Store, build_conversation
from bots._retrain_desk import RetrainDesk
from bots._texts import language_for, language_of, text
from carbot.photos import PhotoStore
from carbot.settings import Settings
from model import ModelRegistry
from tests.conftest import TEST_LABELS, WorkerProcess, jpeg_bytes, worker_env
from worker import ClassifyClient

ALICE = Sender(platform="telegram", user_id="1", chat_id="100", language_code="en")
BRUNO = Sender(platform="telegram", user_id="2", chat_id="100", language_code="pt-BR")
ADMIN = Sender(platform="telegram", user_id="42", chat_id="100", is_admin=True)


def database_urls() -> list:
    urls = [pytest.param("sqlite", id="sqlite")]
    urls.append(pytest.param("postgresql", id="postgresql", marks=pytest.mark.skipif(
        not os.environ.get("CARBOT_TEST_DATABASE_URL"), reason="CARBOT_TEST_DATABASE_URL is not set")))  # fmt: skip
    return urls


@pytest.fixture(params=database_urls())
def database_url(request, tmp_path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'carbot.db'}"
        return
    # A database of its own on the shared server, dropped afterwards.
    server = sqlalchemy.make_url(os.environ["CARBOT_TEST_DATABASE_URL"]).set(drivername="postgresql+psycopg")
    name = f"carbot_conv_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield server.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def shared_worker(redis_server, model_registry, tmp_path_factory) -> Iterator[WorkerProcess]:
    """One worker for the whole module: it keeps serving while each test empties Redis."""
    folder = tmp_path_factory.mktemp("conversation-worker")
    worker = WorkerProcess(worker_env(redis_server.url, model_registry, folder), folder / "worker.log", "talker")
    worker.wait_until_listening(redis.Redis.from_url(redis_server.url))
    yield worker
    worker.stop()


@pytest.fixture
async def conversation(shared_worker, redis_url, model_registry, tmp_path, database_url):
    settings = Settings(model_registry=model_registry, data_dir=tmp_path, rate_limit_per_minute=5)
    store = Store(database_url, PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    async with ClassifyClient(redis_url, timeout_s=30) as client:
        yield Conversation(classifier=client, store=store, redis=connection, settings=settings)
    await connection.aclose()
    await store.close()


def labels_in(text: str) -> list[str]:
    return [label for label in TEST_LABELS if label in text]


async def test_photo_is_answered_with_top3_and_vote_buttons(conversation):
    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(1))

    assert len(labels_in(reply.text)) == 3
    assert "tiny-test" in reply.text and "%" in reply.text
    assert [b.text for row in reply.buttons for b in row] == ["👍", "👎"]
    assert reply.prediction_id is not None
    stats = await conversation.store.stats()
    assert stats["predictions"] == 1 and stats["by_model"]["tiny-test"]["predictions"] == 1


async def test_votes_are_one_per_person_changeable_and_repeat_clicks_are_harmless(conversation):
    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(2))
    up, down = (b.data for b in reply.buttons[0])

    assert (await conversation.button(ALICE, up)).notice == "👍 Thanks!"
    assert (await conversation.button(ALICE, up)).notice == "Already recorded, thanks."
    await conversation.button(BRUNO, up)
    stats = await conversation.store.stats()
    assert (stats["up"], stats["down"]) == (2, 0)

    answer = await conversation.button(ALICE, down)  # Alice changes her mind
    stats = await conversation.store.stats()
    assert (stats["up"], stats["down"]) == (1, 1)
    # 👎 offers the other two candidates and "another model…"
    offered = [b for row in answer.follow_up.buttons for b in row]
    assert [b.text for b in offered[:2]] == labels_in(reply.text)[1:] or len(offered) == 3
    assert offered[-1].text == "Another model…"
    assert all(b.choice for b in offered[:-1])


async def test_a_correction_is_recorded_from_a_candidate_button(conversation):
    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(3))
    answer = await conversation.button(ALICE, reply.buttons[0][1].data)
    candidate = answer.follow_up.buttons[0][0]

    picked = await conversation.button(ALICE, candidate.data)
    assert candidate.text in picked.notice and picked.edit is not None
    stats = await conversation.store.stats()
    assert stats["corrections"] == 1 and stats["down"] == 1


async def test_typed_corrections_are_matched_tolerantly(conversation):
    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(4))
    await conversation.button(ALICE, reply.buttons[0][1].data)
    another = await conversation.button(ALICE, f"c:{reply.prediction_id}:x")
    assert another.follow_up.expects_text

    unknown = await conversation.text(ALICE, "tesla cybertruck")
    assert "cybertruck" in unknown.text and unknown.expects_text
    suggestion = await conversation.text(ALICE, "chevrolet onyx")
    assert suggestion.buttons[0][0].text == "CHEVROLET ONIX"
    done = await conversation.text(ALICE, "  fíat   argo ")
    assert "FIAT ARGO" in done.text
    record = await conversation.store.get_prediction(reply.prediction_id)
    assert record is not None
    assert (await conversation.store.stats())["corrections"] == 1
    # Once answered, plain text is just text again.
    assert "photo" in (await conversation.text(ALICE, "fiat argo")).text


@pytest.mark.parametrize("data", ["v:999999:u", "garbage", "", "c:1:9999", "v:1:x", "x:1:u", "v:1:u; DROP TABLE"])
async def test_forged_or_stale_buttons_get_a_notice_and_change_nothing(conversation, data):
    answer = await conversation.button(ALICE, data)
    assert answer.notice == "This button is no longer valid."
    assert answer.edit is None and answer.follow_up is None
    stats = await conversation.store.stats()
    assert stats["up"] == stats["down"] == 0


async def test_bad_photo_gets_a_friendly_message(conversation):
    reply = await conversation.photo(ALICE, "m1", b"GIF89a but not really")
    assert reply.text.startswith("🖼️ I can't use this picture:")
    assert not reply.buttons
    assert (await conversation.store.stats())["predictions"] == 0


async def test_rate_limit_per_person(conversation):
    for seed in range(5):
        assert (await conversation.photo(ALICE, f"m{seed}", jpeg_bytes(10 + seed))).buttons
    limited = await conversation.photo(ALICE, "m6", jpeg_bytes(20))
    assert "5 a minute" in limited.text
    assert (await conversation.photo(BRUNO, "m7", jpeg_bytes(21))).buttons  # others are not affected


async def test_one_person_flooding_big_photos_stores_only_what_the_rate_limit_lets_through(conversation, redis_url):
    # A hundred photos of 2 MB at once from one person (20 MB each in the telling: smaller here
    # only to keep the test fast; what is checked is how many reach Redis, not how big they are).
    rng = np.random.default_rng(0)
    photos = []
    for _ in range(100):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (800, 900, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=1)
        photos.append(buffer.getvalue())
    replies = await asyncio.gather(*(conversation.photo(ALICE, f"f{i}", photo) for i, photo in enumerate(photos)))
    limited = [reply for reply in replies if "5 a minute" in reply.text]
    assert len(limited) == 95
    # Only the five let through ever became jobs, so only their bytes were ever stored in Redis.
    queue = Queue("classify", connection=redis.Redis.from_url(redis_url))
    assert FinishedJobRegistry(queue=queue).count + FailedJobRegistry(queue=queue).count == 5
    assert (await conversation.photo(BRUNO, "b1", jpeg_bytes(30))).buttons  # somebody else is answered


async def test_replies_in_brazilian_portuguese(conversation):
    reply = await conversation.photo(BRUNO, "m1", jpeg_bytes(5))
    assert "acertei?" in reply.text
    assert "Mande uma foto" in (await conversation.command(BRUNO, "help")).text


async def test_a_rejected_photo_is_explained_in_the_senders_language_through_a_real_worker(conversation):
    """The worker rejects with a reason code; the bot translates it (no English sentence inside a Portuguese one)."""
    reply = await conversation.photo(BRUNO, "m1", b"not a photo at all")
    assert reply.text == text("photo_rejected", "pt", reason=text("reject_not_an_image", "pt"))
    english = await conversation.photo(ALICE, "m2", b"not a photo at all")
    assert english.text == text("photo_rejected", "en", reason=text("reject_not_an_image", "en"))
    assert reply.prediction_id is None and not reply.buttons


def test_the_bots_and_the_store_choose_a_persons_language_by_one_rule():
    assert language_of(BRUNO) == language_for(BRUNO.language_code) == "pt"
    assert language_for(None) is None and language_of(Sender("telegram", "3", "3")) == "en"


async def test_the_builder_assembles_the_conversation_from_the_settings(redis_url, model_registry, tmp_path):
    """`build_conversation`: the store, a classify client limited as the active model, the retrain desk, Redis."""
    settings = Settings(model_registry=model_registry, data_dir=tmp_path, rate_limit_per_minute=5)
    conversation = build_conversation(settings, redis_url)
    try:
        assert isinstance(conversation.classifier, ClassifyClient) and isinstance(conversation.retrain, RetrainDesk)
        active = ModelRegistry(model_registry).active(verify=False)
        assert conversation.classifier.max_photo_bytes == active.preprocessing.max_bytes
        assert conversation.store.photos.root == tmp_path / "photos" and conversation.settings is settings
        assert await conversation.redis.ping()
        assert (await conversation.command(ALICE, "help")).text.startswith("🚗")
    finally:
        await conversation.aclose()
    assert build_conversation(settings, redis_url, retrain=False).retrain is None


def test_every_adapter_and_the_load_test_build_their_conversation_through_the_builder():
    """Nobody else wires a Conversation, a ClassifyClient or a RetrainDesk together: `build_conversation` does."""
    root = Path(__file__).parent.parent
    for path in ("bots/_telegram.py", "bots/_discord.py", "bots/_terminal.py", "bench/loadtest.py"):
        tree = ast.parse((root / path).read_text())
        called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                  for node in ast.walk(tree) if isinstance(node, ast.Call)}  # fmt: skip
        assert "build_conversation" in called, path
        assert not called & {"Conversation", "ClassifyClient", "RetrainDesk", "connect_redis", "from_settings"}, path
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "worker._main" not in imported, path


async def test_top3_alone_uses_the_last_photo_of_the_chat(conversation):
    assert "haven't seen a photo" in (await conversation.top3(ALICE, None, None)).text
    await conversation.photo(ALICE, "m0", jpeg_bytes(6))
    assert len(labels_in((await conversation.top3(ADMIN, None, None)).text)) == 3


async def test_the_chats_last_photo_is_kept_by_reference_not_as_a_second_copy(conversation, redis_url):
    photo = jpeg_bytes(16)
    await conversation.photo(ALICE, "m0", photo)
    connection = redis.Redis.from_url(redis_url)
    values = {key: connection.get(key) if connection.type(key) == b"string" else connection.hgetall(key)
              for key in connection.keys("*") if connection.type(key) in (b"string", b"hash")}  # fmt: skip
    copies = [key for key, value in values.items() if value == photo or photo in getattr(value, "values", list)()]
    assert copies == []  # the job's copy left with the job; the chat keeps only a reference
    assert (await conversation.last_photo(ALICE))[0] == photo  # read back from the photo store


async def test_help_admin_commands_and_forget(conversation):
    help_text = (await conversation.command(ALICE, "start")).text
    assert "I know 5 of them" in help_text and "90 days" in help_text and "/forget" in help_text

    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(7))
    await conversation.button(ALICE, reply.buttons[0][0].data)
    assert (await conversation.command(ALICE, "stats")).text == "Sorry, that command is for the bot's admins."
    stats_text = (await conversation.command(ADMIN, "stats")).text
    assert "1 answers" in stats_text and "👍 1" in stats_text and "tiny-test" in stats_text
    assert "tiny-test" in (await conversation.command(ADMIN, "model")).text
    assert "cannot start retrains" in (await conversation.command(ADMIN, "retrain")).text  # no desk: no train queue

    forgotten = await conversation.command(ALICE, "forget")
    assert "1 answers, 1 votes and 1 photos" in forgotten.text
    stats = await conversation.store.stats()
    assert stats["predictions"] == 0 and stats["up"] == 0


async def test_non_photo_messages_get_hints(conversation):
    for kind in ("sticker", "video", "voice", "animation", "document", "text", "other", "unknown-kind"):
        assert conversation.hint(ALICE, kind).text
    assert "video" in conversation.hint(ALICE, "video").text


async def test_timeout_and_full_queue_get_a_prompt_try_again(redis_url, model_registry, tmp_path):
    """A queue nobody serves: the first photo times out, the next finds the queue full. Both are told why."""
    settings = Settings(model_registry=model_registry, data_dir=tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    async with ClassifyClient(redis_url, queue="unserved", queue_limit=1, timeout_s=0.5) as client:
        conversation = Conversation(classifier=client, store=store, redis=connection, settings=settings)
        assert "took too long" in (await conversation.photo(ALICE, "m1", jpeg_bytes(1))).text
        assert "very busy" in (await conversation.photo(ALICE, "m2", jpeg_bytes(2))).text
    assert (await store.stats())["predictions"] == 0
    await connection.aclose()
    await store.close()


async def test_buttons_only_act_in_the_chat_of_their_prediction(conversation):
    reply = await conversation.photo(ALICE, "m1", jpeg_bytes(8))
    stranger = Sender(platform="telegram", user_id="9", chat_id="999")
    elsewhere = Sender(platform="discord", user_id="1", chat_id="100")
    for sender in (stranger, elsewhere):
        assert (await conversation.button(sender, reply.buttons[0][0].data)).notice == "This button is no longer valid."
    assert (await conversation.store.stats())["up"] == 0
