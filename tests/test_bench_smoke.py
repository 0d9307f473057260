"""`python -m bench serving` end to end at a tiny size: a tiny backbone at 32 px, a handful of photos, real workers."""

from __future__ import annotations

import json
import math

from bench.serving import run_benchmark
from carbot.settings import Settings
from model import RUNTIMES, VARIANT_RUNTIMES
from model._variants import FAILED, NOT_RUN, REFUSED, VERIFIED


def test_benchmark_runs_end_to_end_and_reports_every_figure(tmp_path, capsys):
    results = run_benchmark(
        Settings(data_dir=tmp_path / "data"),
        photos=8,
        image_size=32,
        backbone="tiny",
        head_photos=60,  # the path, fast; the default 2400 gives a ResNet50 the margins int8 keeps
        phone_size=(800, 600),
        single_photos=4,
        verbose=False,
    )

    assert json.loads(json.dumps(results)) == results  # what `--json` saves
    methods = results["methods"]
    assert set(methods) == {
        "a_model_ceiling",
        "a_prime_runtime_ceiling",
        "b_predict_one_at_a_time",
        "c_plain_rq",
        "d_batch_worker",
        "e_single_photo",
        "f_decode_and_model",
    }
    for name in (
        "a_model_ceiling",
        "a_prime_runtime_ceiling",
        "b_predict_one_at_a_time",
        "c_plain_rq",
        "d_batch_worker",
        "f_decode_and_model",
    ):
        rate = methods[name]["images_per_s"]
        assert 0 < rate < 1e6 and math.isfinite(rate), name

    d = methods["d_batch_worker"]
    assert d["latency_ms"]["p50"] <= d["latency_ms"]["p95"] <= d["latency_ms"]["p99"] <= d["latency_ms"]["max"]
    assert 1 <= d["mean_batch_size"] <= 32
    assert sum(d["batch_sizes"]) == 8
    assert set(d["wall_s"]) == {"forward", "forward_on_padding", "decode", "rest"}
    assert d["worker_forward_images_per_s"] > 0
    assert d["top1_agreement_with_a"] > 0.5  # the worker serves the same model and preprocessing as (a)
    assert d["top1_agreement_with_a_prime"] > 0.5
    assert set(d["ms_per_photo"]) == {"wall", "client_reduce", "worker_decode", "model", "rest"}
    assert d["ms_per_photo"]["model"] > 0 and d["ms_per_photo"]["client_reduce"] > 0
    assert d["worker_decode_ms"]["n"] == 8 and d["worker_queue_ms"]["n"] == 8

    # Every variant was exported and judged against Keras; the worker chose among them (auto) and said why.
    assert set(results["variants"]) == set(VARIANT_RUNTIMES)
    for variant in results["variants"].values():
        assert variant["status"] in (VERIFIED, REFUSED, FAILED, NOT_RUN) and variant["reason"]
    served = results["runtime"]
    assert results["config"]["runtime_setting"] == "auto" and served["version"] == "bench"
    assert served["runtime"] in RUNTIMES and served["reason"]
    if served["runtime"] != "tensorflow":
        assert results["variants"][served["runtime"]]["status"] == "verified"  # a refused variant never serves
    assert methods["a_prime_runtime_ceiling"]["runtime"] == served["runtime"]
    # (c)'s worker chose on its own: which runtime it answered on is reported, to be compared with (d)'s.
    assert methods["c_plain_rq"]["runtimes"] and set(methods["c_plain_rq"]["runtimes"]) <= set(RUNTIMES)

    # The client reduces each photo as the bots' does: the queued BMPs are smaller than the files.
    reduction = results["client_reduce"]
    assert 0 < reduction["queued_kb_mean"] < reduction["original_kb_mean"]
    assert reduction["telegram_ms_p50"] > 0 and "320x240" in reduction["ms_p50"]
    assert set(reduction["format"]) == {"bmp", "png"}  # the queue's format beside the one it replaced
    assert all(figures["write_ms_p50"] > 0 and figures["kb_mean"] > 0 for figures in reduction["format"].values())
    for name in ("c_plain_rq", "d_batch_worker"):
        assert 50 < methods[name]["peak_rss_mb"] < 20_000, name

    e = methods["e_single_photo"]
    assert 0 < e["model_batch1_ms"]["p50"] < e["latency_ms"]["p50"] < 10_000
    assert e["overhead_ms"] == round(e["latency_ms"]["p50"] - e["model_batch1_ms"]["p50"], 1)

    a, f = methods["a_model_ceiling"], methods["f_decode_and_model"]
    assert results["shares"]["f/a"] == round(f["images_per_s"] / a["images_per_s"], 3)
    assert results["shares"]["d/f"] == round(d["images_per_s"] / f["images_per_s"], 3)
    a_prime = methods["a_prime_runtime_ceiling"]
    assert results["shares"]["f/a'"] == round(f["images_per_s"] / a_prime["images_per_s"], 3)
    c = methods["c_plain_rq"]
    assert results["shares"]["a'/c"] == round(a_prime["images_per_s"] / c["images_per_s"], 3)
    assert results["shares"]["a'/batch_1"] == round(a_prime["images_per_s"] * e["model_batch1_ms"]["p50"] / 1000, 3)

    partial = results["partial_batch"]
    assert partial["photos"] == 8 and sum(partial["plan"]) >= 8 and partial["padded_to"] == [8]
    assert partial["planned_ms"] > 0 and partial["padded_ms"] > 0

    ratios = results["ratios"]
    assert set(ratios) == {"d/a", "d/a'", "d/a'_drift_free", "d/b", "d/c", "single_photo_overhead_ms"}
    for ratio in ratios.values():
        assert math.isfinite(ratio["value"]) and isinstance(ratio["pass"], bool)
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["tensorflow"]

    table = capsys.readouterr().out
    for line in ("(a) model ceiling", "(d) this system", "(f) decoding + model", "d/a", "d/b", "d/c", "d/f = "):
        assert line in table
    for line in ("(a') ", "d/a'", "serves on", "(d) per photo", "client reduce", "would reach a'/c = "):
        assert line in table
    assert "single-photo overhead" in table
    assert "(c)'s worker (the same setting) answered on " in table


def test_the_benchmark_warns_when_plain_rq_answered_on_another_runtime_than_the_system():
    from bench.serving import plain_runtime_line

    assert "NOT" not in plain_runtime_line(["openvino-int8"], "openvino-int8")
    warning = plain_runtime_line(["openvino-int8"], "openvino-bf16")
    assert "NOT openvino-bf16" in warning and "d/c compares runtimes" in warning
