"""`training._input_bench` at a tiny size: both pipelines, the cached epoch and one training backbone."""

from __future__ import annotations

import json
import math

from training._input_bench import format_table, run_input_benchmark


def _positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_input_benchmark_reports_every_figure(tmp_path):
    results = run_input_benchmark(
        photos=48,
        image_size=32,
        batch_size=8,
        steps_backbones=("tiny",),
        train_steps=2,
        work_dir=tmp_path,
        progress=False,
    )

    assert json.loads(json.dumps(results)) == results
    assert results["photos"] == 48 and results["image_size"] == 32 and results["batch_size"] == 8
    pipe = results["input_pipeline"]
    assert set(pipe) == {"image_data_generator", "tf_data", "tf_data_cache_fill", "tf_data_cached"}
    for name, figures in pipe.items():
        assert figures["images"] >= 48, name
        assert _positive(figures["seconds"]) and _positive(figures["images_per_s"]), name
    assert "keras.src.legacy" in pipe["image_data_generator"]["import"]
    assert _positive(results["ratio_tf_data_over_idg"]) and _positive(results["ratio_cached_over_idg"])
    assert results["ratio_pass"] == (results["ratio_tf_data_over_idg"] >= results["ratio_target"])
    assert set(results["training_steps"]) == {"tiny"}
    tiny = results["training_steps"]["tiny"]
    assert tiny["steps"] == 2
    for key in ("seconds", "step_ms_median", "images_per_s", "parameters"):
        assert _positive(tiny[key]), key
    assert results["machine"]["tensorflow"] and results["machine"]["keras"]

    table = format_table(results)
    assert "ImageDataGenerator" in table and "tf.data" in table and "tiny" in table
    assert ("PASS" in table) != ("MISS" in table)
