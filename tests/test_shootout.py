"""The architecture shoot-out (scripts/shootout.py), tiny and real: two families trained at one FLOPs budget after a
learning-rate sweep, resumed; two language families at a seconds budget, then generating; the FLOPs count of
scans (train/flops.py), trainer.max_seconds, and sweep_summary's best-first ranking."""

import json
import math
import time

import jax
import jax.numpy as jnp
import pytest

from scripts.sweep_summary import maximized
from tests.conftest import run_cli
from train.flops import compiled_flops, xla_flops
from train.writers import read_metrics, train_minutes

SHOOTOUT = "scripts/shootout.py"
REQUIRED = ("arena", "model", "seed", "params", "train_flops", "train_seconds")

# MLP and LeNet at hidden width 16; LeNet takes the MLP's swept learning rate, so only the MLP's two rates train.
IMAGES = ["families=[mlp,lenet]", "arena.families.mlp.config.model.hidden=[16]",
          "arena.families.lenet.config.model.hidden=[16]", "+arena.families.lenet.lr_from=mlp",
          "arena.cell.trainer.batch_size=16", "budget.kind=flops", "budget.value=1e8", "seeds=[0]",
          "arena.lr_sweep.lrs=[0.003,0.03]"]
LANGUAGE = ["arena=language", "families=[gpt_1m,mamba_1m]", "data.seq_len=16", "arena.cell.trainer.batch_size=4",
            "budget.kind=seconds", "budget.value=1.5", "arena.lr_sweep.lrs=[0.003]",
            *(f"arena.families.gpt_1m.config.model.{k}" for k in ("num_layers=1", "d_model=16", "num_heads=2")),
            *(f"arena.families.mamba_1m.config.model.{k}" for k in ("num_layers=1", "d_model=16"))]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("images")
    t0 = time.perf_counter()
    proc = run_cli([*IMAGES, f"hydra.run.dir={out}"], module=SHOOTOUT, timeout=900)
    return out, proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def language(tmp_path_factory):
    out = tmp_path_factory.mktemp("language")
    run_cli([*LANGUAGE, f"hydra.run.dir={out}"], module=SHOOTOUT, timeout=900)
    return out


def test_tiny_shootout_writes_table_results_and_plots(images):
    out, _, _ = images
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert sorted(rows) == ["lenet", "mlp"]
    for r in rows.values():
        assert all(r[k] is not None for k in REQUIRED) and r["arena"] == "images" and r["seed"] == 0
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and r["params"] > 0 and r["train_seconds"] > 0
        config = (out / "runs" / f"{r['model']}-s0" / ".hydra" / "config.yaml").read_text()
        assert f"lr: {r['lr']}" in config  # the cell trained with the rate results.json reports
    table = (out / "table.md").read_text()
    assert "| 1 | " in table and "mlp" in table and "lenet" in table and "eval/accuracy" in table
    assert (out / "images.png").stat().st_size > 10_000


def test_learning_rate_sweep_picks_the_best_rate(images):
    out, _, _ = images
    sweep = json.loads((out / "results.json").read_text())["lr_sweep"]
    finals = {lr: json.loads((out / "lr_sweep" / f"mlp-lr{tag}" / "final_metrics.json").read_text())["eval/accuracy"]
              for lr, tag in ((0.003, "0p003"), (0.03, "0p03"))}
    assert sweep["mlp"]["lr"] == max(finals, key=finals.get)
    assert sweep["lenet"] == {"lr": sweep["mlp"]["lr"], "swept": {}, "from": "mlp"}
    assert not (out / "lr_sweep" / "lenet-lr0p003").exists()


def test_flops_budget_buys_equal_flops_within_one_step(images):
    out, _, _ = images
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len({r["steps"] for r in rows}) == 2  # the families' steps differ; their FLOPs do not
    for r in rows:
        assert 0 <= 1e8 - r["train_flops"] < r["flops_per_step"]
        assert max(x["step"] for x in read_metrics(out / "runs" / f"{r['model']}-s0" / "metrics.jsonl")) == r["steps"]


def test_rerun_skips_finished_cells(images):
    out, first, first_seconds = images
    finals = sorted(out.glob("*/*/final_metrics.json"))
    before = {p: p.stat().st_mtime_ns for p in finals}
    t0 = time.perf_counter()
    proc = run_cli([*IMAGES, f"hydra.run.dir={out}"], module=SHOOTOUT, timeout=600)
    assert "lr_sweep: skipping 2 finished cells" in proc.stdout and "runs: skipping 2 finished cells" in proc.stdout
    assert "training" not in proc.stdout and len(finals) == 4
    assert {p: p.stat().st_mtime_ns for p in finals} == before
    assert time.perf_counter() - t0 < first_seconds / 2


def test_sweep_summary_ranks_the_best_run_first(images):
    out, _, _ = images
    sweep = out / "lr_sweep"

    def ranked(*args: str) -> list[float]:
        run_cli([str(sweep), *args], module="scripts/sweep_summary.py")
        return [r["value"] for r in json.loads((sweep / "summary.json").read_text())["runs"]]

    accuracy = ranked("--metric", "eval/accuracy")
    assert len(set(accuracy)) == 2 and accuracy == sorted(accuracy, reverse=True)
    loss = ranked("--metric", "eval/loss")
    assert loss == sorted(loss)
    assert ranked("--metric", "eval/accuracy", "--minimize") == sorted(accuracy)
    assert ranked("--metric", "eval/loss", "--maximize") == sorted(loss, reverse=True)
    proc = run_cli([str(sweep), "--metric", "eval/foo"], module="scripts/sweep_summary.py", check=False)
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0 and "--maximize or --minimize" in proc.stderr
    assert [maximized(m) for m in ("eval/accuracy", "eval/bleu", "eval/exact_match")] == [True] * 3
    assert [maximized(m) for m in ("eval/loss", "eval/perplexity", "eval/bits_per_token", "eval/error")] == [False] * 4


def test_seconds_budget_stops_each_family_at_its_time(language):
    results = json.loads((language / "results.json").read_text())
    plan = json.loads((language / "plan.json").read_text())
    assert {r["model"] for r in results["rows"]} == {"gpt_1m", "mamba_1m"}
    for r in results["rows"]:
        assert all(r[k] is not None for k in REQUIRED) and r["eval/bits_per_token"] > 0
        assert r["tokens"] == r["steps"] * 4 * 16 and plan["families"][r["model"]]["steps_per_sec"] > 0
        assert 0 < r["train_seconds"] < 1.5 * 1.3 + 0.5  # trainer.max_seconds, checked after every step
        assert [p["value"] for p in r["curve"]][-1] == r["eval/bits_per_token"]
    assert (language / "language.png").stat().st_size > 10_000


def test_inference_arena_kv_cache_grows_and_recurrent_state_does_not(language, tmp_path):
    run_cli(["arena=inference", f"arena.source={language}", "arena.contexts=[16,32]", "arena.new_tokens=4",
             "arena.repeats=1", f"hydra.run.dir={tmp_path}"], module=SHOOTOUT, timeout=600)
    rows = {(r["model"], r["context"]): r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert set(rows) == {(m, c) for m in ("gpt_1m", "mamba_1m") for c in (16, 32)}
    cache = {key: r["cache_bytes"] for key, r in rows.items()}
    assert cache["gpt_1m", 32] / cache["gpt_1m", 16] == pytest.approx((32 + 4) / (16 + 4), rel=0.02)  # KV of L + new
    assert cache["mamba_1m", 32] == cache["mamba_1m", 16]  # the recurrent state does not grow
    assert all(r["prefill_seconds"] > 0 and r["decode_tokens_per_sec"] > 0 and r["decode_peak_bytes"] > r["cache_bytes"]
               for r in rows.values())
    assert "gpt_1m" in (tmp_path / "table.md").read_text() and (tmp_path / "inference.png").stat().st_size > 10_000


def test_max_seconds_stops_training_and_a_rerun_adds_no_step(tmp_path):
    args = ["model=mlp", "model.hidden=[16]", "trainer.steps=1000000", "trainer.max_seconds=2", "trainer.log_every=50",
            f"hydra.run.dir={tmp_path}"]
    run_cli(args)
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps, checkpoints = records[-1]["step"], sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert 0 < steps < 1_000_000 and str(steps) in checkpoints
    assert 1.8 <= train_minutes(records) * 60 < 2.6  # the logged rates skip the log writes the limit counts
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    run_cli(args)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["step"] == steps
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == checkpoints
    assert json.loads((tmp_path / "final_metrics.json").read_text()) == final


def test_flops_count_every_scan_iteration_forward_and_backward():
    w = jnp.ones((32, 32))

    def scanned(x, unroll=1):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=12, unroll=unroll)[0].sum()

    x = jnp.ones((8, 32))
    assert compiled_flops(scanned, x) == pytest.approx(xla_flops(jax.jit(lambda x: scanned(x, unroll=True))
                                                                 .lower(x).compile()), rel=0.01)
    unrolled = xla_flops(jax.jit(jax.grad(lambda x: scanned(x, unroll=True))).lower(x).compile())
    assert compiled_flops(jax.grad(scanned), x) == pytest.approx(unrolled, rel=0.01)
    assert xla_flops(jax.jit(jax.grad(scanned)).lower(x).compile()) < unrolled / 5  # what XLA alone reports


def test_scanned_layers_cost_the_flops_of_the_layer_loop(tmp_path):
    from train import loop
    from train import mesh as mesh_lib
    from train.config import compose

    flops = {}
    for scan in (False, True):
        exp = loop.setup(compose(["model=gpt", "data=bytes", "data.seq_len=8", "trainer.batch_size=2",
                                  "model.num_layers=2", "model.d_model=16", f"model.scan_layers={scan}"]),
                         tmp_path / str(scan))
        step = loop.make_train_step(exp)
        batch = mesh_lib.global_batch(exp.dataset.train_batch(0, 2, exp.shard), exp.mesh)
        flops[scan] = compiled_flops(step, exp.abstract_state, batch)
        exp.checkpoints.close()
    assert flops[True] == pytest.approx(flops[False], rel=0.02) and not math.isnan(flops[True])


@pytest.mark.parametrize("args, words", [
    (["budget.kind=hours"], ["budget.kind=hours", "steps, flops, seconds"]),
    (["arena=nope"], ["arena=nope", "images, inference, language"]),
    (["families=[mlp,nope]"], ["families: nope", "resnet20"]),
    (["families=[mlp]", "budget.value=10"], ["budget.value=10", "buys no step of mlp"]),
])
def test_bad_shootout_input_is_one_line(tmp_path, args, words):
    proc = run_cli([*args, f"hydra.run.dir={tmp_path}"], module=SHOOTOUT, check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr
