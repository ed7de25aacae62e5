"""Training-step benchmark: archlab's `python -m train` step against the plain PyTorch programs of the same models.

    python scripts/bench.py                                  # the whole suite, 3 alternating rounds
    python scripts/bench.py gpt_char resnet20 --rounds 5     # some entries
    python scripts/bench.py gpt_char --set trainer.batch_size=16   # any training override, for every entry

Each suite entry is a list of `python -m train` overrides. For each, three worker processes are started:
archlab (the real train loop, `train.loop.train`, data feeding included; it pauses between its logged windows),
the PyTorch twin in eager mode, and the twin under torch.compile (scripts/torch_twins.py: same shapes, same
optimizer, same parameter count). They take turns, one window of about `--window-seconds` each, for `--rounds`
rounds, so that the machine's drift hits all three alike. Figures per entry: steps/s of each and the
archlab / PyTorch ratios (per round, then median and range), tokens or examples per second, achieved GFLOP/s
and its fraction of the fp32 matmul peak measured by both frameworks in the same run, cold first-step compile
time, peak RSS, and the share of step time spent waiting for input. Writes JSON and a Markdown table.
"""

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the PyTorch workers only
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SUITE: dict[str, list[str]] = {
    "mlp": ["model=mlp", "data=digits"],
    "lenet": ["model=lenet", "data=digits"],
    "resnet20": ["model=resnet20", "data=digits", "optim=sgd"],
    # ImageNet's ResNet-18 (7x7/2 stem, 3x3/2 max pool, 64-512 channels) on 64x64 images, as for Tiny ImageNet
    "resnet18": ["model=resnet18", "data=random_images", "data.image_size=64", "data.num_classes=10",
                 "trainer.batch_size=32", "optim=sgd"],
    "vit_tiny": ["model=vit_tiny", "data=digits"],
    "gpt_small": ["model=gpt", "data=bytes", "data.seq_len=64", "trainer.batch_size=12"],
    "gpt_char": ["model=gpt", "data=bytes", "data.seq_len=256", "model.num_layers=6", "model.d_model=384",
                 "model.num_heads=6", "trainer.batch_size=8"],
    "mamba": ["model=mamba", "data=bytes", "data.seq_len=256", "trainer.batch_size=16"],
    "simba": ["model=simba", "data=digits"],
    "transformer": ["model=transformer", "data=numbers_en_fr", "trainer.batch_size=64"],
}
PROGRAMS = ("archlab", "eager", "compile")
MATMUL_N = 2048  # the peak is the best fp32 (N x N) @ (N x N) either framework reaches
MAX_LOGGED_WINDOWS = 32  # archlab's timed window is at most this many of its logged windows


# ---- Workers: one process per program, driven by line commands on stdin, answering JSON lines ----------


def reply(**fields) -> None:
    print(json.dumps(fields), flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def items_per_step(cfg) -> int:
    """Tokens (sequence tasks) or examples (classification) in one step's batch."""
    task, batch = cfg.data.task, cfg.trainer.batch_size
    if task == "next_token":
        return batch * cfg.data.seq_len
    if task == "seq2seq":
        return batch * cfg.data.tgt_len
    return batch


def archlab_worker(overrides: list[str], window: int, windows: int) -> None:
    """The real train loop, logging every `window` steps; `run N` times the next N logged windows as one (at most
    `windows` in all) and reports their steps/s, then it waits for the next command."""
    from train import autotune, runtime  # jax is imported, not started: the runtime flags still apply
    from train.config import compose

    run_dir = Path(tempfile.mkdtemp(prefix="bench-archlab-"))
    # Warm-up: the compiling first step and runtime.autotune's timed steps (on here, as for a long CPU run), up to
    # the first logged window after its choice.
    warmup = window * -(-(1 + autotune.MAX_TUNING_STEPS) // window)
    steps = warmup + window * (windows - 1) + 1  # never reaches its last step: no final eval or checkpoint is timed
    cfg = compose(["runtime.autotune=true", *overrides, f"trainer.steps={steps}", f"trainer.log_every={window}",
                   f"trainer.eval_every={steps}", f"checkpoint.every={steps}", "runtime.compilation_cache=false"])
    runtime.apply(**cfg.runtime)
    tuning = autotune.applies(cfg.runtime, steps)
    import jax

    from models import cpu_kernels

    cpu_kernels.available()  # built once a machine (~30 s), then cached: not part of the first step's compile time

    from train import loop
    from train.writers import read_metrics

    dots = []  # the dot library runtime.autotune chose, from its log record

    class AutotuneChoice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "autotune_choice"):
                dots.append(record.autotune_choice)

    logging.getLogger("train.autotune").addHandler(AutotuneChoice(logging.INFO))
    logging.getLogger("train.autotune").setLevel(logging.INFO)

    warm = False
    windows_run, pending, seconds, waited = 0, 0, 0.0, 0.0  # this run's windows, those left, their (wait) seconds

    def on_log(step: int, metrics: dict) -> None:
        nonlocal warm, windows_run, pending, seconds, waited
        if not warm:
            if tuning and not dots:
                return
            warm = True
            compile_s = read_metrics(run_dir / "metrics.jsonl")[0]["train/first_step_seconds"]
            reply(ready=True, compile_s=compile_s, items_per_step=items_per_step(cfg), dots=dots[-1] if dots else None)
        else:
            window_s = window / metrics["train/steps_per_sec"]
            seconds, waited, pending = seconds + window_s, waited + metrics["train/input_wait"] * window_s, pending - 1
            if pending:
                return
            reply(steps_per_sec=windows_run * window / seconds, input_wait=waited / seconds, loss=metrics["train/loss"])
        while (command := sys.stdin.readline().split()) and command[0] == "peak":
            reply(gflops=jax_matmul_gflops())
        if not command or command[0] != "run":
            shutil.rmtree(run_dir, ignore_errors=True)
            reply(peak_rss_mb=peak_rss_mb())
            os._exit(0)
        windows_run = pending = int(command[1])
        seconds = waited = 0.0

    loop.train(loop.setup(cfg, run_dir), on_log=on_log)


def jax_matmul_gflops() -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(x, x).block_until_ready()
    return max(2 * MATMUL_N**3 / timed(lambda: matmul(x, x).block_until_ready()) / 1e9 for _ in range(5))


def torch_matmul_gflops() -> float:
    import torch

    x = torch.ones(MATMUL_N, MATMUL_N)
    torch.mm(x, x)
    return max(2 * MATMUL_N**3 / timed(lambda: torch.mm(x, x)) / 1e9 for _ in range(5))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def step_flops(model: "torch.nn.Module", task: str, batch: dict) -> int:
    """Matmul, convolution and attention FLOPs of one forward and backward pass of the twin (PyTorch's
    FlopCounterMode, with `attention_flop_formulas` for the attention it counts as none on a CPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from scripts.torch_twins import train_loss

    with FlopCounterMode(display=False, custom_mapping=attention_flop_formulas()) as counter:
        train_loss(model, task, batch).backward()
    return counter.get_total_flops()


def attention_flop_formulas() -> dict:
    """FlopCounterMode formulas for `F.scaled_dot_product_attention` on a CPU, whose flash kernel PyTorch's counter
    does not know (it counts 0). Model FLOPs, as train/flops.py counts archlab's attention kernel: the forward's
    q k^T and p v, the backward's four products (the recomputed logits left out), and under a causal mask the
    half of each product it leaves."""
    import torch

    def products(q, k, v, causal: bool) -> int:  # one q k^T and one p v, shapes (B, H, T, D)
        (b, h, t, dq), s, dv = q, k[2], v[3]
        return 2 * b * h * t * s * (dq + dv) // (2 if causal else 1)

    def forward(q, k, v, dropout_p=0.0, is_causal=False, **_) -> int:
        return products(q, k, v, is_causal)

    def backward(grad_out, q, k, v, out, logsumexp, dropout_p=0.0, is_causal=False, **_) -> int:
        return 2 * products(q, k, v, is_causal)

    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def torch_worker(overrides: list[str], compiled: bool) -> None:
    """The PyTorch twin, trained as a PyTorch user writes the loop; windows of `run N` steps on command."""
    import torch
    from omegaconf import OmegaConf

    from scripts.torch_twins import to_torch, train_loss, twin
    from train import targets
    from train.config import compose

    cfg = compose(overrides)
    tc, task = cfg.trainer, cfg.data.task
    torch.manual_seed(tc.seed)
    dataset = targets.instantiate(cfg.data, _convert_="all")
    model = twin(OmegaConf.to_container(cfg.model, resolve=True))
    model.train()
    optimizer, schedule = torch_optimizer(model, OmegaConf.to_container(cfg.optim, resolve=True), tc.steps)
    forward = torch.compile(model) if compiled else model

    def train_step(step: int) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        batch = to_torch(dataset.train_batch(step, tc.batch_size))
        wait = time.perf_counter() - t
        loss = train_loss(forward, task, batch)
        torch_update(model, optimizer, schedule, loss, cfg.optim.clip_norm)
        return loss, wait

    flops = step_flops(model, task, to_torch(dataset.train_batch(0, tc.batch_size)))
    optimizer.zero_grad(set_to_none=True)
    first_step_s = timed(lambda: train_step(0))
    warm_s = timed(lambda: [train_step(s) for s in (1, 2)]) / 2
    if compiled:  # inductor's pool of compile processes stays up and takes CPU from the others' windows
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
    reply(ready=True, compile_s=first_step_s, step_s=warm_s, flops=flops,
          params=sum(p.numel() for p in model.parameters()), threads=torch.get_num_threads())
    step = 3
    while command := sys.stdin.readline().split():
        if command[0] == "peak":
            reply(gflops=torch_matmul_gflops())
        elif command[0] == "run":
            n, input_wait = int(command[1]), 0.0
            t = time.perf_counter()
            for _ in range(n):
                loss, wait = train_step(step)
                input_wait += wait
                step += 1
            loss = loss.item()
            seconds = time.perf_counter() - t
            reply(steps_per_sec=n / seconds, input_wait=input_wait / seconds, loss=loss)
        else:
            break
    reply(peak_rss_mb=peak_rss_mb())


def torch_update(model: "torch.nn.Module", optimizer, schedule, loss: "torch.Tensor",
                 clip_norm: float | None) -> None:
    """One optimizer update from `loss`, as archlab's step makes it: gradients, clipping to `clip_norm`, the step,
    the schedule's step."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    schedule.step()


def torch_optimizer(model, optim: dict, total_steps: int):
    """The archlab optimizer's twin: AdamW or SGD with train/optim.py's decay mask and learning-rate schedule."""
    import numpy as np
    import torch

    from train.optim import NO_DECAY_NAMES, warmup_cosine

    decays = lambda name, p: p.ndim >= 2 and name.split(".")[-1] not in NO_DECAY_NAMES
    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if decays(n, p)], "weight_decay": optim["weight_decay"]},
              {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0}]
    name = optim["_target_"].rsplit(".", 1)[-1]
    if name == "adamw":
        opt = torch.optim.AdamW(groups, lr=optim["lr"], betas=(optim["b1"], optim["b2"]))
    elif name == "sgd":
        opt = torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"])
    else:
        raise ValueError(f"bench: optimizer {optim['_target_']!r} has no PyTorch twin (valid: adamw, sgd)")
    # archlab's own schedule, evaluated once for every step; LambdaLR scales the base learning rate by it.
    schedule = warmup_cosine(optim["lr"], optim["end_lr"], optim["warmup_steps"], total_steps)
    factors = np.asarray(schedule(np.arange(total_steps + 1))) / optim["lr"]
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(factors[min(step, total_steps)]))


# ---- Orchestrator ---------------------------------------------------------------------------------------


class Worker:
    """A worker process of this script, spoken to in lines."""

    def __init__(self, program: str, overrides: list[str], env: dict, extra: list[str] = ()):
        cmd = [sys.executable, __file__, "--worker", program, *extra, "--set", *overrides]
        self.log = tempfile.TemporaryFile("w+")  # the worker's stderr, shown if it fails
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.program = program

    def read(self) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"bench: the {self.program} worker ended without an answer (exit {self.proc.wait()}): "
                           f"{tail[0]}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> float | None:
        try:
            rss = self.ask("quit").get("peak_rss_mb")
        except (RuntimeError, BrokenPipeError):
            rss = None
        self.proc.wait()
        return rss


def bench_entry(name: str, overrides: list[str], args, env: dict) -> dict:
    """Alternate archlab, eager and compiled PyTorch windows on one suite entry."""
    programs = [p for p in PROGRAMS if p != "compile" or args.compile]
    workers, ready = {}, {}
    try:
        workers["eager"] = Worker("eager", overrides, env)
        ready["eager"] = workers["eager"].read()
        window = max(2, min(1000, round(args.window_seconds / ready["eager"]["step_s"])))
        workers["archlab"] = Worker("archlab", overrides, env, ["--window", str(window), "--windows",
                                                                str(1 + args.rounds * MAX_LOGGED_WINDOWS + 1)])
        ready["archlab"] = workers["archlab"].read()
        # archlab's timed window: as many of its logged windows (of eager's `window` steps) as fill --window-seconds,
        # from one untimed run of one: a program 10x faster than eager is otherwise timed over a tenth of the time.
        rate = workers["archlab"].ask("run 1")["steps_per_sec"]
        logged = max(1, min(MAX_LOGGED_WINDOWS, round(args.window_seconds * rate / window)))
        if "compile" in programs:
            workers["compile"] = Worker("compile", overrides, env)
            try:
                ready["compile"] = workers["compile"].read()
            except RuntimeError as e:  # torch.compile does not serve every model everywhere: report it, go on
                print(e, file=sys.stderr)
                programs.remove("compile")
                workers.pop("compile").close()
        rounds = {p: [] for p in programs}
        peaks = []
        for _ in range(args.rounds):
            for program in programs:
                time.sleep(0.3)  # let the previous program's threads go idle
                rounds[program].append(workers[program].ask(f"run {logged if program == 'archlab' else window}"))
            peaks += [workers["archlab"].ask("peak")["gflops"], workers["eager"].ask("peak")["gflops"]]
    finally:
        rss = {p: w.close() for p, w in workers.items()}
    return summarize_entry(name, overrides, window, logged, programs, ready, rounds, peaks, rss)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize_entry(name, overrides, window, logged, programs, ready, rounds, peaks, rss) -> dict:
    flops, items = ready["eager"]["flops"], ready["archlab"]["items_per_step"]
    peak = max(peaks)
    out = {"overrides": overrides, "params": ready["eager"]["params"], "window_steps": window,
           "archlab_window_steps": window * logged,
           "items_per_step": items, "gflop_per_step": flops / 1e9, "matmul_peak_gflops": peak,
           "archlab_dots": ready["archlab"].get("dots"), "programs": {}}
    for p in programs:
        rates = [r["steps_per_sec"] for r in rounds[p]]
        median = statistics.median(rates)
        out["programs"][p] = {
            "steps_per_sec": spread(rates), "items_per_sec": median * items,
            "gflops": median * flops / 1e9, "fraction_of_peak": median * flops / 1e9 / peak,
            "compile_s": ready[p]["compile_s"], "peak_rss_mb": rss[p],
            "input_wait": statistics.median(r["input_wait"] for r in rounds[p]),
        }
    for p in programs[1:]:
        out[f"archlab_over_{p}"] = spread([a["steps_per_sec"] / b["steps_per_sec"]
                                           for a, b in zip(rounds["archlab"], rounds[p])])
    return out


def markdown(results: dict, meta: dict) -> str:
    """The suite table, one row per entry."""
    head = ["model", "params", "archlab steps/s", "eager steps/s", "compile steps/s", "archlab / eager",
            "archlab / compile", "archlab dots", "archlab items/s", "archlab GFLOP/s (% of peak)",
            "compile s (archlab / eager / compile)", "peak RSS MB (archlab / eager)", "input wait (archlab / eager)"]
    lines = [f"Machine: {meta['machine']}; {meta['date']}; `{meta['command']}`; fp32 matmul peak (the best of jax "
             f"and torch, measured in the same run): {meta['matmul_peak_gflops']:.0f} GFLOP/s. Medians over "
             f"{meta['rounds']} alternating rounds; ratios with their [min-max] over the rounds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    num = lambda x: f"{x:.3g}" if x < 100 else f"{x:,.0f}"
    for name, r in results.items():
        a, e, c = (r["programs"].get(p) for p in PROGRAMS)
        rate = lambda p: num(p["steps_per_sec"]["median"]) if p else "-"
        ratio = lambda k: f"{r[k]['median']:.2f}x [{r[k]['min']:.2f}-{r[k]['max']:.2f}]" if k in r else "-"
        field = lambda p, k, f: f.format(p[k]) if p and p[k] is not None else "-"
        lines.append("| " + " | ".join([
            name, f"{r['params']:,}", rate(a), rate(e), rate(c), ratio("archlab_over_eager"),
            ratio("archlab_over_compile"), r.get("archlab_dots") or "-", num(a["items_per_sec"]),
            f"{a['gflops']:.1f} ({100 * a['fraction_of_peak']:.0f}%)",
            " / ".join(field(p, "compile_s", "{:.1f}") for p in (a, e, c)),
            " / ".join(field(p, "peak_rss_mb", "{:.0f}") for p in (a, e)),
            " / ".join(field(p, "input_wait", "{:.1%}") for p in (a, e))]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="*", help=f"suite entries (default: all of {', '.join(SUITE)})")
    parser.add_argument("--set", nargs="*", default=[], help="training overrides for every entry")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-seconds", type=float, default=2.0, help="target length of one timed window")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile column")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "bench.json",
                        help="the JSON file (a .md table beside it), or a folder to write bench.json into")
    parser.add_argument("--worker", choices=PROGRAMS, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--windows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "archlab":
        return archlab_worker(args.set, args.window, args.windows)
    if args.worker:
        return torch_worker(args.set, compiled=args.worker == "compile")

    unknown = [e for e in args.entries if e not in SUITE]
    if unknown:
        sys.exit(f"error: bench entry {unknown[0]!r} is not in the suite (valid: {', '.join(SUITE)})")
    if args.rounds < 1 or args.window_seconds <= 0:
        sys.exit(f"error: --rounds {args.rounds} and --window-seconds {args.window_seconds} must be positive")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.config import compose
    from train.loop import check_config

    for name in args.entries or SUITE:  # a bad --set fails now, in one line, not in a worker's traceback
        try:
            check_config(compose([*SUITE[name], *args.set]))
        except ValueError as e:
            sys.exit(f"error: {e}")
        except (HydraException, OmegaConfBaseException) as e:  # an override Hydra cannot apply (a key no group has)
            sys.exit(f"error: {' '.join(str(e).splitlines()[:2])} (bench entry {name})")
    args.out = writable_out(args.out, "bench.json")  # now, not after the suite's 20 minutes
    cache = tempfile.mkdtemp(prefix="bench-inductor-")  # cold torch.compile, as archlab's compile is cold
    env = os.environ | {"PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": cache}
    results = {}
    try:
        for name in args.entries or SUITE:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            results[name] = bench_entry(name, [*SUITE[name], *args.set], args, env)
            table = write_results(args.out, results, args.rounds)  # after each entry: a crash keeps the rest
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(table)


def write_results(out: Path, results: dict, rounds: int) -> str:
    """Write the JSON and the markdown table of the entries timed so far; return the table."""
    meta = {"machine": machine(), "date": date.today().isoformat(),
            "command": " ".join(["python scripts/bench.py", *sys.argv[1:]]), "rounds": rounds,
            "matmul_peak_gflops": max(r["matmul_peak_gflops"] for r in results.values())}
    table = markdown(results, meta)
    replace_text(out, json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    replace_text(out.with_suffix(".md"), table)
    return table


def replace_text(path: Path, text: str) -> None:
    """Write `text` beside `path`, then rename it over `path`: a crash never leaves half a file."""
    partial_path(path).write_text(text)
    partial_path(path).replace(path)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def writable_out(out: Path, name: str) -> Path:
    """--out as the file to write (`name` in it if it is a folder), once the file written first and renamed into
    place (`partial_path`) could be created there; otherwise exit with one line."""
    if out.is_dir():
        out = out / name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        partial_path(out).touch()
        partial_path(out).unlink()
    except OSError as e:
        sys.exit(f"error: --out {out} cannot be written ({e.strerror}); give a writable file or folder")
    return out


def machine() -> str:
    """Architecture, CPU count and CPU model (the model name from /proc/cpuinfo where there is one)."""
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.system()
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {name}"


if __name__ == "__main__":
    main()
