"""LeNet-like ConvNet: a conv/pool feature extractor, then an MLP classifier (LeCun et al. 1998)."""

from collections.abc import Sequence

import jax
from flax import nnx

from models.layers import activation_fn, activation_max_pool, cpu_conv
from models.mlp import MLP


class LeNet(nnx.Module):
    """conv5x5(6) -> pool -> conv5x5(16) -> pool: 28x28 becomes 16 x 4 x 4 = 256 features; MLP to logits."""

    tasks = ("classify",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, *,
                 hidden: Sequence[int] = (120, 84), activation: str = "relu", dtype: str = "float32",
                 rngs: nnx.Rngs):
        feature_size = ((image_size - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by 2x2 pooling
        if feature_size < 1:
            raise ValueError(f"LeNet: image size {image_size} is too small (valid: 16 or more)")
        self.act = activation_fn(activation)
        # cpu_conv: the same convolutions, trained faster on CPU (LeNet 1.16x, then 1.23x; models/layers.py)
        self.conv1 = nnx.Conv(in_channels, 6, (5, 5), padding="VALID", dtype=dtype, rngs=rngs,
                              conv_general_dilated=cpu_conv)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", dtype=dtype, rngs=rngs,
                              conv_general_dilated=cpu_conv)
        self.num_features = 16 * feature_size * feature_size
        self.classifier = MLP(self.num_features, hidden, num_classes, activation=activation, dtype=dtype,
                              rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The feature vector the classifier sees: (B, 28, 28, C) -> (B, 256)."""
        x = activation_max_pool(self.conv1(x), self.act, 2)  # act, 2x2 max pool: (B, 28, 28, C) -> (B, 12, 12, 6)
        x = activation_max_pool(self.conv2(x), self.act, 2)  # -> (B, 4, 4, 16)
        return x.reshape(x.shape[0], -1)  # -> (B, 256)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.classifier(self.features(x))
