"""Sequence-length scaling: one Mamba layer vs one causal-attention layer of the same width, forward+backward.

The chapter's claim: 10x the sequence length costs attention ~100x the compute (slope 2 on log-log axes) and
Mamba ~10x (slope 1).

    .venv/bin/python scripts/scaling.py                                # L = 2^8 .. 2^14, d_model 64, batch 1
    .venv/bin/python scripts/scaling.py --lengths 256 1024 4096 --heads 4

Time is the median of --repeats calls of the compiled step; peak memory is XLA's account of the compiled step
(arguments + outputs + temporaries). Slopes are least-squares fits of log(time) and log(memory) on log(L) over
the lengths from 2^10 up (shorter ones are dominated by fixed per-call costs). Writes scaling.json and scaling.png.
"""

import argparse
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

from models.layers import MultiHeadAttention
from models.mamba import MambaBlock
from train import runtime
from train.config import compose

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def layer_step(layer: nnx.Module, call):
    """Compiled gradient of sum(layer(x)) with respect to the parameters and the input."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params, x):
        return jnp.sum(call(nnx.merge(graphdef, params, rest), x))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def measure(layer: nnx.Module, call, x: jax.Array, repeats: int) -> dict:
    step, params = layer_step(layer, call)
    compiled = step.lower(params, x).compile()
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    mem = compiled.memory_analysis()
    return {"seconds": sorted(times)[len(times) // 2],
            "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)}


def slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(length)."""
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2**k for k in range(8, 15)])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fit-from", type=int, default=1024)
    parser.add_argument("--out", default="outputs/scaling")
    args = parser.parse_args()
    runtime.apply(**compose([]).runtime)  # as `python -m train` runs: glibc keeps XLA's freed buffers, kernels on
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    layers = {
        "mamba": (MambaBlock(args.d_model, rngs=nnx.Rngs(0)), lambda m, x: m(x)),
        "attention": (MultiHeadAttention(args.d_model, args.heads, rngs=nnx.Rngs(0)), lambda m, x: m(x, causal=True)),
    }
    rows = []
    for length in args.lengths:
        x = jax.random.normal(jax.random.key(0), (args.batch, length, args.d_model))
        for name, (layer, call) in layers.items():
            r = measure(layer, call, x, args.repeats)
            rows.append({"layer": name, "length": length, **r})
            print(f"L={length:6d} {name:9s} {r['seconds']:9.4f} s {r['peak_bytes'] / 2**20:9.1f} MiB", flush=True)

    slopes = {}
    for name in layers:
        fit = [r for r in rows if r["layer"] == name and r["length"] >= args.fit_from]
        if len(fit) >= 2:
            ls = [r["length"] for r in fit]
            slopes[name] = {"time": slope(ls, [r["seconds"] for r in fit]),
                            "memory": slope(ls, [r["peak_bytes"] for r in fit])}
    machine = f"{jax.default_backend()}: {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "config": vars(args), "rows": rows,
              "slopes": slopes}
    (out / "scaling.json").write_text(json.dumps(result, indent=2))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "seconds", "forward+backward time (s)"), (axes[1], "peak_bytes", "peak memory (bytes)"))
    for ax, key, label in panels:
        for name in layers:
            pts = [(r["length"], r[key]) for r in rows if r["layer"] == name]
            fitted = slopes.get(name, {}).get("time" if key == "seconds" else "memory")
            ax.plot(*zip(*pts), marker="o", label=f"{name}" + (f" (slope {fitted:.2f})" if fitted else ""))
        ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel=label)
        ax.legend()
    fig.suptitle(f"One layer, d_model {args.d_model}, batch {args.batch} ({machine})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=120)
    for name, s in slopes.items():
        print(f"{name}: time slope {s['time']:.2f}, memory slope {s['memory']:.2f}")
    print(f"wrote {out}/scaling.json and scaling.png ({machine})")


if __name__ == "__main__":
    main()
