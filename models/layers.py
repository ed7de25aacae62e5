"""Shared layers: multi-head attention (self, causal, cross), the feed-forward block, activations, and the
CPU helpers that route convolutions, pooling and dense weight gradients to archlab's kernels.

Attention follows Vaswani et al. (2017), eq. 1-2: softmax(Q K^T / sqrt(d_k)) V over `num_heads` heads.
"""

import logging
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from models import cpu_kernels

log = logging.getLogger(__name__)

# "gelu" is the tanh approximation (GPT-2's gelu_new); "gelu_exact" the erf form (BERT, HF and timm ViT).
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "gelu_exact": partial(jax.nn.gelu, approximate=False),
               "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "silu": jax.nn.silu}


def activation_fn(name: str):
    """The activation called `name`, or a one-line error listing the valid names."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not known (valid: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a masked logit: exp underflows to 0, yet rows stay finite
CAUSAL_QUERY_BLOCKS = 4  # causal_blocked_attention: 4 blocks ran fastest at T 128-1024 on the 2-core CPU
CAUSAL_BLOCKED_MIN_LEN = 128  # below, one masked product is as fast (T 64: 1.0x)
FUSED_HEAD_MULTIPLE = 16  # the fused CPU kernel's head size: whole vectors of floats on every ISA it builds for


class KVCache(NamedTuple):
    """Projected keys and values of one attention layer; `index` = how many positions are filled."""

    k: jax.Array  # (B, S, H, Dh)
    v: jax.Array  # (B, S, H, Dh)
    index: jax.Array  # () int32


def attention_kernel(dtype: jnp.dtype, *, masked: bool, seq_len: int, backend: str | None = None,
                     causal: bool = False, head_dim: int | None = None, key_len: int | None = None,
                     key_masked: bool = False, cpu_kernels_on: bool | None = None) -> tuple[str, str]:
    """(kernel, why) for one attention call: the fused kernel of the backend where it can serve, else plain XLA.

    GPU: cuDNN flash attention for bf16/fp16 with a causal mask or none (it takes no fp32, and archlab's
    explicit boolean masks stay on the plain path). TPU: the Pallas flash attention kernel shipped with JAX,
    for sequences in whole 128-blocks and no explicit mask. CPU: archlab's fused kernel (models/cpu_attention.cc)
    for fp32 with no explicit mask or one over keys only (`key_masked`: (B, 1, 1, S), a padding mask; not with
    causal), heads of a multiple of 16 values, causal only for self-attention, and
    `cpu_kernels_on` (default: archlab's CPU kernels serve this process, `cpu_kernels_apply`); else einsum +
    softmax, measured 1.1x faster here than `jax.nn.dot_product_attention`'s XLA path, with causal
    self-attention over 128 positions or more in query blocks that skip the keys after them
    (`causal_blocked_attention`).
    """
    backend = backend or jax.default_backend()
    low_precision = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if backend == "gpu":
        if masked:
            return "xla", "an explicit mask (cuDNN serves causal and unmasked attention here)"
        if not low_precision:
            return "xla", f"{jnp.dtype(dtype).name} (cuDNN flash attention takes bf16/fp16)"
        return "cudnn", "bf16/fp16 on GPU"
    if backend == "tpu":
        if masked:
            return "xla", "an explicit mask (the Pallas kernel serves causal and unmasked attention here)"
        if seq_len % 128:
            return "xla", f"sequence length {seq_len} is not a multiple of the kernel's 128-blocks"
        return "pallas_flash", "TPU"
    if ((not masked or (key_masked and not causal)) and jnp.dtype(dtype) == jnp.float32
            and (head_dim is None or head_dim % FUSED_HEAD_MULTIPLE == 0)
            and not (causal and key_len not in (None, seq_len))
            and (cpu_kernels_apply() if cpu_kernels_on is None else cpu_kernels_on)):
        return "cpu_fused", f"{backend}: fp32, archlab's fused kernel"
    if causal and not masked and seq_len >= CAUSAL_BLOCKED_MIN_LEN and seq_len % CAUSAL_QUERY_BLOCKS == 0:
        return "blocked_causal", f"{backend}: causal, {CAUSAL_QUERY_BLOCKS} query blocks skip the keys after them"
    return "einsum", f"{backend}: einsum + softmax"


_announced: set[tuple[str, str]] = set()


def _announce(kernel: str, why: str) -> None:
    """Log each kernel choice once per process (calls are traced once per compile, so this is once per run)."""
    if (kernel, why) not in _announced:
        _announced.add((kernel, why))
        log.info("attention kernel: %s (%s)", kernel, why)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                          causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v, (B, T, H, Dh) -> (B, T, H, Dh), by the kernel `attention_kernel` picks.

    `mask`: boolean, True = attend, broadcastable to (B, H, T, S). `causal`: position t attends to s <= t (T = S).
    Masked logits take a large negative value (exp underflows to exactly 0, as with -inf, the value jax uses),
    so that a fully masked row, e.g. an all-padding source, stays finite.
    """
    key_masked = mask is not None and mask.ndim == 4 and mask.shape[1:3] == (1, 1)  # (B, 1, 1, S): padding
    kernel, why = attention_kernel(q.dtype, masked=mask is not None, seq_len=q.shape[1], causal=causal,
                                   head_dim=q.shape[-1], key_len=k.shape[1], key_masked=key_masked)
    _announce(kernel, why)
    if kernel == "cpu_fused":
        key_mask = None if mask is None else jnp.broadcast_to(mask[:, 0, 0], (mask.shape[0], k.shape[1])) != 0
        return fused_attention(q, k, v, causal, key_mask)
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    if kernel == "pallas_flash":
        from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

        heads_first = [t.swapaxes(1, 2) for t in (q, k, v)]  # the kernel's (B, H, T, Dh) layout
        y = flash_attention(*heads_first, causal=causal, sm_scale=q.shape[-1] ** -0.5)
        return y.swapaxes(1, 2)
    if kernel == "blocked_causal":
        return causal_blocked_attention(q, k, v)
    if causal:
        causal_mask = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]  # (1, 1, T, S)
        mask = causal_mask if mask is None else mask & causal_mask
    if kernel == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    return einsum_attention(q, k, v, mask)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v written out: two einsums and a softmax in fp32, masked logits -> MASKED."""
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    logits = logits.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, MASKED)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


def causal_blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             blocks: int = CAUSAL_QUERY_BLOCKS) -> jax.Array:
    """Causal self-attention with the queries in `blocks` blocks, each attending only to keys up to its end.

    The logits above the diagonal blocks are never computed: (blocks + 1) / (2 blocks) of the FLOPs and memory
    of the full T x T product (5/8 for 4 blocks). On the 2-core CPU, forward and backward ran 1.2-1.9x faster
    than the masked einsums at T 128-1024 (README, Performance); more, smaller blocks cost more than they save.
    """
    t = q.shape[1]
    if t % blocks or k.shape[1] != t:
        raise ValueError(f"causal_blocked_attention: {t} queries and {k.shape[1]} keys; needs as many keys as "
                         f"queries and a length divisible by blocks={blocks}")
    size = t // blocks
    diagonal = jnp.tril(jnp.ones((size, size), bool))
    out = []
    for i in range(blocks):
        earlier = jnp.ones((size, i * size), bool)  # the keys of earlier blocks: all visible
        mask = jnp.concatenate([earlier, diagonal], axis=1)[None, None]  # (1, 1, size, (i + 1) size)
        end = (i + 1) * size
        out.append(einsum_attention(q[:, i * size:end], k[:, :end], v[:, :end], mask))
    return jnp.concatenate(out, axis=1)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
                    key_mask: jax.Array | None = None) -> jax.Array:
    """Attention by archlab's CPU kernel: a block of queries' logits, softmax and values product in one pass over
    one (batch, head) in cache; the backward recomputes the probabilities from the log-sum-exp (forward and
    backward: GPT d 384 2.0x the blocked einsums, ViT-tiny 2.1x; README, Performance). `key_mask` (B or 1, S),
    True = attend: a padding mask, with `einsum_attention`'s values (a fully masked batch attends uniformly)."""
    return cpu_kernels.attention(q, k, v, causal, key_mask)[0]


def _fused_attention_fwd(q, k, v, causal, key_mask):
    out, lse = cpu_kernels.attention(q, k, v, causal, key_mask)
    return out, (q, k, v, out, lse, key_mask)


def _fused_attention_bwd(causal, residuals, dout):
    q, k, v, out, lse, key_mask = residuals
    grads = cpu_kernels.attention_grad(q, k, v, out, lse, dout, causal, key_mask)
    return *grads, None if key_mask is None else np.zeros(key_mask.shape, jax.dtypes.float0)


fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention: self-attention when `context` is None, cross-attention to `context` otherwise."""

    def __init__(self, d_model: int, num_heads: int, *, dropout: float = 0.0, use_bias: bool = True,
                 dtype: str = "float32", rngs: nnx.Rngs):
        if d_model % num_heads:
            valid = ", ".join(str(h) for h in range(1, d_model + 1) if d_model % h == 0)
            raise ValueError(f"MultiHeadAttention: d_model {d_model} is not divisible by num_heads {num_heads} "
                             f"(valid: {valid})")
        self.num_heads, self.head_dim = num_heads, d_model // num_heads

        def linear(in_axis: str, out_axis: str) -> nnx.Linear:
            return nnx.Linear(d_model, d_model, use_bias=use_bias, dtype=dtype, dot_general=cpu_dot, rngs=rngs,
                              kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (in_axis, out_axis)))

        self.query, self.key, self.value = (linear("embed", "heads") for _ in range(3))
        self.out = linear("heads", "embed")
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)  # (B, T, D) -> (B, T, H, Dh)

    def project_context(self, context: jax.Array) -> KVCache:
        """Keys and values of a fixed context (e.g. the encoder memory), computed once for decoding."""
        return KVCache(self._heads(self.key(context)), self._heads(self.value(context)),
                       jnp.array(context.shape[1], jnp.int32))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty self-attention cache of `max_len` positions."""
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        dtype = self.key.dtype or jnp.float32
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.array(0, jnp.int32))

    def __call__(self, x: jax.Array, context: jax.Array | KVCache | None = None, *, mask: jax.Array | None = None,
                 causal: bool = False, cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
        """(B, T, D) -> (B, T, D); with a self-attention `cache`, also returns the cache advanced by T.

        `context`: (B, S, D) array or a `KVCache` from `project_context`. `mask`: bool, broadcastable to
        (B, H, T, S), True = attend (e.g. (B, 1, 1, S) for key padding). `causal`: position t attends to
        positions <= t; with a cache, positions count from `cache.index` and only filled entries are attended.
        """
        q = self._heads(self.query(x))  # (B, T, H, Dh)
        if isinstance(context, KVCache):
            k, v = context.k, context.v
        else:
            source = x if context is None else context
            k, v = self._heads(self.key(source)), self._heads(self.value(source))  # (B, S, H, Dh)
        if cache is not None:  # positions count from cache.index; only filled entries are attended
            k = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), cache.index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), cache.index, axis=1)
            q_pos = jnp.arange(x.shape[1]) + cache.index
            filled = (q_pos[:, None] >= jnp.arange(k.shape[1])[None, :])[None, None]  # (1, 1, T, S)
            mask, causal = filled if mask is None else mask & filled, False
        y = dot_product_attention(q, k, v, mask, causal=causal)
        y = self.dropout(self.out(y.reshape(*x.shape[:-1], -1)))  # (B, T, H, Dh) -> (B, T, D)
        if cache is None:
            return y
        return y, KVCache(k, v, cache.index + x.shape[1])


class FeedForward(nnx.Module):
    """Position-wise feed-forward block: Linear(d_model -> d_ff), activation, Linear(d_ff -> d_model)."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "gelu", dropout: float = 0.0,
                 dtype: str = "float32", rngs: nnx.Rngs):
        self.act = activation_fn(activation)
        init = nnx.initializers.lecun_normal()
        self.fc1 = nnx.Linear(d_model, d_ff, dtype=dtype, dot_general=cpu_dot, rngs=rngs,
                              kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.fc2 = nnx.Linear(d_ff, d_model, dtype=dtype, dot_general=cpu_dot, rngs=rngs,
                              kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, T, D) -> (B, T, d_ff) -> (B, T, D)."""
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` whose training-mode normalisation over the last axis has a hand-written gradient
    (`batch_norm`): XLA's derivative of nnx's materialises x - mean and two more activation-sized buffers per
    layer; this one reads x and dy once for the statistics and once for the gradient."""

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        if (running or mask is not None or self.axis_name is not None or self.axis not in (-1, x.ndim - 1)
                or self.scale is None or self.bias is None or x.dtype != jnp.float32):
            return super().__call__(x, use_running_average, mask=mask)
        y, mean, var = batch_norm(x, self.scale[...], self.bias[...], self.epsilon)
        self.mean[...] = lax.stop_gradient(self.momentum * self.mean[...] + (1 - self.momentum) * mean)
        self.var[...] = lax.stop_gradient(self.momentum * self.var[...] + (1 - self.momentum) * var)
        return y


def channel_sums(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum(a) and sum(a * b) over all but the last axis: on CPU one pass of archlab's kernel, where XLA reads
    the activations once for each sum, on one thread (ResNet-20's BatchNorm statistics 1.5-2.1x per op)."""
    if cpu_kernels_apply(a, b):
        return cpu_kernels.channel_moments(a, b)
    axes = tuple(range(a.ndim - 1))
    return jnp.sum(a, axes), jnp.sum(a * b, axes)


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    n = x.size // x.shape[-1]
    sum_x, sum_xx = channel_sums(x, x)
    mean = sum_x / n
    return mean, jnp.maximum(sum_xx / n - mean * mean, 0.0)  # nnx's fast variance


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over all but the last axis, and the batch's mean and var."""
    return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_norm_fwd(x, scale, bias, eps):
    mean, var = _batch_stats(x)
    inv = lax.rsqrt(var + eps)
    a = scale * inv
    return (x * a + (bias - mean * a), mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(eps, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy = cotangents[0]  # mean and var feed only the running averages, under stop_gradient
    n = x.size // x.shape[-1]
    sum_dy, sum_dy_x = channel_sums(dy, x)
    dscale = (sum_dy_x - mean * sum_dy) * inv  # sum of dy * xhat
    a = scale * inv
    c1 = -a * inv * dscale / n
    c2 = -a * sum_dy / n - c1 * mean
    return dy * a + x * c1 + c2, dscale, sum_dy


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def patch_embedding(model: str, image_size: int, patch_size: int, in_channels: int, d_model: int, *,
                    dtype: str, rngs: nnx.Rngs) -> nnx.Conv:
    """A P x P convolution with stride P (a linear map of each flattened patch); checks P divides the image."""
    if image_size % patch_size:
        valid = ", ".join(str(p) for p in range(1, image_size + 1) if image_size % p == 0)
        raise ValueError(f"{model}: image size {image_size} is not divisible by patch size {patch_size} "
                         f"(valid: {valid})")
    return nnx.Conv(in_channels, d_model, (patch_size, patch_size), strides=patch_size, padding="VALID",
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def cpu_kernels_apply(*arrays: jax.Array) -> bool:
    """Whether archlab's CPU kernels (models/cpu_kernels.py) compute an op on `arrays`: fp32 on a one-device CPU
    backend, the kernels switched on and built. A step sharded over several devices keeps XLA's ops, which its
    partitioner splits."""
    return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays)
            and jax.device_count() == 1 and cpu_kernels.available())


def max_pool(x: jax.Array, window: int, stride: int | None = None, padding: int = 0) -> jax.Array:
    """Max over window x window patches of (B, H, W, C) at `stride` (default `window`: non-overlapping), with
    `padding` pixels on each side that never win; as `nnx.max_pool` (VALID, or its padding given in pixels).

    Non-overlapping windows, on CPU: archlab's kernel, whose gradient goes to each window's first maximum (as
    PyTorch's and select-and-scatter's): the max below splits it among ties, which XLA runs as a YNNPACK tie count,
    LeNet's largest kernel (1 of its 5.5 thread-ms a step). Else a reshape and a max instead of `reduce_window`,
    whose gradient (select-and-scatter) XLA's CPU backend runs as iotas, a concatenate and a scatter (1.15x).
    Overlapping windows (ResNet's 3x3/2 stem pool), on CPU: `_tap_max_pool`.
    """
    stride = window if stride is None else stride
    if stride != window or padding:
        if jax.default_backend() == "cpu":
            return _tap_max_pool(x, window, stride, padding)
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)
    if x.ndim == 4 and window <= cpu_kernels.MAX_WINDOW and cpu_kernels_apply(x):
        return _kernel_max_pool(x, window)
    b, h, w, c = x.shape
    h, w = h - h % window, w - w % window  # VALID: a partial window at the edge is dropped
    return x[:, :h, :w].reshape(b, h // window, window, w // window, window, c).max(axis=(2, 4))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _tap_max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max pooling as the running maximum of the windows' strided taps, its gradient to each window's first
    maximum (a NaN wins, as in the kernel) through the recorded tap: XLA's `reduce_window` and select-and-scatter
    took ~20 ms of ResNet-18's 114 ms step at 64x64 on CPU."""
    return _tap_max_pool_fwd(x, window, stride, padding)[0]


def _tap_max_pool_fwd(x, window, stride, padding):
    pads = ((padding, padding),) * 2
    taps = _window_taps(x, window, window, (stride, stride), pads, pad_value=-jnp.inf)
    best, where = taps[0], jnp.zeros(taps[0].shape, jnp.uint8)
    for t, v in enumerate(taps[1:], 1):
        take = (v > best) | (jnp.isnan(v) & ~jnp.isnan(best))
        best, where = jnp.where(take, v, best), jnp.where(take, jnp.uint8(t), where)
    return best, (where, x.shape)


def _tap_max_pool_bwd(window, stride, padding, residuals, dy):
    where, shape = residuals
    taps = [jnp.where(where == t, dy, jnp.zeros_like(dy)) for t in range(window * window)]
    return (_add_taps_back(taps, shape, window, window, (stride, stride), ((padding, padding),) * 2),)


_tap_max_pool.defvjp(_tap_max_pool_fwd, _tap_max_pool_bwd)


def activation_max_pool(x: jax.Array, act: Callable[[jax.Array], jax.Array], window: int) -> jax.Array:
    """`max_pool(act(x), window)`. ReLU commutes with the max exactly, values and gradients (a window of negative
    values gives 0 and no gradient either way), so it runs after the pool, on a quarter of the values for a 2x2
    window (LeNet 1.05x [1.02-1.10])."""
    if act is jax.nn.relu:
        return act(max_pool(x, window))
    return max_pool(act(x), window)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _kernel_max_pool(x: jax.Array, window: int) -> jax.Array:
    return cpu_kernels.max_pool(x, window)[0]


def _kernel_max_pool_fwd(x, window):
    y, where = cpu_kernels.max_pool(x, window)
    return y, (where, x.shape)


def _kernel_max_pool_bwd(window, residuals, dy):
    where, shape = residuals
    return (cpu_kernels.max_pool_grad(dy, where, shape, window),)


_kernel_max_pool.defvjp(_kernel_max_pool_fwd, _kernel_max_pool_bwd)


def cpu_dot(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None, preferred_element_type=None,
            out_sharding=None) -> jax.Array:
    """`lax.dot_general` for `nnx.Linear(dot_general=cpu_dot)`: the same x @ W, trained faster on CPU. Where
    `cpu_kernels_apply` (fp32, one device), the weight gradient x^T dy is archlab's kernel, which reads x and dy
    as they lie; XLA hands it to Eigen with both transposed into copies first (GPT d 384 1.23x a step). Outputs of
    a multiple of 16 take the dense kernel (dW in tiles summed in place; 1.03x more) where it pays
    (`_dense_kernel_pays`; else XLA's dot of the 2-D rows), others the 1x1 convolution's weight gradient over
    chunks of rows."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not any(batch) and preferred_element_type is None and out_sharding is None
            and (rhs.shape[1] % cpu_kernels.DENSE_WIDTH == 0
                 or _rows_per_chunk(lhs.size // lhs.shape[-1], rhs.shape[1]))
            and cpu_kernels_apply(lhs, rhs)):
        return _kernel_dot(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, out_sharding=out_sharding)


# The dense weight-gradient kernel's register blocks are 6 rows of dW by 4 vectors where the build has 32 vector
# registers (AVX-512, NEON) and 6 by 2 with AVX2's 16, where they ran at 0.5-0.85x XLA's dot (YNNPACK) for dy of 128
# columns and more at 768 rows and up (GPT 6x384's 384 -> 1536 at 2048 rows: 0.58x), and at 1.3-2.2x it for 64
# columns (Zen 3; README, Performance). On an Intel Xeon (AVX-512) the kernel, which reads dy's rows in place, ran
# 0.76-0.89x XLA's dot (which packs its operands first) for GPT 6x384's dy of 1536 columns, each row a page further,
# 0.76-0.99x for its x of 1536 columns, and led at 128-384 columns with narrower x (1.08-1.6x) and at ResNet-18's
# patch matmuls (1.2-1.7x). So on Intel's CPUs dy wider than DENSE_INTEL_COLUMNS goes to XLA's dot: GPT 6x384's step
# 1.18x, where moving every dW of 128 columns or more gained less (1.09x). AMD's Zen 5 ran 1536 columns 1.09-1.18x
# faster on the kernel.
DENSE_NARROW_COLUMNS = 128
DENSE_INTEL_COLUMNS = 1024


def _dense_kernel_pays(columns: int) -> bool:
    """Whether a dense layer's weight gradient with dy of `columns` columns takes archlab's dense kernel."""
    if columns % cpu_kernels.DENSE_WIDTH:
        return False
    if columns < DENSE_NARROW_COLUMNS:
        return True
    return cpu_kernels.vector_registers() >= 32 and not (cpu_kernels.intel() and columns > DENSE_INTEL_COLUMNS)


# Eigen (XLA's dot for dense weight gradients on AVX2) ran x^T dy 1.06-1.4x faster as (dy^T x)^T where dW is at
# least 4 times taller than wide and x has 768 rows or more (Zen 3: 3968 x 512 -> 128 1.29x, 2048 x 1536 -> 384
# 1.06x, 2048 x 2304 -> 256 1.09x), and 0.68-0.97x with 128-512 rows (README, Performance).
TALL_RATIO, TALL_MIN_ROWS = 4, 768


def _dense_weight_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for 2-D x (M, K) and dy (M, N): archlab's kernel where it pays, else XLA's dot, a tall dW's as the
    transpose of dy^T x (`TALL_RATIO`), behind a barrier that keeps XLA from folding the transpose back."""
    if _dense_kernel_pays(dy.shape[1]):
        return cpu_kernels.dense_weight_grad(x, dy)
    (m, k), n = x.shape, dy.shape[1]
    if k >= TALL_RATIO * n and m >= TALL_MIN_ROWS:
        return lax.optimization_barrier(dy.T @ x).T
    return x.T @ dy


def _rows_per_chunk(rows: int, width: int) -> int | None:
    """The weight-gradient kernel takes x's rows as 'images', each summed into a thread's partial dW: the most rows
    per image (fewer images, less partial-sum traffic) while an image's dy, `width` floats a row, stays within
    512 KB of cache, at most 128; at least two images for the two threads, of 16 rows or more; None where no such
    split exists (lax's gradient then)."""
    for size in range(min(128, 131072 // width, rows // 2), 15, -1):
        if rows % size == 0:
            return size
    return None


@jax.custom_vjp
def _kernel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return x @ w


def _kernel_dot_fwd(x, w):
    return _kernel_dot(x, w), (x, w)


def _kernel_dot_bwd(residuals, dy):
    x, w = residuals
    k, n = w.shape
    if n % cpu_kernels.DENSE_WIDTH == 0:  # XLA's as one 2-D matmul; over (B, T) XLA made transposed copies first
        rows, cols = x.reshape(-1, k), dy.reshape(-1, n)
        return dy @ w.T, _dense_weight_grad(rows, cols)
    r = _rows_per_chunk(x.size // k, n)
    dw = cpu_kernels.conv_weight_grad(x.reshape(-1, r, 1, k), dy.reshape(-1, r, 1, n), (1, 1, k, n), (1, 1),
                                      ((0, 0), (0, 0)))
    return dy @ w.T, dw.reshape(k, n)


_kernel_dot.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


FEW_CHANNELS = 8  # cpu_conv: convolutions of at most this many input channels take its few-channel paths
SHIFTED_CHANNELS = 3  # and of at most this many, the forward as shifted multiply-adds (LeNet's conv2, 6: 0.4x)
NHWC = ("NHWC", "HWIO", "NHWC")


def cpu_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count: int = 1, precision=None, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` for `nnx.Conv(conv_general_dilated=cpu_conv)`: the same convolution, trained
    faster on CPU; other backends, dilations, groups, layouts other than NHWC and ranks other than 2-D go to lax.

    - Where `cpu_kernels_apply` (fp32, one device): archlab's own kernels (models/cpu_kernels.py), forward,
      input and weight gradient each 2-5x XLA's per op (README, Performance); layers with large weights and few
      output pixels as one matmul of their patches instead (`_matmul_conv`). Without them (no C++ compiler,
      `runtime.cpu_kernels=false`, a sharded step), XLA's, helped as follows.
    - Few input channels, stride 1 (LeNet's conv1, a CIFAR stem): XLA's CPU convolutions (Eigen) vectorise over
      channels and waste most of each vector on 1 to 8 of them. A 1- or 3-channel forward runs 3-7x faster as
      kh * kw * C shifted multiply-adds, and LeNet's conv2 input gradient (6 channels) 2x faster as one matmul
      and a col2im, computed into its own buffer (`_materialize`; fused into LeNet's max-pool gradient it ran
      1.2x slower). The weight gradient stays Eigen's (as a matmul of shifted patches it was 2x slower).
    - Any other: lax's convolution, whose backward pass gets its input and output gradient as buffers
      (`_materialize`), not recomputed from their BatchNorm/ReLU producers inside the transposes that feed
      Eigen's weight gradient; ResNet-20 1.15x.
    """
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    if (jax.default_backend() != "cpu" or lhs.ndim != 4 or dilated or feature_group_count != 1
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            != lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
            or any(v is not None for v in kwargs.values())):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
    strides = tuple(window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    padding = tuple(tuple(p) for p in padding)
    if cpu_kernels_apply(lhs, rhs):
        if _matmul_pays(lhs.shape, rhs.shape, strides, padding):
            return _matmul_conv(lhs, rhs, strides, padding)
        return _kernel_conv(lhs, rhs, strides, padding)
    if rhs.shape[2] > FEW_CHANNELS or strides != (1, 1):
        return _materialized_grad_conv(lhs, rhs, strides, padding, precision)
    return _few_channel_conv(jnp.pad(lhs, ((0, 0), *padding, (0, 0))), rhs)


def _materialize(key: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """`xs`, computed into buffers first: XLA does not fuse across a conditional (and drops an
    `optimization_barrier` on CPU). The other branch, taken only if `key`'s first value is NaN, gives NaNs; the
    key is the layer's weight, replicated, so that a batch-sharded step reads it without a collective."""
    first = key.reshape(-1)[0]
    return lax.cond(first == first, lambda *a: a, lambda *a: tuple(jnp.full_like(v, jnp.nan) for v in a), *xs)


def _conv(x: jax.Array, w: jax.Array, strides=(1, 1), padding="VALID", precision=None) -> jax.Array:
    """lax's NHWC convolution (VALID, stride 1 unless told): the one every path of cpu_conv computes with."""
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _materialized_grad_conv(x: jax.Array, w: jax.Array, strides, padding, precision) -> jax.Array:
    return _conv(x, w, strides, padding, precision)


def _materialized_grad_conv_fwd(x, w, strides, padding, precision):
    return _materialized_grad_conv(x, w, strides, padding, precision), (x, w)


def _materialized_grad_conv_bwd(strides, padding, precision, residuals, dy):
    """lax's gradients, from x and dy as buffers: the transposes Eigen's weight gradient needs (batch as its
    minor dimension) are then plain copies, not the producers' BatchNorm and ReLU recomputed in that order."""
    x, w = residuals
    x, dy = _materialize(w, x, dy)  # a NaN weight makes the loss NaN: trainer.nan_policy skips or stops
    return jax.vjp(lambda x, w: _conv(x, w, strides, padding, precision), x, w)[1](dy)


_materialized_grad_conv.defvjp(_materialized_grad_conv_fwd, _materialized_grad_conv_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_conv(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    return cpu_kernels.conv_forward(x, w, strides, padding)


def _kernel_conv_fwd(x, w, strides, padding):
    return _kernel_conv(x, w, strides, padding), (x, w)


def _kernel_conv_bwd(strides, padding, residuals, dy):
    x, w = residuals
    return (cpu_kernels.conv_input_grad(dy, w, x.shape, strides, padding),
            cpu_kernels.conv_weight_grad(x, dy, w.shape, strides, padding))


_kernel_conv.defvjp(_kernel_conv_fwd, _kernel_conv_bwd)


# The direct kernels read a layer's weights once per output row of each image, from memory once they outgrow the
# cores' L2 (1 MiB here): ResNet-18's 3x3 512 -> 512 layers on 2x2 pixels ran at 80-100 GFLOP/s. A matmul of the
# batch's patches (YNNPACK's, blocked for cache) reads them once: 3-4x faster there, 1.5x for 4x4 pixels at 256
# channels and for 1x1 layers of 4 MiB; slower for a 3x3 layer at 7x7 pixels and up (building its patches costs
# more than it saves), and once the patches outgrow the cache (128 images of 4x4 at 256 channels, 19 MB: its
# backward 1.4x slower, in 8 MB chunks as well).
MATMUL_WEIGHT_BYTES = 1 << 20
MATMUL_MAX_PIXELS = 16  # output pixels an image, for layers wider than 1x1
MATMUL_PATCH_BYTES = 12 << 20  # the whole batch's patches
# Weights of 4 MiB and more (3x3 at 512 channels) pay for any number of pixels while the patches stay within 8 MiB:
# ResNet-50's 7x7 stage at 224x224, batch 8, forward and backward 20.0 -> 15.7 ms, its strided first layer 22.8 ->
# 15.1 (at batch 16, 14.5 MB of patches, level; at 256 channels on 14x14 pixels 1.14x slower).
MATMUL_LARGE_WEIGHT_BYTES, MATMUL_LARGE_PATCH_BYTES = 4 << 20, 8 << 20


def _matmul_pays(x_shape, w_shape, strides, padding) -> bool:
    """Whether `_matmul_conv` beats the direct kernels for this layer (measured per op, README Performance)."""
    kh, kw, c, d = w_shape
    n, ho, wo, _ = lax.conv_general_shape_tuple(x_shape, w_shape, strides, padding, NHWC)
    weights, patches = 4 * kh * kw * c * d, 4 * n * ho * wo * kh * kw * c
    if weights >= MATMUL_LARGE_WEIGHT_BYTES and patches <= MATMUL_LARGE_PATCH_BYTES:
        return True
    return (weights >= MATMUL_WEIGHT_BYTES and patches <= MATMUL_PATCH_BYTES
            and (kh * kw == 1 or ho * wo <= MATMUL_MAX_PIXELS))


def _window_taps(x: jax.Array, kh: int, kw: int, strides, padding, pad_value: float = 0.0) -> list[jax.Array]:
    """The kh * kw taps of every output pixel's window, each (N, Ho, Wo, C), in (i, j) order."""
    (pt, pb), (pl, pr) = padding
    xp = lax.pad(x, jnp.array(pad_value, x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
    return [lax.slice(xp, (0, i, j, 0), (n, i + strides[0] * (ho - 1) + 1, j + strides[1] * (wo - 1) + 1, c),
                      (1, *strides, 1)) for i in range(kh) for j in range(kw)]


def _add_taps_back(taps: list[jax.Array], x_shape, kh: int, kw: int, strides, padding) -> jax.Array:
    """The transpose of `_window_taps`: each tap's values added where they were read from (col2im)."""
    (pt, pb), (pl, pr) = padding
    _, ho, wo, _ = taps[0].shape
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    placed = []
    for t, tap in enumerate(taps):
        i, j = divmod(t, kw)
        placed.append(lax.pad(tap, jnp.array(0, tap.dtype),
                              ((0, 0, 0), (i, hp - i - strides[0] * (ho - 1) - 1, strides[0] - 1),
                               (j, wp - j - strides[1] * (wo - 1) - 1, strides[1] - 1), (0, 0, 0))))
    return lax.pad(sum(placed), jnp.array(0, taps[0].dtype), ((0, 0, 0), (-pt, -pb, 0), (-pl, -pr, 0), (0, 0, 0)))


def _matmul_input_grad(dy: jax.Array, w: jax.Array, x_shape, strides, padding) -> jax.Array:
    """dL/dx of a convolution as dy @ W^T, each output pixel's share of its window added back where it was read."""
    kh, kw, c, d = w.shape
    shares = (dy @ w.reshape(kh * kw * c, d).T).reshape(*dy.shape[:3], kh * kw, c)
    return _add_taps_back([shares[:, :, :, t] for t in range(kh * kw)], x_shape, kh, kw, strides, padding)


def _patches(x: jax.Array, kh: int, kw: int, strides, padding) -> jax.Array:
    """(N, H, W, C) -> (N, Ho, Wo, kh * kw * C): each output pixel's window, in the weights' (kh, kw, C) order."""
    taps = _window_taps(x, kh, kw, strides, padding)
    n, ho, wo, c = taps[0].shape
    return jnp.stack(taps, axis=3).reshape(n, ho, wo, kh * kw * c)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_conv(x: jax.Array, w: jax.Array, strides, padding) -> jax.Array:
    """The convolution as patches @ W (im2col): XLA's matmul forward and for the input gradient, archlab's dense
    weight-gradient kernel for W's."""
    kh, kw, c, d = w.shape
    return _patches(x, kh, kw, strides, padding) @ w.reshape(kh * kw * c, d)


def _matmul_conv_fwd(x, w, strides, padding):
    return _matmul_conv(x, w, strides, padding), (x, w)


def _matmul_conv_bwd(strides, padding, residuals, dy):
    x, w = residuals
    kh, kw, c, d = w.shape
    dx = _matmul_input_grad(dy, w, x.shape, strides, padding)
    patches = _patches(x, kh, kw, strides, padding)  # recomputed: cheaper than keeping them
    rows, cols = patches.reshape(-1, kh * kw * c), dy.reshape(-1, d)
    return dx, _dense_weight_grad(rows, cols).reshape(w.shape)


_matmul_conv.defvjp(_matmul_conv_fwd, _matmul_conv_bwd)


def _col2im_input_grad(dy: jax.Array, w: jax.Array) -> jax.Array:
    """Input gradient of a VALID stride-1 convolution as dy @ W^T, each output position's share of its window,
    summed back in place (col2im), into its own buffer: else XLA fuses the kh * kw shifted adds into the consumer
    (LeNet's max-pool gradient, 1.2x slower)."""
    n, ho, wo, _ = dy.shape
    kh, kw, c, _ = w.shape
    dx = _matmul_input_grad(dy, w, (n, ho + kh - 1, wo + kw - 1, c), (1, 1), ((0, 0), (0, 0)))
    return _materialize(w, dx)[0]


@jax.custom_vjp
def _few_channel_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """VALID stride-1 convolution of (B, H, W, C) by (kh, kw, C, D)."""
    kh, kw, c, _ = w.shape
    if c > SHIFTED_CHANNELS:
        return _conv(x, w)
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = jnp.result_type(x, w)
    acc = jnp.promote_types(out, jnp.float32)  # bf16 inputs still add up in fp32, as the convolution would
    xa, wa = x.astype(acc), w.astype(acc)
    return sum(xa[:, i:i + ho, j:j + wo, k:k + 1] * wa[i, j, k]
               for i in range(kh) for j in range(kw) for k in range(c)).astype(out)


def _few_channel_conv_fwd(x: jax.Array, w: jax.Array):
    return _few_channel_conv(x, w), (x, w)


def _few_channel_conv_bwd(residuals, dy: jax.Array):
    x, w = residuals
    dw = jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0]
    return _col2im_input_grad(dy, w).astype(x.dtype), dw


_few_channel_conv.defvjp(_few_channel_conv_fwd, _few_channel_conv_bwd)


# ---- Layer stacks: a Python loop over layers, or one scan over their stacked parameters ----

# Rematerialisation policies for training (`remat`): what each layer keeps for the backward pass.
REMAT_POLICIES = {"full": None,  # keep only the layer's input, recompute everything else
                  "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_remat(model: str, remat: str) -> None:
    if remat != "none" and remat not in REMAT_POLICIES:
        raise ValueError(f"{model}: remat {remat!r} is not known (valid: none, {', '.join(REMAT_POLICIES)})")


def layer_stack(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs, *,
                scan: bool) -> nnx.Module:
    """`num_layers` layers built by `make`: an nnx.List, or with `scan` one module whose every variable has a
    leading layer axis, so that `run_stack` compiles a single layer whatever the depth."""
    if not scan:
        return nnx.List([make(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return build(rngs)


def run_stack(layers: nnx.Module, x: jax.Array, *, scan: bool, remat: str = "none",
              call: Callable[[nnx.Module, jax.Array], jax.Array] = lambda layer, x: layer(x)) -> jax.Array:
    """x through every layer in order, `call(layer, x)` each; under `remat` each layer is recomputed in the
    backward pass. Layers from `layer_stack(scan=True)` run as one `nnx.scan`."""
    if remat != "none":
        call = nnx.remat(call, policy=REMAT_POLICIES[remat])
    if scan:
        return nnx.scan(lambda x, layer: call(layer, x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, layers)
    for layer in layers:
        x = call(layer, x)
    return x


def num_stacked(layers: nnx.Module) -> int:
    """How many layers a stack holds, in either layout."""
    if isinstance(layers, nnx.List):
        return len(layers)
    return jax.tree.leaves(nnx.state(layers, nnx.Param))[0].shape[0]
