"""Worker child processes for the harnesses: started with their output in a log file, awaited until RQ lists them."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from carbot.connections import redis_connection


def start_logged(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`command` as a child process, its stdout and stderr in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_registered(url: str, name: str, process: subprocess.Popen | None, *, timeout_s: float,
                    log: Callable[[], str]) -> None:  # fmt: skip
    """Wait until the worker `name` has registered with RQ on `url` (`rq:worker:<name>`).

    Raises RuntimeError, with the end of `log()`, if its process ends first or `timeout_s` pass.
    """
    connection = redis_connection(url)
    deadline = time.monotonic() + timeout_s
    try:
        while not connection.exists(f"rq:worker:{name}"):
            if process is None or process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start; its log:\n{log()[-3000:]}")
            time.sleep(0.05)
    finally:
        connection.close()
