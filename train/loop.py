"""The train loop: set up devices, data, model and optimizer; init or restore; one jitted step; eval; save.

`setup(cfg, run_dir)` does everything that can fail on a bad config (before any compile) and returns an
`Experiment`; `train(exp)` runs it and returns the final evaluation metrics.
"""

import dataclasses
import errno
from collections import deque
from concurrent.futures import ThreadPoolExecutor
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from train import mesh as mesh_lib
from train import autotune, pretrained, runlock, targets
from train.checkpoint import Checkpoints
from train.config import Checkpoint, Trainer, check_arguments, check_missing, check_model_values
from train.datafit import check_model_reads_data, check_vocabulary
from train.preemption import NonFinite, Preempted, Preemption, defer_stop_signals
from train.profiling import Profile, check_profile
from train.tasks import TASKS, metric_sums, summarize
from train.writers import MetricWriter, progress_line, write_results

log = logging.getLogger(__name__)
logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU found" on every CPU run
PREFETCH = 2  # batches loaded ahead of the step that uses them
LONG_STEP_SECONDS = 0.05  # on CPU, a step this long runs alone (Throttle): dispatching costs it under 1%


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built and checked, nothing compiled yet."""

    cfg: DictConfig
    run_dir: Path
    mesh: jax.sharding.Mesh
    dataset: Any
    task: str
    create_model: Callable[[], nnx.Module]
    graphdef_train: Any
    graphdef_eval: Any
    tx: optax.GradientTransformation
    abstract_state: Any
    shardings: Any
    shard: tuple[int, int]
    init: Callable[[], Any]
    checkpoints: Checkpoints
    model_cfg: dict
    final_state: Any = None


# ---- Setup (every check before any compile) -------------------------------------------------------------


def build(node: DictConfig, **kwargs):
    """`targets.instantiate`, letting a constructor's own ValueError / OSError through as it was raised."""
    try:
        return targets.instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, OSError)):
            raise e.__cause__ from None
        raise


def check_config(cfg: DictConfig) -> None:
    """The checks of the config alone, nothing opened or built: one-line errors for what setup would trip on."""
    targets.check(cfg)  # before anything is built or opened: a config must not run code
    check_model_reads_data(cfg)  # before check_missing, which would stop at the first value the data lacks
    check_missing(cfg)
    for group, target in (("data", None), ("optim", None), ("trainer", Trainer), ("checkpoint", Checkpoint),
                          ("mesh", mesh_lib.make_mesh), ("model", None)):  # model last: it interpolates the others
        check_arguments(cfg[group], group, target)
    check_model_values(cfg.model)


def setup(cfg: DictConfig, run_dir: str | Path) -> Experiment:
    """Build devices, data, model and optimizer from the config; raise one-line errors on bad values."""
    check_config(cfg)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    saved_cfg = run_dir / ".hydra" / "config.yaml"  # `python -m train` writes it; `run(cfg, dir)` too, for scripts
    if not saved_cfg.exists() and jax.process_index() == 0:
        saved_cfg.parent.mkdir(exist_ok=True)
        saved_cfg.write_text(OmegaConf.to_yaml(cfg))
    tc = cfg.trainer
    for key in ("steps", "batch_size", "eval_every", "log_every", "eval_batch_size", "grad_accum"):
        if tc[key] <= 0:
            raise ValueError(f"trainer.{key}={tc[key]} must be a positive integer")
    if tc.profile is not None:
        check_profile(tc.profile, tc.steps)
    if tc.get("max_seconds") is not None and (tc.max_seconds <= 0 or jax.process_count() > 1):
        raise ValueError(f"trainer.max_seconds={tc.max_seconds} must be positive, on one process (hosts would "
                         f"stop at different steps), or null: no time limit")
    if cfg.checkpoint.every <= 0 or cfg.checkpoint.keep <= 0:
        raise ValueError(f"checkpoint.every={cfg.checkpoint.every} and checkpoint.keep={cfg.checkpoint.keep} "
                         f"must be positive")

    # ---- Devices ----
    mesh = mesh_lib.make_mesh(**cfg.mesh)
    dp = mesh_lib.data_parallel_size(mesh)
    split = cfg.get("runtime", {}).get("cpu_devices", 1)
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and split > 1 and jax.local_device_count() != split:
        log.warning("runtime.cpu_devices=%d did not apply: JAX had started with %d CPU device(s) (XLA_FLAGS, or an "
                    "earlier job of this process: a sweep's jobs share the first one's)", split,
                    jax.local_device_count())
    hint = (f", or runtime.cpu_devices=1 (this config splits the CPU into {split} devices)"
            if split > 1 and on_cpu else "")
    for key in ("batch_size", "eval_batch_size"):
        if tc[key] % dp:
            raise ValueError(f"trainer.{key}={tc[key]} is not divisible by the {dp} data-parallel devices "
                             f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
                             f"use a multiple of {dp}{hint}")
    accum = tc.grad_accum
    if tc.batch_size % (accum * dp):
        raise ValueError(f"trainer.batch_size={tc.batch_size} must split into trainer.grad_accum={accum} "
                         f"micro-batches of a multiple of {dp} devices")

    # ---- Data ----
    dataset = build(cfg.data)
    dataset.train_batch(0, tc.batch_size, (jax.process_index(), jax.process_count()))  # data errors before compile
    check_vocabulary(cfg, dataset)
    task = dataset.task
    if task not in TASKS:
        raise ValueError(f"data task {task!r} is not known (valid: {', '.join(TASKS)})")
    metrics = [f"eval/{k}" for k in summarize({"count": 1, "loss": 0.0, "correct": 0}, task)]
    more = hasattr(dataset, "final_metrics")  # eval/ metrics of the dataset's own, known at the end of the run
    if tc.objective not in metrics and not (more and tc.objective.startswith("eval/")):
        raise ValueError(f"trainer.objective={tc.objective} is not a metric of this run (valid: {', '.join(metrics)})")
    shard = (jax.process_index(), jax.process_count())

    # ---- Model and optimizer ----
    seed = tc.seed

    def create_model() -> nnx.Module:
        return build(cfg.model, rngs=nnx.Rngs(params=seed, dropout=seed + 1))

    abstract_model = nnx.eval_shape(create_model)  # shape checks run here, nothing is allocated
    abstract_model.eval()
    graphdef_eval = nnx.split(abstract_model)[0]
    abstract_model.train()
    graphdef_train = nnx.split(abstract_model)[0]
    tx = build(cfg.optim, total_steps=tc.steps)

    def init():
        model = create_model()
        model.train()
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                "opt_state": tx.init(params)}

    abstract_state = jax.eval_shape(init)
    shardings = mesh_lib.state_shardings(abstract_state, mesh)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, shardings)
    # ---- Checkpoints: a run directory holds one model ----
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                              writer=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    check_checkpoint_model(checkpoints, model_cfg)
    if tc.init_from is not None:
        source = OmegaConf.to_container(pretrained.run_config(tc.init_from).model, resolve=True)
        pretrained.check_same_model(source, model_cfg, tc.init_from)
        pretrained.newest_step(tc.init_from)
    return Experiment(cfg, run_dir, mesh, dataset, task, create_model, graphdef_train, graphdef_eval, tx,
                      abstract_state, shardings, shard, init, checkpoints, model_cfg)


def check_checkpoint_model(checkpoints: Checkpoints, model_cfg: dict) -> None:
    """One-line error when the run directory's newest checkpoint was written for another model config."""
    for step in reversed(checkpoints.steps()):
        try:
            meta = checkpoints.read_meta(step)
        except Exception:  # noqa: BLE001  (unreadable: restore_latest sets it aside and says so)
            continue
        if "imported_from" in meta:
            raise ValueError(f"{checkpoints.directory.parent} holds imported weights, not a training run "
                             f"(valid: fine-tune from it with trainer.init_from={checkpoints.directory.parent} "
                             f"and another hydra.run.dir)")
        saved = meta["model"]
        if saved != model_cfg:
            diffs = [f"model.{k}={json.dumps(saved.get(k))} (now {json.dumps(model_cfg.get(k))})"
                     for k in sorted(set(saved) | set(model_cfg)) if saved.get(k) != model_cfg.get(k)]
            raise ValueError(f"checkpoint {step} in {checkpoints.directory} was written for another model: "
                             f"{', '.join(diffs)}; use the same model config or another hydra.run.dir")
        return


def check_writable(run_dir: Path) -> None:
    """One-line error when the output directory cannot be created or written."""
    probe = run_dir / f".write_probe.{os.getpid()}"  # one per process: hosts may share the directory
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            probe.write_bytes(b"0" * 4096)
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(f"output directory {run_dir} is full ({shutil.disk_usage(run_dir).free:,} bytes free); free "
                          f"space and re-run the same command, or choose another with hydra.run.dir=PATH") from None
        raise OSError(f"output directory {run_dir} is not writable ({e.strerror}); "
                      f"choose another with hydra.run.dir=PATH") from None


# ---- Steps --------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class MetricSums:
    """One step's metric sums as one float32 array, read by name (`sums["loss"]`): the loop fetches a logging
    window's steps in one transfer per step rather than one per metric (500 steps: 25 -> 4 ms of host time, during
    which the device idles). Step numbers in it are exact up to 2^24."""

    def __init__(self, names: tuple[str, ...], values: jax.Array):
        self.names, self.values = names, values

    @classmethod
    def pack(cls, sums: dict[str, jax.Array]) -> "MetricSums":
        names = tuple(sorted(sums))
        return cls(names, jnp.stack([jnp.asarray(sums[k], jnp.float32) for k in names]))

    def __getitem__(self, name: str):
        return self.values[self.names.index(name)]

    def tree_flatten(self):
        return (self.values,), self.names

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls(names, *children)


def make_train_step(exp: Experiment, *, flat: bool = False) -> Callable:
    """One jitted step: (state, batch) -> (state, metric sums); the state is donated and updated in place.

    flat=True: the step takes and returns the state as its list of leaves (`jax.tree.leaves` order), which the
    train loop keeps between steps, and its sums as `MetricSums`. jit flattens an nnx.State in Python on every
    call and a list in C++: about 1.3 ms a step for the 225 leaves of a 4-layer GPT and its AdamW moments (README,
    Performance).
    """
    graphdef, tx, task = exp.graphdef_train, exp.tx, exp.task
    accum = exp.cfg.trainer.grad_accum
    big = jnp.iinfo(jnp.int32).max

    def summed_loss(params, model_state, batch):
        # copy=True: fresh Variables of this trace, so BatchNorm can update its statistics inside grad.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        sums = metric_sums(task, model, batch)
        return sums["loss"], (sums, nnx.split(model, nnx.Param, ...)[2])

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def step_fn(state, batch):
        params = state["params"]
        if accum == 1:
            grads, (sums, model_state) = grad_fn(params, state["model_state"], batch)
        else:
            # Row i goes to micro-batch i % accum, so every device keeps its own rows.
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                                 batch)

            def body(carry, mb):
                grads, sums, model_state = carry
                g, (s, model_state) = grad_fn(params, model_state, mb)
                return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s), model_state), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}
            (grads, sums, model_state), _ = jax.lax.scan(body, (zeros, zero_sums, state["model_state"]), micro)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["count"], 1.0), grads)  # grad of the mean loss
        grad_norm = optax.tree.norm(grads)
        # A non-finite loss or gradient never reaches the state: the step is skipped, and counted so that
        # trainer.nan_policy=stop can end the run with its step number and the last checkpoint intact. A
        # conditional, not a select of new against old: the update then runs in place, once (a select made
        # XLA compute it beside the old state and copy: AdamW over GPT d 384's 10.8M parameters 35 -> 7 ms).
        finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm)

        def update(params, opt_state, _):  # the old model state gives way to this step's (BatchNorm statistics)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, model_state

        new_params, opt_state, model_state = jax.lax.cond(finite, update, lambda *old: old, params,
                                                          state["opt_state"], state["model_state"])
        new_state = {"step": state["step"] + 1, "params": new_params, "model_state": model_state,
                     "opt_state": opt_state}
        return new_state, sums | {"grad_norm": jnp.where(finite, grad_norm, 0.0),
                                  "nonfinite": (~finite).astype(jnp.float32),
                                  "first_nonfinite": jnp.where(finite, big, state["step"] + 1)}

    batch_sharding = mesh_lib.batch_sharding(exp.mesh)
    if not flat:
        return jax.jit(step_fn, in_shardings=(exp.shardings, batch_sharding), out_shardings=(exp.shardings, None),
                       donate_argnums=0)
    treedef, shardings = jax.tree.structure(exp.abstract_state), jax.tree.leaves(exp.shardings)

    def flat_step_fn(leaves, batch):
        state, sums = step_fn(jax.tree.unflatten(treedef, leaves), batch)
        return jax.tree.leaves(state), MetricSums.pack(sums)

    return jax.jit(flat_step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=0)


def make_eval_step(exp: Experiment) -> Callable:
    """Jitted metric sums of the eval-mode model (running BatchNorm averages, no dropout) on one batch."""
    graphdef, task = exp.graphdef_eval, exp.task

    def eval_fn(state, batch):
        return metric_sums(task, nnx.merge(graphdef, state["params"], state["model_state"]), batch)

    return jax.jit(eval_fn)


def window_sums(steps: list[MetricSums]) -> dict:
    """Sum step metrics fetched for a logging window (the first non-finite step is a minimum, not a sum).

    The step's metric arrays stay on the device until the window is logged and are added here on the host:
    adding them as they come would cost a few dispatches every step.
    """
    values = np.stack([np.asarray(s.values) for s in steps])  # (steps, metrics)
    return {k: (values[:, i].min() if k == "first_nonfinite" else values[:, i].sum())
            for i, k in enumerate(steps[0].names)}


class Throttle:
    """Bounds how far the loop runs ahead of the device: two unfinished steps at most, one on CPU if steps are long.

    Asynchronous dispatch lets the loop queue steps up to its next log (or a whole evaluation split), and on CPU
    each step queued while another runs holds working memory of its own: Mamba's associative scan at batch 128
    (10.4 GB a step) was killed at 24 GB unbounded and peaks at 10.2 GB bounded (README, Precision and memory).
    Two keep a short step's device busy while the host dispatches the next; a long step loses nothing by waiting
    for the one before it to finish.
    """

    def __init__(self):
        self.pending: deque = deque()  # dispatched, not yet waited for
        self.on_cpu = jax.default_backend() == "cpu"
        self.limit = 1 if self.on_cpu else 2  # on CPU, one until a step has been timed
        self.finished_at: float | None = None  # when the last step waited for was seen finished

    def __call__(self, out: Any) -> None:
        """Note `out`, the output of a step just dispatched; wait while `limit` or more steps are unfinished."""
        self.pending.append(out)
        while len(self.pending) >= self.limit:
            jax.block_until_ready(self.pending.popleft())
            now = time.perf_counter()
            if self.on_cpu and self.finished_at is not None:  # the time between steps finishing: a step's time
                self.limit = 1 if now - self.finished_at >= LONG_STEP_SECONDS else 2
            self.finished_at = now


def evaluate(exp: Experiment, eval_step: Callable, state, **batches: Any) -> dict[str, float]:
    """Metrics over the whole evaluation split (padding rows masked out); `batches` go to the dataset's
    `eval_batches` (the UAT's `split`)."""
    totals, throttle = None, Throttle()
    for batch in exp.dataset.eval_batches(exp.cfg.trainer.eval_batch_size, exp.shard, **batches):
        sums = eval_step(state, mesh_lib.global_batch(batch, exp.mesh))
        throttle(sums)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return summarize(jax.device_get(totals), exp.task)


def eval_model(exp: Experiment, state) -> nnx.Module:
    """The eval-mode nnx model holding the state's parameters (for decoding and sampling)."""
    return nnx.merge(exp.graphdef_eval, state["params"], state["model_state"])


# ---- Train loop ---------------------------------------------------------------------------------------


def train(exp: Experiment, on_log: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Run (or resume) the experiment to trainer.steps; returns the final evaluation metrics.

    `on_log(step, metrics)` is called with every logged window, outside the window's timing (scripts/bench.py
    takes turns with the programs it compares there).
    """
    cfg, tc = exp.cfg, exp.cfg.trainer
    defer_stop_signals()  # a stop signal from here on ends the run at its next step, with a checkpoint
    is_main = jax.process_index() == 0
    writer = MetricWriter(exp.run_dir, enabled=is_main)
    checkpoints, model_cfg = exp.checkpoints, exp.model_cfg

    def save(step: int, state) -> None:
        checkpoints.save(step, state, {"step": step, "data_step": step, "model": model_cfg,
                                       "train_seconds": train_seconds()})

    def train_seconds() -> float:
        """Wall time in train steps so far: from the end of the first (compiling) step, evaluations excluded,
        added to what the restored checkpoint had taken (what trainer.max_seconds counts)."""
        return seconds_before + time.perf_counter() - clock_start - paused

    # ---- Init or restore ----
    state, start = restore_latest(checkpoints, exp)
    if state is None:
        state = jax.jit(exp.init, out_shardings=exp.shardings)()
        if tc.init_from is not None:
            state = pretrained.init_from(state, Path(tc.init_from), list(tc.init_exclude))
    else:
        log.info("resumed from step %d in %s", start, checkpoints.directory)
    writer.drop_after(start if start else -1)
    max_seconds = tc.get("max_seconds")
    seconds_before = checkpoints.read_meta(start).get("train_seconds", 0.0) if start else 0.0
    end = start if max_seconds is not None and seconds_before >= max_seconds else tc.steps  # stopped there before
    clock_start, paused = time.perf_counter(), 0.0
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log.info("model %s: %s parameters; data %s; mesh %s; %d steps of batch %d", cfg.model._target_,
             f"{num_params:,}", cfg.data._target_, dict(exp.mesh.shape), tc.steps, tc.batch_size)

    def load(step: int) -> dict[str, jax.Array]:
        return mesh_lib.global_batch(exp.dataset.train_batch(step, tc.batch_size, exp.shard), exp.mesh)

    train_step, eval_step = make_train_step(exp, flat=True), make_eval_step(exp)
    if autotune.applies(cfg.runtime, tc.steps - start):
        train_step = autotune.Autotuned(train_step, autotune.dot_candidates(cfg.runtime), tc.steps - start)
    treedef, leaves = jax.tree.structure(state), jax.tree.leaves(state)

    def current_state():
        """The state as a tree, for evaluation, checkpoints and the end of the run (the steps keep its leaves)."""
        return jax.tree.unflatten(treedef, leaves)

    profile = Profile(tc.profile, exp.run_dir / "profile") if tc.profile and is_main else None

    # ---- Train ----
    window: list[dict] = []
    window_start = timed_from = start  # the window's first step; its first step after compilation
    input_wait, t0 = 0.0, time.perf_counter()
    throttle = Throttle()
    eval_metrics: dict[str, float] = {}
    last_saved = start
    plain = is_main and not sys.stderr.isatty()  # Slurm, nohup, CI, `> log 2>&1`: a line per window, no redraws
    bar = tqdm(range(start, end), initial=start, total=tc.steps, disable=not is_main or plain,
               dynamic_ncols=True, mininterval=0.5)
    try:
        with Preemption() as preemption, ThreadPoolExecutor(1) as prefetch:
            # Batches load PREFETCH steps ahead in a thread: with asynchronous dispatch the loop runs ahead of
            # the device, so one batch ahead would leave the loader racing the very step it is needed for.
            pending = deque(prefetch.submit(load, s) for s in range(start, min(start + PREFETCH, tc.steps)))
            for step in bar:
                if profile:
                    profile.before(step, leaves)
                t_wait = time.perf_counter()
                batch = pending.popleft().result()
                # Input wait is time the device sat idle for want of a batch. With asynchronous dispatch the loop
                # waits for the loader while earlier steps still run; a wait that ends with the last step still
                # running cost nothing. One that ends with it done counts in full (an upper bound).
                if not window or window[-1].values.is_ready():
                    input_wait += time.perf_counter() - t_wait
                if step + PREFETCH < tc.steps:
                    pending.append(prefetch.submit(load, step + PREFETCH))
                leaves, sums = train_step(leaves, batch)
                window.append(sums)
                throttle(sums)
                done = step + 1
                if step == start:  # the first step compiles: timed alone, and the window's rate starts after it
                    jax.block_until_ready(sums)
                    first_step_seconds = time.perf_counter() - t0
                    writer.write(start, {"train/first_step_seconds": first_step_seconds})
                    log.info("first step (compile included): %.1f s", first_step_seconds)
                    timed_from, input_wait, t0 = done, 0.0, time.perf_counter()
                    clock_start = t0
                elif max_seconds is not None:
                    jax.block_until_ready(sums)  # the step done, not only dispatched
                out_of_time = max_seconds is not None and train_seconds() >= max_seconds
                last = done == tc.steps or out_of_time
                checkpoint_now = done % cfg.checkpoint.every == 0 or last
                if done % tc.log_every == 0 or checkpoint_now:  # the window is checked before every save
                    sums = window_sums(jax.device_get(window))
                    if sums["nonfinite"] > 0 and tc.nan_policy == "stop":
                        raise NonFinite(
                            f"non-finite loss or gradient norm at step {int(sums['first_nonfinite'])}; "
                            f"stopped (last good checkpoint: {f'step {last_saved}' if last_saved else 'none yet'} in "
                            f"{checkpoints.directory}); "
                            f"lower optim.lr, set optim.clip_norm, or skip such steps with "
                            f"trainer.nan_policy=skip")
                    seconds = time.perf_counter() - t0
                    metrics = {f"train/{k}": v for k, v in summarize(sums, exp.task).items()}
                    metrics |= {"train/grad_norm": float(sums["grad_norm"]) / (done - window_start),
                                "train/skipped_steps": float(sums["nonfinite"])}
                    if done > timed_from:  # not a window of the first step alone
                        rate = (done - timed_from) / seconds
                        metrics |= {"train/steps_per_sec": rate, "train/examples_per_sec": rate * tc.batch_size,
                                    "train/input_wait": input_wait / seconds}
                        bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", steps_s=f"{rate:.1f}",
                                        ex_s=f"{rate * tc.batch_size:.0f}")
                    writer.write(done, metrics)
                    if plain:
                        log.info(progress_line(done, tc.steps, metrics))
                    if on_log is not None:
                        on_log(done, metrics)
                    window, window_start, timed_from, input_wait, t0 = [], done, done, 0.0, time.perf_counter()
                if done % tc.eval_every == 0 or last:
                    t_eval = time.perf_counter()
                    eval_metrics = {f"eval/{k}": v for k, v in evaluate(exp, eval_step, current_state()).items()}
                    writer.write(done, eval_metrics)
                    if is_main:
                        (log.info if plain else bar.write)(
                            f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    eval_seconds = time.perf_counter() - t_eval
                    t0 += eval_seconds  # the next window's rate counts train steps only
                    paused += eval_seconds  # and trainer.max_seconds too
                if checkpoint_now:
                    save(done, current_state())
                    last_saved = done
                if preemption.reached(done):  # after the step's log, evaluation and checkpoint: none is skipped
                    if last_saved != done:
                        save(done, current_state())
                    checkpoints.wait()  # written before it is announced
                    log.error("stopped by signal %d after step %d; checkpoint saved in %s; re-run the same "
                              "command to resume", preemption.signum, done, checkpoints.directory)
                    raise Preempted(preemption.exit_code)
                if out_of_time and done < tc.steps:
                    log.info("trainer.max_seconds=%s reached: stopped after step %d of %d", max_seconds, done, tc.steps)
                    break
    finally:
        bar.close()
        if profile:
            profile.close(leaves)
        checkpoints.close()  # waits for an async save in flight: a started checkpoint is always finished

    # ---- Finish ----
    state = current_state()
    if not eval_metrics:  # resumed at the end: evaluate the restored state
        eval_metrics = {f"eval/{k}": v for k, v in evaluate(exp, eval_step, state).items()}
    if hasattr(exp.dataset, "final_metrics"):
        final = {f"eval/{k}": v for k, v in exp.dataset.final_metrics(eval_model(exp, state)).items()}
        eval_metrics |= final
        writer.write(int(state["step"]), final)  # tc.steps, or where trainer.max_seconds stopped the run
    writer.close()
    if is_main:
        write_results(exp.run_dir, writer.path, eval_metrics)
        log.info("final: %s", ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        log.info("outputs in %s (metrics.jsonl, tensorboard/, checkpoints/, curves.png)", exp.run_dir.absolute())
    exp.final_state = state
    return eval_metrics


def restore_latest(checkpoints: Checkpoints, exp: Experiment) -> tuple[Any, int]:
    """The newest checkpoint that restores, setting aside unreadable ones; (None, 0) when there is none."""
    for step in reversed(checkpoints.steps()):
        try:
            state, _ = checkpoints.restore(step, exp.abstract_state)
        except Exception as e:  # noqa: BLE001
            unusable(checkpoints, step, e)
            continue
        return state, step
    return None, 0


def unusable(checkpoints: Checkpoints, step: int, error: Exception) -> None:
    moved = checkpoints.set_aside(step)
    log.warning("checkpoint %d in %s is unreadable (%s: %s); moved to %s, falling back to the previous one",
                step, checkpoints.directory, type(error).__name__, str(error).splitlines()[0][:160] if str(error)
                else "", moved)


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Set up and train: the whole of `python -m train` but the command line (and holding its run directory)."""
    lock = runlock.acquire(run_dir, jax.process_index())
    try:
        return train(setup(cfg, run_dir))
    finally:
        runlock.release(lock)
