"""Save a Keras classifier as an artefact directory, and load one back into a Keras model.

Only the weights are stored; loading rebuilds the network with `build_classifier` from
what ``model.json`` records, so an artefact never runs code from its own files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras

from ._artefact import (
    FORMAT,
    WEIGHTS_FILE,
    Artefact,
    ArtefactCorrupt,
    check_version_name,
    read_artefact,
    write_checksums,
    write_labels,
    write_metadata,
)
from ._backbones import check_backbone
from ._network import build_classifier
from ._ood import METHOD, OOD_FILE, OodScorer, load_ood
from ._preprocess import Preprocessing
from ._registry import ModelRegistry


@dataclass
class LoadedModel:
    """An artefact together with its Keras model, ready to predict."""

    artefact: Artefact
    keras_model: keras.Model
    ood: OodScorer | None = None  # None: a version saved without an out-of-distribution score


def save_artefact(
    keras_model: keras.Model,
    directory: Path,
    *,
    version: str,
    labels: Sequence[str],
    backbone: str,
    preprocessing: Preprocessing,
    dropout: float = 0.1,
    l2: float = 0.001,
    metrics: dict | None = None,
    data_fingerprint: str | None = None,
    extra: dict | None = None,
    ood: OodScorer | None = None,
    ood_calibration: dict | None = None,
) -> Artefact:
    """Write `keras_model` (built by `build_classifier`) and its description into `directory`.

    `ood` is the fitted and calibrated out-of-distribution score of this very network (its
    features change with every weight); `ood_calibration` says how it was calibrated (the
    false-rejection rate, the share of each photo set it flags) and goes into ``model.json``.

    The checksum file is written last: until it exists the directory does not read as an artefact.
    """
    directory = Path(directory)
    labels = _checked_labels(labels, keras_model)
    check_version_name(version)
    check_backbone(backbone)
    image_size = _input_size(keras_model)
    if preprocessing.image_size != image_size:
        raise ValueError(f"preprocessing.image_size is {preprocessing.image_size} but the model takes {image_size} px")
    directory.mkdir(parents=True, exist_ok=True)
    keras_model.save_weights(directory / WEIGHTS_FILE)
    (directory / OOD_FILE).unlink(missing_ok=True)  # a version saved again in place keeps no stale score
    if ood is not None:
        ood.save(directory / OOD_FILE)
    write_labels(directory, labels)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "backbone": backbone,
        "num_classes": len(labels),
        "image_size": image_size,
        "preprocessing": preprocessing.to_dict(),
        "dropout": dropout,
        "l2": l2,
        "metrics": dict(metrics or {}),
        "data_fingerprint": data_fingerprint,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "keras_version": keras.__version__,
    }
    if ood is not None:
        meta["ood"] = {"method": METHOD, "threshold": ood.threshold, "features": ood.num_features,
                       **dict(ood_calibration or {})}  # fmt: skip
    if extra:
        meta["extra"] = dict(extra)
    write_metadata(directory, meta)
    write_checksums(directory)
    return read_artefact(directory, verify=False)


def save_version(
    registry: ModelRegistry,
    keras_model: keras.Model,
    *,
    version: str,
    add_files: Callable[[Path], None] | None = None,
    activate: bool = False,
    expect_active: str | None | object = ...,
    **description: Any,
) -> Artefact:
    """Stage, save, move into place, and with `activate` activate: the one way a trained network becomes a version.

    `description` is `save_artefact`'s keyword arguments (labels, backbone, preprocessing, ...);
    `add_files(directory)` writes what else belongs in the version (a report, serving variants)
    before it is verified and moved into the registry. Nothing of the version is visible until it
    is complete. Activation happens after the version is in place, with `expect_active` as
    `ModelRegistry.activate` takes it: on `RegistryConflict` the version stays saved, inactive.
    Returns the saved artefact, read back from its place in the registry.
    """
    with registry.staging(version) as staging_dir:
        save_artefact(keras_model, staging_dir, version=version, **description)
        if add_files is not None:
            add_files(staging_dir)
    if activate:
        registry.activate(version, expect_active=expect_active)
    return read_artefact(registry.path_for(version))


def load_artefact(directory: Path) -> LoadedModel:
    """Verify the artefact in `directory`, rebuild its network and load its weights."""
    artefact = read_artefact(Path(directory), verify=True)
    keras_model = build_classifier(
        artefact.num_classes,
        backbone=artefact.backbone,
        image_size=artefact.image_size,
        weights=None,
        dropout=float(artefact.meta.get("dropout", 0.1)),
        l2=float(artefact.meta.get("l2", 0.001)),
    )
    try:
        keras_model.load_weights(artefact.weights_path)
    except ValueError as exc:
        raise ArtefactCorrupt(
            f"{artefact.weights_path} does not fit the network that model.json describes: {exc}"
        ) from exc
    return LoadedModel(artefact=artefact, keras_model=keras_model, ood=load_ood(artefact))


def _checked_labels(labels: Sequence[str], keras_model: keras.Model) -> list[str]:
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of strings, not one string")
    labels = list(labels)
    if not all(isinstance(label, str) and label for label in labels):
        raise ValueError("every label must be a non-empty string")
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be unique")
    outputs = keras_model.output_shape[-1]
    if len(labels) != outputs:
        raise ValueError(f"{len(labels)} labels for a model with {outputs} outputs")
    return labels


def _input_size(keras_model: keras.Model) -> int:
    _, height, width, _ = keras_model.input_shape
    if height != width or height is None:
        raise ValueError(f"the model's input must be a fixed square, not {height}x{width}")
    return int(height)
