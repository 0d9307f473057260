"""The Telegram bot through the real python-telegram-bot stack, against a fake Bot API server.

Everything but Telegram is real: the application built by `build_application` long-polls
`tests.fake_telegram.FakeTelegram` over HTTP, and the conversation behind it talks to a
real Redis, a real `carbot worker` process with a tiny model, and a SQLite store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from sqlmodel import Session, select
from telegram import PhotoSize
from telegram.ext import Application

from bots._conversation import Conversation
from bots._retrain_desk import RetrainDesk, follow_retrains
from bots._store import Store
from bots._telegram import build_application, deliver_event, pick_photo_size, webhook_secret
from bots._texts import text
from carbot import db, retrain_runs
from carbot.photos import PhotoStore, photo_name
from carbot.settings import Settings
from tests.conftest import TEST_LABELS, jpeg_bytes, train_worker_running
from tests.fake_telegram import ApiCall, FakeTelegram
from worker import ClassifyClient

TOKEN = "123:TEST"
ADMIN = 42


@dataclass
class Harness:
    fake: FakeTelegram
    store: Store
    settings: Settings
    conversation: Conversation
    application: Application

    async def reply_to(self, message: dict, method: str = "sendMessage", *, count: int = 1) -> list[ApiCall]:
        """The bot's answers to `message` (sent as replies to it)."""
        return await self.fake.wait_for(method, lambda call: _replies_to(call, message), count=count)

    async def reply_message_ids(self, count: int, timeout: float = 5.0) -> list[int]:
        """The bots' answers the predictions point at (recorded just after Telegram confirms the message)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            rows = self.prediction_rows()
            ids = [int(row.reply_message_id) for row in rows if row.reply_message_id is not None]
            if len(ids) >= count or asyncio.get_running_loop().time() > deadline:
                return ids
            await asyncio.sleep(0.02)

    def prediction_rows(self) -> list[db.Prediction]:
        with Session(self.store._engine) as session:
            return list(session.exec(select(db.Prediction)))

    def feedback_rows(self) -> list[db.Feedback]:
        with Session(self.store._engine) as session:
            return list(session.exec(select(db.Feedback)))


def _replies_to(call: ApiCall, message: dict) -> bool:
    reply = call.params.get("reply_parameters") or {}
    return call.params.get("chat_id") == message["chat"]["id"] and reply.get("message_id") == message["message_id"]


def _buttons(call: ApiCall) -> list[list[dict]]:
    return (call.params.get("reply_markup") or {}).get("inline_keyboard", [])


def _sent(fake: FakeTelegram, call: ApiCall) -> dict:
    """The bot's message that a sendMessage call created, in its current state."""
    return fake.messages[(call.result["chat"]["id"], call.result["message_id"])]


@pytest.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram(TOKEN) as server:
        yield server


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    yield store
    await store.close()


@pytest.fixture
def worker(start_worker) -> None:
    """A `carbot worker` serving the queue (about 5 s to start: only tests that classify ask for it)."""
    start_worker()


@pytest.fixture
async def bot(fake, store, redis_url, model_registry, tmp_path) -> AsyncIterator[Harness]:
    """The Telegram application, polling the fake server."""
    settings = Settings(
        model_registry=model_registry,
        data_dir=tmp_path,
        redis_url=redis_url,
        telegram_token=TOKEN,
        telegram_api_base_url=fake.base_url,
        telegram_file_base_url=fake.base_file_url,
        admin_ids=[f"telegram:{ADMIN}"],
        rate_limit_per_minute=1000,
    )
    connection = aioredis.Redis.from_url(redis_url)
    desk = RetrainDesk(redis_url, settings, store.engine)
    async with ClassifyClient.from_settings(settings, redis_url) as classifier:
        conversation = Conversation(classifier=classifier, store=store, redis=connection, settings=settings,
                                    retrain=desk)  # fmt: skip
        application = build_application(settings, conversation)
        async with application:
            await application.start()
            await application.updater.start_polling(poll_interval=0, timeout=1)
            try:
                yield Harness(fake, store, settings, conversation, application)
            finally:
                await application.updater.stop()
                await application.stop()
    await desk.aclose()
    await connection.aclose()


def three_sizes(seed: int) -> list[tuple[int, int, bytes]]:
    """Telegram's sizes of one photo, smallest first; the model's input is 32 px."""
    return [(w, h, jpeg_bytes(seed, (w, h))) for w, h in ((24, 18), (64, 48), (160, 120))]


# -- the whole loop ------------------------------------------------------------------------------------------------


async def test_photo_gets_top3_and_thumbs_up_is_recorded(bot: Harness, worker: None) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)
    photo = fake.send_photo(chat, ana, three_sizes(1))

    [answer] = await bot.reply_to(photo)
    # The smallest size that covers 32 px is the one fetched: 64x48, not 24x18 nor 160x120.
    wanted = photo["photo"][1]
    assert [call.params["file_id"] for call in fake.calls_to("getFile")] == [wanted["file_id"]]
    assert fake.downloads == [fake._files[wanted["file_id"]].file_path]
    lines = answer.params["text"].splitlines()
    ranked = [line for line in lines if line[:2] in ("1.", "2.", "3.")]
    assert len(ranked) == 3 and all(any(label in line for label in TEST_LABELS) for line in ranked)
    assert "parse_mode" not in answer.params  # plain text
    [[up, down]] = _buttons(answer)
    assert (up["text"], down["text"]) == ("👍", "👎")

    # The prediction knows which message carries its buttons.
    assert await bot.reply_message_ids(1) == [answer.result["message_id"]]
    [prediction] = bot.prediction_rows()
    assert prediction.message_id == str(photo["message_id"])

    query = fake.press_button(ana, answer.result, up["callback_data"])
    [answered] = await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
    assert answered.ok and answered.params["text"] == text("thanks_up", "en")
    [feedback] = bot.feedback_rows()
    assert (feedback.vote, feedback.correction) == ("up", None)
    assert (await bot.store.stats())["up"] == 1


async def test_thumbs_down_offers_the_other_candidates_and_records_the_correction(bot: Harness, worker: None) -> None:
    fake = bot.fake
    bia = fake.user(8, "Bia", language_code="pt-BR")
    chat = fake.private_chat(bia)
    photo = fake.send_photo(chat, bia, three_sizes(2))
    [answer] = await bot.reply_to(photo)
    [[_, down]] = _buttons(answer)
    top3 = [line.split(" — ")[0][3:] for line in answer.params["text"].splitlines() if line[:2] in ("1.", "2.", "3.")]

    # 👎: a notice, and a question offering the two other candidates and "another model".
    query = fake.press_button(bia, answer.result, down["callback_data"])
    [answered] = await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
    assert answered.params["text"] == text("thanks_down", "pt")
    [question] = await fake.wait_for("sendMessage", lambda call: call.params["text"] == text("which_model", "pt"))
    choices = [row[0] for row in _buttons(question)]
    assert [button["text"] for button in choices[:-1]] == top3[1:]
    assert choices[-1]["text"] == text("another_model", "pt")

    # "Another model…": the person is asked to type it, as a reply the bot will see.
    query = fake.press_button(bia, question.result, choices[-1]["callback_data"])
    [ask] = await fake.wait_for("sendMessage", lambda call: "force_reply" in (call.params.get("reply_markup") or {}))
    await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
    typed = fake.send_text(chat, bia, TEST_LABELS[4].lower(), reply_to=_sent(fake, ask))
    [done] = await bot.reply_to(typed)
    assert done.params["text"] == text("corrected", "pt", label=TEST_LABELS[4])
    [feedback] = bot.feedback_rows()
    assert (feedback.vote, feedback.correction) == ("down", TEST_LABELS[4])

    # Choosing a candidate instead: the question is edited into a thank-you, the correction replaced.
    query = fake.press_button(bia, question.result, choices[0]["callback_data"])
    [edit] = await fake.wait_for("editMessageText")
    assert edit.params["message_id"] == question.result["message_id"]
    assert edit.params["text"] == text("corrected", "pt", label=top3[1])
    assert "reply_markup" not in _sent(fake, question)  # the buttons are gone
    await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
    [feedback] = bot.feedback_rows()
    assert (feedback.vote, feedback.correction) == ("down", top3[1])
    stats = await bot.store.stats()
    assert (stats["down"], stats["corrections"]) == (1, 1)


async def test_top3_as_a_reply_as_a_caption_and_alone(bot: Harness, worker: None) -> None:
    fake = bot.fake
    ana, caio = fake.user(7, "Ana"), fake.user(9, "Caio")
    group = fake.group_chat(-100, "Cars")

    # /top3 alone before any photo: nothing to look at yet.
    first = fake.send_text(group, ana, "/top3")
    [nothing] = await bot.reply_to(first)
    assert nothing.params["text"] == text("no_photo_yet", "en")

    # A photo captioned /top3@bot is answered; so is /top3 in reply to a photo, and /top3 alone then.
    captioned = fake.send_photo(group, ana, three_sizes(3), caption="/top3@carbot_test_bot")
    [by_caption] = await bot.reply_to(captioned)
    replying = fake.send_text(group, caio, "/top3", reply_to=captioned)
    [by_reply] = await bot.reply_to(replying)
    alone = fake.send_text(group, caio, "/top3")
    [by_last] = await bot.reply_to(alone)
    for answer in (by_caption, by_reply, by_last):
        assert answer.params["text"].splitlines()[1].startswith("1. ")
        assert _buttons(answer)[0][0]["text"] == "👍"
    # Same photo three times, the same top-3 each time.
    assert by_caption.params["text"] == by_reply.params["text"] == by_last.params["text"]
    assert len(bot.prediction_rows()) == 3
    # The replied-to photo was downloaded again; /top3 alone used the remembered bytes.
    assert len(fake.downloads) == 2
    # Caio only asked about Ana's photo: both his answers are recorded as about her photo, for her /forget.
    with Session(bot.store.engine) as session:
        ids = {person.platform_user_id: person.id for person in session.exec(select(db.Person))}
    recorded = sorted((row.person_id, row.photo_sender_id or 0) for row in bot.prediction_rows())
    assert recorded == sorted([(ids["7"], 0), (ids["9"], ids["7"]), (ids["9"], ids["7"])])

    # 👎 in a group: the question goes to the photo's sender, whose typed answer comes back as a reply.
    [[_, down]] = _buttons(by_caption)
    fake.press_button(ana, by_caption.result, down["callback_data"])
    [question] = await fake.wait_for("sendMessage", lambda call: call.params["text"] == text("which_model", "en"))
    assert question.params["reply_parameters"]["message_id"] == captioned["message_id"]
    fake.press_button(ana, question.result, _buttons(question)[-1][0]["callback_data"])
    [ask] = await fake.wait_for("sendMessage", lambda call: "force_reply" in (call.params.get("reply_markup") or {}))
    assert ask.params["reply_markup"] == {"force_reply": True, "selective": True}
    typed = fake.send_text(group, ana, TEST_LABELS[0], reply_to=_sent(fake, ask))
    [done] = await bot.reply_to(typed)
    assert done.params["text"] == text("corrected", "en", label=TEST_LABELS[0])

    # A command for another bot in the group is none of ours.
    other = fake.send_text(group, caio, "/top3@some_other_bot")
    fake.send_text(group, caio, "/help")
    await fake.wait_for("sendMessage", lambda call: call.params["text"].startswith("🚗 Send me"))
    assert not fake.calls_to("sendMessage", lambda call: _replies_to(call, other))


async def test_a_photo_over_the_rate_limit_is_refused_before_it_is_downloaded(bot: Harness) -> None:
    """A flood costs the bot no downloads: the limit is counted first, the file fetched only if it passes."""
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)
    bot.conversation.limiter.per_minute = 0  # every photo is over the limit
    photo = fake.send_photo(chat, ana, three_sizes(6))
    [answer] = await bot.reply_to(photo)
    assert answer.params["text"] == text("rate_limited", "en", per_minute=0)
    assert not fake.calls_to("getFile") and fake.downloads == []
    assert bot.prediction_rows() == []


async def test_album_photos_are_answered_one_by_one(bot: Harness, worker: None) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)
    group_id = fake.new_media_group_id()
    photos = [fake.send_photo(chat, ana, three_sizes(seed), media_group_id=group_id) for seed in (4, 5)]
    answers = [(await bot.reply_to(photo))[0] for photo in photos]
    assert sorted(await bot.reply_message_ids(2)) == sorted(answer.result["message_id"] for answer in answers)


# -- what is not a car photo -----------------------------------------------------------------------------------------


async def test_hints_for_stickers_text_and_other_files(bot: Harness) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)
    group = fake.group_chat(-200, "Chatter")

    # In a group, stickers and chatter among people get no answer.
    quiet = [fake.send_sticker(group, ana), fake.send_text(group, ana, "nice car!")]
    sticker = fake.send_sticker(chat, ana)
    hello = fake.send_text(chat, ana, "hello")
    pdf = fake.send_document(chat, ana, b"%PDF-1.4", mime_type="application/pdf", file_name="car.pdf")
    assert (await bot.reply_to(sticker))[0].params["text"] == text("hint_sticker", "en")
    assert (await bot.reply_to(hello))[0].params["text"] == text("hint_text", "en")
    assert (await bot.reply_to(pdf))[0].params["text"] == text("hint_document", "en")
    assert not fake.calls_to("getFile")
    assert not [call for call in fake.calls_to("sendMessage") if any(_replies_to(call, m) for m in quiet)]


async def test_corrupt_and_oversized_image_files_get_a_friendly_answer(bot: Harness, worker: None) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)

    broken = fake.send_document(chat, ana, b"\xff\xd8\xff not really a jpeg", mime_type="image/jpeg", file_name="a.jpg")
    [answer] = await bot.reply_to(broken)
    assert answer.params["text"].startswith(text("photo_rejected", "en", reason=""))
    assert "reply_markup" not in answer.params

    # Telegram says it is 30 MB: refused before any download.
    huge = fake.send_document(chat, ana, b"\xff\xd8", mime_type="image/jpeg", file_name="b.jpg", file_size=30 * 2**20)
    [answer] = await bot.reply_to(huge)
    assert "20 MB" in answer.params["text"]
    assert [call.params["file_id"] for call in fake.calls_to("getFile")] == [broken["document"]["file_id"]]

    # An image sent as a file goes the photo's way.
    good = fake.send_document(chat, ana, jpeg_bytes(6), mime_type="image/jpeg", file_name="c.jpg")
    [answer] = await bot.reply_to(good)
    assert _buttons(answer)[0][0]["text"] == "👍"
    assert not bot.feedback_rows() and len(bot.prediction_rows()) == 1


async def test_an_image_sent_as_a_file_is_read_from_its_thumbnail_when_that_covers_the_input(
    bot: Harness, worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)

    # A photo sent as a file, with the thumbnail Telegram keeps of it: 64x48 covers the model's 32 px.
    thumb, original = jpeg_bytes(8, (64, 48)), jpeg_bytes(8, (640, 480))
    sent = fake.send_document(chat, ana, original, mime_type="image/jpeg", file_name="IMG_1.jpg",
                              thumbnail=(64, 48, thumb))  # fmt: skip
    classified = []
    classify = bot.conversation.classifier.classify

    async def spy(photo: bytes, **kwargs):
        classified.append(photo)
        return await classify(photo, **kwargs)

    monkeypatch.setattr(bot.conversation.classifier, "classify", spy)
    [answer] = await bot.reply_to(sent)
    assert _buttons(answer)[0][0]["text"] == "👍"
    assert classified == [thumb]  # the model reads the thumbnail...
    thumbnail, document = sent["document"]["thumbnail"], sent["document"]
    assert sorted(call.params["file_id"] for call in fake.calls_to("getFile")) == sorted(
        [thumbnail["file_id"], document["file_id"]]
    )
    [prediction] = bot.prediction_rows()
    assert prediction.photo_sha256 == photo_name(original)  # ...and the file as sent is kept for retraining
    assert bot.conversation.store.photos.get(photo_name(original)) == original

    # A thumbnail narrower than the input (24 px high): the file is what is read.
    narrow = fake.send_document(chat, ana, jpeg_bytes(9, (640, 360)), mime_type="image/jpeg", file_name="IMG_2.jpg",
                                thumbnail=(40, 24, jpeg_bytes(9, (40, 24))))  # fmt: skip
    [answer] = await bot.reply_to(narrow)
    assert _buttons(answer)[0][0]["text"] == "👍"
    assert fake.calls_to("getFile")[-1].params["file_id"] == narrow["document"]["file_id"]


async def test_forged_button_data_is_answered_and_records_nothing(bot: Harness) -> None:
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)
    old = fake.message(chat, fake.bot_user, text="an old answer")
    queries = [fake.press_button(ana, old, data) for data in ("v:999999:u", "c:999999:1", "garbage", "v:1:x")]
    answered = await fake.wait_for("answerCallbackQuery", count=len(queries))
    assert sorted(call.params["callback_query_id"] for call in answered) == sorted(queries)
    assert all(call.ok and call.params["text"] == text("stale", "en") for call in answered)
    assert not fake.calls_to("editMessageText") and not fake.calls_to("sendMessage")
    assert not bot.feedback_rows() and not bot.prediction_rows()


async def test_admin_commands(bot: Harness) -> None:
    fake = bot.fake
    ana, boss = fake.user(7, "Ana"), fake.user(ADMIN, "Boss")
    refused = fake.send_text(fake.private_chat(ana), ana, "/stats")
    [answer] = await bot.reply_to(refused)
    assert answer.params["text"] == text("not_admin", "en")

    stats = fake.send_text(fake.private_chat(boss), boss, "/stats")
    [answer] = await bot.reply_to(stats)
    assert answer.params["text"].startswith("📊 0 answers to 0 people")

    model = fake.send_text(fake.private_chat(boss), boss, "/model")
    [answer] = await bot.reply_to(model)
    assert "tiny-test" in answer.params["text"] and "32 px" in answer.params["text"]

    start = fake.send_text(fake.private_chat(ana), ana, "/start")
    [answer] = await bot.reply_to(start)
    assert f"I know {len(TEST_LABELS)} of them" in answer.params["text"]


async def test_errors_are_logged_without_the_token_and_the_bot_carries_on(
    bot: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = bot.fake
    ana = fake.user(7, "Ana")
    chat = fake.private_chat(ana)

    async def broken(*args: object) -> None:
        raise RuntimeError(f"the database is down (while using {TOKEN})")

    monkeypatch.setattr(bot.conversation, "command", broken)
    monkeypatch.setattr(bot.conversation, "button", broken)
    failing = fake.send_text(chat, ana, "/help")
    [answer] = await bot.reply_to(failing)
    assert answer.params["text"] == text("failed", "en")
    query = fake.press_button(ana, fake.message(chat, fake.bot_user, text="an answer"), "v:1:u")
    [answered] = await fake.wait_for("answerCallbackQuery", lambda call: call.params["callback_query_id"] == query)
    assert answered.params["text"] == text("failed", "en")

    monkeypatch.undo()
    working = fake.send_text(chat, ana, "/help")
    [answer] = await bot.reply_to(working)
    assert answer.params["text"].startswith("🚗 Send me")

    # A second application built while everything logs at DEBUG: its URLs and the token stay out of the logs.
    application = build_application(bot.settings, bot.conversation)
    async with application:
        assert (await application.bot.get_me()).username == fake.bot_user["username"]
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors and "<token>" in caplog.text
    assert TOKEN not in caplog.text


async def test_carbot_telegram_runs_polls_and_stops_cleanly(
    fake: FakeTelegram, redis_url: str, model_registry: Path, tmp_path: Path
) -> None:
    """`carbot -v telegram` as a process: migrates, registers its commands, answers, stops on SIGTERM, no token."""
    env = {
        **{name: value for name, value in os.environ.items() if not name.startswith(("CARBOT_", "DATABASE_URL"))},
        "REDIS_URL": redis_url,
        "TELEGRAM_TOKEN": TOKEN,
        "CARBOT_TELEGRAM_API_BASE_URL": fake.base_url,
        "CARBOT_TELEGRAM_FILE_BASE_URL": fake.base_file_url,
        "CARBOT_DATA_DIR": str(tmp_path / "data"),
        "CARBOT_MODEL_REGISTRY": str(model_registry),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carbot", "-v", "telegram",
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        await fake.wait_for("deleteWebhook", timeout=30)  # the last call before it long-polls
        assert [command["command"] for command in fake.commands] == ["top3", "help", "forget"]
        ana = fake.user(7, "Ana")
        hello = fake.send_text(fake.private_chat(ana), ana, "/start")
        [answer] = await fake.wait_for("sendMessage", lambda call: _replies_to(call, hello))
        assert answer.params["text"].startswith("🚗 Send me")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    log = output.decode(errors="replace")
    assert process.returncode == 0, log
    assert "Processing update" in log  # it did log at DEBUG...
    assert TOKEN not in log  # ...but never the token
    assert (tmp_path / "data" / "carbot.db").exists()

    # A token Telegram refuses: a clear message, and the token (which PTB's own error quotes) nowhere.
    wrong = "123:WRONG"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carbot", "telegram",
        env={**env, "TELEGRAM_TOKEN": wrong}, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    log = output.decode(errors="replace")
    assert process.returncode != 0
    assert "Telegram rejected TELEGRAM_TOKEN" in log and "<token>" in log
    assert wrong not in log


# -- pieces that need no bot -----------------------------------------------------------------------------------------


def test_pick_photo_size() -> None:
    sizes = [PhotoSize(f"f{w}", f"u{w}", w, h) for w, h in ((90, 67), (320, 240), (800, 600), (1280, 960))]
    assert pick_photo_size(sizes, 224).file_id == "f320"
    assert pick_photo_size(sizes, 32).file_id == "f90"
    assert pick_photo_size(sizes, 2000).file_id == "f1280"  # nothing covers it: the largest
    portrait = [PhotoSize("a", "a", 240, 320), PhotoSize("b", "b", 200, 500)]
    assert pick_photo_size(portrait, 224).file_id == "a"


def test_webhook_secret_is_derived_and_hides_the_token() -> None:
    secret = webhook_secret(TOKEN)
    assert secret == webhook_secret(TOKEN) != webhook_secret("123:OTHER")
    assert TOKEN not in secret and len(secret) == 64 and secret.isalnum()


async def test_fake_server_refuses_what_telegram_refuses(fake: FakeTelegram) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fake.port}") as client:
        wrong = await client.post("/bot999:WRONG/getMe")
        assert wrong.status_code == 401 and wrong.json()["ok"] is False
        unknown = await client.post(f"/bot{TOKEN}/sendDice", data={"chat_id": "1"})
        assert unknown.status_code == 404
        stale = await client.post(f"/bot{TOKEN}/answerCallbackQuery", data={"callback_query_id": "nope"})
        assert "query is too old" in stale.json()["description"]
        long_data = '{"inline_keyboard": [[{"text": "x", "callback_data": "%s"}]]}' % ("x" * 65)
        sent = await client.post(
            f"/bot{TOKEN}/sendMessage", data={"chat_id": "1", "text": "hi", "reply_markup": long_data}
        )
        assert sent.json()["description"] == "Bad Request: BUTTON_DATA_INVALID"
        ok = await client.post(f"/bot{TOKEN}/sendMessage", json={"chat_id": 1, "text": "hi"})
        message = ok.json()["result"]
        same = await client.post(
            f"/bot{TOKEN}/editMessageText", data={"chat_id": "1", "message_id": message["message_id"], "text": "hi"}
        )
        assert "message is not modified" in same.json()["description"]
        # Uploads come as multipart/form-data.
        photo = await client.post(
            f"/bot{TOKEN}/sendPhoto", data={"chat_id": "1", "caption": "a report"}, files={"photo": ("r.jpg", b"JPEG")}
        )
        assert photo.json()["result"]["caption"] == "a report"
        assert fake.calls_to("sendPhoto")[0].params["photo"] == b"JPEG"
        # Long polling: an update pushed while getUpdates waits is returned at once.
        poll = asyncio.create_task(client.post(f"/bot{TOKEN}/getUpdates", data={"timeout": "5"}))
        await asyncio.sleep(0.1)
        message = fake.send_text(fake.private_chat(fake.user(5)), fake.user(5), "hello")
        result = (await asyncio.wait_for(poll, 2)).json()["result"]
        assert [item["message"]["message_id"] for item in result] == [message["message_id"]]


async def test_a_retrain_shows_as_one_progress_message_then_a_summary_with_buttons(
    bot: Harness, redis_url, tmp_path
) -> None:
    """The adapter's side of /retrain: the job's events (published as the train worker does) reach the admin."""
    import redis

    fake = bot.fake
    boss = fake.user(ADMIN, "Boss")
    chat = fake.private_chat(boss)
    await bot.conversation.retrain.subscribe("telegram")
    deliver = functools.partial(deliver_event, bot.application.bot, bot.conversation)
    following = asyncio.create_task(follow_retrains(bot.conversation.retrain, "telegram", deliver))
    try:
        [queued] = await bot.reply_to(fake.send_text(chat, boss, "/retrain"))
        assert queued.params["text"].startswith("🛠️ Retrain #1 queued")
        message_id = queued.result["message_id"]
        while await bot.conversation.retrain.progress_message(1) is None:  # the adapter records it after sending
            await asyncio.sleep(0.01)

        publisher, engine = redis.Redis.from_url(redis_url), bot.store.engine
        run = retrain_runs.get_run(engine, 1)
        for epoch in (1, 2):
            progress = {"epoch": epoch, "epochs": 2, "loss": 0.5 / epoch, "accuracy": 0.6 + epoch / 10, "eta_s": 60}
            retrain_runs.publish(publisher, retrain_runs.RunEvent.for_run(run, "progress", **progress))
        edits = await fake.wait_for("editMessageText", lambda call: call.params["message_id"] == message_id, count=2)
        assert "epoch 2/2" in edits[-1].params["text"] and "accuracy 80%" in edits[-1].params["text"]

        # The gate rejected the candidate: the summary comes with the report picture and the two decisions.
        metrics = {"overall_accuracy": 0.8, "overall_n": 50, "feedback_accuracy": 0.5, "feedback_n": 10}
        retrain_runs.update_run(engine, 1, status="rejected", reason="not_better_on_feedback", base_version="tiny-test",
                              candidate_version="r1-test", active_metrics=metrics, candidate_metrics=metrics,
                              duration_s=120.0, counts={"feedback_train": 40, "feedback_holdout": 10})  # fmt: skip
        # The picture is found from the run's candidate version, in the registry (events carry no paths).
        picture = bot.settings.registry_dir / "r1-test" / retrain_runs.REPORT_IMAGE
        picture.parent.mkdir()
        picture.write_bytes(jpeg_bytes(1))
        try:
            retrain_runs.publish(publisher, retrain_runs.RunEvent.for_run(run, "finished"))
            [photo] = await fake.wait_for("sendPhoto")
        finally:  # the registry is the session's
            shutil.rmtree(picture.parent)
        assert photo.params["photo"] == jpeg_bytes(1)
        [summary] = await fake.wait_for("sendMessage", lambda call: "not promoted" in call.params["text"])
        assert str(photo.params["chat_id"]) == str(summary.params["chat_id"]) == str(boss["id"])
        assert "not better on the held-out feedback" in summary.params["text"]
        buttons = [b["callback_data"] for row in summary.result["reply_markup"]["inline_keyboard"] for b in row]
        assert buttons == ["r:1:p", "r:1:x"]
        done = fake.calls_to("editMessageText", lambda call: call.params["message_id"] == message_id)[-1]
        assert done.params["text"] == "✅ Retrain #1 finished in 2 min."

        # The train worker carries out the admin's decision (the bot never writes the registry).
        with train_worker_running(redis_url, bot.settings.registry_dir, f"sqlite:///{tmp_path}/db.sqlite", tmp_path):
            fake.press_button(boss, summary.result, "r:1:x")
            [answered] = await fake.wait_for(
                "answerCallbackQuery", lambda call: "discarded" in call.params.get("text", ""), timeout=60
            )
        assert retrain_runs.get_run(engine, 1).status == "discarded"
    finally:
        following.cancel()
