"""`python -m bench store` in miniature: both set-ups run, record everything, and the table says so."""

from __future__ import annotations

import json

from click.testing import CliRunner

from bench.__main__ import main


def test_bench_store_compares_both_journals_and_records_every_answer(tmp_path):
    saved = tmp_path / "store.json"
    result = CliRunner().invoke(main, ["store", "--senders", "12", "--rounds", "1", "--json", str(saved)])

    assert result.exit_code == 0, result.output
    assert "| journal |" in result.output and "| wal |" in result.output
    assert "every answer and vote recorded" in result.output
    figures = json.loads(saved.read_text())
    assert figures["all_recorded"] is True
    assert figures["ratio_wal_over_journal"] > 0
    assert all(
        figures["modes"][mode]["record_ms_p95"] >= figures["modes"][mode]["record_ms_p50"]
        for mode in ("journal", "wal")
    )
