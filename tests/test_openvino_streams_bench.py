"""`python -m bench openvino-streams` runs end to end on a version's int8 variant and reports both ways."""

from __future__ import annotations

from bench.openvino_streams import NEIGHBOURS, format_table, run_streams_benchmark
from model import ModelRegistry


def test_openvino_streams_measures_both_ways_beside_each_neighbour(demo_registry) -> None:
    # One round of one batch: the figures mean nothing at this size; that both ways run and report does.
    results = run_streams_benchmark(ModelRegistry(demo_registry).path_for("demo"), rounds=1, batches=1)
    assert results["streams"] >= 1
    assert set(results["images_per_s"]) == set(NEIGHBOURS)
    for rates in results["images_per_s"].values():
        assert len(rates) == 2 and all(rate > 0 for rate in rates.values())
    assert "beside 50 % of a core" in format_table(results)
