"""Multi-host and re-meshing with real processes: 2 processes over gloo, and a checkpoint moved from 8 devices to 1."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from tests.conftest import ROOT, run_cli
from train.writers import read_metrics

ARGS = ["model=mlp", "model.hidden=[128]", "trainer.steps=12", "trainer.batch_size=64", "trainer.log_every=1",
             "trainer.eval_every=12", "checkpoint.every=6"]


def losses(run_dir) -> np.ndarray:
    return np.array([r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
    run_cli([*ARGS, f"hydra.run.dir={tmp_path / 'single'}"])
    port, run_dir = free_port(), tmp_path / "multi"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train", *ARGS, f"hydra.run.dir={run_dir}",
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)}) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("'data': 2" in out for out in outs)
    np.testing.assert_allclose(losses(run_dir), losses(tmp_path / "single"), rtol=0, atol=1e-5)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]

    multi_final = json.loads((run_dir / "final_metrics.json").read_text())
    proc = run_cli([*ARGS, f"hydra.run.dir={run_dir}"])  # one process: restores the 2-process checkpoint
    assert "resumed from step 12" in proc.stdout + proc.stderr
    single_final = json.loads((run_dir / "final_metrics.json").read_text())
    assert abs(single_final["eval/loss"] - multi_final["eval/loss"]) < 1e-5


def test_checkpoint_saved_on_8_devices_restores_on_1(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    proc = run_cli([*ARGS, "mesh.data=2", "mesh.fsdp=4", f"hydra.run.dir={tmp_path}"], env={"XLA_FLAGS": flags})
    assert "'data': 2, 'fsdp': 4" in proc.stdout + proc.stderr
    eight = json.loads((tmp_path / "final_metrics.json").read_text())
    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path}"])
    assert "resumed from step 12" in proc.stdout + proc.stderr
    one = json.loads((tmp_path / "final_metrics.json").read_text())
    assert abs(one["eval/loss"] - eight["eval/loss"]) < 1e-5 and one["eval/accuracy"] == eight["eval/accuracy"]
