"""A small real multirun finishes, and the sweep summary lists every run with its metric and overrides."""

import json

from tests.conftest import quick, run_cli


def test_2x2_multirun_and_summary(tmp_path):
    run_cli(["-m", *quick("optim.lr=0.001,0.01", "model=mlp,lenet", "trainer.steps=20", "trainer.eval_every=20",
                          "checkpoint.every=20", "trainer.batch_size=32"), f"hydra.sweep.dir={tmp_path}"],
            timeout=600)
    proc = run_cli([str(tmp_path), "--metric", "eval/accuracy", "--max"], module="scripts/sweep_summary.py")
    assert "4 runs" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(summary["swept"]) == ["model", "optim.lr"]
    runs = summary["runs"]
    assert sorted((r["overrides"]["model"], r["overrides"]["optim.lr"]) for r in runs) == [
        ("lenet", "0.001"), ("lenet", "0.01"), ("mlp", "0.001"), ("mlp", "0.01")]
    values = [r["value"] for r in runs]
    assert values == sorted(values, reverse=True) and all(0.0 <= v <= 1.0 for v in values)
    assert (tmp_path / "summary.png").stat().st_size > 0
