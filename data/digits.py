"""Digits: scikit-learn's 1,797 real 8x8 handwritten digits (UCI), resized to 28x28 like MNIST.

They ship inside scikit-learn, so the default experiment needs no network and no download.
"""

from collections.abc import Iterator

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from data.augment import augment_images
from data.sampling import Shard, eval_indices, train_indices


def load_resized_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 (N, S, S, 1) images in [0, 1] (bilinear resize) and int32 labels."""
    digits = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray(img.astype(np.float32) / 16.0, mode="F")
                   .resize((image_size, image_size), Image.BILINEAR))
        for img in digits.images
    ])
    return images[..., None].astype(np.float32), digits.target.astype(np.int32)


class Digits:
    """In-memory digits with a fixed seeded train/test split."""

    task = "classify"

    def __init__(self, image_size: int = 28, test_fraction: float = 0.2, augment: bool = False,
                 seed: int = 0, **metadata):
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"digits: test_fraction {test_fraction} must be in (0, 1)")
        images, labels = load_resized_digits(image_size)
        perm = np.random.default_rng(seed).permutation(len(labels))
        num_test = int(round(len(labels) * test_fraction))
        test, train = perm[:num_test], perm[num_test:]
        self.train_images, self.train_labels = images[train], labels[train]
        self.test_images, self.test_labels = images[test], labels[test]
        self.augment = augment
        self.seed = seed

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        idx = train_indices(len(self.train_labels), batch_size, step, self.seed, shard)
        images = self.train_images[idx]
        if self.augment:
            images = augment_images(images, np.random.default_rng([self.seed, step, shard[0]]))
        return {"image": images, "label": self.train_labels[idx]}

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        for idx, mask in eval_indices(len(self.test_labels), batch_size, shard):
            yield {"image": self.test_images[idx], "label": self.test_labels[idx], "mask": mask}
