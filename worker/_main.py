"""Running a batch worker process: the model source, the classifier and RQ's loop, wired together."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from rq import Queue, Worker

from carbot.settings import Settings
from worker._batch_worker import BatchWorker
from worker._contract import SERIALIZER
from worker._inference import BatchClassifier, ModelSource


def run_worker(
    settings: Settings,
    redis_url: str,
    *,
    artefact: Path | None = None,
    burst: bool = False,
    name: str | None = None,
    log_level: str = "INFO",
) -> bool:
    """Serve the classify queue until stopped (SIGTERM or Ctrl+C finish the current batch first).

    The model is the registry's active version, reloaded between batches when it
    changes, unless a fixed `artefact` directory is given. Returns whether any job ran.
    """
    source = (
        ModelSource(artefact=artefact, max_batch=settings.max_batch, runtime=settings.runtime)
        if artefact is not None
        else ModelSource(registry=settings.registry_dir, max_batch=settings.max_batch, runtime=settings.runtime)
    )
    source.current()  # load and compile before taking jobs, so the first photo doesn't pay for it
    classifier = BatchClassifier(source, decode_threads=settings.decode_threads)
    worker = BatchWorker(
        [settings.classify_queue],
        classifier=classifier,
        max_batch=settings.max_batch,
        max_wait_ms=settings.max_wait_ms,
        heartbeat_ttl_s=settings.heartbeat_ttl_s,
        connection=redis.Redis.from_url(redis_url),
        name=name,
        maintenance_interval=settings.maintenance_interval_s,
        # An idle worker wakes every maintenance interval, so a dead worker's jobs are found promptly.
        worker_ttl=settings.maintenance_interval_s + 15,
    )
    worker.log_result_lifespan = False
    try:
        return worker.work(burst=burst, logging_level=log_level)
    finally:
        classifier.close()


def workers_listening(connection: redis.Redis, queue_name: str) -> int:
    """How many live workers serve `queue_name`."""
    return Worker.count(queue=Queue(queue_name, connection=connection, serializer=SERIALIZER))


def spawn_worker(
    redis_url: str, log_file: Path, extra_env: dict[str, str] | None = None, *, command: str = "worker"
) -> subprocess.Popen:
    """Start `carbot <command>` (`worker` or `train-worker`) on `redis_url` as a child process logging to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "REDIS_URL": redis_url, **(extra_env or {})}
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "carbot", command], env=env, stdout=log, stderr=subprocess.STDOUT
        )


@contextlib.contextmanager
def worker_running(settings: Settings, redis_url: str, *, train: bool = False) -> Iterator[None]:
    """Make sure a worker serves the queue: use a running one, else start one for the duration of the block.

    With `train`, the same for the train queue and `carbot train-worker` (a light process until a retrain runs).
    """
    queue, command = (settings.train_queue, "train-worker") if train else (settings.classify_queue, "worker")
    if workers_listening(redis.Redis.from_url(redis_url), queue):
        yield
        return
    log_file = settings.data_dir / "run" / f"{command}.log"
    print(f"(no {command} was running: started one in the background, log in {log_file})", file=sys.stderr)
    process = spawn_worker(redis_url, log_file, command=command)
    if train:
        # A train worker starts in a second or two (no TensorFlow until a run): wait, so /retrain finds it.
        _wait_for_worker(redis_url, queue, process, timeout_s=15)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)  # warm shutdown: the current batch (or retrain) finishes first
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_for_worker(redis_url: str, queue: str, process: subprocess.Popen, *, timeout_s: float) -> None:
    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while not workers_listening(connection, queue) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
