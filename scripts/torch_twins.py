"""Plain PyTorch twins of archlab's models, for speed comparisons (scripts/bench.py).

A twin has exactly the trainable parameters of the archlab model built from the same resolved model config and
computes the same function: same layers, widths, activations (archlab's "gelu" is jax.nn.gelu, the tanh form),
LayerNorm epsilons and norm placement: loaded with archlab's weights, a twin gives archlab's loss to ~1e-6. Only
the initialisation differs: PyTorch's defaults, except embeddings (whose N(0, 1) default makes a different model
at step 0) and parameters PyTorch has no default for (position tables, [CLS], EinFFT, Mamba's A, D and dt), which
take the reference's. Images are NCHW, so flattened features come out in (C, H, W) order where archlab's are
(H, W, C): a fixed permutation of the next layer's rows.
Config keys that choose how archlab runs, not what it computes (dtype, remat, scan, chunk_size), are ignored.
"""

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": partial(F.gelu, approximate="tanh"), "gelu_exact": F.gelu, "tanh": torch.tanh,
               "sigmoid": torch.sigmoid, "silu": F.silu}


def embedding(num: int, d_model: int, std: float) -> nn.Embedding:
    """nn.Embedding ~ N(0, std^2): its N(0, 1) default would make tied output logits of scale sqrt(d_model)."""
    table = nn.Embedding(num, d_model)
    nn.init.normal_(table.weight, std=std)
    return table


# ---- Layers shared by the Transformers ----


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate q, k, v, out projections (models/layers.py)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.query, self.key, self.value, self.out = (nn.Linear(d_model, d_model) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); `mask` bool (B, 1, 1, S), True = attend."""
        source = x if context is None else context
        heads = lambda t: t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (B, T, D) -> (B, H, T, Dh)
        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(source)), heads(self.value(source)),
                                           attn_mask=mask, is_causal=causal)
        return self.dropout(self.out(y.transpose(1, 2).flatten(2)))  # (B, H, T, Dh) -> (B, T, D)


class FeedForward(nn.Module):
    """Linear(d_model -> d_ff), activation, Linear(d_ff -> d_model)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x))))


# ---- Image classifiers ----


class MLP(nn.Module):
    """models/mlp.py: flatten, hidden Linear layers with the activation, output Linear."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu"):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(widths[-1], out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)


class LeNet(nn.Module):
    """models/lenet.py: conv5x5(6) -> pool -> conv5x5(16) -> pool -> MLP."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 hidden: Sequence[int] = (120, 84), activation: str = "relu"):
        super().__init__()
        feature_size = ((image_size - 4) // 2 - 4) // 2
        self.act = ACTIVATIONS[activation]
        self.conv1, self.conv2 = nn.Conv2d(in_channels, 6, 5), nn.Conv2d(6, 16, 5)
        self.classifier = MLP(16 * feature_size**2, hidden, num_classes, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act(self.conv1(x)), 2)  # (B, C, 28, 28) -> (B, 6, 12, 12)
        x = F.max_pool2d(self.act(self.conv2(x)), 2)  # -> (B, 16, 4, 4)
        return self.classifier(x)


def conv_bn(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    """Bias-free k x k convolution padded k // 2, then BatchNorm (torchvision's conv + bn pair)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and a residual; a 1x1 conv-BN projection where the shape changes (option B)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(c_in, width, 3, stride), conv_bn(width, width, 3, 1)
        self.shortcut = conv_bn(c_in, width, 1, stride) if stride != 1 or c_in != width else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 squeeze, 3x3 (with the stride, "v1.5"), 1x1 expand x4, and a residual."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.conv2 = conv_bn(c_in, width, 1, 1), conv_bn(width, width, 3, stride)
        self.conv3 = conv_bn(width, c_out, 1, 1)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(y) + self.shortcut(x))


class ResNet(nn.Module):
    """models/resnet.py: stem, stages of residual blocks (stages 2.. start at stride 2), global average pool, FC."""

    def __init__(self, stage_sizes: list[int], widths: list[int], block: str, stem: str, num_classes: int,
                 in_channels: int = 3, stem_width: int | None = None):
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        imagenet, stem_width = stem == "imagenet", stem_width or widths[0]
        layers = [*conv_bn(in_channels, stem_width, 7 if imagenet else 3, 2 if imagenet else 1), nn.ReLU()]
        self.stem = nn.Sequential(*layers, *([nn.MaxPool2d(3, 2, 1)] if imagenet else []))
        stages, c_in = [], stem_width
        for i, (n_blocks, width) in enumerate(zip(stage_sizes, widths)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(block_cls(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))  # global average pool: (B, C, h, w) -> (B, C)


class ViTBlock(nn.Module):
    """Pre-LN encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, norm_eps: float, activation: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model, eps=norm_eps), nn.LayerNorm(d_model, eps=norm_eps)
        self.attn, self.mlp = MultiHeadAttention(d_model, num_heads), FeedForward(d_model, d_ff, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """models/vit.py: patch conv, [CLS] + learned positions, pre-LN blocks, LN, head on the [CLS] state."""

    def __init__(self, image_size: int, patch_size: int, d_model: int, depth: int, num_heads: int, d_ff: int,
                 num_classes: int, in_channels: int = 3, norm_eps: float = 1e-6, activation: str = "gelu"):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, d_model, patch_size, patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image_size // patch_size) ** 2 + 1, d_model))
        self.blocks = nn.Sequential(*(ViTBlock(d_model, num_heads, d_ff, norm_eps, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---- Parallel scan, Mamba and Simba ----


def _blelloch_(A: torch.Tensor, X: torch.Tensor) -> None:
    """In place, X[:, t] <- A[:, t] X[:, t-1] + X[:, t] (with X[:, -1] = 0) along dim 1, of power-of-2 length.

    Up-sweep: each right child absorbs its left sibling, level by level, so the last element holds the full
    prefix; down-sweep: from the coarsest level down, each left child but the first absorbs the prefix before it.
    """
    b, length, *rest = X.shape
    levels = length.bit_length() - 1
    Aa, Xa = A, X
    for _ in range(levels):
        Aa, Xa = Aa.view(b, -1, 2, *rest), Xa.view(b, -1, 2, *rest)  # (B, T, ...) -> (B, T/2, 2, ...)
        Xa[:, :, 1].add_(Aa[:, :, 1] * Xa[:, :, 0])
        Aa[:, :, 1].mul_(Aa[:, :, 0])
        Aa, Xa = Aa[:, :, 1], Xa[:, :, 1]
    for k in range(levels - 2, -1, -1):
        Aa = A[:, 2**k - 1 :: 2**k].view(b, -1, 2, *rest)
        Xa = X[:, 2**k - 1 :: 2**k].view(b, -1, 2, *rest)
        Xa[:, 1:, 0].add_(Aa[:, 1:, 0] * Xa[:, :-1, 1])


def _padded(t: torch.Tensor) -> torch.Tensor:
    """A zero-padded copy of t, its dim 1 grown to the next power of 2 (padding steps never reach the outputs)."""
    out = t.new_zeros(t.shape[0], 1 << (t.shape[1] - 1).bit_length(), *t.shape[2:])
    out[:, : t.shape[1]] = t
    return out


class PScan(torch.autograd.Function):
    """H_t = A_t H_{t-1} + X_t (H_{-1} = 0) for A, X (B, L, D, N) by a Blelloch parallel scan, in O(log L) steps.

    After alxndrTL/mamba.py (`mambapy/pscan.py`, MIT licence): the same algorithm without the initial-state
    option, and the backward pass, itself a linear recurrence run backwards in time, by the same scan on
    time-reversed inputs.
    """

    @staticmethod
    def forward(ctx, A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        length = X.shape[1]
        H = _padded(X)
        _blelloch_(_padded(A), H)
        H = H[:, :length]
        ctx.save_for_backward(A, H)
        return H

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # dL/dH_t = G_t + A_{t+1} dL/dH_{t+1}; then dX_t = dL/dH_t and dA_t = H_{t-1} dL/dH_t.
        A, H = ctx.saved_tensors
        length = A.shape[1]
        A_next = F.pad(A[:, 1:], (0, 0, 0, 0, 0, 1))  # A_{t+1}, 0 past the end
        dH = _padded(grad.flip(1))
        _blelloch_(_padded(A_next.flip(1)), dH)
        dH = dH[:, :length].flip(1)
        dA = torch.zeros_like(A)
        dA[:, 1:] = H[:, :-1] * dH[:, 1:]
        return dA, dH


pscan = PScan.apply


class MambaBlock(nn.Module):
    """The Mamba mixer (models/mamba.py MambaBlock; alxndrTL/mamba.py MambaBlock): in_proj, causal depthwise
    conv, S6 selective scan (parallel), skip D, SiLU gate, out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 selective: bool = True):
        super().__init__()
        d_inner = expand * d_model
        self.d_state, self.selective = d_state, selective
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        # dt ~ log-uniform in [1e-3, 1e-1], floored at 1e-4, stored through the inverse softplus (reference init).
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        if selective:
            self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(self.dt_rank, d_inner)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt_bias)
        else:
            self.dt_bias = nn.Parameter(dt_bias)
            self.B = nn.Parameter(torch.ones(d_state))
            self.C = nn.Parameter(torch.randn(d_state) * d_state**-0.5)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        length = u.shape[1]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, D) each
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: trim the look-ahead
        if self.selective:
            dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt = F.softplus(self.dt_proj(dt))  # (B, L, D)
        else:
            dt = F.softplus(self.dt_bias).expand_as(x)
            B, C = (p.expand(*x.shape[:-1], self.d_state) for p in (self.B, self.C))
        A = -torch.exp(self.A_log)  # (D, N)
        h = pscan(torch.exp(dt.unsqueeze(-1) * A), (dt * x).unsqueeze(-1) * B.unsqueeze(2))  # (B, L, D, N)
        y = (h @ C.unsqueeze(-1)).squeeze(-1) + self.D * x  # (B, L, D)
        return self.out_proj(y * F.silu(z))


class MambaResidual(nn.Module):
    """x + Mixer(RMSNorm(x))."""

    def __init__(self, d_model: int, **mixer_kwargs):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.mixer = MambaBlock(d_model, **mixer_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class MambaLM(nn.Module):
    """models/mamba.py MambaLM: padded-vocabulary embedding, residual Mamba blocks, final RMSNorm, tied head."""

    def __init__(self, vocab_size: int, d_model: int, num_layers: int, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | None = None, selective: bool = True, pad_vocab_multiple: int = 8):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = embedding(-(-vocab_size // pad_vocab_multiple) * pad_vocab_multiple, d_model, 0.02)
        self.layers = nn.Sequential(*(MambaResidual(d_model, d_state=d_state, d_conv=d_conv, expand=expand,
                                                    dt_rank=dt_rank, selective=selective) for _ in range(num_layers)))
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> logits (B, T, vocab_size); the padding rows of the table never score."""
        h = self.norm_f(self.layers(self.embed(tokens)))
        return F.linear(h, self.embed.weight)[..., : self.vocab_size]


class EinFFT(nn.Module):
    """SiMBA's channel mixer: 2-D FFT over (tokens, channel blocks), two block-diagonal complex linear maps with a
    ReLU between, soft-shrinkage, inverse FFT.

    The complex maps are written in real arithmetic on [real, imag] weight pairs, as the SiMBA code and archlab do:
    with complex weights, torch.compile (2.13, CPU) got the gradient of the second map's weight wrong.
    """

    def __init__(self, d_model: int, num_blocks: int = 4, sparsity_threshold: float = 0.01):
        super().__init__()
        self.num_blocks, self.threshold = num_blocks, sparsity_threshold
        size = d_model // num_blocks
        self.w1, self.w2 = (nn.Parameter(0.02 * torch.randn(2, num_blocks, size, size)) for _ in range(2))
        self.b1, self.b2 = (nn.Parameter(0.02 * torch.randn(2, num_blocks, size)) for _ in range(2))

    @staticmethod
    def _complex_linear(re: torch.Tensor, im: torch.Tensor, w: torch.Tensor, b: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(re + i im) (w_r + i w_i) + (b_r + i b_i), block-diagonal over the channel blocks k."""
        mul = lambda v, m: torch.einsum("bnkd,kde->bnke", v, m)
        return mul(re, w[0]) - mul(im, w[1]) + b[0], mul(re, w[1]) + mul(im, w[0]) + b[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        blocks = x.float().unflatten(-1, (self.num_blocks, -1))  # (B, N, C) -> (B, N, K, C/K)
        spec = torch.fft.fft2(blocks, dim=(1, 2), norm="ortho")
        re, im = self._complex_linear(spec.real, spec.imag, self.w1, self.b1)
        re, im = self._complex_linear(F.relu(re), F.relu(im), self.w2, self.b2)
        spec = torch.complex(F.softshrink(re, self.threshold), F.softshrink(im, self.threshold))
        return torch.fft.ifft2(spec, dim=(1, 2), norm="ortho").real.flatten(2).type_as(x)


class SimbaBlock(nn.Module):
    """x + Mamba(LN(x)) + reversed-sequence Mamba(LN(x)), then x + ChannelMixer(LN(x))."""

    def __init__(self, d_model: int, bidirectional: bool, channel_mixer: str, mlp_ratio: int, num_blocks: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model, eps=1e-6), nn.LayerNorm(d_model, eps=1e-6)
        self.mamba = MambaBlock(d_model)
        self.mamba_reverse = MambaBlock(d_model) if bidirectional else None
        self.channel = (EinFFT(d_model, num_blocks) if channel_mixer == "einfft"
                        else FeedForward(d_model, mlp_ratio * d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        y = self.mamba(h)
        if self.mamba_reverse is not None:
            y = y + self.mamba_reverse(h.flip(1)).flip(1)
        x = x + y
        return x + self.channel(self.norm2(x))


class Simba(nn.Module):
    """models/simba.py: patch conv, Simba blocks, LN, mean over patches, head."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, num_classes: int, d_model: int,
                 num_layers: int, bidirectional: bool = True, channel_mixer: str = "einfft", mlp_ratio: int = 4,
                 num_blocks: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, d_model, patch_size, patch_size)
        self.blocks = nn.Sequential(*(SimbaBlock(d_model, bidirectional, channel_mixer, mlp_ratio, num_blocks)
                                      for _ in range(num_layers)))
        self.norm = nn.LayerNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, D), raster order
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


# ---- Language models ----


class GPTBlock(nn.Module):
    """Pre-norm decoder block: x + attn(ln(x)) causal, then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, dropout: float, norm_eps: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model, eps=norm_eps), nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.mlp = FeedForward(d_model, d_ff, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), causal=True)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """models/gpt.py: token + learned position embeddings, pre-norm blocks, final LN, (tied) output projection."""

    def __init__(self, vocab_size: int, max_len: int, num_layers: int, d_model: int, num_heads: int,
                 d_ff: int | None = None, dropout: float = 0.0, tie_embeddings: bool = True, norm_eps: float = 1e-5):
        super().__init__()
        self.token_embed, self.pos_embed = embedding(vocab_size, d_model, 0.02), embedding(max_len, d_model, 0.02)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(GPTBlock(d_model, num_heads, d_ff or 4 * d_model, dropout, norm_eps)
                                      for _ in range(num_layers)))
        self.ln_f = nn.LayerNorm(d_model, eps=norm_eps)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.unembed.weight = self.token_embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> logits (B, T, V)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.token_embed(tokens) + self.pos_embed(positions))
        return self.unembed(self.ln_f(self.blocks(x)))


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), float32 (length, d)."""
    angles = torch.arange(length)[:, None] / 10000.0 ** (torch.arange(0, d_model, 2) / d_model)  # (L, d/2)
    table = torch.zeros(length, d_model)
    table[:, 0::2], table[:, 1::2] = torch.sin(angles), torch.cos(angles[:, : d_model // 2])
    return table


class Sublayer(nn.Module):
    """A residual sublayer with its LayerNorm: x + f(LN(x)) (pre-norm) or LN(x + f(x)) (post-norm)."""

    def __init__(self, d_model: int, pre: bool, f: nn.Module):
        super().__init__()
        self.pre, self.f, self.norm = pre, f, nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x + self.f(self.norm(x), *args, **kwargs) if self.pre else self.norm(x + self.f(x, *args, **kwargs))


class EncoderBlock(nn.Module):
    """Self-attention over the source (padded keys masked), then a feed-forward layer."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, pre: bool, dropout: float, activation: str):
        super().__init__()
        self.self_attn = Sublayer(d_model, pre, MultiHeadAttention(d_model, num_heads, dropout))
        self.mlp = Sublayer(d_model, pre, FeedForward(d_model, d_ff, activation, dropout))

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.self_attn(x, mask=src_mask))


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder memory, then a feed-forward layer."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, pre: bool, dropout: float, activation: str):
        super().__init__()
        self.self_attn = Sublayer(d_model, pre, MultiHeadAttention(d_model, num_heads, dropout))
        self.cross_attn = Sublayer(d_model, pre, MultiHeadAttention(d_model, num_heads, dropout))
        self.mlp = Sublayer(d_model, pre, FeedForward(d_model, d_ff, activation, dropout))

    def forward(self, y: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        y = self.self_attn(y, causal=True)
        return self.mlp(self.cross_attn(y, memory, mask=src_mask))


class Transformer(nn.Module):
    """models/transformer.py: encoder-decoder over token ids with pad 0; src (B, S), tgt_in (B, T) -> (B, T, V)."""

    def __init__(self, vocab_size: int, src_len: int, tgt_len: int, num_layers: int, d_model: int, num_heads: int,
                 d_ff: int, num_decoder_layers: int | None = None, dropout: float = 0.0, activation: str = "relu",
                 share_embeddings: bool = True, positions: str = "sinusoidal", norm: str = "pre"):
        super().__init__()
        self.scale = math.sqrt(d_model)
        # N(0, 1/d), scaled by sqrt(d) on input: unit-variance inputs, tied output logits of unit scale.
        self.src_embed = embedding(vocab_size, d_model, d_model**-0.5)
        self.tgt_embed = self.src_embed if share_embeddings else embedding(vocab_size, d_model, d_model**-0.5)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)
        if share_embeddings:
            self.unembed.weight = self.src_embed.weight
        if positions == "learned":
            self.src_pos = nn.Parameter(0.02 * torch.randn(src_len, d_model))
            self.tgt_pos = nn.Parameter(0.02 * torch.randn(tgt_len, d_model))
        else:
            self.register_buffer("src_pos", sinusoidal_positions(src_len, d_model), persistent=False)
            self.register_buffer("tgt_pos", sinusoidal_positions(tgt_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        block_args = (d_model, num_heads, d_ff, norm == "pre", dropout, activation)
        self.encoder = nn.ModuleList(EncoderBlock(*block_args) for _ in range(num_layers))
        self.decoder = nn.ModuleList(DecoderBlock(*block_args) for _ in range(num_decoder_layers or num_layers))
        final_norm = lambda: nn.LayerNorm(d_model, eps=1e-6) if norm == "pre" else nn.Identity()
        self.norm_enc, self.norm_dec = final_norm(), final_norm()

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_mask = (src != 0)[:, None, None, :]  # (B, 1, 1, S), True = attend
        x = self.dropout(self.src_embed(src) * self.scale + self.src_pos[: src.shape[1]])
        for block in self.encoder:
            x = block(x, src_mask)
        memory = self.norm_enc(x)
        y = self.dropout(self.tgt_embed(tgt_in) * self.scale + self.tgt_pos[: tgt_in.shape[1]])
        for block in self.decoder:
            y = block(y, memory, src_mask)
        return self.unembed(self.norm_dec(y))


# ---- Public interface ----

TWINS = {"models.mlp.MLP": MLP, "models.lenet.LeNet": LeNet, "models.resnet.ResNet": ResNet,
         "models.vit.ViT": ViT, "models.gpt.GPT": GPT, "models.mamba.MambaLM": MambaLM,
         "models.simba.Simba": Simba, "models.transformer.Transformer": Transformer}
RUN_ONLY_KEYS = ("dtype", "remat", "scan", "chunk_size", "scan_layers")  # how archlab executes, not what it computes


def twin(model_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The PyTorch twin of the archlab model that `model_cfg` (a resolved model config with `_target_`) builds."""
    target = model_cfg["_target_"]
    if target not in TWINS:
        raise ValueError(f"twin: no PyTorch twin of {target} (valid: {', '.join(TWINS)})")
    return TWINS[target](**{k: v for k, v in model_cfg.items() if k != "_target_" and k not in RUN_ONLY_KEYS})


def train_loss(model: torch.nn.Module, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean training loss of `task` ("classify", "next_token", "seq2seq") on a batch, as archlab's train/tasks.py defines it."""
    if task == "classify":
        logits, targets = model(batch["image"]), batch["label"]
        weights = torch.ones(targets.shape, device=targets.device)
    elif task == "next_token":
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]  # (B, T+1) -> (B, T), (B, T)
        logits = model(inputs)
        weights = batch.get("loss_mask", torch.ones(targets.shape, device=targets.device))
    elif task == "seq2seq":
        targets = batch["tgt"][:, 1:]
        logits = model(batch["src"], batch["tgt"][:, :-1])
        weights = (targets != 0).float()  # pad id 0 is never a target
    else:
        raise ValueError(f"train_loss: task {task!r} is not known (valid: classify, next_token, seq2seq)")
    if "mask" in batch:  # rows that pad an evaluation batch
        weights = weights * batch["mask"].reshape(-1, *(1,) * (targets.dim() - 1))
    ce = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum() / weights.sum().clamp(min=1.0)  # archlab: summed loss / max(count, 1)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """An archlab numpy batch as torch tensors: images NHWC -> NCHW, integer ids as int64."""
    out = {}
    for key, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        if key == "image":
            tensor = tensor.permute(0, 3, 1, 2).contiguous()  # (B, H, W, C) -> (B, C, H, W)
        elif np.issubdtype(value.dtype, np.integer):
            tensor = tensor.long()
        out[key] = tensor
    return out
