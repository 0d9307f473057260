"""A retrain shares the machine with the classify worker: it runs at the lowest priority and pauses for photos.

Real parts: the tests' redis-server with real RQ jobs and registries, real Keras fits of a tiny model
with the `GiveWay` callback, and fresh Python processes for the priority (a niceness, once lowered,
cannot be raised again by an ordinary user: the test process keeps its own).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.registry import StartedJobRegistry

from carbot.keys import CLASSIFY_FUNC, SERIALIZER
from carbot.settings import Settings
from tests.conftest import TEST_LABELS, jpeg_bytes
from training import GiveWay, SharingPolicy, photos_in_progress, share_machine

QUEUE = "classify"
STEPS = 8


def wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.01)


def queue_photo(connection: redis.Redis) -> str:
    """A classify job as a bot queues it (no worker runs here, so it waits until the test removes it)."""
    queue = Queue(QUEUE, connection=connection, serializer=SERIALIZER)
    return queue.enqueue(CLASSIFY_FUNC, kwargs={"photo_key": "carbot:photo:x", "top_k": 3}).id


class Steps(keras.callbacks.Callback):
    """Counts the training steps done."""

    def __init__(self) -> None:
        super().__init__()
        self.done = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.done += 1


def fit_in_thread(give_way: GiveWay, steps: Steps) -> threading.Thread:
    """A tiny real model fitted for STEPS steps with the give-way callback, in a thread of its own."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).random((STEPS * 4, 4), dtype="float32")
    y = np.arange(STEPS * 4) % 3
    fit = {"batch_size": 4, "epochs": 1, "verbose": 0, "callbacks": [*give_way.callbacks(), steps]}
    thread = threading.Thread(target=model.fit, args=(x, y), kwargs=fit, daemon=True)
    thread.start()
    return thread


def test_photos_in_progress_counts_queued_taken_and_vouched_for_jobs(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    assert photos_in_progress(connection, QUEUE) == 0
    queue = Queue(QUEUE, connection=connection, serializer=SERIALIZER)
    queue_photo(connection)
    queue_photo(connection)
    assert photos_in_progress(connection, QUEUE) == 2
    connection.lmove(queue.key, queue.intermediate_queue_key)  # a worker taking one, as RQ's dequeue does
    assert photos_in_progress(connection, QUEUE) == 2
    started = StartedJobRegistry(QUEUE, connection=connection, serializer=SERIALIZER)
    server_now = float(connection.time()[0])
    connection.zadd(started.key, {"vouched:execution": server_now + 30})  # a worker classifying it
    connection.zadd(started.key, {"abandoned:execution": server_now - 30})  # its worker died: not ours to wait for
    assert photos_in_progress(connection, QUEUE) == 3
    assert photos_in_progress(connection, "another-queue") == 0


def test_training_pauses_while_a_photo_waits_and_resumes_when_it_is_gone(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    job_id = queue_photo(connection)
    give_way = GiveWay(connection, QUEUE, SharingPolicy(poll_s=0, pause_poll_s=0.01, pause_grace_s=600))
    steps = Steps()
    thread = fit_in_thread(give_way, steps)

    # Paused before its first step, and still asking Redis: no step is taken while the photo waits.
    wait_for(lambda: give_way.pauses == 1 and give_way.polls >= 5)
    assert steps.done == 0
    polls = give_way.polls
    wait_for(lambda: give_way.polls >= polls + 5)
    assert steps.done == 0 and thread.is_alive()

    Queue(QUEUE, connection=connection, serializer=SERIALIZER).remove(job_id)  # answered
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert steps.done == STEPS
    assert give_way.pauses == 1 and give_way.paused_s > 0 and not give_way.exhausted


def test_training_pauses_for_a_photo_being_classified(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    started = StartedJobRegistry(QUEUE, connection=connection, serializer=SERIALIZER)
    connection.zadd(started.key, {"job:execution": float(connection.time()[0]) + 600})
    give_way = GiveWay(connection, QUEUE, SharingPolicy(poll_s=0, pause_poll_s=0.01, pause_grace_s=600))
    steps = Steps()
    thread = fit_in_thread(give_way, steps)
    wait_for(lambda: give_way.pauses == 1 and give_way.polls >= 5)
    assert steps.done == 0
    connection.zrem(started.key, "job:execution")  # its batch ended
    thread.join(timeout=120)
    assert steps.done == STEPS and not give_way.exhausted


def test_pausing_is_bounded_so_a_retrain_always_finishes(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    queue_photo(connection)  # never answered: no worker
    policy = SharingPolicy(poll_s=0, pause_poll_s=0.01, max_pause_ratio=0.5, pause_grace_s=0.3)
    give_way = GiveWay(connection, QUEUE, policy)
    steps = Steps()
    thread = fit_in_thread(give_way, steps)
    thread.join(timeout=120)

    assert not thread.is_alive() and steps.done == STEPS
    assert give_way.exhausted
    assert give_way.pauses >= 1
    # The budget: grace plus ratio x time trained (a margin for one late wake-up of a loaded machine).
    assert give_way.allowed_pause_s() >= -0.5
    pauses, polls = give_way.pauses, give_way.polls
    give_way.between_steps()  # once exhausted, it never pauses or asks Redis again
    assert (give_way.pauses, give_way.polls) == (pauses, polls)


def test_an_unreachable_redis_never_stops_training(tmp_path: Path) -> None:
    # No retries: redis-py's default (10, backing off) would make each of the test's polls take seconds.
    gone = redis.Redis(unix_socket_path=str(tmp_path / "no-redis.sock"), socket_connect_timeout=1,
                       retry=Retry(NoBackoff(), 0))  # fmt: skip
    give_way = GiveWay(gone, QUEUE, SharingPolicy(poll_s=0))
    steps = Steps()
    fit_in_thread(give_way, steps).join(timeout=120)
    assert steps.done == STEPS and give_way.pauses == 0 and give_way.polls == STEPS


# A fresh process: a thread started before share_machine, one after, and TensorFlow's own pools.
_CHILD = """
import json, os, sys, threading
import redis
from carbot.settings import Settings
from training import share_machine
stop = threading.Event()
threading.Thread(target=stop.wait, daemon=True).start()
settings = Settings(redis_url=sys.argv[1], retrain_yield=sys.argv[2] == "on")
give_way = share_machine(settings, redis.Redis.from_url(sys.argv[1]))
threading.Thread(target=stop.wait, daemon=True).start()
if sys.argv[3] == "tf":
    import tensorflow as tf
    tf.reduce_sum(tf.matmul(tf.ones((256, 256)), tf.ones((256, 256)))).numpy()
tasks = {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}
print(json.dumps({"process": os.getpriority(os.PRIO_PROCESS, 0), "threads": list(tasks.values()),
                  "enabled": give_way.enabled, "callbacks": len(give_way.callbacks())}))
"""


def run_child(redis_url: str, yield_: str, tf: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-c", _CHILD, redis_url, yield_, tf], capture_output=True, text=True,
                          env=env, timeout=300, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread niceness is Linux's")
def test_the_retrain_process_and_all_its_threads_run_at_the_lowest_priority(redis_url: str) -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert mine < SharingPolicy().niceness, "the test process already runs at the lowest priority"
    child = run_child(redis_url, "on", "tf")
    assert child["process"] == SharingPolicy().niceness
    assert len(child["threads"]) > 3  # TensorFlow's pools are there ...
    assert set(child["threads"]) == {SharingPolicy().niceness}  # ... and every thread gives way
    assert child["enabled"] and child["callbacks"] == 1
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine  # the caller's own priority is untouched

    off = run_child(redis_url, "off", "no-tf")
    assert off["process"] == mine and set(off["threads"]) == {mine}
    assert not off["enabled"] and off["callbacks"] == 0


def test_retrain_gives_way_through_its_callbacks(redis_url: str, model_registry: Path, tmp_path: Path) -> None:
    from training import FeedbackPhoto, RetrainConfig, retrain

    registry = tmp_path / "models"
    shutil.copytree(model_registry, registry)
    photos = tmp_path / "photos"
    photos.mkdir()
    feedback = []
    for seed in range(30):
        path = photos / f"{seed}.jpg"
        path.write_bytes(jpeg_bytes(seed))
        feedback.append(FeedbackPhoto(sha256=f"{seed:064x}", path=path, label=TEST_LABELS[seed % len(TEST_LABELS)]))
    connection = redis.Redis.from_url(redis_url)
    queue_photo(connection)  # never answered: every pause runs to the (short) bound
    # This process's own niceness: a test must not lower the priority of the rest of the suite.
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    policy = SharingPolicy(niceness=mine, poll_s=0, pause_poll_s=0.01, max_pause_ratio=0, pause_grace_s=0.2)
    give_way = share_machine(Settings(redis_url=redis_url), connection, policy)
    outcome = retrain(registry, feedback, version="shared", config=RetrainConfig(epochs=1, finetune_fraction=1.0),
                      promote=False, variants=False, callbacks=give_way.callbacks())  # fmt: skip
    assert outcome.counts["feedback_train"] > 0
    assert give_way.pauses >= 1 and give_way.exhausted
