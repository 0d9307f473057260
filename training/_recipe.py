"""The training recipe: a labelled folder of photos in, a model version in the registry out.

It follows the original study (and keras-io's transfer-learning example) in two phases:

1. list the photos (a folder per class, or a ``path,label`` CSV manifest) and set aside
   the ones that cannot be read, reporting them;
2. split them per class into train / validation / test once, and keep that split in
   ``work_dir/split.csv`` so that a rerun is evaluated on the very same test photos;
3. stream them with ``tf.data`` (decoded by the worker's own ``model.load_image``),
   augmenting the training batches with flips, small rotations, zooms, shifts and
   contrast changes;
4. weight the classes "balanced" (``n_samples / (n_classes * count)``), since real
   car-model folders are imbalanced;
5. phase 1, the head: the backbone frozen, SGD with momentum whose learning rate decays
   per epoch from ``lr`` to ``lr / finetune_lr_divisors[0]``;
6. phase 2, fine-tuning: the upper ``finetune_fraction`` of the backbone's layers
   unfrozen (BatchNorm layers stay frozen, in inference mode, over pretrained
   weights; a randomly initialised backbone trains them too), SGD decaying from
   ``lr / 5`` to ``lr / 10``;
7. evaluate on the test split, save the artefact in the registry, optionally activate it.

A randomly initialised backbone (``weights=None``: the ``tiny`` test and demo network)
has no features to protect, and a frozen random backbone gives the head next to nothing
to learn from, so there phase 1 trains the whole network at the head's learning rate and
phase 2 becomes an annealing phase at the lower fine-tuning rate over the upper
``finetune_fraction`` of the backbone (see :func:`run_phases`).

The pieces of :func:`train` (:func:`prepare_data`, :func:`build_network`,
:func:`run_phases`, :func:`predict_scores`) are what the hyperparameter search
(``training._tune``) runs for every trial, so a trial is the recipe itself.

Training cannot silently learn nothing (issue 17: two runs in six from random weights stayed
at chance and were saved as models). The cause, BatchNorm moving statistics that lag behind a
random network's fast-changing weights, is removed by recomputing them before every validation
(:class:`_PreciseBatchNorm`). Phase 1 warms its learning rate up over its first epoch, so
the first large gradients do not throw a random network off; early stopping and the plateau
cuts only start counting once the validation accuracy has left chance, so a network that has
not started to learn is not stopped with its chance-level weights kept as "the best". After
the phases the validation accuracy is checked against chance (the share of the largest
class): a run that has not reached `MIN_SKILL` of the way from chance to perfect is retried
with another seed (``attempts`` in all), then refused with :class:`TrainingFailed`, and nothing
is saved. A version whose *test* accuracy is that close to chance is saved, never activated.
``deterministic=True`` makes TensorFlow's kernels deterministic, so the same seed and data give
the same model.

After training, the out-of-distribution score (``model.OodScorer``) is fitted on the training
split's penultimate features, calibrated on the validation split and measured on the test split
and on generated photos unlike any class (``training._familiarity``), and saved with the artefact.

Both phases stop early when the validation loss stops improving (keeping the best
weights) and cut the learning rate on plateaus. After every epoch the weights and a small
JSON state (phase, epoch, history) are written to `work_dir`, so an interrupted run
started again with the same `work_dir` and config continues where it stopped. On a GPU
the model runs in mixed precision and XLA-compiled; on a CPU in float32.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from model import (
    Artefact,
    ModelRegistry,
    Preprocessing,
    build_classifier,
    export_variants,
    save_version,
    with_features,
)
from training._augmentation import augment_batches
from training._dataset import (
    Sample,
    Split,
    check_samples,
    load_split,
    make_tf_dataset,
    read_manifest,
    save_split,
    scan_folder,
    stratified_split,
)
from training._familiarity import fit_familiarity, markdown_section

log = logging.getLogger(__name__)

SPLIT_FILE = "split.csv"
STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.weights.h5"
LOG_DIR = "logs"

HEAD, FINETUNE, DONE = "head", "finetune", "done"

# How far from chance (0) towards perfect (1) a network must be to count as having learned:
# skill = (accuracy - chance) / (1 - chance). Below it on the validation split a run is retried,
# on the test split a version is not activated. 5 classes: 28 % accuracy; 190 classes: 10.5 %.
MIN_SKILL = 0.1
# Another attempt's seed: far from the first, so its initial weights share nothing with it.
RETRY_SEED_STEP = 1000


class TrainingFailed(RuntimeError):
    """Every attempt of a run stayed near chance on the validation split: nothing was saved."""


def chance_accuracy(samples: Sequence[Sample]) -> float:
    """The accuracy of always answering the most common label of `samples` (1/classes when balanced)."""
    counts = Counter(sample.label for sample in samples)
    return max(counts.values()) / len(samples) if samples else 0.0


def skill(accuracy: float, chance: float) -> float:
    """How far `accuracy` is from `chance` (0) towards perfect (1)."""
    return (accuracy - chance) / (1.0 - chance) if chance < 1.0 else 0.0


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored in the artefact's ``extra["config"]``)."""

    backbone: str = "resnet50"
    image_size: int = 224
    weights: str | Path | None = "imagenet"  # "imagenet", a backbone weights file, or None (random)
    batch_size: int = 32
    head_epochs: int = 10
    finetune_epochs: int = 20
    learning_rate: float = 0.01
    finetune_lr_divisors: tuple[float, float] = (5, 10)  # fine-tuning decays from lr/5 to lr/10
    momentum: float = 0.9
    dropout: float = 0.1
    l2: float = 0.001
    finetune_fraction: float = 0.3  # upper share of the backbone's layers unfrozen in phase 2
    validation: float = 0.15
    test: float = 0.15
    seed: int = 0
    patience: int = 5
    augment: bool = True
    attempts: int = 3  # runs whose validation accuracy stays near chance are retried with another seed
    deterministic: bool = False  # deterministic TensorFlow kernels: the same seed and data give the same model
    ood_false_rejection: float = 0.02  # share of validation photos the out-of-distribution threshold lets be flagged

    def __post_init__(self) -> None:
        if self.head_epochs < 0 or self.finetune_epochs < 0 or self.head_epochs + self.finetune_epochs < 1:
            raise ValueError("head_epochs and finetune_epochs must be >= 0, and not both 0")
        if not 0.0 <= self.finetune_fraction <= 1.0:
            raise ValueError(f"finetune_fraction must be in [0, 1], not {self.finetune_fraction}")
        if self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError("batch_size must be >= 1 and learning_rate > 0")
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if not 0.0 < self.ood_false_rejection < 1.0:
            raise ValueError(f"ood_false_rejection must be in (0, 1), not {self.ood_false_rejection}")

    def to_json(self) -> dict[str, Any]:
        """The config as plain JSON values (paths as str, tuples as lists)."""
        d = asdict(self)
        if isinstance(d["weights"], Path):
            d["weights"] = str(d["weights"])
        d["finetune_lr_divisors"] = list(d["finetune_lr_divisors"])
        return d


def train(
    data: Path,
    registry_root: Path,
    config: TrainConfig,
    *,
    version: str | None = None,
    work_dir: Path | None = None,
    activate: bool = False,
    progress: bool = True,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    extra: Mapping[str, Any] | None = None,
    variants: bool = True,
) -> Artefact:
    """Train a classifier on `data` (a folder per class, or a ``.csv`` manifest) and save it in the registry.

    `work_dir` keeps the split, the checkpoints, the resume state and the TensorBoard logs;
    running again with the same `work_dir` reuses the split and resumes an interrupted run.
    Without one, ``registry_root/.train-<version>`` is used and removed after success.
    `callbacks` are extra Keras callbacks for both phases (run after the recipe's own).
    `extra` is added to what the artefact's ``extra`` records (e.g. where the data came from).
    With `variants` the version also gets its optimised serving variants (`model.export_variants`),
    verified on the test split and calibrated on the training split.
    Returns the saved artefact. Raises :class:`TrainingFailed` when every attempt stayed near
    chance; with `activate`, a version whose test accuracy is near chance is saved, not activated.
    """
    data, registry_root = Path(data), Path(registry_root)
    version = version or "v" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    own_work_dir = work_dir is None
    work_dir = Path(work_dir) if work_dir is not None else registry_root / f".train-{version}"
    say = reporter("train", progress)
    if config.deterministic:
        # Process-wide and one-way: every later TensorFlow op in this process is deterministic too.
        tf.config.experimental.enable_op_determinism()

    # 1-4. The photos, split once, streamed, with balanced class weights.
    prepared = prepare_data(data, work_dir, config, say)
    labels = prepared.labels

    # 5-6. The two phases, again with another seed while the network stays near chance.
    network, state, resumed_from, attempts = _train_until_learned(
        config, work_dir, prepared, say=say, verbose=1 if progress else 2, callbacks=callbacks
    )

    # 7. Evaluate on the test split, fit the out-of-distribution score, save, activate.
    test_ds = make_tf_dataset(prepared.split.test, labels, prepared.preprocessing, batch_size=config.batch_size)
    metrics, evaluation = _evaluate(network, test_ds, labels, len(prepared.split.test))
    say(f"test accuracy {metrics['test_accuracy']:.3f}, top-3 {metrics['test_top3_accuracy']:.3f}")
    ood, ood_calibration = fit_familiarity(
        network,
        labels,
        prepared.preprocessing,
        train=prepared.split.train,
        validation=prepared.split.validation,
        test=prepared.split.test,
        batch_size=config.batch_size,
        false_rejection=config.ood_false_rejection,
        say=say,
    )
    test_chance = chance_accuracy(prepared.split.test)
    refused = None
    if skill(metrics["test_accuracy"], test_chance) < MIN_SKILL:
        refused = (
            f"test accuracy {metrics['test_accuracy']:.3f} is near chance ({test_chance:.3f}, "
            f"the most common class's share)"
        )

    def add_files(directory: Path) -> None:
        if evaluation is not None:
            _write_report(evaluation, directory, state.history, version)
            with open(directory / "report.md", "a", encoding="utf-8") as report:
                report.write("\n" + markdown_section(ood_calibration, ood.threshold))
        if variants:
            say("exporting the serving variants and verifying them on the test split")
            # With the penultimate features as a second output: a variant answers the out-of-distribution score too.
            export_variants(
                with_features(network), directory, preprocessing=prepared.preprocessing, labels=labels,
                verification=[(sample.path, sample.label) for sample in prepared.split.test],
                calibration=[sample.path for sample in prepared.split.train], say=say,
            )  # fmt: skip

    artefact = save_version(
        ModelRegistry(registry_root),
        network,
        version=version,
        add_files=add_files,
        activate=activate and not refused,
        labels=labels,
        backbone=config.backbone,
        preprocessing=prepared.preprocessing,
        dropout=config.dropout,
        l2=config.l2,
        metrics=metrics,
        data_fingerprint=prepared.split.fingerprint,
        extra={
            "config": config.to_json(),
            "data": str(data),
            "skipped": prepared.skipped,
            "counts": {**prepared.counts, "classes": len(labels), "skipped": len(prepared.skipped)},
            "history": state.history,
            "resumed_from": resumed_from,
            "attempts": attempts,
            "mixed_precision": on_gpu(),
            **({"not_activated": refused} if refused else {}),
            **(extra or {}),
        },
        ood=ood,
        ood_calibration=ood_calibration,
    )
    if activate and refused:
        log.warning("version %s is saved but not activated: %s", version, refused)
        say(f"NOT activating {version!r}: {refused}; it learned next to nothing")
        activate = False
    say(f"saved model version {version!r}{' (active)' if activate else ''} in {registry_root}")
    if own_work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return artefact


# --------------------------------------------------------------------------
# The pieces train() is made of, shared with the hyperparameter search (training._tune)


def reporter(name: str, progress: bool) -> Callable[[str], None]:
    """A `say(message)` that logs, and with `progress` also prints with the seconds since now."""
    started = time.monotonic()

    def say(message: str) -> None:
        log.info(message)
        if progress:
            print(f"[{name} {time.monotonic() - started:6.1f}s] {message}", flush=True)

    return say


@dataclass
class PreparedData:
    """A run's photos: checked, split once (the split saved in the work dir), and streamed."""

    split: Split
    labels: list[str]
    preprocessing: Preprocessing
    skipped: list[dict[str, str]]  # the unreadable photos: path, label, reason
    counts: dict[str, int]  # photos per split part
    train: tf.data.Dataset  # shuffled, augmented when the config says so, cached after decoding
    validation: tf.data.Dataset  # cached after decoding
    class_weight: dict[int, float]


def prepare_data(data: Path, work_dir: Path, config: TrainConfig, say: Callable[[str], None]) -> PreparedData:
    """Steps 1-4 of the recipe: list and check the photos, split them (or reuse the saved split), stream them.

    The test part is left out on purpose: a search over hyperparameters must never see it.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    preprocessing = Preprocessing(image_size=config.image_size)

    # 1. The photos, without the unreadable ones.
    samples = read_manifest(data) if data.suffix.lower() == ".csv" else scan_folder(data)
    samples, bad = check_samples(samples, preprocessing)
    for sample, reason in bad:
        log.warning("skipping unreadable photo %s: %s", sample.path, reason)
    skipped = [{"path": str(sample.path), "label": sample.label, "reason": reason} for sample, reason in bad]
    say(f"{len(samples)} readable photos, {len(bad)} skipped as unreadable")

    # 2. The split, made once and reused.
    split = _split(samples, work_dir / SPLIT_FILE, config)
    labels = list(split.labels)
    counts = {name: len(part) for name, part in split.parts().items()}
    say(f"{len(labels)} classes; split {counts['train']} / {counts['validation']} / {counts['test']} (train/val/test)")
    if not split.train or not split.validation or not split.test:
        raise ValueError(f"every split part needs photos, got {counts}; add photos or change the fractions")

    # 3. tf.data pipelines.
    train_ds = make_tf_dataset(
        split.train, labels, preprocessing, batch_size=config.batch_size, shuffle=True, seed=config.seed, cache=True
    )
    if config.augment:
        train_ds = augment_batches(train_ds, config.seed)
    val_ds = make_tf_dataset(split.validation, labels, preprocessing, batch_size=config.batch_size, cache=True)

    # 4. Balanced class weights.
    class_weight = _balanced_class_weights(split.train, labels)
    return PreparedData(split, labels, preprocessing, skipped, counts, train_ds, val_ds, class_weight)


def on_gpu() -> bool:
    """Whether TensorFlow sees a GPU: mixed precision and XLA then, float32 and no XLA on a CPU."""
    return bool(tf.config.list_physical_devices("GPU"))


def build_network(config: TrainConfig, num_classes: int) -> keras.Model:
    """The config's classifier, its random parts seeded by ``config.seed``, in mixed precision on a GPU."""
    previous_policy = keras.mixed_precision.global_policy().name
    if on_gpu():
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(config.seed)
        return build_classifier(
            num_classes,
            backbone=config.backbone,
            image_size=config.image_size,
            weights=config.weights,
            dropout=config.dropout,
            l2=config.l2,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train_until_learned(
    config: TrainConfig,
    work_dir: Path,
    prepared: PreparedData,
    *,
    say: Callable[[str], None],
    verbose: int,
    callbacks: Sequence[keras.callbacks.Callback],
) -> tuple[keras.Model, RunState, dict | None, list[dict[str, Any]]]:
    """Run the phases until the validation accuracy leaves chance, at most ``config.attempts`` times.

    Attempt n > 0 uses seed ``config.seed + n * RETRY_SEED_STEP`` and its own checkpoints in
    ``work_dir/attempt-n``, so an interrupted run resumes whichever attempt it was in.
    Returns the network, its state, where the first attempt resumed from, and every attempt's
    seed and validation accuracy. Raises :class:`TrainingFailed` when none learned.
    """
    chance = chance_accuracy(prepared.split.validation)
    attempts: list[dict[str, Any]] = []
    resumed_from = None
    for attempt in range(config.attempts):
        run_config = config if attempt == 0 else replace(config, seed=config.seed + attempt * RETRY_SEED_STEP)
        run_dir = work_dir if attempt == 0 else work_dir / f"attempt-{attempt}"
        run_dir.mkdir(parents=True, exist_ok=True)
        network = build_network(run_config, len(prepared.labels))
        state = RunState.load(run_dir, run_config, prepared.split.fingerprint)
        if state.phase != HEAD or state.epoch > 0:
            if attempt == 0:
                resumed_from = {"phase": state.phase, "epoch": state.epoch}
            network.load_weights(run_dir / CHECKPOINT_FILE)
            say(f"resuming from {run_dir}: phase {state.phase!r}, {state.epoch} epoch(s) done")
        run_phases(network, run_config, state, run_dir, prepared, say=say, verbose=verbose, callbacks=callbacks)
        accuracy = predict_scores(network, prepared.validation)["accuracy"]
        attempts.append({"seed": run_config.seed, "validation_accuracy": accuracy})
        if skill(accuracy, chance) >= MIN_SKILL:
            return network, state, resumed_from, attempts
        log.warning("attempt %d (seed %d) stayed near chance: validation accuracy %.3f, chance %.3f",
                    attempt + 1, run_config.seed, accuracy, chance)  # fmt: skip
        say(
            f"attempt {attempt + 1} of {config.attempts} (seed {run_config.seed}) learned nothing: validation "
            f"accuracy {accuracy:.3f}, chance {chance:.3f}"
            + ("; trying another seed" if attempt + 1 < config.attempts else "")
        )
    tried = ", ".join(f"seed {a['seed']}: {a['validation_accuracy']:.3f}" for a in attempts)
    raise TrainingFailed(
        f"the network did not learn: after {len(attempts)} attempt(s) its validation accuracy stayed near chance "
        f"({tried}; chance {chance:.3f}, the share of the most common class). Nothing was saved. Check that "
        "each folder holds photos of its own class, then try a lower --learning-rate, more photos, or "
        "pretrained --weights."
    )


def run_phases(
    network: keras.Model,
    config: TrainConfig,
    state: RunState,
    work_dir: Path,
    prepared: PreparedData,
    *,
    say: Callable[[str], None],
    verbose: int = 2,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> None:
    """Steps 5-6: phase 1 then phase 2, from wherever `state` stands, checkpointed in `work_dir` every epoch.

    With pretrained weights phase 1 trains the head alone: the backbone is frozen while the
    new head's first, large gradients would otherwise wreck its features. A randomly
    initialised backbone (``weights=None``) has no features to protect, and a frozen random
    one would leave the head little to learn from, so phase 1 trains the whole network at
    the head's learning rate; phase 2 then goes on at the lower fine-tuning rate over the
    upper `finetune_fraction` of the backbone (all of it at 1.0), an annealing phase.
    """
    gpu = on_gpu()
    fit_args = {
        "train": prepared.train,
        "validation": prepared.validation,
        "class_weight": prepared.class_weight,
        "verbose": verbose,
        "jit_compile": gpu,
        "extra_callbacks": list(callbacks),
        "chance": chance_accuracy(prepared.split.validation),
    }
    pretrained = config.weights is not None
    lr = config.learning_rate

    # 5. Phase 1: the head alone on the frozen backbone (the whole network on a random one).
    if state.phase == HEAD:
        network.get_layer("backbone").trainable = not pretrained
        head_lr = (lr, lr / config.finetune_lr_divisors[0])
        what = "the head" if pretrained else "the whole network (random initial weights)"
        say(f"phase 1: training {what} for up to {config.head_epochs} epochs")
        _fit_phase(network, config, state, HEAD, config.head_epochs, head_lr, work_dir, **fit_args)
        state.advance(FINETUNE)
        network.save_weights(work_dir / CHECKPOINT_FILE)
        state.save()

    # 6. Phase 2: fine-tune the upper part of the backbone.
    if state.phase == FINETUNE:
        # BatchNorm stays frozen over pretrained statistics; random ones (weights=None) have nothing to protect.
        unfrozen = unfreeze_top(network.get_layer("backbone"), config.finetune_fraction, freeze_batchnorm=pretrained)
        finetune_lr = (lr / config.finetune_lr_divisors[0], lr / config.finetune_lr_divisors[1])
        say(f"phase 2: fine-tuning {unfrozen} backbone layers for up to {config.finetune_epochs} epochs")
        _fit_phase(network, config, state, FINETUNE, config.finetune_epochs, finetune_lr, work_dir, **fit_args)
        state.advance(DONE)
        network.save_weights(work_dir / CHECKPOINT_FILE)
        state.save()


def predict_scores(network: keras.Model, dataset: tf.data.Dataset) -> dict[str, float]:
    """Accuracy, top-3 accuracy and mean cross-entropy of `network` over a dataset of (images, labels) batches.

    Computed from predictions, so the network needs no compiling (a run resumed when done has none).
    """
    probabilities, targets = [], []
    for images, batch_targets in dataset:
        probabilities.append(np.asarray(network.predict_on_batch(images), dtype=np.float32))
        targets.append(np.asarray(batch_targets))
    p, y = np.concatenate(probabilities), np.concatenate(targets)
    top3 = np.argsort(-p, axis=1)[:, :3]
    picked = np.clip(p[np.arange(len(y)), y], 1e-7, 1.0)
    return {
        "accuracy": float(np.mean(p.argmax(axis=1) == y)),
        "top3_accuracy": float(np.mean((top3 == y[:, None]).any(axis=1))),
        "loss": float(np.mean(-np.log(picked))),
    }


# --------------------------------------------------------------------------
# Data


def _split(samples: list[Sample], path: Path, config: TrainConfig) -> Split:
    if path.exists():
        return load_split(path)
    split = stratified_split(samples, validation=config.validation, test=config.test, seed=config.seed)
    save_split(split, path)
    return split


def _balanced_class_weights(samples: Sequence[Sample], labels: Sequence[str]) -> dict[int, float]:
    """``n_samples / (n_classes * count_c)`` for every class (1.0 for a class with no training photo)."""
    count = Counter(sample.label for sample in samples)
    n = len(samples)
    return {i: (n / (len(labels) * count[label]) if count[label] else 1.0) for i, label in enumerate(labels)}


# --------------------------------------------------------------------------
# Training


class RunState:
    """Where a run stands (phase, epochs done, history), kept in ``work_dir/state.json``."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def load(cls, work_dir: Path, config: TrainConfig, fingerprint: str) -> RunState:
        path = work_dir / STATE_FILE
        identity = {"config": config.to_json(), "data_fingerprint": fingerprint}
        if path.exists() and (work_dir / CHECKPOINT_FILE).exists():
            meta = json.loads(path.read_text(encoding="utf-8"))
            saved = {"config": meta.get("config"), "data_fingerprint": meta.get("data_fingerprint")}
            if saved != identity:
                raise ValueError(
                    f"{path} belongs to a run with another config or data; use another work_dir "
                    f"or delete {path} to start again"
                )
            return cls(path, meta)
        return cls(path, {**identity, "phase": HEAD, "epoch": 0, "history": {HEAD: {}, FINETUNE: {}}})

    @property
    def phase(self) -> str:
        return self.meta["phase"]

    @property
    def epoch(self) -> int:
        return self.meta["epoch"]

    @property
    def history(self) -> dict[str, dict[str, list[float]]]:
        return self.meta["history"]

    def record(self, epoch: int, logs: dict[str, Any]) -> None:
        """Epoch `epoch` (0-based) of the current phase is done, with these logs."""
        history = self.history[self.phase]
        for key, value in logs.items():
            values = history.setdefault(key, [])
            del values[epoch:]  # a resumed epoch replaces one a crash left half-recorded
            values.append(float(value))
        self.meta["epoch"] = epoch + 1

    def advance(self, phase: str) -> None:
        self.meta["phase"], self.meta["epoch"] = phase, 0

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.meta, indent=1), encoding="utf-8")
        tmp.replace(self.path)


class _SaveState(keras.callbacks.Callback):
    """After each epoch (and after the checkpoint was written), record it in the state file."""

    def __init__(self, state: RunState) -> None:
        super().__init__()
        self.state = state

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.state.record(epoch, logs or {})
        self.state.save()


def epoch_lr(start: float, end: float, epochs: int, epoch: int) -> float:
    """Geometric decay from `start` (epoch 0) to `end` (the last epoch)."""
    if epochs <= 1:
        return start
    return start * (end / start) ** (min(epoch, epochs - 1) / (epochs - 1))


def _fit_phase(
    network: keras.Model,
    config: TrainConfig,
    state: RunState,
    phase: str,
    epochs: int,
    lr_range: tuple[float, float],
    work_dir: Path,
    *,
    train: tf.data.Dataset,
    validation: tf.data.Dataset,
    class_weight: dict[int, float],
    verbose: int,
    jit_compile: bool,
    extra_callbacks: list[keras.callbacks.Callback],
    chance: float,
) -> None:
    """Compile `network` for this phase and fit it from ``state.epoch`` up to `epochs`.

    Phase 1 from its start warms the learning rate up over its first epoch. Early stopping and
    the plateau cuts wait until the validation accuracy has left chance (`chance`).
    """
    initial_epoch = state.epoch
    if initial_epoch >= epochs:
        return

    # Decay per epoch, multiplicatively on the current rate, so ReduceLROnPlateau's cuts persist.
    def schedule(epoch: int, lr: float) -> float:
        if epoch == initial_epoch:
            return lr
        return lr * epoch_lr(*lr_range, epochs, epoch) / epoch_lr(*lr_range, epochs, epoch - 1)

    network.compile(
        optimizer=keras.optimizers.SGD(
            learning_rate=epoch_lr(*lr_range, epochs, initial_epoch), momentum=config.momentum
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy", keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3_accuracy")],
        jit_compile=jit_compile,
    )
    learning = _Learning(chance)
    recipe_callbacks = [
        keras.callbacks.LearningRateScheduler(schedule),
        *([_WarmUp()] if phase == HEAD and initial_epoch == 0 else []),
        _PreciseBatchNorm(train),
        _OnceLearning(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
            learning,
        ),
        _OnceLearning(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=max(1, config.patience // 2)),
            learning,
        ),
        keras.callbacks.ModelCheckpoint(str(work_dir / CHECKPOINT_FILE), save_weights_only=True),
        _SaveState(state),  # after the checkpoint: the state never names an epoch not yet saved
        keras.callbacks.TensorBoard(log_dir=str(work_dir / LOG_DIR / phase)),
    ]
    network.fit(
        train,
        validation_data=validation,
        epochs=epochs,
        initial_epoch=initial_epoch,
        class_weight=class_weight,
        callbacks=recipe_callbacks + extra_callbacks,
        shuffle=False,  # the pipeline shuffles
        verbose=verbose,
    )


class _WarmUp(keras.callbacks.Callback):
    """Raise the learning rate linearly from almost 0 to the scheduled one over the first epoch's batches.

    Placed after the scheduler, which sets the epoch's rate first, and before anything that reads
    the rate at the epoch's end: the scheduled rate is back in place by then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.target: float | None = None
        self.steps = 1
        self.step = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.steps = max(1, int(self.params.get("steps") or 50))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.target = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.step < self.steps and self.target is not None:
            self.model.optimizer.learning_rate = self.target * (self.step + 1) / self.steps
        self.step += 1

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.target is not None:
            self.model.optimizer.learning_rate = self.target


class _PreciseBatchNorm(keras.callbacks.Callback):
    """Before each validation, recompute the trained BatchNorm layers' statistics from training batches.

    The cause of the chance-level runs: BatchNorm layers that train (a random backbone's)
    normalise each training batch by its own statistics, but validation and serving use moving
    averages that lag behind weights changing fast, and start from mean 0, variance 1. Early
    on, and in short runs, those averages are far off: in inference mode the network answers
    one class for every photo (validation accuracy exactly at chance) while its training loss
    falls. So, as "precise BN" (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"), the
    averages are recomputed from up to `batches` training batches with the epoch's final
    weights: a plain mean over the batches, not an exponential one. Frozen BatchNorm layers
    (over pretrained statistics) are left alone, so a pretrained backbone costs nothing here.
    """

    def __init__(self, train: tf.data.Dataset, batches: int = 20) -> None:
        super().__init__()
        self.train = train
        self.batches = batches
        self.fitting = False

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.fitting = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.fitting = False

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self.fitting:
            return
        layers = [layer for layer in _batchnorm_layers(self.model) if layer.trainable]
        if not layers:
            return
        momenta = [layer.momentum for layer in layers]
        try:
            for i, (images, _) in enumerate(self.train.take(self.batches)):
                for layer in layers:
                    layer.momentum = i / (i + 1)  # the first batch replaces the statistics, later ones average in
                self.model(images, training=True)
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum


def _batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(_batchnorm_layers(layer))
    return found


class _Learning:
    """Whether the network has started to learn: its validation accuracy once left chance."""

    def __init__(self, chance: float) -> None:
        self.chance = chance
        self.started = False

    def observe(self, logs: dict[str, Any] | None) -> bool:
        accuracy = (logs or {}).get("val_accuracy")
        if accuracy is not None and skill(float(accuracy), self.chance) >= MIN_SKILL:
            self.started = True
        return self.started


class _OnceLearning(keras.callbacks.Callback):
    """Run `callback` (early stopping, plateau cuts) only from the first epoch the network has learned.

    Before that, a falling validation loss at chance accuracy would be "the best epoch", and
    a few epochs of a network that has not started yet would stop the run with those weights.
    """

    def __init__(self, callback: keras.callbacks.Callback, learning: _Learning) -> None:
        super().__init__()
        self.callback = callback
        self.learning = learning

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self.callback.set_model(model)

    def set_params(self, params: dict[str, Any]) -> None:
        super().set_params(params)
        self.callback.set_params(params)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.callback.on_train_begin(logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.learning.observe(logs):
            self.callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.callback.on_train_end(logs)


def unfreeze_top(backbone: keras.Model, fraction: float, *, freeze_batchnorm: bool = True) -> int:
    """Make the upper `fraction` of the backbone's layers trainable (BatchNorm excepted); return how many."""
    backbone.trainable = True
    layers = backbone.layers
    first = len(layers) - math.ceil(len(layers) * fraction)
    unfrozen = 0
    for i, layer in enumerate(layers):
        batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        trainable = i >= first and not (batchnorm and freeze_batchnorm)
        layer.trainable = trainable
        unfrozen += trainable and bool(layer.weights)
    return unfrozen


# --------------------------------------------------------------------------
# Evaluation


def _evaluate(
    network: keras.Model, test: tf.data.Dataset, labels: Sequence[str], n_test: int
) -> tuple[dict[str, Any], Any]:
    """Test-split metrics, and the evaluation module's ``Evaluation`` when that module exists."""
    try:
        from training._evaluation import evaluate
    except ImportError:  # the evaluation module is optional: accuracy and top-3 are computed here then
        return {**_keras_metrics(network, test), "test_images": n_test}, None
    evaluation = evaluate(lambda images: network.predict_on_batch(images), test.as_numpy_iterator(), list(labels))
    metrics: dict[str, Any] = {}
    for key, value in evaluation.metrics().items():
        metrics[key if key.startswith("test_") else f"test_{key}"] = value
    return metrics, evaluation


def _keras_metrics(network: keras.Model, test: tf.data.Dataset) -> dict[str, float]:
    scores = predict_scores(network, test)
    return {"test_accuracy": scores["accuracy"], "test_top3_accuracy": scores["top3_accuracy"]}


def _write_report(evaluation: Any, directory: Path, history: dict[str, dict[str, list[float]]], version: str) -> None:
    from training._evaluation import write_report

    # One series per metric across both phases, like a single Keras History.
    keys = {key for phase in (HEAD, FINETUNE) for key in history.get(phase, {})}
    flat = {key: history.get(HEAD, {}).get(key, []) + history.get(FINETUNE, {}).get(key, []) for key in sorted(keys)}
    write_report(evaluation, directory, history=flat, title=f"Model {version}")
