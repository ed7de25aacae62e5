"""Forward+backward time and peak memory of the selective-scan implementations on this machine.

    .venv/bin/python scripts/scan_benchmark.py                       # L = 256 .. 4096, batch 8, d_inner 128, d_state 16
    .venv/bin/python scripts/scan_benchmark.py --lengths 1024 --repeats 3
    .venv/bin/python scripts/scan_benchmark.py --no-cpu-kernels          # `sequential` as XLA's lax.scan

Peak memory is XLA's own account of the compiled step (arguments + outputs + temporaries), so it is the
same number on CPU, GPU and TPU and needs no process-level sampling. Writes scan_benchmark.json and a table.
"""

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from models import cpu_kernels
from models.mamba import SCANS, selective_scan


def make_inputs(batch: int, length: int, d_inner: int, d_state: int, key: jax.Array) -> tuple[jax.Array, ...]:
    """Random scan inputs with the magnitudes a Mamba layer produces at init."""
    k = jax.random.split(key, 4)
    dt = jax.nn.softplus(jax.random.normal(k[0], (batch, length, d_inner)) - 4.0)  # dt ~ 0.02
    A = -jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state))
    B = jax.random.normal(k[1], (batch, length, d_state))
    C = jax.random.normal(k[2], (batch, length, d_state))
    x = jax.random.normal(k[3], (batch, length, d_inner))
    return dt, A, B, C, x


def fwd_bwd(method: str, chunk: int):
    """jit(grad of sum(y)) with respect to every input: one training step's worth of scan work."""

    def loss(dt, A, B, C, x):
        return selective_scan(dt, A, B, C, x, method=method, chunk=chunk)[0].sum()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def measure(method: str, chunk: int, inputs: tuple[jax.Array, ...], repeats: int) -> dict:
    """Median wall time of `repeats` calls after compilation, and XLA's peak memory for the step."""
    seconds, peak, _ = time_compiled(fwd_bwd(method, chunk), inputs, repeats)
    return {"seconds": seconds, "peak_bytes": peak}


def time_compiled(fn, args: tuple, repeats: int) -> tuple[float, int, object]:
    """(median seconds of `repeats` calls after a warm-up, XLA's peak bytes, the output) of jitted `fn(*args)`."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return statistics.median(times), int(peak), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-inner", type=int, default=128)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    cpu = jax.default_backend() == "cpu"  # where Pallas only interprets, so its time means nothing
    parser.add_argument("--scans", nargs="+", choices=list(SCANS),
                        default=[s for s in SCANS if not (cpu and s == "pallas")])
    parser.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                        help="`sequential` as lax.scan, not archlab's CPU kernel (runtime.cpu_kernels=false)")
    parser.add_argument("--out", default="outputs/scan_benchmark")
    args = parser.parse_args()
    cpu_kernels.enable(args.cpu_kernels)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for length in args.lengths:
        inputs = make_inputs(args.batch, length, args.d_inner, args.d_state, jax.random.key(0))
        for method in args.scans:
            r = measure(method, args.chunk, inputs, args.repeats)
            rows.append({"scan": method, "length": length, **r})
            print(f"L={length:6d}  {method:12s} {r['seconds']:8.3f} s  {r['peak_bytes'] / 2**20:9.1f} MiB", flush=True)

    machine = f"{jax.default_backend()}: {jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}"
    result = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "config": vars(args), "rows": rows}
    (out / "scan_benchmark.json").write_text(json.dumps(result, indent=2))
    table = ["| L | " + " | ".join(f"{m} s | {m} MiB" for m in args.scans) + " |",
             "|---" * (1 + 2 * len(args.scans)) + "|"]
    for length in args.lengths:
        cells = " | ".join(f"{r['seconds']:.3f} | {r['peak_bytes'] / 2**20:.0f}" for r in rows if r["length"] == length)
        table.append(f"| {length} | {cells} |")
    (out / "scan_benchmark.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"wrote {out}/scan_benchmark.json and scan_benchmark.md ({machine})")


if __name__ == "__main__":
    main()
