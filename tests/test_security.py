"""Security: what a stranger can send, and what must never leak.

- forged and replayed button data: only the exact data the bot wrote acts, only in
  the chat of its prediction, and a replayed vote (even twenty at once) is one vote;
- admin commands (/stats, /model, /retrain, /rollback) from a non-admin, through the
  conversation and through each platform's real adapter (Telegram against the fake
  Bot API server, Discord through discord.py's gateway parser); the terminal chat's
  local user is the admin, so there the check is that path-like arguments do nothing;
- oversized uploads are refused before anything is downloaded, queued or stored;
- jobs and results in Redis are JSON, never pickle, and a pickled job planted in the
  queue is refused by the worker without running its payload;
- compose's Redis requires a password and every Redis URL carries it;
- tokens and passwords never appear in logs (a worker at DEBUG, the bots at start-up).

Everything real: redis-server, `carbot worker` processes, SQLite, the adapters.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import yaml
from hypothesis import given
from hypothesis import strategies as st
from rq import Queue

from bots import Conversation, Sender, Store, is_admin
from bots._conversation import ADMIN_COMMANDS, _parse_button
from bots._retrain_desk import RetrainDesk
from bots._terminal import TerminalChat
from bots._texts import text
from carbot.photos import PhotoStore
from carbot.services import PrivateRedis
from carbot.settings import Settings
from model import ModelRegistry
from tests import test_discord as discord_tests
from tests import test_telegram as telegram_tests
from tests.conftest import TEST_LABELS, add_version, jpeg_bytes, train_worker_running, worker_env
from tests.test_discord import EN, attachment_payload, deferred_answer, photo_file, start_bot
from tests.test_telegram import ADMIN as TELEGRAM_ADMIN
from tests.test_telegram import Harness
from worker import Candidate, ClassifyClient

# The platforms' own fixtures, reused: pytest knows a fixture by the name it has in this module.
fake, store, telegram_bot = telegram_tests.fake, telegram_tests.store, telegram_tests.bot
settings, database_url, discord_api = discord_tests.settings, discord_tests.database_url, discord_tests.discord_api
discord_conversation = discord_tests.conversation

ROOT = Path(__file__).resolve().parent.parent
NOT_ADMIN, STALE = text("not_admin", "en"), text("stale", "en")
ALICE = Sender(platform="telegram", user_id="1", chat_id="100", language_code="en")
MALLORY = Sender(platform="telegram", user_id="666", chat_id="666", language_code="en")


# -- a conversation on real parts, no worker needed -------------------------------------------------------------


@pytest.fixture
def registry(model_registry: Path, tmp_path: Path) -> ModelRegistry:
    """A copy of the test registry with a second version active, so /rollback would really change something."""
    root = tmp_path / "models"
    shutil.copytree(model_registry, root)
    registry = ModelRegistry(root)
    add_version(registry, "tiny-b")
    registry.activate("tiny-b")
    return registry


@pytest.fixture
def train_worker(redis_url: str, registry: ModelRegistry, tmp_path: Path):
    """The train worker, which carries out /rollback (bots never write the registry)."""
    with train_worker_running(redis_url, registry.root, f"sqlite:///{tmp_path / 'carbot.db'}", tmp_path) as worker:
        yield worker


@pytest.fixture
async def chat(redis_url: str, registry: ModelRegistry, tmp_path: Path):
    """The conversation with its store, client and retrain desk: /retrain and /rollback act for real."""
    config = Settings(model_registry=registry.root, data_dir=tmp_path, rate_limit_per_minute=1000)
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = aioredis.Redis.from_url(redis_url)
    desk = RetrainDesk(redis_url, config, store.engine)
    async with ClassifyClient.from_settings(config, redis_url) as client:
        yield Conversation(classifier=client, store=store, redis=connection, settings=config, retrain=desk)
    await desk.aclose()
    await connection.aclose()
    await store.close()


async def a_prediction(conversation: Conversation, sender: Sender) -> int:
    """A prediction recorded as the conversation records one (the worker's answer is not what is tested here)."""
    top_k = [Candidate(label, 0.2) for label in TEST_LABELS[:3]]
    return await conversation.store.record_prediction(
        sender, message_id="m1", photo=jpeg_bytes(1), model_version="tiny-test", top_k=top_k, latency_ms=5.0
    )


# -- forged and replayed buttons ---------------------------------------------------------------------------------


async def test_a_replayed_vote_is_one_vote_even_twenty_clicks_at_once(chat: Conversation) -> None:
    prediction = await a_prediction(chat, ALICE)

    notices = [
        answer.notice for answer in await asyncio.gather(*(chat.button(ALICE, f"v:{prediction}:u") for _ in range(20)))
    ]
    assert notices.count(text("thanks_up", "en")) == 1
    assert notices.count(text("vote_unchanged", "en")) == 19
    downs = [
        answer.notice for answer in await asyncio.gather(*(chat.button(ALICE, f"v:{prediction}:d") for _ in range(5)))
    ]
    # Changing one's mind with a burst of 👎: still one row, now "down". (Concurrent changes of an existing
    # vote may each say "thanks" -- SQLite reads before it locks -- but none adds a row.)
    assert set(downs) <= {text("thanks_down", "en"), text("vote_unchanged", "en")}
    stats = await chat.store.stats()
    assert (stats["up"], stats["down"]) == (0, 1)
    assert (await chat.button(ALICE, f"v:{prediction}:d")).notice == text("vote_unchanged", "en")


async def test_forged_button_data_acts_on_nothing(chat: Conversation) -> None:
    prediction = await a_prediction(chat, ALICE)
    forged = [
        f"v:{prediction}:u\n",  # a trailing newline
        f"v:{prediction}:u ",
        f"v:{'١' * len(str(prediction))}:u",  # Arabic-Indic digits that int() would accept
        f"c:{prediction}:٣",
        f"v:-{prediction}:u",
        f"v:{prediction:019d}:u",  # past the 18 digits data ever has
        f"v:{prediction}:u" + "x" * 1000,
        f"V:{prediction}:U",
        f"v:{prediction}:u\x00",
        f"c:{prediction}:99",  # a label index the model does not have
    ]
    for data in forged:
        answer = await chat.button(ALICE, data)
        assert (answer.notice, answer.edit, answer.follow_up) == (STALE, None, None), data
    # Someone else's prediction, guessed or copied: stale everywhere but in its own chat.
    for sender in (
        MALLORY,
        Sender(platform="discord", user_id="1", chat_id="100"),
        Sender(platform="telegram", user_id="1", chat_id="101"),
    ):
        assert (await chat.button(sender, f"v:{prediction}:u")).notice == STALE
    # A retrain decision button pressed by a non-admin.
    assert (await chat.button(MALLORY, "r:1:p")).notice == NOT_ADMIN
    stats = await chat.store.stats()
    assert stats["up"] == stats["down"] == stats["corrections"] == 0

    # After /forget the buttons of the forgotten answers are stale too (a replay cannot resurrect them).
    await chat.command(ALICE, "forget")
    assert (await chat.button(ALICE, f"v:{prediction}:u")).notice == STALE


@given(st.one_of(st.text(max_size=80), st.from_regex(r"[vcrx]:[-\d١]{0,20}:[udpx\d٣ ]{0,5}\n?", fullmatch=True)))
def test_only_data_of_the_bots_own_grammar_parses(data: str) -> None:
    """Whatever a client sends back, it acts only if it is of the exact form the bot writes (ASCII, whole string)."""
    parsed = _parse_button(data)
    grammar = re.fullmatch(r"(?P<kind>[vcr]):(?P<id>[0-9]{1,18}):(?P<value>[udpx]|[0-9]{1,4})", data)
    if parsed is None:
        return
    assert grammar is not None, data
    kind, number, value = parsed
    assert (kind, number, value) == (grammar["kind"], int(grammar["id"]), grammar["value"])
    # Votes are up/down, retrain decisions promote/discard, corrections a label index or "x".
    assert value in {"v": ("u", "d"), "r": ("p", "x")}[kind] if kind != "c" else value == "x" or value.isdigit()


# -- admin commands from a non-admin -----------------------------------------------------------------------------


async def test_the_conversation_refuses_every_admin_command_to_non_admins(
    chat: Conversation, registry: ModelRegistry, redis_url: str, train_worker
) -> None:
    assert set(ADMIN_COMMANDS) == {"stats", "model", "retrain", "rollback"}
    train_queue = redis.Redis.from_url(redis_url)
    for platform in ("telegram", "discord", "terminal"):
        stranger = Sender(platform=platform, user_id="7", chat_id="7", is_admin=False)
        for name in ADMIN_COMMANDS:
            assert (await chat.command(stranger, name, "../../x")).text == NOT_ADMIN, (platform, name)
            assert (await chat.command(stranger, f"/{name.upper()}")).text == NOT_ADMIN
    assert registry.active_version() == "tiny-b"  # the refused /rollback changed nothing...
    assert train_queue.llen("rq:queue:train") == 0  # ...and the refused /retrain queued nothing

    admin = Sender(platform="telegram", user_id="42", chat_id="42", is_admin=True)
    assert "tiny-test" in (await chat.command(admin, "rollback")).text  # the same command, allowed, acts
    assert registry.active_version() == "tiny-test"

    # Admin ids name a platform: Telegram's admin 42 is nobody on Discord.
    assert is_admin(["telegram:42"], "telegram", "42") and not is_admin(["telegram:42"], "discord", "42")
    assert not is_admin(["telegram:42"], "telegram", "420") and not is_admin(["telegram:42"], "telegram", "4")


async def test_telegram_non_admin_gets_not_admin_for_every_admin_command(telegram_bot: Harness) -> None:
    fake = telegram_bot.fake
    ana = fake.user(7, "Ana")
    assert ana["id"] != TELEGRAM_ADMIN
    for name in ADMIN_COMMANDS:
        message = fake.send_text(fake.private_chat(ana), ana, f"/{name}")
        [answer] = await telegram_bot.reply_to(message)
        assert answer.params["text"] == NOT_ADMIN, name
    # In a group, the admin's name in the text changes nothing: the sender's id decides.
    group = fake.group_chat(-100)
    message = fake.send_text(group, ana, f"/stats@{fake.bot_user['username']} {TELEGRAM_ADMIN}")
    [answer] = await telegram_bot.reply_to(message)
    assert answer.params["text"] == NOT_ADMIN


@pytest.fixture
async def discord_bot(settings, discord_conversation, discord_api, monkeypatch):
    import discord.ext.test as dpytest

    bot, _ = await start_bot(settings, discord_conversation, monkeypatch)
    yield bot
    await dpytest.empty_queue()


async def test_discord_non_admin_gets_not_admin_for_every_admin_command(discord_bot, discord_api) -> None:
    import discord.ext.test as dpytest

    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    for name in ADMIN_COMMANDS:
        answer = deferred_answer(await discord_api.command(discord_bot, name, user=alice, channel=channel))
        assert (answer.content, answer.ephemeral) == (EN["not_admin"], True), name
    # Also hidden from members without the Administrator permission.
    hidden = {command.name for command in discord_bot.tree.get_commands() if command.default_permissions is not None}
    assert hidden >= set(ADMIN_COMMANDS)


# -- oversized uploads -------------------------------------------------------------------------------------------


async def test_an_oversized_photo_is_refused_before_anything_is_queued_or_stored(
    chat: Conversation, redis_url: str, tmp_path: Path
) -> None:
    huge = b"\xff\xd8\xff\xe0" + bytes(26 * 2**20)  # 26 MB claiming to be a JPEG
    started = time.perf_counter()
    reply = await chat.photo(ALICE, "m1", huge)
    assert time.perf_counter() - started < 5
    assert reply.text.startswith(text("photo_rejected", "en", reason="")) and "25 MB" in reply.text
    assert reply.prediction_id is None and not reply.buttons
    connection = redis.Redis.from_url(redis_url)
    assert connection.llen("rq:queue:classify") == 0 and not connection.keys("carbot:photo:*")
    assert (await chat.store.stats())["predictions"] == 0 and not list((tmp_path / "photos").rglob("*.img"))


async def test_discord_refuses_an_oversized_attachment_without_downloading_it(
    discord_bot, discord_api, tmp_path, monkeypatch
) -> None:
    import discord
    import discord.ext.test as dpytest

    downloads = []

    async def read(self, *, use_cached: bool = False) -> bytes:
        downloads.append(self.filename)
        return b""

    monkeypatch.setattr(discord.Attachment, "read", read)
    config = dpytest.get_config()
    alice, channel = config.members[0], config.channels[0]
    attachment = attachment_payload(photo_file(tmp_path), "image/jpeg")
    attachment["size"] = 500 * 2**20  # a boosted server lets members send files this large
    options = [{"name": "photo", "type": 11, "value": attachment["id"]}]
    _, answer = await discord_api.command(
        discord_bot,
        "top3",
        options=options,
        resolved={"attachments": {attachment["id"]: attachment}},
        user=alice,
        channel=channel,
    )
    assert answer.content == EN["photo_too_large"].format(limit_mb=25)
    assert downloads == []


# -- the terminal chat: path-like input to admin commands ---------------------------------------------------------


async def test_path_like_arguments_to_terminal_admin_commands_touch_no_file(
    chat: Conversation, registry: ModelRegistry, tmp_path: Path, train_worker
) -> None:
    import io

    output = io.StringIO()
    owner = Sender(platform="terminal", user_id="me", chat_id="terminal", language_code="en", is_admin=True)
    terminal = TerminalChat(chat, owner, output)
    evil = tmp_path / "evil-version"
    before = sorted(path.name for path in registry.root.iterdir())
    lines = (
        f"/model ../../../{evil}",
        "/stats /etc/shadow",
        f"/rollback ../../../{evil}",
        f"/forget {tmp_path}/carbot.db",
        f"/retrain {evil}; rm -rf {tmp_path}",
        "/top3 /no/such/dir/car.jpg",
        "../../no/such/car.jpg",
        "/rollback\x00../x",
    )
    for line in lines:
        await terminal.handle(line)
    said = output.getvalue()

    # A path is never opened as a file unless it is one, nor used as a version or a command.
    assert said.count("No such file") == 3, said  # /top3's missing file, the bare path, the NUL-joined line
    # The commands that change things refuse an argument; /model and /stats only show.
    assert said.count("takes nothing after it, so I did nothing") == 3, said
    assert "Active model tiny-b" in said and "answers to" in said
    assert registry.active_version() == "tiny-b"  # no /rollback happened
    assert sorted(path.name for path in registry.root.iterdir()) == before  # nothing written in the registry
    assert not evil.exists() and (tmp_path / "carbot.db").is_file() and (await chat.store.stats()) is not None

    # The same commands without the argument do what they say: the registry's own previous version.
    await terminal.handle("/rollback")
    assert registry.active_version() == "tiny-test"
    await terminal.handle("/model")
    assert "tiny-test" in output.getvalue().splitlines()[-1]


# -- jobs are JSON, and a pickled job does not run ---------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a compromised Redis would plant for a pickle-reading worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def guarded_redis(tmp_path: Path):
    """A private Redis that requires a password, and its URL carrying it."""
    server = PrivateRedis(tmp_path / "redis-auth").start()
    redis.Redis.from_url(server.url).config_set("requirepass", "r3dis-S3CRET-pw")
    yield server, f"{server.url}?password=r3dis-S3CRET-pw"
    server.stop()


def test_jobs_are_json_and_a_planted_pickle_never_runs_nor_do_secrets_reach_the_log(
    guarded_redis, model_registry, tmp_path
) -> None:
    server, url = guarded_redis
    secrets = {"TELEGRAM_TOKEN": "123456:TG-S3CRET-token", "DISCORD_TOKEN": "MTIz.DC-S3CRET.token"}
    env = {**worker_env(url, model_registry, tmp_path / "data"), **secrets}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "carbot", "-v", "worker", "--name", "guarded"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    connection = redis.Redis.from_url(url)
    marker = tmp_path / "pwned"
    try:
        deadline = time.monotonic() + 120
        while not connection.exists("rq:worker:guarded"):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        # A pickled job, as RQ's default serializer writes one, ahead of a real photo in the queue.
        evil = Queue("classify", connection=connection).enqueue(print, Payload(marker))

        async def classify() -> tuple[str, object]:
            async with ClassifyClient(url, timeout_s=60) as client:
                prediction = await client.classify(jpeg_bytes(3))
            return prediction.job_id, prediction

        job_id, prediction = asyncio.run(classify())
        assert prediction.top_k[0].label in TEST_LABELS  # the worker survived the planted job and answered

        # The job and its result as stored: JSON (inside RQ's zlib), no pickle anywhere.
        stored = connection.hgetall(f"rq:job:{job_id}")
        data = zlib.decompress(stored[b"data"])
        assert not data.startswith(b"\x80")  # pickle's protocol opcode
        func, _, args, kwargs = json.loads(data)
        assert func == "worker._tasks.classify_photo" and args == [] and set(kwargs) == {"photo", "top_k", "deadline"}
        [(_, result)] = connection.xrange(f"rq:results:{job_id}")
        value = base64.b64decode(result[b"return_value"])  # RQ's result stream keeps the serialized value in base64
        assert not value.startswith(b"\x80") and json.loads(value)["model_version"] == "tiny-test"

        assert not marker.exists()  # the payload never ran
        evil_status = connection.hget(f"rq:job:{evil.id}", "status")
        assert evil_status != b"finished"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        connection.close()
    log = log_path.read_text(errors="replace")
    assert "batch size=1" in log  # it did log at DEBUG...
    for secret in ("r3dis-S3CRET-pw", *secrets.values()):  # ...but no password, no token
        assert secret not in log


# -- compose: a password on Redis --------------------------------------------------------------------------------


def test_compose_redis_requires_a_password_and_every_redis_url_carries_it() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]

    command = services["redis"]["command"]
    command = command if isinstance(command, list) else command.split()
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]*\}", password), "the password must be required, with no default"
    for port in services["redis"].get("ports", []):
        assert str(port).startswith(("127.0.0.1:", "${REDIS_BIND:-127.0.0.1}:")), port

    urls = {
        (name, key): value
        for name, service in services.items()
        for key, value in (service.get("environment") or {}).items()
        if "REDIS_URL" in key
    }
    assert len(urls) >= 3  # the carbot services and the dashboard at least
    for (name, key), value in urls.items():
        assert re.search(r"redis://:\$\{REDIS_PASSWORD\}@", value), (name, key, value)
    # Every service that talks to Redis gets a URL with the password, not a bare host.
    talking = {
        name for name, service in services.items() if name != "redis" and "redis" in (service.get("depends_on") or {})
    }
    assert talking <= {name for name, _ in urls}, talking - {name for name, _ in urls}


# -- tokens never in logs ----------------------------------------------------------------------------------------


def test_settings_never_show_their_secrets() -> None:
    settings = Settings(telegram_token="123:TG-S3CRET", discord_token="DC-S3CRET")
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "S3CRET" not in shown
    assert settings.telegram_token.get_secret_value() == "123:TG-S3CRET"


@pytest.mark.parametrize("platform", ["telegram", "discord"])
def test_a_bot_that_cannot_log_in_says_why_without_its_token(platform: str, tmp_path: Path) -> None:
    """Start-up at DEBUG with a token and nowhere to log in (no network for Discord, a closed port for Telegram)."""
    token = {"telegram": "123456:TG-S3CRET-token", "discord": "MTIz.DC-S3CRET.token"}[platform]
    env = {name: value for name, value in os.environ.items() if not name.startswith(("CARBOT_", "TELEGRAM", "DISCORD"))}
    env.update(
        {
            f"{platform.upper()}_TOKEN": token,
            "CARBOT_DATA_DIR": str(tmp_path / "data"),
            "CARBOT_TELEGRAM_API_BASE_URL": "http://127.0.0.1:9/bot",
            "CARBOT_TELEGRAM_FILE_BASE_URL": "http://127.0.0.1:9/file/bot",
        }
    )
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "carbot", "-v", platform],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "S3CRET" not in output
