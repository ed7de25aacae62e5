"""Image augmentation of He et al. (2016), section 4.2: zero-pad by 4, random crop back to size, random flip."""

import numpy as np


def augment_images(images: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True) -> np.ndarray:
    """Randomly crop each (H, W) image out of its `pad`-zero-padded copy and mirror half of them left-right.

    images: (B, H, W, C); returns a new array of the same shape and dtype. One gather does the whole batch.
    """
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))  # (B, H + 2p, W + 2p, C)
    top = rng.integers(0, 2 * pad + 1, size=b)
    left = rng.integers(0, 2 * pad + 1, size=b)
    rows = top[:, None] + np.arange(h)  # (B, H)
    cols = left[:, None] + np.arange(w)  # (B, W)
    if flip:
        mirrored = rng.random(b) < 0.5
        cols = np.where(mirrored[:, None], cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
