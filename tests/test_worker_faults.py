"""Workers that die or are stopped, a full queue and late answers: no photo is lost or answered late."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from carbot.keys import SERIALIZER, STATS_KEY
from tests.conftest import classify_queue, frozen_in_a_batch, jpeg_bytes, noisy_jpeg, started_jobs
from worker import Classification, ClassifyClient, ClassifyTimeout, QueueBusy


@pytest.fixture(scope="module")
def big_photos() -> list[bytes]:
    return [noisy_jpeg(seed) for seed in range(40)]


async def test_sigkill_mid_batch_loses_no_photo(redis_url, start_worker, big_photos):
    first = start_worker("doomed", max_batch=4)
    # The rescuer starts only after the kill (seconds of TensorFlow import): a deadline to cover that.
    async with ClassifyClient(redis_url, timeout_s=90) as client:
        answers = asyncio.gather(*(client.classify(photo) for photo in big_photos), return_exceptions=True)
        in_flight = await frozen_in_a_batch(redis_url, first)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        # Started off the event loop: the client keeps reading results while the rescuer loads.
        await asyncio.get_running_loop().run_in_executor(None, lambda: start_worker("rescuer", max_batch=4))
        outcomes = await answers

    assert all(isinstance(o, Classification) for o in outcomes), [
        o for o in outcomes if not isinstance(o, Classification)
    ]
    connection = redis.Redis.from_url(redis_url)
    for job_id in in_flight:  # the photos the dead worker held were answered by the next one
        job = Job.fetch(job_id, connection=connection, serializer=SERIALIZER)
        assert job.get_status() == "finished"
        assert job.latest_result().worker_name == "rescuer"
    assert FailedJobRegistry(queue=classify_queue(redis_url)).count == 0


async def test_a_photo_taken_by_a_worker_that_died_before_starting_it_is_answered(redis_url, start_worker):
    queue = classify_queue(redis_url)
    async with ClassifyClient(redis_url) as client:  # the default deadline: 30 s
        answer = asyncio.ensure_future(client.classify(jpeg_bytes(3)))
        while queue.count == 0:
            await asyncio.sleep(0.01)
        # What a worker's dequeue does before it starts the job; this one dies right after.
        queue.connection.lmove(queue.key, queue.intermediate_queue_key)
        start_worker()
        started = time.monotonic()
        prediction = await answer

    assert isinstance(prediction, Classification)
    # RQ's own cleanup alone would take over a minute (and the person would be told "too slow").
    assert time.monotonic() - started < 30
    assert queue.intermediate_queue.get_job_ids() == []


async def test_a_failed_wake_up_of_the_result_listener_does_not_fail_the_photo(redis_url, start_worker, monkeypatch):
    async with ClassifyClient(redis_url, timeout_s=60) as client:
        first = asyncio.ensure_future(client.classify(jpeg_bytes(1)))  # no worker yet: the listener blocks in XREAD
        listener = client._listener
        while not listener._reading:
            await asyncio.sleep(0.001)
        attempts = []

        def stalled_pipeline(*args, **kwargs):
            attempts.append(1)
            raise redis.TimeoutError("Timeout reading from socket")  # what a stalled event loop looks like

        monkeypatch.setattr(listener._redis, "pipeline", stalled_pipeline)
        second = asyncio.ensure_future(client.classify(jpeg_bytes(2)))  # its registration tries the wake-up
        while not attempts and not second.done():
            await asyncio.sleep(0.001)
        await asyncio.get_running_loop().run_in_executor(None, start_worker)
        answers = await asyncio.gather(first, second, return_exceptions=True)

    assert attempts
    assert all(isinstance(answer, Classification) for answer in answers), answers


async def test_sigterm_finishes_the_batch_then_exits(redis_url, start_worker, big_photos):
    worker = start_worker("polite", max_batch=4)
    async with ClassifyClient(redis_url, timeout_s=90) as client:
        answers = asyncio.gather(*(client.classify(photo) for photo in big_photos), return_exceptions=True)
        in_flight = await started_jobs(redis_url)
        worker.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.get_running_loop().run_in_executor(None, worker.process.wait, 30)

        assert exit_code == 0
        connection = redis.Redis.from_url(redis_url)
        for job_id in in_flight:
            assert Job.fetch(job_id, connection=connection, serializer=SERIALIZER).get_status() == "finished"
        queue = classify_queue(redis_url)
        assert StartedJobRegistry(queue=queue).count == 0
        assert FailedJobRegistry(queue=queue).count == 0
        assert queue.count > 0  # the rest waits, untouched, for the next worker
        assert "warm shut down" in worker.log()

        start_worker("next")
        outcomes = await answers
    assert all(isinstance(o, Classification) for o in outcomes), [
        o for o in outcomes if not isinstance(o, Classification)
    ]


async def test_full_queue_answers_busy_at_once(redis_url):
    async with ClassifyClient(redis_url, queue_limit=3) as client:
        waiting = [asyncio.create_task(client.classify(jpeg_bytes(seed), timeout_s=30)) for seed in range(3)]
        deadline = time.monotonic() + 30
        while classify_queue(redis_url).count < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(QueueBusy, match="try again"):
            await client.classify(jpeg_bytes(10))
        assert time.monotonic() - started < 5  # prompt, not after the request timeout
        for task in waiting:
            task.cancel()
    assert classify_queue(redis_url).count == 3  # the refused photo was never queued


async def test_deadline_gives_timeout_and_the_worker_skips_the_job(redis_url, start_worker):
    async with ClassifyClient(redis_url) as client:
        with pytest.raises(ClassifyTimeout):
            await client.classify(jpeg_bytes(5), timeout_s=0.5)
        start_worker()
        # A fresh photo submitted now is answered; the stale one was failed as expired, not computed.
        assert isinstance(await client.classify(jpeg_bytes(6)), Classification)

    connection = redis.Redis.from_url(redis_url)
    failed = FailedJobRegistry(queue=classify_queue(redis_url)).get_job_ids()
    assert len(failed) == 1
    result = Job.fetch(failed[0], connection=connection, serializer=SERIALIZER).latest_result()
    assert "JobExpired" in result.exc_string
    counters = connection.hgetall(STATS_KEY)
    assert int(counters[b"expired"]) == 1
    assert int(counters[b"computed"]) == 1
