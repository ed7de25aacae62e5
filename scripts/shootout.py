"""The architecture shoot-out: every family of an arena trained at one budget, family x seed, in one command.

    python scripts/shootout.py                              # arena=images preset=quick (conf/shootout.yaml)
    python scripts/shootout.py arena=language               # then arena=inference reads its trained models
    python scripts/shootout.py budget.kind=seconds budget.value=60 'families=[mlp,lenet]' 'seeds=[0,1,2]'

For each family the script compiles its real train step once (`train.loop.setup` + `make_train_step`): parameters,
FLOPs per step (XLA's cost analysis, scans counted in full: train/flops.py) and, for a seconds budget, its speed.
The budget buys each family its steps: `steps` as given, `flops` floor(value / FLOPs per step), `seconds` the
steps it runs in that time (trainer.max_seconds stops it there). Then two phases, each one Hydra multirun of
`python -m train -m +cell=...` over cell configs written to <out>/conf/cell/ (generated presets, as
conf/experiment/ holds hand-written ones): the learning-rate sweep (every rate of arena.lr_sweep.lrs, seed
seeds[0], at lr_sweep.fraction of the budget; runs in <out>/lr_sweep/) and the shoot-out (every family x seed at
the budget with its family's winning rate; runs in <out>/runs/). A cell whose final_metrics.json exists is
finished and skipped, so re-running the same command resumes. Writes plan.json, results.json, table.md and
<arena>.png to the output directory (outputs/shootout/<arena>-<preset>/<overrides>/).
"""

import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import matplotlib
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.sweep_summary import load_runs, maximized, rank  # noqa: E402
from train import runtime  # noqa: E402
from train.config import check_group_choices, group_options  # noqa: E402
from train.writers import read_metrics, train_minutes  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUDGET_KINDS = ("steps", "flops", "seconds")


# ---- Checks (before anything compiles) ------------------------------------------------------------------


def check(cfg: DictConfig) -> None:
    """One-line errors for a budget, a family or a seed list that cannot work."""
    if cfg.arena.name == "inference":
        return
    if cfg.budget.kind not in BUDGET_KINDS:
        raise ValueError(f"budget.kind={cfg.budget.kind} is not known (valid: {', '.join(BUDGET_KINDS)})")
    if not isinstance(cfg.budget.value, (int, float)) or cfg.budget.value <= 0:
        raise ValueError(f"budget.value={cfg.budget.value} must be a positive number ({cfg.budget.kind})")
    if not cfg.seeds:
        raise ValueError("seeds=[] names no seed (valid: a list of integers, e.g. [0,1,2])")
    if not cfg.arena.lr_sweep.lrs:
        raise ValueError("arena.lr_sweep.lrs=[] names no learning rate (one rate: no sweep)")
    known = list(cfg.arena.families)
    for name in cfg.families or []:
        if name not in known:
            raise ValueError(f"families: {name} is not a family of arena={cfg.arena.name} (valid: {', '.join(known)})")
    for name, fam in cfg.arena.families.items():
        if fam.model not in group_options("model"):
            raise ValueError(f"arena.families.{name}.model={fam.model} is not a config option "
                             f"(valid: {', '.join(group_options('model'))})")
        if fam.get("lr_from") is not None and fam.lr_from not in known:
            raise ValueError(f"arena.families.{name}.lr_from={fam.lr_from} is not a family (valid: {', '.join(known)})")
    maximized(cfg.arena.metric)


def families(cfg: DictConfig) -> dict[str, DictConfig]:
    """The arena's families this run trains (`families=[...]` picks some), and those they take a rate from."""
    chosen = set(cfg.families or cfg.arena.families)
    chosen |= {cfg.arena.families[n].lr_from for n in chosen if cfg.arena.families[n].get("lr_from")}
    return {n: f for n, f in cfg.arena.families.items() if n in chosen}


# ---- Cells: generated configs of `python -m train` ------------------------------------------------------


def lr_tag(lr: float) -> str:
    """A learning rate as a config name can hold it: 0.003 -> 0p003."""
    return f"{lr:g}".replace(".", "p").replace("-", "m")


def cell_config(cfg: DictConfig, family: DictConfig, *, seed: int, lr: float, steps: int,
                fraction: float = 1.0) -> dict:
    """The `+cell=NAME` preset of one run: the family's model, the arena's settings, this rate, seed and steps
    (and for a seconds budget its time limit, `fraction` of the budget)."""
    log_every = max(1, math.ceil(steps / 50))
    eval_every = log_every * math.ceil(math.ceil(steps / cfg.evals) / log_every)
    body = OmegaConf.merge(OmegaConf.to_container(cfg.arena.cell), OmegaConf.to_container(family.config))
    run = {"data": OmegaConf.to_container(cfg.data),
           "optim": {"lr": lr, "warmup_steps": int(cfg.warmup_fraction * steps)},
           "trainer": {"steps": steps, "seed": seed, "eval_every": eval_every, "log_every": log_every,
                       "nan_policy": "skip",  # a diverging rate is a result of the sweep, not a crash of it
                       "max_seconds": cfg.budget.value * fraction if cfg.budget.kind == "seconds" else None},
           "checkpoint": {"every": eval_every}}
    body = OmegaConf.to_container(OmegaConf.merge(body, run))
    choices = HydraConfig.get().runtime.choices
    return {"defaults": [{"override /model": family.model}, {"override /data": choices["data"]}], **body}


def write_cell(out: Path, name: str, config: dict) -> None:
    path = out / "conf" / "cell" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n# written by scripts/shootout.py\n" + OmegaConf.to_yaml(config))


def quoted(value: str) -> str:
    """A path as one Hydra override value (output directories hold '=' and ',')."""
    if "'" in value:
        raise ValueError(f"output directory {value} holds a quote (valid: a path without quotes)")
    return f"'{value}'"


def cell_overrides(out: Path, names: list[str]) -> list[str]:
    return [f"hydra.searchpath=[{quoted('file://' + str(out / 'conf'))}]", "+cell=" + ",".join(names)]


def compose_cell(out: Path, name: str, train: list[str]) -> DictConfig:
    """The config `python -m train +cell=NAME` composes (the measurement compiles exactly that program)."""
    return hydra.compose(config_name="config", overrides=[*cell_overrides(out, [name]), *train])


def finished(run_dir: Path) -> bool:
    return (run_dir / "final_metrics.json").exists()


def run_cells(cfg: DictConfig, out: Path, phase: str, names: list[str]) -> None:
    """Train the unfinished cells of a phase as one `python -m train -m` multirun into <out>/<phase>/<cell>."""
    pending = [n for n in names if not finished(out / phase / n)]
    done = [n for n in names if n not in pending]
    if done:
        print(f"{phase}: skipping {len(done)} finished cells: {', '.join(done)}", flush=True)
    if not pending:
        return
    cmd = [sys.executable, "-m", "train", "-m", *cell_overrides(out, pending),
           f"hydra.sweep.dir={quoted(str(out / phase))}", "hydra.sweep.subdir=${hydra:runtime.choices.cell}",
           *cfg.train, *cfg.launch]
    print(f"{phase}: training {len(pending)} cells: {', '.join(pending)}", flush=True)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(cmd, env=env, check=False)
    failed = [n for n in pending if not finished(out / phase / n)]
    if failed:
        raise RuntimeError(f"{phase}: cells {', '.join(failed)} did not finish (their logs: {out / phase}/<cell>/); "
                           f"re-run the same command to resume them")


# ---- Plan: what each family's step costs, and the steps the budget buys ---------------------------------


def measure(train_cfg: DictConfig, speed: bool) -> dict:
    """Parameters, FLOPs per step and items per step of the compiled train step; with `speed`, its steps/s."""
    import jax

    from train import loop
    from train import mesh as mesh_lib
    from train.flops import compiled_flops

    with tempfile.TemporaryDirectory() as run_dir:
        exp = loop.setup(train_cfg, run_dir)
        step = loop.make_train_step(exp)
        tc = exp.cfg.trainer
        batch = mesh_lib.global_batch(exp.dataset.train_batch(0, tc.batch_size, exp.shard), exp.mesh)
        compiled = step.lower(exp.abstract_state, batch).compile()
        result = {"params": sum(x.size for x in jax.tree.leaves(exp.abstract_state["params"])),
                  "flops_per_step": compiled_flops(step, exp.abstract_state, batch, compiled=compiled),
                  "examples_per_step": tc.batch_size,
                  "tokens_per_step": tc.batch_size * exp.cfg.data.seq_len if exp.task == "next_token" else None}
        if speed:  # a few steps after a warm-up one, until 2 s have passed
            state = jax.jit(exp.init, out_shardings=exp.shardings)()
            state, _ = compiled(state, batch)
            jax.block_until_ready(state)
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < 2.0:
                state, _ = compiled(state, batch)
                jax.block_until_ready(state)
                n += 1
            result["steps_per_sec"] = n / (time.perf_counter() - t0)
        exp.checkpoints.close()
    return result


def budget_steps(cfg: DictConfig, name: str, m: dict, fraction: float = 1.0) -> int:
    """The steps `fraction` of the budget buys family `name`; a one-line error when it buys none."""
    value = cfg.budget.value * fraction
    steps = {"steps": lambda: int(value), "flops": lambda: math.floor(value / m["flops_per_step"]),
             "seconds": lambda: math.floor(value * m["steps_per_sec"])}[cfg.budget.kind]()
    if steps < 1:
        cost = {"steps": lambda: "1 step", "flops": lambda: f"{m['flops_per_step']:.3g} FLOPs",
                "seconds": lambda: f"{1 / m['steps_per_sec']:.3g} s"}[cfg.budget.kind]()
        phase = f", x {fraction:g} in the learning-rate sweep" if fraction != 1.0 else ""
        raise ValueError(f"budget.value={cfg.budget.value:g} ({cfg.budget.kind}{phase}) buys no step of {name}, "
                         f"whose step costs {cost}; raise budget.value")
    return steps


def plan_config(cfg: DictConfig) -> dict:
    """What the plan depends on: the shoot-out config less how its multirun is launched."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("launch")
    return config


def make_plan(cfg: DictConfig, out: Path) -> dict:
    """Each family's measured step (plan.json; reused by a re-run of the same shoot-out, never re-measured)."""
    path, config = out / "plan.json", plan_config(cfg)
    plan = json.loads(path.read_text()) if path.exists() else None
    if plan is not None:
        if plan["config"] != config:
            changed = [k for k in sorted(set(flat(plan["config"])) | set(flat(config)))
                       if flat(plan["config"]).get(k) != flat(config).get(k)]
            raise ValueError(f"{path} was planned for another shoot-out config ({', '.join(changed[:4])} differ); "
                             f"use another hydra.run.dir")
        return plan
    plan = {"config": config, "families": {}}
    for name, fam in families(cfg).items():
        probe = f"probe-{name}"
        write_cell(out, probe, cell_config(cfg, fam, seed=cfg.seeds[0], lr=cfg.arena.lr_sweep.lrs[0], steps=1))
        plan["families"][name] = measure(compose_cell(out, probe, list(cfg.train)), cfg.budget.kind == "seconds")
        (out / "conf" / "cell" / f"{probe}.yaml").unlink()
        m = plan["families"][name]
        print(f"{name}: {m['params']:,} parameters, {m['flops_per_step']:.4g} FLOPs per step"
              + (f", {m['steps_per_sec']:.3g} steps/s" if "steps_per_sec" in m else ""), flush=True)
    path.write_text(json.dumps(plan, indent=1))
    return plan


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


# ---- Phases --------------------------------------------------------------------------------------------


def lr_sweep(cfg: DictConfig, out: Path, plan: dict) -> dict[str, dict]:
    """Every rate of the grid for every family without lr_from, at the sweep's fraction of the budget; the winner."""
    lrs, fams = list(cfg.arena.lr_sweep.lrs), families(cfg)
    swept = [n for n, f in fams.items() if not f.get("lr_from")]
    if len(lrs) == 1:
        return {n: {"lr": lrs[0], "swept": {}} for n in fams}
    cells = {}
    for name in swept:
        steps = budget_steps(cfg, name, plan["families"][name], cfg.lr_sweep.fraction)
        for lr in lrs:
            cells[f"{name}-lr{lr_tag(lr)}"] = (name, lr)
            config = cell_config(cfg, fams[name], seed=cfg.seeds[0], lr=lr, steps=steps, fraction=cfg.lr_sweep.fraction)
            write_cell(out, f"{name}-lr{lr_tag(lr)}", config)
    run_cells(cfg, out, "lr_sweep", list(cells))
    maximize = maximized(cfg.arena.metric)
    runs = [r for r in load_runs(out / "lr_sweep", cfg.arena.metric) if r["dir"] in cells]
    winners = {}
    for name in swept:
        ranked = rank([r for r in runs if cells[r["dir"]][0] == name], maximize)
        winners[name] = {"lr": cells[ranked[0]["dir"]][1],
                         "swept": {str(cells[r["dir"]][1]): r["value"] for r in ranked}}
    for name, fam in fams.items():
        if fam.get("lr_from"):
            winners[name] = {"lr": winners[fam.lr_from]["lr"], "swept": {}, "from": fam.lr_from}
    return winners


def shootout(cfg: DictConfig, out: Path, plan: dict, lrs: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """Every chosen family x seed at the whole budget with its winning rate; cell name -> (family, seed)."""
    fams = families(cfg)
    chosen = list(cfg.families or fams)
    cells = {}
    for name in chosen:
        steps = budget_steps(cfg, name, plan["families"][name])
        for seed in cfg.seeds:
            cells[f"{name}-s{seed}"] = (name, seed)
            write_cell(out, f"{name}-s{seed}", cell_config(cfg, fams[name], seed=seed, lr=lrs[name]["lr"], steps=steps))
    run_cells(cfg, out, "runs", list(cells))
    return cells


# ---- Results --------------------------------------------------------------------------------------------


def curve(records: list[dict], metric: str, m: dict) -> list[dict]:
    """The metric at every evaluation, with the tokens (or examples), FLOPs and train seconds spent to reach it."""
    seconds, t, prev = {}, 0.0, 0
    for r in records:
        if "train/steps_per_sec" in r:
            t += (r["step"] - prev) / r["train/steps_per_sec"]
            prev, seconds[r["step"]] = r["step"], t
    items = m["tokens_per_step"] or m["examples_per_step"]
    return [{"step": r["step"], "items": r["step"] * items, "flops": r["step"] * m["flops_per_step"],
             "seconds": seconds.get(r["step"]), "value": r[metric]} for r in records if metric in r]


def collect(cfg: DictConfig, out: Path, plan: dict, lrs: dict, cells: dict) -> list[dict]:
    """One row per cell: the required fields, the learning rate it took, and its evaluation curve."""
    rows, metric = [], cfg.arena.metric
    for cell, (name, seed) in cells.items():
        run, m, fam = out / "runs" / cell, plan["families"][name], cfg.arena.families[name]
        final = json.loads((run / "final_metrics.json").read_text())
        records = read_metrics(run / "metrics.jsonl")
        steps = max(r["step"] for r in records)
        rows.append({"arena": cfg.arena.name, "model": name, "family": fam.model, "size": fam.get("size"),
                     "seed": seed, "lr": lrs[name]["lr"], "params": m["params"], "steps": steps,
                     "flops_per_step": m["flops_per_step"], "train_flops": steps * m["flops_per_step"],
                     "train_seconds": train_minutes(records) * 60, metric: final[metric],
                     "tokens" if m["tokens_per_step"] else "examples": steps * (m["tokens_per_step"]
                                                                                or m["examples_per_step"]),
                     "skipped_steps": sum(r.get("train/skipped_steps", 0) for r in records),
                     "baseline": final.get("eval/unigram_loss", math.nan) / math.log(2) if m["tokens_per_step"]
                     else None,
                     "run_dir": str(run), "curve": curve(records, metric, m)})
    return rows


def summary(rows: list[dict], metric: str) -> list[dict]:
    """Per model: mean and standard deviation of the metric over seeds, and its mean costs; best first."""
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    out = []
    for name, rs in by_model.items():
        values = [r[metric] for r in rs]
        out.append({"model": name, "size": rs[0]["size"], "params": rs[0]["params"], "lr": rs[0]["lr"],
                    "steps": rs[0]["steps"], "seeds": len(rs), "value": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    **{k: statistics.fmean(r[k] for r in rs) for k in ("train_flops", "train_seconds")},
                    **({"tokens": rs[0]["tokens"]} if "tokens" in rs[0] else {"examples": rs[0]["examples"]})})
    return rank(out, maximized(metric))


def fmt_metric(metric: str, value: float, std: float | None = None) -> str:
    pct = "accuracy" in metric
    scale, digits = (100, 1) if pct else (1, 3)
    text = f"{value * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if std is not None else "")
    return text + ("%" if pct else "")


def header(cfg: DictConfig, extra: str = "") -> list[str]:
    """Title, date, machine and command of a table."""
    import jax

    command = " ".join(["python scripts/shootout.py", *map(shlex.quote, HydraConfig.get().overrides.task)])
    device = jax.devices()[0]
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores" if device.platform == "cpu"
               else f"{device.device_kind} x {jax.device_count()}")
    return [f"# Shoot-out: {cfg.arena.name}, preset {HydraConfig.get().runtime.choices.preset}", "",
            f"{time.strftime('%Y-%m-%d')}, {machine}, jax {jax.__version__}: `{command}`{extra}", ""]


def table(cfg: DictConfig, rows: list[dict], lrs: dict) -> str:
    metric = cfg.arena.metric
    budget = f"{cfg.budget.value:g} {cfg.budget.kind}" if cfg.budget.kind != "steps" else f"{cfg.budget.value} steps"
    seen = "tokens" if "tokens" in rows[0] else "examples"
    lines = header(cfg, f"; budget {budget} per cell, seeds {list(cfg.seeds)}")
    lines += [f"| rank | model | params | lr | steps | {seen} | train FLOPs | train s | {metric} |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, s in enumerate(summary(rows, metric)):
        lines.append(f"| {i + 1} | {s['model']} | {s['params']:,} | {s['lr']:g} | {s['steps']:,} | {s[seen]:,} | "
                     f"{s['train_flops']:.3g} | {s['train_seconds']:.0f} | "
                     f"{fmt_metric(metric, s['value'], s['std'] if s['seeds'] > 1 else None)} |")
    n = len(cfg.seeds)
    lines += ["", f"{metric}: {'mean ± std over ' + str(n) + ' seeds' if n > 1 else 'one seed'}, ranked best first; "
              f"train s from the logged step rates (compile and evaluation excluded)."]
    swept = {name: w for name, w in lrs.items() if w["swept"]}
    if swept:
        grid = list(cfg.arena.lr_sweep.lrs)
        lines += ["", f"Learning rate (AdamW peak) by sweep, seed {cfg.seeds[0]}, {cfg.lr_sweep.fraction:g} of the "
                  f"budget; {metric} per rate, the winner in bold:", "",
                  "| model | " + " | ".join(f"{lr:g}" for lr in grid) + " |", "|---" * (len(grid) + 1) + "|"]
        for name, w in swept.items():
            cells = [fmt_metric(metric, w["swept"][str(lr)]) for lr in grid]
            cells = [f"**{c}**" if lr == w["lr"] else c for c, lr in zip(cells, grid)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        taken = [f"{n} takes {w['from']}'s" for n, w in lrs.items() if w.get("from")]
        if taken:
            lines.append("\n" + "; ".join(taken) + ".")
    return "\n".join(lines) + "\n"


def pareto(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats at lower or equal cost, cheapest first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1] if maximize else points[i][1]))
    front, best = [], -math.inf
    for i in order:
        value = points[i][1] if maximize else -points[i][1]
        if value > best:
            front.append(i)
            best = value
    return front


def plot_images(cfg: DictConfig, rows: list[dict], path: Path) -> None:
    """The metric (mean +- std over seeds) against parameters, training FLOPs and wall time; Pareto front marked."""
    metric, maximize = cfg.arena.metric, maximized(cfg.arena.metric)
    stats = summary(rows, metric)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, [("params", "parameters"), ("train_flops", "training FLOPs"),
                                      ("train_seconds", "training wall time (s)")]):
        points = [(s[key], s["value"]) for s in stats]
        for s, (x, y) in zip(stats, points):
            ax.errorbar(x, y, yerr=s["std"], fmt="o", capsize=3)
            ax.annotate(s["model"], (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        front = [points[i] for i in pareto(points, maximize)]
        ax.plot(*zip(*front), "--", color="gray", drawstyle="steps-post", label="Pareto front", zorder=0)
        ax.scatter(*zip(*front), s=160, facecolors="none", edgecolors="gray")
        xs = [x for x, _ in points]
        ax.set(xscale="log" if max(xs) >= 10 * min(xs) else "linear", xlabel=label, ylabel=metric)
    save_figure(fig, axes, path, f"{cfg.arena.name}: {cfg.budget.value:g} {cfg.budget.kind} per run")


def plot_language(cfg: DictConfig, rows: list[dict], path: Path) -> None:
    """Validation bits per byte against tokens seen, training FLOPs and wall time: one line per run."""
    metric = cfg.arena.metric
    colors = {f: f"C{i}" for i, f in enumerate(dict.fromkeys(r["family"] for r in rows))}
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label) in zip(axes, [("items", "tokens seen"), ("flops", "training FLOPs"),
                                      ("seconds", "training wall time (s)")]):
        labelled = set()
        for r in rows:
            points = [(p[key], p["value"]) for p in r["curve"] if p[key]]
            if not points:
                continue
            ax.plot(*zip(*points), marker="o", markersize=3, color=colors[r["family"]],
                    linestyle=["-", "--", ":"][sizes.index(r["size"]) % 3],
                    label=None if r["model"] in labelled else r["model"])
            labelled.add(r["model"])
        baseline = rows[0].get("baseline")
        if baseline:
            ax.axhline(baseline, color="gray", linewidth=1, linestyle=":", label="unigram")
        ax.set(xscale="log", xlabel=label, ylabel="validation bits per byte" if "bits" in metric else metric)
    save_figure(fig, axes, path, f"{cfg.arena.name}: {cfg.budget.value:g} {cfg.budget.kind} per run")


def save_figure(fig, axes, path: Path, title: str | None = None) -> None:
    """Grid and legend on every panel, the title over them, written to `path` and closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- Inference: the trained language models generating at long contexts --------------------------------


def generation(run_dir: Path, context: int, new_tokens: int, batch_size: int, repeats: int) -> dict:
    """Prefill seconds, decode tokens/s, cache (or state) bytes and XLA's peak bytes of greedy generation.

    The two calls that `generate` makes, compiled and timed apart: one parallel pass over the prompt that fills the
    KV cache (GPT) or returns the recurrent state (Mamba), then `new_tokens` steps of one token each in a lax.scan.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models.gpt import GPT
    from scripts.scan_benchmark import time_compiled
    from train import loop, pretrained

    run_cfg, model = pretrained.load_model(run_dir)
    gpt = isinstance(model, GPT)
    if gpt:
        model = longer_positions(model, run_cfg, context + new_tokens)
    stream = loop.build(run_cfg.data).val
    prompt = np.resize(stream, context)[None].repeat(batch_size, 0).astype(np.int32)  # (B, context)
    graphdef, state = nnx.split(model)

    def prefill(state, prompt):  # (B, context) -> last logits (B, V), cache
        m = nnx.merge(graphdef, state)
        if gpt:
            logits, cache = m(prompt, m.init_cache(batch_size, context + new_tokens))
            return logits[:, -1], cache
        return m.prefill(prompt)

    def decode(state, logits, cache):  # new_tokens greedy tokens (new_tokens, B)
        m = nnx.merge(graphdef, state)

        def step(carry, _):
            logits, cache = carry
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            if gpt:
                logits, cache = m(token[:, None], cache)
                return (logits[:, -1], cache), token
            return m.step(token, cache), token

        return jax.lax.scan(step, (logits, cache), None, length=new_tokens)[1]

    prefill_s, prefill_peak, (logits, cache) = time_compiled(prefill, (state, prompt), repeats)
    decode_s, decode_peak, _ = time_compiled(decode, (state, logits, cache), repeats)
    return {"prefill_seconds": prefill_s, "decode_tokens_per_sec": batch_size * new_tokens / decode_s,
            "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
            "prefill_peak_bytes": prefill_peak, "decode_peak_bytes": decode_peak}


def longer_positions(model, run_cfg: DictConfig, max_len: int):
    """The GPT with its trained weights and a position table of `max_len` rows (those past training stay at init)."""
    from flax import nnx

    from train import loop

    if max_len <= model.max_len:
        return model
    cfg = OmegaConf.merge(run_cfg, {"model": {"max_len": max_len}})
    longer = loop.build(cfg.model, rngs=nnx.Rngs(params=0, dropout=1))
    table = longer.pos_embed.embedding.get_value().at[: model.max_len].set(model.pos_embed.embedding.get_value())
    nnx.update(longer, nnx.state(model, nnx.Param))
    longer.pos_embed.embedding.set_value(table)
    longer.eval()
    return longer


def inference(cfg: DictConfig, out: Path) -> None:
    """arena=inference: every (model, context) measured once; rows kept in inference.jsonl, so a re-run resumes."""
    source, a = Path(cfg.arena.source), cfg.arena
    results = source / "results.json"
    if not results.exists():
        raise ValueError(f"arena.source={source} holds no language shoot-out (no results.json): run "
                         f"python scripts/shootout.py arena=language first, or set arena.source=DIR")
    language = json.loads(results.read_text())["rows"]
    trained = {r["model"]: r for r in language if r["seed"] == min(x["seed"] for x in language)}
    missing = [m for m in a.models if m not in trained]
    if missing:
        raise ValueError(f"arena.models: {', '.join(missing)} not trained in {source} (valid: {', '.join(trained)})")
    rows_file = out / "inference.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    done = {(r["model"], r["context"]) for r in rows}
    for name in a.models:
        for context in a.contexts:
            if (name, context) in done:
                print(f"skipping finished {name} at context {context}", flush=True)
                continue
            t = trained[name]
            row = {"arena": "inference", "model": name, "family": t["family"], "size": t["size"], "seed": t["seed"],
                   "params": t["params"], "train_flops": t["train_flops"], "train_seconds": t["train_seconds"],
                   "context": context, "new_tokens": a.new_tokens, "batch_size": a.batch_size,
                   **generation(Path(t["run_dir"]), context, a.new_tokens, a.batch_size, a.repeats)}
            print(f"{name} at {context}: {row['decode_tokens_per_sec']:.1f} tokens/s, cache "
                  f"{row['cache_bytes'] / 2**20:.2f} MiB", flush=True)
            rows.append(row)
            with open(rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [r for r in rows if r["model"] in a.models and r["context"] in a.contexts]
    (out / "results.json").write_text(json.dumps({"arena": "inference", "source": str(source),
                                                  "metric": "decode_tokens_per_sec", "rows": rows}, indent=1))
    lines = header(cfg, f"; greedy decoding of {a.new_tokens} tokens after the prompt, batch {a.batch_size}, "
                        f"median of {a.repeats}; models from {source}")
    lines += ["| model | params | context | prefill s | decode tokens/s | cache or state MiB | XLA peak MiB, "
              "prefill / decode |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["context"])):
        lines.append(f"| {r['model']} | {r['params']:,} | {r['context']:,} | {r['prefill_seconds']:.2f} | "
                     f"{r['decode_tokens_per_sec']:.0f} | {r['cache_bytes'] / 2**20:.2f} | "
                     f"{r['prefill_peak_bytes'] / 2**20:.0f} / {r['decode_peak_bytes'] / 2**20:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, name in enumerate(a.models):
        rs = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        xs = [r["context"] for r in rs]
        axes[0].plot(xs, [r["decode_tokens_per_sec"] for r in rs], marker="o", color=f"C{i}", label=name)
        axes[1].plot(xs, [r["cache_bytes"] for r in rs], marker="o", color=f"C{i}", label=f"{name}: cache / state")
        axes[1].plot(xs, [r["prefill_peak_bytes"] for r in rs], marker="s", linestyle=":", color=f"C{i}",
                     label=f"{name}: XLA peak, prefill")
        axes[1].plot(xs, [r["decode_peak_bytes"] for r in rs], marker="^", linestyle="--", color=f"C{i}",
                     label=f"{name}: XLA peak, decode")
    axes[0].set(xscale="log", xlabel="context (prompt bytes)", ylabel="decode tokens/s")
    axes[1].set(xscale="log", yscale="log", xlabel="context (prompt bytes)", ylabel="bytes")
    for ax in axes:
        ax.set_xscale("log", base=2)
    save_figure(fig, axes, out / "inference.png")
    print("\n".join(lines), flush=True)


# ---- Main -----------------------------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path="../conf", config_name="shootout")
def main(cfg: DictConfig) -> None:
    """Plan, sweep, train and summarise one arena; or, for arena=inference, measure generation."""
    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        check(cfg)
        runtime.apply(**hydra.compose(config_name="config").runtime)  # as python -m train, before JAX starts
        if cfg.arena.name == "inference":
            inference(cfg, out)
            return
        plan = make_plan(cfg, out)
        for name, fam in families(cfg).items():  # every phase's steps, before anything trains
            swept = len(cfg.arena.lr_sweep.lrs) > 1 and not fam.get("lr_from")
            budget_steps(cfg, name, plan["families"][name], cfg.lr_sweep.fraction if swept else 1.0)
        lrs = lr_sweep(cfg, out, plan)
        cells = shootout(cfg, out, plan, lrs)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    rows = collect(cfg, out, plan, lrs, cells)
    (out / "results.json").write_text(json.dumps(
        {"arena": cfg.arena.name, "preset": HydraConfig.get().runtime.choices.preset,
         "budget": OmegaConf.to_container(cfg.budget), "metric": cfg.arena.metric,
         "maximize": maximized(cfg.arena.metric), "date": time.strftime("%Y-%m-%d"),
         "lr_sweep": lrs, "summary": summary(rows, cfg.arena.metric), "rows": rows}, indent=1))
    text = table(cfg, rows, lrs)
    (out / "table.md").write_text(text)
    (plot_language if rows[0].get("tokens") else plot_images)(cfg, rows, out / f"{cfg.arena.name}.png")
    print(text, flush=True)
    print(f"wrote {out}/results.json, table.md, {cfg.arena.name}.png", flush=True)


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"error: {e}")
    main()
