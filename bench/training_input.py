"""Training input-pipeline benchmark: the study's ``ImageDataGenerator`` against this project's ``tf.data``.

One run measures, side by side on the same folder of synthetic JPEGs (written by
:func:`training.make_synthetic_dataset` at a phone-like 640x480):

1. **decoding**, images/s over one full epoch each, after a warm-up batch:

   - the original study's way, ``ImageDataGenerator().flow_from_directory(folder,
     target_size=(S, S), batch_size=B, class_mode="categorical")``. Keras 3 dropped
     ``ImageDataGenerator`` from its public API; it still ships as
     ``keras.src.legacy.preprocessing.image.ImageDataGenerator``, which is what is
     imported here (a private path: it may disappear in a later Keras);
   - this project's :func:`training.make_tf_dataset` (``model.load_image`` in parallel
     through ``tf.data``), uncached, and cached (``cache=True``: the epoch that fills the
     cache, then a second epoch served from memory);
2. **training input**, the same with augmentation, which is what training consumes (the
   study augmented its photos too): ``ImageDataGenerator`` given the recipe's flips,
   rotations, zooms and shifts (it has no contrast change, so it does a little less work),
   against the recipe's own training input, ``make_tf_dataset(cache=True)`` then
   :func:`~training._augmentation.augment_batches`: its first epoch (decoding, filling the
   cache) and a later one (cached photos, augmented anew), and over a whole default run
   of the recipe (10 + 20 epochs: the first epoch once, the later one for the rest);
3. **training step throughput**, images/s of ``train_on_batch`` for each backbone on one
   fixed batch (uint8 pixels converted to float32), SGD, after 2 warm-up steps: how fast
   the model could consume images, to put the pipelines' rates in context.

Every tf.data figure is divided by its ``ImageDataGenerator`` counterpart; the target is 3x.
The machine is shared and noisy: the ratios are the claim, not the absolute rates.
TensorFlow and Keras are imported when the benchmark runs, not when this module is imported.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.figures import percentile
from model import Preprocessing
from training import SYNTHETIC_CLASSES, check_samples, make_synthetic_dataset, make_tf_dataset, scan_folder

PHOTO_SIZE = (640, 480)
RATIO_TARGET = 3.0
IDG_IMPORT = "keras.src.legacy.preprocessing.image.ImageDataGenerator"
WARMUP_STEPS = 2


def run_input_benchmark(
    *,
    photos: int = 600,
    image_size: int = 224,
    batch_size: int = 32,
    steps_backbones: Sequence[str] = ("tiny", "resnet50"),
    train_steps: int = 10,
    work_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole benchmark once and return every figure (JSON-serialisable).

    `photos` is rounded up to a multiple of the number of synthetic classes. The JPEGs
    go to `work_dir` (kept) or to a temporary folder (removed afterwards).
    """
    if photos < 1 or image_size < 1 or batch_size < 1 or train_steps < 1:
        raise ValueError("photos, image_size, batch_size and train_steps must be at least 1")

    def say(message: str) -> None:
        if progress:
            print(f"[bench-training] {message}", file=sys.stderr, flush=True)

    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        return _run(Path(work_dir), photos, image_size, batch_size, steps_backbones, train_steps, say)
    with tempfile.TemporaryDirectory(prefix="carbot-input-bench-") as tmp:
        return _run(Path(tmp), photos, image_size, batch_size, steps_backbones, train_steps, say)


def _run(
    work_dir: Path,
    photos: int,
    image_size: int,
    batch_size: int,
    backbones: Sequence[str],
    train_steps: int,
    say: Any,
) -> dict[str, Any]:
    classes = SYNTHETIC_CLASSES
    per_class = math.ceil(photos / len(classes))
    folder = work_dir / "photos"
    say(f"writing {per_class * len(classes)} synthetic {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs to {folder}")
    started = time.perf_counter()
    make_synthetic_dataset(folder, per_class=per_class, size=PHOTO_SIZE, classes=classes)
    generate_s = time.perf_counter() - started

    preprocessing = Preprocessing(image_size=image_size)
    samples, bad = check_samples(scan_folder(folder), preprocessing)
    if bad:
        raise RuntimeError(f"unreadable synthetic photos: {bad[:3]}")
    labels = sorted({s.label for s in samples})
    n = len(samples)

    import keras
    import tensorflow as tf

    from training import TrainConfig, augment_batches

    say(f"decoding: ImageDataGenerator.flow_from_directory, one epoch of {n} photos")
    idg = _bench_image_data_generator(folder, image_size, batch_size, n)
    say(f"  {idg['images_per_s']:.1f} images/s")

    say("decoding: tf.data (make_tf_dataset), one epoch, uncached")
    dataset = make_tf_dataset(samples, labels, preprocessing, batch_size=batch_size, shuffle=True)
    tfdata = _bench_tf_dataset(dataset, n)
    say(f"  {tfdata['images_per_s']:.1f} images/s")

    say("decoding: tf.data with cache=True: the epoch that fills the cache, then a cached epoch")
    cached_ds = make_tf_dataset(samples, labels, preprocessing, batch_size=batch_size, shuffle=True, cache=True)
    filling = _time_epoch(cached_ds, n)  # first batch included: this epoch is the one that decodes
    cached = _bench_tf_dataset(cached_ds, n, warm_up=False)
    say(f"  filling {filling['images_per_s']:.1f} images/s, cached {cached['images_per_s']:.1f} images/s")

    say("training input: ImageDataGenerator with the recipe's augmentation, one epoch")
    idg_augmentation = _idg_augmentation()
    idg_aug = _bench_image_data_generator(folder, image_size, batch_size, n, augmentation=idg_augmentation)
    say(f"  {idg_aug['images_per_s']:.1f} images/s")

    say("training input: the recipe's (make_tf_dataset cache=True, augment_batches): first epoch, then a later one")
    training_ds = augment_batches(
        make_tf_dataset(samples, labels, preprocessing, batch_size=batch_size, shuffle=True, cache=True)
    )
    training_first = _time_epoch(training_ds, n)  # first batch included: this epoch decodes
    training_later = _bench_tf_dataset(training_ds, n, warm_up=False)
    say(f"  first {training_first['images_per_s']:.1f} images/s, later {training_later['images_per_s']:.1f} images/s")

    defaults = TrainConfig()  # the recipe's default run: its head epochs, then its fine-tuning epochs
    epochs = defaults.head_epochs + defaults.finetune_epochs
    run_tf = training_first["seconds"] + (epochs - 1) * training_later["seconds"]
    run_idg = epochs * idg_aug["seconds"]
    ratios = {
        "decoding": tfdata["images_per_s"] / idg["images_per_s"],
        "decoding_cached": cached["images_per_s"] / idg["images_per_s"],
        "training_first_epoch": training_first["images_per_s"] / idg_aug["images_per_s"],
        "training_later_epoch": training_later["images_per_s"] / idg_aug["images_per_s"],
        "training_run": run_idg / run_tf,
    }

    training: dict[str, Any] = {}
    for backbone in backbones:
        say(f"train_on_batch, {backbone} at {image_size} px, batch {batch_size}: {train_steps} steps")
        training[backbone] = _bench_train_steps(backbone, len(labels), image_size, batch_size, train_steps)
        say(f"  {training[backbone]['images_per_s']:.1f} images/s")

    return {
        "photos": n,
        "photo_size": list(PHOTO_SIZE),
        "classes": len(labels),
        "image_size": image_size,
        "batch_size": batch_size,
        "generate_s": generate_s,
        "input_pipeline": {
            "image_data_generator": idg,
            "tf_data": tfdata,
            "tf_data_cache_fill": filling,
            "tf_data_cached": cached,
            "image_data_generator_augmented": idg_aug,
            "training_first_epoch": training_first,
            "training_later_epoch": training_later,
        },
        "idg_augmentation": idg_augmentation,
        "run_epochs": epochs,
        "ratios": ratios,
        "ratio_target": RATIO_TARGET,
        "ratio_pass": {name: bool(value >= RATIO_TARGET) for name, value in ratios.items()},
        "training_steps": training,
        "machine": _machine_info(tf.__version__, keras.__version__),
    }


def _idg_augmentation() -> dict[str, Any]:
    """The recipe's augmentation in ``ImageDataGenerator``'s terms ("reflect", as the recipe's layers fill)."""
    from training import ROTATION, TRANSLATION, ZOOM

    return {
        "horizontal_flip": True,
        "rotation_range": ROTATION * 360,
        "zoom_range": ZOOM,
        "width_shift_range": TRANSLATION,
        "height_shift_range": TRANSLATION,
        "fill_mode": "reflect",
    }


def _bench_image_data_generator(
    folder: Path, image_size: int, batch_size: int, n: int, *, augmentation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The study's pipeline: ``ImageDataGenerator(**augmentation)`` (none by default), its default shuffle."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    iterator = ImageDataGenerator(**(augmentation or {})).flow_from_directory(
        str(folder), target_size=(image_size, image_size), batch_size=batch_size, class_mode="categorical", seed=0
    )
    if iterator.samples != n:
        raise RuntimeError(f"flow_from_directory found {iterator.samples} photos, expected {n}")
    next(iterator)  # warm-up batch
    images = 0
    started = time.perf_counter()
    while images < n:
        x, _ = next(iterator)
        images += len(x)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "import": IDG_IMPORT}


def _bench_tf_dataset(dataset: Any, n: int, *, warm_up: bool = True) -> dict[str, Any]:
    if warm_up:
        for _ in dataset.take(1):  # warm-up batch: traces the pipeline, starts the threads
            pass
    return _time_epoch(dataset, n)


def _time_epoch(dataset: Any, n: int) -> dict[str, Any]:
    images = 0
    started = time.perf_counter()
    for x, _ in dataset:
        images += int(x.shape[0])
    seconds = time.perf_counter() - started
    if images != n:
        raise RuntimeError(f"tf.data gave {images} images in an epoch, expected {n}")
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def _bench_train_steps(backbone: str, classes: int, image_size: int, batch_size: int, steps: int) -> dict[str, Any]:
    import keras

    from model import build_classifier

    keras.backend.clear_session()
    model = build_classifier(classes, backbone=backbone, image_size=image_size, weights=None)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(batch_size, image_size, image_size, 3), dtype=np.uint8).astype(np.float32)
    y = rng.integers(0, classes, size=(batch_size,), dtype=np.int32)
    for _ in range(WARMUP_STEPS):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - started)
    seconds = sum(times)
    return {
        "steps": steps,
        "seconds": seconds,
        "step_ms_median": percentile(times, 50) * 1000,
        "images_per_s": steps * batch_size / seconds,
        "parameters": int(model.count_params()),
    }


def _machine_info(tf_version: str, keras_version: str) -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load,
        "tensorflow": tf_version,
        "keras": keras_version,
    }


RATIO_NAMES = {
    "decoding": "decoding, uncached",
    "decoding_cached": "decoding, cached epoch",
    "training_first_epoch": "training input, first epoch (decodes)",
    "training_later_epoch": "training input, later epoch (cached)",
    "training_run": "training input, whole run",
}


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table of the rates, then each tf.data / ImageDataGenerator ratio with its verdict."""
    pipe = results["input_pipeline"]
    s, b = results["image_size"], results["batch_size"]
    w, h = results["photo_size"]
    machine = results["machine"]
    lines = [
        f"{results['photos']} photos at {w}x{h} -> {s} px, batches of {b}; "
        f"{machine['usable_cpus']} CPUs, TensorFlow {machine['tensorflow']}, Keras {machine['keras']}",
        "",
        "| pipeline | images/s | epoch s |",
        "|----------|---------:|--------:|",
    ]
    rows = [
        (f"decoding: ImageDataGenerator.flow_from_directory (`{IDG_IMPORT}`)", pipe["image_data_generator"]),
        ("decoding: tf.data `make_tf_dataset`, uncached", pipe["tf_data"]),
        ("decoding: tf.data `make_tf_dataset`, cache=True, filling epoch", pipe["tf_data_cache_fill"]),
        ("decoding: tf.data `make_tf_dataset`, cache=True, cached epoch", pipe["tf_data_cached"]),
        ("training input: ImageDataGenerator with the recipe's augmentation", pipe["image_data_generator_augmented"]),
        ("training input: the recipe's tf.data, first epoch", pipe["training_first_epoch"]),
        ("training input: the recipe's tf.data, later epoch", pipe["training_later_epoch"]),
    ]
    for name, figures in rows:
        lines.append(f"| {name} | {figures['images_per_s']:.1f} | {figures['seconds']:.2f} |")
    for backbone, figures in results["training_steps"].items():
        lines.append(
            f"| train_on_batch `{backbone}` ({figures['steps']} steps, median {figures['step_ms_median']:.0f} ms) "
            f"| {figures['images_per_s']:.1f} | |"
        )
    lines += ["", f"tf.data / ImageDataGenerator (target >= {results['ratio_target']:.0f}x):"]
    for name, ratio in results["ratios"].items():
        label = RATIO_NAMES[name]
        if name == "training_run":
            label += f" of {results['run_epochs']} epochs"
        verdict = "PASS" if results["ratio_pass"][name] else "MISS"
        lines.append(f"- {label}: {ratio:.2f}x {verdict}")
    return "\n".join(lines)
