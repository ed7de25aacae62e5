"""Random crop with zero padding and horizontal flip (He et al. 2016, section 4.2)."""

import numpy as np

from data.augment import augment_images


def test_each_image_is_a_shifted_window_of_its_padded_self_possibly_mirrored():
    rng = np.random.default_rng(0)
    images = rng.random((64, 8, 8, 3)).astype(np.float32) + 1.0  # strictly positive: padding shows as 0
    out = augment_images(images, np.random.default_rng(1), pad=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
    flips = 0
    for image, crop in zip(padded, out):
        windows = [image[dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(np.array_equal(crop, w) for w in windows)
        mirrored = any(np.array_equal(crop, w[:, ::-1]) for w in windows)
        assert plain or mirrored, "output is not a (mirrored) crop of the padded image"
        flips += mirrored and not plain
    assert 16 < flips < 48  # about half are mirrored


def test_no_flip_and_no_pad_is_identity():
    images = np.random.default_rng(0).random((4, 5, 5, 1)).astype(np.float32)
    np.testing.assert_array_equal(augment_images(images, np.random.default_rng(0), pad=0, flip=False), images)


def test_same_generator_state_gives_same_batch():
    images = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
    a = augment_images(images, np.random.default_rng([3, 7]))
    b = augment_images(images, np.random.default_rng([3, 7]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augment_images(images, np.random.default_rng([3, 8])))
