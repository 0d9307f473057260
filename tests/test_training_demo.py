"""The demo model: trained from nothing, saved in the registry, and right about fresh photos."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from model import ModelRegistry, Predictor, load_image
from training import SYNTHETIC_CLASSES, build_demo_model, synthetic_jpeg


@pytest.mark.slow
def test_demo_model_is_trained_saved_activated_and_right(tmp_path: Path) -> None:
    registry_root = tmp_path / "models"
    artefact = build_demo_model(registry_root, progress=False)

    registry = ModelRegistry(registry_root)
    assert registry.active_version() == "demo"
    assert artefact.version == "demo"
    assert artefact.path == registry.path_for("demo")
    assert artefact.labels == SYNTHETIC_CLASSES
    assert artefact.backbone == "tiny"
    assert artefact.preprocessing.image_size == artefact.image_size

    metrics = artefact.metrics
    assert metrics["test_images"] > 0
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["test_top3_accuracy"] >= metrics["test_accuracy"]
    assert re.fullmatch(r"[0-9a-f]{64}", artefact.meta["data_fingerprint"])

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
