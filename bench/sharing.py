"""`python -m bench sharing`: photo latency under a steady load, alone and beside a retrain on the same machine.

One run, three phases side by side (taking turns over a few rounds), each the same steady stream of
photos (open loop: a photo every `1 / rate` seconds whatever the answers do, as people sending photos
would) through the bots' `ClassifyClient` to one `carbot worker` process, on a private `redis-server`:

1. **alone**: nothing else runs;
2. **retrain, yielding off** (`CARBOT_RETRAIN_YIELD=false`): a retrain runs in a child process meanwhile;
3. **retrain, yielding on** (the default): the same retrain, giving way (``training.share_machine``).

The retrain is the product's own: ``training.retrain`` fine-tuning a copy of the served model on
feedback photos (its tf.data pipeline, augmentation and fit loop), with the train worker's callbacks,
in a fresh process started as the train worker's work horse would be: ``share_machine`` first, then
TensorFlow. It is measured from its first training steps, so its start (TensorFlow, the model, the
active model's evaluation) is out of the windows, and it is stopped (SIGSTOP) outside its phase.

Per phase: photos answered, errors, latency p50 / p95 / p99 / max (submit to answer), and the retrain's
training steps per second in the window with what it paused (the price of yielding). The model is a
copy of the settings' active version, else a small untrained one (the demo model's shape): point
`CARBOT_MODEL_REGISTRY` at another registry to measure another model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadtest import prepare_registry
from bench.serving import make_photos, worker_env
from bench.workers import start_logged, wait_registered
from carbot.connections import redis_connection
from carbot.services import PrivateRedis
from carbot.settings import Settings

PHASES = ("alone", "retrain, yielding off", "retrain, yielding on")
CHAT_PHOTO = (1280, 960)  # the largest a chat app sends; one photo in four is this size, the rest 640x480
STEPS_KEY = "bench:sharing:steps"  # the retrain's training steps so far
GIVE_WAY_KEY = "bench:sharing:give-way"  # its GiveWay counters, as JSON
START_TIMEOUT_S = 300.0
WARM_S = 3.0  # the worker's warm-up: the same load as a phase, this long, before the first phase
RETRAIN_WARM_STEPS = 3  # steps before the window opens: the first ones compile the step function


def run_sharing(
    settings: Settings,
    *,
    seconds: float = 30.0,
    rounds: int = 3,
    rate: float = 8.0,
    feedback_photos: int = 240,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The three phases on one worker, interleaved over `rounds`; returns their figures (and prints the table).

    Each phase gets `seconds` of load in all, `seconds / rounds` a round, and each round takes the phases in
    another order: a machine whose other load drifts during the run (other programs, its clock speed) then
    weighs on every phase alike. Both retrains start (and get past their first steps) before the first round;
    the one not in its phase is stopped (SIGSTOP) meanwhile, so it costs the machine nothing.
    """
    per_round = max(1, int(seconds * rate / rounds))
    with tempfile.TemporaryDirectory(prefix="carbot-sharing-") as tmp:
        root = Path(tmp)
        registry, version, note = prepare_registry(settings, root / "models")
        say(f"model {version} ({note})")
        feedback = _feedback_photos(root / "feedback", feedback_photos)
        # Every photo distinct (the worker answers identical photos once).
        warm = max(8, int(WARM_S * rate))
        photos = iter(make_photos(per_round * rounds * len(PHASES) + warm, phone_size=CHAT_PHOTO, seed=1))
        server = PrivateRedis(root / "redis").start()
        retrains: dict[str, _Retrain] = {}
        worker = None
        try:
            url = server.url
            run_settings = settings.model_copy(update={"redis_url": url, "model_registry": registry,
                                                       "data_dir": root / "data", "queue_limit": 10_000,
                                                       "request_timeout_s": 120.0})  # fmt: skip
            env = worker_env(run_settings, url, registry, root)
            say("starting the worker and both retrains (yielding off and on)")
            name = f"sharing-{os.getpid()}"
            worker_log = root / "worker.log"
            worker = start_logged([sys.executable, "-m", "carbot", "worker", "--name", name], env, worker_log)
            for phase, yield_ in ((PHASES[1], False), (PHASES[2], True)):
                retrains[phase] = _Retrain(url, env, root, registry, feedback, yield_=yield_)
            wait_registered(url, name, worker, timeout_s=START_TIMEOUT_S, log=lambda: _tail(worker_log))
            for retrain in retrains.values():
                retrain.wait_training()
                retrain.pause()
            asyncio.run(_steady(run_settings, url, [next(photos) for _ in range(warm)], rate=rate))  # warm-up
            latencies: dict[str, list[float]] = {phase: [] for phase in PHASES}
            errors = dict.fromkeys(PHASES, 0)
            window_s = dict.fromkeys(PHASES, 0.0)
            for round_ in range(rounds):
                order = PHASES[round_ % len(PHASES) :] + PHASES[: round_ % len(PHASES)]
                for phase in order:
                    say(f"round {round_ + 1}/{rounds}, {phase}: {per_round} photos at {rate:g}/s")
                    retrain = retrains.get(phase)
                    if retrain is not None:
                        retrain.resume()
                    began = time.monotonic()
                    answered, failed = asyncio.run(
                        _steady(run_settings, url, [next(photos) for _ in range(per_round)], rate=rate)
                    )
                    window_s[phase] += time.monotonic() - began
                    if retrain is not None:
                        retrain.pause()
                    latencies[phase] += answered
                    errors[phase] += failed
            figures = []
            for phase in PHASES:
                row: dict[str, Any] = {"phase": phase, "answered": len(latencies[phase]), "errors": errors[phase],
                                       **_percentiles(latencies[phase])}  # fmt: skip
                if phase in retrains:
                    row["retrain_steps_per_s"] = round(retrains[phase].steps_in_windows / window_s[phase], 2)
                    row["give_way"] = retrains[phase].give_way()
                figures.append(row)
        finally:
            for retrain in retrains.values():
                retrain.stop()
            if worker is not None:
                _stop(worker)
            server.stop()
    results = {
        "model": f"{version} ({note})",
        "photos": f"{per_round * rounds} a phase at {rate:g}/s in {rounds} rounds, open loop; 640x480 JPEGs and "
        f"one in four {CHAT_PHOTO[0]}x{CHAT_PHOTO[1]}",
        "cpus": os.cpu_count(),
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "phases": figures,
    }
    say(format_table(results))
    return results


class _Retrain:
    """The retrain child of one phase: started once, stopped (SIGSTOP) outside its phase's windows."""

    def __init__(self, url: str, env: dict[str, str], root: Path, registry: Path, feedback: Path, *,
                 yield_: bool) -> None:  # fmt: skip
        flag = "true" if yield_ else "false"
        self.connection = redis_connection(url)
        self.steps_key, self.give_way_key = f"{STEPS_KEY}:{flag}", f"{GIVE_WAY_KEY}:{flag}"
        self.log_path = root / f"retrain-yield-{flag}.log"
        command = [sys.executable, "-c", _RETRAIN, str(registry), str(feedback), self.steps_key, self.give_way_key]
        self.process = start_logged(command, {**env, "CARBOT_RETRAIN_YIELD": flag}, self.log_path)
        self.steps_in_windows = 0
        self._steps_at_resume = 0

    def steps(self) -> int:
        return int(self.connection.get(self.steps_key) or 0)

    def give_way(self) -> dict[str, Any]:
        return json.loads(self.connection.get(self.give_way_key) or "{}")

    def wait_training(self) -> None:
        """Until its first steps are done: TensorFlow, the model and the active model's evaluation are behind it."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.steps() < RETRAIN_WARM_STEPS:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the retrain did not start; its log:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def resume(self) -> None:
        self._steps_at_resume = self.steps()
        self.process.send_signal(signal.SIGCONT)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)
        if self.process.poll() is not None:
            raise RuntimeError(f"the retrain ended; its log:\n{_tail(self.log_path)}")
        self.steps_in_windows += self.steps() - self._steps_at_resume

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # a stopped process dies of SIGKILL too
        self.process.wait()
        self.connection.close()


async def _steady(settings: Settings, url: str, photos: Sequence[bytes], *, rate: float) -> tuple[list[float], int]:
    """Send `photos` one every `1 / rate` s, each awaited on its own; returns the latencies (ms) and the errors."""
    from worker import ClassifyClient, ClassifyError

    loop = asyncio.get_running_loop()
    async with ClassifyClient.from_settings(settings, url) as client:
        begin = loop.time()

        async def one(index: int, photo: bytes) -> float | None:
            await asyncio.sleep(max(0.0, begin + index / rate - loop.time()))
            sent = time.perf_counter()
            try:
                await client.classify(photo)
            except ClassifyError:
                return None
            return (time.perf_counter() - sent) * 1000

        outcomes = await asyncio.gather(*(one(index, photo) for index, photo in enumerate(photos)))
    answered = [ms for ms in outcomes if ms is not None]
    return answered, len(outcomes) - len(answered)


def _feedback_photos(folder: Path, count: int) -> Path:
    """`count` labelled photos in a folder, and a manifest (sha256, label) the retrain child reads."""
    from training import SYNTHETIC_CLASSES, synthetic_jpeg

    folder.mkdir(parents=True)
    rows = []
    for index in range(count):
        data = synthetic_jpeg(SYNTHETIC_CLASSES[index % len(SYNTHETIC_CLASSES)], seed=index, size=(320, 240))
        sha = hashlib.sha256(data).hexdigest()
        (folder / sha).write_bytes(data)
        rows.append([sha, index])
    (folder / "manifest.json").write_text(json.dumps(rows))
    return folder


# The retrain, in a process of its own as the train worker's work horse runs it: share_machine first (it reads
# CARBOT_RETRAIN_YIELD), then TensorFlow. Its feedback photos take the served model's labels in turn; it counts its
# training steps in Redis and runs until it is killed. A step costs the same at any learning rate; a low one keeps
# the loss finite on those arbitrary labels (the serving benchmark's ResNet50, sure of other answers, started at a
# loss of about 500 and went NaN at its fourth step at the default rate, which ends a retrain).
_RETRAIN = """
import json, sys
from pathlib import Path
import redis
from carbot.settings import get_settings
from training import share_machine
registry, folder, steps_key, give_way_key = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
settings = get_settings()
connection = redis.Redis.from_url(settings.redis_url)
give_way = share_machine(settings, connection)
import keras
from model import ModelRegistry
from training import FeedbackPhoto, RetrainConfig, retrain
labels = ModelRegistry(registry).active(verify=False).labels
feedback = [FeedbackPhoto(sha256=sha, path=folder / sha, label=labels[index % len(labels)])
            for sha, index in json.loads((folder / "manifest.json").read_text())]

class Count(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        connection.incr(steps_key)
        connection.set(give_way_key, json.dumps(give_way.summary()))

config = RetrainConfig(epochs=100000, finetune_fraction=1.0, learning_rate=0.0005)
retrain(registry, feedback, version="sharing", config=config,
        promote=False, variants=False, callbacks=[*give_way.callbacks(), Count()])
"""


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def _percentiles(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    values = np.asarray(latencies_ms)
    return {f"p{q}_ms": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)} | {
        "max_ms": round(float(values.max()), 1)
    }


def format_table(results: dict[str, Any]) -> str:
    """The phases side by side, as printed."""
    lines = [
        f"model: {results['model']}",
        f"photos: {results['photos']}; {results['cpus']} CPUs",
        "",
        f"{'phase':<24}{'answered':>9}{'errors':>7}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'retrain steps/s':>17}  paused",
    ]
    for phase in results["phases"]:
        give_way = phase.get("give_way") or {}
        paused = f"{give_way.get('pauses', 0)} pauses, {give_way.get('paused_s', 0):g} s" if give_way else ""
        steps = phase.get("retrain_steps_per_s")
        lines.append(
            f"{phase['phase']:<24}{phase['answered']:>9}{phase['errors']:>7}"
            + "".join(f"{_ms(phase[key]):>9}" for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
            + f"{'' if steps is None else steps:>17}  {paused}"
        )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
