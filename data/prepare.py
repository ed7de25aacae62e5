"""Prepare a TFDS catalog dataset for offline reading: `python -m data.prepare mnist --data_dir DIR`.

Encoding catalog images needs TensorFlow (`pip install -e '.[prepare]'`); reading them back does not.
"""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", help="TFDS dataset name, e.g. mnist, cifar10, tiny_shakespeare")
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    args = parser.parse_args()
    import tensorflow_datasets as tfds

    builder = tfds.builder(args.name, data_dir=args.data_dir)
    builder.download_and_prepare(file_format="array_record")
    print(f"prepared {args.name} in {builder.data_dir}")


if __name__ == "__main__":
    main()
