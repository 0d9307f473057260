"""The figures every harness reports, computed one way: percentiles, the workers' own counters, peak memory.

The workers' figures come from what they publish, never from their log lines: the counters
and batch sizes they add to in Redis (`carbot.keys.STATS_KEY`, `BATCH_SIZES_KEY`; they
survive a worker that is killed) and, for what happens inside one process, its Prometheus
endpoint (`scrape`).
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from carbot.keys import BATCH_SIZES_KEY, STATS_KEY


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile of `values` (linear interpolation, as numpy's default), 0.0 when there are none."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else 0.0


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, mean, max (rounded to 0.1) and n of `values`; zeros when there are none."""
    if not len(values):
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0, "n": 0}
    array = np.asarray(values, dtype=float)
    return {
        "p50": round(percentile(array, 50), 1),
        "p95": round(percentile(array, 95), 1),
        "p99": round(percentile(array, 99), 1),
        "mean": round(float(array.mean()), 1),
        "max": round(float(array.max()), 1),
        "n": len(array),
    }


@dataclass(frozen=True)
class WorkerStats:
    """What the workers of one Redis have added up so far; `after - before` is what a run added."""

    counters: dict[str, int] = field(default_factory=dict)  # batches, photos, padded, decode_us, inference_us, ...
    batch_sizes: dict[int, int] = field(default_factory=dict)  # photos in a batch -> batches that had that many

    @classmethod
    def read(cls, connection: redis.Redis) -> WorkerStats:
        with connection.pipeline(transaction=False) as pipe:
            pipe.hgetall(STATS_KEY)
            pipe.hgetall(BATCH_SIZES_KEY)
            counters, sizes = pipe.execute()
        return cls(
            {key.decode(): int(value) for key, value in counters.items()},
            {int(size): int(count) for size, count in sizes.items()},
        )

    def __sub__(self, before: WorkerStats) -> WorkerStats:
        return WorkerStats(
            {key: value - before.counters.get(key, 0) for key, value in self.counters.items()},
            {
                size: count - before.batch_sizes.get(size, 0)
                for size, count in self.batch_sizes.items()
                if count > before.batch_sizes.get(size, 0)
            },
        )

    def count(self, name: str) -> int:
        return self.counters.get(name, 0)

    @property
    def sizes(self) -> list[int]:
        """Every batch's size, largest first."""
        return [size for size in sorted(self.batch_sizes, reverse=True) for _ in range(self.batch_sizes[size])]

    @property
    def decode_s(self) -> float:
        return self.count("decode_us") / 1e6

    @property
    def forward_s(self) -> float:
        return self.count("inference_us") / 1e6


def scrape(urls: Iterable[str], name: str) -> float:
    """The sum of metric sample `name` over the Prometheus endpoints at `urls` (one unreachable counts 0)."""
    total = 0.0
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
        except OSError:
            continue
        total += sum(
            sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
            if sample.name == name
        )
    return total


def peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident memory so far: Linux's VmHWM, else (psutil) its current RSS.

    Not `ru_maxrss` from wait4: on Linux a child's starts at the RSS of the parent it was forked
    from, so every worker would report this process's size.
    """
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import psutil

        return round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    except Exception:
        return None


def cpu_seconds(pid: int) -> float:
    """A live process's user + system CPU seconds so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
