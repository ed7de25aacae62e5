"""The GPU/TPU table of issue 14 in one run: throughput and MFU of the real train step, the selective-scan
variants against sequence length, and the attention kernel against the plain path.

    python scripts/accelerator_bench.py                 # on a GPU or TPU machine: the whole table
    python scripts/accelerator_bench.py --smoke         # tiny shapes, any backend (what the test runs on CPU)

Train steps are `train.loop.make_train_step` on `loop.setup` of the named overrides (bfloat16 compute on
accelerators by default), timed over `--steps` steps after two warm-up steps with a device sync at each end.
FLOPs per step are train/flops.compiled_flops' (on GPU/TPU, XLA's count before its optimizations, which turn
dots into library calls it no longer counts); MFU divides them by the step time and the device's dense bf16 peak
from its spec sheet (`PEAK_BF16`; unknown devices get no MFU). Scan rows reuse scripts/scan_benchmark.py (XLA's
memory account of the compiled forward+backward). Writes JSON and Markdown.

Where PyTorch sees a CUDA device, each model's PyTorch twin (scripts/torch_twins.py: same shapes, optimizer and
parameter count; on the CPU for --smoke) is timed the way a PyTorch user trains on a GPU: eager, bf16 autocast,
cudnn.benchmark, the same one batch. Each row is written as soon as it is measured, so a run cut short keeps what
it finished; a row that fails (out of memory, a kernel that does not lower) records its error and the run goes on.
"""

import argparse
import json
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.layers import attention_kernel, dot_product_attention  # noqa: E402
from scripts.bench import replace_text, writable_out  # noqa: E402
from scripts.scan_benchmark import make_inputs, measure  # noqa: E402
from train import flops as flops_lib  # noqa: E402
from train import loop  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train import runtime  # noqa: E402
from train.config import compose  # noqa: E402

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets (no sparsity).
PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA L4": 121e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}

MODELS = {  # name -> (overrides, items per example: tokens for language models, 1 image otherwise)
    "gpt2_small_seq1024": (["model=gpt2_small", "data=bytes", "data.seq_len=1024", "trainer.batch_size=16"], 1024),
    "resnet50_224": (["model=resnet50", "data=random_images", "trainer.batch_size=128", "optim=sgd"], 1),
    "vit_b16_224": (["model=vit_b16", "data=random_images", "trainer.batch_size=128"], 1),
    "mamba_130m_seq2048": (["model=mamba_130m", "data=bytes", "data.seq_len=2048", "trainer.batch_size=8"], 2048),
    "mamba_130m_seq2048_pallas": (["model=mamba_130m", "data=bytes", "data.seq_len=2048", "trainer.batch_size=8",
                                   "model.scan=pallas"], 2048),
}
SMOKE = {
    "gpt_tiny": (["model=gpt", "data=bytes", "data.seq_len=32", "trainer.batch_size=4", "model.num_layers=1"], 32),
    "resnet20_tiny": (["model=resnet20", "data=random_images", "data.image_size=16", "data.num_classes=10",
                       "trainer.batch_size=4"], 1),
}
NO_TORCH_TWIN_ON_GPU = ("model=mamba_130m",)  # the twin's pure-PyTorch scan is not what a Mamba user runs on a GPU
SECTIONS = ("models", "scans", "attention")


def train_throughput(overrides: list[str], items: int, steps: int) -> dict:
    """Steps/s, items/s, FLOPs per step and MFU of the real train step for `overrides`."""
    with tempfile.TemporaryDirectory() as run_dir:
        exp = loop.setup(compose([*overrides, f"trainer.steps={steps + 2}"]), run_dir)
        step = loop.make_train_step(exp)
        state = jax.jit(exp.init, out_shardings=exp.shardings)()
        batch = mesh_lib.global_batch(exp.dataset.train_batch(0, exp.cfg.trainer.batch_size), exp.mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        # XLA counts a scan body once (scanned layers, the Mamba scan): compiled_flops adds the other iterations.
        flops = flops_lib.compiled_flops(step, state, batch, compiled=compiled)
        for _ in range(2):
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        seconds = (time.perf_counter() - t0) / steps
        exp.checkpoints.close()
    peak = PEAK_BF16.get(jax.devices()[0].device_kind)
    batch_size = exp.cfg.trainer.batch_size
    return {"step_ms": 1e3 * seconds, "items_per_s": batch_size * items / seconds, "compile_s": compile_s,
            "tflops_per_step": flops / 1e12 if flops else None,
            "mfu": flops / seconds / (peak * jax.device_count()) if flops and peak else None,
            "dtype": exp.cfg.trainer.compute_dtype}


def torch_device(smoke: bool) -> str | None:
    """Where the PyTorch twins run: a CUDA device if PyTorch sees one, the CPU for --smoke, else nowhere."""
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu" if smoke else None


def torch_throughput(overrides: list[str], items: int, steps: int, device: str) -> dict:
    """The PyTorch twin's train step as a PyTorch user writes it on a GPU: eager, bf16 autocast, one batch."""
    import torch
    from omegaconf import OmegaConf

    from scripts.bench import torch_optimizer, torch_update
    from scripts.torch_twins import to_torch, train_loss, twin
    from train import targets

    cfg = compose([*overrides, f"trainer.steps={steps + 2}"])
    torch.manual_seed(cfg.trainer.seed)
    torch.backends.cudnn.benchmark = True
    dataset = targets.instantiate(cfg.data, _convert_="all")
    model = twin(OmegaConf.to_container(cfg.model, resolve=True)).to(device).train()
    optimizer, schedule = torch_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), steps + 3)
    batch = {k: v.to(device) for k, v in to_torch(dataset.train_batch(0, cfg.trainer.batch_size)).items()}
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def train_step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):  # archlab: fp32 on CPU
            loss = train_loss(model, cfg.data.task, batch)
        torch_update(model, optimizer, schedule, loss, cfg.optim.clip_norm)

    t0 = time.perf_counter()
    train_step()
    sync()
    first_step_s = time.perf_counter() - t0
    train_step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    del model, optimizer, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": 1e3 * seconds, "items_per_s": cfg.trainer.batch_size * items / seconds,
            "first_step_s": first_step_s}


def attention_row(length: int, repeats: int) -> dict:
    """Causal self-attention forward+backward (bf16, 12 heads of 64): the chosen kernel against plain XLA."""
    q, k, v = (jax.random.normal(jax.random.key(i), (4, length, 12, 64), jnp.bfloat16) for i in range(3))
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    paths = {"kernel": lambda q, k, v: dot_product_attention(q, k, v, causal=True),
             "plain": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")}
    row = {"length": length, "kernel": attention_kernel(jnp.bfloat16, masked=False, seq_len=length)[0]}
    for name, fn in paths.items():
        grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
        jax.block_until_ready(grad(q, k, v))
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = grad(q, k, v)
        jax.block_until_ready(out)
        row[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / repeats
    return row


def attempt(fn, *args) -> dict:
    """fn(*args), or the error it raised as a row: an out-of-memory or a kernel that does not lower is a result.
    The row keeps the innermost frames too (a device's time is short: the next fix starts from them)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(e.__traceback__)[-6:]]
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}",
                "where": frames}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The JSON report as Markdown tables."""
    lines = [f"{result['device']}, {result['date']}", "",
             "| model | dtype | step ms | items/s | TFLOP/step | MFU | compile s | PyTorch step ms "
             "| speed vs PyTorch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["models"].items():
        t = result["torch"].get(name, {})
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | {fmt(t.get('step_ms'), '.1f')} | |")
            continue
        ratio = f"{t['step_ms'] / r['step_ms']:.2f}x" if "step_ms" in t else t.get("error", "-")
        lines.append(f"| {name} | {r['dtype']} | {r['step_ms']:.1f} | {r['items_per_s']:,.0f} | "
                     f"{fmt(r['tflops_per_step'], '.2f')} | {fmt(r['mfu'], '.1%')} | {r['compile_s']:.1f} | "
                     f"{fmt(t.get('step_ms'), '.1f')} | {ratio} |")
    lines += ["", "| scan | L | fwd+bwd s | peak MiB |", "|---|---|---|---|"]
    for r in result["scans"]:
        cells = f"{r['seconds']:.4f} | {r['peak_bytes'] / 2**20:,.0f}" if "seconds" in r else f"{r['error']} |"
        lines.append(f"| {r['scan']} | {r['length']} | {cells} |")
    lines += ["", "| attention L | kernel | kernel fwd+bwd ms | plain fwd+bwd ms |", "|---|---|---|---|"]
    for r in result["attention"]:
        cells = (f"{r['kernel']} | {r['kernel_ms']:.2f} | {r['plain_ms']:.2f}" if "kernel_ms" in r
                 else f"{r['error']} | |")
        lines.append(f"| {r.get('length')} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any backend")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (valid: {', '.join(SECTIONS)})")
    parser.add_argument("--models", default=None, help="comma-separated model rows (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "accelerator.json")
    args = parser.parse_args()
    models = SMOKE if args.smoke else MODELS
    sections = args.only.split(",")
    chosen = args.models.split(",") if args.models else list(models)
    for option, asked, valid in [("--only section", sections, SECTIONS), ("--models row", chosen, models)]:
        if unknown := [name for name in asked if name not in valid]:
            sys.exit(f"error: {option} {unknown[0]!r} is not known (valid: {', '.join(valid)})")
    if args.steps < 1:
        sys.exit(f"error: --steps {args.steps} is not valid (valid: a positive number of timed steps)")
    args.out = writable_out(args.out, "accelerator.json")
    scan_lengths = [64, 128] if args.smoke else [1024, 4096, 16384]
    attention_lengths = [32] if args.smoke else [1024, 4096]
    scans = ["sequential", "chunked"] if args.smoke else ["associative", "chunked", "pallas"]
    runtime.apply(**compose([]).runtime)  # the settings `python -m train` applies before its first computation
    twins = torch_device(args.smoke)
    device = f"{jax.devices()[0].device_kind} x {jax.device_count()} ({jax.default_backend()})"
    result = {"date": str(date.today()), "device": device, "models": {}, "torch": {}, "scans": [], "attention": []}

    def record(section: str, row: dict, name: str | None = None) -> None:
        if name is None:
            result[section].append(row)
        else:
            result[section][name] = row
        print(section, name or "", row, flush=True)
        replace_text(args.out, json.dumps(result, indent=1))
        replace_text(args.out.with_suffix(".md"), markdown(result))

    for section in sections:
        if section == "models":
            run_models(chosen, models, 2 if args.smoke else args.steps, twins, record)
        elif section == "scans":
            run_scans(scan_lengths, scans, args.smoke, record)
        else:
            for length in attention_lengths:
                record("attention", {"length": length, **attempt(attention_row, length, 2 if args.smoke else 10)})
    print(markdown(result))


def run_models(chosen: list[str], models: dict, steps: int, twins: str | None, record) -> None:
    """archlab's train step of each chosen model, then its PyTorch twin's where one runs here."""
    for name in chosen:
        overrides, items = models[name]
        record("models", attempt(train_throughput, overrides, items, steps), name)
        if twins and not any(o in overrides for o in NO_TORCH_TWIN_ON_GPU):
            record("torch", attempt(torch_throughput, overrides, items, steps, twins), name)


def run_scans(lengths: list[int], scans: list[str], smoke: bool, record) -> None:
    """Forward+backward of each scan at each length (Mamba-130m's d_inner 1536 and state 16, batch 8)."""
    for length in lengths:
        inputs = make_inputs(1 if smoke else 8, length, 16 if smoke else 1536, 16, jax.random.key(0))
        for scan in scans:
            record("scans", {"scan": scan, "length": length, **attempt(measure, scan, 256, inputs, 1 if smoke else 3)})


if __name__ == "__main__":
    main()
