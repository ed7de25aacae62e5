"""The chapter's definitions: MLP hidden layers and LeNet's 256-value feature vector."""

import jax
import jax.numpy as jnp
from flax import nnx

import models  # noqa: F401
from models.lenet import LeNet
from models.mlp import MLP


def test_mlp_hidden_layers_are_the_linear_layers_but_the_output_one():
    for hidden in ([], [32], [64, 32, 16]):
        mlp = MLP(784, hidden, 10, rngs=nnx.Rngs(0))
        linears = [m for _, m in nnx.iter_modules(mlp) if isinstance(m, nnx.Linear)]
        assert len(linears) == len(hidden) + 1
        assert len(mlp.hidden) == len(hidden)
        assert mlp(jnp.zeros((3, 28, 28, 1))).shape == (3, 10)


def test_mlp_activation_is_configurable_and_checked():
    x = jnp.linspace(-2, 2, 8).reshape(2, 4)
    relu = MLP(4, [5], 1, activation="relu", rngs=nnx.Rngs(0))
    tanh = MLP(4, [5], 1, activation="tanh", rngs=nnx.Rngs(0))
    assert not jnp.allclose(relu(x), tanh(x))
    try:
        MLP(4, [5], 1, activation="swishy", rngs=nnx.Rngs(0))
    except ValueError as e:
        assert "swishy" in str(e) and "relu" in str(e)
    else:
        raise AssertionError("unknown activation accepted")


def test_lenet_turns_28x28_into_256_features():
    lenet = LeNet(1, 28, 10, rngs=nnx.Rngs(0))
    feats = jax.eval_shape(lenet.features, jax.ShapeDtypeStruct((5, 28, 28, 1), jnp.float32))
    assert feats.shape == (5, 256) == (5, 16 * 4 * 4)
    assert lenet(jnp.zeros((5, 28, 28, 1))).shape == (5, 10)
