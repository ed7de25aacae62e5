"""MLP: a stack of linear layers; every layer but the output one is a hidden layer."""

from collections.abc import Sequence

import jax
from flax import nnx

from models.layers import activation_fn, cpu_dot


class MLP(nnx.Module):
    """Multi-layer perceptron; `len(hidden)` is its number of hidden layers, as the chapter counts them.

    Inputs of any shape (B, ...) are flattened to (B, in_features).
    """

    tasks = ("classify", "regress")  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, *,
                 activation: str = "relu", dtype: str = "float32", rngs: nnx.Rngs):
        self.act = activation_fn(activation)
        widths = [in_features, *hidden]
        kernel_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.hidden = nnx.List([
            nnx.Linear(w_in, w_out, kernel_init=kernel_init, dtype=dtype, dot_general=cpu_dot, rngs=rngs)
            for w_in, w_out in zip(widths[:-1], widths[1:])
        ])
        self.out = nnx.Linear(widths[-1], out_features, dtype=dtype, dot_general=cpu_dot, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)  # (B, ...) -> (B, in_features)
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)
