"""Training-time augmentation, as Keras layers: random flips, rotations, zooms, shifts and contrast.

The geometric changes are drawn per image and composed into one affine transform, so each
image is resampled once (the study's ``ImageDataGenerator`` also did a single affine warp).
Keras' separate ``RandomRotation``, ``RandomZoom`` and ``RandomTranslation`` layers would
resample it three times, which made augmentation the slowest step of the training input on
a CPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    import tensorflow as tf

# The recipe's augmentation, in one place (the training benchmark gives ImageDataGenerator the same).
ROTATION = 0.05  # of a full turn: up to ±18°
ZOOM = 0.1  # from 90 % to 110 %
TRANSLATION = 0.05  # of the width and of the height
CONTRAST = 0.1


class RandomAffine(keras.layers.Layer):
    """Random horizontal flip, rotation, zoom and translation of a batch, in one resampling.

    `rotation` is a fraction of a full turn (0.05: up to ±18°), `zoom` a fraction of the size
    (0.1: from 90 % to 110 %), `translation` a fraction of the width and height. Pixels from
    outside the image are filled by reflection, as Keras' own layers do. Images pass through
    unchanged when not training.
    """

    def __init__(
        self,
        rotation: float = 0.0,
        zoom: float = 0.0,
        translation: float = 0.0,
        horizontal_flip: bool = False,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("rotation", rotation), ("zoom", zoom), ("translation", translation)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {value!r}")
        self.rotation = rotation
        self.zoom = zoom
        self.translation = translation
        self.horizontal_flip = horizontal_flip
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        batch, height, width = shape[0], ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")

        def uniform(low: float, high: float) -> Any:
            return keras.random.uniform((batch,), low, high, seed=self.seed_generator)

        angle = uniform(-self.rotation, self.rotation) * (2.0 * math.pi)
        scale = uniform(1.0 - self.zoom, 1.0 + self.zoom)
        shift_x = uniform(-self.translation, self.translation) * width
        shift_y = uniform(-self.translation, self.translation) * height
        flip = ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if self.horizontal_flip else ops.ones((batch,))

        # The transform maps each output pixel to the input pixel it samples:
        # input = centre + scale * rotation @ flip @ (output - centre) + shift.
        cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
        a0, a1, b0, b1 = cos * flip, -sin, sin * flip, cos
        centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        a2 = centre_x + shift_x - a0 * centre_x - a1 * centre_y
        b2 = centre_y + shift_y - b0 * centre_x - b1 * centre_y
        zeros = ops.zeros((batch,))
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "rotation": self.rotation,
            "zoom": self.zoom,
            "translation": self.translation,
            "horizontal_flip": self.horizontal_flip,
            "seed": self.seed,
        }


def make_augmentation(seed: int = 0) -> keras.Sequential:
    """The recipe's augmentation of float32 0..255 pixels: horizontal flip, rotation, zoom, shifts, contrast."""
    return keras.Sequential(
        [
            RandomAffine(rotation=ROTATION, zoom=ZOOM, translation=TRANSLATION, horizontal_flip=True, seed=seed),
            keras.layers.RandomContrast(CONTRAST, seed=seed),
        ],
        name="augmentation",
    )


def augment_batches(dataset: tf.data.Dataset, seed: int = 0) -> tf.data.Dataset:
    """`dataset`'s ``(uint8 images, targets)`` batches augmented (`make_augmentation`) as float32 0..255 pixels."""
    import tensorflow as tf

    augment = make_augmentation(seed)

    def apply(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # The model's input is float32 0..255 pixels; reflection and contrast may overshoot that range.
        augmented = augment(tf.cast(images, tf.float32), training=True)
        return tf.clip_by_value(augmented, 0.0, 255.0), targets

    return dataset.map(apply, num_parallel_calls=tf.data.AUTOTUNE)
