"""The names of the backbones a classifier can be built on.

Kept apart from the network code so that the list can be shown (by `carbot status`, by a
training command's help) without importing TensorFlow.
"""

from __future__ import annotations

DEFAULT_BACKBONE = "resnet50"

BACKBONES: dict[str, str] = {
    "resnet50": "ResNet50 from keras.applications, the original study's backbone (ImageNet 'caffe' scaling).",
    "resnet50v2": "ResNet50V2 from keras.applications, pre-activation ResNet (pixels scaled to -1..1).",
    "mobilenetv3small": "MobileNetV3Small from keras.applications, small and fast enough for a CPU.",
    "tiny": "A small plain conv net for tests and the demo model; no pretrained weights.",
}


def check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
