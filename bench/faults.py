"""`python -m bench faults`: the load test with one thing broken on purpose, and what the people in the chat got.

Each scenario drives chat users through the real conversation (`bench.loadtest`)
and, part-way through, breaks one real part:

- `worker-sigkill`: a worker holding a batch is SIGKILLed (its process manager, played
  by `WorkerPool`, starts a new one; RQ hands the dead worker's jobs to a live worker
  once their heartbeat lapses).
- `redis-restart`: Redis, with its append-only file on, is killed (SIGKILL) and started
  again on the same folder. Workers that were mid-batch exit and are restarted;
  people whose photo could not be submitted meanwhile are told so.
- `db-outage`: another connection holds SQLite's exclusive lock for a while, so the
  database can neither be read nor written. People keep sending photos and pressing
  👍; afterwards each person told "try again" presses again.
- `disk-full`: the photo store lives on a 256 KB tmpfs that fills up (real ENOSPC;
  mounting it needs root, else the scenario says it was not run).
- `corrupt-model`: a new model version whose weights were damaged on disk is made
  active behind the registry's back; workers must refuse it by its checksum and
  keep serving the old one.

Every scenario reports photos submitted / answered / answered with an error / lost,
where lost (no reply at all) must be 0, plus its own checks: the votes the database
outage did not silently drop, the photos the full disk could not keep, the model
versions that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

from bench.loadtest import (
    ANSWERED,
    UNRECORDED,
    LoadConfig,
    Outcome,
    Progress,
    Rig,
    batch_figures,
    drive,
    make_photo_plan,
    press_again,
    run_async,
    save_json,
    say_progress,
    summarize,
)
from carbot.connections import redis_connection
from carbot.settings import Settings

MODEL_REFUSALS = "carbot_worker_model_refusals_total"  # the workers' metric (carbot._metrics.MODEL_REFUSALS)
SCENARIOS = ("worker-sigkill", "redis-restart", "db-outage", "disk-full", "corrupt-model")


class ScenarioUnavailable(RuntimeError):
    """This machine cannot stage the fault (e.g. mounting a small filesystem needs root)."""


@dataclass(frozen=True)
class FaultConfig:
    """The load each scenario runs under, and how long each fault lasts."""

    users: int = 100
    photos_per_user: int = 3
    workers: int = 2
    ramp_s: float = 10.0  # the load is spread over this long, so the fault lands in the middle of it
    fault_at: float = 0.3  # share of the photos submitted when the fault strikes
    # The settings a user gets unless these are given (None): the table names any that are changed.
    job_timeout_s: int | None = None
    maintenance_interval_s: int | None = None
    request_timeout_s: float | None = None
    redis_down_s: float = 2.0
    db_outage_s: float = 20.0
    store_patience_s: float = 10.0  # the conversation's own default (bots._conversation.STORE_PATIENCE_S)
    disk_kb: int = 256
    seed: int = 0

    def load(self, index: int, **overrides: Any) -> LoadConfig:
        values: dict[str, Any] = {
            "users": self.users,
            "photos_per_user": self.photos_per_user,
            "workers": self.workers,
            "ramp_s": self.ramp_s,
            "vote_share": 0.5,
            "seed": self.seed + index,
            "job_timeout_s": self.job_timeout_s,
            "maintenance_interval_s": self.maintenance_interval_s,
            "request_timeout_s": self.request_timeout_s,
        }
        return LoadConfig(**{**values, **overrides})


def run_faults(
    settings: Settings,
    scenarios: tuple[str, ...] = SCENARIOS,
    config: FaultConfig = FaultConfig(),
    *,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run each scenario on one rig (persistent Redis, supervised workers); print a table, return everything."""
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    say = say_progress(verbose)
    results: dict[str, Any] = {"config": asdict(config), "scenarios": {}}
    with _quiet("bots"), Rig(settings, config.load(0), persistent_redis=True, say=say) as rig:
        results["config"]["model"] = f"{rig.model_version} ({rig.model_note})"
        for index, name in enumerate(scenarios):
            say(f"scenario {name}")
            _ready(rig)
            try:
                report = run_async(_SCENARIOS[name](rig, config, index, say))
            except ScenarioUnavailable as exc:
                report = {"not_run": str(exc)}
            results["scenarios"][name] = report
            say(f"  {_line(name, report)}")
    print(format_table(results), flush=True)
    return results


def _ready(rig: Rig) -> None:
    """Every worker slot alive and registered, the queue empty: each scenario starts from a healthy system."""
    for slot in range(len(rig.pool.slots)):
        rig.pool.wait_registered(slot)
    connection = redis_connection(rig.url)
    try:
        deadline = time.monotonic() + 60
        while connection.llen(f"rq:queue:{rig.run_settings.classify_queue}") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        connection.close()


async def _run(
    rig: Rig,
    load: LoadConfig,
    inject: Any,
    *,
    database: str,
    platform: str,
    photo_root: Path | None = None,
    store_patience_s: float | None = None,
    after: Any = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """One scenario's drive on a fresh SQLite database, then `after(conversation, outcomes)` (same store).

    Each scenario's people are on a `platform` of their own: the rate limiter (in Redis) counts per
    person, and the same person sending photos in every scenario would soon hear "slow down".
    """
    plan = make_photo_plan(load)
    stats_before = rig.stats()
    async with rig.conversation(
        database_url=f"sqlite:///{rig.root / database}", photo_root=photo_root, store_patience_s=store_patience_s
    ) as conversation:
        outcomes, extra = await drive(conversation, plan, load, inject=inject, platform=platform)
        if after is not None:
            extra.update(await after(conversation, outcomes))
    summary = summarize(outcomes, late_s=load.late_s)
    if "fault_at_s" in extra:
        # The photos awaiting their answer when the fault struck: what became of them.
        at = extra["fault_at_s"]
        caught = [o.category for o in outcomes if o.sent_at <= at <= o.sent_at + o.latency_ms / 1000]
        summary["in_flight_at_fault"] = _count(caught)
    summary["batches"] = batch_figures(stats_before, rig.stats())
    summary["worker_restarts_so_far"] = rig.pool.restarts
    return outcomes, {**summary, **extra}


# -- the scenarios -------------------------------------------------------------------------------------------------


async def worker_sigkill(rig: Rig, config: FaultConfig, index: int, say: Callable[[str], None]) -> dict[str, Any]:
    from rq import Queue
    from rq.job import Job
    from rq.registry import StartedJobRegistry

    from carbot.keys import SERIALIZER

    connection = redis_connection(rig.url)
    queue = Queue(rig.run_settings.classify_queue, connection=connection, serializer=SERIALIZER)
    started_key = StartedJobRegistry(queue=queue).key
    in_flight: list[str] = []

    def kill_a_busy_worker(within_s: float) -> str | None:
        """Watch RQ's started-jobs registry; SIGKILL the first worker seen holding jobs (blocking, tight loop:
        with the small model a batch is in a worker's hands for milliseconds)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            job_ids = [entry.decode().split(":")[0] for entry in connection.zrange(started_key, 0, -1)]
            with connection.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(f"{Job.redis_job_namespace_prefix}{job_id}", "worker_name")
                names = [name.decode() if name else "" for name in pipe.execute()]
            held: dict[str, list[str]] = {}
            for job_id, name in zip(job_ids, names):
                held.setdefault(name, []).append(job_id)
            victim = max(
                (name for name in held if rig.pool.slot_of(name) is not None), key=lambda n: len(held[n]), default=None
            )
            if victim is not None:
                in_flight.extend(held[victim])
                return rig.pool.kill(rig.pool.slot_of(victim), signal.SIGKILL)
            time.sleep(0.0005)
        return None

    async def inject(progress: Progress) -> dict[str, Any]:
        await progress.until_submitted(config.fault_at)
        # A burst: the workers are held for a second while photos queue up, so that the worker
        # killed next holds a real batch (the small model otherwise clears each photo in milliseconds).
        async with _workers_paused(rig):
            await asyncio.sleep(1.0)
        fault_at = time.monotonic() - progress.started
        killed = await asyncio.to_thread(kill_a_busy_worker, 10.0)
        say(f"  SIGKILLed {killed} holding {len(in_flight)} job(s)")
        return {"killed": killed, "in_flight_at_kill": len(in_flight), "fault_at_s": fault_at}

    try:
        _, report = await _run(rig, config.load(index), inject, database="sigkill.db", platform="faults-sigkill")
        statuses = [_status(Job, job_id, connection, SERIALIZER) for job_id in in_flight]
    finally:
        connection.close()
    # What became of the photos the dead worker held: answered by another worker (finished), or refused.
    report["in_flight_then"] = _count(statuses)
    report["checks"] = {
        "lost == 0": report["lost"] == 0,
        "killed mid-batch": report["in_flight_at_kill"] > 0,
        "its batch was finished by another worker": all(status in ("finished", "failed") for status in statuses),
    }
    return report


@contextlib.asynccontextmanager
async def _workers_paused(rig: Rig) -> AsyncIterator[None]:
    """Every worker stopped (SIGSTOP) for the block, and continued however the block ends."""
    await asyncio.to_thread(rig.pool.signal_all, signal.SIGSTOP)
    try:
        yield
    finally:
        await asyncio.to_thread(rig.pool.signal_all, signal.SIGCONT)


def _status(job_class: Any, job_id: str, connection: redis.Redis, serializer: Any) -> str:
    try:
        status = job_class.fetch(job_id, connection=connection, serializer=serializer).get_status()
    except Exception:  # its result expired: it finished long ago
        return "gone"
    return str(getattr(status, "value", status))


async def redis_restart(rig: Rig, config: FaultConfig, index: int, say: Callable[[str], None]) -> dict[str, Any]:
    async def inject(progress: Progress) -> dict[str, Any]:
        # Everyone sends at once (ramp 0, below): the first burst fills the queue faster than the small
        # model drains it, so the crash finds photos queued, in the workers' hands and awaited.
        await progress.until_submitted(config.fault_at)
        # The workers are held while photos queue up, as in worker-sigkill: two workers on the small model
        # can otherwise drain a burst before Redis is killed, and the crash would find no queue to keep.
        async with _workers_paused(rig):
            deadline = time.monotonic() + 5
            while len(queued := await asyncio.to_thread(_queued_jobs, rig)) < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            started = time.monotonic()
            fault_at = started - progress.started
            await asyncio.to_thread(rig.redis.stop, crash=True)
        await asyncio.sleep(config.redis_down_s)
        await asyncio.to_thread(rig.redis.start)
        down_s = time.monotonic() - started
        # What must hold is that Redis still has every job it had acknowledged (the append-only file's promise).
        missing = await asyncio.to_thread(_missing_jobs, rig, queued)
        say(f"  Redis killed and restarted ({down_s:.1f} s down); {len(queued)} queued jobs, {missing} missing after")
        return {
            "redis_down_s": round(down_s, 2),
            "queue_before_kill": len(queued),
            "queued_jobs_lost": missing,
            "fault_at_s": fault_at,
        }

    restarts = rig.pool.restarts
    # Everyone at once; a person told "something went wrong" waits a second before the next photo.
    load = config.load(index, ramp_s=0.0, think_s=1.0)
    _, report = await _run(rig, load, inject, database="redis.db", platform="faults-redis")
    report["worker_restarts"] = rig.pool.restarts - restarts
    report["checks"] = {
        "lost == 0": report["lost"] == 0,
        "every acknowledged job survived the restart": report["queued_jobs_lost"] == 0,
    }
    return report


async def db_outage(rig: Rig, config: FaultConfig, index: int, say: Callable[[str], None]) -> dict[str, Any]:
    database = rig.root / "outage.db"
    # Photos keep coming for the whole outage and a while after it.
    load = config.load(index, vote_share=1.0, vote_delay_s=3.0, ramp_s=max(config.ramp_s, config.db_outage_s * 2))

    async def inject(progress: Progress) -> dict[str, Any]:
        await progress.until_submitted(config.fault_at)
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=hold_exclusive_lock, args=(database, locked, release), daemon=True)
        holder.start()
        await asyncio.to_thread(locked.wait)
        fault_at = time.monotonic() - progress.started
        say(f"  the database is locked for {config.db_outage_s:g} s")
        await asyncio.sleep(config.db_outage_s)
        release.set()
        await asyncio.to_thread(holder.join)
        return {"db_outage_s": config.db_outage_s, "fault_at_s": fault_at}

    async def after(conversation: Any, outcomes: list[Outcome]) -> dict[str, Any]:
        told_retry = sum(outcome.vote == "retry" for outcome in outcomes)
        recorded_on_retry = await press_again(conversation, outcomes, platform="faults-db")
        return {"votes_told_retry": told_retry, "votes_recorded_on_retry": recorded_on_retry}

    outcomes, report = await _run(
        rig,
        load,
        inject,
        database="outage.db",
        platform="faults-db",
        store_patience_s=config.store_patience_s,
        after=after,
    )
    # A vote the person was thanked for (or told was already there) must be in the database.
    acknowledged = {
        (o.prediction_id, str(o.user)) for o in outcomes if o.vote.split("-")[0] in ("recorded", "unchanged")
    }
    stored = _stored_votes(database)
    report["votes_acknowledged"] = len(acknowledged)
    report["votes_silently_dropped"] = len(acknowledged - stored)
    report["answered_without_buttons"] = sum(outcome.category == UNRECORDED for outcome in outcomes)
    report["checks"] = {
        "lost == 0": report["lost"] == 0,
        "no vote silently dropped": report["votes_silently_dropped"] == 0,
        "the outage was felt (someone was told to retry)": report["votes_told_retry"]
        + report["answered_without_buttons"]
        > 0,
        "every vote told to retry was recorded on the second press": report["votes_recorded_on_retry"]
        == report["votes_told_retry"],
    }
    return report


async def disk_full(rig: Rig, config: FaultConfig, index: int, say: Callable[[str], None]) -> dict[str, Any]:
    root = rig.root / "small-disk"
    with small_filesystem(root, config.disk_kb), _counting("bots._store", "Photo not kept") as refused:
        say(f"  photos go to a {config.disk_kb} KB tmpfs at {root}")

        async def inject(progress: Progress) -> dict[str, Any]:
            return {"disk_kb": config.disk_kb}

        outcomes, report = await _run(
            rig, config.load(index), inject, database="disk.db", platform="faults-disk", photo_root=root
        )
        files = [path for path in root.rglob("*") if path.is_file()]
        damaged = [path for path in files if path.suffix == ".img" and not _intact(path)]
        leftovers = [path for path in files if path.name.endswith(".tmp")]
    recorded = _count_rows(rig.root / "disk.db", "predictions")
    with_buttons = sum(outcome.category == ANSWERED for outcome in outcomes)
    report.update(
        {
            "photos_kept": len(files) - len(leftovers),
            "photos_not_kept_enospc": refused[0],
            "damaged_files": len(damaged),
            "temporary_files_left": len(leftovers),
            "predictions_recorded": recorded,
        }
    )
    report["checks"] = {
        "lost == 0": report["lost"] == 0,
        "the disk did fill (ENOSPC seen)": refused[0] > 0,
        "every answer with buttons is recorded": recorded == with_buttons,
        "no damaged or half-written photo": not damaged and not leftovers,
    }
    return report


async def corrupt_model(rig: Rig, config: FaultConfig, index: int, say: Callable[[str], None]) -> dict[str, Any]:
    from model import ModelRegistry

    registry = ModelRegistry(rig.registry)
    good = registry.active_version()
    bad = f"{good}-corrupt"

    async def inject(progress: Progress) -> dict[str, Any]:
        await progress.until_submitted(config.fault_at)
        await asyncio.to_thread(_activate_corrupt_copy, registry, good, bad)
        say(f"  {bad} (damaged weights, old checksum) made active behind the registry's back")
        return {"corrupt_version": bad, "fault_at_s": time.monotonic() - progress.started}

    refusals_before = rig.pool.metric(MODEL_REFUSALS)
    try:
        _, report = await _run(rig, config.load(index), inject, database="model.db", platform="faults-model")
    finally:
        registry.activate(good)
    # The workers count the versions they refuse (their metrics); one that restarted meanwhile starts again at 0.
    report["model_refusals"] = int(rig.pool.metric(MODEL_REFUSALS) - refusals_before)
    report["checks"] = {
        "lost == 0": report["lost"] == 0,
        "only the good model answered": set(report["model_versions"]) == {good},
        "the corrupt model was refused": report["model_refusals"] > 0,
    }
    return report


_SCENARIOS = {
    "worker-sigkill": worker_sigkill,
    "redis-restart": redis_restart,
    "db-outage": db_outage,
    "disk-full": disk_full,
    "corrupt-model": corrupt_model,
}


# -- staging the faults --------------------------------------------------------------------------------------------


def hold_exclusive_lock(database: Path, locked: threading.Event, release: threading.Event) -> None:
    """What a long migration or a stuck admin session does: hold SQLite's write lock (readers of the WAL go on)."""
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait()
        connection.execute("ROLLBACK")
    finally:
        connection.close()


@contextlib.contextmanager
def small_filesystem(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `path`: writes past it fail with ENOSPC, as on a full disk."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "carbot-full", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        raise ScenarioUnavailable(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _activate_corrupt_copy(registry: Any, good: str, bad: str) -> None:
    """A copy of `good` as version `bad` with one byte of its weights flipped, written ACTIVE without checks."""
    import json

    source, target = registry.path_for(good), registry.path_for(bad)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    meta_path = target / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = bad
    meta_path.write_text(json.dumps(meta))  # the checksum no longer matches either
    weights = max((path for path in target.iterdir() if path.is_file()), key=lambda path: path.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    staged = registry.root / ".ACTIVE.faults"
    staged.write_text(bad + "\n")
    staged.replace(registry.root / "ACTIVE")  # in one rename, as the registry writes it: a reader never sees half


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Keep `logger`'s lines off the console: a full disk logs every photo it refuses, and the report counts them."""
    target, sink = logging.getLogger(logger), logging.NullHandler()
    target.addHandler(sink)  # else Python's last-resort handler prints them anyway
    target.propagate = False
    try:
        yield
    finally:
        target.propagate = True
        target.removeHandler(sink)


@contextlib.contextmanager
def _counting(logger: str, prefix: str) -> Iterator[list[int]]:
    """Count the log records of `logger` whose message starts with `prefix`."""
    count = [0]

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(prefix):
                count[0] += 1

    handler = Handler(logging.DEBUG)
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield count
    finally:
        target.removeHandler(handler)


def _intact(path: Path) -> bool:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() == path.stem


def _stored_votes(database: Path) -> set[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        rows = connection.execute(
            "SELECT f.prediction_id, p.platform_user_id FROM feedback f JOIN people p ON p.id = f.person_id"
        ).fetchall()
    return {(int(prediction), str(user)) for prediction, user in rows}


def _count_rows(database: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - a constant


def _missing_jobs(rig: Rig, job_ids: list[str]) -> int:
    """How many of `job_ids` Redis no longer knows (their job hash is gone)."""
    connection = redis_connection(rig.url)
    try:
        with connection.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(f"rq:job:{job_id}")
            return sum(not exists for exists in pipe.execute())
    finally:
        connection.close()


def _queued_jobs(rig: Rig) -> list[str]:
    """The ids of the jobs waiting in the classify queue."""
    connection = redis_connection(rig.url)
    try:
        return [job.decode() for job in connection.lrange(f"rq:queue:{rig.run_settings.classify_queue}", 0, -1)]
    finally:
        connection.close()


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# -- the table -----------------------------------------------------------------------------------------------------


_EXTRAS = {
    "worker-sigkill": lambda r: (
        f"{r['in_flight_at_kill']} photos in the killed worker's batch: {r['in_flight_then']}"
        f"; awaiting an answer at the kill: {r.get('in_flight_at_fault')}"
    ),
    "redis-restart": lambda r: (
        f"down {r['redis_down_s']} s; {r['queue_before_kill']} queued jobs, {r['queued_jobs_lost']} lost; "
        f"awaiting an answer at the kill: {r.get('in_flight_at_fault')}; "
        f"{r['worker_restarts']} worker restart(s)"
    ),
    "db-outage": lambda r: (
        f"{r['db_outage_s']:g} s locked: {r['answered_without_buttons']} answered without buttons, "
        f"{r['votes_told_retry']} votes told to retry ({r['votes_recorded_on_retry']} recorded on the second press), "
        f"{r['votes_silently_dropped']} of {r['votes_acknowledged']} acknowledged votes dropped"
    ),
    "disk-full": lambda r: (
        f"{r['photos_kept']} photos kept, {r['photos_not_kept_enospc']} refused by ENOSPC, "
        f"{r['predictions_recorded']} predictions recorded, {r['damaged_files']} damaged"
    ),
    "corrupt-model": lambda r: (
        f"answers by {r['model_versions']}; corrupt version refused {r['model_refusals']} time(s)"
    ),
}


def _line(name: str, report: dict[str, Any]) -> str:
    if "not_run" in report:
        return f"not run: {report['not_run']}"
    failed = [check for check, ok in report["checks"].items() if not ok]
    return (
        f"submitted {report['submitted']}, answered {report['answered']}, answered with error "
        f"{report['answered_with_error']}, lost {report['lost']}; {_EXTRAS[name](report)}"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )


_SETTINGS = ("job_timeout_s", "maintenance_interval_s", "request_timeout_s")


def format_table(results: dict[str, Any]) -> str:
    config = results["config"]
    changed = [f"{name}={config[name]}" for name in _SETTINGS if config.get(name) is not None]
    lines = [
        "",
        f"python -m bench faults: {config['users']} users x {config['photos_per_user']} photos per scenario, "
        f"{config['workers']} workers, model {config.get('model', '?')}",
        f"settings: {', '.join(changed) if changed else 'the defaults that ship'}",
        f"{'scenario':<16}{'submitted':>10}{'answered':>10}{'w/ error':>10}{'lost':>6}  checks",
    ]
    for name, report in results["scenarios"].items():
        if "not_run" in report:
            lines.append(f"{name:<16}  not run: {report['not_run']}")
            continue
        checks = (
            "all hold"
            if all(report["checks"].values())
            else "FAILED: " + ", ".join(check for check, ok in report["checks"].items() if not ok)
        )
        lines.append(
            f"{name:<16}{report['submitted']:>10}{report['answered']:>10}{report['answered_with_error']:>10}"
            f"{report['lost']:>6}  {checks}"
        )
        lines.append(f"{'':<16}{_EXTRAS[name](report)}")
    return "\n".join(lines)


__all__ = ["SCENARIOS", "FaultConfig", "ScenarioUnavailable", "format_table", "run_faults", "save_json"]
