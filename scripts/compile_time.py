"""Compile time of the real train step against depth, with the layers in a Python loop and with `scan_layers`.

    python scripts/compile_time.py                        # GPT-2 small widths at 4, 12 and 32 layers, 2 rounds
    python scripts/compile_time.py --depths 4 32 --rounds 3 --set model=vit_b16 data=imagenet2012

Nothing is allocated: the jitted train step of `train.loop.make_train_step` is traced (`lower`) and compiled
(`compile`) from the abstract train state and batch, as `python -m train` compiles it on its first step. The
persistent compilation cache is off, and the layouts alternate within every round so that the machine's drift
hits both alike. Writes JSON and a Markdown table (outputs/bench/compile_time.*).
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from train import loop  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.config import compose  # noqa: E402

GPT2_WIDTHS = ["model=gpt2_small", "data=bytes", "data.seq_len=1024", "trainer.batch_size=8"]


def abstract_batch(exp: loop.Experiment) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes and shardings of one global training batch."""
    batch = exp.dataset.train_batch(0, exp.cfg.trainer.batch_size)
    sharding = mesh_lib.batch_sharding(exp.mesh)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def compile_seconds(overrides: list[str]) -> dict[str, float]:
    """Seconds to trace and to compile the train step of the composed config."""
    with tempfile.TemporaryDirectory() as run_dir:
        exp = loop.setup(compose(overrides), run_dir)
        step = loop.make_train_step(exp)
        t0 = time.perf_counter()
        lowered = step.lower(exp.abstract_state, abstract_batch(exp))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        exp.checkpoints.close()
    return {"trace_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 12, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=GPT2_WIDTHS, help="training overrides (default: GPT-2 small)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "compile_time.json")
    args = parser.parse_args()
    depth_key = "model.depth" if any("vit" in o for o in args.set) else "model.num_layers"
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for depth in args.depths:
            for layout in ("loop", "scan"):
                overrides = [*args.set, f"{depth_key}={depth}", f"model.scan_layers={layout == 'scan'}"]
                runs.setdefault(f"{depth} {layout}", []).append(compile_seconds(overrides))
                print(f"round {r + 1} depth {depth} {layout}: {runs[f'{depth} {layout}'][-1]}", flush=True)
    rows = []
    for depth in args.depths:
        row = {"depth": depth}
        for layout in ("loop", "scan"):
            totals = [x["total_s"] for x in runs[f"{depth} {layout}"]]
            row[layout] = {"median_s": statistics.median(totals), "min_s": min(totals), "max_s": max(totals),
                           "trace_s": statistics.median(x["trace_s"] for x in runs[f"{depth} {layout}"])}
        rows.append(row)
    first = rows[0]
    result = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{jax.device_count()} {jax.default_backend()} device(s)", "overrides": args.set,
              "rounds": args.rounds, "rows": rows,
              "scan_growth": rows[-1]["scan"]["median_s"] / first["scan"]["median_s"],
              "loop_growth": rows[-1]["loop"]["median_s"] / first["loop"]["median_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"Train-step compile time (trace + XLA compile), {' '.join(args.set)}; {result['machine']}; "
             f"{args.rounds} rounds, median [range]", "", "| layers | Python loop | scan_layers |", "|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]['median_s']:.1f} s [{row[k]['min_s']:.1f}-{row[k]['max_s']:.1f}]" for k in ("loop", "scan")]
        lines.append(f"| {row['depth']} | {cells[0]} | {cells[1]} |")
    lines.append(f"\n{args.depths[-1]} vs {args.depths[0]} layers: loop {result['loop_growth']:.2f}x, "
                 f"scan {result['scan_growth']:.2f}x")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
