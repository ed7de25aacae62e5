"""Simba: patch sequence shapes, bidirectional token mixing, EinFFT, and a short run on digits that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.simba import EinFFT, Simba, SimbaBlock
from train.loop import run


def block_influence(bidirectional: bool) -> jax.Array:
    """|d out_0 / d x_last|: how much the last patch moves the first patch's output."""
    block = SimbaBlock(8, bidirectional=bidirectional, channel_mixer="mlp", mlp_ratio=2, num_blocks=4, scan=None,
                       dtype="float32", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 6, 8))
    jac = nnx.jit(lambda b, v: jax.jacrev(lambda w: b(w)[0, 0])(v))(block, x)  # (D, 1, N, D)
    return jnp.abs(jac[:, 0, -1]).sum()


def test_bidirectional_lets_every_patch_see_the_whole_image():
    assert block_influence(bidirectional=False) == 0  # raster-order scan: the first patch sees only itself
    assert block_influence(bidirectional=True) > 0


def test_einfft_mixes_channels_and_tokens_in_the_frequency_domain():
    mixer = EinFFT(16, num_blocks=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    y = mixer(x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    jac = jax.jacrev(lambda v: mixer(v)[0, 0, 0])(x)[0]  # d y[token 0, channel 0] / d x: (N, C)
    assert jnp.all(jnp.abs(jac).sum(1) > 0) and jnp.all(jnp.abs(jac).sum(0) > 0)  # every token, every channel


@pytest.mark.parametrize("channel_mixer", ["mlp", "einfft"])
def test_images_to_logits(channel_mixer):
    model = Simba(image_size=28, patch_size=7, in_channels=1, num_classes=10, d_model=16, num_layers=1,
                  channel_mixer=channel_mixer, rngs=nnx.Rngs(0))
    assert nnx.jit(lambda m, x: m(x))(model, jnp.ones((3, 28, 28, 1))).shape == (3, 10)


def test_bad_sizes_fail_in_the_constructor():
    valid = r"\(valid: 1, 2, 4, 7, 14, 28\)"
    with pytest.raises(ValueError, match=r"image size 28 is not divisible by patch size 5 " + valid):
        Simba(image_size=28, patch_size=5, in_channels=1, num_classes=10, d_model=16, num_layers=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model 18 is not divisible by num_blocks 4"):
        EinFFT(18, num_blocks=4, rngs=nnx.Rngs(0))


def test_short_training_on_digits_learns(cfg_for, tmp_path):
    cfg = cfg_for("model=simba", "model.d_model=32", "model.num_layers=1", "model.patch_size=7",
                  "trainer.steps=120", "trainer.batch_size=64", "trainer.eval_every=120", "checkpoint.every=120")
    final = run(cfg, tmp_path)
    assert final["eval/accuracy"] >= 0.7  # chance is 0.1
    assert final["eval/loss"] < 0.5 * np.log(10)
