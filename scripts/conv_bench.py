"""Per-op convolution, dense-layer, attention and max-pool times: XLA's (`lax.conv_general_dilated`,
`lax.dot_general`, the einsums, query blocks or reshape-and-max archlab runs without its kernels), archlab's CPU
kernels (models/cpu_kernels.py) and PyTorch's (oneDNN, channels-last; `torch.mm`;
`F.scaled_dot_product_attention`; `F.max_pool2d`), each jitted (or eager) alone: convolutions and dense layers
forward, input gradient and weight gradient; archlab's through `layers.cpu_conv` and `layers.cpu_dot`, as the
models call them (a dense layer's forward and input gradient are XLA's dots either way; its weight gradient is the
kernel's); attention forward, and forward and backward together (`layers.fused_attention`); LeNet's max pools the
same way (`layers.max_pool`); BatchNorm's per-channel statistics (`layers.channel_sums`; XLA's and archlab's only).

    python scripts/conv_bench.py                  # ResNet-20's and LeNet's layers at batch 128, dense layers, 3 rounds
    python scripts/conv_bench.py --batch 32 --rounds 5 --out outputs/bench/conv_small.json
    python scripts/conv_bench.py --against HEAD --rounds 9   # a kernel change: the working tree's build against HEAD's
    python scripts/conv_bench.py --only "resnet20 stage" fc1   # the cases whose names contain one of these

`--against REV` builds the kernels as of git revision REV as well, registers them beside the working tree's and
times both in the same process, taking turns with the others: the ratio of two builds comes from the same
seconds of this VM's drift (between processes it moved 2x within minutes), with its range over the rounds, and
the largest difference between the two builds' results.

The three libraries take turns within every round (best of 10 calls per turn), so that this VM's drift hits all
alike; each figure is the median over the rounds of those bests, in ms. PyTorch (the `bench` extra) is left out
when it is not installed. Writes JSON and a Markdown table (outputs/bench/conv_bench.*).
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from models import cpu_kernels  # noqa: E402
from models.layers import channel_sums, cpu_conv, cpu_dot, dot_product_attention, max_pool  # noqa: E402
from scripts.bench import replace_text  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
OPS = ("forward", "input_grad", "weight_grad")
ATTENTION_OPS = ("forward", "forward_backward")
NORM_OPS = ("statistics",)
POOL_OPS = ATTENTION_OPS
# (name, height = width, in channels, out channels, kernel, stride, padding)
LAYERS = [("resnet20 stage 1", 28, 16, 16, 3, 1, 1), ("resnet20 stage 2", 14, 32, 32, 3, 1, 1),
          ("resnet20 stage 3", 7, 64, 64, 3, 1, 1), ("resnet20 16 -> 32, stride 2", 28, 16, 32, 3, 2, 1),
          ("lenet conv2", 12, 6, 16, 5, 1, 0), ("lenet conv1", 28, 1, 6, 5, 1, 0),
          ("resnet18 stage 3 at 64x64", 4, 256, 256, 3, 1, 1), ("resnet18 stage 4 at 64x64", 2, 512, 512, 3, 1, 1)]
# (name, rows of x = batch x positions, in features, out features): the bench suite's steps, whatever --batch says
DENSE = [("gpt d384 fc1", 2048, 384, 1536), ("gpt d384 fc2", 2048, 1536, 384), ("gpt d384 attention projection",
          2048, 384, 384), ("vit_tiny qkv projection", 2176, 64, 64), ("vit_tiny fc1", 2176, 64, 128),
         ("mlp hidden 1", 128, 784, 256), ("transformer fc2", 3968, 512, 128)]
# (name, batch, positions, heads, head size, causal): the bench suite's attention layers
ATTENTION = [("gpt d384 attention", 8, 256, 6, 64, True), ("gpt d128 attention", 12, 64, 4, 32, True),
             ("vit_tiny attention", 128, 17, 4, 16, False), ("transformer decoder self-attention", 64, 62, 4, 32, True),
             ("transformer encoder self-attention", 64, 56, 4, 32, False)]
# (name, height = width, channels, window): the suite's non-overlapping max pools
POOLS = [("lenet pool 1", 24, 6, 2), ("lenet pool 2", 8, 16, 2)]
# (name, height = width, channels): ResNet-20's BatchNorm layers, whose per-channel sum and sum of squares are
# timed (the batch's statistics; the backward pass takes the same sums of dy and dy * x)
NORMS = [("resnet20 stage 1 batch norm", 28, 16), ("resnet20 stage 2 batch norm", 14, 32),
         ("resnet20 stage 3 batch norm", 7, 64)]


def best_ms(fn, calls: int = 10) -> float:
    """The fastest of `calls` timed calls (a busy machine only adds time)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


AGAINST = "against_"  # the registered names' prefix of --against's build


def kernels_of(rev: str) -> Path:
    """The kernels as of git revision `rev`, built (once per machine and sources) beside the working tree's."""
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], capture_output=True).returncode:
        raise SystemExit(f"error: --against {rev!r} is not a commit of this repository (a branch, tag or hash)")
    with tempfile.TemporaryDirectory(prefix="conv_bench_") as folder:
        sources = [Path(folder) / source.name for source in cpu_kernels.SOURCES]
        for source in sources:
            shown = subprocess.run([*git, "show", f"{rev}:models/{source.name}"], capture_output=True, text=True)
            if shown.returncode:
                raise SystemExit(f"error: --against {rev!r} has no models/{source.name} (the kernels came later)")
            source.write_text(shown.stdout)
        if not cpu_kernels.library_path(sources).exists():
            print(f"building the kernels of {rev} ...", flush=True)  # ~30 s, once per machine and sources
        return cpu_kernels.built(sources)


def one_build(*compiled) -> None:
    """Under `cpu_kernels.tracing_with`, the compiled functions call no kernel of this build's: a trace made
    outside it, reused, would time this build twice."""
    mine = f'"{cpu_kernels.PREFIX}'  # a custom call's quoted target name
    if cpu_kernels.target("") != cpu_kernels.PREFIX and any(mine in c.as_text() for c in compiled):
        raise SystemExit("error: a function traced for --against's kernels calls the working tree's")


def jax_ops(conv, x, w, dy) -> dict:
    """forward / input gradient / weight gradient of `conv(x, w)`, compiled now, each a call that blocks. (Each a
    new function to trace: jit would reuse a trace of `conv` made against another build of the kernels.)"""
    fwd = jax.jit(lambda x, w: conv(x, w)).lower(x, w).compile()
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]).lower(x, w, dy).compile()
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]).lower(x, w, dy).compile()
    one_build(fwd, dx, dw)
    return {"forward": lambda: fwd(x, w).block_until_ready(),
            "input_grad": lambda: dx(x, w, dy).block_until_ready(),
            "weight_grad": lambda: dw(x, w, dy).block_until_ready()}


def jax_kernel_ops(fn, inputs: tuple, dy, kernels: bool, kernel: str) -> dict:
    """forward / forward and backward of `fn(*inputs)`, compiled now, with archlab's CPU kernels on or off (off:
    what `models.layers` runs without them), checking that the forward pass takes the kernel `kernel` exactly when
    they are on."""
    cpu_kernels.enable(kernels)
    try:  # new functions to trace: jit would reuse a trace of `fn` made with the kernels switched the other way
        fwd = jax.jit(lambda *a: fn(*a)).lower(*inputs).compile()
        both = jax.jit(lambda dy, *a: jax.vjp(fn, *a)[1](dy)).lower(dy, *inputs).compile()
    finally:
        cpu_kernels.enable(True)
    one_build(fwd, both)
    if (cpu_kernels.target(kernel) in fwd.as_text()) != kernels:
        taken = "did not take" if kernels else "took"
        raise SystemExit(f"error: {kernel} of shape {inputs[0].shape} {taken} archlab's kernel")
    return {"forward": lambda: fwd(*inputs).block_until_ready(),
            "forward_backward": lambda: jax.block_until_ready(both(dy, *inputs))}


def jax_attention_ops(attend, q, k, v, dy, kernels: bool) -> dict:
    """`jax_kernel_ops` of `attend(q, k, v)` (without the kernels: the query blocks or einsums)."""
    return jax_kernel_ops(attend, (q, k, v), dy, kernels, "attention")


def jax_pool_ops(x, dy, window: int, kernels: bool) -> dict:
    """`jax_kernel_ops` of `layers.max_pool(x, window)` (without the kernels: a reshape and a max)."""
    return jax_kernel_ops(lambda x: max_pool(x, window), (x,), dy, kernels, "max_pool")


def torch_pool_ops(x, dy, window: int) -> dict:
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    dyt = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    def forward_backward():
        leaf = xt.detach().requires_grad_()
        F.max_pool2d(leaf, window).backward(dyt)

    def forward():
        with torch.no_grad():
            F.max_pool2d(xt, window)

    return {"forward": forward, "forward_backward": forward_backward}


def torch_attention_ops(q, k, v, dy, causal: bool) -> dict:
    import torch
    import torch.nn.functional as F

    heads_first = lambda a: torch.from_numpy(np.asarray(a)).transpose(1, 2).contiguous()  # (B, H, T, Dh)
    qt, kt, vt, dyt = map(heads_first, (q, k, v, dy))

    def forward_backward():
        leaves = [t.detach().requires_grad_() for t in (qt, kt, vt)]
        F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(dyt)

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    return {"forward": forward, "forward_backward": forward_backward}


def timed(ops: dict, names: tuple, rounds: int, against: str | None = None) -> dict:
    """{library: {op: median over the rounds of the best of 10}}, the libraries taking turns in each round; with
    `against` (a library), also {"speedup": {op: [median, low, high]}}: its time over archlab's, per round."""
    libraries = list(ops)
    for fns in ops.values():
        for fn in fns.values():
            fn()  # warm up
    times = {lib: {op: [] for op in names} for lib in libraries}
    for r in range(rounds):
        for op in names:  # an op's turns back to back, so that the VM's drift between them stays small
            for lib in (libraries if r % 2 == 0 else libraries[::-1]):
                times[lib][op].append(best_ms(ops[lib][op]))
    result = {lib: {op: statistics.median(times[lib][op]) for op in names} for lib in libraries}
    if against:
        ratios = {op: [a / b for a, b in zip(times[against][op], times["archlab"][op])] for op in names}
        result["speedup"] = {op: [statistics.median(r), min(r), max(r)] for op, r in ratios.items()}
    return result


def difference(ops: dict, names: tuple, against: str | None) -> dict:
    """{"difference": {op: the largest difference between the two builds' results, relative to the result's
    largest value}} (each op's call returns its result); nothing without `against`."""
    if not against:
        return {}

    def gap(mine, theirs) -> float:
        pairs = zip(jax.tree.leaves(mine), jax.tree.leaves(theirs))
        return max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / (np.abs(np.asarray(a)).max() or 1.0))
                   for a, b in pairs)

    return {"difference": {op: gap(ops["archlab"][op](), ops[against][op]()) for op in names}}


def report(row: dict, names: tuple, libraries: list) -> None:
    """One line per case as it is timed: each library's ms per op, and with --against the speedup per op."""
    line = " | ".join(f"{lib} " + " / ".join(f"{row[lib][op]:.3g}" for op in names) for lib in libraries)
    if "speedup" in row:
        line += " | speedup " + " / ".join(f"{row['speedup'][op][0]:.2f}x" for op in names)
    print(row["layer"], line, flush=True)


def norm_ops(x) -> dict:
    """The per-channel sum and sum of squares of x (N, H, W, C): XLA's two reductions and archlab's kernel
    (`layers.channel_sums`). PyTorch has no such op alone (its BatchNorm normalises in the same call)."""
    axes = (0, 1, 2)
    xla = jax.jit(lambda x: (jnp.sum(x, axes), jnp.sum(x * x, axes)))
    return {"xla": {"statistics": lambda: jax.block_until_ready(xla(x))}, "archlab": kernel_norm_op(x)}


def kernel_norm_op(x) -> dict:
    """archlab's kernel alone of `norm_ops`, compiled now (against the build `cpu_kernels.tracing_with` names)."""
    kernel = jax.jit(lambda x: channel_sums(x, x)).lower(x)
    if cpu_kernels.target("channel_moments") not in kernel.as_text():
        raise SystemExit(f"error: the batch-norm statistics of shape {x.shape} did not take archlab's kernel")
    kernel = kernel.compile()
    one_build(kernel)
    return {"statistics": lambda: jax.block_until_ready(kernel(x))}


def torch_dense_ops(x, w, dy) -> dict:
    import torch

    xt, wt, dyt = (torch.from_numpy(np.asarray(a)) for a in (x, w, dy))
    with torch.no_grad():
        return {"forward": lambda: xt @ wt, "input_grad": lambda: dyt @ wt.T, "weight_grad": lambda: xt.T @ dyt}


def torch_ops(x, w, dy, stride: int, pad: int) -> dict:
    import torch

    cl = torch.channels_last
    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(memory_format=cl)
    dyt = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).contiguous(memory_format=cl)
    grad = torch.ops.aten.convolution_backward
    args = (dyt, xt, wt, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1)
    with torch.no_grad():
        return {"forward": lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad),
                "input_grad": lambda: grad(*args, [True, False, False]),
                "weight_grad": lambda: grad(*args, [False, True, False])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "conv_bench.json"))
    ap.add_argument("--against", metavar="REV", help="also time the kernels as of this git revision, in the same "
                    "process (a kernel change's A/B)")
    ap.add_argument("--only", nargs="+", metavar="TEXT", help="the cases whose name contains one of these")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit(f"error: --batch {args.batch} and --rounds {args.rounds} must be at least 1")
    chosen = lambda cases: [case for case in cases if not args.only or any(t in case[0] for t in args.only)]
    if not any(chosen(cases) for cases in (LAYERS, DENSE, ATTENTION, POOLS, NORMS)):
        names = ", ".join(repr(case[0]) for cases in (LAYERS, DENSE, ATTENTION, POOLS, NORMS) for case in cases)
        raise SystemExit(f"error: --only {' '.join(args.only)} names no case; the cases: {names}")
    theirs = kernels_of(args.against) if args.against else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cpu_kernels.available():
        raise SystemExit("error: archlab's CPU kernels could not be built (see the warning above); install a C++ "
                         "compiler or set CXX")
    against = f"archlab@{args.against}" if args.against else None
    if against:
        cpu_kernels.register(theirs, AGAINST)
    libraries = ["xla", "archlab"] + ([against] if against else []) + (
        ["pytorch"] if importlib.util.find_spec("torch") else [])
    rows = []
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    cases = []
    for name, size, c_in, c_out, k, stride, pad in chosen(LAYERS):
        x, w = normal(args.batch, size, size, c_in), normal(k, k, c_in, c_out)
        padding = ((pad, pad), (pad, pad))
        xla = lambda x, w, s=stride, p=padding: lax.conv_general_dilated(x, w, (s, s), p, dimension_numbers=NHWC)
        dy = normal(*xla(x, w).shape)
        kernels = lambda x, w, s=stride, p=padding: cpu_conv(x, w, (s, s), p, dimension_numbers=NHWC)
        torch_fns = (lambda x=x, w=w, dy=dy, s=stride, p=pad: torch_ops(x, w, dy, s, p))
        cases.append((name, [args.batch, size, size, c_in, c_out, k, stride, pad], xla, kernels, x, w, dy, torch_fns))
    for name, n, k, m in chosen(DENSE):
        x, w, dy = normal(n, k), normal(k, m), normal(n, m)
        dims = (((1,), (0,)), ((), ()))
        cases.append((name, [n, k, m], lambda x, w: lax.dot_general(x, w, dims),
                      lambda x, w: cpu_dot(x, w, dims), x, w, dy, lambda x=x, w=w, dy=dy: torch_dense_ops(x, w, dy)))
    for name, shape, xla, kernels, x, w, dy, torch_fns in cases:
        ops = {"xla": jax_ops(xla, x, w, dy), "archlab": jax_ops(kernels, x, w, dy)}
        if against:
            with cpu_kernels.tracing_with(AGAINST):
                ops[against] = jax_ops(kernels, x, w, dy)
        if "pytorch" in libraries:
            ops["pytorch"] = torch_fns()
        rows.append({"layer": name, "shape": shape, **timed(ops, OPS, args.rounds, against),
                     **difference(ops, OPS, against)})
        report(rows[-1], OPS, libraries)
    attention = []
    for name, b, t, h, dh, causal in chosen(ATTENTION):
        q, k, v, dy = (normal(b, t, h, dh) for _ in range(4))
        attend = partial(dot_product_attention, causal=causal)
        ops = {"xla": jax_attention_ops(attend, q, k, v, dy, kernels=False),
               "archlab": jax_attention_ops(attend, q, k, v, dy, kernels=True)}
        if against:
            with cpu_kernels.tracing_with(AGAINST):
                ops[against] = jax_attention_ops(attend, q, k, v, dy, kernels=True)
        if "pytorch" in libraries:
            ops["pytorch"] = torch_attention_ops(q, k, v, dy, causal)
        attention.append({"layer": name, "shape": [b, t, h, dh, causal],
                          **timed(ops, ATTENTION_OPS, args.rounds, against),
                          **difference(ops, ATTENTION_OPS, against)})
        report(attention[-1], ATTENTION_OPS, libraries)
    pools = []
    for name, size, c, window in chosen(POOLS):
        x = normal(args.batch, size, size, c)
        dy = normal(args.batch, size // window, size // window, c)
        ops = {"xla": jax_pool_ops(x, dy, window, kernels=False), "archlab": jax_pool_ops(x, dy, window, kernels=True)}
        if against:
            with cpu_kernels.tracing_with(AGAINST):
                ops[against] = jax_pool_ops(x, dy, window, kernels=True)
        if "pytorch" in libraries:
            ops["pytorch"] = torch_pool_ops(x, dy, window)
        pools.append({"layer": name, "shape": [args.batch, size, size, c, window],
                      **timed(ops, POOL_OPS, args.rounds, against), **difference(ops, POOL_OPS, against)})
        report(pools[-1], POOL_OPS, libraries)
    norms = []
    norm_libraries = [lib for lib in libraries if lib != "pytorch"]  # PyTorch has no statistics op alone
    for name, size, c in chosen(NORMS):
        x = normal(args.batch, size, size, c)
        ops = norm_ops(x)
        if against:
            with cpu_kernels.tracing_with(AGAINST):
                ops[against] = kernel_norm_op(x)
        norms.append({"layer": name, "shape": [args.batch, size, size, c],
                      **timed(ops, NORM_OPS, args.rounds, against), **difference(ops, NORM_OPS, against)})
        report(norms[-1], NORM_OPS, norm_libraries)
    command = " ".join(["python scripts/conv_bench.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": date.today().isoformat(),
              "command": command, "batch": args.batch, "rounds": args.rounds, "against": args.against, "rows": rows,
              "attention": attention, "pools": pools, "norms": norms}
    replace_text(out, json.dumps(result, indent=1))
    def table(title: str, unit: str, names: tuple, found: list, libs: list) -> list[str]:
        if not found:
            return []
        ops_named = unit.removeprefix("ms").strip()
        vs = [f"archlab / {against}{' ' + ops_named if ops_named else ''}: speedup [range], largest difference"
              ] if against else []
        lines = ["", f"| {title} | " + " | ".join([f"{lib} {unit}" for lib in libs] + vs) + " |",
                 "|---" * (len(libs) + len(vs) + 1) + "|"]
        for row in found:
            cells = [" / ".join(f"{row[lib][op]:.3g}" for op in names) for lib in libs]
            if against:
                cells.append(" / ".join(f"{m:.2f}x [{lo:.2f}-{hi:.2f}]" for m, lo, hi in
                                        (row["speedup"][op] for op in names))
                             + f", {max(row['difference'].values()):.1e}")
            lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
        return lines

    lines = [f"`{result['command']}`, {result['date']}, batch {args.batch}, median over {args.rounds} rounds "
             "of each library's best of 10 calls"]
    lines += table("layer", "ms (fwd / dx / dW)", OPS, rows, libraries)
    lines += table("attention (batch, positions, heads, head size, causal: the suite's)", "ms (fwd / fwd + bwd)",
                   ATTENTION_OPS, attention, libraries)
    lines += table("max pool (height = width, channels, window)", "ms (fwd / fwd + bwd)", POOL_OPS, pools,
                   libraries)
    lines += table("batch-norm statistics (sum and sum of squares per channel)", "ms", NORM_OPS, norms,
                   norm_libraries)
    replace_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
