"""The recipe's augmentation: one random affine warp per image (flip, rotation, zoom, shift), then contrast."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from training._augmentation import RandomAffine, augment_batches, make_augmentation  # noqa: E402


def _images(n: int = 16, size: int = 24) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, size=(n, size, size, 3)).astype(np.float32)


def test_no_change_asked_for_is_the_identity_and_inference_leaves_images_alone():
    images = _images()
    assert np.allclose(np.asarray(RandomAffine(seed=1)(images, training=True)), images, atol=1e-3)
    busy = RandomAffine(rotation=0.2, zoom=0.2, translation=0.2, horizontal_flip=True, seed=1)
    assert np.array_equal(np.asarray(busy(images, training=False)), images)


def test_flips_are_exact_mirrors_drawn_per_image():
    images = _images(n=64)
    out = np.asarray(RandomAffine(horizontal_flip=True, seed=3)(images, training=True))
    mirrored = [np.allclose(out[i], images[i, :, ::-1], atol=1e-3) for i in range(len(images))]
    unchanged = [np.allclose(out[i], images[i], atol=1e-3) for i in range(len(images))]
    assert all(m != u for m, u in zip(mirrored, unchanged, strict=True))
    assert 10 < sum(mirrored) < 54  # about half, each image drawn on its own


def test_rotations_turn_each_image_about_its_centre():
    images = _images(n=64, size=9)
    out = np.asarray(RandomAffine(rotation=0.2, seed=5)(images, training=True))
    assert np.allclose(out[:, 4, 4], images[:, 4, 4], atol=1e-3)
    assert np.mean(np.abs(out - images)) > 10


def test_zoom_and_shift_stay_within_their_ranges():
    ramp = np.tile(np.arange(32, dtype=np.float32)[None, :, None, None], (128, 1, 32, 3)) * 8  # rows 0..248
    out = np.asarray(RandomAffine(translation=0.1, seed=7)(ramp, training=True))
    # A vertical shift of up to 10 % of 32 rows moves the middle row's value by at most 3.2 rows.
    shift = (out[:, 16, 16, 0] - ramp[:, 16, 16, 0]) / 8
    assert np.abs(shift).max() <= 3.2 + 1e-3 and np.abs(shift).max() > 1.0
    zoomed = np.asarray(RandomAffine(zoom=0.1, seed=7)(ramp, training=True))
    # Zooming about the centre scales the ramp's slope by 0.9 to 1.1.
    slope = (zoomed[:, 20, 16, 0] - zoomed[:, 12, 16, 0]) / (8 * 8)
    assert slope.min() >= 0.9 - 1e-3 and slope.max() <= 1.1 + 1e-3 and slope.max() - slope.min() > 0.05


def test_the_augmented_training_batches_are_float_pixels_in_range_and_differ_every_epoch():
    import tensorflow as tf

    uint8 = np.random.default_rng(1).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8, dtype=np.int32)
    dataset = augment_batches(tf.data.Dataset.from_tensor_slices((uint8, labels)).batch(4), seed=2)
    first = [(np.asarray(x), np.asarray(y)) for x, y in dataset]
    second = [np.asarray(x) for x, _ in dataset]
    assert [y.tolist() for _, y in first] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for x, _ in first:
        assert x.dtype == np.float32 and x.shape == (4, 32, 32, 3)
        assert x.min() >= 0.0 and x.max() <= 255.0
    assert not np.allclose(first[0][0], second[0])


def test_the_layer_round_trips_through_its_config():
    layer = RandomAffine(rotation=0.05, zoom=0.1, translation=0.05, horizontal_flip=True, seed=4)
    again = RandomAffine.from_config(layer.get_config())
    assert (again.rotation, again.zoom, again.translation, again.horizontal_flip, again.seed) == (
        0.05,
        0.1,
        0.05,
        True,
        4,
    )
    with pytest.raises(ValueError, match="rotation"):
        RandomAffine(rotation=1.5)
    assert [type(layer).__name__ for layer in make_augmentation().layers] == ["RandomAffine", "RandomContrast"]
