"""Published checkpoints <-> archlab models: one module per architecture family, each a pair of weight maps.

Every family module (gpt2, mamba, vit, resnet) defines the same five names:

    ARCHITECTURES: tuple[str, ...]                   config.json "architectures" values it reads
    model_config(hf: dict) -> dict                   archlab model config (concrete values, with _target_)
    hf_config(model_cfg: dict) -> dict               config.json contents for export
    to_archlab(weights: dict, hf: dict) -> dict      HF tensor name -> array  ==>  archlab flat state
    to_hf(state: dict, model_cfg: dict) -> dict      archlab flat state  ==>  HF tensor name -> array

and, where one family has several published layouts, `canonical(weights, hf) -> dict` renaming the tensors
to the layout `to_hf` writes (Mamba: state-spaces' `backbone.embedding` is HF's `backbone.embeddings`).

An archlab *flat state* maps dotted paths of the model's parameters and batch statistics
("blocks.0.attn.query.kernel", "stem.norm.mean") to arrays, as `flat_state` lists them. The maps use jnp
only, so `jax.eval_shape` gives the HF tensor shapes a config implies without allocating anything.
"""

import jax
import numpy as np
from flax import nnx

from train.pretrained import path_name

WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)  # what a published checkpoint holds: no RNG state, no optimizer


def flat_state(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters and batch statistics by dotted path (abstract models give ShapeDtypeStructs)."""
    return {path_name(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def load_flat(model: nnx.Module, flat: dict[str, jax.Array]) -> None:
    """Set the model's parameters and batch statistics from a flat state that names each exactly once."""
    state = nnx.state(model, WEIGHTS)
    expected = {path_name(path) for path, _ in nnx.to_flat_state(state)}
    if expected != set(flat):
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(f"flat state does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, var in nnx.to_flat_state(state):
        value = flat[path_name(path)]
        if tuple(value.shape) != tuple(var.get_value().shape):
            raise ValueError(f"{path_name(path)}: shape {tuple(value.shape)}, the model has "
                             f"{tuple(var.get_value().shape)}")
        var.set_value(np.asarray(value, var.get_value().dtype))
    nnx.update(model, state)
