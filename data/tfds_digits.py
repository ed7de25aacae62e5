"""A real TFDS dataset built from the offline digits: exercises the TFDS path with no network.

`python -m data.tfds_digits --data_dir DIR` writes it (array_record, `tfds.features.Tensor` features, so no
TensorFlow is needed); train with `python -m train data=tfds data.name=digits_tfds data.data_dir=DIR`.
"""

import argparse

import numpy as np
import tensorflow_datasets as tfds

from data.digits import load_resized_digits


class DigitsTfds(tfds.core.GeneratorBasedBuilder):
    """The 1,797 scikit-learn digits at 28x28 as a TFDS dataset with a seeded 80/20 train/test split."""

    VERSION = tfds.core.Version("1.0.0")
    pkg_dir_path = tfds.core.Path(__file__).parent  # TFDS would look it up by module name, `__main__` under -m

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
        }), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        images, labels = load_resized_digits(28)
        perm = np.random.default_rng(0).permutation(len(labels))
        num_test = len(labels) // 5
        return {"train": self._generate_examples(images, labels, perm[num_test:]),
                "test": self._generate_examples(images, labels, perm[:num_test])}

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def build(data_dir: str) -> str:
    """Build the dataset under `data_dir` and return the directory it was written to."""
    builder = DigitsTfds(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data_dir", required=True)
    print(build(parser.parse_args().data_dir))
