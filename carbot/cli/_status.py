"""`carbot status`: what the queue, the workers and the model registry are doing, as a dict and as text."""

from __future__ import annotations

import json

import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from carbot.connections import redis_connection
from carbot.keys import RUNTIME_KEY, SERIALIZER, STATS_KEY
from carbot.settings import Settings
from model import ModelRegistry


def collect_status(settings: Settings, redis_url: str | None) -> dict:
    """Everything `carbot status` shows. `redis_url` None means no Redis is running."""
    registry = ModelRegistry(settings.registry_dir)
    report: dict = {"model": {"active_version": registry.active_version(), "registry": str(registry.root)}}
    if redis_url is None:
        report["queue"] = None
        return report
    try:
        connection = redis_connection(redis_url, timeout_s=2)
        queue = Queue(settings.classify_queue, connection=connection, serializer=SERIALIZER)
        counters = {key.decode(): int(value) for key, value in connection.hgetall(STATS_KEY).items()}
        workers = Worker.all(queue=queue)
        runtimes = connection.hmget(RUNTIME_KEY, [w.name for w in workers]) if workers else []
        report["queue"] = {
            "name": queue.name,
            "queued": queue.count,
            "started": StartedJobRegistry(queue=queue).count,
            "finished": FinishedJobRegistry(queue=queue).count,
            "failed": FailedJobRegistry(queue=queue).count,
            "expired": counters.get("expired", 0),
        }
        report["batches"] = {
            "batches": counters.get("batches", 0),
            "photos": counters.get("photos", 0),
            "computed": counters.get("computed", 0),
            "rejected": counters.get("rejected", 0),
            "mean_batch_size": round(counters.get("photos", 0) / counters["batches"], 2)
            if counters.get("batches")
            else 0,
        }
        report["workers"] = [
            {
                "name": w.name,
                "state": w.get_state(),
                "pid": w.pid,
                "host": w.hostname,
                "finished": w.successful_job_count,
                "failed": w.failed_job_count,
                "model": _served(served),
            }  # fmt: skip
            for w, served in zip(workers, runtimes)
        ]
    except redis.RedisError as exc:
        report["queue"] = {"error": f"Redis is not answering: {exc.__class__.__name__}"}
    return report


def _served(raw: bytes | None) -> dict | None:
    """A worker's published {version, runtime, reason}, or None when it has not said (or said nonsense)."""
    try:
        served = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(served, dict):
        return None
    return {key: str(served.get(key, "")) for key in ("version", "runtime", "reason")}


def format_status(report: dict) -> str:
    """The status as a few lines for a person."""
    lines = [f"model     active version: {report['model']['active_version'] or 'none'} ({report['model']['registry']})"]
    queue = report.get("queue")
    if queue is None:
        lines.append("queue     no Redis running (set REDIS_URL, or start `carbot worker`)")
        return "\n".join(lines)
    if "error" in queue:
        lines.append(f"queue     {queue['error']}")
        return "\n".join(lines)
    lines.append(
        f"queue     {queue['name']}: {queue['queued']} queued, {queue['started']} started, "
        f"{queue['finished']} finished, {queue['failed']} failed, {queue['expired']} expired"
    )
    batches = report["batches"]
    lines.append(
        f"batches   {batches['batches']} batches, {batches['photos']} photos "
        f"(mean batch {batches['mean_batch_size']}), {batches['computed']} computed, {batches['rejected']} rejected"
    )
    lines.append(f"workers   {len(report['workers'])}")
    for w in report["workers"]:
        lines.append(f"          {w['name']} ({w['state']}, pid {w['pid']} on {w['host']}): "
                     f"{w['finished']} finished, {w['failed']} failed")  # fmt: skip
        if w.get("model"):
            served = w["model"]
            lines.append(f"            model {served['version']} on {served['runtime']}: {served['reason']}")
    return "\n".join(lines)
