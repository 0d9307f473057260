"""The figures a batch worker keeps in Redis for `carbot status` and the benchmarks: counters and batch sizes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from rq import Queue
from rq.results import Result

from carbot.keys import BATCH_SIZES_KEY, SERIALIZER, STATS_KEY
from tests.conftest import jpeg_bytes
from worker import ClassifyClient, PhotoRejected


async def test_the_worker_adds_each_batch_to_the_shared_counters_and_sizes(redis_url, start_worker) -> None:
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    photos = [jpeg_bytes(seed) for seed in range(12)]
    async with ClassifyClient(redis_url) as client:
        answers = asyncio.gather(*(client.classify(photo) for photo in photos))
        deadline = time.monotonic() + 30
        while queue.count < len(photos) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(start_worker, max_batch=16)  # every photo is queued: they make one batch
        await answers

    counters = {key.decode(): int(value) for key, value in connection.hgetall(STATS_KEY).items()}
    assert counters["batches"] == 1 and counters["photos"] == 12 and counters["computed"] == 12
    assert counters["padded"] >= 12  # the forward passes' images, padding of the plan included
    assert counters["decode_us"] > 0 and counters["inference_us"] > 0
    assert connection.hgetall(BATCH_SIZES_KEY) == {b"12": b"1"}


async def test_a_refused_photo_is_counted_before_anyone_can_read_its_refusal(redis_url, start_worker) -> None:
    # `carbot status`, read right after a person heard "not a photo", once missed that refusal: the worker
    # published it before counting it. Redis's MONITOR gives the order in which it ran the worker's commands.
    start_worker()
    result_added = f"XADD {Result.get_key('')}"  # RQ's result stream of a job, whichever job
    commands: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(redis_url).monitor() as monitor:
            watching.set()
            for event in monitor.listen():
                if event["command"].startswith("ECHO"):  # the test's own end of the watch
                    return
                commands.append(event["command"])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    watching.wait(10)
    async with ClassifyClient(redis_url) as client:
        with pytest.raises(PhotoRejected):
            await client.classify(b"not a picture at all, queued as it is")  # the worker rejects it
    redis.Redis.from_url(redis_url).echo("end of the watch")
    watcher.join(10)

    # Up to the moment the client heard the refusal (and a little more), the count must be in.
    published = next(i for i, c in enumerate(commands) if c.startswith(result_added))
    counted = next((i for i, c in enumerate(commands) if c.startswith(f"HINCRBY {STATS_KEY} rejected 1")), None)
    assert counted is not None and counted < published, commands[published:]
