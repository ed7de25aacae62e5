"""scripts/step_ab.py: times one config's train step with two builds of the kernels in one process, writes sane
figures, and names bad arguments in one line."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_step_ab_times_both_builds_of_a_step(tmp_path):
    out = tmp_path / "ab.json"
    done = subprocess.run([sys.executable, "scripts/step_ab.py", "--against", "HEAD", "--rounds", "3", "--calls", "2",
                           "--out", str(out), "model=lenet", "data=digits", "trainer.batch_size=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["against"] == "HEAD" and result["overrides"] == ["model=lenet", "data=digits", "trainer.batch_size=8"]
    assert (result["rounds"], result["calls"]) == (3, 2)
    assert all(0 < ms < 10_000 for ms in result["step_ms"].values()) and set(result["step_ms"]) == {"before", "after"}
    median, low, high = result["speedup"]
    assert 0 < low <= median <= high
    assert "speedup" in done.stdout and "with HEAD's kernels" in done.stdout


def test_step_ab_names_bad_rounds():
    done = subprocess.run([sys.executable, "scripts/step_ab.py", "--against", "HEAD", "--rounds", "0", "model=mlp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == "error: --rounds 0 and --calls 3 must be at least 1"


def test_step_ab_names_a_bad_override():
    done = subprocess.run([sys.executable, "scripts/step_ab.py", "--against", "HEAD", "model=nosuch"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("error: model=nosuch is not a config option (valid: ")


def test_step_ab_names_a_revision_it_cannot_find():
    done = subprocess.run([sys.executable, "scripts/step_ab.py", "--against", "no-such-revision", "model=mlp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        "error: --against 'no-such-revision' is not a commit of this repository (a branch, tag or hash)")


def test_step_ab_names_an_out_it_cannot_write(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "scripts/step_ab.py", "--against", "HEAD", "--out", str(blocker / "ab.json"),
                           "model=mlp"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        f"error: --out {blocker / 'ab.json'} cannot be written (File exists); give a writable file or folder")
