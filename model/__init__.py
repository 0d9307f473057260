"""The car classifier: preprocessing, network, versioned artefacts, registry and prediction.

``import model`` is light: it gives the parts a bot or ``carbot status`` needs (reading a
photo, reading artefacts and the registry) without importing TensorFlow. The names that
need Keras are imported on first use::

    from model import load_image, ModelRegistry    # light
    from model import Predictor                     # imports TensorFlow now
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._artefact import CHECKSUM_FILE, Artefact, ArtefactCorrupt, read_artefact
from ._backbones import BACKBONES
from ._ood import DEFAULT_FALSE_REJECTION, FlagRate, OodScorer, OodVerdict, like_photos_flagged
from ._preprocess import (
    IMAGE_SUFFIXES,
    REDUCE_ABOVE_INPUT_PIXELS,
    ImageRejected,
    Preprocessing,
    covering_size,
    load_image,
    pixel_count,
    reduce_for_queue,
    upright_size,
)
from ._registry import ModelRegistry, RegistryConflict
from ._runtimes import RUNTIME_CHOICES, RuntimeChoice, host_supports, load_predictor, release_freed_memory
from ._variants import (
    OPENVINO_INT8,
    RUNTIMES,
    VARIANT_RUNTIMES,
    Variant,
    VariantsManifest,
    check_variant_files,
    export_variants,
    read_variants,
    variant_model_file,
)

if TYPE_CHECKING:
    from ._network import build_classifier, with_features
    from ._predictor import Answer, Predictor
    from ._saving import LoadedModel, load_artefact, save_artefact, save_version

__all__ = [
    "BACKBONES",
    "CHECKSUM_FILE",
    "DEFAULT_FALSE_REJECTION",
    "IMAGE_SUFFIXES",
    "REDUCE_ABOVE_INPUT_PIXELS",
    "Answer",
    "Artefact",
    "ArtefactCorrupt",
    "FlagRate",
    "ImageRejected",
    "LoadedModel",
    "ModelRegistry",
    "RegistryConflict",
    "OPENVINO_INT8",
    "OodScorer",
    "OodVerdict",
    "Predictor",
    "Preprocessing",
    "RUNTIMES",
    "RUNTIME_CHOICES",
    "RuntimeChoice",
    "VARIANT_RUNTIMES",
    "Variant",
    "VariantsManifest",
    "build_classifier",
    "check_variant_files",
    "covering_size",
    "export_variants",
    "host_supports",
    "like_photos_flagged",
    "load_artefact",
    "load_image",
    "pixel_count",
    "reduce_for_queue",
    "release_freed_memory",
    "upright_size",
    "variant_model_file",
    "load_predictor",
    "read_artefact",
    "read_variants",
    "save_artefact",
    "save_version",
    "with_features",
]

# Heavy names (they import Keras) and the private module each lives in.
_LAZY = {
    "build_classifier": "._network",
    "with_features": "._network",
    "Answer": "._predictor",
    "save_artefact": "._saving",
    "save_version": "._saving",
    "load_artefact": "._saving",
    "LoadedModel": "._saving",
    "Predictor": "._predictor",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
