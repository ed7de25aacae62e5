"""TFDS image-classification datasets, read with `tfds.data_source` (random access, no TensorFlow) and grain.

Prepared data must already be in `data_dir`: with no network a TFDS download hangs for minutes before it
fails, so the directory is checked first and a missing dataset is a one-line error saying how to prepare it.
"""

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import grain
import numpy as np
from PIL import Image

from data.augment import augment_images
from data.sampling import Shard, eval_indices, train_indices


def short(error: Exception) -> str:
    """The gist of a library's error message: its first clause, without the hashes and offsets after it."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.split(r" \(|; ", text, maxsplit=1)[0][:120]


def prepared_dir(name: str, data_dir: str) -> Path:
    """The directory of the newest prepared version of `name`, or a one-line error saying how to prepare it."""
    root = Path(data_dir).expanduser() / name
    versions = sorted(p.parent for p in root.glob("*/dataset_info.json"))
    if not versions:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {root.parent} (no {root}/<version>/dataset_info.json); "
            f"prepare it where the network allows with: pip install -e '.[prepare]' && "
            f"python -m data.prepare {name} --data_dir {root.parent}")
    return versions[-1]


def open_split(name: str, data_dir: str, split: str) -> "CheckedSource":
    """A random-access source over one split of a prepared dataset, built from its files alone.

    Every record file of the split is opened and its record count checked against dataset_info.json, so a
    truncated or missing file is a one-line error before training; a record that is corrupt inside a file is
    one when it is read.
    """
    import tensorflow_datasets as tfds  # imported here: it is slow to import and only this path needs it

    directory = prepared_dir(name, data_dir)
    remedy = f"delete {directory} and prepare it again (python -m data.prepare {name} --data_dir {data_dir})"
    try:
        builder = tfds.builder_from_directory(str(directory))
    except Exception as e:  # noqa: BLE001  (json, protobuf and TFDS errors alike)
        raise ValueError(f"TFDS dataset {name!r}: the metadata in {directory} is unreadable "
                         f"({type(e).__name__}: {short(e)}); {remedy}") from None
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (valid: {', '.join(builder.info.splits)})")
    files = builder.info.splits[split].file_instructions
    if builder.info.file_format.value == "array_record":
        for f in files:
            check_record_file(name, f.filename, f.examples_in_shard, remedy)
    return CheckedSource(builder.as_data_source(split=split), name, [(f.filename, f.take) for f in files], remedy)


def check_record_file(name: str, filename: str, expected: int, remedy: str) -> None:
    """One-line error naming an array_record file that is missing or holds fewer records than were written."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not Path(filename).is_file():
        raise FileNotFoundError(f"TFDS dataset {name!r}: record file {filename} is missing; {remedy}")
    try:  # reads the footer only: a truncated file has none, holds 0 records and fails to close
        reader = ArrayRecordReader(filename)
        found = reader.num_records()
        reader.close()
        problem = f"it holds {found} of its {expected} records" if found != expected else None
    except Exception as e:  # noqa: BLE001  (riegeli raises RuntimeError)
        problem = short(e)
    if problem:
        raise ValueError(f"TFDS dataset {name!r}: record file {filename} is truncated or corrupt ({problem}); "
                         f"{remedy}")


class CheckedSource:
    """A TFDS data source whose read errors name the record file and the remedy, in one line."""

    def __init__(self, source, name: str, files: list[tuple[str, int]], remedy: str):
        self.source, self.name, self.remedy = source, name, remedy
        self.files, self.ends = [f for f, _ in files], np.cumsum([n for _, n in files])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except Exception as e:  # noqa: BLE001  (riegeli raises RuntimeError, a decoder anything)
            file = self.files[int(np.searchsorted(self.ends, index, side="right"))]
            raise ValueError(f"TFDS dataset {self.name!r}: record {index} in {file} is corrupt "
                             f"({short(e)}); {self.remedy}") from None


def to_example(record: dict, image_size: int, channels: int) -> dict[str, np.ndarray]:
    """A TFDS record as float32 (S, S, C) image in [0, 1] (resized when the dataset's size differs) and label."""
    image = np.asarray(record["image"])
    if image.shape[-1] != channels:
        raise ValueError(f"TFDS image has {image.shape[-1]} channels, the config says data.channels={channels}")
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    image = image.astype(np.float32) / scale
    if image.shape[:2] != (image_size, image_size):  # e.g. ImageNet: images of every size
        image = np.stack([np.asarray(Image.fromarray(image[..., c], mode="F").resize((image_size, image_size),
                                                                                   Image.BILINEAR))
                          for c in range(channels)], axis=-1)
    return {"image": image, "label": np.int32(record["label"])}


CACHE_BYTES = 2**30  # cache="auto": a split stays in memory, decoded, when it fits in this (MNIST's train: 188 MB)


class DecodedSplit:
    """A split's examples as float32 images and int32 labels. Cached, each is decoded on its first read and kept:
    TFDS reads and decodes a record in ~40 us, 5.4 ms for a batch of 128 28x28 images, twice LeNet's step."""

    def __init__(self, examples: grain.MapDataset, image_shape: tuple[int, ...], cached: bool):
        self.examples, self.cached = examples, cached
        if cached:  # filled as examples are first read: no start-up pass, the memory taken as the epoch goes
            self.images = np.empty((len(examples), *image_shape), np.float32)
            self.labels = np.empty(len(examples), np.int32)
            self.decoded = np.zeros(len(examples), bool)

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if not self.cached:
            examples = [self.examples[int(i)] for i in indices]
            return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        for i in np.unique(indices[~self.decoded[indices]]):
            example = self.examples[int(i)]
            self.images[i], self.labels[i] = example["image"], example["label"]
            self.decoded[i] = True
        return {"image": self.images[indices], "label": self.labels[indices]}


class TFDSImages:
    """A TFDS image-classification dataset; the train split is shuffled per epoch from (seed, step). `cache`:
    keep decoded examples in memory (true), decode every read (false), or keep them when a split's fit in
    CACHE_BYTES (auto)."""

    task = "classify"

    def __init__(self, name: str, data_dir: str, train_split: str = "train", test_split: str = "test",
                 image_size: int = 28, channels: int = 1, augment: bool = False, seed: int = 0,
                 cache: bool | Literal["auto"] = "auto", **metadata):
        self.name, self.augment, self.seed = name, augment, seed
        shape = (image_size, image_size, channels)

        def split(name_: str) -> DecodedSplit:
            source = open_split(name, data_dir, name_)
            examples = grain.MapDataset.source(source).map(lambda r: to_example(r, image_size, channels))
            fits = len(examples) * int(np.prod(shape)) * 4 <= CACHE_BYTES
            return DecodedSplit(examples, shape, cache is True or (cache == "auto" and fits))

        self.train, self.test = split(train_split), split(test_split)

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        idx = train_indices(len(self.train), batch_size, step, self.seed, shard)
        batch = self.train.take(idx)
        if self.augment:
            batch["image"] = augment_images(batch["image"], np.random.default_rng([self.seed, step, shard[0]]))
        return batch

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        for idx, mask in eval_indices(len(self.test), batch_size, shard):
            yield self.test.take(idx) | {"mask": mask}
