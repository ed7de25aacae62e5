"""Crash and preemption safety with real processes and signals: exact resume, SIGTERM, corrupt checkpoints."""

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import ROOT, run_cli

STEPS = 100
ARGS = ["model=lenet", f"trainer.steps={STEPS}", "trainer.batch_size=32",
             "trainer.eval_every=100", "trainer.log_every=10", "checkpoint.every=10", "checkpoint.keep=3"]


def final_params(run_dir: Path, step: int = STEPS) -> list[np.ndarray]:
    restored = ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def start(run_dir: Path, args: list[str] = ARGS) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()] if run_dir.exists() else []
        if steps and max(steps) >= at_least:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cli([*ARGS, f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir) -> list[np.ndarray]:
    return final_params(uninterrupted_dir)


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
    kill_after = random.Random().choice(range(10, STEPS - 20, 10))
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, proc, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / str(STEPS)).exists()
    run_cli([*ARGS, f"hydra.run.dir={tmp_path}"])
    for a, b in zip(final_params(tmp_path), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resumes_exactly(tmp_path, uninterrupted):
    proc = start(tmp_path)
    wait_for_checkpoint(tmp_path, proc, 10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
    assert "re-run the same command to resume" in out
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit())
    assert 10 <= saved < STEPS
    run_cli([*ARGS, f"hydra.run.dir={tmp_path}"])
    for a, b in zip(final_params(tmp_path), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_truncated_latest_checkpoint_is_set_aside_with_a_message(tmp_path, uninterrupted_dir, uninterrupted):
    shutil.copytree(uninterrupted_dir, tmp_path, dirs_exist_ok=True)
    latest = tmp_path / "checkpoints" / str(STEPS)
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = run_cli([*ARGS, f"hydra.run.dir={tmp_path}"])
    out = proc.stdout + proc.stderr
    assert f"checkpoint {STEPS}" in out and "falling back to the previous one" in out
    assert f"resumed from step {STEPS - 10}" in out
    assert (tmp_path / "checkpoints_unreadable" / str(STEPS)).is_dir()
    for a, b in zip(final_params(tmp_path), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)
