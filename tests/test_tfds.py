"""The TFDS path, no network: a real TFDS dataset built on disk from the digits, trained on; missing data fails fast."""

import numpy as np
import pytest

from data.tfds_digits import build
from tests.conftest import run_cli
from train.loop import run


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    build(str(data_dir))
    return data_dir


def test_training_through_tfds_data_source(cfg_for, tfds_dir, tmp_path):
    cfg = cfg_for("data=tfds", "data.name=digits_tfds", f"data.data_dir={tfds_dir}", "model=lenet",
                  "trainer.steps=200", "trainer.eval_every=200", "checkpoint.every=200")
    assert run(cfg, tmp_path)["eval/accuracy"] >= 0.9


def test_missing_tfds_dataset_is_one_line_naming_dataset_directory_and_remedy(tmp_path):
    proc = run_cli(["data=tfds", "data.name=mnist", f"data.data_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"],
                   check=False, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'mnist'" in lines[0] and str(tmp_path) in lines[0] and "python -m data.prepare mnist" in lines[0]


def test_a_cached_split_decodes_each_example_once_and_serves_the_same_batches(tfds_dir, monkeypatch):
    from data import tfds as tfds_data

    cached, plain = (tfds_data.TFDSImages("digits_tfds", str(tfds_dir), cache=c) for c in (True, False))
    assert cached.train.cached and not plain.train.cached
    epoch = -(-len(cached.train) // 64)
    for step in [0, 1, epoch + 3]:  # the last in the second epoch, read from memory
        a, b = cached.train_batch(step, 64), plain.train_batch(step, 64)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert cached.train.decoded.sum() < len(cached.train)  # decoded as read, not all at the start
    for step in range(epoch):
        cached.train_batch(step, 64)
    assert cached.train.decoded.all()
    for a, b in zip(cached.eval_batches(128), plain.eval_batches(128)):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert tfds_data.TFDSImages("digits_tfds", str(tfds_dir)).train.cached  # auto: 1,437 images fit
    monkeypatch.setattr(tfds_data, "CACHE_BYTES", 1000)
    assert not tfds_data.TFDSImages("digits_tfds", str(tfds_dir)).train.cached
