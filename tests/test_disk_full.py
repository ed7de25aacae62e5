"""A full disk, on a real size-limited filesystem: a checkpoint that does not fit ends the run with one line and
leaves the previous one restorable; metric files that cannot be written never stop training or checkpoints."""

import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_resume import final_params, start, wait_for_checkpoint

STEPS = 100
ARGS = ["model=mlp", "model.hidden=[16]", "data=digits", f"trainer.steps={STEPS}", "trainer.batch_size=32",
        "trainer.eval_every=20", "trainer.log_every=10", "checkpoint.every=10", "checkpoint.keep=3"]


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """An 8 MiB tmpfs mounted for the test (needs root; skipped, saying why, where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    f"the full-disk tests need root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A ballast file that leaves `leave` bytes free on `disk`."""
    ballast = disk / "ballast"
    ballast.write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))
    return ballast


def on_disk(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[np.ndarray]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_cli([*ARGS, f"hydra.run.dir={run_dir}"])
    return final_params(run_dir, STEPS)


@pytest.mark.parametrize("leave", ["half a checkpoint", "nothing"])
def test_checkpoint_that_does_not_fit_ends_the_run_with_one_line_and_resumes_once_space_is_freed(
        small_disk, uninterrupted, leave):
    run_dir = small_disk / "run"
    proc = start(run_dir, ARGS)  # a first checkpoint, then a stop: the step the full disk must leave intact
    wait_for_checkpoint(run_dir, proc, 10)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    kept = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept < STEPS
    ballast = fill(small_disk, on_disk(run_dir / "checkpoints" / str(kept)) // 2 if leave != "nothing" else 0)

    full = run_cli([*ARGS, f"hydra.run.dir={run_dir}"], check=False)
    out = full.stdout + full.stderr
    assert full.returncode == 1, out
    assert "Traceback" not in out, out
    lines = [l for l in out.splitlines() if "error" in l.lower()]  # metric files may warn, once each
    assert len(lines) == 1, out
    if leave == "nothing":  # refused before anything is built
        assert lines[0] == (f"error: output directory {run_dir} is full (0 bytes free); free space and re-run the "
                            f"same command, or choose another with hydra.run.dir=PATH")
    else:  # the background write fails; its error surfaces at the next save
        match = re.fullmatch(
            rf"error: checkpoint (\d+) could not be written: no space left in {re.escape(str(run_dir))}/checkpoints "
            rf"\(needs about ([\d,]+) bytes, the size of checkpoint {kept}; ([\d,]+) bytes free\); "
            rf"checkpoint {kept} is intact; free space and re-run the same command to resume from it", lines[0])
        assert match, lines[0]
        assert int(match[1]) > kept and int(match[2].replace(",", "")) > int(match[3].replace(",", ""))
    assert not list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the partial one is gone
    assert not list(run_dir.glob(".write_probe*"))
    final_params(run_dir, kept)  # restorable

    ballast.unlink()
    resumed = run_cli([*ARGS, f"hydra.run.dir={run_dir}"])
    assert f"resumed from step {kept}" in resumed.stdout + resumed.stderr
    for a, b in zip(final_params(run_dir, STEPS), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_metric_files_that_cannot_be_written_leave_training_and_checkpoints_going(small_disk, tmp_path,
                                                                                   uninterrupted):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (small_disk / "tensorboard").mkdir()
    (run_dir / "tensorboard").symlink_to(small_disk / "tensorboard")  # both metric files on the full disk,
    (run_dir / "metrics.jsonl").symlink_to(small_disk / "metrics.jsonl")  # the checkpoints beside them not
    fill(small_disk, 0)
    proc = run_cli([*ARGS, f"hydra.run.dir={run_dir}"])
    out = proc.stdout + proc.stderr
    for name in ("metrics.jsonl", "tensorboard"):
        warnings = [l for l in out.splitlines() if f"{run_dir / name} cannot be written" in l]
        assert len(warnings) == 1, out
        assert "(No space left on device); no more metrics go there, training and checkpoints go on" in warnings[0]
    assert (run_dir / "final_metrics.json").exists()
    for a, b in zip(final_params(run_dir, STEPS), uninterrupted, strict=True):
        np.testing.assert_array_equal(a, b)
