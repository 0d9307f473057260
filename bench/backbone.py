"""A backbone that has learned something, for the serving benchmark on a machine without ImageNet weights.

Speed does not depend on the weights, but an optimised variant's verification does: an int8 copy of
a random ResNet50 agreed with it on 13 % of photos, because a random network's answers are near-ties
that 8-bit rounding flips, so the worker never served int8 in the benchmark. The benchmark's backbone
is therefore trained first, on training's synthetic classes at a small size (the backbone is fully
convolutional, so the same weights serve at 224 px), once per machine: the weights are cached.
A real weights file (ImageNet's, where one can be had) can be given instead (`--backbone-weights`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PRETRAIN_SIZE = 96  # px: a ResNet50 step costs a sixth of one at 224 px here
PRETRAIN_PHOTOS = 2400  # synthetic photos, 400 a class
PRETRAIN_EPOCHS = 10  # ResNet50: 19 minutes on 2 cores (training accuracy 99.7 %)
PRETRAIN_BATCH = 32
PRETRAIN_SEED = 0


def default_cache_dir() -> Path:
    """Where trained backbones are kept between runs: `$XDG_CACHE_HOME/carbot-bench`, else `~/.cache/carbot-bench`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carbot-bench"


def synthetic_backbone(
    backbone: str,
    cache_dir: Path,
    *,
    photos: int = PRETRAIN_PHOTOS,
    epochs: int = PRETRAIN_EPOCHS,
    say: Callable[[str], None] = print,
) -> Path:
    """The weights file of `backbone` trained on training's synthetic classes; trained now unless cached."""
    path = cache_dir / f"{backbone}-synthetic-{PRETRAIN_SIZE}px-{photos}x{epochs}-seed{PRETRAIN_SEED}.weights.h5"
    if path.is_file():
        say(f"the backbone trained on synthetic photos is cached: {path}")
        return path
    import keras

    from model import build_classifier
    from training import SYNTHETIC_CLASSES, synthetic_photo

    started = time.monotonic()
    say(f"training {backbone} on {photos} synthetic photos at {PRETRAIN_SIZE} px for {epochs} epochs "
        "(once: the weights are cached)")  # fmt: skip
    keras.utils.set_random_seed(PRETRAIN_SEED)
    rng = np.random.default_rng(PRETRAIN_SEED)
    targets = np.arange(photos) % len(SYNTHETIC_CLASSES)
    size = (PRETRAIN_SIZE, PRETRAIN_SIZE)
    images = np.stack([np.asarray(synthetic_photo(SYNTHETIC_CLASSES[t], rng, size)) for t in targets])
    network = build_classifier(len(SYNTHETIC_CLASSES), backbone=backbone, image_size=PRETRAIN_SIZE, weights=None)
    network.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = network.fit(images.astype(np.float32), targets, batch_size=PRETRAIN_BATCH, epochs=epochs, verbose=0)
    accuracy = history.history["accuracy"][-1]
    say(f"    trained in {time.monotonic() - started:.0f} s, training accuracy {accuracy:.1%}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{os.getpid()}-{path.name}")  # keras wants the ".weights.h5" ending
    network.get_layer("backbone").save_weights(partial)
    partial.replace(path)  # a run stopped mid-write leaves no half-written cache behind
    return path
