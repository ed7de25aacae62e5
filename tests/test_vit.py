"""ViT: reference parameter counts, token shapes, patch embedding as a linear map, shape errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from models.vit import ViT
from train.config import compose
from train.loop import run


def abstract(overrides: list[str]) -> nnx.Module:
    """The model of a composed config, built without allocating."""
    cfg = compose(overrides)
    return nnx.eval_shape(lambda: instantiate(cfg.model, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("name, expected", [
    ("vit_ti16", 5_717_416), ("vit_s16", 22_050_664), ("vit_b16", 86_567_656), ("vit_l16", 304_326_632),
    ("vit_b32", 88_224_232),
])
def test_vit_parameter_counts_equal_timm(name, expected):
    model = abstract([f"model={name}", "data=imagenet2012"])
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == expected


@pytest.mark.parametrize("name, tokens", [("vit_b16", 197), ("vit_b32", 50)])
def test_tokens_are_cls_plus_patches(name, tokens):
    model = abstract([f"model={name}", "data=imagenet2012"])
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state, images)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    assert features.shape == (2, tokens, 768) and logits.shape == (2, 1000)


def test_image_size_must_be_divisible_by_patch_size():
    with pytest.raises(ValueError, match=r"ViT: image size 30 is not divisible by patch size 4 "
                                         r"\(valid: 1, 2, 3, 5, 6, 10, 15, 30\)"):
        ViT(image_size=30, patch_size=4, d_model=8, depth=1, num_heads=2, d_ff=16, num_classes=3, rngs=nnx.Rngs(0))


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch():
    model = ViT(image_size=8, patch_size=4, d_model=6, depth=1, num_heads=2, d_ff=8, num_classes=3, in_channels=2,
                rngs=nnx.Rngs(0))
    images = jax.random.normal(jax.random.key(0), (1, 8, 8, 2))
    patches = images.reshape(1, 2, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4, 5).reshape(1, 4, 32)  # (B, N, P*P*C)
    kernel = model.patch_embed.kernel.get_value().reshape(32, 6)  # (P, P, C, D) -> (P*P*C, D)
    expected = jnp.einsum("bnp,pd->bnd", patches, kernel) + model.patch_embed.bias.get_value()
    np.testing.assert_allclose(model.patch_embed(images).reshape(1, 4, 6), expected, rtol=1e-5, atol=1e-5)


def test_vit_tiny_trains_on_digits(cfg_for, tmp_path):
    # 100 steps of 64 images: ~15 s of CPU time on 2 cores; 300 steps of 128 reach 97.8% (README.md, Results).
    cfg = cfg_for("model=vit_tiny", "data=digits", "trainer.steps=100", "trainer.batch_size=64",
                  "trainer.eval_every=100", "checkpoint.every=100", "optim.warmup_steps=10")
    final = run(cfg, tmp_path)
    assert final["eval/accuracy"] >= 0.90
