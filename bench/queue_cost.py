"""What the queue costs a photo in CPU, with redis-py's C reply parser (hiredis) and with its pure-Python one.

The model is left out on purpose (a tiny one, or the active model when it is tiny): what is
measured is everything else a photo costs on its way, the bots' client (`ClassifyClient`:
reduce, submit, await the result), the worker (`carbot worker`: RQ's lifecycle, decoding) and
Redis. On a small CPU server that CPU is taken from the model, so it is what keeps the
system below the model's ceiling.

Each round starts a fresh worker and a fresh client process, both with hiredis or both
without it (hidden from redis-py before it is imported, as if it were not installed), sends
`photos` Telegram-sized JPEGs at once `bursts` times, and reads each process' CPU time. The
two parsers take turns, `rounds` rounds each, on the same Redis and photos, and the ratios
are printed side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import WorkerStats, cpu_seconds
from bench.loadtest import prepare_registry
from bench.serving import draw_scene, jpeg_bytes, telegram_photo_size, worker_env
from bench.workers import start_logged, wait_registered
from carbot.connections import redis_connection
from carbot.services import PrivateRedis
from carbot.settings import Settings

PARSERS = ("hiredis", "python")
WORKER_START_TIMEOUT_S = 120.0

# Hides hiredis from redis-py (imported later), as if it were not installed.
_HIDE_HIREDIS = "import sys\nsys.modules['hiredis'] = None\n"

# `carbot worker`, exactly as `python -m carbot worker` runs it.
_WORKER = """
import runpy, sys
sys.argv = ["carbot", "worker", "--name", sys.argv[1]]
runpy.run_module("carbot", run_name="__main__")
"""

# The bots' client: every photo of a burst at once, `bursts` times; prints its CPU and wall time as JSON.
_CLIENT = """
import asyncio, json, sys, time
from pathlib import Path
from carbot.settings import Settings
from worker import ClassifyClient
url, folder, bursts = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
photos = [path.read_bytes() for path in sorted(folder.glob("*.jpg"))]
settings = Settings()

async def burst():
    async with ClassifyClient.from_settings(settings, url) as client:
        await asyncio.gather(*(client.classify(photo) for photo in photos))

asyncio.run(burst())  # warm: connections, the active model's preprocessing read
cpu, wall = time.process_time(), time.perf_counter()
for _ in range(bursts):
    asyncio.run(burst())
import redis.utils
print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                  "hiredis": redis.utils.HIREDIS_AVAILABLE}))
"""


def run_queue_cost(settings: Settings, *, photos: int = 192, bursts: int = 5, rounds: int = 2) -> dict[str, Any]:
    """Measure both parsers, taking turns; returns per-photo milliseconds of each part and their ratios."""
    with tempfile.TemporaryDirectory(prefix="carbot-queue-cost-") as tmp:
        tmp_dir = Path(tmp)
        registry, version, model_note = prepare_registry(settings, tmp_dir / "models")
        folder = tmp_dir / "photos"
        folder.mkdir()
        rng = np.random.default_rng(0)
        size = telegram_photo_size(224)
        for index in range(photos):
            (folder / f"{index:04d}.jpg").write_bytes(jpeg_bytes(draw_scene(rng, size)))
        runs: dict[str, list[dict[str, float]]] = {parser: [] for parser in PARSERS}
        with PrivateRedis(tmp_dir / "redis") as server:
            connection = redis_connection(server.url)
            redis_pid = int(connection.info("server")["process_id"])
            for round_index in range(rounds):
                for parser in PARSERS:
                    print(f"round {round_index + 1}/{rounds}: {parser} parser", flush=True)
                    env = worker_env(settings, server.url, registry, tmp_dir)
                    runs[parser].append(_one_run(parser, env, connection, redis_pid, folder, bursts, tmp_dir))
    count = photos * bursts
    per_photo = {parser: _per_photo_ms(runs[parser], count) for parser in PARSERS}
    # A part too small for /proc's clock ticks in a short run reads 0 s: it has no ratio.
    ratios = {
        part: round(per_photo["hiredis"][part] / per_photo["python"][part], 3) if per_photo["python"][part] else None
        for part in per_photo["python"]
    }
    return {"model": f"{version} ({model_note})", "photos": photos, "bursts": bursts, "rounds": rounds,
            "photo_size": list(size), "per_photo_ms": per_photo, "hiredis_over_python": ratios,
            "runs": runs}  # fmt: skip


def _one_run(parser: str, env: dict[str, str], connection, redis_pid: int, folder: Path, bursts: int,
             tmp_dir: Path) -> dict[str, float]:  # fmt: skip
    prefix = _HIDE_HIREDIS if parser == "python" else ""
    name = f"queue-cost-{parser}-{os.getpid()}-{time.monotonic_ns()}"
    log_path = tmp_dir / f"{name}.log"
    worker = start_logged([sys.executable, "-c", prefix + _WORKER, name], env, log_path)
    try:
        wait_registered(env["REDIS_URL"], name, worker, timeout_s=WORKER_START_TIMEOUT_S,
                        log=lambda: log_path.read_text(errors="replace"))  # fmt: skip
        client_command = [sys.executable, "-c", prefix + _CLIENT, env["REDIS_URL"], str(folder)]
        # A first client warms the worker (its model loads and compiles now), outside what is measured.
        subprocess.run([*client_command, "0"], env=env, capture_output=True, text=True, check=True)
        before = WorkerStats.read(connection)
        worker_cpu, redis_cpu = cpu_seconds(worker.pid), cpu_seconds(redis_pid)
        client = subprocess.run([*client_command, str(bursts)], env=env, capture_output=True, text=True, check=True)
        worker_cpu, redis_cpu = cpu_seconds(worker.pid) - worker_cpu, cpu_seconds(redis_pid) - redis_cpu
        figures = WorkerStats.read(connection) - before
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    measured = json.loads(client.stdout.strip().splitlines()[-1])
    # The worker's and Redis' CPU include the client's own warm burst, the client's figure does not: each is
    # divided by the photos it covers (the worker's counters say how many it answered since `before`).
    return {
        "client_had_hiredis": measured["hiredis"],
        "wall_s": measured["wall_s"],
        "client_cpu_s": measured["cpu_s"],
        "worker_cpu_s": worker_cpu,
        "redis_cpu_s": redis_cpu,
        "worker_photos": figures.count("photos"),
        "worker_decode_s": figures.decode_s,
        "worker_forward_s": figures.forward_s,
    }


def _per_photo_ms(runs: list[dict[str, float]], count: int) -> dict[str, float]:
    total = {key: sum(run[key] for run in runs) for key in runs[0] if key != "client_had_hiredis"}
    worker_photos = max(1, total["worker_photos"])
    return {
        "wall": round(1000 * total["wall_s"] / (count * len(runs)), 3),
        "client_cpu": round(1000 * total["client_cpu_s"] / (count * len(runs)), 3),
        "worker_cpu": round(1000 * total["worker_cpu_s"] / worker_photos, 3),
        "worker_decode_and_model": round(
            1000 * (total["worker_decode_s"] + total["worker_forward_s"]) / worker_photos, 3
        ),
        "redis_cpu": round(1000 * total["redis_cpu_s"] / worker_photos, 3),
    }


def format_table(results: dict[str, Any]) -> str:
    """The per-photo figures of both parsers and their ratio, for a person."""
    per_photo, ratios = results["per_photo_ms"], results["hiredis_over_python"]
    lines = [
        f"python -m bench queue-cost: {results['photos']} photos at {results['photo_size'][0]}x"
        f"{results['photo_size'][1]} at once, {results['bursts']} bursts, {results['rounds']} rounds per parser, "
        f"model {results['model']}",
        f"{'per photo, ms':28} {'hiredis':>9} {'python':>9} {'ratio':>7}",
    ]
    for part in per_photo["python"]:
        ratio = "-" if ratios[part] is None else f"{ratios[part]:.3f}"
        lines.append(f"{part:28} {per_photo['hiredis'][part]:9.3f} {per_photo['python'][part]:9.3f} {ratio:>7}")
    return "\n".join(lines)
