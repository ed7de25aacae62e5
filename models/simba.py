"""Simba: Mamba over image patches (Patro & Agneeswaran 2024, "SiMBA: Simplified Mamba-based Architecture").

Each block is x + TokenMixer(LN(x)), then x + ChannelMixer(LN(x)) (paper Fig. 1). The token mixer is the Mamba
block of models/mamba.py run over the patch sequence in raster order; `bidirectional` adds a second Mamba over the
reversed sequence (as Vision Mamba does), so every patch sees the whole image. The channel mixer is an MLP or
EinFFT (paper Sec. 3.2): a 2-D FFT over (tokens, channel blocks), a block-diagonal complex MLP in the frequency
domain (Einstein matrix multiplication), soft-shrinkage for sparsity, and the inverse FFT.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import FeedForward, check_remat, cpu_dot, layer_stack, patch_embedding, run_stack
from models.mamba import MambaBlock


class EinFFT(nnx.Module):
    """SiMBA's frequency-domain channel mixer: FFT, two complex block-diagonal linear maps, soft-shrink, inverse FFT."""

    def __init__(self, d_model: int, *, num_blocks: int = 4, sparsity_threshold: float = 0.01, rngs: nnx.Rngs):
        if d_model % num_blocks:
            valid = ", ".join(str(b) for b in range(1, d_model + 1) if d_model % b == 0)
            raise ValueError(f"EinFFT: d_model {d_model} is not divisible by num_blocks {num_blocks} (valid: {valid})")
        self.num_blocks, self.block_size, self.threshold = num_blocks, d_model // num_blocks, sparsity_threshold
        init = nnx.initializers.normal(0.02)  # the paper's scale
        k, b = (2, num_blocks, self.block_size, self.block_size), (2, num_blocks, self.block_size)
        self.w1, self.w2 = nnx.Param(init(rngs.params(), k)), nnx.Param(init(rngs.params(), k))  # [real, imag]
        self.b1, self.b2 = nnx.Param(init(rngs.params(), b)), nnx.Param(init(rngs.params(), b))

    @staticmethod
    def _complex_linear(re: jax.Array, im: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(re + i im) (w_r + i w_i) + (b_r + i b_i), block-diagonal over the channel blocks k."""
        mul = lambda v, m: jnp.einsum("bnkd,kde->bnke", v, m)
        return mul(re, w[0]) - mul(im, w[1]) + b[0], mul(re, w[1]) + mul(im, w[0]) + b[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, N, C) -> (B, N, C)."""
        bsz, n, c = x.shape
        blocks = x.astype(jnp.float32).reshape(bsz, n, self.num_blocks, self.block_size)  # (B, N, C) -> (B, N, K, C/K)
        spec = jnp.fft.fft2(blocks, axes=(1, 2), norm="ortho")
        re, im = self._complex_linear(spec.real, spec.imag, self.w1[...], self.b1[...])
        re, im = self._complex_linear(jax.nn.relu(re), jax.nn.relu(im), self.w2[...], self.b2[...])
        shrink = lambda v: jnp.sign(v) * jnp.maximum(jnp.abs(v) - self.threshold, 0.0)  # soft-shrinkage
        out = jnp.fft.ifft2(jax.lax.complex(shrink(re), shrink(im)), axes=(1, 2), norm="ortho").real
        return out.reshape(bsz, n, c).astype(x.dtype)


class SimbaBlock(nnx.Module):
    """x + Mamba(LN(x)) [+ the reversed-sequence Mamba], then x + ChannelMixer(LN(x))."""

    def __init__(self, d_model: int, *, bidirectional: bool, channel_mixer: str, mlp_ratio: int, num_blocks: int,
                 scan: str | None, dtype: str, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(d_model, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.mamba = MambaBlock(d_model, scan=scan, dtype=dtype, rngs=rngs)
        self.mamba_reverse = MambaBlock(d_model, scan=scan, dtype=dtype, rngs=rngs) if bidirectional else None
        self.norm2 = nnx.LayerNorm(d_model, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if channel_mixer == "einfft":
            self.channel = EinFFT(d_model, num_blocks=num_blocks, rngs=rngs)
        else:
            self.channel = FeedForward(d_model, mlp_ratio * d_model, activation="gelu", dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, N, D) -> (B, N, D)."""
        h = self.norm1(x)
        y = self.mamba(h)
        if self.mamba_reverse is not None:
            y = y + self.mamba_reverse(h[:, ::-1])[:, ::-1]  # scan the patches last-to-first, realign
        x = x + y
        return x + self.channel(self.norm2(x))


class Simba(nnx.Module):
    """Simba classifier: patch embedding, Simba blocks, LayerNorm, mean over patches, linear head."""

    tasks = ("classify",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        in_channels: int,
        num_classes: int,
        d_model: int,
        num_layers: int,
        bidirectional: bool = True,
        channel_mixer: str = "einfft",
        mlp_ratio: int = 4,
        num_blocks: int = 4,
        scan: str | None = None,
        scan_layers: bool = False,
        remat: str = "none",
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        check_remat("Simba", remat)
        self.scan_layers, self.remat = scan_layers, remat
        if channel_mixer not in ("mlp", "einfft"):
            raise ValueError(f"Simba: unknown channel_mixer {channel_mixer!r} (valid: mlp, einfft)")
        self.patch_embed = patch_embedding("Simba", image_size, patch_size, in_channels, d_model, dtype=dtype,
                                           rngs=rngs)
        self.blocks = layer_stack(
            lambda r: SimbaBlock(d_model, bidirectional=bidirectional, channel_mixer=channel_mixer,
                                 mlp_ratio=mlp_ratio, num_blocks=num_blocks, scan=scan, dtype=dtype, rngs=r),
            num_layers, rngs, scan=scan_layers)
        self.norm = nnx.LayerNorm(d_model, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, kernel_init=nnx.with_partitioning(
            nnx.initializers.zeros_init(), ("embed", None)), dtype=dtype, param_dtype=jnp.float32, dot_general=cpu_dot,
            rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, C) -> logits (B, num_classes)."""
        x = self.patch_embed(images)  # (B, H, W, C) -> (B, H/P, W/P, D)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # -> (B, N, D), raster order
        x = run_stack(self.blocks, x, scan=self.scan_layers, remat=self.remat)
        return self.head(self.norm(x).mean(axis=1))  # mean over patches -> (B, num_classes)
