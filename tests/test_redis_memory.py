"""Redis memory is bounded by design: a full Redis means "busy", never a crash, and never a lost photo.

compose runs Redis with `--maxmemory` and `noeviction`. Here a private Redis
gets the same policy with a small bound (48 MB instead of compose's 2 GB, so
that a hundred photos of a megabyte fill it quickly), no worker runs while a
hundred people send a photo each, and then one comes.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import redis
from PIL import Image

from carbot.services import PrivateRedis
from tests.conftest import WorkerProcess, worker_env
from worker import Classification, ClassifyClient, QueueBusy

BOUND = 48 * 2**20


def megabyte_photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_a_full_redis_answers_busy_keeps_its_bound_and_loses_no_queued_photo(
    tmp_path: Path, model_registry: Path
) -> None:
    photos = [megabyte_photo(seed) for seed in range(100)]
    assert all(len(photo) > 2**20 for photo in photos)
    with PrivateRedis(tmp_path / "redis") as server:
        connection = redis.Redis.from_url(server.url)
        connection.config_set("maxmemory", BOUND)
        connection.config_set("maxmemory-policy", "noeviction")

        async def everybody_at_once() -> list:
            async with ClassifyClient(server.url, timeout_s=120) as client:
                answers = [asyncio.ensure_future(client.classify(photo)) for photo in photos]
                while sum(answer.done() for answer in answers) + client_queue_count(connection) < len(photos):
                    await asyncio.sleep(0.05)  # every photo is either queued or already refused
                peak = int(connection.info("memory")["used_memory_peak"])
                worker = WorkerProcess(worker_env(server.url, model_registry, tmp_path / "data"),
                                       tmp_path / "w.log", "w")  # fmt: skip
                try:
                    outcomes = await asyncio.gather(*answers, return_exceptions=True)
                    late = await client.classify(megabyte_photo(1000))  # the next person, once there is room
                finally:
                    worker.stop()
            return [outcomes, late, peak]

        outcomes, late, peak = asyncio.run(everybody_at_once())
        busy = [o for o in outcomes if isinstance(o, QueueBusy)]
        answered = [o for o in outcomes if isinstance(o, Classification)]
        assert busy and answered  # some did not fit, and were told so at once
        assert len(busy) + len(answered) == len(photos)  # nothing else: no crash, no lost photo
        # Redis checks its bound before each write (in a transaction, as each write is queued), so the writes
        # in flight can pass it: at most one photo per submitting thread (4 per client), counted twice (in its
        # input buffer, then stored). A group's transaction past the bound is refused whole: all "busy".
        assert peak <= BOUND + 2 * 4 * max(map(len, photos)) + 2 * 2**20
        assert isinstance(late, Classification)
        assert connection.keys("carbot:photo*") == []  # every photo's bytes left with its job


def client_queue_count(connection: redis.Redis) -> int:
    return connection.llen("rq:queue:classify")
