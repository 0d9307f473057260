"""The batch worker through the real client, real Redis and a real (tiny) model in a worker process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import zlib

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.results import Result

from carbot.keys import CLASSIFY_FUNC, SERIALIZER, STATS_KEY
from tests.conftest import TEST_LABELS, classify_queue, jpeg_bytes
from worker import BatchWorker, Classification, ClassifyClient, PhotoRejected


def stats(url: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.Redis.from_url(url).hgetall(STATS_KEY).items()}


async def queue_then_start_worker(redis_url: str, client: ClassifyClient, photos: list[bytes], start_worker) -> list:
    """Classify every photo, starting the worker only once all of them are queued: they make one batch."""
    answers = asyncio.gather(*(client.classify(photo) for photo in photos), return_exceptions=True)
    deadline = time.monotonic() + 30
    while classify_queue(redis_url).count < len(photos) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.get_running_loop().run_in_executor(None, start_worker)
    return await answers


async def test_batches_form_under_concurrent_load(redis_url, start_worker):
    worker = start_worker(max_batch=16, max_wait_ms=20)
    photos = [jpeg_bytes(seed) for seed in range(64)]
    async with ClassifyClient(redis_url) as client:
        predictions = await asyncio.gather(*(client.classify(photo) for photo in photos))

    assert all(isinstance(p, Classification) for p in predictions)
    for prediction in predictions:
        assert prediction.model_version == "tiny-test"
        assert len(prediction.top_k) == 3
        assert {c.label for c in prediction.top_k} <= set(TEST_LABELS)
        probabilities = [c.probability for c in prediction.top_k]
        assert probabilities == sorted(probabilities, reverse=True)
    assert max(p.timings["batch_size"] for p in predictions) > 1
    counters = stats(redis_url)
    assert counters["photos"] == 64
    assert counters["batches"] < 64
    log = worker.log()
    # The worker timed every bucket when it loaded the model, and says what its batches computed.
    assert re.search(
        r"forward pass ms by batch size: 1: [\d.]+, 2: [\d.]+, 4: [\d.]+, 8: [\d.]+, 16: [\d.]+$", log, re.M
    )
    padded = [int(n) for n in re.findall(r"batch size=\d+ .* padded=(\d+)", log)]
    assert len(padded) == counters["batches"] and sum(padded) >= 64


async def test_one_corrupt_photo_fails_alone_in_its_batch(redis_url, start_worker):
    photos = [jpeg_bytes(seed) for seed in range(15)]
    corrupt = jpeg_bytes(99)[:200]  # a truncated JPEG
    async with ClassifyClient(redis_url) as client:
        outcomes = await queue_then_start_worker(
            redis_url, client, photos[:7] + [corrupt] + photos[7:], lambda: start_worker(max_batch=16)
        )

    rejected = outcomes.pop(7)
    assert isinstance(rejected, PhotoRejected)
    assert "Traceback" not in str(rejected) and "PIL" not in str(rejected)
    assert str(rejected)  # a sentence for a person
    assert all(isinstance(p, Classification) for p in outcomes)
    # The 15 good ones were answered in the same batch as the bad one, not after it.
    assert stats(redis_url)["batches"] == 1
    assert all(p.timings["batch_size"] == 16 for p in outcomes)


async def test_identical_photos_are_computed_once(redis_url, start_worker):
    same = jpeg_bytes(7)
    photos = [same] * 8 + [jpeg_bytes(seed) for seed in (1, 2, 3, 4)]
    async with ClassifyClient(redis_url) as client:
        predictions = await queue_then_start_worker(redis_url, client, photos, start_worker)

    counters = stats(redis_url)
    assert counters["batches"] == 1 and counters["photos"] == 12
    assert counters["computed"] == 5
    assert len({p.top_k for p in predictions[:8]}) == 1


async def test_job_statuses_are_visible_to_rq(redis_url, start_worker):
    start_worker()
    connection = redis.Redis.from_url(redis_url)
    async with ClassifyClient(redis_url) as client:
        good = await client.classify(jpeg_bytes(1))
        with contextlib.suppress(PhotoRejected):
            await client.classify(b"this is a text file, not a photo")
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    assert Job.fetch(good.job_id, connection=connection, serializer=SERIALIZER).get_status() == "finished"
    assert good.job_id in FinishedJobRegistry(queue=queue).get_job_ids()
    failed_ids = FailedJobRegistry(queue=queue).get_job_ids()
    assert len(failed_ids) == 1
    failed = Job.fetch(failed_ids[0], connection=connection, serializer=SERIALIZER)
    assert failed.get_status() == "failed"
    assert "PhotoRejected" in failed.latest_result().exc_string
    assert failed.retries_left in (0, None)  # a bad photo is not retried
    # The worker's own counters, as RQ keeps them (added once a batch, not once a job).
    worker = Worker.find_by_key(Worker.redis_worker_namespace_prefix + "w1", connection=connection)
    assert (worker.successful_job_count, worker.failed_job_count) == (1, 1)
    assert worker.total_working_time > 0


async def test_jobs_are_json_not_pickle(redis_url):
    async with ClassifyClient(redis_url) as client:
        job_id = await asyncio.get_running_loop().run_in_executor(None, client.submit, jpeg_bytes(3))
    raw = redis.Redis.from_url(redis_url).hget(f"rq:job:{job_id}", "data")
    func, _instance, args, kwargs = json.loads(zlib.decompress(raw))
    assert func == "worker._tasks.classify_photo"
    assert kwargs["photo"].startswith("carbot:photo:") and kwargs["top_k"] == 3
    assert len(raw) < 1000  # the photo's bytes are not in the job


async def test_hundreds_of_concurrent_awaits_use_no_thread_each(redis_url, start_worker):
    start_worker(max_batch=32)
    peak_threads = 0

    async def watch_threads():
        nonlocal peak_threads
        while True:
            peak_threads = max(peak_threads, threading.active_count())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch_threads())
    async with ClassifyClient(redis_url) as client:
        predictions = await asyncio.gather(*(client.classify(jpeg_bytes(seed)) for seed in range(300)))
    watcher.cancel()
    assert len(predictions) == 300
    assert all(isinstance(p, Classification) for p in predictions)
    assert peak_threads < 20


async def test_malformed_jobs_fail_alone_and_the_worker_survives(redis_url, start_worker):
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    # Hashes RQ cannot even read: a bad date (first in the queue, so the worker's first wait meets it), and
    # a job key that is not a hash (met while a batch is drained). RQ's own dequeue raises on both.
    bad_date = queue.enqueue_call(CLASSIFY_FUNC, kwargs={"photo": "carbot:photo:0"})
    connection.hset(bad_date.key, "created_at", "yesterday")
    traversal = queue.enqueue_call(CLASSIFY_FUNC, kwargs={"photo": "/etc/passwd"})
    garbage = queue.enqueue_call(CLASSIFY_FUNC, kwargs={"photo": "carbot:photo:0"})
    connection.hset(garbage.key, "data", b"\x80\x04\x95 a pickle from some other client")
    not_a_hash = queue.enqueue_call(CLASSIFY_FUNC, kwargs={"photo": "carbot:photo:0"})
    connection.delete(not_a_hash.key)
    connection.set(not_a_hash.key, "a string")
    worker = start_worker()
    async with ClassifyClient(redis_url) as client:
        assert isinstance(await client.classify(jpeg_bytes(2)), Classification)  # queued after the bad jobs

    assert worker.process.poll() is None
    for unreadable in (bad_date, not_a_hash):  # failed where whoever waits for them looks: their result streams
        entry_id, payload = connection.xrevrange(Result.get_key(unreadable.id), count=1)[0]
        result = Result.restore(unreadable.id, entry_id.decode(), payload, connection=None, serializer=SERIALIZER)
        assert result.type == Result.Type.FAILED and "its data cannot be read" in result.exc_string
        assert unreadable.id in FailedJobRegistry(queue=queue)
    assert not connection.lrange(queue.intermediate_queue_key, 0, -1)
    traversal, garbage = (Job.fetch(j.id, connection=connection, serializer=SERIALIZER) for j in (traversal, garbage))
    deadline = time.monotonic() + 10  # the foreign job runs the plain RQ way, after the photos of its batch
    while garbage.get_status() != "failed" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert traversal.get_status() == garbage.get_status() == "failed"
    assert "InvalidJob" in traversal.latest_result().exc_string


def test_a_worker_on_a_redis_without_lmove_says_so_before_taking_a_job(redis_url, monkeypatch):
    connection = redis.Redis.from_url(redis_url)
    worker = BatchWorker([Queue("classify", connection=connection, serializer=SERIALIZER)], classifier=None,
                         connection=connection, name="old-redis")  # fmt: skip
    monkeypatch.setattr(worker, "get_redis_server_version", lambda: (6, 0, 16))
    with pytest.raises(RuntimeError, match=r"Redis 6\.0\.16 is too old: the classify worker needs 6\.2\.0 or newer"):
        worker.work(burst=True)
