"""Selective Copying, Mamba + S6 vs Mamba + S4 (Gu & Dao 2023, Table 1): train both, table and plot beside the paper.

    .venv/bin/python scripts/selective_copy.py                      # the quick pair, +experiment=selective_copy_s6/s4
    .venv/bin/python scripts/selective_copy.py trainer.steps=500    # extra overrides go to both runs

Each run goes through the framework (train.loop.run on the composed config) into outputs/selective_copy/{s6,s4}.
A finished run is resumed, not retrained, so the two trainings can run in parallel first, one core each:
    taskset -c 0 .venv/bin/python -m train +experiment=selective_copy_s6 hydra.run.dir=outputs/selective_copy/s6
    taskset -c 1 .venv/bin/python -m train +experiment=selective_copy_s4 hydra.run.dir=outputs/selective_copy/s4
The table (selective_copy.md, .json) and the accuracy curves (selective_copy.png) land in outputs/selective_copy.
"""

import json
import logging
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train import runtime  # noqa: E402
from train.config import compose  # noqa: E402
from train.writers import read_metrics, train_minutes  # noqa: E402

PAPER = {"s6": 99.8, "s4": 56.4}  # Table 1, Mamba architecture, token accuracy (%)
OUT = Path("outputs/selective_copy")


def main(overrides: list[str]) -> None:
    runtime.apply(**compose(overrides).runtime)  # as python -m train
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")  # the run's log lines, as Hydra's
    from train.loop import run  # after the runtime settings: they must precede JAX's start-up (2x faster here)

    rows, curves = [], {}
    for layer in PAPER:
        run_dir = OUT / layer
        cfg = compose([f"+experiment=selective_copy_{layer}", f"hydra.run.dir={run_dir}", *overrides])
        final = run(cfg, run_dir)
        records = read_metrics(run_dir / "metrics.jsonl")
        minutes = train_minutes(records)
        curves[layer] = [(r["step"], r["eval/accuracy"]) for r in records if "eval/accuracy" in r]
        rows.append({"layer": layer.upper(), "selective": cfg.model.selective, "length": cfg.data.length,
                     "num_tokens": cfg.data.num_tokens, "steps": cfg.trainer.steps,
                     "accuracy": 100 * final["eval/accuracy"], "paper_accuracy": PAPER[layer], "minutes": minutes})
        print(f"Mamba + {layer.upper()}: {100 * final['eval/accuracy']:.1f}% trained in {minutes:.1f} min", flush=True)

    table = ["| model | L | M | steps | accuracy (%) | paper (L 4096, M 16) | minutes |", "|---" * 7 + "|"]
    table += [f"| Mamba + {r['layer']} | {r['length']} | {r['num_tokens']} | {r['steps']} | {r['accuracy']:.1f} | "
              f"{r['paper_accuracy']} | {r['minutes']:.1f} |" for r in rows]
    (OUT / "selective_copy.md").write_text("\n".join(table) + "\n")
    (OUT / "selective_copy.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, points in curves.items():
        steps, acc = zip(*points)
        line, = ax.plot(steps, [100 * a for a in acc], marker="o", label=f"Mamba + {layer.upper()}")
        ax.axhline(PAPER[layer], color=line.get_color(), linestyle="--", linewidth=1,
                   label=f"paper, Mamba + {layer.upper()} ({PAPER[layer]}%)")
    ax.set(xlabel="step", ylabel="token accuracy (%)", title="Selective Copying", ylim=(0, 105))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "selective_copy.png", dpi=120)
    print("\n".join(table))
    print(f"wrote {OUT}/selective_copy.md, selective_copy.json, selective_copy.png")


if __name__ == "__main__":
    main(sys.argv[1:])
