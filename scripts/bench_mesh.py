"""GPT training throughput and per-device state memory on 1 vs N (fake CPU) devices, one subprocess each.

    python scripts/bench_mesh.py                                   # small GPT on data=bytes, 1 vs 8 devices
    python scripts/bench_mesh.py --devices 1 8 --overrides model=gpt2_small data.seq_len=256 trainer.batch_size=8
Writes bench_mesh.json (and prints a table) in --out (default outputs/bench_mesh).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MESHES = {1: ["mesh.data=1"], 2: ["mesh.data=1", "mesh.fsdp=2"], 4: ["mesh.data=2", "mesh.fsdp=2"],
          8: ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def measure(overrides: list[str], steps: int) -> dict:
    """Runs inside the subprocess: compile, then time `steps` train steps; state bytes per device."""
    import jax
    import numpy as np

    from train import mesh as mesh_lib
    from train.config import compose
    from train.loop import make_train_step, setup

    exp = setup(compose(["runtime.compilation_cache=false", *overrides]), tempfile.mkdtemp())
    state = jax.jit(exp.init, out_shardings=exp.shardings)()
    step_fn = make_train_step(exp)
    batches = [mesh_lib.global_batch(exp.dataset.train_batch(i, exp.cfg.trainer.batch_size), exp.mesh)
               for i in range(steps + 1)]
    state, sums = step_fn(state, batches[0])
    first_loss = float(sums["loss"] / sums["count"])
    start = time.perf_counter()
    for batch in batches[1:]:
        state, sums = step_fn(state, batch)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / steps
    device0 = jax.devices()[0]
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards
                     if s.device == device0)
    tokens = exp.cfg.trainer.batch_size * (exp.cfg.data.get("seq_len") or 1)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    return {"devices": jax.device_count(), "mesh": dict(exp.mesh.shape), "params": params,
            "step_seconds": seconds, "tokens_per_sec": tokens / seconds, "state_bytes_per_device": per_device,
            "first_loss": first_loss, "last_loss": float(sums["loss"] / sums["count"]),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--overrides", nargs="*", default=["model=gpt", "data=bytes"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_mesh")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.overrides, args.steps)))
        return
    results = []
    for n in args.devices:
        env = os.environ | {"PYTHONPATH": str(ROOT),
                            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"}
        proc = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps), "--overrides",
                               *args.overrides, *MESHES[n]], env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"error: {n} devices failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'devices':>7} {'mesh':>28} {'params':>12} {'s/step':>8} {'tokens/s':>9} {'state MiB/dev':>13} "
          f"{'peak RSS MiB':>12} {'loss':>14}")
    for r in results:
        print(f"{r['devices']:>7} {str(r['mesh']):>28} {r['params']:>12,} {r['step_seconds']:>8.3f} "
              f"{r['tokens_per_sec']:>9.0f} {r['state_bytes_per_device'] / 2**20:>13.1f} "
              f"{r['peak_rss_bytes'] / 2**20:>12.0f} {r['first_loss']:>6.3f}->{r['last_loss']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_mesh.json").write_text(json.dumps({"overrides": args.overrides, "results": results},
                                                         indent=2) + "\n")
    print(f"wrote {args.out / 'bench_mesh.json'}")


if __name__ == "__main__":
    main()
