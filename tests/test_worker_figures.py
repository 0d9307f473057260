"""The figures a batch worker keeps in Redis for `carbot status` and the benchmarks: counters and batch sizes."""

from __future__ import annotations

import asyncio
import time

import redis
from rq import Queue

from carbot.keys import BATCH_SIZES_KEY, SERIALIZER, STATS_KEY
from tests.conftest import jpeg_bytes
from worker import ClassifyClient


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
