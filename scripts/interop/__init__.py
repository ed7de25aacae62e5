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

import json

import jax
import jax.numpy as jnp
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


# ---- Checks of config.json ----


def reads_architecture(hf: dict, architectures: tuple[str, ...], model_type: str) -> bool:
    """Whether config.json names one of `architectures`, or, naming none, has this `model_type`."""
    named = hf.get("architectures")
    return bool(set(named) & set(architectures)) if named else hf.get("model_type") == model_type


def require(model: str, hf: dict, key: str, supported: tuple) -> None:
    """One-line error when config.json's `key` holds a value archlab's `model` cannot express."""
    if hf[key] not in supported:
        raise ValueError(f"{model}: config.json {key}: {json.dumps(hf[key])} is not supported "
                         f"(supported: {', '.join(json.dumps(v) for v in supported)})")


def num_labels(hf: dict) -> int:
    """A classifier's classes: its id2label's size, else num_labels (transformers' default 2)."""
    return len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)


def labels(num_classes: int) -> dict:
    """config.json's id2label and label2id for `num_classes` unnamed classes (LABEL_i, as transformers names them)."""
    names = [f"LABEL_{i}" for i in range(num_classes)]
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


# ---- Torch modules, one to one with archlab layers: a layout lists (archlab path, HF name, weight kind) ----

_CONV = ("kernel", "weight", lambda w: jnp.transpose(w, (2, 3, 1, 0)),  # torch Conv2d (O, I, kh, kw)
         lambda k: jnp.transpose(k, (3, 2, 0, 1)))                      # <-> nnx Conv (kh, kw, I, O)
_BIAS = ("bias", "bias", jnp.asarray, jnp.asarray)

# Weight kind -> (archlab leaf, HF leaf, HF -> archlab, archlab -> HF) for each of its tensors.
LEAVES = {
    "conv": [_CONV, _BIAS],
    "conv_no_bias": [_CONV],
    "linear": [("kernel", "weight", jnp.transpose, jnp.transpose), _BIAS],  # torch (out, in) <-> kernel (in, out)
    "layernorm": [("scale", "weight", jnp.asarray, jnp.asarray), _BIAS],
    "batchnorm": [("scale", "weight", jnp.asarray, jnp.asarray), _BIAS,
                  ("mean", "running_mean", jnp.asarray, jnp.asarray), ("var", "running_var", jnp.asarray, jnp.asarray)],
    "tensor": [("", "", jnp.asarray, jnp.asarray)],  # a bare parameter, e.g. ViT's cls_token
}


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if leaf else prefix


def layout_to_archlab(model: str, weights: dict, layout: list[tuple[str, str, str]], hint: str) -> dict:
    """HF tensors -> archlab flat state along `layout`; a missing tensor is a one-line error with `hint`."""
    flat = {}
    for ours, theirs, kind in layout:
        for our_leaf, their_leaf, to_ours, _ in LEAVES[kind]:
            name = _join(theirs, their_leaf)
            if name not in weights:
                raise ValueError(f"{model}: the checkpoint has no tensor {name} ({len(weights)} tensors, {hint})")
            flat[_join(ours, our_leaf)] = to_ours(weights[name])
    return flat


def layout_to_hf(state: dict, layout: list[tuple[str, str, str]]) -> dict:
    """archlab flat state -> HF tensors along `layout`."""
    return {_join(theirs, their_leaf): to_theirs(state[_join(ours, our_leaf)])
            for ours, theirs, kind in layout for our_leaf, their_leaf, _, to_theirs in LEAVES[kind]}
