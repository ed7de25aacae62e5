"""Induction Heads length extrapolation (Gu & Dao 2023, Table 2): Mamba vs GPT trained at 256, tested at 2^6 .. 2^16.

    .venv/bin/python scripts/induction_heads.py                    # +experiment=induction_heads_mamba and _gpt
    .venv/bin/python scripts/induction_heads.py trainer.steps=500  # extra overrides go to both runs

Both models train through the framework (train.loop.run) into outputs/induction_heads/{mamba,gpt}; after training,
the dataset evaluates each at the lengths its experiment lists (GPT stops at 2^12: attention memory grows as L^2).
A finished run is resumed, not retrained, so the two trainings can run in parallel first, one core each:
    taskset -c 0 .venv/bin/python -m train +experiment=induction_heads_mamba hydra.run.dir=outputs/induction_heads/mamba
    taskset -c 1 .venv/bin/python -m train +experiment=induction_heads_gpt hydra.run.dir=outputs/induction_heads/gpt
Writes induction_heads.md / .json and the accuracy-vs-length plot induction_heads.png to outputs/induction_heads.
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

OUT = Path("outputs/induction_heads")
TRAIN_LENGTH = 256
PAPER = "Mamba: 100% at every length 2^6 .. 2^20; MHA-Abs: 100% at 256, fails beyond it"


def main(overrides: list[str]) -> None:
    runtime.apply(**compose(overrides).runtime)  # as python -m train
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")  # the run's log lines, as Hydra's
    from train.loop import run  # after the runtime settings: they must precede JAX's start-up

    results = {}
    for name in ("mamba", "gpt"):
        run_dir = OUT / name
        cfg = compose([f"+experiment=induction_heads_{name}", f"hydra.run.dir={run_dir}", *overrides])
        final = run(cfg, run_dir)
        accuracy = {int(k.rsplit("_", 1)[1]): v for k, v in final.items() if k.startswith("eval/accuracy_at_")}
        minutes = train_minutes(read_metrics(run_dir / "metrics.jsonl"))
        results[name] = {"accuracy": accuracy, "train_minutes": minutes, "steps": cfg.trainer.steps}
        print(f"{name}: {accuracy}; trained in {minutes:.1f} min", flush=True)

    lengths = sorted({length for r in results.values() for length in r["accuracy"]})
    table = ["| model | " + " | ".join(f"{length}" for length in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, r in results.items():
        cells = [f"{100 * r['accuracy'][n]:.0f}" if n in r["accuracy"] else "-" for n in lengths]
        table.append(f"| {name} ({r['steps']} steps, {r['train_minutes']:.0f} min) | " + " | ".join(cells) + " |")
    table.append(f"\nAccuracy (%) on the last token of {cfg.data.extrapolation_examples} sequences per length, chance "
                 f"{100 / (cfg.data.vocab_size - 1):.1f}%; trained at {TRAIN_LENGTH}. Paper (Table 2): {PAPER}.")
    (OUT / "induction_heads.md").write_text("\n".join(table) + "\n")
    (OUT / "induction_heads.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "train_length": TRAIN_LENGTH, "paper": PAPER,
         "results": {k: {**v, "accuracy": {str(n): a for n, a in v["accuracy"].items()}} for k, v in results.items()}},
        indent=2))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ns = sorted(r["accuracy"])
        ax.plot(ns, [100 * r["accuracy"][n] for n in ns], marker="o", label=name)
    ax.axvline(TRAIN_LENGTH, color="gray", linestyle=":", label="training length")
    ax.axhline(100 / (cfg.data.vocab_size - 1), color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy (%)", ylim=(0, 105),
           title="Induction Heads extrapolation")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "induction_heads.png", dpi=120)
    print("\n".join(table))
    print(f"wrote {OUT}/induction_heads.md, induction_heads.json, induction_heads.png")


if __name__ == "__main__":
    main(sys.argv[1:])
