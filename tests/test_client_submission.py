"""How the bots' client sends photos to Redis: alone at once, together during a burst, each with its own outcome.

No worker runs here: what is checked is what reaches Redis, read back through RQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
import redis

from carbot.keys import photo_key
from model import Preprocessing
from tests.conftest import classify_queue, jpeg_bytes
from worker import ClassifyClient, PhotoRejected, QueueBusy, RejectReason, Submission
from worker._client import SUBMIT_GROUP


def commands(url: str, name: str) -> int:
    """How many `name` commands Redis has run since its statistics were reset."""
    return int(redis.Redis.from_url(url).info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))


async def test_photos_sent_at_once_reach_redis_in_a_few_transactions(redis_url):
    photos = [jpeg_bytes(seed) for seed in range(3 * SUBMIT_GROUP)]
    redis.Redis.from_url(redis_url).config_resetstat()
    async with ClassifyClient(redis_url, submit_threads=4) as client:
        waiting = [asyncio.create_task(client.classify(photo, timeout_s=30)) for photo in photos]
        queue = classify_queue(redis_url)
        while len(queue.job_ids) < len(photos):  # (LRANGE: the client's depth checks are LLEN)
            await asyncio.sleep(0.01)
        # The first four went alone, each on a thread of its own; the rest in groups of SUBMIT_GROUP.
        assert commands(redis_url, "exec") <= 4 + -(-(len(photos) - 4) // SUBMIT_GROUP)
        assert commands(redis_url, "llen") == commands(redis_url, "exec")  # one depth check a group
        connection = redis.Redis.from_url(redis_url)
        for job in queue.jobs:  # every job landed with its own photo
            assert connection.exists(job.kwargs["photo"])
        assert {job.kwargs["photo"] for job in queue.jobs} == {photo_key(photo) for photo in photos}
        for task in waiting:
            task.cancel()


def test_each_photo_of_a_group_gets_its_own_outcome(redis_url, monkeypatch):
    good = [jpeg_bytes(seed) for seed in range(3)]
    corrupt = jpeg_bytes(7)[:100]
    odd = jpeg_bytes(8)  # its reduction fails unexpectedly (a decoder bug): that photo alone is refused
    import worker._client as client_module

    reduce = client_module.reduce_for_queue

    def reduce_failing_on_odd(photo: bytes, preprocessing: Preprocessing) -> bytes:
        if photo == odd:
            raise RuntimeError("a decoder bug")
        return reduce(photo, preprocessing)

    monkeypatch.setattr(client_module, "reduce_for_queue", reduce_failing_on_odd)
    client = ClassifyClient(redis_url, queue_limit=2, preprocessing=Preprocessing(image_size=32))
    try:
        outcomes = client.submit_group([Submission(photo) for photo in (b"", good[0], corrupt, odd, good[1], good[2])])
    finally:
        asyncio.run(client.aclose())

    empty, first, broken, failed, second, third = outcomes
    assert isinstance(empty, PhotoRejected) and empty.reason == RejectReason.EMPTY
    assert isinstance(broken, PhotoRejected) and broken.reason == RejectReason.NOT_AN_IMAGE
    assert isinstance(failed, PhotoRejected) and failed.reason == RejectReason.UNREADABLE
    assert isinstance(third, QueueBusy)  # the queue's room (2) went to the first two good photos
    assert classify_queue(redis_url).job_ids == [first, second]


async def test_a_photo_whose_sender_gave_up_before_it_was_sent_is_not_queued(redis_url, monkeypatch):
    release = threading.Event()
    submit_group = ClassifyClient.submit_group

    def held(self, submissions):
        release.wait(10)  # the only thread stays busy until the test lets it go
        return submit_group(self, submissions)

    monkeypatch.setattr(ClassifyClient, "submit_group", held)
    photos = [jpeg_bytes(seed) for seed in range(3)]
    async with ClassifyClient(redis_url, submit_threads=1) as client:
        first = asyncio.create_task(client.classify(photos[0], timeout_s=30))
        await asyncio.sleep(0.05)  # on its way, on the only thread
        given_up = asyncio.create_task(client.classify(photos[1], timeout_s=30))
        last = asyncio.create_task(client.classify(photos[2], timeout_s=30))
        await asyncio.sleep(0.05)  # both waiting for the thread
        given_up.cancel()
        release.set()
        queue = classify_queue(redis_url)
        while queue.count < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert [job.kwargs["photo"] for job in queue.jobs] == [photo_key(photos[0]), photo_key(photos[2])]
        assert not redis.Redis.from_url(redis_url).exists(photo_key(photos[1]))
        with pytest.raises(asyncio.CancelledError):
            await given_up
        first.cancel()
        last.cancel()


def test_groups_sent_at_once_never_fill_the_same_room_in_the_queue(redis_url, monkeypatch):
    """Four groups of three on four threads at once, against a queue limit of 3: three photos are queued and
    the other nine hear "busy". Each group reads the queue's length, and before the room it found was held
    for it, all four read 0 and queued twelve (the load test saw a queue of 8 with a limit of 3)."""
    together = threading.Barrier(4, timeout=2)
    reduced = ClassifyClient._reduced

    def reduced_together(self, photo):
        # Held until every group has read the room left: how four threads can interleave on a busy machine.
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()
        return reduced(self, photo)

    monkeypatch.setattr(ClassifyClient, "_reduced", reduced_together)
    client = ClassifyClient(redis_url, queue_limit=3, preprocessing=Preprocessing(image_size=32))
    groups = [[Submission(jpeg_bytes(10 * group + seed)) for seed in range(3)] for group in range(4)]
    outcomes: list = []
    try:
        threads = [threading.Thread(target=lambda g=g: outcomes.extend(client.submit_group(g))) for g in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(outcomes) == 12
        assert len(classify_queue(redis_url).job_ids) == 3
        assert sum(isinstance(outcome, str) for outcome in outcomes) == 3
        assert sum(isinstance(outcome, QueueBusy) for outcome in outcomes) == 9

        # Every group gave back the room it held: with the queue emptied, all of it is there again.
        classify_queue(redis_url).empty()
        again = client.submit_group([Submission(jpeg_bytes(100 + seed)) for seed in range(3)])
        assert all(isinstance(outcome, str) for outcome in again), again
    finally:
        asyncio.run(client.aclose())


def test_a_group_whose_photos_just_joined_the_queue_does_not_hold_their_room_twice(redis_url, monkeypatch):
    """Limit 2: one photo is in the queue, its transaction's reply still on its way back, when another comes.
    The second is queued. Had the first group's room been given back only after the reply, the second would
    have counted that photo twice (in the queue and held) and heard "busy" (CI: three photos at once against
    a limit of 3 left one out)."""
    execute = redis.client.Pipeline.execute

    def slow_reply(self, *args, **kwargs):
        result = execute(self, *args, **kwargs)
        time.sleep(0.5)  # the reply on its way back, the photos already queued
        return result

    monkeypatch.setattr(redis.client.Pipeline, "execute", slow_reply)
    client = ClassifyClient(redis_url, queue_limit=2)
    queue = classify_queue(redis_url)
    try:
        first = threading.Thread(target=client.submit_group, args=([Submission(jpeg_bytes(1))],))
        first.start()
        deadline = time.monotonic() + 10
        while queue.count < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        (second,) = client.submit_group([Submission(jpeg_bytes(2))])
        first.join(10)
        assert isinstance(second, str), second
        assert queue.count == 2
    finally:
        asyncio.run(client.aclose())
