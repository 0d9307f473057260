"""Embedded mode keeps its workers alive: a worker child that dies is started again, and the next photo is answered.

`carbot shell`, and `carbot telegram` / `carbot discord` without REDIS_URL, start a private
Redis and `carbot worker` / `carbot train-worker` children through `services.redis_url` and
`worker_running`; the test goes through exactly those, with real processes and the default
settings (the first restart comes 1 s after a death).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import redis
from rq import Queue, Worker

from carbot import services
from carbot.connections import redis_connection
from carbot.keys import SERIALIZER
from carbot.settings import Settings
from tests.conftest import jpeg_bytes
from worker import Classification, ClassifyClient, classify_files_sync
from worker._main import worker_running, workers_listening


@pytest.fixture
def embedded_settings(monkeypatch, model_registry, tmp_path) -> Settings:
    """The settings a `carbot shell` without REDIS_URL reads; its children inherit the same environment."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("CARBOT_REDIS_URL", raising=False)
    monkeypatch.setenv("CARBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CARBOT_MODEL_REGISTRY", str(model_registry))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return Settings()


def registered_pids(connection, queue_name: str) -> set[int]:
    """The pids of the workers RQ lists on `queue_name` (a killed one lingers until its key expires)."""
    return {worker.pid for worker in Worker.all(queue=Queue(queue_name, connection=connection, serializer=SERIALIZER))}


def redis_servers(settings: Settings) -> list[psutil.Process]:
    """The embedded redis-server of `settings`' data folder (a child of this process, on its socket)."""
    socket = str(services.PrivateRedis(settings.data_dir.resolve() / "run").socket)
    found = []
    for child in psutil.Process().children():
        try:
            if "redis-server" in child.name() and socket in " ".join(child.cmdline()):  # its title names it
                found.append(child)
        except psutil.NoSuchProcess:  # reaped meanwhile
            continue
    return found


def answers(url: str) -> bool:
    try:
        return bool(redis_connection(url, timeout_s=1).ping())
    except (redis.RedisError, OSError):
        return False


def wait_until(condition, timeout_s: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)


def test_a_killed_worker_child_is_restarted_and_the_next_photo_answered(embedded_settings, caplog):
    settings = embedded_settings
    caplog.set_level(logging.WARNING, logger="carbot.services")
    with (
        services.redis_url(settings) as url,
        worker_running(settings, url) as classify_worker,
        worker_running(settings, url, train=True) as train_worker,
    ):
        assert classify_worker is not None and train_worker is not None
        connection = redis_connection(url)
        wait_until(lambda: workers_listening(connection, settings.classify_queue) == 1, what="worker registered")
        killed = classify_worker.process.pid
        os.kill(killed, signal.SIGKILL)
        # A photo sent in the second of the crash waits for the new worker: 1 s, then its start (TensorFlow, the
        # model), 10-20 s on this shared 2-core machine. The deadline is raised from 30 s so a busier machine
        # cannot fail the test; the next photo below runs at the default deadline.
        patient = settings.model_copy(update={"request_timeout_s": 120})
        submitted = time.monotonic()
        [outcome] = classify_files_sync(lambda: ClassifyClient.from_settings(patient, url), [jpeg_bytes(1)])
        answered_s = time.monotonic() - submitted
        assert isinstance(outcome, Classification), outcome
        assert classify_worker.restarts == 1 and classify_worker.process.pid != killed
        [outcome] = classify_files_sync(lambda: ClassifyClient.from_settings(settings, url), [jpeg_bytes(3)])
        assert isinstance(outcome, Classification), outcome

        killed_trainer = train_worker.process.pid
        os.kill(killed_trainer, signal.SIGKILL)
        wait_until(lambda: train_worker.restarts == 1, what="train worker restarted")
        wait_until(lambda: train_worker.process.pid in registered_pids(connection, settings.train_queue),
                   what="the new train worker registered")  # fmt: skip

        # The private redis-server itself: killed, started again on the same socket; the workers reconnect.
        [server] = redis_servers(settings)
        server.kill()
        wait_until(lambda: [p.pid for p in redis_servers(settings)] not in ([], [server.pid]),
                   what="redis-server restarted")  # fmt: skip
        wait_until(lambda: answers(url), what="the new redis-server answers")
        [outcome] = classify_files_sync(lambda: ClassifyClient.from_settings(settings, url), [jpeg_bytes(2)])
        assert isinstance(outcome, Classification), outcome
        children = (classify_worker.process, train_worker.process)
    # Leaving the block is still RQ's warm shutdown (SIGTERM, exit 0), and nothing is started again after it.
    assert [child.returncode for child in children] == [0, 0]
    assert (classify_worker.restarts, train_worker.restarts) == (1, 1)
    deaths = [r.getMessage() for r in caplog.records if "exited with status -9" in r.getMessage()]
    assert len(deaths) == 3, caplog.text
    assert not redis_servers(settings)  # the private server stopped with the block
    print(f"\nworker SIGKILLed: restarted, a photo submitted right after the kill answered in {answered_s:.1f} s")


def test_a_child_that_keeps_crashing_is_restarted_with_growing_pauses_not_in_a_tight_loop(caplog):
    # Pauses shortened from the defaults (1 s doubling to 30 s) so the test sees several restarts in seconds.
    caplog.set_level(logging.WARNING, logger="carbot.services")
    child = services.SupervisedProcess(
        "crasher",
        lambda: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]),
        first_backoff_s=0.2,
        max_backoff_s=0.8,
    ).start()
    try:
        wait_until(lambda: child.restarts >= 3, timeout_s=60, what="three restarts")
        time.sleep(2.0)
    finally:
        child.stop(timeout_s=5)
    restarts = child.restarts
    # 0.2 + 0.4 + 0.8 + 0.8 + ...: about 5 restarts in those seconds; a tight loop would make hundreds.
    assert 3 <= restarts <= 10, restarts
    exits = [r for r in caplog.records if "crasher" in r.getMessage() and "exited with status 3" in r.getMessage()]
    assert len(exits) >= restarts
    pauses = [float(r.getMessage().rsplit("again in ", 1)[1].split(" ")[0]) for r in exits]
    assert pauses[:3] == sorted(pauses[:3]) and pauses[0] < pauses[2]
    time.sleep(0.5)
    assert child.restarts == restarts  # stopped means stopped
