"""The training recipe: a folder of photos in, a model version in the registry out, resumable and reproducible."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from model import ModelRegistry, build_classifier, load_artefact, read_artefact
from training import SYNTHETIC_CLASSES, TrainConfig, load_split, make_synthetic_dataset, train

IMAGE_SIZE = 48


def train_in_a_fresh_process(dataset: Path, registry_root: Path, *, version: str, work_dir: Path):
    """`train` with `small_config()` where no earlier test left TensorFlow state behind.

    With deterministic kernels in a fresh process the same seed gives the same model, so the
    accuracy asserted below does not depend on which tests ran before this one.
    """
    code = (
        "import tensorflow as tf; tf.config.experimental.enable_op_determinism()\n"
        "from pathlib import Path\n"
        "from tests.test_training_recipe import small_config\n"
        "from training import train\n"
        f"train(Path({str(dataset)!r}), Path({str(registry_root)!r}), small_config(), version={version!r}, "
        f"work_dir=Path({str(work_dir)!r}), progress=False, variants=False)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=600)
    return read_artefact(registry_root / version)


@pytest.fixture(scope="module", autouse=True)
def deterministic_kernels():
    """Same seed, same run: multi-threaded CPU kernels otherwise make the accuracy wander from run to run."""
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


def small_config(**changes: object) -> TrainConfig:
    settings = {
        "backbone": "tiny",
        "image_size": IMAGE_SIZE,
        "weights": None,
        "batch_size": 16,
        # The tiny backbone starts from random weights, so phase 1 trains the whole network (measured
        # with deterministic kernels: 0.95 test accuracy; 0.1 diverges from random weights, 0.02 reaches 0.90).
        "head_epochs": 16,
        "finetune_epochs": 4,
        "finetune_fraction": 1.0,
        "learning_rate": 0.05,
        **changes,
    }
    return TrainConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six shape classes, 150 photos each, plus one corrupt file among them."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("data"), per_class=150, size=(96, 72), seed=3)
    (root / SYNTHETIC_CLASSES[0] / "broken.jpg").write_bytes(b"\xff\xd8 this is not a photo")
    return root


class _InterruptInFinetuning(keras.callbacks.Callback):
    """Raise KeyboardInterrupt at the end of the first fine-tuning epoch (after one head epoch), as Ctrl-C would.

    Counted in epochs: with random weights the backbone trains in both phases, so whether it
    is trainable does not tell the phases apart.
    """

    def __init__(self, head_epochs: int = 1) -> None:
        super().__init__()
        self.head_epochs = head_epochs
        self.epochs_done = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs_done += 1
        if self.epochs_done == self.head_epochs + 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_recipe_trains_an_accurate_model_and_reuses_its_split(dataset: Path, tmp_path: Path) -> None:
    registry_root, work_dir = tmp_path / "models", tmp_path / "work"
    artefact = train_in_a_fresh_process(dataset, registry_root, version="v1", work_dir=work_dir)

    assert artefact.version == "v1" and artefact.path == ModelRegistry(registry_root).path_for("v1")
    assert artefact.labels == tuple(sorted(SYNTHETIC_CLASSES))
    print("recipe test metrics:", artefact.metrics)
    assert artefact.metrics["test_accuracy"] >= 0.90, artefact.metrics
    assert artefact.metrics["test_top3_accuracy"] >= artefact.metrics["test_accuracy"]
    assert ModelRegistry(registry_root).active_version() is None  # not activated unless asked

    extra = artefact.meta["extra"]
    assert extra["config"]["backbone"] == "tiny" and extra["config"]["weights"] is None
    assert [item["path"] for item in extra["skipped"]] == [str(dataset / SYNTHETIC_CLASSES[0] / "broken.jpg")]
    assert extra["counts"]["skipped"] == 1
    assert sum(extra["counts"][part] for part in ("train", "validation", "test")) == 6 * 150
    assert 1 <= len(extra["history"]["head"]["loss"]) <= 16
    assert 1 <= len(extra["history"]["finetune"]["loss"]) <= 4
    assert (work_dir / "split.csv").is_file()
    assert list((work_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard logs of the run

    # A second version from the same work_dir is tested on the very same photos.
    split = load_split(work_dir / "split.csv")
    assert artefact.meta["data_fingerprint"] == split.fingerprint
    rerun = train(dataset, registry_root, small_config(), version="v2", work_dir=work_dir, progress=False,
                  activate=True, variants=False)  # fmt: skip
    assert rerun.meta["data_fingerprint"] == split.fingerprint
    assert load_split(work_dir / "split.csv").test == split.test
    assert ModelRegistry(registry_root).active_version() == "v2"

    # weights=PATH: the backbone starts from that file (head-only training leaves it as loaded).
    trained_backbone = load_artefact(artefact.path).keras_model.get_layer("backbone")
    weights_file = tmp_path / "tiny_backbone.weights.h5"
    trained_backbone.save_weights(weights_file)
    other_work = tmp_path / "work-weights"
    other_work.mkdir()
    shutil.copy(work_dir / "split.csv", other_work / "split.csv")
    config = small_config(weights=weights_file, head_epochs=1, finetune_epochs=0)
    started = train(dataset, registry_root, config, version="v3", work_dir=other_work, progress=False, variants=False)
    assert started.meta["extra"]["config"]["weights"] == str(weights_file)
    assert started.meta["data_fingerprint"] == split.fingerprint  # the copied split was reused
    loaded = load_artefact(started.path).keras_model.get_layer("backbone")
    for got, expected in zip(loaded.get_weights(), trained_backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)
    # ...and the artefact records a strong model from the first epoch on.
    assert started.metrics["test_accuracy"] >= 0.8, started.metrics


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_last_epoch(dataset: Path, tmp_path: Path) -> None:
    registry_root, work_dir = tmp_path / "models", tmp_path / "work"
    config = small_config(head_epochs=1, finetune_epochs=3, patience=10)
    with pytest.raises(KeyboardInterrupt):
        train(
            dataset,
            registry_root,
            config,
            version="v1",
            work_dir=work_dir,
            progress=False,
            callbacks=[_InterruptInFinetuning()],
            variants=False,
        )
    state = json.loads((work_dir / "state.json").read_text())
    assert (state["phase"], state["epoch"]) == ("finetune", 1)
    assert not ModelRegistry(registry_root).exists("v1")

    artefact = train(dataset, registry_root, config, version="v1", work_dir=work_dir, progress=False, variants=False)
    extra = artefact.meta["extra"]
    assert extra["resumed_from"] == {"phase": "finetune", "epoch": 1}
    assert len(extra["history"]["head"]["loss"]) == 1
    assert len(extra["history"]["finetune"]["loss"]) == 3  # 1 before the interruption, 2 after
    assert json.loads((work_dir / "state.json").read_text())["phase"] == "done"

    # Another config cannot silently continue this run's checkpoint.
    with pytest.raises(ValueError, match="another config"):
        train(dataset, registry_root, small_config(seed=1), version="v2", work_dir=work_dir, progress=False)


def test_config_is_checked_and_the_module_is_lazy() -> None:
    with pytest.raises(ValueError):
        TrainConfig(finetune_fraction=1.5)
    with pytest.raises(ValueError):
        TrainConfig(head_epochs=0, finetune_epochs=0)
    assert TrainConfig(weights=Path("/w.h5")).to_json()["weights"] == "/w.h5"
    assert build_classifier  # the recipe builds through model.build_classifier
