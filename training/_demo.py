"""The demo model: a small classifier trained on synthetic shapes in about a minute.

A fresh machine has no car photos and cannot download weights, yet the bots, the
worker and the retrain gate all need an active model to show what they do. This
module makes one from nothing, end to end, through the same parts a real model
goes through:

1. generate a synthetic folder-per-class dataset (:mod:`training._synthetic`);
2. split it per class into train / validation / test (70 / 15 / 15 %);
3. decode and resize every photo with ``model.load_image``, the one function the
   worker uses too, so training and serving cannot disagree on preprocessing;
4. train ``model.build_classifier(backbone="tiny")`` from random weights with the
   project's recipe in miniature: SGD with momentum and a decaying learning rate,
   flips and small rotations as augmentation;
5. evaluate on the test split and save the artefact as version ``demo`` in the
   model registry, then make it the active version.

It is a demonstration, not the recipe for real data: the images all fit in
memory, there is a single training phase and no class weights (the classes are
balanced). Real folders of photos call for the streaming tf.data recipe instead.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from model import Artefact, ModelRegistry, Preprocessing, build_classifier, load_image, read_artefact, save_artefact
from training._synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset

DEMO_VERSION = "demo"

# Fractions of each class that go to validation and to test; the rest trains.
_VAL_FRACTION = 0.15
_TEST_FRACTION = 0.15

_BATCH_SIZE = 16
_LEARNING_RATE = 0.01


def build_demo_model(
    registry_root: Path,
    *,
    image_size: int = 48,
    per_class: int = 250,
    epochs: int = 12,
    seed: int = 0,
    activate: bool = True,
    progress: bool = True,
) -> Artefact:
    """Train the demo classifier, save it in the registry at `registry_root` as ``demo``, return its artefact.

    The whole run is determined by `seed` (data, split, initial weights,
    augmentation), up to the small nondeterminism of multi-threaded CPU kernels.
    """
    if per_class < 3:
        raise ValueError(f"per_class must be at least 3 (train, validation and test each need one), not {per_class}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {epochs}")
    started = time.monotonic()
    keras.utils.set_random_seed(seed)
    labels = list(SYNTHETIC_CLASSES)
    preprocessing = Preprocessing(image_size=image_size)

    def say(message: str) -> None:
        if progress:
            print(f"[demo {time.monotonic() - started:5.1f}s] {message}", flush=True)

    # 1. Data, read back through the serving preprocessing.
    with tempfile.TemporaryDirectory(prefix="carbot-demo-data-") as tmp:
        # Photos twice the input size and 4:3, like a phone's, so that load_image really has to resize.
        photo_size = (2 * image_size, 3 * image_size // 2)
        root = make_synthetic_dataset(Path(tmp), per_class=per_class, size=photo_size, seed=seed, classes=labels)
        files = [(path, index) for index, label in enumerate(labels) for path in sorted((root / label).glob("*.jpg"))]
        fingerprint = _fingerprint(root, [path for path, _ in files])
        images = np.stack([load_image(path.read_bytes(), preprocessing) for path, _ in files])
    targets = np.array([index for _, index in files], dtype=np.int64)
    say(f"generated {len(images)} synthetic photos of {len(labels)} classes, {image_size}x{image_size} px")

    # 2. A split that keeps every class in every part.
    train, val, test = _stratified_split(targets, seed)
    say(f"split {len(train)} train / {len(val)} validation / {len(test)} test")

    # 3. The network and its optimiser.
    network = build_classifier(len(labels), backbone="tiny", image_size=image_size, weights=None)
    steps_per_epoch = -(-len(train) // _BATCH_SIZE)
    schedule = keras.optimizers.schedules.CosineDecay(_LEARNING_RATE, decay_steps=epochs * steps_per_epoch)
    network.compile(
        optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3_accuracy")],
    )

    # 4. Train. Augmentation runs in the input pipeline, so the saved model has none of it.
    network.fit(
        _training_pipeline(images[train], targets[train], seed),
        validation_data=(images[val].astype("float32"), targets[val]),
        epochs=epochs,
        shuffle=False,  # the pipeline shuffles
        verbose=2 if progress else 0,
    )
    scores = network.evaluate(images[test].astype("float32"), targets[test], batch_size=64, verbose=0, return_dict=True)
    metrics = {
        "test_accuracy": float(scores["accuracy"]),
        "test_top3_accuracy": float(scores["top3_accuracy"]),
        "test_images": int(len(test)),
    }
    say(f"test accuracy {metrics['test_accuracy']:.3f}, top-3 {metrics['test_top3_accuracy']:.3f}")

    # 5. Save as version "demo", then activate it.
    registry = ModelRegistry(registry_root)
    with registry.staging(DEMO_VERSION) as staging_dir:
        save_artefact(
            network,
            staging_dir,
            version=DEMO_VERSION,
            labels=labels,
            backbone="tiny",
            preprocessing=preprocessing,
            metrics=metrics,
            data_fingerprint=fingerprint,
            extra={
                "dataset": "synthetic shapes (training._synthetic)",
                "per_class": per_class,
                "photo_size": list(photo_size),
                "seed": seed,
                "epochs": epochs,
            },
        )
    if activate:
        registry.activate(DEMO_VERSION)
    say(f"saved model version {DEMO_VERSION!r}{' (active)' if activate else ''} in {registry_root}")
    return read_artefact(registry.path_for(DEMO_VERSION))


def _fingerprint(root: Path, paths: list[Path]) -> str:
    """SHA-256 over every file's path (relative to `root`) and bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _stratified_split(targets: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train, validation and test: the same fractions of every class, shuffled by `seed`."""
    rng = np.random.default_rng(seed)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for cls in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == cls))
        # At least one test and one validation image per class, however small the class.
        n_test = max(1, round(len(members) * _TEST_FRACTION))
        n_val = max(1, round(len(members) * _VAL_FRACTION))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def _training_pipeline(images: np.ndarray, targets: np.ndarray, seed: int) -> tf.data.Dataset:
    """Shuffled, batched, augmented training data: random flips and rotations of up to ±18°."""
    # Every shape class is unchanged by a mirror image, so both flips are label-preserving.
    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.05, fill_mode="nearest", seed=seed),
        ],
        name="demo_augmentation",
    )
    return (
        tf.data.Dataset.from_tensor_slices((images, targets))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .batch(_BATCH_SIZE)
        .map(lambda x, y: (augment(tf.cast(x, tf.float32), training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
