"""Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), timm-exact parameter counts.

Eq. 1-4 of the paper: the image cut into P x P patches, each linearly embedded; a learnable [CLS] token
prepended; learned position embeddings added; L pre-LayerNorm encoder blocks; the class read from the final
[CLS] state. Attention and the MLP are the shared `models.layers` blocks.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import FeedForward, MultiHeadAttention, check_remat, cpu_dot, layer_stack, patch_embedding, run_stack


class EncoderBlock(nnx.Module):
    """Pre-LN encoder block (eq. 2-3): x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, norm_eps: float, activation: str, dtype: str,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(d_model, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = FeedForward(d_model, d_ff, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
    """ViT classifier: patch embedding, [CLS] + position embeddings, `depth` encoder blocks, LN, linear head.

    `scan_layers` stacks the blocks along a layer axis and runs them as one scan (compile time flat in depth);
    `remat` recomputes each block in the backward pass. `norm_eps` and `activation` default to big_vision's (1e-6, tanh-approximate GELU); Hugging Face's google/vit-*
    checkpoints use 1e-12 and the exact erf GELU ("gelu_exact").
    """

    tasks = ("classify",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        d_model: int,
        depth: int,
        num_heads: int,
        d_ff: int,
        num_classes: int,
        in_channels: int = 3,
        norm_eps: float = 1e-6,
        activation: str = "gelu",
        scan_layers: bool = False,
        remat: str = "none",
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        check_remat("ViT", remat)
        self.scan_layers, self.remat = scan_layers, remat
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = patch_embedding("ViT", image_size, patch_size, in_channels, d_model, dtype=dtype,
                                           rngs=rngs)
        init = nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None, "embed"))
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d_model), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, num_patches + 1, d_model), jnp.float32))
        self.blocks = layer_stack(lambda r: EncoderBlock(d_model, num_heads, d_ff, norm_eps=norm_eps,
                                                         activation=activation, dtype=dtype, rngs=r),
                                  depth, rngs, scan=scan_layers)
        self.norm = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        # big_vision initialises the head to zero: every class starts equally likely.
        self.head = nnx.Linear(d_model, num_classes, kernel_init=nnx.with_partitioning(
            nnx.initializers.zeros_init(), ("embed", None)), dtype=dtype, param_dtype=jnp.float32, dot_general=cpu_dot,
            rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """The final normalised token states: (B, H, W, C) -> (B, 1 + N, D), [CLS] first."""
        x = self.patch_embed(images)  # (B, H, W, C) -> (B, H/P, W/P, D)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H/P, W/P, D) -> (B, N, D)
        cls = jnp.broadcast_to(self.cls_token.get_value(), (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed.get_value().astype(x.dtype)  # (B, 1 + N, D)
        x = run_stack(self.blocks, x, scan=self.scan_layers, remat=self.remat)
        return self.norm(x)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.head(self.features(images)[:, 0])  # (B, D) [CLS] state -> (B, num_classes)
