"""Mamba interop: transformers' MambaForCausalLM with small random weights, saved in its own layout or the
state-spaces one and imported by scripts/convert.py, gives the same logits and greedy continuation; exported
back, it loads in transformers unchanged.

The reference is transformers' own model (CPU torch, float32, its slow path without the CUDA kernels).
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate
from omegaconf import OmegaConf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.mamba import generate  # noqa: E402
from scripts.convert import export_checkpoint, import_checkpoint  # noqa: E402
from scripts.interop import flat_state, mamba  # noqa: E402
from train.pretrained import load_model  # noqa: E402

VOCAB = 100  # not a multiple of 8: HF's vocab_size is its row count, never padded further
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "vocab_size": VOCAB}
# A state-spaces/mamba-* config.json over the same weights: 97 tokens, rows padded to a multiple of 4 = 100.
STATE_SPACES = {"d_model": 32, "n_layer": 2, "vocab_size": 97, "ssm_cfg": {"d_state": 8}, "rms_norm": True,
                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 4}


def close(ours, reference) -> None:
    """Within 1e-5 of the largest reference value, the parity tolerance of the interop tests."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(np.asarray(ours), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(HF model with weights far from its init, so greedy argmaxes are no near-ties; its saved directory)."""
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**SIZES, eos_token_id=None))  # generate all 8
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    model.eval()
    src = tmp_path_factory.mktemp("hf") / "mamba"
    model.save_pretrained(src)
    return model, src


@pytest.fixture(scope="module")
def hf_run(reference, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "mamba_hf"
    import_checkpoint(reference[1], run)
    return run


@pytest.fixture(scope="module")
def state_spaces_run(reference, tmp_path_factory):
    """The reference's weights as state-spaces publishes them: pytorch_model.bin, `backbone.embedding`."""
    src = tmp_path_factory.mktemp("state_spaces") / "mamba"
    src.mkdir()
    weights = reference[0].state_dict()
    torch.save({k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in weights.items()},
               src / "pytorch_model.bin")
    (src / "config.json").write_text(json.dumps(STATE_SPACES))
    run = tmp_path_factory.mktemp("runs") / "mamba_state_spaces"
    import_checkpoint(src, run)
    return run


@pytest.fixture(scope="module")
def imported(hf_run):
    return load_model(hf_run)


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


def test_imported_logits_match_transformers(reference, imported, tokens):
    cfg, ours = imported
    assert (cfg.model.vocab_size, cfg.model.pad_vocab_multiple, cfg.model.dt_rank) == (VOCAB, 1, 2)
    close(ours(jnp.asarray(tokens)), hf_logits(reference[0], tokens))


def test_greedy_continuation_matches_transformers(reference, imported, tokens):
    prompt = tokens[:, :6]
    with torch.no_grad():
        expected = reference[0].generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False)[:, 6:]
    ours = nnx.jit(generate, static_argnums=(2, 4))(imported[1], jnp.asarray(prompt), 8, jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(ours), expected.numpy())


def test_state_spaces_layout_matches_transformers(reference, state_spaces_run, tokens):
    cfg, ours = load_model(state_spaces_run)
    assert (cfg.model.vocab_size, cfg.model.pad_vocab_multiple) == (97, 4)
    logits = ours(jnp.asarray(tokens))
    assert logits.shape[-1] == 97
    close(logits, hf_logits(reference[0], tokens)[..., :97])  # the reference scores its 3 padding rows too


@pytest.mark.parametrize("layout", ["hf_run", "state_spaces_run"])
def test_export_loads_in_transformers(reference, tokens, layout, request, tmp_path):
    export_checkpoint(request.getfixturevalue(layout), tmp_path / "out")
    reloaded, info = transformers.MambaForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # every tensor named and shaped as transformers expects
    assert reloaded.config.vocab_size == VOCAB  # the embedding's rows, padding included
    close(hf_logits(reloaded.eval(), tokens), hf_logits(reference[0], tokens))


@pytest.mark.parametrize("hf", [SIZES | {"model_type": "mamba", "time_step_rank": 3, "conv_kernel": 3, "expand": 3},
                                {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                                 "pad_vocab_size_multiple": 8}], ids=["hf", "mamba-130m"])
def test_export_shapes_equal_transformers(hf):
    cfg = mamba.model_config(hf)
    state = flat_state(nnx.eval_shape(lambda: instantiate(cfg, rngs=nnx.Rngs(0))))
    ours = jax.eval_shape(functools.partial(mamba.to_hf, model_cfg=cfg), state)
    with torch.device("meta"):
        theirs = transformers.MambaForCausalLM(transformers.MambaConfig(**mamba.hf_config(cfg))).state_dict()
    theirs = {k: tuple(v.shape) for k, v in theirs.items() if k != "lm_head.weight"}  # tied: not exported
    assert {k: v.shape for k, v in ours.items()} == theirs


@pytest.mark.parametrize("name, d_model, n_layer", [("130m", 768, 24), ("370m", 1024, 48), ("790m", 1536, 48),
                                                     ("1_4b", 2048, 48), ("2_8b", 2560, 64)])
def test_published_configs_import_as_the_conf_files(cfg_for, name, d_model, n_layer):
    ours = OmegaConf.to_container(cfg_for(f"model=mamba_{name}").model, resolve=True)
    imported = mamba.model_config({"d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "ssm_cfg": {},
                                   "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
                                   "pad_vocab_size_multiple": 8})
    assert ours | {"dt_rank": math.ceil(d_model / 16), "dtype": "float32"} == imported


def test_reads_both_layouts_only():
    assert mamba.reads({"architectures": ["MambaForCausalLM"]}) and mamba.reads(STATE_SPACES)
    assert not mamba.reads({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257})


@pytest.mark.parametrize("key, value", [("use_bias", True), ("use_conv_bias", False), ("tie_word_embeddings", False),
                                        ("layer_norm_epsilon", 1e-6), ("hidden_act", "gelu"),
                                        ("intermediate_size", 100)])
def test_unsupported_hf_option_is_named(key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        mamba.model_config({"model_type": "mamba", **SIZES, key: value})


@pytest.mark.parametrize("change", [{"rms_norm": False}, {"ssm_cfg": {"layer": "Mamba2"}}, {"attn_layer_idx": [1]}])
def test_unsupported_state_spaces_option_is_named(change):
    with pytest.raises(ValueError, match="is not supported"):
        mamba.model_config(STATE_SPACES | change)
