"""`python -m bench loadtest`: many chat users at once, through the real conversation, Redis and worker processes.

What a bot process does for each photo is what this harness does: it calls
`Conversation.photo` (rate limit, submit through `ClassifyClient`, await the
result, record the prediction and the photo in SQL) and, for some answers,
presses 👍 (`Conversation.button`). Behind it everything is real and separate: a
private `redis-server`, `carbot worker` processes serving the active model, and a
SQLite store with its photo folder. Nothing is mocked, so what it reports is what
the system did:

- every photo's outcome, as the person would see it: an answer with buttons, an
  answer without them (the database was away), "busy", "too slow", "something
  went wrong", "I can't use this picture", or nothing at all (**lost**: the
  handler raised, or gave no reply within the request's deadline plus a minute);
- throughput, latency percentiles, the latency of busy replies, replies later
  than `late_s` ("minutes late");
- the batch sizes the workers formed and the shared counters they keep, as they
  add them up in Redis (`carbot.keys.STATS_KEY`, `BATCH_SIZES_KEY`; `bench.figures`);
- the peak resident memory of each worker (VmHWM, sampled while it lives), of
  this process (the bot side, photos included), Redis' `used_memory_peak`, and the
  deepest the queue got (sampled every 50 ms).

Users arrive spread over `ramp_s` seconds; each sends their photos one after
another, waiting for each answer, as a person in a chat does. Photos are a mix
of sizes and formats (JPEG, PNG), some are exact duplicates of other users'
photos, and some are bad files (a truncated JPEG, a text file, random bytes).

`Rig` (Redis + supervised workers + a copy of the model) and `drive` are also
what `python -m bench faults` (`bench.faults`) builds its scenarios on: a scenario is a
drive with a fault injected while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis
from PIL import Image

from bench.figures import WorkerStats, peak_rss_mb, percentiles, scrape
from bench.serving import draw_scene, jpeg_bytes, worker_env
from bench.workers import start_logged, wait_registered
from carbot.connections import redis_connection
from carbot.services import PrivateRedis
from carbot.settings import Settings

T = TypeVar("T")

# Photo sizes and their shares of the good photos: chat apps send 1280 px at most, a file can be anything.
SIZE_MIX: tuple[tuple[tuple[int, int], float], ...] = (
    ((320, 240), 0.25),
    ((640, 480), 0.45),
    ((1280, 960), 0.25),
    ((2048, 1536), 0.05),
)
PNG_SHARE = 0.15  # of the good photos up to 640 px; the rest are JPEG
BAD_KINDS = ("truncated-jpeg", "text", "random-bytes")
WORKER_START_TIMEOUT_S = 300.0
# Outcome categories, as the person sees them.
ANSWERED, UNRECORDED = "answered", "answered-unrecorded"
REJECTED, BUSY, TIMEOUT, FAILED, RATE_LIMITED, OTHER = "rejected", "busy", "timeout", "failed", "rate-limited", "other"
LOST = "lost"  # no reply at all: the handler raised, or said nothing within the deadline plus a minute


class PersistentRedis(PrivateRedis):
    """A private Redis that survives being killed, for the fault harness's Redis-restart scenario.

    Every write goes to an append-only file in its folder, fsynced before Redis answers, so one
    started again on the same folder holds every queued job and photo it acknowledged.
    """

    def server_arguments(self) -> list[str]:
        return [*super().server_arguments(), "--appendonly", "yes", "--appendfsync", "always"]


@dataclass(frozen=True)
class LoadConfig:
    """One run's shape. `None` means "the setting's value" (queue limit, deadlines, worker knobs)."""

    users: int = 500
    photos_per_user: int = 4
    workers: int = 2
    queue_limit: int | None = None
    request_timeout_s: float | None = None
    job_timeout_s: int | None = None
    maintenance_interval_s: int | None = None
    duplicate_share: float = 0.10  # photos that are byte-for-byte another user's photo
    bad_share: float = 0.05  # photos that are not pictures at all
    vote_share: float = 0.25  # answers that get a 👍
    vote_delay_s: float = 0.0  # how long a person reads an answer before pressing 👍 (meanwhile they go on)
    ramp_s: float = 2.0  # users arrive spread over this long
    think_s: float = 0.0  # pause between one user's photos
    late_s: float = 60.0  # a reply later than this is "late"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.photos_per_user < 1 or self.workers < 1:
            raise ValueError("users, photos_per_user and workers must be at least 1")
        if not (
            0 <= self.duplicate_share < 1 and 0 <= self.bad_share < 1 and self.duplicate_share + self.bad_share < 1
        ):
            raise ValueError("duplicate_share and bad_share must be fractions that leave room for good photos")


# -- the photos ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    kind: str  # "good", "duplicate" or one of BAD_KINDS
    label: str  # e.g. "640x480 jpeg"
    data: bytes = field(repr=False)

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS


def make_photo_plan(config: LoadConfig) -> list[list[Photo]]:
    """Each user's photos, in the order they send them: mixed sizes and formats, duplicates and bad files."""
    rng = np.random.default_rng(config.seed)
    total = config.users * config.photos_per_user
    bad = round(total * config.bad_share)
    duplicates = round(total * config.duplicate_share)
    good = make_good_photos(max(1, total - bad - duplicates), rng)
    photos = list(good)
    # A duplicate is a good photo sent again by someone else: the worker computes it once per batch.
    originals = [good[int(rng.integers(len(good)))] for _ in range(duplicates)]
    photos += [Photo("duplicate", original.label, original.data) for original in originals]
    photos += [_bad_photo(BAD_KINDS[index % len(BAD_KINDS)], good[index % len(good)].data, rng) for index in range(bad)]
    photos = photos[:total]
    order = rng.permutation(len(photos))
    shuffled = [photos[index] for index in order]
    return [shuffled[user :: config.users] for user in range(config.users)]


def make_good_photos(count: int, rng: np.random.Generator) -> list[Photo]:
    """`count` distinct photos in SIZE_MIX's sizes. A few scenes per size, each photo one of them shifted and
    maybe mirrored: drawing is slow, while every photo still differs and costs a real photo's decoding."""
    sizes = [size for size, _ in SIZE_MIX]
    shares = np.array([share for _, share in SIZE_MIX])
    picks = rng.choice(len(sizes), size=count, p=shares / shares.sum())
    scenes = {size: [_drawn(rng, size) for _ in range(3)] for size in {sizes[pick] for pick in picks}}
    photos = []
    for pick in picks:
        width, height = sizes[pick]
        scene = scenes[sizes[pick]][int(rng.integers(3))]
        shifted = np.roll(scene, (int(rng.integers(height)), int(rng.integers(width))), (0, 1))
        if rng.random() < 0.5:
            shifted = shifted[:, ::-1]
        if rng.random() < PNG_SHARE and width <= 640:  # PNGs are screenshots and stickers: small
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(shifted)).save(buffer, format="PNG", compress_level=1)
            photos.append(Photo("good", f"{width}x{height} png", buffer.getvalue()))
        else:
            photos.append(Photo("good", f"{width}x{height} jpeg", jpeg_bytes(shifted)))
    return photos


def _drawn(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A synthetic scene; above 640 px drawn at 640 and enlarged (drawing is slow, decoding cost is the point)."""
    if size[0] <= 640:
        return draw_scene(rng, size)
    small = Image.fromarray(draw_scene(rng, (640, 640 * size[1] // size[0])))
    return np.asarray(small.resize(size, Image.Resampling.BILINEAR))


def _bad_photo(kind: str, good: bytes, rng: np.random.Generator) -> Photo:
    if kind == "truncated-jpeg":
        return Photo(kind, kind, good[: max(64, len(good) // 2)])
    if kind == "text":
        return Photo(kind, kind, b"this is not a photo of a car, it is a shopping list\n" * 20)
    return Photo(kind, kind, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


# -- the system under test ----------------------------------------------------------------------------------------


class WorkerPool:
    """`carbot worker` processes, restarted when they die (as a process manager would), their logs kept.

    A restarted worker gets a new name: RQ refuses a name whose previous owner has not timed out yet.
    Each serves its metrics on a port of its own on 127.0.0.1 (`metric`).
    """

    def __init__(
        self, count: int, url: str, env: dict[str, str], log_dir: Path, *, max_batch: int, max_wait_ms: float
    ) -> None:
        self.url, self.env, self.log_dir = url, env, log_dir
        self.command_tail = ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
        self.slots: list[subprocess.Popen | None] = [None] * count
        self.names: list[str] = [""] * count
        self.generation = [0] * count
        self.restarts = 0
        self._spawned_at = [0.0] * count
        self.peak_rss_mb: dict[str, float] = {}
        self.log_paths: list[Path] = []
        self.metrics_urls: dict[str, str] = {}  # worker name -> its /metrics
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start every worker and wait until each has registered with RQ (its model is loaded by then)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(len(self.slots)):
            self._spawn(slot)
        for slot in range(len(self.slots)):
            self.wait_registered(slot)
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._supervisor.start()

    def _spawn(self, slot: int) -> None:
        self.generation[slot] += 1
        name = f"load-{os.getpid()}-{slot}-{self.generation[slot]}"
        log_path = self.log_dir / f"{name}.log"
        self.log_paths.append(log_path)
        port = _free_port()
        self.metrics_urls[name] = f"http://127.0.0.1:{port}/metrics"
        process = start_logged(
            [sys.executable, "-m", "carbot", "worker", "--name", name, *self.command_tail],
            {**self.env, "CARBOT_METRICS_PORT": str(port), "CARBOT_METRICS_LISTEN": "127.0.0.1"},
            log_path,
        )
        self.slots[slot], self.names[slot] = process, name
        self._spawned_at[slot] = time.monotonic()

    def wait_registered(self, slot: int, timeout_s: float = WORKER_START_TIMEOUT_S) -> None:
        wait_registered(self.url, self.names[slot], self.slots[slot], timeout_s=timeout_s, log=self.logs)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                for slot, process in enumerate(self.slots):
                    if process is None:
                        continue
                    self._sample_rss(slot)
                    # Not more than once a second: a worker that cannot reach Redis exits right after loading.
                    if (
                        process.poll() is not None
                        and not self._stopping.is_set()
                        and time.monotonic() - self._spawned_at[slot] > 1.0
                    ):
                        self.restarts += 1
                        self._spawn(slot)

    def _sample_rss(self, slot: int) -> None:
        process = self.slots[slot]
        if process is not None and process.poll() is None:
            peak = peak_rss_mb(process.pid)
            if peak is not None:
                self.peak_rss_mb[self.names[slot]] = max(peak, self.peak_rss_mb.get(self.names[slot], 0.0))

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> str:
        """Send `sig` to the worker in `slot` (the supervisor restarts it); returns the name it had."""
        with self._lock:
            process, name = self.slots[slot], self.names[slot]
            self._sample_rss(slot)
            if process is not None and process.poll() is None:
                process.send_signal(sig)
                process.wait()
        return name

    def signal_all(self, sig: int) -> None:
        """Send `sig` to every live worker (SIGSTOP / SIGCONT: a worker too busy to take jobs, then back)."""
        with self._lock:
            for process in self.slots:
                if process is not None and process.poll() is None:
                    process.send_signal(sig)

    def slot_of(self, worker_name: str) -> int | None:
        return self.names.index(worker_name) if worker_name in self.names else None

    def logs(self) -> str:
        """Every worker's log (past generations too), for a person to read when something did not start."""
        return "".join(path.read_bytes().decode(errors="replace") for path in list(self.log_paths) if path.exists())

    def metric(self, name: str) -> float:
        """Sample `name` (e.g. `carbot_worker_model_refusals_total`) summed over the live workers' endpoints."""
        with self._lock:
            live = [self.metrics_urls[self.names[slot]] for slot, process in enumerate(self.slots)
                    if process is not None and process.poll() is None]  # fmt: skip
        return scrape(live, name)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        for slot, process in enumerate(self.slots):
            if process is None or process.poll() is not None:
                continue
            self._sample_rss(slot)
            process.send_signal(signal.SIGTERM)  # RQ's warm shutdown: the current batch finishes first
        for process in self.slots:
            if process is None:
                continue
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class Rig:
    """A private Redis, supervised worker processes and a copy of the model, in a temporary folder.

    The model is the settings' active version, copied so that a scenario may damage it freely; without
    one, a small untrained model (the demo model's shape) is built for the run in a child process, so
    this process, like a bot, never imports TensorFlow.
    """

    def __init__(
        self,
        settings: Settings,
        config: LoadConfig,
        *,
        persistent_redis: bool = False,
        say: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.config = config
        self.persistent_redis = persistent_redis
        self.say = say
        self.model_note = ""

    def __enter__(self) -> Rig:
        self._tmp = tempfile.TemporaryDirectory(prefix="carbot-load-")
        self.root = Path(self._tmp.name)
        try:
            self.registry, self.model_version, self.model_note = prepare_registry(self.settings, self.root / "models")
            self.say(f"model {self.model_version} ({self.model_note})")
            server = PersistentRedis if self.persistent_redis else PrivateRedis
            self.redis = server(self.root / "redis").start()
            self.url = self.redis.url
            self.run_settings = self.settings.with_overrides(
                redis_url=self.url,
                data_dir=self.root / "data",
                model_registry=self.registry,
                queue_limit=self.config.queue_limit,
                request_timeout_s=self.config.request_timeout_s,
                job_timeout_s=self.config.job_timeout_s,
                maintenance_interval_s=self.config.maintenance_interval_s,
            )
            env = worker_env(self.run_settings, self.url, self.registry, self.root)
            env.update(
                {
                    "CARBOT_JOB_TIMEOUT_S": str(self.run_settings.job_timeout_s),
                    "CARBOT_MAINTENANCE_INTERVAL_S": str(self.run_settings.maintenance_interval_s),
                }
            )
            self.say(f"starting {self.config.workers} worker(s) and waiting for them to load the model")
            self.pool = WorkerPool(
                self.config.workers,
                self.url,
                env,
                self.root / "logs",
                max_batch=self.run_settings.max_batch,
                max_wait_ms=self.run_settings.max_wait_ms,
            )
            self.pool.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if getattr(self, "pool", None) is not None:
            self.pool.stop()
        if getattr(self, "redis", None) is not None:
            self.redis.stop()
        self._tmp.cleanup()

    @contextlib.asynccontextmanager
    async def conversation(
        self, *, database_url: str | None = None, photo_root: Path | None = None, store_patience_s: float | None = None
    ) -> AsyncIterator[Any]:
        """A bot's side: a Store (SQLite in the rig's folder unless given), a ClassifyClient, a Conversation."""
        from bots import Store, build_conversation
        from carbot.photos import PhotoStore

        data_dir = self.run_settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        photos = PhotoStore(photo_root or data_dir / "photos", self.run_settings.photo_retention_days)
        store = Store(database_url or f"sqlite:///{data_dir / 'carbot.db'}", photos)
        await asyncio.to_thread(store.migrate)
        store_ms = _time_calls(store, "record_prediction")
        conversation = build_conversation(self.run_settings, self.url, store=store, retrain=False)
        try:
            if store_patience_s is not None:
                conversation.store_patience_s = store_patience_s
            conversation.load_store_ms = store_ms  # read by `drive`
            yield conversation
        finally:
            await conversation.aclose()

    def stats(self) -> WorkerStats:
        """What the workers have added up in Redis so far (batches, photos, batch sizes, times)."""
        connection = redis_connection(self.url)
        try:
            return WorkerStats.read(connection)
        finally:
            connection.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _time_calls(target: Any, method: str) -> list[float]:
    """Wrap `target.method` (a coroutine method) to record how long each call took, in ms; returns the list."""
    original, durations = getattr(target, method), []

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            durations.append((time.perf_counter() - started) * 1000)

    setattr(target, method, timed)
    return durations


def prepare_registry(settings: Settings, root: Path) -> tuple[Path, str, str]:
    """A registry at `root` holding one active version: a copy of the settings' active model, else a small
    untrained one. Returns (root, version, a note saying which)."""
    from model import ModelRegistry

    root.mkdir(parents=True, exist_ok=True)
    source = ModelRegistry(settings.registry_dir)
    version = source.active_version()
    if version is not None and source.path_for(version).is_dir():
        shutil.copytree(source.path_for(version), root / version)
        ModelRegistry(root).activate(version)  # verifies the checksum
        return root, version, f"a copy of the active model of {settings.registry_dir}"
    subprocess.run(
        [sys.executable, "-c", _BUILD_SMALL_MODEL, str(root)],
        check=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    return root, "loadtest-small", f"no active model in {settings.registry_dir}: an untrained tiny model at 48 px"


# Run in a child process: this one stays free of TensorFlow, like a bot.
_BUILD_SMALL_MODEL = """
import sys
from pathlib import Path
from model import ModelRegistry, Preprocessing, build_classifier, save_artefact
from training import SYNTHETIC_CLASSES
registry = ModelRegistry(Path(sys.argv[1]))
network = build_classifier(len(SYNTHETIC_CLASSES), backbone="tiny", image_size=48, weights=None)
with registry.staging("loadtest-small") as directory:
    save_artefact(network, directory, version="loadtest-small", labels=SYNTHETIC_CLASSES, backbone="tiny",
                  preprocessing=Preprocessing(image_size=48))
registry.activate("loadtest-small")
"""


# -- driving it ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One photo as its sender lived it."""

    user: int
    kind: str
    label: str
    sent_at: float  # seconds since the drive started
    latency_ms: float
    category: str  # ANSWERED, UNRECORDED, ... or LOST
    detail: str = ""
    model_version: str = ""
    vote: str = ""  # "", "recorded", "unchanged", "retry", "other"
    prediction_id: int | None = None


@dataclass
class Progress:
    """Live counts a fault injector can wait on."""

    total: int
    submitted: int = 0
    replied: int = 0
    started: float = field(default_factory=time.monotonic)

    async def until_submitted(self, share: float, poll_s: float = 0.01) -> None:
        while self.submitted < share * self.total:
            await asyncio.sleep(poll_s)

    async def until_in_flight(self, count: int, timeout_s: float = 10.0) -> None:
        """Until at least `count` photos await their answer (or `timeout_s` passed): a fault should catch some."""
        deadline = time.monotonic() + timeout_s
        while self.submitted - self.replied < count and time.monotonic() < deadline:
            await asyncio.sleep(0.001)


Injector = Callable[[Progress], Awaitable[dict[str, Any] | None]]


async def drive(
    conversation: Any,
    plan: Sequence[Sequence[Photo]],
    config: LoadConfig,
    *,
    inject: Injector | None = None,
    platform: str = "loadtest",
) -> tuple[list[Outcome], dict[str, Any]]:
    """Every user of `plan` sends their photos through `conversation`; returns each photo's outcome and
    what `inject` (a fault, run alongside) reported."""
    from bots import Sender, text

    settings = conversation.settings
    hard_cap_s = settings.request_timeout_s + conversation.store_patience_s + 60
    texts = _Texts(text, conversation.limiter.per_minute)
    progress = Progress(total=sum(len(photos) for photos in plan))
    rng = np.random.default_rng(config.seed + 1)
    voters = {user for user in range(len(plan)) if rng.random() < config.vote_share}
    outcomes: list[Outcome] = []

    async def vote(outcome: Outcome, sender: Any, reply: Any) -> None:
        await asyncio.sleep(config.vote_delay_s)
        outcome.vote = await _press_up(conversation, sender, reply, texts)

    async def user(index: int, photos: Sequence[Photo]) -> None:
        await asyncio.sleep(config.ramp_s * index / max(1, len(plan)))
        votes = []
        sender = Sender(platform=platform, user_id=str(index), chat_id=str(index), language_code="en")
        for number, photo in enumerate(photos):
            if number and config.think_s:
                await asyncio.sleep(config.think_s)
            sent_at = time.monotonic()
            progress.submitted += 1
            try:
                reply = await _bounded(conversation.photo(sender, f"{index}-{number}", photo.data), hard_cap_s)
            except _Stuck as stuck:
                category, detail, reply = LOST, f"no reply within {hard_cap_s:g} s, stuck at {stuck}", None
            except Exception as exc:  # the handler itself failed: the person would hear nothing
                category, detail, reply = LOST, f"handler raised {type(exc).__name__}: {exc}", None
            else:
                category, detail = texts.categorize(reply)
            progress.replied += 1
            outcome = Outcome(
                index,
                photo.kind,
                photo.label,
                sent_at - progress.started,
                (time.monotonic() - sent_at) * 1000,
                category,
                detail,
                prediction_id=getattr(reply, "prediction_id", None),
            )
            if reply is not None and category == ANSWERED:
                outcome.model_version = texts.version_in(reply.text)
                if index in voters:
                    votes.append(asyncio.create_task(vote(outcome, sender, reply)))
            outcomes.append(outcome)
        await asyncio.gather(*votes)

    async def injected() -> dict[str, Any] | None:
        return await inject(progress) if inject is not None else None

    sampler = QueueSampler(conversation.redis, settings.classify_queue)
    sampler.start()
    try:
        results = await asyncio.gather(injected(), *(user(index, photos) for index, photos in enumerate(plan)))
    finally:
        await sampler.stop()
    report = results[0] or {}
    report["max_queue_depth"] = sampler.max_depth
    # Where an answer's time goes on the bot's side: recording it (SQL + the photo file) after the worker's answer.
    report["store_write_ms"] = percentiles(getattr(conversation, "load_store_ms", []))
    report["wall_s"] = round(time.monotonic() - progress.started, 2)
    return outcomes, report


async def press_again(conversation: Any, outcomes: Sequence[Outcome], platform: str = "loadtest") -> int:
    """A person told "try again" presses 👍 again; returns how many of those presses were then recorded."""
    from bots import Sender, text

    texts = _Texts(text, conversation.limiter.per_minute)
    recorded = 0
    for outcome in outcomes:
        if outcome.vote != "retry" or outcome.prediction_id is None:
            continue
        sender = Sender(platform=platform, user_id=str(outcome.user), chat_id=str(outcome.user), language_code="en")
        answer = await conversation.button(sender, f"v:{outcome.prediction_id}:u")
        outcome.vote = texts.vote(answer.notice) + "-after-retry"
        recorded += outcome.vote in ("recorded-after-retry", "unchanged-after-retry")
    return recorded


async def _press_up(conversation: Any, sender: Any, reply: Any, texts: _Texts) -> str:
    up = next((button.data for row in reply.buttons for button in row if button.data.endswith(":u")), None)
    if up is None:
        return "other"
    try:
        answer = await _bounded(conversation.button(sender, up), conversation.store_patience_s + 60)
    except Exception:
        return "lost"
    return texts.vote(answer.notice)


def run_async(main: Awaitable[T]) -> T:
    """`asyncio.run(main)`, except that tasks a stuck handler left behind are cancelled, not waited for:
    `asyncio.run` would wait forever for a coroutine that does not stop when cancelled."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0.1))  # cancellations that can finish, finish
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class _Stuck(Exception):
    """A handler gave no reply in time; the message says where it was waiting."""


async def _bounded(work: Awaitable[Any], timeout_s: float) -> Any:
    """`work`, or `_Stuck` after `timeout_s`. Unlike `asyncio.wait_for`, a handler that does not stop when
    cancelled cannot hang the harness: it is cancelled and left behind, and counted as lost."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if task in done:
        return task.result()
    where = _awaiting(task.get_coro())
    task.cancel()
    raise _Stuck(where)


def _awaiting(coroutine: Any) -> str:
    """The chain of awaits a suspended coroutine is in, innermost last: `photo:101 > classify:131 > ...`."""
    chain = []
    while coroutine is not None and len(chain) < 32:
        frame = getattr(coroutine, "cr_frame", None) or getattr(coroutine, "ag_frame", None)
        if frame is None:
            chain.append(type(coroutine).__name__)  # a Future or the like: what the innermost awaits
            break
        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coroutine = getattr(coroutine, "cr_await", None) or getattr(coroutine, "ag_await", None)
    return " > ".join(chain) or "?"


class _Texts:
    """Tells the conversation's replies apart by their English texts."""

    def __init__(self, text: Callable[..., str], per_minute: int) -> None:
        self.exact = {
            text("busy", "en"): BUSY,
            text("timeout", "en"): TIMEOUT,
            text("failed", "en"): FAILED,
            text("rate_limited", "en", per_minute=per_minute): RATE_LIMITED,
        }
        self.rejected = text("photo_rejected", "en", reason="")
        self.unrecorded = text("footer_unrecorded", "en", version="\0").split("\0")[-1]
        self.footer = text("footer", "en", version="\0").split("\0")
        self.votes = {
            text("thanks_up", "en"): "recorded",
            text("vote_unchanged", "en"): "unchanged",
            text("store_unavailable", "en"): "retry",
        }

    def categorize(self, reply: Any) -> tuple[str, str]:
        if reply.prediction_id is not None:
            return ANSWERED, ""
        if reply.text in self.exact:
            return self.exact[reply.text], ""
        if reply.text.startswith(self.rejected):
            return REJECTED, reply.text[len(self.rejected) :]
        if reply.text.endswith(self.unrecorded):
            return UNRECORDED, ""
        return OTHER, reply.text[:200]

    def version_in(self, reply_text: str) -> str:
        last = reply_text.splitlines()[-1]
        prefix, suffix = self.footer
        return last[len(prefix) : len(last) - len(suffix)] if last.startswith(prefix) else ""

    def vote(self, notice: str) -> str:
        return self.votes.get(notice, "other")


class QueueSampler:
    """The classify queue's depth every 50 ms: how far backpressure let it grow."""

    def __init__(self, connection: Any, queue: str) -> None:
        self.connection, self.key = connection, f"rq:queue:{queue}"
        self.max_depth = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        # Until cancelled, asked of the task: redis-py may turn our own cancellation into a TimeoutError
        # (as worker._client's listener knows), which a `while True` skipped as a failed sample, sampling
        # on for good while `stop` waited for it (a fault-harness run hung so).
        while not asyncio.current_task().cancelling():
            with contextlib.suppress(redis.RedisError, OSError):  # Redis may be restarting: skip that sample
                self.max_depth = max(self.max_depth, int(await self.connection.llen(self.key)))
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# -- the figures --------------------------------------------------------------------------------------------------


def summarize(outcomes: Sequence[Outcome], *, late_s: float) -> dict[str, Any]:
    """submitted / answered / answered-with-error / lost, and the figures behind them."""
    categories = Counter(outcome.category for outcome in outcomes)
    answered = [outcome for outcome in outcomes if outcome.category == ANSWERED]
    busy = [outcome.latency_ms for outcome in outcomes if outcome.category == BUSY]
    replied = [outcome for outcome in outcomes if outcome.category != LOST]
    first = min((outcome.sent_at for outcome in outcomes), default=0.0)
    last = max((outcome.sent_at + outcome.latency_ms / 1000 for outcome in outcomes), default=0.0)
    seconds = max(last - first, 1e-6)
    good = [outcome for outcome in outcomes if outcome.kind in ("good", "duplicate")]
    bad = [outcome for outcome in outcomes if outcome.kind in BAD_KINDS]
    votes = Counter(outcome.vote for outcome in outcomes if outcome.vote)
    return {
        "submitted": len(outcomes),
        "answered": len(answered) + categories[UNRECORDED],
        "answered_with_error": sum(categories[name] for name in (REJECTED, BUSY, TIMEOUT, FAILED, RATE_LIMITED, OTHER)),
        "lost": categories[LOST],
        "by_outcome": dict(sorted(categories.items())),
        "lost_details": sorted({outcome.detail for outcome in outcomes if outcome.category == LOST})[:5],
        # Errors the person did not cause: a good photo not answered, or a bad file not refused ("busy" is fair
        # for either: a full queue answers before anything is looked at).
        "unexpected": sum(outcome.category not in (ANSWERED, UNRECORDED, BUSY) for outcome in good)
        + sum(outcome.category not in (REJECTED, BUSY) for outcome in bad),
        "bad_files_refused": f"{sum(outcome.category == REJECTED for outcome in bad)}/{len(bad)}",
        "seconds": round(seconds, 2),
        "answers_per_s": round(len(answered) / seconds, 2),
        "latency_ms": percentiles([outcome.latency_ms for outcome in answered]),
        "busy_latency_ms": percentiles(busy),
        "late_replies": sum(outcome.latency_ms > late_s * 1000 for outcome in replied),
        "late_s": late_s,
        "max_reply_ms": round(max((outcome.latency_ms for outcome in replied), default=0.0), 1),
        "model_versions": dict(Counter(outcome.model_version for outcome in answered)),
        "votes": dict(sorted(votes.items())),
    }


def batch_figures(before: WorkerStats, after: WorkerStats) -> dict[str, Any]:
    """The batches the workers formed between two readings of their figures in Redis, and their counters."""
    run = after - before
    sizes = run.sizes
    histogram: Counter[str] = Counter()
    for size in sizes:
        low = 1 << (size.bit_length() - 1)
        histogram[str(low) if low == size and low in (1, 32) else f"{low}-{2 * low - 1}"] += 1
    return {
        "batches": len(sizes),
        "mean_batch_size": round(sum(sizes) / len(sizes), 2) if sizes else 0.0,
        "max_batch_size": max(sizes, default=0),
        "histogram": dict(sorted(histogram.items(), key=lambda item: int(item[0].split("-")[0]))),
        "decode_s": round(run.decode_s, 2),
        "forward_s": round(run.forward_s, 2),
        "counters": run.counters,
    }


def memory_figures(rig: Rig) -> dict[str, Any]:
    connection = redis_connection(rig.url)
    try:
        redis_peak = int(connection.info("memory").get("used_memory_peak", 0))
    except redis.RedisError:
        redis_peak = 0
    finally:
        connection.close()
    workers = rig.pool.peak_rss_mb
    return {
        "worker_peak_rss_mb": max(workers.values(), default=None),
        "workers_peak_rss_mb": dict(workers),
        "bot_process_peak_rss_mb": peak_rss_mb(os.getpid()),
        "redis_used_memory_peak_mb": round(redis_peak / 2**20, 1),
    }


# -- the command --------------------------------------------------------------------------------------------------


def run_loadtest(
    settings: Settings, config: LoadConfig, *, database_url: str | None = None, verbose: bool = True
) -> dict[str, Any]:
    """The whole run: photos, the rig, the drive, the figures; prints a table and returns everything.

    The bot side records into a fresh SQLite file in the run's folder, or into `database_url` (a scratch
    PostgreSQL database, say: what compose runs) when given.
    """
    say = say_progress(verbose)
    say(f"generating {config.users * config.photos_per_user} photos for {config.users} users")
    plan = make_photo_plan(config)
    with Rig(settings, config, say=say) as rig:
        limits = rig.run_settings
        say(
            f"driving {config.users} users x {config.photos_per_user} photos through the conversation "
            f"(queue limit {limits.queue_limit}, deadline {limits.request_timeout_s:g} s)"
        )
        stats_before = rig.stats()

        async def run() -> tuple[list[Outcome], dict[str, Any]]:
            async with rig.conversation(database_url=database_url) as conversation:
                return await drive(conversation, plan, config)

        outcomes, extra = run_async(run())
        results = {
            "config": {
                **asdict(config),
                "queue_limit": rig.run_settings.queue_limit,
                "request_timeout_s": rig.run_settings.request_timeout_s,
                "max_batch": rig.run_settings.max_batch,
                "max_wait_ms": rig.run_settings.max_wait_ms,
                "model": f"{rig.model_version} ({rig.model_note})",
                "database": "the given DATABASE URL" if database_url else "SQLite (a fresh file)",
                "cpus": os.cpu_count(),
            },
            **summarize(outcomes, late_s=config.late_s),
            "max_queue_depth": extra["max_queue_depth"],
            "store_write_ms": extra["store_write_ms"],
            "batches": batch_figures(stats_before, rig.stats()),
            "memory": memory_figures(rig),
            "worker_restarts": rig.pool.restarts,
        }
    print(format_report(results), flush=True)
    return results


def format_report(results: dict[str, Any]) -> str:
    config, latency, busy = results["config"], results["latency_ms"], results["busy_latency_ms"]
    batches, memory = results["batches"], results["memory"]
    return "\n".join(
        [
            "",
            f"python -m bench loadtest: {config['users']} users x {config['photos_per_user']} photos, "
            f"{config['workers']} workers, "
            f"queue limit {config['queue_limit']}, model {config['model']}, {config['cpus']} CPUs",
            f"submitted {results['submitted']}  answered {results['answered']}  "
            f"answered with error {results['answered_with_error']}  lost {results['lost']}",
            "  outcomes: "
            + ", ".join(f"{name} {count}" for name, count in results["by_outcome"].items())
            + f"; bad files refused {results['bad_files_refused']}; unexpected {results['unexpected']}",
            f"throughput {results['answers_per_s']:.1f} answers/s over {results['seconds']:.1f} s",
            f"latency (answers) p50 {latency['p50']:.0f} ms  p95 {latency['p95']:.0f} ms  p99 {latency['p99']:.0f} ms  "
            f"max {latency['max']:.0f} ms",
            f"recording an answer (SQL + photo file) p50 {results['store_write_ms']['p50']:.0f} ms, "
            f"p95 {results['store_write_ms']['p95']:.0f} ms",
            f"busy replies {busy['n']}: p50 {busy['p50']:.0f} ms, max {busy['max']:.0f} ms; "
            f"replies later than {results['late_s']:g} s: {results['late_replies']} "
            f"(slowest {results['max_reply_ms']:.0f} ms)",
            f"batches {batches['batches']}, mean size {batches['mean_batch_size']:.1f}, "
            f"max {batches['max_batch_size']}: "
            + " ".join(f"[{size}]x{count}" for size, count in batches["histogram"].items()),
            f"deepest queue {results['max_queue_depth']}; peak RSS: worker {_mb(memory['worker_peak_rss_mb'])}, "
            f"bot process {_mb(memory['bot_process_peak_rss_mb'])}; "
            f"Redis peak {memory['redis_used_memory_peak_mb']} MB; "
            f"worker restarts {results['worker_restarts']}",
            f"votes: {results['votes'] or 'none'}",
        ]
    )


def save_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, default=str))


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


def say_progress(verbose: bool) -> Callable[[str], None]:
    """A `say(message)` that prints the message with the seconds since it was made, when `verbose`."""
    started = time.monotonic()

    def say(message: str) -> None:
        if verbose:
            print(f"[load {time.monotonic() - started:6.1f}s] {message}", flush=True)

    return say


__all__ = [
    "LoadConfig",
    "Outcome",
    "Photo",
    "Rig",
    "WorkerPool",
    "drive",
    "format_report",
    "make_photo_plan",
    "press_again",
    "run_loadtest",
    "summarize",
]
