"""ResNet: reference parameter counts, feature maps, BatchNorm state, the quadratic cost of channels."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hydra.utils import instantiate

import models  # noqa: F401  (sets nnx's sharding mode before any model is built)
from models.resnet import ResNet
from train.config import compose
from train.loop import run


def abstract(overrides: list[str]) -> nnx.Module:
    """The model of a composed config, built without allocating."""
    cfg = compose(overrides)
    return nnx.eval_shape(lambda: instantiate(cfg.model, rngs=nnx.Rngs(0)))


def n_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    """model(x) compiled once per shape; BatchNorm statistics updated in train mode flow back to `model`."""
    return model(x)


@pytest.fixture(scope="module")
def tiny_resnet() -> ResNet:
    """A two-stage CIFAR-style ResNet small enough to run eagerly; tests take `nnx.clone`s (init compiles slowly)."""
    return ResNet(stage_sizes=(1, 1), widths=(4, 8), block="basic", stem="cifar", num_classes=3, in_channels=2,
                  rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
    ("resnet101", 44_549_160), ("resnet152", 60_192_808),
])
def test_imagenet_resnet_parameter_counts_equal_torchvision(name, expected):
    assert n_params(abstract([f"model={name}", "data=imagenet2012"])) == expected


@pytest.mark.parametrize("name, expected", [("resnet20", 272_474), ("resnet56", 855_770)])
def test_cifar_resnet_parameter_counts(name, expected):
    # He et al. report 0.27M and 0.85M with zero-padding shortcuts; projections add 2,752 parameters.
    cifar = ["data=tfds", "data.name=cifar10", "data.image_size=32", "data.channels=3", "data.num_classes=10"]
    assert n_params(abstract([f"model={name}", *cifar])) == expected


@pytest.mark.parametrize("name, size, channels, expected", [
    ("resnet50", 224, 3, (1, 7, 7, 2048)), ("resnet18", 224, 3, (1, 7, 7, 512)), ("resnet20", 32, 3, (1, 8, 8, 64)),
    ("resnet20", 28, 1, (1, 7, 7, 64)),
])
def test_feature_map_before_pooling(name, size, channels, expected):
    model = abstract([f"model={name}", "data=tfds", f"data.image_size={size}", f"data.channels={channels}"])
    graphdef, state = nnx.split(model)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x), state,
                              jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))
    assert features.shape == expected


def test_stage_sizes_and_widths_must_match():
    with pytest.raises(ValueError, match="3 stage sizes .* 2 widths"):
        ResNet(stage_sizes=(1, 1, 1), widths=(4, 8), block="basic", stem="cifar", num_classes=3, rngs=nnx.Rngs(0))


def test_batchnorm_train_mode_uses_and_updates_batch_statistics(tiny_resnet):
    model = nnx.clone(tiny_resnet)
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))
    stem_out = model.stem.conv(x)
    model.train()
    y_full, y_first = forward(model, x)[:1], forward(model, x[:1])
    assert not np.allclose(y_full, y_first, atol=1e-4)  # each example's output depends on its batch
    # Two train calls from mean 0: m <- 0.9 m + 0.1 batch mean, first with 8 examples then with 1.
    expected = 0.9 * 0.1 * stem_out.mean((0, 1, 2)) + 0.1 * stem_out[:1].mean((0, 1, 2))
    np.testing.assert_allclose(model.stem.norm.mean.get_value(), expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_eval_mode_uses_running_averages_and_leaves_them(tiny_resnet):
    model = nnx.clone(tiny_resnet)
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))
    model.train()
    forward(model, x)
    stats = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
    model.eval()
    # each example's output is independent of its batch
    np.testing.assert_allclose(forward(model, x)[:1], forward(model, x[:1]), rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.array, nnx.state(model, nnx.BatchStat)))
    norm, h = model.stem.norm, model.stem.conv(x)
    manual = (h - norm.mean.get_value()) / jnp.sqrt(norm.var.get_value() + 1e-5) * norm.scale.get_value() \
        + norm.bias.get_value()
    np.testing.assert_allclose(norm(h), manual, rtol=1e-4, atol=1e-5)


def test_batch_statistics_survive_checkpoint_restore(tiny_resnet, tmp_path):
    model = nnx.clone(tiny_resnet)
    model.train()
    forward(model, jax.random.normal(jax.random.key(1), (8, 6, 6, 2)) + 3.0)
    model.eval()
    x = jax.random.normal(jax.random.key(2), (4, 6, 6, 2))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", nnx.state(model))
    restored = nnx.clone(tiny_resnet)  # fresh (0, 1) statistics and, shifted, different parameters until restored
    nnx.update(restored, jax.tree.map(lambda p: p + 1.0, nnx.state(restored, nnx.Param)))
    restored.eval()
    with ocp.StandardCheckpointer() as checkpointer:
        nnx.update(restored, checkpointer.restore(tmp_path / "ckpt", nnx.state(restored)))
    saved_mean = model.stem.norm.mean.get_value()
    assert np.abs(saved_mean).max() > 0.01  # the statistics moved away from their initial zeros
    np.testing.assert_array_equal(restored.stem.norm.mean.get_value(), saved_mean)
    np.testing.assert_array_equal(forward(restored, x), forward(model, x))


def conv_cost(c_in: int, c_out: int) -> tuple[int, float]:
    """Parameters and compiled forward FLOPs of a bias-free 3x3 convolution on a 16x16 input."""
    conv = nnx.Conv(c_in, c_out, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv)
    x = jax.ShapeDtypeStruct((1, 16, 16, c_in), jnp.float32)
    compiled = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile()
    return conv.kernel.get_value().size, compiled.cost_analysis()["flops"]


def test_doubling_channels_quadruples_parameters_and_flops():
    params, flops = conv_cost(16, 32)
    params2, flops2 = conv_cost(32, 64)
    assert params2 == 4 * params
    assert flops2 == pytest.approx(4 * flops, rel=1e-3)


def test_resnet20_trains_on_digits(cfg_for, tmp_path):
    # 100 steps of 32 images (~20 s) reach ~98%; at 60 steps the result (84-90%) depends on the CPU thread
    # count, through reduction order and BatchNorm statistics. 300 steps of 128 reach 99.4% (README, Results).
    cfg = cfg_for("model=resnet20", "data=digits", "trainer.steps=100", "trainer.batch_size=32",
                  "trainer.eval_every=100", "checkpoint.every=100", "optim.warmup_steps=10")
    final = run(cfg, tmp_path)
    assert final["eval/accuracy"] >= 0.90
