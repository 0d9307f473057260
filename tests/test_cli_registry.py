"""`carbot models`, `carbot promote` and `carbot rollback` on a real registry of tiny artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from carbot import cli
from carbot.settings import get_settings

LABELS = ("Fiat Uno", "VW Gol", "Chevrolet Onix")
IMAGE_SIZE = 32


def _save(registry, version: str, metrics: dict | None = None) -> None:
    from model import Preprocessing, build_classifier, save_artefact

    network = build_classifier(len(LABELS), backbone="tiny", image_size=IMAGE_SIZE)
    with registry.staging(version) as directory:
        save_artefact(
            network,
            directory,
            version=version,
            labels=LABELS,
            backbone="tiny",
            preprocessing=Preprocessing(image_size=IMAGE_SIZE),
            metrics=metrics,
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny artefacts, built once; each test copies them into a fresh registry."""
    from model import ModelRegistry

    root = tmp_path_factory.mktemp("built")
    registry = ModelRegistry(root)
    _save(registry, "v1", {"test_accuracy": 0.5, "test_top3_accuracy": 0.9})
    _save(registry, "v2", {"test_accuracy": 0.75, "test_top3_accuracy": 1.0})
    _save(registry, "v3")
    return root


@pytest.fixture
def registry(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    from model import ModelRegistry

    root = tmp_path / "models"
    shutil.copytree(built, root)
    registry = ModelRegistry(root)
    registry.activate("v1")
    monkeypatch.setenv("CARBOT_MODEL_REGISTRY", str(root))
    monkeypatch.setenv("CARBOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    get_settings.cache_clear()
    yield registry
    get_settings.cache_clear()


def run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_models_lists_versions_with_active_marker_and_metrics(registry):
    result = run("models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = [line for line in lines if line[2:4] in {"v1", "v2", "v3"}]
    assert [row[2:4] for row in rows] == ["v1", "v2", "v3"]  # oldest first
    assert rows[0].startswith("* v1") and not rows[1].startswith("*")
    assert "50.0%" in rows[0] and "90.0%" in rows[0] and "tiny" in rows[0]
    assert "75.0%" in rows[1] and "—" in rows[2]
    assert "3 versions listed" in result.output

    rows = json.loads(run("models", "--json").output)
    assert [(r["version"], r["active"]) for r in rows] == [("v1", True), ("v2", False), ("v3", False)]
    assert rows[1]["test_accuracy"] == 0.75 and rows[1]["test_top3_accuracy"] == 1.0
    assert rows[2]["test_accuracy"] is None
    assert rows[0]["image_size"] == IMAGE_SIZE and rows[0]["labels"] == 3 and rows[0]["backbone"] == "tiny"


def test_models_on_an_empty_registry_suggests_the_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CARBOT_MODEL_REGISTRY", str(tmp_path / "empty"))
    get_settings.cache_clear()
    try:
        result = run("models")
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "carbot demo-model" in result.output


def test_promote_switches_the_active_version(registry):
    result = run("promote", "v2")
    assert result.exit_code == 0, result.output
    assert "v2 is now active (was v1)" in result.output
    assert registry.active_version() == "v2"
    assert json.loads(run("models", "--json").output)[1]["active"] is True


@pytest.mark.parametrize("version", ["v9", "../v1"])
def test_promote_unknown_version_fails_and_keeps_the_active_one(registry, version):
    result = run("promote", version)
    assert result.exit_code == 1
    assert "Error:" in result.output and "Traceback" not in result.output
    assert registry.active_version() == "v1"


def test_corrupt_version_cannot_be_promoted_and_is_not_listed(registry):
    weights = registry.path_for("v2") / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    result = run("promote", "v2")
    assert result.exit_code == 1
    assert "checksum" in result.output and "still v1" in result.output
    assert registry.active_version() == "v1"

    listed = run("models")
    assert "2 versions listed" in listed.output and " v2 " not in listed.output


def test_rollback_returns_to_the_previous_version(registry):
    assert run("promote", "v3").exit_code == 0
    result = run("rollback")
    assert result.exit_code == 0, result.output
    assert "v1 is now active again (was v3)" in result.output
    assert registry.active_version() == "v1"


def test_rollback_without_a_previous_version_fails_cleanly(registry):
    result = run("rollback")
    assert result.exit_code == 1
    assert "No previous model version" in result.output
    assert registry.active_version() == "v1"


def test_train_saves_a_new_version_with_its_report_and_can_activate_it(registry, tmp_path):
    from model import read_variants
    from training import make_synthetic_dataset

    # Enough photos and epochs to learn something: --activate refuses a model at chance (issue 17).
    data = make_synthetic_dataset(tmp_path / "photos", per_class=50, size=(48, 36), seed=3)
    result = run("train", str(data), "--backbone", "tiny", "--weights", "none", "--image-size", "32",
                 "--batch-size", "16", "--head-epochs", "8", "--finetune-epochs", "1", "--learning-rate", "0.05",
                 "--version", "trained", "--activate", "--no-variants")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "saved trained" in result.output and "test accuracy" in result.output
    assert registry.active_version() == "trained"
    artefact = registry.active()
    assert len(artefact.labels) == 6 and "test_accuracy" in artefact.metrics
    assert (artefact.path / "report.md").is_file() and (artefact.path / "confusion_matrix.png").is_file()
    # --no-variants: no serving variants exported (the slow part of a small model's save).
    assert read_variants(artefact.path) is None and not (artefact.path / "variants").exists()
