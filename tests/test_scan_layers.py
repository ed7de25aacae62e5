"""model.scan_layers: stacked layers run as one scan compute what the Python loop over layers computes, and a
checkpoint of one layout starts a run of the other (trainer.init_from)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.gpt import GPT, generate
from models.mamba import MambaLM
from models.simba import Simba
from models.transformer import Transformer
from models.vit import ViT
from scripts.interop import flat_state, load_flat
from train.loop import run
from train.config import compose
from train.pretrained import load_model, match_layout

def tokens(*shape: int, vocab: int = 40) -> jax.Array:
    return jax.random.randint(jax.random.key(0), shape, 1, vocab)


def images() -> jax.Array:
    return jax.random.normal(jax.random.key(0), (2, 16, 16, 3))


# name -> (model class, keywords of a tiny one, its example inputs)
MODELS = {
    "gpt": (GPT, dict(vocab_size=40, max_len=16, num_layers=3, d_model=32, num_heads=4), lambda: (tokens(2, 10),)),
    "vit": (ViT, dict(image_size=16, patch_size=4, d_model=32, depth=3, num_heads=4, d_ff=64, num_classes=5),
            lambda: (images(),)),
    "simba": (Simba, dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, d_model=32, num_layers=3),
              lambda: (images(),)),
    "mamba": (MambaLM, dict(vocab_size=40, d_model=32, num_layers=3, d_state=4), lambda: (tokens(2, 10),)),
    "transformer": (Transformer, dict(vocab_size=40, src_len=8, tgt_len=9, num_layers=3, d_model=32, num_heads=4,
                                      d_ff=64), lambda: (tokens(2, 8), tokens(2, 9))),
}


def twins(name: str, **extra) -> tuple[nnx.Module, nnx.Module, jax.Array]:
    """The loop model and the scanned model holding the same weights, and an input."""
    cls, kwargs, example = MODELS[name]
    loop = cls(**kwargs, **extra, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)  # zero-initialised heads would hide every gradient behind them
    load_flat(loop, {k: v if np.any(v) else 0.1 * rng.standard_normal(v.shape) for k, v in flat_state(loop).items()})
    scanned = cls(**kwargs, **extra, scan_layers=True, rngs=nnx.Rngs(1))
    load_flat(scanned, match_layout(flat_state(loop), {k: v.shape for k, v in flat_state(scanned).items()}))
    return loop, scanned, example()


@nnx.jit  # eagerly, a tiny Simba's forward alone took 20-28 s on 2 cores
def forward(model: nnx.Module, x: tuple) -> jax.Array:
    return model(*x)


def loss(model: nnx.Module, x: tuple) -> jax.Array:
    out = model(*x)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))


grad = nnx.jit(nnx.grad(loss))


@pytest.mark.parametrize("name", MODELS)
def test_scanned_layers_give_the_loops_outputs_and_gradients(name):
    loop, scanned, x = twins(name)
    out = forward(loop, x)
    np.testing.assert_allclose(forward(scanned, x), out, rtol=0, atol=1e-6 * np.abs(out).max())
    grads_loop = flat_state(grad(loop, x))
    grads_scan = match_layout(flat_state(grad(scanned, x)), {k: v.shape for k, v in grads_loop.items()})
    assert grads_scan.keys() == grads_loop.keys()
    scale = max(np.abs(g).max() for g in grads_loop.values())  # 1e-6 of the largest: fp32 sums in another order
    for key, g in grads_loop.items():
        np.testing.assert_allclose(grads_scan[key], g, rtol=0, atol=1e-6 * scale, err_msg=key)


def test_scanned_gpt_remat_and_kv_cache_decoding():
    loop, scanned, x = twins("gpt", remat="full")
    np.testing.assert_allclose(grad(scanned, x).blocks.mlp.fc1.kernel[...][2],
                               grad(loop, x).blocks[2].mlp.fc1.kernel[...], rtol=0, atol=1e-6)
    loop.eval(), scanned.eval()
    prompt = x[0][:, :4]
    np.testing.assert_array_equal(generate(scanned, prompt, 8, temperature=0.0),
                                  generate(loop, prompt, 8, temperature=0.0))


def test_stacked_weights_lay_out_one_layer_per_row():
    loop, scanned, _ = twins("gpt")
    assert scanned.blocks.attn.query.kernel.shape == (3, 32, 32)
    assert scanned.blocks.attn.query.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads")
    np.testing.assert_array_equal(scanned.blocks.ln1.scale[...][1], loop.blocks[1].ln1.scale[...])


def test_a_checkpoint_of_one_layout_starts_a_run_of_the_other(tmp_path):
    gpt = ["model=gpt", "data=bytes", "model.num_layers=2", "model.d_model=32", "model.num_heads=4",
           "data.seq_len=16", "trainer.batch_size=4", "trainer.eval_batch_size=4", "data.eval_windows=4",
           "trainer.log_every=1", "trainer.eval_every=2"]
    run(compose([*gpt, "trainer.steps=2"]), tmp_path / "loop")
    for layout, source in (("true", "loop"), ("false", "scanned")):
        run(compose([*gpt, "trainer.steps=1", "optim.lr=0.0", f"model.scan_layers={layout}",
                     f"trainer.init_from={tmp_path / source}"]), tmp_path / ("scanned" if layout == "true" else "back"))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    reference = load_model(tmp_path / "loop")[1](tokens)
    for run_dir in ("scanned", "back"):
        np.testing.assert_allclose(load_model(tmp_path / run_dir)[1](tokens), reference, rtol=0, atol=1e-5)
