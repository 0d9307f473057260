"""`python -m bench queue-cost` runs end to end, and its "python" runs really go without hiredis."""

from __future__ import annotations

from bench.queue_cost import PARSERS, format_table, run_queue_cost
from carbot.settings import Settings


def test_queue_cost_measures_both_parsers_and_hides_hiredis_where_it_says(tmp_path) -> None:
    # Eight photos, one burst, one round: the figures mean nothing at this size; that both runs work does.
    settings = Settings(data_dir=tmp_path / "data")  # no active model there: the bench's own tiny one
    results = run_queue_cost(settings, photos=8, bursts=1, rounds=1)
    assert [run["client_had_hiredis"] for parser in PARSERS for run in results["runs"][parser]] == [True, False]
    for parser in PARSERS:
        figures = results["per_photo_ms"][parser]
        assert figures["client_cpu"] > 0 and figures["worker_cpu"] > 0 and figures["wall"] > 0
        assert results["runs"][parser][0]["worker_photos"] == 16  # the warm burst and the measured one
    assert "client_cpu" in format_table(results)
    # A part that read 0 s of CPU in a run this short has no ratio, and the table still prints.
    results["per_photo_ms"]["python"]["redis_cpu"], results["hiredis_over_python"]["redis_cpu"] = 0.0, None
    assert "redis_cpu" in format_table(results)
