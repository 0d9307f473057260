"""The demo model: made by the training recipe from nothing, saved in the registry, and right about fresh photos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model import ModelRegistry, Predictor, load_image, read_artefact
from training import SYNTHETIC_CLASSES, build_demo_model, synthetic_jpeg


@pytest.mark.slow
def test_demo_model_is_trained_by_the_recipe_saved_activated_and_right(demo_registry: Path) -> None:
    registry = ModelRegistry(demo_registry)
    assert registry.active_version() == "demo"
    artefact = read_artefact(registry.path_for("demo"))
    assert artefact.version == "demo"
    assert artefact.labels == tuple(sorted(SYNTHETIC_CLASSES))  # the recipe's order
    assert artefact.backbone == "tiny"
    assert artefact.preprocessing.image_size == artefact.image_size == 48

    metrics = artefact.metrics
    print("demo model metrics:", metrics)
    assert metrics["test_images"] > 0
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["test_top3_accuracy"] >= metrics["test_accuracy"]
    assert re.fullmatch(r"[0-9a-f]{64}", artefact.meta["data_fingerprint"])

    # Built by train(): its config, both phases' history, and the report any trained model carries.
    extra = artefact.meta["extra"]
    assert extra["config"]["backbone"] == "tiny" and extra["config"]["weights"] is None
    assert extra["history"]["head"]["loss"] and extra["history"]["finetune"]["loss"]
    assert extra["dataset"].startswith("synthetic shapes")
    for name in ("report.md", "confusion_matrix.png", "training_curves.png", "classification_report.txt"):
        assert (artefact.path / name).is_file(), name
    per_class = (artefact.path / "classification_report.txt").read_text()
    assert all(label in per_class for label in SYNTHETIC_CLASSES)
    assert f"{metrics['test_accuracy']:.2%}" in (artefact.path / "report.md").read_text()
    assert not list(demo_registry.glob(".train-*"))  # no work dir left behind

    # Photos the model never saw (other seeds, the size a phone would send), read the way
    # the worker reads them, through the artefact's own preprocessing.
    predictor = Predictor.from_artefact(artefact.path)
    labels = [SYNTHETIC_CLASSES[i % len(SYNTHETIC_CLASSES)] for i in range(60)]
    photos = np.stack(
        [
            load_image(synthetic_jpeg(label, seed=100_000 + i, size=(320, 240)), artefact.preprocessing)
            for i, label in enumerate(labels)
        ]
    )
    top3 = predictor.predict_topk(photos, k=3)
    right = np.mean([guesses[0][0] == label for guesses, label in zip(top3, labels, strict=True)])
    assert right >= 0.9, right
    assert all(len(guesses) == 3 for guesses in top3)


def test_demo_model_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="per_class"):
        build_demo_model(tmp_path, per_class=2, progress=False)
    with pytest.raises(ValueError):  # the recipe's own check: some epochs are needed
        build_demo_model(tmp_path, head_epochs=0, finetune_epochs=0, progress=False)
    assert not ModelRegistry(tmp_path).exists("demo")
