"""Hugging Face ViTForImageClassification (google/vit-*) <-> archlab's models.vit.ViT.

Tensor names are those on the Hub and in `save_pretrained` files ("vit.encoder.layer.0.attention.attention.query"),
which transformers 5 renames only in memory ("vit.layers.0.attention.q_proj").
"""

import jax

from scripts.interop import labels, layout_to_archlab, layout_to_hf, num_labels, reads_architecture, require

ARCHITECTURES = ("ViTForImageClassification",)

# Values older config.json files leave out: ViTConfig's defaults.
HF_DEFAULTS = {"image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
               "qkv_bias": True}
# HF's "gelu" is the exact erf GELU; archlab's "gelu" is the tanh approximation.
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
HF_ACTIVATIONS = {"gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh"}


def reads(hf: dict) -> bool:
    """Whether this config.json describes a ViT classifier."""
    return reads_architecture(hf, ARCHITECTURES, "vit")


def model_config(hf: dict) -> dict:
    """The archlab model config of a ViTForImageClassification config.json."""
    hf = HF_DEFAULTS | hf
    require("ViT", hf, "qkv_bias", (True,))
    require("ViT", hf, "hidden_act", tuple(ACTIVATIONS))
    return {
        "_target_": "models.vit.ViT", "image_size": hf["image_size"], "patch_size": hf["patch_size"],
        "d_model": hf["hidden_size"], "depth": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
        "d_ff": hf["intermediate_size"],
        "num_classes": num_labels(hf),
        "in_channels": hf["num_channels"], "norm_eps": hf["layer_norm_eps"],
        "activation": ACTIVATIONS[hf["hidden_act"]], "remat": "none", "scan_layers": False, "dtype": "float32",
    }


def hf_config(model_cfg: dict) -> dict:
    """The config.json of an archlab ViT, exported as a ViTForImageClassification."""
    activation = model_cfg.get("activation", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise ValueError(f"ViT: activation {activation!r} has no Hugging Face equivalent here "
                         f"(supported: {', '.join(HF_ACTIVATIONS)})")
    return {
        "architectures": list(ARCHITECTURES), "model_type": "vit", "image_size": model_cfg["image_size"],
        "patch_size": model_cfg["patch_size"], "num_channels": model_cfg.get("in_channels", 3),
        "hidden_size": model_cfg["d_model"], "num_hidden_layers": model_cfg["depth"],
        "num_attention_heads": model_cfg["num_heads"], "intermediate_size": model_cfg["d_ff"],
        "hidden_act": HF_ACTIVATIONS[activation], "layer_norm_eps": model_cfg.get("norm_eps", 1e-6),
        "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        **labels(model_cfg["num_classes"]),
    }


def layout(depth: int) -> list[tuple[str, str, str]]:
    """(archlab path, HF name, weight kind) of every weight of a ViT with `depth` blocks."""
    rows = [("patch_embed", "vit.embeddings.patch_embeddings.projection", "conv"),
            ("cls_token", "vit.embeddings.cls_token", "tensor"),
            ("pos_embed", "vit.embeddings.position_embeddings", "tensor")]
    for i in range(depth):
        ours, theirs = f"blocks.{i}", f"vit.encoder.layer.{i}"
        rows += [(f"{ours}.norm1", f"{theirs}.layernorm_before", "layernorm"),
                 (f"{ours}.attn.query", f"{theirs}.attention.attention.query", "linear"),
                 (f"{ours}.attn.key", f"{theirs}.attention.attention.key", "linear"),
                 (f"{ours}.attn.value", f"{theirs}.attention.attention.value", "linear"),
                 (f"{ours}.attn.out", f"{theirs}.attention.output.dense", "linear"),
                 (f"{ours}.norm2", f"{theirs}.layernorm_after", "layernorm"),
                 (f"{ours}.mlp.fc1", f"{theirs}.intermediate.dense", "linear"),
                 (f"{ours}.mlp.fc2", f"{theirs}.output.dense", "linear")]
    return rows + [("norm", "vit.layernorm", "layernorm"), ("head", "classifier", "linear")]


def to_archlab(weights: dict[str, jax.Array], hf: dict) -> dict[str, jax.Array]:
    """HF tensors -> archlab flat state (the checkpoint's pooler, if any, is not part of the classifier)."""
    return layout_to_archlab("ViT", weights, layout(model_config(hf)["depth"]),
                             f"config.json says {hf['num_hidden_layers']} layers")


def to_hf(state: dict[str, jax.Array], model_cfg: dict) -> dict[str, jax.Array]:
    """archlab flat state -> HF tensors."""
    return layout_to_hf(state, layout(model_cfg["depth"]))
