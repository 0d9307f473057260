"""What the bots queue: a photo reduced to what the active model reads, and the same answer as the original's.

The client the bots build (`ClassifyClient.from_settings`) decodes a photo once, off the
event loop, and queues the network's input as a small PNG, so Redis holds and the worker
decodes a fraction of a phone photo's bytes. Checked at the settings a user gets, against
a real worker.
"""

from __future__ import annotations

import asyncio
import functools
import io
import time

import numpy as np
import pytest
import redis
from PIL import Image
from rq import Queue
from rq.job import Job

from carbot.keys import PHOTO_KEY_PREFIX, SERIALIZER
from carbot.settings import Settings
from model import ModelRegistry, Preprocessing
from tests.conftest import TEST_IMAGE_SIZE, add_version, jpeg_bytes
from worker import ActivePreprocessing, ClassifyClient, PhotoRejected, RejectReason


def phone_photo(seed: int) -> bytes:
    """A 12-megapixel JPEG, as a phone sends it when a person attaches the file itself."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (378, 504, 3), dtype=np.uint8))
    out = io.BytesIO()
    small.resize((4032, 3024), Image.Resampling.BILINEAR).save(out, "JPEG", quality=90)
    return out.getvalue()


async def test_the_bots_queue_the_reduced_photo_and_get_the_originals_answer(redis_url, model_registry, start_worker):
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    photo = phone_photo(1)
    settings = Settings(model_registry=model_registry)
    async with ClassifyClient.from_settings(settings, redis_url) as bots_client, ClassifyClient(redis_url) as plain:
        reduced_answer = asyncio.ensure_future(bots_client.classify(photo))
        deadline = time.monotonic() + 30
        while queue.count < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        [queued_key] = [key for key in connection.keys(PHOTO_KEY_PREFIX + "*")]
        queued = connection.get(queued_key)
        with Image.open(io.BytesIO(queued)) as img:
            assert (img.format, img.size) == ("BMP", (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE))
        assert len(queued) * 50 < len(photo)  # what Redis holds and the worker decodes

        start_worker()
        reduced, original = await reduced_answer, await plain.classify(photo)

    assert [c.label for c in reduced.top_k] == [c.label for c in original.top_k]
    assert [c.probability for c in reduced.top_k] == pytest.approx([c.probability for c in original.top_k], abs=1e-5)


async def test_a_bad_photo_is_refused_by_the_bots_client_before_anything_is_queued(redis_url, model_registry):
    connection = redis.Redis.from_url(redis_url)
    async with ClassifyClient.from_settings(Settings(model_registry=model_registry), redis_url) as client:
        with pytest.raises(PhotoRejected) as refused:
            await client.classify(b"%PDF-1.7 a document, not a picture")
    assert refused.value.reason == RejectReason.NOT_AN_IMAGE
    assert Queue("classify", connection=connection, serializer=SERIALIZER).count == 0
    assert connection.keys(PHOTO_KEY_PREFIX + "*") == []


async def test_the_bots_client_follows_the_active_model_to_its_new_input_size_and_limit(redis_url, tmp_path):
    """After a promotion (or rollback) to a model that reads photos differently, photos are reduced for it.

    At the default check interval (5 s): the test waits it out instead of shortening it.
    """
    registry = ModelRegistry(tmp_path / "models")
    add_version(registry, "small", Preprocessing(image_size=TEST_IMAGE_SIZE))
    add_version(registry, "large", Preprocessing(image_size=2 * TEST_IMAGE_SIZE, max_bytes=2**20))
    registry.activate("small")
    connection = redis.Redis.from_url(redis_url)

    def queued_size(job_id: str) -> tuple[int, int]:
        job = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
        with Image.open(io.BytesIO(connection.get(job.kwargs["photo"]))) as img:
            return img.size

    photo = jpeg_bytes(3, (640, 480))
    async with ClassifyClient.from_settings(Settings(model_registry=tmp_path / "models"), redis_url) as client:
        submit = functools.partial(asyncio.get_running_loop().run_in_executor, None, client.submit)
        assert queued_size(await submit(photo)) == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        assert client.max_photo_bytes == Preprocessing().max_bytes

        registry.activate("large")
        await asyncio.sleep(ActivePreprocessing.DEFAULT_CHECK_S + 0.5)
        assert queued_size(await submit(photo)) == (2 * TEST_IMAGE_SIZE, 2 * TEST_IMAGE_SIZE)
        assert client.max_photo_bytes == 2**20
        with pytest.raises(PhotoRejected) as refused:
            await submit(phone_photo(2))  # over the new model's 1 MB
        assert refused.value.reason is RejectReason.TOO_LARGE
