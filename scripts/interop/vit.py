"""Hugging Face ViTForImageClassification (google/vit-*) <-> archlab's models.vit.ViT.

Tensor names are those on the Hub and in `save_pretrained` files ("vit.encoder.layer.0.attention.attention.query"),
which transformers 5 renames only in memory ("vit.layers.0.attention.q_proj").
"""

import json

import jax
import jax.numpy as jnp

ARCHITECTURES = ("ViTForImageClassification",)

# Values older config.json files leave out: ViTConfig's defaults.
HF_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
               "qkv_bias": True}
# HF's "gelu" is the exact erf GELU; archlab's "gelu" is the tanh approximation.
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
HF_ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh"}

# Weight kind -> (archlab leaf, HF leaf, HF -> archlab, archlab -> HF) for each of its tensors.
LEAVES = {
    # torch Linear weight (out, in) <-> kernel (in, out)
    "linear": [("kernel", "weight", jnp.transpose, jnp.transpose), ("bias", "bias", jnp.asarray, jnp.asarray)],
    # torch Conv2d weight (O, I, kh, kw) <-> nnx Conv kernel (kh, kw, I, O)
    "conv": [("kernel", "weight", lambda w: jnp.transpose(w, (2, 3, 1, 0)), lambda k: jnp.transpose(k, (3, 2, 0, 1))),
             ("bias", "bias", jnp.asarray, jnp.asarray)],
    "norm": [("scale", "weight", jnp.asarray, jnp.asarray), ("bias", "bias", jnp.asarray, jnp.asarray)],
    "tensor": [("", "", jnp.asarray, jnp.asarray)],
}


def reads(hf: dict) -> bool:
    """Whether this config.json describes a ViT classifier."""
    architectures = hf.get("architectures")
    return bool(set(architectures) & set(ARCHITECTURES)) if architectures else hf.get("model_type") == "vit"


def require(hf: dict, key: str, supported: tuple) -> None:
    """One-line error when config.json's `key` holds a value archlab's ViT cannot express."""
    if hf[key] not in supported:
        raise ValueError(f"ViT: config.json {key}: {json.dumps(hf[key])} is not supported "
                         f"(supported: {', '.join(json.dumps(v) for v in supported)})")


def model_config(hf: dict) -> dict:
    """The archlab model config of a ViTForImageClassification config.json."""
    hf = HF_DEFAULTS | hf
    require(hf, "qkv_bias", (True,))
    require(hf, "hidden_act", tuple(ACTIVATIONS))
    return {
        "_target_": "models.vit.ViT", "image_size": hf["image_size"], "patch_size": hf["patch_size"],
        "d_model": hf["hidden_size"], "depth": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"],
        "num_classes": len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2),
        "in_channels": hf["num_channels"], "norm_eps": hf["layer_norm_eps"],
        "activation": ACTIVATIONS[hf["hidden_act"]], "remat": "none", "scan_layers": False, "dtype": "float32",
    }


def hf_config(model_cfg: dict) -> dict:
    """The config.json of an archlab ViT, exported as a ViTForImageClassification."""
    activation = model_cfg.get("activation", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise ValueError(f"ViT: activation {activation!r} has no Hugging Face equivalent here "
                         f"(supported: {', '.join(HF_ACTIVATIONS)})")
    labels = [f"LABEL_{i}" for i in range(model_cfg["num_classes"])]
    return {
        "architectures": list(ARCHITECTURES), "model_type": "vit", "image_size": model_cfg["image_size"],
        "patch_size": model_cfg["patch_size"], "num_channels": model_cfg.get("in_channels", 3),
        "hidden_size": model_cfg["d_model"], "num_hidden_layers": model_cfg["depth"],
        "num_attention_heads": model_cfg["num_heads"], "intermediate_size": model_cfg["d_ff"],
        "hidden_act": HF_ACTIVATIONS[activation], "layer_norm_eps": model_cfg.get("norm_eps", 1e-6),
        "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def layout(depth: int) -> list[tuple[str, str, str]]:
    """(archlab path, HF name, weight kind) of every weight of a ViT with `depth` blocks."""
    rows = [("patch_embed", "vit.embeddings.patch_embeddings.projection", "conv"),
            ("cls_token", "vit.embeddings.cls_token", "tensor"),
            ("pos_embed", "vit.embeddings.position_embeddings", "tensor")]
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"vit.encoder.layer.{i}"
        rows += [(f"{ours}.norm1", f"{theirs}.layernorm_before", "norm"),
                 (f"{ours}.attn.query", f"{theirs}.attention.attention.query", "linear"),
                 (f"{ours}.attn.key", f"{theirs}.attention.attention.key", "linear"),
                 (f"{ours}.attn.value", f"{theirs}.attention.attention.value", "linear"),
                 (f"{ours}.attn.out", f"{theirs}.attention.output.dense", "linear"),
                 (f"{ours}.norm2", f"{theirs}.layernorm_after", "norm"),
                 (f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense", "linear"),
                 (f"{ours}.mlp.fc2", f"{theirs}.output.dense", "linear")]
    return rows + [("norm", "vit.layernorm", "norm"), ("head", "classifier", "linear")]


def join(prefix: str, leaf: str) -> str:
    """'head' + 'kernel' -> 'head.kernel'; a bare tensor ('cls_token') has no leaf."""
    return f"{prefix}.{leaf}" if leaf else prefix


def to_archlab(weights: dict[str, jax.Array], hf: dict) -> dict[str, jax.Array]:
    """HF tensors -> archlab flat state (the checkpoint's pooler, if any, is not part of the classifier)."""
    flat = {}
    for ours, theirs, kind in layout(model_config(hf)["depth"]):
        for our_leaf, their_leaf, to_ours, _ in LEAVES[kind]:
            name = join(theirs, their_leaf)
            if name not in weights:
                raise ValueError(f"ViT: the checkpoint has no tensor {name} ({len(weights)} tensors, "
                                 f"config.json says {hf['num_hidden_layers']} layers)")
            flat[join(ours, our_leaf)] = to_ours(weights[name])
    return flat


def to_hf(state: dict[str, jax.Array], model_cfg: dict) -> dict[str, jax.Array]:
    """archlab flat state -> HF tensors."""
    return {join(theirs, their_leaf): to_theirs(state[join(ours, our_leaf)])
            for ours, theirs, kind in layout(model_cfg["depth"])
            for our_leaf, their_leaf, _, to_theirs in LEAVES[kind]}
