"""An attacker who can write to Redis cannot make a worker run code.

RQ imports whatever function a job names, and the callbacks a job names (on a
failure, and when its worker is found dead). The tests plant such jobs on both
queues, through RQ's own API with the project's JSON serializer, in front of
real `carbot worker` and `carbot train-worker` processes. Every function they
name lives in a module the tests write (`planted.py`, on the workers' path):
importing it, or calling anything in it, leaves a file behind. The standard
library names (`os.system`, `subprocess.getoutput`, `builtins.eval`) are given
a command that would leave the same kind of file. Each job must be failed as
refused, and no file may appear.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.callbacks import Callback
from rq.job import Job
from rq.registry import FailedJobRegistry

from carbot.jobs import REFUSED
from carbot.keys import CLASSIFY_FUNC, RETRAIN_FUNC, SERIALIZER
from tests.conftest import WorkerProcess, jpeg_bytes, worker_env
from worker import Classification, ClassifyClient

PLANTED = """
from pathlib import Path
MARKERS = Path({markers!r})
(MARKERS / "imported").touch()


def run(*args, **kwargs):
    (MARKERS / "called").touch()


def on_failure(*args, **kwargs):
    (MARKERS / "failure-callback").touch()


def on_success(*args, **kwargs):
    (MARKERS / "success-callback").touch()
"""


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """A folder the planted code would write into, and the module it lives in, on the workers' path."""
    folder = tmp_path / "markers"
    folder.mkdir()
    code = tmp_path / "planted-code"
    code.mkdir()
    (code / "planted.py").write_text(PLANTED.format(markers=str(folder)))
    return folder


def attacks(markers: Path) -> list[tuple[str, dict]]:
    """(what, enqueue_call keyword arguments) of each planted job."""
    touch = f"touch {markers / 'shell'}"
    return [
        ("os.system", {"func": "os.system", "args": (touch,)}),
        ("subprocess.getoutput", {"func": "subprocess.getoutput", "args": (touch,)}),
        ("builtins.eval", {"func": "builtins.eval", "args": (f"__import__('os').system({touch!r})",)}),
        ("a planted module", {"func": "planted.run"}),
        # The project's own function, with callbacks: RQ would call them on the job's failure or success.
        ("callbacks", {"func": CLASSIFY_FUNC, "kwargs": {"photo": "carbot:photo:" + "0" * 64},
                       "on_failure": Callback("planted.on_failure"), "on_success": Callback("planted.on_success")}),
    ]  # fmt: skip


def start(command: str, env: dict[str, str], tmp_path: Path, name: str) -> WorkerProcess:
    worker = WorkerProcess(env, tmp_path / f"{name}.log", name, command=command)
    worker.wait_until_listening(redis.Redis.from_url(env["REDIS_URL"]))
    return worker


def planted_env(redis_url: str, registry: Path, tmp_path: Path, markers: Path) -> dict[str, str]:
    env = worker_env(redis_url, registry, tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join([str(markers.parent / "planted-code"), env.get("PYTHONPATH", "")])
    return env


def queue_served_by(command: str, redis_url: str) -> Queue:
    name = "classify" if command == "worker" else "train"
    return Queue(name, connection=redis.Redis.from_url(redis_url), serializer=SERIALIZER)


def wait_until_failed(queue: Queue, job_ids: list[str], timeout: float = 60) -> None:
    registry = FailedJobRegistry(queue=queue)
    deadline = time.monotonic() + timeout
    while set(job_ids) - set(registry.get_job_ids()):
        assert time.monotonic() < deadline, f"not all planted jobs were failed: {registry.get_job_ids()}"
        time.sleep(0.05)


@pytest.mark.parametrize("command", ["worker", "train-worker"])
def test_planted_jobs_are_refused_and_nothing_they_name_runs(
    command: str, redis_url: str, model_registry: Path, tmp_path: Path, markers: Path
) -> None:
    env = planted_env(redis_url, model_registry, tmp_path, markers)
    queue = queue_served_by(command, redis_url)
    connection = queue.connection
    worker = start(command, env, tmp_path, "guard")
    try:
        jobs = [queue.enqueue_call(**spec) for _, spec in attacks(markers)]
        wait_until_failed(queue, [job.id for job in jobs])
        for (what, _), job in zip(attacks(markers), jobs):
            result = Job.fetch(job.id, connection=connection, serializer=SERIALIZER).latest_result()
            assert result.exc_string.startswith(REFUSED), (what, result.exc_string)
        assert worker.process.poll() is None  # refusing is not dying
        log = worker.log()
    finally:
        worker.stop()
    assert sorted(path.name for path in markers.iterdir()) == []
    assert log.count("refused job") == len(jobs)  # each logged once


@pytest.mark.parametrize("command", ["worker", "train-worker"])
def test_an_abandoned_job_with_a_callback_is_refused_without_calling_it(
    command: str, redis_url: str, model_registry: Path, tmp_path: Path, markers: Path
) -> None:
    """RQ's cleanup of a dead worker's jobs calls the failure callback a job names: a forged "abandoned" job."""
    env = planted_env(redis_url, model_registry, tmp_path, markers)
    queue = queue_served_by(command, redis_url)
    connection = queue.connection
    func = CLASSIFY_FUNC if command == "worker" else RETRAIN_FUNC
    job = Job.create(func, kwargs={"run_id": 1}, connection=connection, serializer=SERIALIZER, origin=queue.name,
                     on_failure=Callback("planted.on_failure"), status="started")  # fmt: skip
    job.retries_left = 1
    job.save()
    # As a worker that died mid-job leaves it: in the StartedJobRegistry, its heartbeat long lapsed.
    connection.zadd(queue.started_job_registry.key, {f"{job.id}:forged-execution": 1})
    worker = start(command, env, tmp_path, "janitor")
    try:
        wait_until_failed(queue, [job.id])
    finally:
        worker.stop()
    assert job.get_status(refresh=True) == "failed"
    assert queue.count == 0  # not handed back to the queue either
    assert sorted(path.name for path in markers.iterdir()) == []


async def test_the_workers_own_jobs_still_run_beside_refused_ones(
    redis_url: str, model_registry: Path, tmp_path: Path, markers: Path
) -> None:
    env = planted_env(redis_url, model_registry, tmp_path, markers)
    connection = redis.Redis.from_url(redis_url)
    queue = Queue("classify", connection=connection, serializer=SERIALIZER)
    async with ClassifyClient(redis_url) as client:
        # Planted jobs and photos in one queue: they are drained into the same batch.
        planted = [queue.enqueue_call(func="planted.run") for _ in range(5)]
        photos = [jpeg_bytes(seed) for seed in range(5)]
        worker = start("worker", env, tmp_path, "mixed")
        try:
            answers = await asyncio.gather(*(client.classify(photo) for photo in photos))
            wait_until_failed(queue, [job.id for job in planted])
        finally:
            worker.stop()
    assert all(isinstance(answer, Classification) for answer in answers)
    assert sorted(path.name for path in markers.iterdir()) == []
