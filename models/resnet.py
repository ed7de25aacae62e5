"""ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition"), torchvision-exact.

One class for both families: the ImageNet ResNets (7x7/2 stem + max pool, four stages of 64..512 channels)
and the CIFAR ResNets of section 4.2 (3x3 stem, three stages of 16/32/64 channels). The depth, block type and
widths are arguments (conf/model/resnet*.yaml).
"""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import BatchNorm, cpu_conv, cpu_dot, max_pool

# He et al. initialise convolutions with N(0, 2 / fan_out) (torchvision: kaiming_normal_, mode="fan_out").
conv_init = nnx.with_partitioning(
    nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), (None, None, None, "conv_out")
)


def conv(c_in: int, c_out: int, k: int, stride: int, dtype: str, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free k x k convolution padded like torchvision (k // 2 on each side), so shapes match exactly."""
    return nnx.Conv(
        c_in, c_out, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2, use_bias=False,
        kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        conv_general_dilated=cpu_conv,  # the same convolution, trained faster on CPU (models/layers.py)
    )


def batch_norm(c: int, dtype: str, rngs: nnx.Rngs) -> BatchNorm:
    """BatchNorm with torchvision's defaults (momentum 0.1 there is 0.9 here: the weight on the old average)."""
    return BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Shortcut(nnx.Module):
    """Projection shortcut (1x1 conv + BN, "option B"), used where the residual changes shape."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, dtype: str, rngs: nnx.Rngs):
        self.conv = conv(c_in, c_out, 1, stride, dtype, rngs)
        self.norm = batch_norm(c_out, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, *, dtype: str, rngs: nnx.Rngs):
        c_out = width * self.expansion
        self.conv1 = conv(c_in, width, 3, stride, dtype, rngs)
        self.norm1 = batch_norm(width, dtype, rngs)
        self.conv2 = conv(width, c_out, 3, 1, dtype, rngs)
        self.norm2 = batch_norm(c_out, dtype, rngs)
        shape_changes = stride != 1 or c_in != c_out
        self.shortcut = Shortcut(c_in, c_out, stride, dtype=dtype, rngs=rngs) if shape_changes else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
    """1x1 squeeze, 3x3, 1x1 expand x4 with a residual connection (ResNet-50/101/152; stride on the 3x3, "v1.5")."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, *, dtype: str, rngs: nnx.Rngs):
        c_out = width * self.expansion
        self.conv1 = conv(c_in, width, 1, 1, dtype, rngs)
        self.norm1 = batch_norm(width, dtype, rngs)
        self.conv2 = conv(width, width, 3, stride, dtype, rngs)
        self.norm2 = batch_norm(width, dtype, rngs)
        self.conv3 = conv(width, c_out, 1, 1, dtype, rngs)
        self.norm3 = batch_norm(c_out, dtype, rngs)
        shape_changes = stride != 1 or c_in != c_out
        self.shortcut = Shortcut(c_in, c_out, stride, dtype=dtype, rngs=rngs) if shape_changes else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.norm1(self.conv1(x)))
        y = nnx.relu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class Stem(nnx.Module):
    """ImageNet stem: 7x7/2 conv + BN + ReLU + 3x3/2 max pool (/4); CIFAR stem: 3x3 conv + BN + ReLU (/1)."""

    def __init__(self, c_in: int, c_out: int, kind: Literal["imagenet", "cifar"], *, dtype: str, rngs: nnx.Rngs):
        self.kind = kind
        self.conv = conv(c_in, c_out, 7 if kind == "imagenet" else 3, 2 if kind == "imagenet" else 1, dtype, rngs)
        self.norm = batch_norm(c_out, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.norm(self.conv(x)))
        if self.kind == "imagenet":
            # (B, H/2, W/2, C) -> (B, H/4, W/4, C)
            x = max_pool(x, 3, stride=2, padding=1)
        return x


class ResNet(nnx.Module):
    """ResNet classifier: stem, stages of residual blocks (the first block of stages 2.. halves H, W), GAP, FC.

    `stem_width` (default: widths[0]) is the stem's output channels; Hugging Face's `embedding_size`, which may
    differ from the first stage's width.
    """

    tasks = ("classify",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(
        self,
        *,
        stage_sizes: tuple[int, ...],
        widths: tuple[int, ...],
        block: Literal["basic", "bottleneck"],
        stem: Literal["imagenet", "cifar"],
        num_classes: int,
        in_channels: int = 3,
        stem_width: int | None = None,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if len(stage_sizes) != len(widths):
            raise ValueError(
                f"ResNet: {len(stage_sizes)} stage sizes {list(stage_sizes)} but {len(widths)} widths {list(widths)} "
                "(valid: one width per stage)"
            )
        if block not in BLOCKS:
            raise ValueError(f"ResNet: unknown block {block!r} (valid: {', '.join(BLOCKS)})")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet: unknown stem {stem!r} (valid: imagenet, cifar)")
        block_cls = BLOCKS[block]
        c_in = widths[0] if stem_width is None else stem_width
        self.stem = Stem(in_channels, c_in, stem, dtype=dtype, rngs=rngs)
        stages = []
        for i, (n_blocks, width) in enumerate(zip(stage_sizes, widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block_cls(c_in, width, stride, dtype=dtype, rngs=rngs))
                c_in = width * block_cls.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(
            c_in, num_classes, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("conv_out", None)),
            dtype=dtype, param_dtype=jnp.float32, dot_general=cpu_dot, rngs=rngs,
        )

    def features(self, x: jax.Array) -> jax.Array:
        """The last stage's feature map before pooling: (B, H, W, C) -> (B, H/32, W/32, 2048) for ResNet-50."""
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.features(x).mean(axis=(1, 2))  # global average pool: (B, h, w, C) -> (B, C)
        return self.head(x)
