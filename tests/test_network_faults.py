"""A network that dies silently: nobody waits forever, and everything works again once it is back.

Redis is reached through `BlackholeProxy` (tests/netproxy.py), which can stop forwarding
without closing a connection, the way a pulled cable or a frozen host looks to a client:
no error, no reply, nothing. Only the clients' own timeouts (carbot.connections) notice.
Everything runs at the default settings a user gets, except the tests' worker maintenance
interval of 1 s (tests/conftest.py's `worker_env`, to find abandoned jobs quickly), which
also makes the worker's connection timeout 1 + 10 s instead of 5 + 10 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from rq import Queue
from rq.registry import StartedJobRegistry
from rq.results import Result

from bots import Conversation, Sender, Store
from bots._conversation import connect_redis
from bots._texts import language_of, text
from carbot.connections import SOCKET_TIMEOUT_S, redis_connection
from carbot.keys import SERIALIZER
from carbot.photos import PhotoStore
from carbot.settings import Settings
from tests.conftest import TEST_LABELS, WorkerProcess, jpeg_bytes, noisy_jpeg, worker_env
from tests.netproxy import BlackholeProxy
from worker import Classification, ClassifyClient, ClassifyError, ClassifyFailed, ClassifyTimeout

T = TypeVar("T")
ALICE = Sender(platform="telegram", user_id="1", chat_id="100", language_code="en")
BRUNO = Sender(platform="telegram", user_id="2", chat_id="200", language_code="pt-BR")
# A reply that hangs is caught this long past the request's deadline (the promise is: by the deadline).
HANG_MARGIN_S = 20


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    """The result of `awaitable` and how long it took."""
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


def labels_in(reply_text: str) -> list[str]:
    return [label for label in TEST_LABELS if label in reply_text]


@pytest.fixture
def proxy(redis_server, redis_url):
    with BlackholeProxy(str(redis_server.socket)) as running:
        yield running


def start_worker_at(url: str, direct_url: str, model_registry, tmp_path, name: str) -> WorkerProcess:
    """A `carbot worker` on `url` (direct, or through the proxy), waited for on `direct_url`."""
    worker = WorkerProcess(worker_env(url, model_registry, tmp_path / "data"), tmp_path / f"{name}.log", name)
    worker.wait_until_listening(redis.Redis.from_url(direct_url))
    return worker


async def test_a_person_hears_back_by_the_deadline_when_redis_goes_silent_and_is_answered_after(
    proxy, redis_url, model_registry, tmp_path
):
    """The bot's side (conversation, classify client, result listener) behind a silent network, default settings."""
    settings = Settings(model_registry=model_registry, data_dir=tmp_path)
    deadline_s = settings.request_timeout_s
    store = Store(f"sqlite:///{tmp_path / 'carbot.db'}", PhotoStore(tmp_path / "photos", 90))
    store.migrate()
    connection = connect_redis(proxy.url)
    queue = Queue(settings.classify_queue, connection=redis.Redis.from_url(redis_url), serializer=SERIALIZER)
    loop = asyncio.get_running_loop()
    first = await loop.run_in_executor(None, start_worker_at, redis_url, redis_url, model_registry, tmp_path, "w1")
    try:
        async with ClassifyClient.from_settings(settings, proxy.url) as client:
            conversation = Conversation(classifier=client, store=store, redis=connection, settings=settings)
            before = await conversation.photo(ALICE, "m1", jpeg_bytes(1))
            assert len(labels_in(before.text)) == 3

            # A photo is queued and its answer awaited; then the network goes silent and a worker answers it.
            await loop.run_in_executor(None, first.stop)
            waiting = asyncio.ensure_future(timed(conversation.photo(ALICE, "m2", jpeg_bytes(2))))
            while queue.count == 0:
                await asyncio.sleep(0.01)
            proxy.blackhole()
            # Another person sends a photo while the network is silent.
            during = asyncio.ensure_future(timed(conversation.photo(BRUNO, "m3", jpeg_bytes(3))))
            second = await loop.run_in_executor(
                None, start_worker_at, redis_url, redis_url, model_registry, tmp_path, "w2"
            )
            try:
                reply_during, during_s = await asyncio.wait_for(during, deadline_s + HANG_MARGIN_S)
                reply_waiting, waiting_s = await asyncio.wait_for(waiting, deadline_s + HANG_MARGIN_S)
                # Its answer was computed, but could not reach the bot: the person is told, in time.
                assert queue.count == 0
                for sender, reply in ((ALICE, reply_waiting), (BRUNO, reply_during)):
                    lang = language_of(sender)
                    assert reply.text in (text("timeout", lang), text("failed", lang)), reply.text
                assert not reply_waiting.buttons and not reply_during.buttons

                proxy.restore()
                restored = time.monotonic()
                after = await conversation.photo(ALICE, "m4", jpeg_bytes(4))
                after_s = time.monotonic() - restored
                assert len(labels_in(after.text)) == 3, after.text
                again = await conversation.photo(BRUNO, "m5", jpeg_bytes(5))
                assert len(labels_in(again.text)) == 3, again.text
            finally:
                await loop.run_in_executor(None, second.stop)
    finally:
        await connection.aclose()
        await store.close()
    print(f"\nsilent network: a photo sent during it answered '{reply_during.text}' after {during_s:.1f} s; "
          f"one awaiting its answer '{reply_waiting.text}' after {waiting_s:.1f} s (deadline {deadline_s:g} s); "
          f"first photo after the network came back answered in {after_s:.1f} s")  # fmt: skip


async def test_the_result_listener_recovers_after_its_connection_went_silent(proxy, redis_url, model_registry,
                                                                             tmp_path):  # fmt: skip
    """The client alone: a waiter whose listener can read nothing gets ClassifyTimeout, later photos are answered."""
    worker = start_worker_at(redis_url, redis_url, model_registry, tmp_path, "w1")
    try:
        async with ClassifyClient(proxy.url) as client:  # default deadline (30 s)
            assert isinstance(await client.classify(jpeg_bytes(1)), Classification)
            accepted = proxy.accepted
            proxy.blackhole()
            outcome = await asyncio.wait_for(
                asyncio.gather(client.classify(jpeg_bytes(2)), return_exceptions=True), client.timeout_s + HANG_MARGIN_S
            )
            assert isinstance(outcome[0], ClassifyFailed | ClassifyTimeout), outcome
            assert "try again" in str(outcome[0])
            proxy.restore()
            answers = await asyncio.gather(*(client.classify(jpeg_bytes(seed)) for seed in range(3, 13)))
            assert all(isinstance(answer, Classification) for answer in answers)
            assert proxy.accepted > accepted  # the connections that timed out were replaced by new ones
    finally:
        worker.stop()


async def test_a_worker_cut_off_in_the_middle_of_a_batch_stays_up_and_answers_once_redis_is_back(
    proxy, redis_url, model_registry, tmp_path
):
    """Redis goes silent mid-batch: the worker stays up, model loaded, and answers once Redis is back."""
    loop = asyncio.get_running_loop()
    worker = await loop.run_in_executor(None, start_worker_at, proxy.url, redis_url, model_registry, tmp_path, "cut")
    direct = redis.Redis.from_url(redis_url)
    started_jobs = StartedJobRegistry(queue=Queue("classify", connection=direct, serializer=SERIALIZER))
    photos = [noisy_jpeg(seed) for seed in range(40)]
    try:
        async with ClassifyClient(redis_url) as client:  # the bot's side is not cut off; default deadline
            burst = asyncio.gather(*(client.classify(photo) for photo in photos), return_exceptions=True)
            while not started_jobs.get_job_ids():  # a batch is in the worker's hands
                await asyncio.sleep(0.001)
            proxy.blackhole()
            silent_since = time.monotonic()
            # The worker's socket timeout notices the silent connection; the batch is left to the rescue.
            while "Redis failed" not in worker.log() and worker.process.poll() is None:
                assert time.monotonic() - silent_since < 120, worker.log()
                await asyncio.sleep(0.2)
            proxy.restore()
            silent_s = time.monotonic() - silent_since
            fresh = asyncio.ensure_future(timed(client.classify(jpeg_bytes(99))))  # sent as the network comes back
            outcomes = await asyncio.wait_for(burst, client.timeout_s + HANG_MARGIN_S)
            # Every photo of the burst ends: answered, or a clear error (its answer came too late).
            assert all(isinstance(o, Classification | ClassifyError) for o in outcomes), outcomes
            answer, back_s = await fresh
            assert isinstance(answer, Classification), answer
            later = await client.classify(jpeg_bytes(100))
            assert isinstance(later, Classification), later
    finally:
        alive = worker.process.poll() is None
        worker.stop()
    log = worker.log_path.read_text(errors="replace")
    assert alive, log
    assert "Redis failed during a batch" in log
    answered = sum(isinstance(o, Classification) for o in outcomes)
    print(f"\nworker cut off mid-batch for {silent_s:.1f} s: {answered} of {len(photos)} photos answered, "
          f"the rest told to try again; a photo sent as the network came back answered in {back_s:.1f} s")  # fmt: skip


async def test_an_unreadable_answer_fails_only_its_own_photo_and_the_listener_keeps_serving(
    redis_url, model_registry, tmp_path
):
    """A result stream holding what RQ never writes: that photo hears ClassifyFailed, the others get answers."""
    queue = Queue("classify", connection=redis.Redis.from_url(redis_url), serializer=SERIALIZER)
    async with ClassifyClient(redis_url) as client:  # default deadline
        spoiled = asyncio.ensure_future(client.classify(jpeg_bytes(1)))
        while queue.count == 0:
            await asyncio.sleep(0.01)
        [spoiled_id] = queue.job_ids
        # Answered by a worker started only later (10-20 s here): a longer deadline so a busy machine can't fail it.
        healthy = asyncio.ensure_future(client.classify(jpeg_bytes(2), timeout_s=120))
        while queue.count < 2:
            await asyncio.sleep(0.01)
        queue.connection.xadd(Result.get_key(spoiled_id), {"garbage": "1"})
        # Before the code that answers it this way, the listener died and the photo waited for its deadline.
        [outcome] = await asyncio.wait_for(
            asyncio.gather(spoiled, return_exceptions=True), client.timeout_s + HANG_MARGIN_S
        )
        worker = await asyncio.get_running_loop().run_in_executor(
            None, start_worker_at, redis_url, redis_url, model_registry, tmp_path, "w1"
        )
        try:
            answers = await asyncio.gather(healthy, client.classify(jpeg_bytes(3)), return_exceptions=True)
        finally:
            worker.stop()
    assert isinstance(outcome, ClassifyFailed) and "try again" in str(outcome), outcome
    assert all(isinstance(answer, Classification) for answer in answers), answers


def test_every_redis_client_comes_from_the_one_factory():
    """Only `carbot.connections` builds Redis clients, so none is left without timeouts, keepalive or health checks.

    The one exception is the benchmark's plain-RQ baseline (c), a worker as RQ's own users write it.
    """
    root = Path(__file__).parent.parent
    builders = re.compile(r"Redis\.from_url\(|\bRedis\(|from_pool\(|ConnectionPool\.from_url\(|StrictRedis")
    offenders = []
    for package in ("bots", "carbot", "worker", "training", "model"):
        for path in sorted((root / package).rglob("*.py")):
            if path.name == "connections.py" and path.parent.name == "carbot":
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if builders.search(line) and "SimpleWorker([queue], connection=redis.Redis.from_url(url)" not in line:
                    offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    # What the factory gives: a socket timeout past the longest block, keepalive on TCP, health checks.
    for url in ("redis://127.0.0.1:6379/0", "unix:///tmp/redis.sock"):
        for asyncio_client in (False, True):
            client = redis_connection(url, asyncio=asyncio_client, blocking_s=5)
            options = client.connection_pool.connection_kwargs
            assert options["socket_timeout"] == 5 + SOCKET_TIMEOUT_S
            assert options["health_check_interval"] > 0
            assert options.get("socket_keepalive", False) is url.startswith("redis:")


async def test_replies_are_parsed_by_hiredis_on_both_kinds_of_client(redis_url):
    """redis-py's C parser (the `hiredis` dependency), not its pure-Python one: with it a photo's trip through the
    queue costs the bots' client and the worker about an eighth less CPU (`python -m bench queue-cost`)."""
    client = redis_connection(redis_url)
    client.ping()
    connection = client.connection_pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_HiredisParser"
    finally:
        client.connection_pool.release(connection)
        client.close()
    async_client = redis_connection(redis_url, asyncio=True)
    await async_client.ping()
    connection = await async_client.connection_pool.get_connection()
    try:
        assert type(connection._parser).__name__ == "_AsyncHiredisParser"
    finally:
        await async_client.connection_pool.release(connection)
        await async_client.aclose()
