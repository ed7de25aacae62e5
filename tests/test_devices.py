"""One jitted step over a device mesh: 4 fake CPU devices give the single-device losses."""

import os

from tests.conftest import run_cli
from train.writers import read_metrics

ARGS = ["model=lenet", "trainer.steps=10", "trainer.batch_size=64", "trainer.log_every=1",
             "trainer.eval_every=10", "checkpoint.every=10"]


def losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]


def test_same_loss_on_1_and_4_devices(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "")
    run_cli([*ARGS, f"hydra.run.dir={tmp_path / 'one'}"])
    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path / 'four'}"],
                   env={"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4"})
    assert "'data': 4" in proc.stdout + proc.stderr
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert len(one) == len(four) == 10
    assert one[-1] < one[0]
    for a, b in zip(one, four):
        assert abs(a - b) < 1e-5, (one, four)
