"""A batch that runs longer than the heartbeat's lifetime, at the default settings: never taken for dead.

Twelve 49-megapixel PNGs with an alpha channel: the worker's decoding budget (one photo
at the pixel limit) decodes them one after another, each inflated and then laid on white,
so their one batch takes about 23 seconds here, more than four times the default 5 s
lifetime of a heartbeat. (Ten RGB ones took 8-10 s here, but 5.8 s on a CI machine: too
close to the lifetime to prove anything.) Every setting is the default; the test plays
another worker's maintenance, sweeping for abandoned jobs five times a second all along.
Without the worker's pulse the batch would be handed back and run twice: this test fails
when the pulse is switched off.
"""

from __future__ import annotations

import asyncio

import redis
from rq import Queue
from rq.registry import FinishedJobRegistry

from carbot.keys import SERIALIZER
from tests.conftest import slow_png
from tests.test_worker_liveness import answered_once
from worker import Classification, ClassifyClient
from worker._batch_worker import HEARTBEAT_TTL_S, BatchWorker

PHOTOS = 12


async def test_a_batch_longer_than_the_heartbeat_at_the_defaults_is_answered_once(redis_url, start_worker):
    photos = [slow_png(seed) for seed in range(PHOTOS)]
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    janitor = BatchWorker([queue], classifier=None, connection=connection, name="janitor")
    stop = asyncio.Event()

    async def sweep() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await loop.run_in_executor(None, janitor.clean_registries)
            await asyncio.sleep(0.2)

    # The deadline covers the worker's start (seconds of TensorFlow import) as well as the long batch.
    async with ClassifyClient(redis_url, timeout_s=120) as client:
        answers = [asyncio.ensure_future(client.classify(photo)) for photo in photos]
        while queue.count < len(photos):  # all queued first, so that they form one batch
            await asyncio.sleep(0.01)
        sweeper = asyncio.ensure_future(sweep())
        try:
            await asyncio.get_running_loop().run_in_executor(None, start_worker)
            outcomes = await asyncio.gather(*answers)
        finally:
            stop.set()
            await sweeper
    assert all(isinstance(o, Classification) for o in outcomes)
    batch_ms = {o.timings["decode_ms"] + o.timings["inference_ms"] for o in outcomes}
    assert {o.timings["batch_size"] for o in outcomes} == {len(photos)}  # one batch
    # The precondition: the batch outlived a heartbeat, with room for the sweeper's 0.2 s between looks.
    assert min(batch_ms) > HEARTBEAT_TTL_S * 1000 * 1.2, f"the batch took only {min(batch_ms):.0f} ms"
    answered_once(redis_url, [o.job_id for o in outcomes])
    assert FinishedJobRegistry(queue=queue).count == len(photos)
