"""The TFDS path, no network: a real TFDS dataset built on disk from the digits, trained on; missing data fails fast."""

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
