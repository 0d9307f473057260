"""The Discord adapter through discord.py's own event path, on the real conversation.

dpytest (`discord.ext.test`) plays Discord's gateway and REST API for messages: a
message it fakes is parsed by the client and reaches `on_message`, and what the bot
sends lands in dpytest's queue. dpytest 0.7 knows nothing of interactions, so
`FakeInteractions` plays that part of Discord: tests hand the client's parser raw
INTERACTION_CREATE payloads, as the gateway would (slash commands, the context menu,
button presses, select-menu choices, modal submissions), and the interaction callback
and webhook endpoints are served by recording what the bot answers. What is recorded is
each HTTP request discord.py's `InteractionResponse`, `edit_original_response` and
`followup` make, in the order they make them, and the messages Discord would make of
them (a "thinking…" deferral is a message its first edit or follow-up fills in).

Discord shows "This interaction failed" unless an interaction is acknowledged within 3 s.
`StuckDatabase` holds the store up (a real SQLite write lock, and its reads held) and
`answered_around` shows what was answered before it was released and what after: the
acknowledgement must come first, whatever the slow part. Orderings, not timings.

Behind the bot everything is real: the conversation, Redis, a worker process with
the tiny test model, and the store on SQLite.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from urllib.request import url2pathname

import pytest
import redis.asyncio as aioredis
import sqlalchemy
from PIL import Image, ImageOps
from pydantic import SecretStr

from bots import Conversation, Store
from bots._messages import Button, Guesses, Reply
from bots._texts import TEXTS
from carbot import keys
from carbot.photos import PhotoStore, photo_name
from carbot.settings import Settings
from tests.conftest import TEST_LABELS, jpeg_bytes, train_worker_running
from worker import Candidate, ClassifyClient

# discord.py and dpytest are the Discord bot's own dependencies, not the core's.
discord = pytest.importorskip("discord", minversion="2.7")
dpytest = pytest.importorskip("discord.ext.test", minversion="0.7")
from discord.ext.test import backend  # noqa: E402
from discord.ext.test import factories as facts  # noqa: E402
from discord.webhook.async_ import AsyncWebhookAdapter  # noqa: E402

import bots._discord  # noqa: E402
from bots._discord import CarBot, build_bot, read_attachment, render, run_discord  # noqa: E402

EN, PT = TEXTS["en"], TEXTS["pt"]
ADMIN_ID = 1  # settings.admin_ids = ["discord:1"]
EPHEMERAL = 64  # message flag
# Interaction types and callback types, as Discord numbers them.
COMMAND, COMPONENT, MODAL_SUBMIT = 2, 3, 5
MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, MODAL = 4, 5, 6, 7, 9


# -- Discord's interaction endpoints, played by the test -------------------------------------------------------


@dataclass
class Answer:
    """Something the bot sent through the interaction endpoints."""

    kind: str  # "callback" (the interaction's response), "edit" (of the original response) or "followup"
    type: int | None  # a callback's type: MESSAGE, DEFERRED_MESSAGE, DEFERRED_UPDATE, UPDATE_MESSAGE, MODAL
    body: dict  # the message fields (content, embeds, components, flags), or the modal
    message: dict | None = None  # the message Discord would have created or edited, as a gateway payload

    @property
    def ephemeral(self) -> bool:
        # Discord keeps a message's ephemerality when it is edited: the message's flags say it, where there is one.
        flags = self.message["flags"] if self.message is not None else self.body.get("flags")
        return bool(int(flags or 0) & EPHEMERAL)

    @property
    def content(self) -> str:
        return self.body.get("content") or ""

    @property
    def embeds(self) -> list[discord.Embed]:
        return [discord.Embed.from_dict(embed) for embed in self.body.get("embeds") or []]

    @property
    def components(self) -> list[dict]:
        """The interactive components (buttons, select menus, text inputs), flattened."""
        return list(_walk(self.body.get("components") or []))


@dataclass
class _Exchange:
    """One interaction as Discord's side sees it."""

    channel: Any
    author: Any  # the bot's user
    original: dict | None  # the message "@original" names: the response's, or the message of a pressed component
    thinking: bool = False  # deferred with "thinking…" and not answered yet


@dataclass
class FakeInteractions:
    """INTERACTION_CREATE payloads in; the bot's callbacks, edits and follow-ups recorded, as Discord treats them."""

    answers: list[Answer] = field(default_factory=list)
    sent: dict[int, dict] = field(default_factory=dict)  # channel messages' payloads by id (dpytest drops some fields)
    _exchanges: dict[str, _Exchange] = field(default_factory=dict)  # by interaction token
    _ids: itertools.count = field(default_factory=itertools.count)
    _answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def request(self, route, session, *, payload=None, multipart=None, **_: Any) -> Any:
        """Stands in for `AsyncWebhookAdapter.request`: the HTTP call to Discord's interaction endpoints."""
        body = payload or {}
        exchange = self._exchanges[route.webhook_token]
        if route.path.endswith("/callback"):
            inner = body.get("data") or {}
            answer = Answer("callback", body["type"], inner)
            if body["type"] in (MESSAGE, DEFERRED_MESSAGE):  # a message; while deferred, it says "thinking…"
                answer.message = exchange.original = self._message(exchange, inner)
                exchange.thinking = body["type"] == DEFERRED_MESSAGE
            elif body["type"] == UPDATE_MESSAGE:
                answer.message = exchange.original = self._edited(exchange, inner)
            self._record(answer)
            message_id = answer.message["id"] if answer.message else None
            return {"interaction": {"id": str(route.webhook_id), "type": 0, "response_message_id": message_id}}
        if route.method == "PATCH" and route.path.endswith("/messages/@original"):
            assert exchange.original is not None, "the bot edited an original response that does not exist"
            exchange.original, exchange.thinking = self._edited(exchange, body), False
            self._record(Answer("edit", None, body, exchange.original))
            return exchange.original
        if route.method == "POST":  # a follow-up message
            if exchange.thinking:
                # Discord's rule: the first follow-up after a "thinking…" deferral becomes that message, which
                # keeps its ephemerality (the follow-up's flags are ignored).
                exchange.original, exchange.thinking = self._edited(exchange, body), False
                answer = Answer("followup", None, body, exchange.original)
            else:
                answer = Answer("followup", None, body, self._message(exchange, body))
            self._record(answer)
            return answer.message
        raise AssertionError(f"the bot called {route.method} {route.path}, which this test does not serve")

    def _record(self, answer: Answer) -> None:
        self.answers.append(answer)
        self._answered.set()

    async def answered(self, count: int) -> None:
        """Until `count` answers have been recorded in all."""
        while len(self.answers) < count:
            self._answered.clear()
            await self._answered.wait()

    def _message(self, exchange: _Exchange, body: dict) -> dict:
        embeds = [discord.Embed.from_dict(embed) for embed in body.get("embeds") or []]
        data = facts.make_message_dict(exchange.channel, exchange.author, content=body.get("content"), embeds=embeds)
        return {**data, "components": body.get("components") or [], "flags": int(body.get("flags") or 0)}

    def _edited(self, exchange: _Exchange, body: dict) -> dict:
        fields = {name: body[name] for name in ("content", "embeds", "components") if name in body}
        return {**exchange.original, **fields}

    def start(self, bot, kind: int, data: dict, *, user, channel, message=None, locale="en-US") -> set[asyncio.Task]:
        """Deliver one interaction to the client's gateway parser; returns the tasks that handle it."""
        token = f"token-{next(self._ids)}"
        self._exchanges[token] = _Exchange(channel, bot.user, message)
        payload = {
            "id": str(facts.make_id()),
            "application_id": str(bot.user.id),
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "attachment_size_limit": 10 * 2**20,
            "app_permissions": "0",
            "entitlements": [],
            "channel_id": str(channel.id),
            "channel": {"id": str(channel.id), "type": channel.type.value},
        }
        if isinstance(channel, discord.abc.GuildChannel):
            payload["guild_id"] = str(channel.guild.id)
            payload["member"] = {
                "user": facts.dict_from_user(user),
                "roles": [],
                "joined_at": None,
                "flags": 0,
                "permissions": "0",
            }
        else:
            payload["channel"]["recipients"] = [facts.dict_from_user(user)]
            payload["user"] = facts.dict_from_user(user)
        if message is not None:
            payload["message"] = message
        before = asyncio.all_tasks()
        bot._connection.parse_interaction_create(payload)
        # The command tree, dynamic items and `on_interaction` each handle the interaction in a task of their own.
        return asyncio.all_tasks() - before

    async def send(self, bot, kind: int, data: dict, **kwargs: Any) -> list[Answer]:
        """Deliver one interaction and wait until it is handled; returns what the bot answered to it."""
        seen = len(self.answers)
        await asyncio.wait_for(asyncio.gather(*self.start(bot, kind, data, **kwargs)), timeout=60)
        await dpytest.run_all_events()
        return self.answers[seen:]

    async def command(self, bot, name: str, *, user, channel, options=(), resolved=None, locale="en-US"):
        return await self.send(bot, COMMAND, command_data(name, options, resolved), user=user, channel=channel,
                               locale=locale)  # fmt: skip

    async def press(self, bot, message: dict, custom_id: str, *, user, channel, values=None, locale="en-US"):
        """Click a button (or choose `values` in a select menu) of `message`, a message payload."""
        data = press_data(custom_id, values)
        return await self.send(bot, COMPONENT, data, user=user, channel=channel, message=message, locale=locale)

    async def submit(self, bot, modal: dict, typed: str, *, user, channel, locale="en-US"):
        """Fill the modal's text input with `typed` and submit it."""
        return await self.send(bot, MODAL_SUBMIT, submit_data(modal, typed), user=user, channel=channel, locale=locale)


def command_data(name: str, options=(), resolved=None) -> dict:
    data = {"id": str(facts.make_id()), "name": name, "type": 1, "options": list(options)}
    if resolved:
        data["resolved"] = resolved
    return data


def press_data(custom_id: str, values=None) -> dict:
    data = {"custom_id": custom_id, "component_type": 3 if values else 2}
    if values:
        data["values"] = values
    return data


def submit_data(modal: dict, typed: str) -> dict:
    return {"custom_id": modal["custom_id"], "components": _filled(modal["components"], typed)}


def _walk(components: list[dict]):
    for component in components:
        if "custom_id" in component:
            yield component
        yield from _walk(component.get("components") or [])
        if "component" in component:
            yield from _walk([component["component"]])


def _filled(components: list[dict], typed: str) -> list[dict]:
    out = []
    for component in components:
        component = dict(component)
        if component.get("type") == 4:  # a text input
            component["value"] = typed
        if "components" in component:
            component["components"] = _filled(component["components"], typed)
        if "component" in component:
            component["component"] = _filled([component["component"]], typed)[0]
        out.append(component)
    return out


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def settings(model_registry, tmp_path) -> Settings:
    return Settings(model_registry=model_registry, data_dir=tmp_path, admin_ids=[f"discord:{ADMIN_ID}"])


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/db.sqlite"


@pytest.fixture
async def conversation(settings, redis_url, database_url, tmp_path):
    store = Store(database_url, PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    async with ClassifyClient.from_settings(settings, redis_url) as client:
        yield Conversation(classifier=client, store=store, redis=connection, settings=settings)
    await connection.aclose()
    await store.close()


@pytest.fixture
def discord_api(monkeypatch) -> FakeInteractions:
    """Discord's interaction endpoints, and dpytest's message endpoint made to keep components."""
    api = FakeInteractions()
    monkeypatch.setattr(AsyncWebhookAdapter, "request", lambda adapter, *args, **kwargs: api.request(*args, **kwargs))
    original = backend.FakeHttp.send_message

    async def send_message(http, channel_id, *, params):
        # dpytest finds the channel in its caller's frame, so this wrapper keeps it in a local of that name.
        channel = sys._getframe(1).f_locals["channel"]  # noqa: F841
        data = await original(http, channel_id, params=params)
        api.sent[data["id"]] = params.payload or {}
        components = api.sent[data["id"]].get("components") or []
        raw_message(channel_id, data["id"])["components"] = components
        http.state._get_message(data["id"])._handle_components(components)
        return data

    monkeypatch.setattr(backend.FakeHttp, "send_message", send_message)
    return api


async def start_bot(settings: Settings, conversation: Conversation, monkeypatch) -> tuple[Any, list]:
    """A bot configured in dpytest, with `setup_hook` run as at login; returns it and its command syncs."""
    bot = build_bot(settings, conversation)
    # dpytest keeps its fake members in the member cache, which needs the (privileged) members intent the bot
    # itself does without.
    bot._connection._intents.members = True
    bot._connection.member_cache_flags = discord.MemberCacheFlags.from_intents(bot._connection._intents)
    dpytest.configure(bot, members=["alice", "bruno"])
    await bot._async_setup_hook()  # what login() does first: bind the client (and dpytest's state) to the loop
    bot._connection._command_tree = bot.tree  # dpytest replaced the connection state the tree registered with
    synced: list = []

    async def sync(*, guild=None):
        synced.append(guild)
        return []

    monkeypatch.setattr(bot.tree, "sync", sync)
    await bot.setup_hook()
    return bot, synced


@pytest.fixture
async def bot(settings, conversation, discord_api, monkeypatch):
    bot, _ = await start_bot(settings, conversation, monkeypatch)
    yield bot
    await dpytest.empty_queue()


def raw_message(channel_id: int, message_id: int) -> dict:
    """The gateway payload of a message dpytest holds (what an interaction on it carries)."""
    return next(m for m in backend._cur_config.messages[channel_id] if m["id"] == message_id)


def photo_file(tmp_path: Path, name: str = "car.jpg", seed: int = 1) -> Path:
    path = tmp_path / name
    path.write_bytes(jpeg_bytes(seed))
    return path


def attachment_payload(path: Path, content_type: str) -> dict:
    return facts.make_attachment_dict(path.name, path.stat().st_size, str(path), str(path), content_type=content_type)


def feedback(database_url: str) -> list[tuple]:
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sqlalchemy.text(
                "SELECT f.prediction_id, p.platform, p.platform_user_id, f.vote, f.correction"
                " FROM feedback f JOIN people p ON p.id = f.person_id ORDER BY f.id")))  # fmt: skip
    finally:
        engine.dispose()


def reply_message_ids(database_url: str) -> dict[int, tuple]:
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sqlalchemy.text("SELECT id, message_id, reply_message_id FROM predictions"))
            return {row[0]: (row[1], row[2]) for row in rows}
    finally:
        engine.dispose()


def deferred_answer(answers: list[Answer]) -> Answer:
    """The answer to an interaction deferred with "thinking…": the deferral first, then that message edited."""
    deferred, answer = answers
    assert (deferred.type, answer.kind) == (DEFERRED_MESSAGE, "edit")
    assert answer.message["id"] == deferred.message["id"]
    return answer


def labels_in(text: str) -> list[str]:
    return [label for label in TEST_LABELS if label in text]


def custom_ids(components: list[dict]) -> list[str]:
    return [component["custom_id"] for component in components]


def assert_classification(embed: discord.Embed, components: list[dict]) -> int:
    """A top-3 answer with 👍/👎: returns its prediction id, read from the buttons."""
    assert embed.title == EN["header_sure"] or embed.title == EN["header_unsure"]
    assert len(labels_in(embed.description)) == 3 and "%" in embed.description and "▰" in embed.description
    assert "tiny-test" in embed.footer.text
    assert [c["label"] for c in components] == ["👍", "👎"]
    up, down = custom_ids(components)
    prediction_id = int(up.split(":")[2])
    assert (up, down) == (f"carbot:v:{prediction_id}:u", f"carbot:v:{prediction_id}:d")
    return prediction_id


class StuckDatabase:
    """The store's database stuck until `release()`, as behind a long transaction, a slow disk or a busy server.

    Another connection holds SQLite's write lock, so every write waits on it (in the store's threads, as it
    would in production, up to the conversation's patience and SQLite's busy timeout). Reads are not held by
    a writer in SQLite's write-ahead log, so the store's reads wait on an event until the release.
    """

    READS = ("get_prediction", "stats")

    def __init__(self, store: Store, database_url: str, monkeypatch) -> None:
        self._path = database_url.removeprefix("sqlite:///")
        self._lock: sqlite3.Connection | None = None
        self._open = asyncio.Event()
        self._open.set()
        self.held_reads = 0  # reads that had to wait
        for name in self.READS:
            monkeypatch.setattr(store, name, self._gated(getattr(store, name)))

    def _gated(self, read):
        async def gated(*args: Any, **kwargs: Any) -> Any:
            if not self._open.is_set():
                self.held_reads += 1
                await self._open.wait()
            return await read(*args, **kwargs)

        return gated

    def hold(self) -> StuckDatabase:
        self._lock = sqlite3.connect(self._path, isolation_level=None)
        self._lock.execute("BEGIN IMMEDIATE")
        self._open.clear()
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.execute("ROLLBACK")
            self._lock.close()
            self._lock = None
        self._open.set()


# How long a test waits for what a working bot does at once: a bound for a broken bot, not a measure of speed.
SAFETY_S = 60


async def answered_around(discord_api: FakeInteractions, tasks: set[asyncio.Task], release) -> tuple[list, list]:
    """What the bot answered to an interaction (handled by `tasks`) before `release()` was called, and after.

    The test waits for the first answer (or for the handlers to end) while the slow part is held, then releases
    it and waits for the rest: an interaction acknowledged at once shows its acknowledgement in the first list
    and its answer in the second.
    """
    seen = len(discord_api.answers)
    first = asyncio.ensure_future(discord_api.answered(seen + 1))
    try:
        await asyncio.wait({first, *tasks}, timeout=SAFETY_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        first.cancel()
    before = discord_api.answers[seen:]
    release()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=SAFETY_S)
    await dpytest.run_all_events()
    return before, discord_api.answers[seen + len(before) :]


def types(answers: list[Answer]) -> list[tuple[str, int | None]]:
    return [(answer.kind, answer.type) for answer in answers]


# -- tests -----------------------------------------------------------------------------------------------------


async def test_photo_in_a_dm_is_answered_and_buttons_record_votes_even_after_a_restart(
    bot, discord_api, start_worker, settings, conversation, database_url, tmp_path, monkeypatch
):
    start_worker()
    alice = dpytest.get_config().members[0]
    dm = await alice.create_dm()

    sent = await dpytest.message("", channel=dm, member=alice._user, attachments=[str(photo_file(tmp_path))])

    answer = dpytest.get_message()
    assert discord_api.sent[answer.id]["message_reference"]["message_id"] == sent.id
    components = [c.to_dict() for row in answer.components for c in row.children]
    prediction_id = assert_classification(answer.embeds[0], components)
    assert reply_message_ids(database_url)[prediction_id] == (str(sent.id), str(answer.id))
    message = raw_message(dm.id, answer.id)

    # 👍: acknowledged at once, then an ephemeral thank-you, and the vote in SQL.
    deferred, thanks = await discord_api.press(bot, message, f"carbot:v:{prediction_id}:u", user=alice, channel=dm)
    assert deferred.type == DEFERRED_UPDATE
    assert (thanks.kind, thanks.content, thanks.ephemeral) == ("followup", EN["thanks_up"], True)
    assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "up", None)]

    # 👎: one ephemeral message asking which model, with a select menu of the other candidates.
    _, question = await discord_api.press(bot, message, f"carbot:v:{prediction_id}:d", user=alice, channel=dm)
    assert (question.kind, question.content, question.ephemeral) == ("followup", EN["thanks_down"], True)
    menu, another = question.components
    assert menu["type"] == 3 and menu["custom_id"].startswith("carbot-select:")
    assert labels_in(" ".join(option["label"] for option in menu["options"])) == labels_in(
        "\n".join(answer.embeds[0].description.splitlines()[1:])
    )
    assert (another["label"], another["custom_id"]) == (EN["another_model"], f"carbot:c:{prediction_id}:x")

    # Choosing a model in the menu replaces the question with the thanks, and records the correction.
    option = menu["options"][0]
    deferred, done = await discord_api.press(
        bot, question.message, menu["custom_id"], values=[option["value"]], user=alice, channel=dm
    )
    assert deferred.type == DEFERRED_UPDATE
    assert (done.kind, done.content, done.components, done.message["id"]) == (
        "edit",
        EN["corrected"].format(label=option["label"]),
        [],
        question.message["id"],
    )
    assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "down", option["label"])]

    # "Another model…" opens a modal; what is typed there is matched against the labels.
    [modal] = await discord_api.press(bot, question.message, another["custom_id"], user=alice, channel=dm)
    assert modal.type == MODAL and [c["type"] for c in modal.components] == [4]
    prompts = [c["content"] for c in modal.body["components"] if c["type"] == 10]  # text displays
    assert prompts == [EN["type_model"].format(example=TEST_LABELS[0])]
    deferred, typed = await discord_api.submit(bot, modal.body, "fiat  argo", user=alice, channel=dm)
    assert (deferred.type, deferred.ephemeral) == (DEFERRED_MESSAGE, True)
    assert (typed.kind, typed.content, typed.ephemeral) == ("edit", EN["corrected"].format(label="FIAT ARGO"), True)
    assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "down", "FIAT ARGO")]

    # A new process that never saw the message still handles its buttons (and answers in the presser's language).
    restarted, _ = await start_bot(settings, conversation, monkeypatch)
    _, again = await discord_api.press(
        restarted, message, f"carbot:v:{prediction_id}:u", user=alice, channel=dm, locale="pt-BR"
    )
    assert (again.content, again.ephemeral) == (PT["thanks_up"], True)
    assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "up", None)]
    # So is a modal opened before the restart: it carries its button's data, nothing is kept in memory.
    _, typed = await discord_api.submit(restarted, modal.body, "FIAT ARGO", user=alice, channel=dm)
    assert typed.content == EN["corrected"].format(label="FIAT ARGO")
    assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "down", "FIAT ARGO")]


async def test_photos_by_mention_slash_command_and_context_menu(bot, discord_api, start_worker, database_url, tmp_path):
    start_worker()
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]

    # A mention with two images: each gets its own answer.
    files = [str(photo_file(tmp_path, "a.jpg", 1)), str(photo_file(tmp_path, "b.png", 2))]
    mention = await dpytest.message(f"<@{bot.user.id}> what is this?", channel=channel, member=alice, attachments=files)
    for _ in files:
        answer = dpytest.get_message()
        assert answer.channel == channel
        assert discord_api.sent[answer.id]["message_reference"]["message_id"] == mention.id
        assert_classification(answer.embeds[0], [c.to_dict() for row in answer.components for c in row.children])

    # /top3 with a photo: deferred (classifying may take a while), then a public answer.
    path = photo_file(tmp_path, "c.jpg", 3)
    attachment = attachment_payload(path, "image/jpeg")
    options = [{"name": "photo", "type": 11, "value": attachment["id"]}]
    resolved = {"attachments": {attachment["id"]: attachment}}
    deferred, top3 = await discord_api.command(
        bot, "top3", options=options, resolved=resolved, user=alice, channel=channel
    )
    assert deferred.type == DEFERRED_MESSAGE
    assert top3.kind == "edit" and not top3.ephemeral and top3.message["id"] == deferred.message["id"]
    prediction_id = assert_classification(top3.embeds[0], top3.components)
    assert reply_message_ids(database_url)[prediction_id] == (None, str(top3.message["id"]))

    # /top3 alone: the last photo seen in this channel.
    _, last = await discord_api.command(bot, "top3", user=alice, channel=channel)
    assert_classification(last.embeds[0], last.components)

    # The "Identify car" context menu on the mention's message: its first image.
    target = raw_message(channel.id, mention.id)
    data = {"id": "1", "name": "Identify car", "type": 3, "target_id": str(mention.id),
            "resolved": {"messages": {str(mention.id): target}}}  # fmt: skip
    deferred, identified = await discord_api.send(bot, 2, data, user=alice, channel=channel)
    assert deferred.type == DEFERRED_MESSAGE and not identified.ephemeral
    prediction_id = assert_classification(identified.embeds[0], identified.components)
    assert reply_message_ids(database_url)[prediction_id] == (str(mention.id), str(identified.message["id"]))


class MediaProxy:
    """Discord's CDN as the bot meets it: a file by its address and, asked a `width` and `height`, a resized copy.

    dpytest serves an attachment's address as a file path; this serves the media proxy's side as Discord's
    apps see it (the picture turned upright, fitted into that box, saved as a JPEG), or, to play a proxy that does not
    do what the bot asked, one that "ignores" the size, one that "fails", or one that "turns" the photo
    (resizes it without its EXIF rotation).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.asked: list[dict[str, str]] = []  # the query of each resized copy asked for
        self.served: list[bytes] = []

    async def get_from_cdn(self, url: str) -> bytes:
        parts = urlsplit(url)
        data = Path(url2pathname(parts.path)).read_bytes()
        query = dict(parse_qsl(parts.query))
        if "width" not in query:
            return data
        self.asked.append(query)
        if self.mode == "fails":
            raise discord.NotFound(backend.FakeRequest(404, "Not Found"), "asset not found")
        if self.mode == "ignores":
            return data
        with Image.open(io.BytesIO(data)) as image:
            upright = image if self.mode == "turns" else ImageOps.exif_transpose(image)
            # Fitted into the box asked for, its shape kept.
            scale = min(int(query["width"]) / upright.width, int(query["height"]) / upright.height)
            copy = upright.convert("RGB").resize((round(upright.width * scale), round(upright.height * scale)))
        buffer = io.BytesIO()
        copy.save(buffer, "JPEG", quality=85)
        self.served.append(buffer.getvalue())
        return self.served[-1]


@pytest.mark.parametrize("proxy_mode", ["resizes", "ignores", "fails", "turns"])
async def test_a_large_photo_is_classified_from_a_resized_copy_and_its_original_is_kept(
    bot, discord_api, start_worker, conversation, tmp_path, monkeypatch, proxy_mode
):
    """A phone-size photo is fetched resized by Discord's media proxy for the model, and kept as sent.

    The proxy's resizing is not in Discord's API reference: a copy that is not what was asked for (the
    size ignored, a failed fetch, the photo turned on its side) is not used, and the original is classified.
    """
    start_worker()
    proxy = MediaProxy(proxy_mode)
    monkeypatch.setattr(backend.FakeHttp, "get_from_cdn", proxy.get_from_cdn)
    classified: list[tuple[bytes, str | None]] = []
    classify = conversation.classifier.classify

    async def spy(photo: bytes, **kwargs: Any):
        classified.append((photo, kwargs.get("original_name")))
        return await classify(photo, **kwargs)

    monkeypatch.setattr(conversation.classifier, "classify", spy)
    # A phone photo taken sideways: 640x480 pixels and an EXIF rotation that makes it 480x640 upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.effect_noise((640, 480), 60).convert("RGB").save(buffer, "JPEG", exif=exif)
    path = tmp_path / "phone.jpg"
    path.write_bytes(original := buffer.getvalue())
    attachment = facts.make_attachment_dict(path.name, len(original), str(path), f"{path}?ex=1&is=2&hm=abc",
                                            width=480, height=640, content_type="image/jpeg")  # fmt: skip
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]

    _, answer = await discord_api.command(
        bot, "top3", user=alice, channel=channel, options=[{"name": "photo", "type": 11, "value": attachment["id"]}],
        resolved={"attachments": {attachment["id"]: attachment}},
    )  # fmt: skip

    assert_classification(answer.embeds[0], answer.components)
    # Asked for the smallest copy that covers the 32 px input, with Discord's signature kept.
    assert proxy.asked == [{"ex": "1", "is": "2", "hm": "abc", "width": "32", "height": "43"}]
    name = photo_name(original)
    if proxy_mode == "resizes":
        assert classified == [(proxy.served[0], name)]
        # The queued copy is filed under the original's name, where /forget looks.
        copies = await conversation.redis.smembers(keys.photo_copies_key(name))
        assert copies == {(keys.PHOTO_KEY_PREFIX + photo_name(proxy.served[0])).encode()}
    else:
        assert classified == [(original, None)]
    # The photo store keeps the photo as it was sent, whichever was classified.
    assert conversation.store.photos.get(name) == original
    assert all(conversation.store.photos.get(photo_name(copy)) is None for copy in proxy.served)


async def test_a_photo_over_the_rate_limit_is_refused_before_it_is_downloaded(bot, tmp_path, monkeypatch):
    """A flood costs the bot no downloads: the limit is counted first, the attachment fetched only if it passes."""
    alice = dpytest.get_config().members[0]
    dm = await alice.create_dm()
    downloads = []

    async def counted(attachment, limit):
        downloads.append(attachment.filename)
        return await read_attachment(attachment, limit)

    monkeypatch.setattr(bots._discord, "read_attachment", counted)
    bot.conversation.limiter.per_minute = 0  # every photo is over the limit
    await dpytest.message("", channel=dm, member=alice._user, attachments=[str(photo_file(tmp_path))])
    assert dpytest.get_message().content == EN["rate_limited"].format(per_minute=0)
    assert downloads == []  # refused before its attachment was fetched


async def test_wrong_input_gets_a_hint(bot, discord_api, tmp_path):
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    dm = await alice.create_dm()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a car")

    await dpytest.message("", channel=dm, member=alice._user, attachments=[str(notes)])
    assert dpytest.get_message().content == EN["hint_document"]

    await dpytest.message(f"<@{bot.user.id}> hello", channel=channel, member=alice)
    assert dpytest.get_message().content == EN["hint_text"]

    sticker = facts.make_message_dict(channel, alice, content=f"<@{bot.user.id}>", mentions=[bot.user])
    sticker["sticker_items"] = [{"id": str(facts.make_id()), "name": "wave", "format_type": 1}]
    backend.get_state().parse_message_create(sticker)
    await dpytest.run_all_events()
    assert dpytest.get_message().content == EN["hint_sticker"]

    # In a channel, a photo without a mention is none of the bot's business.
    await dpytest.message("my car", channel=channel, member=alice, attachments=[str(photo_file(tmp_path))])
    assert dpytest.verify().message().nothing()

    attachment = attachment_payload(notes, "text/plain")
    [hint] = await discord_api.command(
        bot, "top3", user=alice, channel=channel, options=[{"name": "photo", "type": 11, "value": attachment["id"]}],
        resolved={"attachments": {attachment["id"]: attachment}},
    )  # fmt: skip
    assert (hint.type, hint.content, hint.ephemeral) == (MESSAGE, EN["hint_document"], True)

    text_only = await dpytest.message("just words", channel=dm, member=alice._user)
    await dpytest.empty_queue()
    data = {"id": "1", "name": "Identify car", "type": 3, "target_id": str(text_only.id),
            "resolved": {"messages": {str(text_only.id): raw_message(dm.id, text_only.id)}}}  # fmt: skip
    [hint] = await discord_api.send(bot, 2, data, user=alice, channel=dm)
    assert (hint.content, hint.ephemeral) == (EN["hint_text"], True)


async def test_commands_and_admin_only_ones(bot, discord_api):
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    admin = backend.make_user("admin", "0001", id_num=ADMIN_ID)
    admin_dm = await admin.create_dm()

    refused = deferred_answer(await discord_api.command(bot, "stats", user=alice, channel=channel))
    assert (refused.content, refused.ephemeral) == (EN["not_admin"], True)
    refused = deferred_answer(await discord_api.command(bot, "model", user=alice, channel=channel, locale="pt-BR"))
    assert refused.content == PT["not_admin"]

    stats = deferred_answer(await discord_api.command(bot, "stats", user=admin, channel=admin_dm))
    assert stats.content.startswith("📊 0 ") and stats.ephemeral
    model = deferred_answer(await discord_api.command(bot, "model", user=admin, channel=admin_dm))
    assert "tiny-test" in model.content

    welcome = deferred_answer(await discord_api.command(bot, "help", user=alice, channel=channel))
    assert "/forget" in welcome.content and welcome.ephemeral
    forgotten = deferred_answer(await discord_api.command(bot, "forget", user=alice, channel=channel))
    assert forgotten.content == EN["forgotten"].format(predictions=0, votes=0, photos=0)

    # Admin commands are hidden from members without the Administrator permission.
    hidden = {command.name for command in bot.tree.get_commands() if command.default_permissions is not None}
    assert hidden == {"stats", "model", "retrain", "rollback"}
    assert all(bot.tree.get_command(name).default_permissions.administrator for name in hidden)


async def test_setup_hook_registers_persistent_items_and_syncs_to_the_guild_when_set(
    settings, conversation, monkeypatch
):
    bot, synced = await start_bot(settings, conversation, monkeypatch)
    templates = {pattern.pattern for pattern in bot._connection._view_store._dynamic_items}
    assert templates == {r"carbot:(?P<data>.+)", r"carbot-select:(?P<key>.+)"}
    assert synced == [None]  # global

    guild_bot, synced = await start_bot(
        settings.model_copy(update={"discord_guild_id": 1234}), conversation, monkeypatch
    )
    assert [guild.id for guild in synced] == [1234]
    names = {command.name for command in guild_bot.tree.get_commands(guild=discord.Object(1234))}
    assert {"top3", "help", "forget", "stats", "model", "retrain", "rollback"} <= names


def test_choices_become_select_menus_within_discord_limits():
    many = tuple((Button(f"MAKE {n} " + "X" * 120, f"c:123456789:{n}", choice=True),) for n in range(30))
    reply = Reply("Which one?", buttons=(*many, (Button("✏️ None of these", "c:123456789:x"),)))

    components = render(reply)["view"].to_components()

    first, second, other = components
    assert [len(row["components"][0]["options"]) for row in (first, second)] == [25, 5]
    assert all(len(option["label"]) <= 100 for row in (first, second) for option in row["components"][0]["options"])
    ids = [row["components"][0]["custom_id"] for row in components]
    assert len(set(ids)) == 3 and all(len(custom_id) <= 100 for custom_id in ids)
    assert other["components"][0]["custom_id"] == "carbot:c:123456789:x"


def test_the_embed_is_built_from_the_structured_answer_not_from_its_text():
    """A label with a line break or a "%" (or a header of two lines) still gives one line per candidate."""
    guesses = Guesses(
        "🚗 I think this is:\nreally",
        (Candidate("FIAT\nARGO 100%", 0.91), Candidate("VW GOL", 0.06), Candidate("50% ONIX", 0.03)),
        "model tiny-test · did I get it right?",
    )
    reply = Reply(guesses.as_text(), buttons=((Button("👍", "v:7:u"),),), prediction_id=7, guesses=guesses)

    embed = render(reply)["embed"]

    assert embed.title == "🚗 I think this is:\nreally" and embed.footer.text == guesses.footer
    lines = embed.description.splitlines()
    assert len(lines) == 3 and lines == guesses.candidate_lines()
    assert lines[0].startswith("1. FIAT ARGO 100% — 91% ") and lines[2].startswith("3. 50% ONIX — 3% ")
    assert render(reply, edit=True)["content"] is None


def test_run_discord_brings_up_redis_store_and_conversation(settings, redis_url, monkeypatch):
    started = {}

    async def start(bot, token, *, reconnect=True):  # instead of connecting to Discord
        conversation = bot.conversation
        started.update(token=token, conversation=conversation, redis=await conversation.redis.ping())
        started["stats"] = await conversation.store.stats()

    monkeypatch.setattr(CarBot, "start", start)
    run_discord(settings.model_copy(update={"redis_url": redis_url, "discord_token": SecretStr("the-token")}))

    assert started["token"] == "the-token" and isinstance(started["conversation"], Conversation)
    assert started["redis"] is True and started["stats"]["predictions"] == 0


async def test_a_retrain_is_a_channel_message_kept_up_to_date_then_a_summary(
    settings, redis_url, database_url, tmp_path, discord_api, monkeypatch
):
    """The adapter's side of /retrain: the job's events (published as the train worker does) reach the admin.

    dpytest cannot edit a message created by an interaction response, so the edit of the progress message
    fails here: the summary must arrive all the same.
    """
    import redis

    from bots._retrain_desk import RetrainDesk
    from carbot import retrain_runs

    store = Store(database_url, PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    desk = RetrainDesk(redis_url, settings, store.engine)
    connection = aioredis.Redis.from_url(redis_url)
    async with ClassifyClient.from_settings(settings, redis_url) as client:
        conversation = Conversation(classifier=client, store=store, redis=connection, settings=settings, retrain=desk)
        await desk.subscribe("discord")
        bot, _ = await start_bot(settings, conversation, monkeypatch)  # its setup hook follows the retrain events
        try:
            channel = dpytest.get_config().channels[0]
            admin = backend.make_user("admin", "0001", id_num=ADMIN_ID)
            queued = deferred_answer(await discord_api.command(bot, "retrain", user=admin, channel=channel))
            # Not ephemeral: the bot edits it for as long as the run takes.
            assert queued.content.startswith("🛠️ Retrain #1 queued") and not queued.ephemeral
            assert await desk.progress_message(1) == f"{channel.id}:{queued.message['id']}"

            # The gate rejected the candidate: the summary is a new channel message with the two decisions.
            engine, publisher = store.engine, redis.Redis.from_url(redis_url)
            metrics = {"overall_accuracy": 0.8, "overall_n": 50, "feedback_accuracy": 0.5, "feedback_n": 10}
            retrain_runs.update_run(engine, 1, status="rejected", reason="worse_overall", base_version="tiny-test",
                                  candidate_version="r1-test", active_metrics=metrics, candidate_metrics=metrics,
                                  duration_s=60.0)  # fmt: skip
            retrain_runs.publish(publisher, retrain_runs.RunEvent.for_run(retrain_runs.get_run(engine, 1), "finished"))
            for _ in range(500):
                summary = next((m for m in backend._cur_config.messages.get(channel.id, [])
                                if "not promoted" in (m.get("content") or "")), None)  # fmt: skip
                if summary is not None:
                    break
                await asyncio.sleep(0.02)
            assert summary is not None, "the summary never reached the channel"
            assert "worse overall" in summary["content"]
            custom_ids = [c["custom_id"] for c in _walk(discord_api.sent[summary["id"]].get("components") or [])]
            assert custom_ids == ["carbot:r:1:p", "carbot:r:1:x"]
        finally:
            bot.retrain_follower.cancel()
            await dpytest.empty_queue()
    await desk.aclose()
    await connection.aclose()
    await store.close()


async def test_commands_are_acknowledged_before_the_database_or_the_retrain_lock_answers(
    bot, discord_api, conversation, settings, redis_url, database_url, monkeypatch
):
    """Discord shows "This interaction failed" to a command not acknowledged within 3 s; these wait far longer."""
    from bots._retrain_desk import RetrainDesk
    from carbot import retrain_runs

    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    admin = backend.make_user("admin", "0001", id_num=ADMIN_ID)
    conversation.retrain = desk = RetrainDesk(redis_url, settings, conversation.store.engine)
    stuck = StuckDatabase(conversation.store, database_url, monkeypatch)
    thinking = [("callback", DEFERRED_MESSAGE)]
    try:
        # /stats reads: it waits for the database, its "thinking…" does not.
        tasks = discord_api.start(bot, COMMAND, command_data("stats"), user=admin, channel=channel)
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == thinking and before[0].ephemeral
        assert stuck.held_reads == 1
        assert types(after) == [("edit", None)] and after[0].content.startswith("📊 0 ") and after[0].ephemeral

        # /forget writes: behind another connection's write lock.
        tasks = discord_api.start(bot, COMMAND, command_data("forget"), user=alice, channel=channel)
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == thinking
        assert [(a.kind, a.content) for a in after] == [("edit", EN["forgotten"].format(predictions=0, votes=0,
                                                                                          photos=0))]  # fmt: skip

        # /retrain while another admin's request holds the retrain lock: the desk waits 5 s (its default) for
        # that run's number, then answers that a retrain is starting. Nothing is released: the wait ends by itself.
        await conversation.redis.set(keys.RETRAIN_LOCK_KEY, retrain_runs.PENDING)
        tasks = discord_api.start(bot, COMMAND, command_data("retrain"), user=admin, channel=channel)
        before, after = await answered_around(discord_api, tasks, lambda: None)
        assert types(before) == thinking and not before[0].ephemeral  # an admin's /retrain is public
        assert [(a.kind, a.content) for a in after] == [("edit", EN["retrain_starting"])]

        # /retrain with the lock free, while the database cannot take the new run's row.
        await conversation.redis.delete(keys.RETRAIN_LOCK_KEY)
        tasks = discord_api.start(bot, COMMAND, command_data("retrain"), user=admin, channel=channel)
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == thinking
        [queued] = after
        assert queued.kind == "edit" and queued.content.startswith("🛠️ Retrain #1 queued") and not queued.ephemeral
        assert await desk.progress_message(1) == f"{channel.id}:{queued.message['id']}"
    finally:
        stuck.release()
        await desk.aclose()


async def test_photos_buttons_menus_and_the_modal_are_acknowledged_before_the_database_answers(
    bot, discord_api, conversation, start_worker, database_url, tmp_path, monkeypatch
):
    start_worker()
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    stuck = StuckDatabase(conversation.store, database_url, monkeypatch)
    try:
        # /top3 with a photo: classified, then recorded behind the write lock.
        path = photo_file(tmp_path, "c.jpg", 3)
        attachment = attachment_payload(path, "image/jpeg")
        data = command_data("top3", [{"name": "photo", "type": 11, "value": attachment["id"]}],
                            {"attachments": {attachment["id"]: attachment}})  # fmt: skip
        tasks = discord_api.start(bot, COMMAND, data, user=alice, channel=channel)
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == [("callback", DEFERRED_MESSAGE)]
        [top3] = after
        assert top3.message["id"] == before[0].message["id"]  # "thinking…" became the answer
        assert_classification(top3.embeds[0], top3.components)

        # The "Identify car" context menu on a message with a photo.
        mention = await dpytest.message(f"<@{bot.user.id}>", channel=channel, member=alice,
                                        attachments=[str(photo_file(tmp_path, "d.jpg", 4))])  # fmt: skip
        await dpytest.empty_queue()
        data = {"id": "1", "name": "Identify car", "type": 3, "target_id": str(mention.id),
                "resolved": {"messages": {str(mention.id): raw_message(channel.id, mention.id)}}}  # fmt: skip
        tasks = discord_api.start(bot, COMMAND, data, user=alice, channel=channel)
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == [("callback", DEFERRED_MESSAGE)]
        [identified] = after
        prediction_id = assert_classification(identified.embeds[0], identified.components)
        message = identified.message

        # 👎: acknowledged as an update at once; the vote waits for the database, then the question follows.
        tasks = discord_api.start(bot, COMPONENT, press_data(f"carbot:v:{prediction_id}:d"), user=alice,
                                  channel=channel, message=message)  # fmt: skip
        before, after = await answered_around(discord_api, tasks, stuck.hold().release)
        assert types(before) == [("callback", DEFERRED_UPDATE)]
        [question] = after
        assert (question.kind, question.content, question.ephemeral) == ("followup", EN["thanks_down"], True)
        assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "down", None)]
        menu, another = question.components

        # A choice in the select menu: the correction waits for the database, then the question is edited.
        option = menu["options"][0]
        tasks = discord_api.start(bot, COMPONENT, press_data(menu["custom_id"], [option["value"]]), user=alice,
                                  channel=channel, message=question.message)  # fmt: skip
        corrections_while_stuck = []

        def release() -> None:
            corrections_while_stuck.append(feedback(database_url)[0][4])  # SQLite's log lets this read through
            stuck.release()

        stuck.hold()
        before, after = await answered_around(discord_api, tasks, release)
        assert types(before) == [("callback", DEFERRED_UPDATE)]
        assert [(a.kind, a.content) for a in after] == [("edit", EN["corrected"].format(label=option["label"]))]
        assert corrections_while_stuck == [None] and feedback(database_url)[0][4] == option["label"]

        # "Another model…": the modal opens while the database is stuck; a modal can only be the first answer.
        stuck.hold()
        reads = stuck.held_reads
        tasks = discord_api.start(bot, COMPONENT, press_data(another["custom_id"]), user=alice, channel=channel,
                                  message=question.message)  # fmt: skip
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=SAFETY_S)  # the press is over, nothing released
        [modal] = discord_api.answers[-1:]
        assert (modal.type, stuck.held_reads) == (MODAL, reads)  # nothing was asked of the database

        # Its submission is acknowledged ("thinking…", for the submitter alone); the correction follows.
        tasks = discord_api.start(bot, MODAL_SUBMIT, submit_data(modal.body, "fiat  argo"), user=alice,
                                  channel=channel)  # fmt: skip
        before, after = await answered_around(discord_api, tasks, stuck.release)
        assert types(before) == [("callback", DEFERRED_MESSAGE)] and before[0].ephemeral
        assert [(a.kind, a.content, a.ephemeral) for a in after] == [
            ("edit", EN["corrected"].format(label="FIAT ARGO"), True)
        ]
        assert feedback(database_url) == [(prediction_id, "discord", str(alice.id), "down", "FIAT ARGO")]
    finally:
        stuck.release()


async def test_what_fails_after_the_acknowledgement_still_reaches_the_person(
    bot, discord_api, conversation, settings, redis_url, database_url, tmp_path
):
    from bots._retrain_desk import RetrainDesk
    from carbot import retrain_runs

    config = dpytest.get_config()
    channel = config.channels[0]
    admin = backend.make_user("admin", "0001", id_num=ADMIN_ID)
    # The desk's registry names a previous version whose files are gone, and a rejected run's candidate is gone:
    # rolling back or promoting raises, after the interaction was acknowledged.
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "ACTIVE").write_text("v-active\nprevious v-gone\n")
    desk = RetrainDesk(redis_url, settings.model_copy(update={"model_registry": registry}), conversation.store.engine)
    conversation.retrain = desk
    # The train worker carries out /rollback and the decisions (the bot never writes the registry): it fails there.
    trainer = train_worker_running(redis_url, registry, database_url, tmp_path)
    trainer.__enter__()
    try:
        deferred, apology = await discord_api.command(bot, "rollback", user=admin, channel=channel)
        assert (deferred.type, deferred.ephemeral) == (DEFERRED_MESSAGE, True)
        assert (apology.content, apology.message["id"]) == (EN["failed"], deferred.message["id"])

        engine = conversation.store.engine
        run_id = retrain_runs.create_run(engine, requested_by="discord:1", chat_id=str(channel.id), language="en")
        retrain_runs.update_run(engine, run_id, status="rejected", candidate_version="r1-gone")
        summary = Reply("summary", buttons=((Button("promote", f"r:{run_id}:p"),),))
        message = raw_message(channel.id, (await channel.send(**render(summary))).id)
        await dpytest.empty_queue()
        deferred, apology = await discord_api.press(bot, message, f"carbot:r:{run_id}:p", user=admin, channel=channel)
        assert deferred.type == DEFERRED_UPDATE
        assert (apology.kind, apology.content, apology.ephemeral) == ("followup", EN["failed"], True)

        # A command this version does not have (Discord may still list one from an earlier version).
        [apology] = await discord_api.command(bot, "obsolete", user=admin, channel=channel)
        assert (apology.type, apology.content, apology.ephemeral) == (MESSAGE, EN["failed"], True)
    finally:
        trainer.__exit__(None, None, None)
        await desk.aclose()
