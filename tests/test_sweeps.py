"""A small real multirun finishes, and the sweep summary lists every run with its metric and overrides."""

import json

import pytest
import yaml

from tests.conftest import run_cli


def test_2x2_multirun_and_summary(tmp_path):
    run_cli(["-m", *["optim.lr=0.001,0.01", "model=mlp,lenet", "trainer.steps=20", "trainer.eval_every=20",
                          "checkpoint.every=20", "trainer.batch_size=32"], f"hydra.sweep.dir={tmp_path}"],
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


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
             *["model=mlp", "trainer.seed=0,1", "trainer.steps=10", "trainer.eval_every=10", "checkpoint.every=10"],
             f"hydra.sweep.dir={tmp_path}"], timeout=600)
    finals = [json.loads(p.read_text()) for p in tmp_path.glob("*/final_metrics.json")]
    assert len(finals) == 2 and finals[0]["eval/loss"] != finals[1]["eval/loss"]


def test_optuna_sweeper_minimizes_the_final_eval_loss(tmp_path):
    run_cli(["-m", "+hparams_search=lr_optuna", "hydra.sweeper.n_trials=2",
             *["model=mlp", "trainer.steps=10", "trainer.eval_every=10", "checkpoint.every=10"],
             f"hydra.sweep.dir={tmp_path}"], timeout=600)
    losses = [json.loads(p.read_text())["eval/loss"] for p in tmp_path.glob("*/final_metrics.json")]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["best_value"]
    assert len(losses) == 2 and best == pytest.approx(min(losses))
