"""The bot's store under a burst: SQLite's write-ahead log against its rollback journal, side by side.

`python -m bench store` has N people send a photo and press 👍 on the answer, all at
once, through `Store` as the conversation calls it (the SQL row and the photo
file, the reply's message id; then the answer looked up and the vote written),
on a fresh SQLite file per run, with two set-ups:

- **journal**: how the store ran before: SQLite's rollback journal, `synchronous=FULL`,
  and pysqlite's deferred transactions (the write lock is taken at the first write);
- **wal**: what `carbot.db.make_engine` sets up now: the write-ahead log,
  `synchronous=NORMAL`, `BEGIN IMMEDIATE` for writers and a plain `BEGIN` for readers.

The rounds alternate (journal, wal, journal, wal, ...) so a noisy neighbour hits
both alike; the ratio of the two medians is the claim, not the absolute rates.
Every run checks that each answer and each vote was recorded.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from bench.figures import percentile
from bots import Sender, Store
from carbot.photos import PhotoStore
from worker import Candidate

MODES = ("journal", "wal")
PHOTO_BYTES = 64 * 1024  # about a compressed phone photo as the bots receive it
TOP_K = [Candidate("FIAT ARGO", 0.9), Candidate("VW GOL", 0.1)]


def run_store_benchmark(*, senders: int = 200, rounds: int = 3) -> dict[str, Any]:
    """`rounds` bursts of `senders` people per set-up, alternating; medians, percentiles and the wal / journal ratio."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="carbot-bench-store-") as scratch:
        for round_number in range(rounds):
            for mode in MODES:
                folder = Path(scratch) / f"{mode}-{round_number}"
                runs[mode].append(asyncio.run(_one_burst(folder, mode, senders)))
    summary = {mode: _summarise(runs[mode]) for mode in MODES}
    return {
        "senders": senders,
        "rounds": rounds,
        "modes": summary,
        "all_recorded": all(run["recorded"] for mode in MODES for run in runs[mode]),
        "ratio_wal_over_journal": summary["wal"]["answers_per_s"] / summary["journal"]["answers_per_s"],
    }


def format_table(results: dict[str, Any]) -> str:
    """A small Markdown table of the results and the ratio."""
    lines = [
        f"{results['senders']} people send a photo and vote at once; median of {results['rounds']} rounds each",
        "",
        "| store | answers/s | record p50 / p95 ms | vote p50 / p95 ms |",
        "|-------|----------:|--------------------:|------------------:|",
    ]
    for mode in MODES:
        figures = results["modes"][mode]
        lines.append(
            f"| {mode} | {figures['answers_per_s']:.1f} | {figures['record_ms_p50']:.0f} / "
            f"{figures['record_ms_p95']:.0f} | {figures['vote_ms_p50']:.0f} / {figures['vote_ms_p95']:.0f} |"
        )
    recorded = "every answer and vote recorded" if results["all_recorded"] else "SOME ANSWERS OR VOTES MISSING"
    lines += ["", f"wal / journal: {results['ratio_wal_over_journal']:.2f}x answers/s; {recorded}"]
    return "\n".join(lines)


async def _one_burst(folder: Path, mode: str, senders: int) -> dict[str, Any]:
    url = f"sqlite:///{folder / 'carbot.db'}"
    folder.mkdir(parents=True)
    store = Store(url, PhotoStore(folder / "photos", retention_days=90), engine=_engine_for(url, mode))
    await asyncio.to_thread(store.migrate)
    try:
        started = time.perf_counter()
        timings = await asyncio.gather(*(_one_person(store, n) for n in range(senders)))
        seconds = time.perf_counter() - started
        counts = await store.stats()
    finally:
        await store.close()
    return {
        "seconds": seconds,
        "record_ms": [record for record, _ in timings],
        "vote_ms": [vote for _, vote in timings],
        "recorded": counts["predictions"] == senders and counts["up"] == senders,
    }


async def _one_person(store: Store, n: int) -> tuple[float, float]:
    sender = Sender("terminal", f"person-{n}", f"chat-{n}")
    photo = n.to_bytes(4, "big") * (PHOTO_BYTES // 4)  # distinct per person, so every photo is a new file
    started = time.perf_counter()
    prediction_id = await store.record_prediction(
        sender, message_id=str(n), photo=photo, model_version="bench", top_k=TOP_K, latency_ms=1.0
    )
    await store.set_reply_message(prediction_id, f"reply-{n}")
    recorded = time.perf_counter()
    # A press of 👍, as the conversation takes it: the answer is looked up, then the vote written.
    await store.get_prediction(prediction_id)
    await store.vote(prediction_id, sender, "up")
    return (recorded - started) * 1000, (time.perf_counter() - recorded) * 1000


def _engine_for(url: str, mode: str) -> Engine | None:
    """For "journal", an engine on the rollback journal; for "wal", None: the store's own (`carbot.db.make_engine`)."""
    if mode == "wal":
        return None
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _rollback_journal)
    return engine


def _rollback_journal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")
    # The migration (make_engine) left the file in WAL mode, which is persistent: switch it back.
    cursor.execute("PRAGMA journal_mode = DELETE")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.close()


def _summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    def median_of(key: str, q: int) -> float:
        return percentile([percentile(run[key], q) for run in runs], 50)

    return {
        "answers_per_s": percentile([len(run["record_ms"]) / run["seconds"] for run in runs], 50),
        "record_ms_p50": median_of("record_ms", 50),
        "record_ms_p95": median_of("record_ms", 95),
        "vote_ms_p50": median_of("vote_ms", 50),
        "vote_ms_p95": median_of("vote_ms", 95),
    }
