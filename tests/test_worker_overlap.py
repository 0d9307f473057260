"""A batch finishes (results, failures, counters) on a thread of its own while the next batch is computed.

The worker runs in this process, on the test's Redis and the tiny test model, so that the
test can hold a batch's finishing and see what happens meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from carbot.keys import SERIALIZER, STATS_KEY, starts_key
from tests.conftest import jpeg_bytes
from worker import BatchClassifier, BatchWorker, ClassifyClient, ModelSource

HOLD_TIMEOUT_S = 20.0


class WatchedWorker(BatchWorker):
    """A BatchWorker that records when each batch is classified and finished, and runs `hold` before a finish."""

    def __init__(self, *args, hold: Callable[[list[str]], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.events: list[tuple[str, list[str]]] = []
        self.classifying = threading.Event()  # set as every batch after the first begins its forward pass

    def start_jobs(self, batch, *args):
        self.current = [job.id for job, _ in batch]
        return super().start_jobs(batch, *args)

    def classify(self, requests):
        self.events.append(("classify", self.current))
        if len(self.events) > 1:
            self.classifying.set()
        return super().classify(requests)

    def finish_jobs(self, finished) -> None:
        ids = [job.id for job, *_ in finished]
        self.hold(ids)
        super().finish_jobs(finished)
        self.events.append(("finished", ids))


def submit(redis_url: str, photos: list[bytes]) -> list[str]:
    """Queue `photos` (no worker runs yet) and return their job ids, in queue order."""
    client = ClassifyClient(redis_url)
    return [client.submit(photo) for photo in photos]


def run_in_burst(worker: BatchWorker) -> None:
    """Run `worker` until the queue is empty, in a thread (RQ installs no signal handlers there)."""
    thread = threading.Thread(target=worker.work, kwargs={"burst": True})
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()


def worker_on(redis_url: str, model_registry: Path, max_batch: int, hold, **kwargs) -> WatchedWorker:
    connection = redis.Redis.from_url(redis_url)
    source = ModelSource(registry=model_registry, max_batch=max_batch)
    source.current()
    return WatchedWorker(
        [Queue("classify", connection=connection, serializer=SERIALIZER)],
        classifier=BatchClassifier(source, decode_threads=2),
        max_batch=max_batch,
        max_wait_ms=0,
        connection=connection,
        name="watched",
        hold=hold,
        **kwargs,
    )


def test_the_next_batch_is_computed_while_the_last_one_finishes_and_both_stay_vouched_for(redis_url, model_registry):
    connection = redis.Redis.from_url(redis_url)
    ids = submit(redis_url, [jpeg_bytes(seed) for seed in range(8)])
    ttl_s = 1.0  # shortened so that the hold outlasts it twice in a few seconds; the pulse beats every ttl / 5
    seen: dict[str, object] = {}

    def hold(finishing: list[str]) -> None:
        if "came" in seen:
            return
        seen["came"] = worker.classifying.wait(HOLD_TIMEOUT_S)
        time.sleep(2.5 * ttl_s)  # both batches now live on the pulse alone
        now = connection.time()
        members = connection.zrange(StartedJobRegistry(queue=worker.queues[0]).key, 0, -1, withscores=True)
        seen["finishing"] = finishing
        seen["vouched"] = {member.decode().split(":")[0] for member, score in members if score > now[0] + now[1] / 1e6}

    worker = worker_on(redis_url, model_registry, max_batch=4, hold=hold, heartbeat_ttl_s=ttl_s)
    run_in_burst(worker)

    # Batch 1's finish was held until batch 2's forward pass began: the model did not wait for it.
    assert seen["came"] is True
    assert seen["finishing"] == ids[:4]
    # Meanwhile the pulse kept both batches in the StartedJobRegistry, past twice their heartbeat TTL.
    assert seen["vouched"] == set(ids)
    assert [kind for kind, _ in worker.events] == ["classify", "classify", "finished", "finished"]
    # The burst ended only once the last batch had finished: every job has its result, counted once.
    jobs = Job.fetch_many(ids, connection=connection, serializer=SERIALIZER)
    assert [job.get_status() for job in jobs] == ["finished"] * 8
    assert all(job.latest_result().return_value["top_k"] for job in jobs)
    assert int(connection.hget(STATS_KEY, "photos")) == 8 and int(connection.hget(STATS_KEY, "batches")) == 2
    assert StartedJobRegistry(queue=worker.queues[0]).count == 0


def test_a_suspect_photo_is_computed_only_once_the_batch_before_it_has_finished(redis_url, model_registry):
    """A photo that was running when a worker died may kill this one too: nothing else may be unfinished then."""
    connection = redis.Redis.from_url(redis_url)
    ids = submit(redis_url, [jpeg_bytes(seed) for seed in range(5)])
    connection.set(starts_key(ids[4]), 1)  # started once before, by a worker that never finished it

    def hold(finishing: list[str]) -> None:
        if finishing == ids[:4]:
            time.sleep(1.0)  # a slow finish: without the wait, the suspect's forward pass would begin within it

    worker = worker_on(redis_url, model_registry, max_batch=8, hold=hold)
    run_in_burst(worker)

    assert worker.events == [
        ("classify", ids[:4]),
        ("finished", ids[:4]),
        ("classify", ids[4:]),
        ("finished", ids[4:]),
    ]
    jobs = Job.fetch_many(ids, connection=connection, serializer=SERIALIZER)
    assert [job.get_status() for job in jobs] == ["finished"] * 5
