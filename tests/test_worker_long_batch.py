"""A batch that runs longer than the heartbeat's lifetime, at the default settings: never taken for dead.

Ten 49-megapixel PNGs: the worker's decoding budget (one photo at the pixel limit)
decodes them one after another, so their one batch takes ten seconds or more here,
twice the default 5 s lifetime of a heartbeat. Every setting is the default; the
test plays another worker's maintenance, sweeping for abandoned jobs five times a
second all along. Without the worker's pulse the batch would be handed back and
run twice: this test fails when the pulse is switched off.
"""

from __future__ import annotations

import asyncio
import functools
import io

import numpy as np
import redis
from PIL import Image
from rq import Queue
from rq.registry import FinishedJobRegistry

from carbot.keys import SERIALIZER
from tests.test_worker_liveness import answered_once
from worker import Classification, ClassifyClient
from worker._batch_worker import HEARTBEAT_TTL_S, BatchWorker


@functools.cache
def _pattern() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seed-free parts of the photos' pixels, computed once (in int32: the int64 grid took ~20 s a photo)."""
    y, x = (axis.astype(np.int32) for axis in np.ogrid[:7000, :7000])
    return ((x * 7 + y) % 256).astype(np.uint8), ((x ^ y) % 256).astype(np.uint8), ((x * y) % 251).astype(np.uint8)


def slow_png(seed: int) -> bytes:
    """A 7000 x 7000 PNG: channel 0 is (7x + y + seed) mod 256, 1 is (x xor y) mod 256, 2 is xy mod 251."""
    shifted, xor, product = _pattern()
    pixels = np.stack([shifted + np.uint8(seed % 256), xor, product], axis=-1)  # uint8 wraps: mod 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


async def test_a_batch_longer_than_the_heartbeat_at_the_defaults_is_answered_once(redis_url, start_worker):
    photos = [slow_png(seed) for seed in range(10)]
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
    assert min(batch_ms) > HEARTBEAT_TTL_S * 1000 * 1.2  # the precondition: it outlived a heartbeat
    answered_once(redis_url, [o.job_id for o in outcomes])
    assert FinishedJobRegistry(queue=queue).count == len(photos)
