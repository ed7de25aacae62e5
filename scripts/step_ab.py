"""A kernel change's effect on a model's whole train step, measured in one process.

The jitted train step of one config (`python -m train`'s overrides) is compiled twice: against the working tree's
CPU kernels and against those of git revision `--against` (built beside them, as `scripts/conv_bench.py --against`
does). The two are then called in turn, `--calls` steps each, for `--rounds` rounds, on the same batches, the first
of each pair alternating. Alternating runs of `python -m train` in separate processes differed by 0.91-1.18x a
pair on the Zen 4 (ResNet-20 and LeNet, two trees), since the machine's speed drifts between them; turns within one
process share the same seconds, so a 1-2% change shows in the median.

    python scripts/step_ab.py --against HEAD model=resnet20 data=digits optim=sgd
    python scripts/step_ab.py --against HEAD~1 --rounds 60 --calls 5 model=gpt data=bytes

Prints the step times and the speedup (before / after: median [range] over the rounds), and writes JSON
(outputs/bench/step_ab.json, or --out).
"""

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCHES = 4  # distinct batches the steps cycle through (one batch over and over can drive the loss to 0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, metavar="REV", help="the git revision whose kernels are compared")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=3, help="steps of each build per turn")
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "step_ab.json")
    ap.add_argument("overrides", nargs="*", help="training config overrides, as for python -m train")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.calls < 1:
        sys.exit(f"error: --rounds {args.rounds} and --calls {args.calls} must be at least 1")
    from scripts.bench import replace_text, writable_out

    args.out = writable_out(args.out, "step_ab.json")  # now, not after the timing

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train import runtime
    from train.config import compose
    from train.loop import check_config

    try:
        cfg = compose(args.overrides)
        check_config(cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
    except (HydraException, OmegaConfBaseException) as e:
        sys.exit(f"error: {' '.join(str(e).splitlines()[:2])}")
    runtime.apply(**cfg.runtime)

    import jax

    from models import cpu_kernels
    from scripts.conv_bench import AGAINST, kernels_of
    from train import loop
    from train import mesh as mesh_lib

    theirs = kernels_of(args.against)
    if not cpu_kernels.available():
        sys.exit("error: archlab's CPU kernels could not be built (see the warning above); install a C++ compiler "
                 "or set CXX")
    cpu_kernels.register(theirs, AGAINST)
    run_dir = tempfile.mkdtemp(prefix="step_ab_")  # setup's saved config; nothing else is written
    exp = loop.setup(cfg, run_dir)
    tc = cfg.trainer
    batches = [mesh_lib.global_batch(exp.dataset.train_batch(s, tc.batch_size, exp.shard), exp.mesh)
               for s in range(BATCHES)]
    init = jax.jit(exp.init, out_shardings=exp.shardings)
    builds = {}
    for name in ("before", "after"):
        leaves = jax.tree.leaves(init())
        with cpu_kernels.tracing_with(AGAINST) if name == "before" else contextlib.nullcontext():
            compiled = loop.make_train_step(exp, flat=True).lower(leaves, batches[0]).compile()
        builds[name] = {"step": compiled, "leaves": leaves, "calls": 0}
    if f'"{cpu_kernels.PREFIX}' in builds["before"]["step"].as_text():  # a custom call's quoted target name
        sys.exit("error: the step compiled for --against's kernels calls the working tree's")

    def turn(name: str, calls: int) -> float:
        """Seconds a step over `calls` steps of one build."""
        build = builds[name]
        leaves, start = build["leaves"], time.perf_counter()
        for _ in range(calls):
            leaves, _sums = build["step"](leaves, batches[build["calls"] % BATCHES])
            build["calls"] += 1
        jax.block_until_ready(leaves)
        build["leaves"] = leaves
        return (time.perf_counter() - start) / calls

    for name in builds:
        turn(name, 2)  # warm: first calls, allocations
    times = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in (("after", "before") if r % 2 else ("before", "after")):
            times[name].append(turn(name, args.calls))
    shutil.rmtree(run_dir, ignore_errors=True)
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    result = {
        "command": "python scripts/step_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(), "against": args.against, "overrides": args.overrides,
        "rounds": args.rounds, "calls": args.calls,
        "step_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "speedup": [statistics.median(ratios), min(ratios), max(ratios)],
    }
    replace_text(args.out, json.dumps(result, indent=1) + "\n")
    median, low, high = result["speedup"]
    print(f"`{result['command']}`, {result['date']}: step {result['step_ms']['before']:.3g} ms with "
          f"{args.against}'s kernels, {result['step_ms']['after']:.3g} ms with the working tree's; speedup "
          f"{median:.3f}x [{low:.3f}-{high:.3f}] over {args.rounds} rounds of {args.calls} calls")
    return result


if __name__ == "__main__":
    main()
