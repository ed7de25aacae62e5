"""scripts/conv_bench.py: runs, writes sane figures for the three libraries (convolutions, dense layers,
attention, max pools, batch-norm statistics) and for another build of archlab's kernels (--against), and names bad
arguments."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_conv_bench_times_every_layer_in_every_library(tmp_path):
    out = tmp_path / "conv.json"
    done = subprocess.run([sys.executable, "scripts/conv_bench.py", "--batch", "2", "--rounds", "2", "--against",
                           "HEAD", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    layers = [r["layer"] for r in result["rows"]]
    assert layers[:2] == ["resnet20 stage 1", "resnet20 stage 2"] and "gpt d384 fc1" in layers
    # HEAD's build of the kernels, timed in turn with the working tree's: the same results up to rounding
    for row, names in [(r, ("forward", "input_grad", "weight_grad")) for r in result["rows"]] + [
            (r, ("forward", "forward_backward")) for r in result["attention"] + result["pools"]] + [
            (r, ("statistics",)) for r in result["norms"]]:
        for op in names:
            median, low, high = row["speedup"][op]
            assert 0 < low <= median <= high and 0 < row["archlab@HEAD"][op] < 10_000, (row, op)
            assert 0 <= row["difference"][op] < 1e-4, (row, op)
    for row in result["rows"]:
        for lib in ("xla", "archlab", "pytorch"):
            assert all(0 < row[lib][op] < 10_000 for op in ("forward", "input_grad", "weight_grad")), (row, lib)
    assert [r["layer"] for r in result["attention"]] == ["gpt d384 attention", "gpt d128 attention",
                                                          "vit_tiny attention", "transformer decoder self-attention",
                                                          "transformer encoder self-attention"]
    assert [r["shape"] for r in result["pools"]] == [[2, 24, 24, 6, 2], [2, 8, 8, 16, 2]]
    for row in result["attention"] + result["pools"]:
        for lib in ("xla", "archlab", "pytorch"):
            assert all(0 < row[lib][op] < 10_000 for op in ("forward", "forward_backward")), (row, lib)
    assert [r["shape"] for r in result["norms"]] == [[2, 28, 28, 16], [2, 14, 14, 32], [2, 7, 7, 64]]
    for row in result["norms"]:
        assert all(0 < row[lib]["statistics"] < 10_000 for lib in ("xla", "archlab")), row
    markdown = out.with_suffix(".md").read_text()
    assert "| resnet20 stage 1 |" in markdown and "| gpt d384 attention |" in markdown
    assert "| resnet20 stage 3 batch norm |" in markdown and "| lenet pool 1 |" in markdown
    assert "archlab / archlab@HEAD (fwd / dx / dW): speedup [range], largest difference" in markdown


def test_conv_bench_names_a_revision_it_cannot_find():
    done = subprocess.run([sys.executable, "scripts/conv_bench.py", "--against", "no-such-revision"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        "error: --against 'no-such-revision' is not a commit of this repository (a branch, tag or hash)")


def test_conv_bench_names_a_bad_batch():
    done = subprocess.run([sys.executable, "scripts/conv_bench.py", "--batch", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1] == (
        "error: --batch 0 and --rounds 3 must be at least 1")


def test_conv_bench_names_a_filter_that_leaves_nothing():
    done = subprocess.run([sys.executable, "scripts/conv_bench.py", "--only", "resnet99"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("error: --only resnet99 names no case; the cases: ")
    assert "'resnet20 stage 1'" in last and "'gpt d384 fc1'" in last
