"""GPT-2 (Hugging Face `GPT2LMHeadModel`) <-> archlab `models.gpt.GPT`.

GPT-2 stores its linear maps as Conv1D weights (in, out), as nnx kernels are, and fuses the query, key and
value projections into one `c_attn` (D, 3D) that archlab keeps as three (D, D) layers.
"""

import jax.numpy as jnp

ARCHITECTURES = ("GPT2LMHeadModel",)

# config.json values archlab's GPT computes differently; GPT-2's published checkpoints all use these.
_REQUIRED = {"activation_function": "gelu_new", "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "tie_word_embeddings": True}
_LAYER = {"ln_1.weight": "ln1.scale", "ln_1.bias": "ln1.bias", "attn.c_proj.weight": "attn.out.kernel",
          "attn.c_proj.bias": "attn.out.bias", "ln_2.weight": "ln2.scale", "ln_2.bias": "ln2.bias",
          "mlp.c_fc.weight": "mlp.fc1.kernel", "mlp.c_fc.bias": "mlp.fc1.bias", "mlp.c_proj.weight": "mlp.fc2.kernel",
          "mlp.c_proj.bias": "mlp.fc2.bias"}
_QKV = ("query", "key", "value")


def reads(hf: dict) -> bool:
    return "GPT2LMHeadModel" in hf.get("architectures", []) or hf.get("model_type") == "gpt2"


def model_config(hf: dict) -> dict:
    """archlab's GPT config for a GPT-2 config.json; one-line errors for variants it does not compute."""
    for key, value in _REQUIRED.items():
        if hf.get(key, value) != value:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (archlab's GPT computes {value!r})")
    d_model = hf.get("n_embd", 768)
    return {"_target_": "models.gpt.GPT", "vocab_size": hf.get("vocab_size", 50257),
            "max_len": hf.get("n_positions", 1024), "num_layers": hf.get("n_layer", 12), "d_model": d_model,
            "num_heads": hf.get("n_head", 12), "d_ff": hf.get("n_inner"), "dropout": 0.0,
            "tie_embeddings": True, "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "remat": "none",
            "scan_layers": False, "dtype": "float32"}


def hf_config(model_cfg: dict) -> dict:
    return {"architectures": list(ARCHITECTURES), "model_type": "gpt2", "vocab_size": model_cfg["vocab_size"],
            "n_positions": model_cfg["max_len"], "n_embd": model_cfg["d_model"], "n_layer": model_cfg["num_layers"],
            "n_head": model_cfg["num_heads"], "n_inner": model_cfg.get("d_ff") or 4 * model_cfg["d_model"],
            "layer_norm_epsilon": model_cfg.get("norm_eps", 1e-5), "activation_function": "gelu_new",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "bos_token_id": 50256, "eos_token_id": 50256}


def to_archlab(weights: dict, hf: dict) -> dict:
    w = {k.removeprefix("transformer."): v for k, v in weights.items()}
    state = {"token_embed.embedding": w["wte.weight"], "pos_embed.embedding": w["wpe.weight"],
             "ln_f.scale": w["ln_f.weight"], "ln_f.bias": w["ln_f.bias"]}
    for i in range(hf.get("n_layer", 12)):
        for name, path in _LAYER.items():
            state[f"blocks.{i}.{path}"] = jnp.asarray(w[f"h.{i}.{name}"])
        kernels = jnp.split(jnp.asarray(w[f"h.{i}.attn.c_attn.weight"]), 3, axis=1)  # (D, 3D) -> 3 x (D, D)
        biases = jnp.split(jnp.asarray(w[f"h.{i}.attn.c_attn.bias"]), 3)
        for proj, kernel, bias in zip(_QKV, kernels, biases):
            state[f"blocks.{i}.attn.{proj}.kernel"], state[f"blocks.{i}.attn.{proj}.bias"] = kernel, bias
    return state


def to_hf(state: dict, model_cfg: dict) -> dict:
    w = {"transformer.wte.weight": state["token_embed.embedding"], "transformer.wpe.weight": state["pos_embed.embedding"],
         "transformer.ln_f.weight": state["ln_f.scale"], "transformer.ln_f.bias": state["ln_f.bias"]}
    for i in range(model_cfg["num_layers"]):
        for name, path in _LAYER.items():
            w[f"transformer.h.{i}.{name}"] = state[f"blocks.{i}.{path}"]
        attn = f"blocks.{i}.attn"
        w[f"transformer.h.{i}.attn.c_attn.weight"] = jnp.concatenate(
            [state[f"{attn}.{p}.kernel"] for p in _QKV], axis=1)
        w[f"transformer.h.{i}.attn.c_attn.bias"] = jnp.concatenate([state[f"{attn}.{p}.bias"] for p in _QKV])
    return w
