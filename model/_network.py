"""Build the classifier: a backbone, its pixel scaling, and a softmax head.

The model takes raw 0..255 RGB pixels (the output of `load_image`, as uint8 or float32)
and does the backbone's own scaling itself, in a layer that is part of the model. The
scaling therefore travels with the weights and serving cannot disagree with training.

Layer names are part of the contract with training: the backbone is one layer named
"backbone" (freeze it, or unfreeze its upper blocks), the head is "head_dropout" then
the Dense layer "head".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import keras

from ._backbones import DEFAULT_BACKBONE, check_backbone

# How each backbone expects its input pixels to be scaled (see PixelScaling).
_SCALING = {
    "resnet50": "caffe",
    "resnet50v2": "tf",
    "mobilenetv3small": "none",  # keras' MobileNetV3 scales its input itself
    "tiny": "unit",
}

# keras.applications ImageNet means, BGR order, for 'caffe' scaling.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class _WeightsFile(NamedTuple):
    name: str
    url: str
    md5: str


_KERAS_APPLICATIONS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"

# The no-top ImageNet files keras.applications downloads; named here so that an offline
# machine can be told exactly which file to fetch.
_IMAGENET_FILES = {
    "resnet50": _WeightsFile(
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "4d473c1dd8becc155b73f8504c6f6626",
    ),
    "resnet50v2": _WeightsFile(
        "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _KERAS_APPLICATIONS_URL + "resnet/resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "fac2f116257151a9d068a22e544a4917",
    ),
    "mobilenetv3small": _WeightsFile(
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        _KERAS_APPLICATIONS_URL + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        "d3e8ec802a04aa4fc771ee12a9a9b836",
    ),
}

_TINY_FILTERS = (16, 32, 64, 128)


@keras.saving.register_keras_serializable(package="carbot")
class PixelScaling(keras.layers.Layer):
    """Scale raw 0..255 RGB pixels the way a backbone was trained to see them.

    Modes: "caffe" (RGB to BGR, minus the ImageNet mean), "tf" (to -1..1), "unit" (to 0..1),
    "none" (only cast to float). Any input dtype is accepted, uint8 included.
    """

    MODES = ("caffe", "tf", "unit", "none")

    def __init__(self, mode: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, not {mode!r}")
        self.mode = mode

    def call(self, inputs: Any) -> Any:
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


def build_classifier(
    num_classes: int,
    *,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int = 224,
    weights: str | Path | None = None,
    dropout: float = 0.1,
    l2: float = 0.001,
) -> keras.Model:
    """Return an uncompiled classifier from (None, image_size, image_size, 3) pixels to class probabilities.

    `weights` is None (random), "imagenet" (downloaded by keras, or already in its cache),
    or the path of a weights file for the backbone alone.
    """
    check_backbone(backbone)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, not {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {dropout}")
    shape = (image_size, image_size, 3)
    inputs = keras.Input(shape=shape, dtype="float32", name="image")
    x = PixelScaling(_SCALING[backbone], name="pixel_scaling")(inputs)
    x = _backbone(backbone, shape, _weights_path(backbone, weights))(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    # float32 output, so that a mixed-precision model still returns float32 probabilities.
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_regularizer=keras.regularizers.L2(l2),
        dtype="float32",
        name="head",
    )(x)
    return keras.Model(inputs, outputs, name=f"carbot_{backbone}")


def with_features(classifier: keras.Model) -> keras.Model:
    """The same network (same weights, one forward pass) answering (probabilities, penultimate features).

    The features are the backbone's pooled output, the head's input: what the
    out-of-distribution score (``model._ood``) measures distances in.
    """
    features = classifier.get_layer("head_dropout").input
    return keras.Model(classifier.inputs, [classifier.outputs[0], features], name=f"{classifier.name}_with_features")


def _weights_path(backbone: str, weights: str | Path | None) -> str | None:
    """Resolve `weights` to a local file (or None), fetching ImageNet weights if asked to."""
    if weights is None:
        return None
    if weights == "imagenet":
        return _imagenet_weights(backbone)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return str(path)


def _imagenet_weights(backbone: str) -> str:
    file = _IMAGENET_FILES.get(backbone)
    if file is None:
        raise ValueError(f"there are no ImageNet weights for the {backbone!r} backbone; use weights=None")
    try:
        # The same cache keras.applications uses: a file already there needs no network.
        return keras.utils.get_file(file.name, file.url, cache_subdir="models", file_hash=file.md5)
    except Exception as exc:
        raise RuntimeError(
            f"Could not get the ImageNet weights for {backbone} ({exc.__class__.__name__}: {exc}). "
            f"On a machine with network access download {file.url} , copy it here and pass its path "
            f"as weights=PATH (or put it in ~/.keras/models/{file.name})."
        ) from exc


def _backbone(name: str, shape: tuple[int, int, int], weights: str | None) -> keras.Model:
    common = {"include_top": False, "weights": weights, "input_shape": shape, "pooling": "avg"}
    if name == "resnet50":
        return keras.applications.ResNet50(**common, name="backbone")
    if name == "resnet50v2":
        return keras.applications.ResNet50V2(**common, name="backbone")
    if name == "mobilenetv3small":
        return keras.applications.MobileNetV3Small(**common, include_preprocessing=True, name="backbone")
    model = _tiny_backbone(shape)
    if weights is not None:
        model.load_weights(weights)
    return model


def _tiny_backbone(shape: tuple[int, int, int]) -> keras.Model:
    inputs = keras.Input(shape=shape, name="tiny_input")
    x = inputs
    for block, filters in enumerate(_TINY_FILTERS, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        # A short BN momentum, so that the moving statistics settle within a short training run.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name="backbone")
