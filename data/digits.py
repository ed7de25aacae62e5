"""Digits: scikit-learn's 1,797 real 8x8 handwritten digits (UCI), resized to 28x28 like MNIST.

They ship inside scikit-learn, so the default experiment needs no network and no download.
"""

import gzip
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from data.augment import augment_images
from data.sampling import Shard, eval_indices, train_indices


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 images (values 0-16) and their labels, as `sklearn.datasets.load_digits` gives them, read
    from the CSV scikit-learn ships without importing it (which took ~1 s of every run's start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("data=digits reads the digits that ship with scikit-learn: pip install scikit-learn")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_resized_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 (N, S, S, 1) images in [0, 1] (bilinear resize) and int32 labels."""
    small, labels = load_digits()
    images = np.stack([
        np.asarray(Image.fromarray(img.astype(np.float32) / 16.0, mode="F")
                   .resize((image_size, image_size), Image.BILINEAR))
        for img in small
    ])
    return images[..., None].astype(np.float32), labels.astype(np.int32)


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
