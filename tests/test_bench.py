"""scripts/bench.py runs the suite's programs side by side and reports sane figures (never checked for speed)."""

import json
import sys

import pytest

from tests.conftest import run_cli

pytest.importorskip("torch")


def test_bench_runs_and_its_figures_are_sane(tmp_path):
    out = tmp_path / "bench.json"  # --out a folder: bench.json and bench.md go into it
    run_cli(["mlp", "--rounds", "2", "--window-seconds", "0.2", "--out", str(tmp_path)], module="scripts/bench.py",
            timeout=600)
    report = json.loads(out.read_text())
    mlp = report["results"]["mlp"]
    assert mlp["params"] == 269_322  # the twin's count, equal to archlab's (tests/test_torch_twins.py)
    assert set(mlp["programs"]) == {"archlab", "eager", "compile"}
    for program in mlp["programs"].values():
        rates = program["steps_per_sec"]
        assert 0 < rates["min"] <= rates["median"] <= rates["max"]
        assert 0 < program["fraction_of_peak"] <= 1
        assert program["compile_s"] > 0 and program["peak_rss_mb"] > 100
        assert 0 <= program["input_wait"] < 1
    assert mlp["archlab_over_eager"]["median"] > 0
    assert mlp["items_per_step"] == 128 and mlp["gflop_per_step"] > 0
    # archlab's timed window: whole logged windows of the PyTorch window's steps, sized to --window-seconds
    assert mlp["archlab_window_steps"] % mlp["window_steps"] == 0 and mlp["archlab_window_steps"] > 0
    assert mlp["archlab_dots"] in ("ynnpack", "eigen")  # runtime.autotune's choice, made in the warm-up
    assert "| mlp | 269,322 |" in out.with_suffix(".md").read_text()


def test_bench_names_an_unknown_entry():
    proc = run_cli(["gpt3"], module="scripts/bench.py", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: bench entry 'gpt3' is not in the suite (valid: mlp, lenet, resnet20, resnet18, vit_tiny, gpt_small, "
        "gpt_char, mamba, simba, transformer)"]


def test_bench_names_an_unwritable_out_before_it_starts(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    out = tmp_path / "taken" / "bench.json"
    proc = run_cli(["mlp", "--out", str(out)], module="scripts/bench.py", check=False, timeout=60)
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --out {out} cannot be written (") and line.endswith("a writable file or folder")
    assert "bench: mlp" not in proc.stderr  # nothing was timed


@pytest.mark.parametrize("overrides, expected", [
    (["model.d_model=wide"], "error: model.d_model=wide is not valid (valid: int, as models.gpt.GPT declares d_model)"),
    (["nosuchkey=1"], "error: Could not override 'nosuchkey'. To append to your config use +nosuchkey=1 "
                      "(bench entry gpt_small)"),
])
def test_bench_names_a_bad_override_before_it_starts(overrides, expected):
    proc = run_cli(["gpt_small", "--set", *overrides], module="scripts/bench.py", check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [expected]  # no worker started, no traceback


@pytest.mark.parametrize("args, expected", [
    (["--models", "gpt_tiny,gpt5"], "error: --models row 'gpt5' is not known (valid: gpt_tiny, resnet20_tiny)"),
    (["--steps", "0"], "error: --steps 0 is not valid (valid: a positive number of timed steps)"),
])
def test_accelerator_bench_names_a_bad_option_before_it_starts(args, expected, tmp_path):
    proc = run_cli(["--smoke", *args, "--out", str(tmp_path / "a.json")], module="scripts/accelerator_bench.py",
                   check=False, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [expected]  # nothing was timed, no traceback
    assert not (tmp_path / "a.json").exists()


def test_accelerator_bench_smoke_run_reports_every_section(tmp_path):
    """The GPU/TPU table's script, at tiny shapes on CPU: every section filled (speed is never checked)."""
    out = tmp_path / "accelerator.json"
    run_cli(["--smoke", "--out", str(out)], module="scripts/accelerator_bench.py", timeout=600)
    report = json.loads(out.read_text())
    assert set(report["models"]) == {"gpt_tiny", "resnet20_tiny"}
    for row in report["models"].values():
        assert row["step_ms"] > 0 and row["items_per_s"] > 0 and row["tflops_per_step"] > 0
        assert row["mfu"] is None  # no bf16 peak is listed for a CPU
    assert set(report["torch"]) == {"gpt_tiny", "resnet20_tiny"}  # the PyTorch twins, on the CPU for --smoke
    assert all(row["step_ms"] > 0 and row["items_per_s"] > 0 for row in report["torch"].values())
    assert {(r["scan"], r["length"]) for r in report["scans"]} == {(s, n) for s in ("sequential", "chunked")
                                                                   for n in (64, 128)}
    assert all(r["peak_bytes"] > 0 for r in report["scans"])
    assert report["attention"][0]["kernel"] == "einsum" and report["attention"][0]["plain_ms"] > 0


def test_compile_time_script_compares_the_layouts(tmp_path):
    out = tmp_path / "compile_time.json"
    run_cli(["--depths", "1", "2", "--rounds", "1", "--out", str(out), "--set", "model=gpt", "data=bytes",
             "data.seq_len=16", "trainer.batch_size=2"], module="scripts/compile_time.py", timeout=600)
    report = json.loads(out.read_text())
    assert [row["depth"] for row in report["rows"]] == [1, 2]
    assert all(row[layout]["median_s"] > 0 for row in report["rows"] for layout in ("loop", "scan"))
    assert "| 2 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("causal", [True, False])
def test_attention_flops_count_the_products_a_mask_leaves(causal):
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.bench import attention_flop_formulas

    b, h, t, d = 2, 3, 32, 16
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
    # forward q k^T and p v, backward four products, each 2 b h t^2 d FLOPs, half of them under a causal mask
    assert counter.get_total_flops() == 6 * 2 * b * h * t * t * d // (2 if causal else 1)


def test_bench_counts_a_gpt_twins_attention():
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.bench import step_flops
    from scripts.torch_twins import to_torch, train_loss, twin
    from train import targets
    from train.config import compose

    cfg = compose(["model=gpt", "data=bytes", "data.seq_len=32", "model.num_layers=2", "model.d_model=64",
                   "model.num_heads=4"])
    model = twin(OmegaConf.to_container(cfg.model, resolve=True))
    batch = to_torch(targets.instantiate(cfg.data, _convert_="all").train_batch(0, 4))
    with FlopCounterMode(display=False) as plain:  # PyTorch's own count: the dense layers, no attention on a CPU
        train_loss(model, "next_token", batch).backward()
    attention = 2 * 6 * 2 * 4 * 32 * 32 * 64 // 2  # 2 layers x 6 causal products of (4 x 32 x 32) x 64 (all heads)
    assert step_flops(model, "next_token", batch) == plain.get_total_flops() + attention
