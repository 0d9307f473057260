"""`bench.training_input` at a tiny size: both pipelines, plain and augmented, cached epochs, one training backbone."""

from __future__ import annotations

import json
import math

from bench.training_input import format_table, run_input_benchmark


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
    assert set(pipe) == {
        "image_data_generator",
        "tf_data",
        "tf_data_cache_fill",
        "tf_data_cached",
        "image_data_generator_augmented",
        "training_first_epoch",
        "training_later_epoch",
    }
    for name, figures in pipe.items():
        assert figures["images"] >= 48, name
        assert _positive(figures["seconds"]) and _positive(figures["images_per_s"]), name
    assert "keras.src.legacy" in pipe["image_data_generator"]["import"]
    # ImageDataGenerator is given the recipe's augmentation: ±18° is the recipe's 0.05 of a turn.
    assert results["idg_augmentation"]["rotation_range"] == 18 and results["idg_augmentation"]["horizontal_flip"]

    ratios = results["ratios"]
    assert (
        set(ratios)
        == set(results["ratio_pass"])
        == {
            "decoding",
            "decoding_cached",
            "training_first_epoch",
            "training_later_epoch",
            "training_run",
        }
    )
    assert all(_positive(value) for value in ratios.values())
    assert ratios["decoding"] == pipe["tf_data"]["images_per_s"] / pipe["image_data_generator"]["images_per_s"]
    for name, value in ratios.items():
        assert results["ratio_pass"][name] == (value >= results["ratio_target"]), name
    # A whole run decodes once, then reads the cache: its ratio lies between the two epochs' ratios.
    first, later = ratios["training_first_epoch"], ratios["training_later_epoch"]
    assert min(first, later) <= ratios["training_run"] <= max(first, later)
    assert set(results["training_steps"]) == {"tiny"}
    tiny = results["training_steps"]["tiny"]
    assert tiny["steps"] == 2
    for key in ("seconds", "step_ms_median", "images_per_s", "parameters"):
        assert _positive(tiny[key]), key
    assert results["machine"]["tensorflow"] and results["machine"]["keras"]

    table = format_table(results)
    assert "ImageDataGenerator" in table and "tf.data" in table and "tiny" in table
    assert "whole run of 30 epochs" in table
    assert table.count("PASS") + table.count("MISS") == len(ratios)
