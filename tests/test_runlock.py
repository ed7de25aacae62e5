"""One run per run directory: a second run on a live run's directory stops at once; `kill -9` frees it."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from train import runlock

ARGS = ["model=mlp", "model.hidden=[16]", "trainer.steps=1000000", "trainer.log_every=100", "checkpoint.every=100",
        "trainer.eval_every=1000000"]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit())


def test_second_run_stops_at_once_naming_the_holder_and_a_killed_holder_frees_the_dir(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "train", *ARGS, f"hydra.run.dir={tmp_path}"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((tmp_path / "checkpoints").exists() and checkpoint_steps(tmp_path)):
            assert first.poll() is None and time.time() < deadline, "the first run ended or saved no checkpoint"
            time.sleep(0.1)
        assert f"pid {first.pid} on host {socket.gethostname()}" in (tmp_path / "run.lock.0").read_text()
        written = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()}

        start = time.time()
        second = run_cli([*ARGS, "trainer.seed=1", f"hydra.run.dir={tmp_path}"], check=False, timeout=60)
        assert second.returncode != 0
        assert time.time() - start < 20  # no JAX start-up, no compile
        assert second.stdout == ""
        assert re.fullmatch(rf"error: {re.escape(str(tmp_path))} is in use by another run \(pid {first.pid} on "
                            rf"host {re.escape(socket.gethostname())}, since \S+\); wait for it or pick another "
                            rf"hydra\.run\.dir\n", second.stderr), second.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir()} == written  # Hydra wrote nothing
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()

    last = checkpoint_steps(tmp_path)[-1]
    rerun = run_cli([*ARGS[:2], f"trainer.steps={last + 100}", *ARGS[3:], f"hydra.run.dir={tmp_path}"])
    assert re.search(r"resumed from step \d+", rerun.stdout + rerun.stderr), rerun.stdout + rerun.stderr
    assert checkpoint_steps(tmp_path)[-1] == last + 100


def test_the_default_run_dir_is_locked_before_hydra_writes_into_it(tmp_path):
    """Without hydra.run.dir the directory comes from ${hydra:...} interpolations: resolved and locked first."""
    run_dir = tmp_path / "outputs" / "mlp-digits" / "trainer.steps=5"
    lock = runlock.acquire(run_dir, 0)  # this test process is the live run
    try:
        proc = subprocess.run([sys.executable, "-m", "train", "model=mlp", "trainer.steps=5"], cwd=tmp_path,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    finally:
        runlock.release(lock)
    assert proc.returncode != 0
    assert proc.stderr.startswith(f"error: outputs/mlp-digits/trainer.steps=5 is in use by another run (pid "
                                  f"{os.getpid()} on host "), proc.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock.0"]


HOLD = """
import sys, time
from train import runlock
runlock.acquire(sys.argv[1], int(sys.argv[2]))
print("held", flush=True)
time.sleep(60)
"""


def test_processes_of_one_job_lock_their_own_index(tmp_path):
    """Process 1 of a live job holds run.lock.1: process 0 of a job gets in, a second job's process 1 does not."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "1"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        runlock.release(runlock.acquire(tmp_path, 0))
        with pytest.raises(runlock.RunDirInUse, match=rf"\(pid {holder.pid} on host "):
            runlock.acquire(tmp_path, 1)
    finally:
        holder.kill()
        holder.wait()
    runlock.release(runlock.acquire(tmp_path, 1))
