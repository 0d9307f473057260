"""Running a batch worker process: the model source, the classifier and RQ's loop, wired together.

Also the embedded mode's worker children: `worker_running` starts `carbot worker` (or
`carbot train-worker`) next to a chat on the private Redis and keeps it running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from rq import Queue, Worker

from carbot.connections import redis_connection
from carbot.keys import SERIALIZER
from carbot.services import SupervisedProcess
from carbot.settings import Settings
from worker._batch_worker import BatchWorker
from worker._inference import BatchClassifier, ModelSource

log = logging.getLogger(__name__)

# RQ's loop ends by itself when Redis fails outside its idle dequeue (in a batch, or between batches): it is
# started again, the model still loaded, once Redis answers. The pause doubles from the first value to the
# second while Redis stays away, and starts again from the first after a loop that served this long.
LOOP_RESTART_BACKOFF_S = (1.0, 30.0)
LOOP_HEALTHY_AFTER_S = 60.0
# RQ's own pause between failed dequeues doubles up to 60 s; after an outage photos wait on it, so less.
MAX_REDIS_WAIT_S = 5.0


class ServingWorker(BatchWorker):
    """The batch worker as `carbot worker` runs it: it tells a stop that was asked for from a loop that failed."""

    max_connection_wait_time = MAX_REDIS_WAIT_S

    def __init__(self, *args, stop_requested: threading.Event, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = stop_requested

    def handle_warm_shutdown_request(self) -> None:
        self.stop_requested.set()
        super().handle_warm_shutdown_request()


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
    changes, unless a fixed `artefact` directory is given. A Redis outage does not end
    the process: RQ's loop is started again once Redis answers. Returns whether any job ran.
    """
    source = (
        ModelSource(artefact=artefact, max_batch=settings.max_batch, runtime=settings.runtime)
        if artefact is not None
        else ModelSource(registry=settings.registry_dir, max_batch=settings.max_batch, runtime=settings.runtime)
    )
    source.current()  # load and compile before taking jobs, so the first photo doesn't pay for it
    classifier = BatchClassifier(source, decode_threads=settings.decode_threads)
    # An idle worker wakes every maintenance interval (worker_ttl below), so a dead worker's jobs are found
    # promptly; RQ's idle dequeue blocks worker_ttl - 15 s, and the socket timeout must outlast it.
    worker_ttl = settings.maintenance_interval_s + 15
    connection = redis_connection(redis_url, blocking_s=worker_ttl - 15)
    stop_requested = threading.Event()
    backoff = LOOP_RESTART_BACKOFF_S[0]
    worked = False
    try:
        while True:
            worker = ServingWorker(
                [settings.classify_queue],
                classifier=classifier,
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                heartbeat_ttl_s=settings.heartbeat_ttl_s,
                connection=connection,
                name=name,
                maintenance_interval=settings.maintenance_interval_s,
                worker_ttl=worker_ttl,
                stop_requested=stop_requested,
            )
            worker.log_result_lifespan = False
            started = time.monotonic()
            try:
                worked = worker.work(burst=burst, logging_level=log_level) or worked
            except (redis.RedisError, OSError) as exc:  # registering or tearing down met the outage
                log.warning("Redis failed while the worker started or stopped: %s", exc)
            if burst or stop_requested.is_set():
                return worked
            if time.monotonic() - started >= LOOP_HEALTHY_AFTER_S:
                backoff = LOOP_RESTART_BACKOFF_S[0]
            log.warning("the worker's loop ended without a stop being asked for (Redis unreachable?): "
                        "starting it again once Redis answers")  # fmt: skip
            backoff = _wait_for_redis(worker, stop_requested, backoff)
            if stop_requested.is_set():
                return worked
    finally:
        classifier.close()


def _wait_for_redis(worker: Worker, stop_requested: threading.Event, backoff: float) -> float:
    """Pause, then mark `worker` dead in Redis (so its name is free again), until that works or a stop comes.

    Returns the next pause. SIGTERM and Ctrl+C during the wait are a stop, as they are in RQ's loop.
    """
    if worker.pubsub_thread is not None and worker.pubsub_thread.is_alive():
        worker.pubsub_thread.stop()  # RQ's command listener; the next loop starts its own
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, lambda *_: stop_requested.set())
    try:
        while not stop_requested.wait(backoff):
            backoff = min(backoff * 2, LOOP_RESTART_BACKOFF_S[1])
            try:
                worker.register_death()
            except (redis.RedisError, OSError) as exc:
                log.warning("Redis still unreachable (%s); next try in %.0f s", exc, backoff)
                continue
            log.warning("Redis answers again: the worker takes photos again")
            return backoff
        return backoff
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


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
def worker_running(settings: Settings, redis_url: str, *, train: bool = False) -> Iterator[SupervisedProcess | None]:
    """Make sure a worker serves the queue: use a running one, else start one for the duration of the block.

    A worker started here is supervised: if it dies (killed, crashed, out of memory) it is started
    again, after a pause that grows while it keeps dying. The block gets that `SupervisedProcess`, or
    None when another worker was already serving. At the end the worker gets SIGTERM, RQ's warm
    shutdown: its current batch (or retrain) finishes first.
    With `train`, the same for the train queue and `carbot train-worker` (a light process until a retrain runs).
    """
    queue, command = (settings.train_queue, "train-worker") if train else (settings.classify_queue, "worker")
    if workers_listening(redis_connection(redis_url), queue):
        yield None
        return
    log_file = settings.data_dir / "run" / f"{command}.log"
    print(f"(no {command} was running: started one in the background, log in {log_file})", file=sys.stderr)
    child = SupervisedProcess(f"carbot {command}", lambda: spawn_worker(redis_url, log_file, command=command)).start()
    if train:
        # A train worker starts in a second or two (no TensorFlow until a run): wait, so /retrain finds it.
        _wait_for_worker(redis_url, queue, child.process, timeout_s=15)
    try:
        yield child
    finally:
        child.stop(timeout_s=30)


def _wait_for_worker(redis_url: str, queue: str, process: subprocess.Popen, *, timeout_s: float) -> None:
    connection = redis_connection(redis_url)
    deadline = time.monotonic() + timeout_s
    while not workers_listening(connection, queue) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
