"""Artefacts (save, read, load, checksums) and the registry, with a tiny real Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model import (
    Artefact,
    ArtefactCorrupt,
    ModelRegistry,
    Preprocessing,
    build_classifier,
    load_artefact,
    read_artefact,
    save_artefact,
)

LABELS = ("FIAT ARGO", "VW GOL", "CHEVROLET ONIX")
PREPROCESSING = Preprocessing(image_size=32, resize="pad")


@pytest.fixture(scope="module")
def keras_model():
    return build_classifier(len(LABELS), backbone="tiny", image_size=32)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def save(keras_model, directory: Path, version: str = "v1", labels=LABELS, **kwargs) -> Artefact:
    return save_artefact(
        keras_model,
        directory,
        version=version,
        labels=labels,
        backbone="tiny",
        preprocessing=PREPROCESSING,
        **kwargs,
    )


def test_save_read_load_round_trip(keras_model, images, tmp_path: Path) -> None:
    saved = save(
        keras_model,
        tmp_path / "v1",
        metrics={"accuracy": np.float32(0.5)},
        data_fingerprint="sha256:abc",
        extra={"epochs": 3},
    )
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == [
        "checksum.sha256",
        "labels.json",
        "model.json",
        "model.weights.h5",
    ]
    read = read_artefact(tmp_path / "v1")
    assert read == saved
    assert read.version == "v1" and read.labels == LABELS and read.backbone == "tiny"
    assert read.image_size == 32 and read.preprocessing == PREPROCESSING
    assert read.metrics == {"accuracy": 0.5}
    assert read.created.tzinfo is not None
    assert read.meta["data_fingerprint"] == "sha256:abc" and read.meta["extra"] == {"epochs": 3}
    assert json.loads((tmp_path / "v1" / "labels.json").read_text()) == list(LABELS)

    loaded = load_artefact(tmp_path / "v1")
    assert loaded.artefact == read
    expected = keras_model(images.astype("float32"), training=False)
    np.testing.assert_array_equal(loaded.keras_model(images.astype("float32"), training=False), expected)


def test_checksum_lines_are_sha256sum_style(keras_model, tmp_path: Path) -> None:
    save(keras_model, tmp_path / "v1")
    lines = (tmp_path / "v1" / "checksum.sha256").read_text().splitlines()
    names = sorted(line.split("  ", 1)[1] for line in lines)
    assert names == ["labels.json", "model.json", "model.weights.h5"]
    assert all(len(line.split("  ", 1)[0]) == 64 for line in lines)


def test_flipped_byte_in_weights_is_caught(keras_model, tmp_path: Path) -> None:
    save(keras_model, tmp_path / "v1")
    weights = tmp_path / "v1" / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtefactCorrupt, match="model.weights.h5"):
        read_artefact(tmp_path / "v1")
    with pytest.raises(ArtefactCorrupt, match="model.weights.h5"):
        load_artefact(tmp_path / "v1")
    assert read_artefact(tmp_path / "v1", verify=False).version == "v1"


def test_edited_labels_are_caught(keras_model, tmp_path: Path) -> None:
    save(keras_model, tmp_path / "v1")
    (tmp_path / "v1" / "labels.json").write_text(json.dumps(["A", "B", "C"]))
    with pytest.raises(ArtefactCorrupt, match="labels.json"):
        read_artefact(tmp_path / "v1")


@pytest.mark.parametrize("missing", ["checksum.sha256", "model.json", "model.weights.h5"])
def test_missing_file_is_caught(keras_model, tmp_path: Path, missing: str) -> None:
    save(keras_model, tmp_path / "v1")
    (tmp_path / "v1" / missing).unlink()
    with pytest.raises(ArtefactCorrupt, match=missing):
        read_artefact(tmp_path / "v1")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_artefact(tmp_path / "nowhere")


def test_save_refuses_labels_that_do_not_fit(keras_model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 labels"):
        save(keras_model, tmp_path / "v1", labels=("A", "B"))
    with pytest.raises(ValueError, match="unique"):
        save(keras_model, tmp_path / "v1", labels=("A", "A", "B"))


def test_save_refuses_preprocessing_of_another_size(keras_model, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        save_artefact(
            keras_model,
            tmp_path / "v1",
            version="v1",
            labels=LABELS,
            backbone="tiny",
            preprocessing=Preprocessing(image_size=64),
        )


# --- registry ---------------------------------------------------------------------------


def stage(registry: ModelRegistry, keras_model, version: str, labels=LABELS) -> None:
    with registry.staging(version) as directory:
        save(keras_model, directory, version=version, labels=labels)


def test_empty_registry(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    assert registry.versions() == []
    assert registry.active_version() is None and registry.active() is None
    assert not registry.exists("v1")


def test_stage_activate_and_roll_back(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    stage(registry, keras_model, "v1")
    stage(registry, keras_model, "v2")
    assert registry.exists("v1") and registry.path_for("v2") == tmp_path / "v2"
    assert [a.version for a in registry.versions()] == ["v1", "v2"]

    registry.activate("v1")
    assert registry.active_version() == "v1" and registry.active().version == "v1"
    assert (tmp_path / "ACTIVE").read_text().strip() == "v1"
    registry.activate("v2")
    assert registry.active_version() == "v2" and registry.previous_version() == "v1"
    # Both names in the one file, written by one rename: a crash cannot leave them out of step.
    assert (tmp_path / "ACTIVE").read_text() == "v2\nprevious v1\n"
    assert registry.rollback() == "v1"
    assert registry.active_version() == "v1" and registry.previous_version() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACTIVE", "v1", "v2"]


def test_activate_refuses_missing_or_corrupt_versions(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(FileNotFoundError):
        registry.activate("v9")
    stage(registry, keras_model, "v1")
    (tmp_path / "v1" / "labels.json").write_text('["x", "y", "z"]')
    with pytest.raises(ArtefactCorrupt):
        registry.activate("v1")
    assert registry.active_version() is None


def test_corrupt_version_is_skipped_not_fatal(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    stage(registry, keras_model, "v1")
    stage(registry, keras_model, "v2")
    (tmp_path / "v1" / "checksum.sha256").unlink()
    (tmp_path / "not-a-version").mkdir()
    assert [a.version for a in registry.versions()] == ["v2"]


def test_staging_replaces_an_existing_version(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    stage(registry, keras_model, "v1")
    stage(registry, keras_model, "v1", labels=("A", "B", "C"))
    assert read_artefact(tmp_path / "v1").labels == ("A", "B", "C")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]


def test_staging_cleans_up_after_an_exception(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(RuntimeError, match="training failed"), registry.staging("v1") as directory:
        assert directory.parent == tmp_path and directory.name.startswith(".staging-v1-")
        save(keras_model, directory, version="v1")
        raise RuntimeError("training failed")
    assert list(tmp_path.iterdir()) == []


def test_staging_refuses_an_incomplete_artefact(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ArtefactCorrupt), registry.staging("v1") as directory:
        (directory / "labels.json").write_text("[]")
    assert list(tmp_path.iterdir()) == []


def test_staging_refuses_an_artefact_of_another_version(keras_model, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ArtefactCorrupt, match="'v2'"), registry.staging("v1") as directory:
        save(keras_model, directory, version="v2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../v1", "a/b", ".hidden", "-v1", "v 1", "x" * 65, "v1\n"])
def test_invalid_version_names_are_rejected(tmp_path: Path, name: str) -> None:
    registry = ModelRegistry(tmp_path)
    with pytest.raises(ValueError, match="version name"):
        registry.path_for(name)
    with pytest.raises(ValueError, match="version name"):
        registry.activate(name)
    with pytest.raises(ValueError, match="version name"), registry.staging(name):
        pass
    assert registry.path_for("2024-06-01_run.3") == tmp_path / "2024-06-01_run.3"


def test_garbage_in_active_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "ACTIVE").write_text("../../etc\n")
    assert ModelRegistry(tmp_path).active_version() is None
