"""Universal approximation, measured: MLPs of growing width, and of growing depth at equal parameters, fit to targets.

    .venv/bin/python scripts/uat.py                                    # 3 targets, widths 2..256, depths 1..4
    .venv/bin/python scripts/uat.py 'targets=[sin3x]' 'widths=[2,32]' 'depths=[]' trainer.steps=500

Each sweep point is one composed config (model=mlp, data=functions, optim=adamw) trained with the framework's
own jitted train step (`train.loop.setup` + `make_train_step`), full-batch on the training grid, then evaluated
on the held-out midpoints. Width sweep: one hidden layer of each of `widths`. Depth sweep: 1..4 hidden layers of
equal width, the width chosen so that the parameter count is as close as possible to each of `param_budgets`.
Writes uat.json (one record per fit) and uat.png (held-out MSE against parameters, one line per depth, log-log;
the fits of the narrowest and widest one-hidden-layer MLPs over each target) to the run directory.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import hydra
import jax
import matplotlib
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data.functions import TARGETS
from train import loop, runtime
from train import mesh as mesh_lib
from train.config import check_group_choices

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# ---- Sweep points ----


def mlp_params(in_features: int, hidden: list[int], out_features: int = 1) -> int:
    """Weights and biases of an MLP with these layer widths."""
    widths = [in_features, *hidden, out_features]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


def width_for_budget(in_features: int, depth: int, budget: int) -> int:
    """The width of `depth` equal hidden layers whose parameter count is closest to `budget`."""
    return min(range(1, budget + 1), key=lambda w: abs(mlp_params(in_features, [w] * depth) - budget))


def sweep_points(cfg: DictConfig) -> list[dict]:
    """(target, hidden widths, sweep name) of every fit: the width sweep, then the depth sweep per budget."""
    points = []
    for target in cfg.targets:
        in_features = cfg.data.input_dims[target]
        points += [{"target": target, "hidden": [w], "sweep": "width"} for w in cfg.widths]
        for budget in cfg.param_budgets:
            points += [{"target": target, "hidden": [width_for_budget(in_features, d, budget)] * d,
                        "sweep": "depth", "budget": budget} for d in cfg.depths]
    return points


# ---- Fitting with the framework's train step ----


def split_mse(exp: loop.Experiment, eval_step: Callable, state: Any, split: str) -> float:
    """Mean squared error over a whole split of the dataset ("train" grid or held-out "test" midpoints)."""
    return loop.evaluate(exp, eval_step, state, split=split)["loss"]


def fit(cfg: DictConfig, point: dict, run_dir: Path, curve_x: np.ndarray | None = None) -> dict:
    """Train one MLP on one target for trainer.steps; its record (and its predictions at `curve_x`, if given)."""
    point_cfg = OmegaConf.merge(cfg, {"data": {"target": point["target"]}, "model": {"hidden": point["hidden"]}})
    exp = loop.setup(point_cfg, run_dir)
    start = time.perf_counter()
    state = jax.jit(exp.init, out_shardings=exp.shardings)()
    train_step, eval_step = loop.make_train_step(exp), loop.make_eval_step(exp)
    tc = exp.cfg.trainer
    for step in range(tc.steps):
        state, _ = train_step(state, mesh_lib.global_batch(exp.dataset.train_batch(step, tc.batch_size, exp.shard),
                                                           exp.mesh))
    record = {"target": point["target"], "sweep": point["sweep"], "budget": point.get("budget"),
              "width": point["hidden"][0], "depth": len(point["hidden"]),
              "params": sum(x.size for x in jax.tree.leaves(state["params"])),
              "train_mse": split_mse(exp, eval_step, state, "train"),
              "test_mse": split_mse(exp, eval_step, state, "test"), "seconds": time.perf_counter() - start}
    if curve_x is not None:
        record["curve"] = np.asarray(loop.eval_model(exp, state)(curve_x))[:, 0].tolist()
    return record


def curve_points(dim: int, num: int = 400) -> np.ndarray:
    """Dense points over [-pi, pi] for plotting: the line in 1-D, the slice y = 0 in 2-D. (num, dim)"""
    x = np.zeros((num, dim), np.float32)
    x[:, 0] = np.linspace(-np.pi, np.pi, num)
    return x


# ---- Report ----


def plot(records: list[dict], cfg: DictConfig, path: Path) -> None:
    """Per target: held-out MSE against parameters (log-log, one line per depth); the extreme widths' fits."""
    targets = list(cfg.targets)
    fig, axes = plt.subplots(len(targets), 2, figsize=(11, 3.6 * len(targets)), squeeze=False)
    for row, target in zip(axes, targets):
        mine = [r for r in records if r["target"] == target]
        for depth in sorted({r["depth"] for r in mine}):
            line = sorted((r["params"], r["test_mse"]) for r in mine if r["depth"] == depth)
            row[0].loglog(*zip(*line), "o-", label=f"{depth} hidden layer{'s' if depth > 1 else ''}")
        row[0].set(xlabel="parameters", ylabel="held-out MSE", title=f"{target}: error against size")
        row[0].grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
        curves = sorted((r for r in mine if "curve" in r), key=lambda r: r["width"])
        dim, fn = TARGETS[target]
        x = curve_points(dim)
        row[1].plot(x[:, 0], fn(x.astype(np.float64)), "k-", lw=3, alpha=0.3, label="target")
        for r in curves:
            row[1].plot(x[:, 0], r["curve"], label=f"width {r['width']} (test MSE {r['test_mse']:.2g})")
        row[1].set(xlabel="x", title=f"{target}: one hidden layer" + (", slice y = 0" if dim == 2 else ""))
        row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(records: list[dict]) -> str:
    """One line per fit: target, sweep, depth x width, parameters, train and held-out MSE."""
    lines = [f"{'target':<9} {'sweep':<6} {'depth':>5} {'width':>5} {'params':>7} {'train MSE':>10} {'test MSE':>10}"]
    for r in records:
        lines.append(f"{r['target']:<9} {r['sweep']:<6} {r['depth']:>5} {r['width']:>5} {r['params']:>7} "
                     f"{r['train_mse']:>10.2e} {r['test_mse']:>10.2e}")
    return "\n".join(lines)


def run_uat(cfg: DictConfig, out_dir: Path) -> list[dict]:
    """Fit every sweep point; write uat.json and uat.png to `out_dir`; return the records."""
    records = []
    extremes = {min(cfg.widths), max(cfg.widths)} if cfg.widths else set()
    for point in sweep_points(cfg):
        curve = point["sweep"] == "width" and point["hidden"][0] in extremes  # drawn over the target in uat.png
        records.append(fit(cfg, point, out_dir, curve_points(cfg.data.input_dims[point["target"]]) if curve else None))
        print(format_table(records[-1:]).splitlines()[1], f"({records[-1]['seconds']:.1f} s)", flush=True)
    plot(records, cfg, out_dir / "uat.png")
    (out_dir / "uat.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "curve"} for r in records],
                                                 indent=1) + "\n")
    return records


@hydra.main(version_base="1.3", config_path="../conf", config_name="uat")
def main(cfg: DictConfig) -> None:
    """Run the sweeps of conf/uat.yaml; print the table and where the outputs are."""
    runtime.apply(**cfg.runtime)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    start = time.perf_counter()
    records = run_uat(cfg, out_dir)
    print(format_table(records))
    print(f"{len(records)} fits in {time.perf_counter() - start:.0f} s; wrote {out_dir / 'uat.json'} and "
          f"{out_dir / 'uat.png'}")


if __name__ == "__main__":
    check_group_choices(sys.argv[1:])
    main()
