"""Weights of another run directory: to sample from, to export, and to start training from (`trainer.init_from`).

Only the parameters and batch statistics of the newest checkpoint are read, never its optimizer state, so a
training run and a run written by `scripts/convert.py import` (weights only) read alike.
"""

import inspect
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import DictConfig, OmegaConf

from train import targets
from train.checkpoint import Checkpoints
from train.config import model_parameters

log = logging.getLogger(__name__)

# Model config keys that change how a model is run, not the function it computes: they may differ from the run
# the weights come from. A different num_classes needs its head left out (trainer.init_exclude=[head]).
RUN_ONLY_KEYS = {"dropout", "remat", "scan", "chunk_size", "dtype", "num_classes", "scan_layers"}


def run_config(run_dir: Path) -> DictConfig:
    """The composed config a run directory was written with (`<run_dir>/.hydra/config.yaml`), its targets checked."""
    config_file = Path(run_dir) / ".hydra" / "config.yaml"
    if not config_file.exists():
        raise ValueError(f"{config_file} not found: {run_dir} is not a run directory (valid: a directory written "
                         f"by python -m train or scripts/convert.py import)")
    cfg = OmegaConf.load(config_file)
    targets.check(cfg)
    return cfg


def newest_step(run_dir: Path) -> int:
    """The newest complete checkpoint's step in `<run_dir>/checkpoints`; a one-line error when there is none."""
    directory = Path(run_dir) / "checkpoints"
    steps = Checkpoints(directory, keep=1, async_save=False).steps() if directory.is_dir() else []
    if not steps:
        raise ValueError(f"no checkpoint in {directory}")
    return steps[-1]


def read_weights(run_dir: Path, params: nnx.State, batch_stats: nnx.State) -> tuple[nnx.State, nnx.State]:
    """The newest checkpoint's parameters and batch statistics, in the structure (shapes) of the given ones."""
    want = {"params": params} | ({"model_state": batch_stats} if jax.tree.leaves(batch_stats) else {})
    want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)
    path = Path(run_dir).absolute() / "checkpoints" / str(newest_step(run_dir)) / "state"
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        want, restore_args=ocp.checkpoint_utils.construct_restore_args(want), partial_restore=True))
    return restored["params"], restored.get("model_state", batch_stats)


def load_model(run_dir: Path) -> tuple[DictConfig, nnx.Module]:
    """A run's config and its eval-mode model holding the newest checkpoint's weights (nothing is initialised)."""
    cfg = run_config(run_dir)
    model = nnx.eval_shape(lambda: targets.instantiate(cfg.model, _convert_="all", rngs=nnx.Rngs(params=0, dropout=1)))
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    params, batch_stats = read_weights(run_dir, params, batch_stats)
    rest = jax.tree.map(_placeholder, rest)  # RNG keys and counters: eval mode draws no random numbers
    model = nnx.merge(graphdef, params, batch_stats, rest)
    model.eval()
    return cfg, model


def _placeholder(x: jax.ShapeDtypeStruct) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), x.shape)
    return jnp.zeros(x.shape, x.dtype)


def check_same_model(source: dict, model_cfg: dict, run_dir: Path) -> None:
    """One-line error when the new run's model computes another function than the run its weights come from."""
    source, model_cfg = _with_defaults(source), _with_defaults(model_cfg)
    keys = sorted((set(source) | set(model_cfg)) - RUN_ONLY_KEYS)
    diffs = [k for k in keys if source.get(k) != model_cfg.get(k)]
    if diffs:
        fixes = " ".join(f"++model.{k}={json.dumps(source.get(k))}" for k in diffs)
        raise ValueError(f"trainer.init_from={run_dir} holds another model: {', '.join(diffs)} differ "
                         f"(valid: the same model; add {fixes})")


def flat_weights(run_dir: Path) -> dict[str, np.ndarray]:
    """The newest checkpoint's parameters and batch statistics by dotted path ("blocks.0.attn.query.kernel")."""
    cfg = run_config(run_dir)
    model = nnx.eval_shape(lambda: targets.instantiate(cfg.model, _convert_="all", rngs=nnx.Rngs(params=0, dropout=1)))
    params, batch_stats = read_weights(run_dir, nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat))
    return {path_name(p): v for tree in (params, batch_stats) for p, v in _leaves(tree)}


def _with_defaults(model_cfg: dict) -> dict:
    """The config with every constructor argument it leaves out at its default value, so that both spell it."""
    params = model_parameters(model_cfg["_target_"]).values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty} | model_cfg


def match_layout(flat: dict[str, np.ndarray], target: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Weights of one layer layout in the other's names: "blocks.3.mlp.fc1.kernel" (a loop over layers) is
    row 3 of "blocks.mlp.fc1.kernel" (`scan_layers`, stacked along a leading layer axis), and back.

    `target` maps the wanted names to their shapes; names already present pass through unchanged.
    """
    out = {name: flat[name] for name in target if name in flat}
    for name in set(target) - set(out):
        parts = name.split(".")
        for i, part in enumerate(parts):
            unstacked = ".".join(parts[:i] + parts[i + 1:])  # wanted: layer `part` of a stacked source
            if part.isdigit() and unstacked in flat:
                out[name] = np.asarray(flat[unstacked])[int(part)]
                break
            rows = [f"{'.'.join(parts[:i])}.{n}.{'.'.join(parts[i:])}".lstrip(".") for n in range(target[name][0])]
            if i > 0 and all(r in flat for r in rows):  # wanted: stacked, from a source with one name per layer
                out[name] = np.stack([np.asarray(flat[r]) for r in rows])
                break
    return out


def init_from(state: dict, run_dir: Path, exclude: list[str]) -> dict:
    """The train state with its parameters and batch statistics taken from `run_dir`'s newest checkpoint.

    Parameters whose dotted path starts with an `exclude` prefix (e.g. "head") keep their fresh initialisation;
    every other one must be in the checkpoint with the same shape. The optimizer state and RNGs stay fresh.
    """
    params, model_state = nnx.to_pure_dict(state["params"]), nnx.to_pure_dict(state["model_state"])
    stats = {path_name(p) for p, v in nnx.to_flat_state(state["model_state"]) if isinstance(v, nnx.BatchStat)}
    wanted = {path_name(p): v.shape for p, v in _leaves(params)} | \
        {path_name(p): v.shape for p, v in _leaves(model_state) if path_name(p) in stats}
    source = match_layout(flat_weights(run_dir), wanted)
    for tree, names in ((params, None), (model_state, stats)):
        for path, current in _leaves(tree):
            name = path_name(path)
            if names is not None and name not in names:
                continue  # RNG counters and keys: the new run's own
            if any(name == e or name.startswith(e + ".") for e in exclude):
                log.info("init_from: %s keeps its fresh initialisation (trainer.init_exclude)", name)
                continue
            fix = f"trainer.init_exclude=[{name.split('.')[0]}]"
            if name not in source:
                raise ValueError(f"trainer.init_from={run_dir}: {name} is not in its checkpoint "
                                 f"(valid: the same model, or leave it out with {fix})")
            if tuple(source[name].shape) != tuple(current.shape):
                raise ValueError(f"trainer.init_from={run_dir}: {name} has shape {tuple(source[name].shape)} there "
                                 f"and {tuple(current.shape)} here (valid: the same model, or {fix})")
            set_leaf(tree, path, jax.device_put(np.asarray(source[name], current.dtype), current.sharding))
    nnx.replace_by_pure_dict(state["params"], params)
    nnx.replace_by_pure_dict(state["model_state"], model_state)
    log.info("initialised from %s (step %d)", run_dir, newest_step(run_dir))
    return state


def path_name(path: tuple) -> str:
    """('blocks', 0, 'attn', 'query', 'kernel') -> 'blocks.0.attn.query.kernel'."""
    return ".".join(str(p) for p in path)


def _leaves(tree) -> list[tuple[tuple, object]]:
    """(path, leaf) pairs of a nested dict or nnx.State."""
    tree = nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree
    if not isinstance(tree, dict):
        return [((), tree)]
    return [((k, *p), v) for k, sub in tree.items() for p, v in _leaves(sub)]


def set_leaf(tree: dict, path: tuple, value) -> None:
    """Put `value` at `path` of a nested dict."""
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
