"""Mamba (Hugging Face `MambaForCausalLM`, state-spaces `MambaLMHeadModel`) <-> archlab `models.mamba.MambaLM`.

The two publish the same tensors under the same names but for the embedding (`backbone.embeddings.weight`
in HF, `backbone.embedding.weight` in state-spaces) and differ in config.json: state-spaces stores the
tokenizer's vocabulary (50277) and pads the embedding rows to `pad_vocab_size_multiple` (50280), HF stores
the padded row count as its vocab_size. Torch Linear weights (out, in) are nnx kernels (in, out); the
depthwise conv weight (D, 1, K) is archlab's conv_kernel (K, D).
"""

import math

import jax.numpy as jnp

ARCHITECTURES = ("MambaForCausalLM", "MambaLMHeadModel")

# transformers' MambaConfig defaults, for config.json files that leave a key out.
_HF_DEFAULTS = {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32, "state_size": 16, "conv_kernel": 4,
                "expand": 2, "time_step_rank": "auto"}
# config.json values archlab's MambaLM computes differently; every published Mamba checkpoint uses these.
_HF_REQUIRED = {"use_bias": False, "use_conv_bias": True, "tie_word_embeddings": True, "layer_norm_epsilon": 1e-5,
                "hidden_act": "silu"}
_SS_REQUIRED = {"rms_norm": True, "tie_embeddings": True, "d_intermediate": 0, "attn_layer_idx": []}
_SS_MIXER_REQUIRED = {"layer": "Mamba1", "bias": False, "conv_bias": True}  # ssm_cfg keys


def _same(x):
    return x


def _conv_to_archlab(w):
    return jnp.transpose(w[:, 0, :])  # (D, 1, K) -> (K, D)


def _conv_to_hf(k):
    return jnp.transpose(k)[:, None, :]  # (K, D) -> (D, 1, K)


# HF name within backbone.layers.i -> (archlab name within layers.i, HF -> archlab, archlab -> HF)
_LAYER = {
    "norm.weight": ("norm.scale", _same, _same),
    "mixer.in_proj.weight": ("mixer.in_proj.kernel", jnp.transpose, jnp.transpose),
    "mixer.conv1d.weight": ("mixer.conv_kernel", _conv_to_archlab, _conv_to_hf),
    "mixer.conv1d.bias": ("mixer.conv_bias", _same, _same),
    "mixer.x_proj.weight": ("mixer.x_proj.kernel", jnp.transpose, jnp.transpose),
    "mixer.dt_proj.weight": ("mixer.dt_proj.kernel", jnp.transpose, jnp.transpose),
    "mixer.dt_proj.bias": ("mixer.dt_proj.bias", _same, _same),
    "mixer.A_log": ("mixer.A_log", _same, _same),
    "mixer.D": ("mixer.D", _same, _same),
    "mixer.out_proj.weight": ("mixer.out_proj.kernel", jnp.transpose, jnp.transpose),
}


def _is_hf(hf: dict) -> bool:
    return "MambaForCausalLM" in hf.get("architectures", []) or hf.get("model_type") == "mamba"


def _is_state_spaces(hf: dict) -> bool:
    return "architectures" not in hf and {"d_model", "n_layer", "vocab_size"} <= set(hf)


def reads(hf: dict) -> bool:
    """True for a HF MambaForCausalLM config.json and for a state-spaces/mamba-* one (which names no architecture)."""
    return _is_hf(hf) or _is_state_spaces(hf)


def _require(where: dict, required: dict, prefix: str = "") -> None:
    for key, value in required.items():
        if where.get(key, value) != value:
            raise ValueError(f"config.json: {prefix}{key}={where[key]!r} is not supported "
                             f"(archlab's MambaLM computes {value!r})")


def _hf_sizes(hf: dict) -> dict:
    hf = _HF_DEFAULTS | hf
    _require(hf, _HF_REQUIRED)
    d_model, expand = hf["hidden_size"], hf["expand"]
    if hf.get("intermediate_size", expand * d_model) != expand * d_model:
        raise ValueError(f"config.json: intermediate_size={hf['intermediate_size']} is not supported "
                         f"(archlab's MambaLM has expand * hidden_size = {expand * d_model})")
    rank = hf["time_step_rank"]
    # The rows HF stores are its vocabulary: pad 1 keeps them all as logits, as MambaForCausalLM returns them.
    return {"vocab_size": hf["vocab_size"], "d_model": d_model, "num_layers": hf["num_hidden_layers"],
            "d_state": hf["state_size"], "d_conv": hf["conv_kernel"], "expand": expand,
            "dt_rank": math.ceil(d_model / 16) if rank == "auto" else rank, "pad_vocab_multiple": 1}


def _state_spaces_sizes(hf: dict) -> dict:
    ssm = hf.get("ssm_cfg") or {}
    _require(hf, _SS_REQUIRED)
    _require(ssm, _SS_MIXER_REQUIRED, "ssm_cfg.")
    d_model, rank = hf["d_model"], ssm.get("dt_rank", "auto")
    return {"vocab_size": hf["vocab_size"], "d_model": d_model, "num_layers": hf["n_layer"],
            "d_state": ssm.get("d_state", 16), "d_conv": ssm.get("d_conv", 4), "expand": ssm.get("expand", 2),
            "dt_rank": math.ceil(d_model / 16) if rank == "auto" else rank,
            "pad_vocab_multiple": hf.get("pad_vocab_size_multiple", 8)}


def model_config(hf: dict) -> dict:
    """archlab's MambaLM config for either config.json layout; one-line errors for variants it does not compute."""
    if not reads(hf):
        raise ValueError(f"config.json is not a Mamba config (architectures {hf.get('architectures')}, "
                         f"model_type {hf.get('model_type')!r}; reads {', '.join(ARCHITECTURES)})")
    sizes = _hf_sizes(hf) if _is_hf(hf) else _state_spaces_sizes(hf)
    return {"_target_": "models.mamba.MambaLM", **sizes, "selective": True, "scan": None, "chunk_size": 256,
            "remat": "none", "scan_layers": False, "dtype": "float32"}


def _rows(model_cfg: dict) -> int:
    multiple = model_cfg.get("pad_vocab_multiple", 8)
    return -(-model_cfg["vocab_size"] // multiple) * multiple


def hf_config(model_cfg: dict) -> dict:
    """MambaForCausalLM config.json for an archlab MambaLM config: its vocab_size is the embedding's padded rows."""
    if not model_cfg.get("selective", True):
        raise ValueError("MambaLM: selective=False (the LTI ablation) has no MambaForCausalLM equivalent")
    d_model, expand = model_cfg["d_model"], model_cfg.get("expand", 2)
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": _rows(model_cfg),
            "hidden_size": d_model, "num_hidden_layers": model_cfg["num_layers"],
            "state_size": model_cfg.get("d_state", 16), "conv_kernel": model_cfg.get("d_conv", 4), "expand": expand,
            "intermediate_size": expand * d_model,
            "time_step_rank": model_cfg.get("dt_rank") or math.ceil(d_model / 16), **_HF_REQUIRED,
            "residual_in_fp32": True}


def _names(num_layers: int) -> dict:
    """HF tensor name -> (archlab path, HF -> archlab, archlab -> HF) for every tensor of the model."""
    names = {"backbone.embeddings.weight": ("embed.embedding", _same, _same),
             "backbone.norm_f.weight": ("norm_f.scale", _same, _same)}
    for i in range(num_layers):
        for name, (path, to_archlab_fn, to_hf_fn) in _LAYER.items():
            names[f"backbone.layers.{i}.{name}"] = (f"layers.{i}.{path}", to_archlab_fn, to_hf_fn)
    return names


def canonical(weights: dict, hf: dict) -> dict:
    """Tensors of either layout under their HF names: state-spaces says backbone.embedding, HF backbone.embeddings."""
    return {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in weights.items()}


def to_archlab(weights: dict, hf: dict) -> dict:
    """HF or state-spaces tensors -> archlab flat state; the tied lm_head.weight is the embedding and is skipped."""
    w = {k: v for k, v in canonical(weights, hf).items() if k != "lm_head.weight"}
    names = _names(model_config(hf)["num_layers"])
    if set(w) != set(names):
        missing, extra = sorted(set(names) - set(w)), sorted(set(w) - set(names))
        raise ValueError(f"Mamba checkpoint does not fit its config.json: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    return {path: fn(jnp.asarray(w[name])) for name, (path, fn, _) in names.items()}


def to_hf(state: dict, model_cfg: dict) -> dict:
    """archlab flat state -> MambaForCausalLM tensors (the HF layout, whichever layout was imported)."""
    return {name: fn(state[path]) for name, (path, _, fn) in _names(model_cfg["num_layers"]).items()}
