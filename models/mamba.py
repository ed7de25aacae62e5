"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

The selective scan (paper Algorithm 2, eq. 2a-2b with the ZOH discretisation of A and dt*B for B):

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,      y_t = C_t h_t

has four interchangeable implementations with one signature `scan(dt, A, B, C, x, h0)`:
`associative` (jax.lax.associative_scan, parallel over the sequence: the one for GPU/TPU),
`sequential` (lax.scan, one `ssm_step` per token, its backward pass written by hand in models/sequential_scan.py:
the fastest on CPU),
`chunked` (lax.scan over chunks, associative inside each, rematerialised per chunk: bounded memory),
`pallas` (models/pallas_scan.py: one kernel per direction, states kept on chip, parallel over batch and channels).
`MambaBlock` is the mixer of the reference `mamba_simple.py`; `MambaLM` its language model
(`mixer_seq_simple.py`: RMSNorm pre-norm residual stack, final norm, tied embeddings).
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import check_remat, cpu_dot, layer_stack, num_stacked, run_stack
from models.pallas_scan import scan_pallas
from models.sequential_scan import scan_sequential

Array = jax.Array
# Per layer (conv state (B, K-1, D), ssm state (B, D, N)); with scan_layers one such pair stacked: (L, B, ...).
Cache = list[tuple[Array, Array]] | tuple[Array, Array]


# ---- Selective scan ----


def _discretize(dt: Array, A: Array, B: Array, x: Array) -> tuple[Array, Array]:
    """ZOH for A (exp(dt A)) and Euler for B (dt B x), as the reference selective_scan does."""
    dA = jnp.exp(jnp.einsum("bld,dn->bldn", dt, A))  # (B, L, D, N)
    dBx = jnp.einsum("bld,bln,bld->bldn", dt, B, x)  # (B, L, D, N)
    return dA, dBx


def ssm_step(h: Array, dt: Array, A: Array, B: Array, C: Array, x: Array) -> tuple[Array, Array]:
    """One recurrence step: h (B, D, N), dt/x (B, D), B/C (B, N) -> (new h, y (B, D))."""
    h = jnp.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None, :]
    return h, jnp.einsum("bdn,bn->bd", h, C)


def _initial_state(x: Array, A: Array, h0: Array | None) -> Array:
    return jnp.zeros((x.shape[0], *A.shape), x.dtype) if h0 is None else h0


def _combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Compose two affine maps h -> a h + b (left first): the associative operator of the linear recurrence."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def scan_associative(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array | None = None) -> tuple[Array, Array]:
    """Parallel scan (Blelloch) over the sequence in O(log L) depth; materialises all states (B, L, D, N)."""
    dA, dBx = _discretize(dt, A, B, x)
    if h0 is not None:
        dBx = dBx.at[:, 0].add(dA[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (dA, dBx), axis=1)  # (B, L, D, N)
    return jnp.einsum("bldn,bln->bld", h, C), h[:, -1]


def scan_chunked(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array | None = None,
                 chunk: int = 256) -> tuple[Array, Array]:
    """Sequential over chunks, associative inside; each chunk is recomputed in the backward pass.

    Only the state between chunks (B, D, N) per chunk is kept for the backward pass, not every (B, L, D, N) state.
    """
    b, length, d = x.shape
    pad = -length % chunk
    # dt = 0 past the end makes exp(dt A) = 1 and dt B x = 0: the padded steps carry the state unchanged.
    padded = [jnp.pad(v, ((0, 0), (0, pad), (0, 0))) for v in (dt, B, C, x)]
    chunks = [v.reshape(b, -1, chunk, v.shape[-1]).swapaxes(0, 1) for v in padded]  # (L/c, B, c, .)

    @jax.checkpoint
    def body(h, inputs):
        dt_c, B_c, C_c, x_c = inputs
        y_c, h = scan_associative(dt_c, A, B_c, C_c, x_c, h)
        return h, y_c

    h, y = jax.lax.scan(body, _initial_state(x, A, h0), chunks)
    y = y.swapaxes(0, 1).reshape(b, -1, d)[:, :length]  # (L/c, B, c, D) -> (B, L, D)
    return y, h


SCANS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "associative": scan_associative,
    "sequential": scan_sequential,
    "chunked": scan_chunked,
    "pallas": scan_pallas,
}


def selective_scan(dt: Array, A: Array, B: Array, C: Array, x: Array, *, method: str = "associative", chunk: int = 256,
                   h0: Array | None = None) -> tuple[Array, Array]:
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t by the named implementation -> (y, last state)."""
    if method == "chunked":
        return scan_chunked(dt, A, B, C, x, h0, chunk=chunk)
    return SCANS[method](dt, A, B, C, x, h0)


def default_scan() -> str:
    """Associative on accelerators; sequential on CPU, where it measured 2-4x faster with a third of the memory."""
    # The accelerator default stays associative until the pallas kernel is measured on a device.
    return "sequential" if jax.default_backend() == "cpu" else "associative"


# ---- Mamba block ----


def _torch_linear_init(scale: float = 1.0) -> nnx.Initializer:
    """PyTorch's nn.Linear/Conv1d default, uniform +-1/sqrt(fan_in), times `scale` (the reference keeps it)."""
    return nnx.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def _uniform(bound: float) -> nnx.Initializer:
    """Uniform in [-bound, bound]."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dt_bias_init(key: Array, d_inner: int, dt_min: float, dt_max: float, floor: float) -> Array:
    """Bias whose softplus is dt ~ log-uniform in [dt_min, dt_max] (floored), the reference's dt init."""
    u = jax.random.uniform(key, (d_inner,))
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


class MambaBlock(nnx.Module):
    """The Mamba mixer (reference `Mamba`, mamba_simple.py; paper Fig. 3): in_proj, conv, S6 scan, gate, out_proj.

    `scan` None picks `default_scan()` for the backend; `out_scale` scales out_proj's init (the LM passes
    1/sqrt(num_layers)).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        selective: bool = True,
        scan: str | None = None,
        chunk_size: int = 256,
        out_scale: float = 1.0,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        scan = scan or default_scan()
        if scan not in SCANS:
            raise ValueError(f"MambaBlock: unknown scan {scan!r} (valid: {', '.join(SCANS)})")
        if chunk_size < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(
                f"MambaBlock: chunk_size {chunk_size}, d_state {d_state}, d_conv {d_conv}, expand {expand} "
                f"must all be >= 1")
        self.d_inner = expand * d_model
        self.d_state, self.d_conv = d_state, d_conv
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.selective, self.scan, self.chunk_size = selective, scan, chunk_size
        self.dtype = jnp.dtype(dtype)
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                                   dot_general=cpu_dot, rngs=rngs)

        self.in_proj = linear(d_model, 2 * self.d_inner,
                              kernel_init=nnx.with_partitioning(_torch_linear_init(), ("embed", "mlp")))
        conv_init = _uniform(d_conv**-0.5)  # torch Conv1d default; depthwise, so fan_in = d_conv
        self.conv_kernel = nnx.Param(conv_init(rngs.params(), (d_conv, self.d_inner)), out_sharding=(None, "mlp"))
        self.conv_bias = nnx.Param(conv_init(rngs.params(), (self.d_inner,)), out_sharding=("mlp",))
        dt_bias = _dt_bias_init(rngs.params(), self.d_inner, dt_min, dt_max, dt_init_floor)
        if selective:
            self.x_proj = linear(self.d_inner, self.dt_rank + 2 * d_state,
                                 kernel_init=nnx.with_partitioning(_torch_linear_init(), ("mlp", None)))
            self.dt_proj = nnx.Linear(
                self.dt_rank,
                self.d_inner,
                kernel_init=nnx.with_partitioning(_uniform(self.dt_rank**-0.5), (None, "mlp")),
                bias_init=nnx.with_partitioning(lambda *_: dt_bias, ("mlp",)),
                dtype=self.dtype,
                param_dtype=jnp.float32,
                dot_general=cpu_dot,
                rngs=rngs,
            )
        else:
            # The LTI ablation (paper Table 1, "S4"): dt, B and C are learned but do not depend on the input.
            self.dt_bias = nnx.Param(dt_bias, out_sharding=("mlp",))
            self.B = nnx.Param(jnp.ones((d_state,)))
            self.C = nnx.Param(jax.random.normal(rngs.params(), (d_state,)) * d_state**-0.5)
        # S4D-real: A = -(1, 2, ..., N) in every channel, stored as its log so that A stays negative.
        A = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (self.d_inner, d_state))
        # A_log and D keep these names: train/optim.py's decay_mask exempts them, as the reference does.
        self.A_log = nnx.Param(jnp.log(A), out_sharding=("mlp", None))
        self.D = nnx.Param(jnp.ones((self.d_inner,)), out_sharding=("mlp",))
        self.out_proj = linear(self.d_inner, d_model,
                               kernel_init=nnx.with_partitioning(_torch_linear_init(out_scale), ("mlp", "embed")))

    def _ssm_inputs(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """x (..., D) after the conv -> float32 dt (..., D), A (D, N), B, C (..., N)."""
        A = -jnp.exp(self.A_log[...])
        if self.selective:
            dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
            dt = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))
        else:
            shape = x.shape[:-1]
            dt = jnp.broadcast_to(jax.nn.softplus(self.dt_bias[...]), (*shape, self.d_inner))
            B = jnp.broadcast_to(self.B[...], (*shape, self.d_state))
            C = jnp.broadcast_to(self.C[...], (*shape, self.d_state))
        return dt, A, B.astype(jnp.float32), C.astype(jnp.float32)

    def _output(self, x: jax.Array, y: jax.Array, z: jax.Array) -> jax.Array:
        """Skip D x, gate by SiLU(z), project back to d_model."""
        y = y + x.astype(jnp.float32) * self.D[...]
        return self.out_proj((y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype))

    def __call__(self, u: jax.Array, return_state: bool = False):
        """Parallel mode: u (B, L, d_model) -> (B, L, d_model) [, the recurrent state after the last token]."""
        length = u.shape[1]
        x, z = jnp.split(self.in_proj(u), 2, axis=-1)  # (B, L, D) each
        xp = jnp.pad(x, ((0, 0), (self.d_conv - 1, 0), (0, 0)))  # causal: only past inputs reach t
        kernel = self.conv_kernel[...].astype(self.dtype)
        xc = sum(xp[:, k : k + length] * kernel[k] for k in range(self.d_conv)) + self.conv_bias[...].astype(self.dtype)
        xc = jax.nn.silu(xc)
        dt, A, B, C = self._ssm_inputs(xc)
        y, h = selective_scan(dt, A, B, C, xc.astype(jnp.float32), method=self.scan, chunk=self.chunk_size)
        out = self._output(xc, y, z)
        if return_state:
            return out, (xp[:, length:], h)  # last K-1 conv inputs, last SSM state
        return out

    def init_state(self, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """Zero recurrent state: (conv state (B, K-1, D), ssm state (B, D, N)), what an empty prefix leaves."""
        return (
            jnp.zeros((batch_size, self.d_conv - 1, self.d_inner), self.dtype),
            jnp.zeros((batch_size, self.d_inner, self.d_state), jnp.float32),
        )

    def step(self, u: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Recurrent mode, one token: u (B, d_model), state -> (B, d_model), new state; same outputs as __call__."""
        conv_state, h = state
        x, z = jnp.split(self.in_proj(u), 2, axis=-1)  # (B, D) each
        window = jnp.concatenate([conv_state, x[:, None]], axis=1)  # (B, K, D)
        kernel, bias = self.conv_kernel[...].astype(self.dtype), self.conv_bias[...].astype(self.dtype)
        xc = jnp.einsum("bkd,kd->bd", window, kernel) + bias
        xc = jax.nn.silu(xc)
        dt, A, B, C = self._ssm_inputs(xc)
        h, y = ssm_step(h, dt, A, B, C, xc.astype(jnp.float32))
        return self._output(xc, y, z), (window[:, 1:], h)


# ---- Language model ----


class ResidualBlock(nnx.Module):
    """x + Mixer(RMSNorm(x)): the reference `Block` (its fused add-then-norm order computes the same function)."""

    def __init__(self, d_model: int, *, dtype: str = "float32", rngs: nnx.Rngs, **mixer_kwargs):
        self.norm = nnx.RMSNorm(d_model, epsilon=1e-5, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=rngs)
        self.mixer = MambaBlock(d_model, dtype=dtype, rngs=rngs, **mixer_kwargs)

    def __call__(self, x: jax.Array, return_state: bool = False):
        """(B, L, d_model) -> (B, L, d_model) [, recurrent state]."""
        if return_state:
            y, state = self.mixer(self.norm(x), return_state=True)
            return x + y, state
        return x + self.mixer(self.norm(x))

    def step(self, x: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One token (B, d_model) through the block in recurrent mode."""
        y, state = self.mixer.step(self.norm(x), state)
        return x + y, state


class MambaLM(nnx.Module):
    """Mamba language model (reference MambaLMHeadModel): embedding, residual Mamba blocks, final RMSNorm, tied head.

    `scan_layers` stacks the blocks' parameters along a layer axis and runs them as one scan: one block is
    compiled whatever the depth. `remat` recomputes each block in the backward pass (models.layers.REMAT_POLICIES).
    """

    tasks = ("next_token",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        selective: bool = True,
        scan: str | None = None,
        chunk_size: int = 256,
        pad_vocab_multiple: int = 8,
        remat: str = "none",
        scan_layers: bool = False,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        check_remat("MambaLM", remat)
        if vocab_size < 1 or d_model < 1 or num_layers < 1:
            raise ValueError(f"MambaLM: vocab_size {vocab_size}, d_model {d_model}, num_layers {num_layers} "
                             f"must all be >= 1")
        self.vocab_size, self.remat, self.scan_layers = vocab_size, remat, scan_layers
        padded_vocab = -(-vocab_size // pad_vocab_multiple) * pad_vocab_multiple  # the reference pads for fast matmuls
        self.embed = nnx.Embed(
            padded_vocab,
            d_model,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            dtype=jnp.dtype(dtype),
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        self.layers = layer_stack(
            lambda r: ResidualBlock(
                d_model,
                d_state=d_state,
                d_conv=d_conv,
                expand=expand,
                dt_rank=dt_rank,
                selective=selective,
                scan=scan,
                chunk_size=chunk_size,
                out_scale=num_layers**-0.5,  # GPT-2 style residual rescale, as the reference's _init_weights
                dtype=dtype,
                rngs=r,
            ),
            num_layers,
            rngs,
            scan=scan_layers,
        )
        self.norm_f = nnx.RMSNorm(d_model, epsilon=1e-5, dtype=jnp.dtype(dtype), param_dtype=jnp.float32, rngs=rngs)

    def _logits(self, h: jax.Array) -> jax.Array:
        return self.embed.attend(self.norm_f(h))[..., : self.vocab_size]  # padded rows never score

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 (B, T) -> logits (B, T, vocab_size)."""
        h = self.embed(tokens)  # (B, T, d_model)
        return self._logits(run_stack(self.layers, h, scan=self.scan_layers, remat=self.remat))

    def _scan_stacked(self, body: Callable, h: Array, xs: tuple[Array, Array] | None = None) -> tuple[Array, Cache]:
        """`body(layer, h, x) -> (h, state)` over the stacked layers as a plain lax.scan over their split state:
        nnx.scan fails inside an outer lax.scan trace, such as generate's."""
        graphdef, params = nnx.split(self.layers)
        return jax.lax.scan(lambda h, px: body(nnx.merge(graphdef, px[0]), h, px[1]), h, (params, xs))

    def init_cache(self, batch_size: int) -> Cache:
        """Zero recurrent state of every layer (its size does not grow with the sequence), stacked with scan_layers."""
        if self.scan_layers:
            state = self.layers.mixer.init_state(batch_size)
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_stacked(self.layers), *a.shape)), state)
        return [layer.mixer.init_state(batch_size) for layer in self.layers]

    def prefill(self, tokens: jax.Array) -> tuple[jax.Array, Cache]:
        """Parallel pass over a prompt (B, T) -> (logits of its last token (B, V), the cache after it)."""
        h = self.embed(tokens)
        if self.scan_layers:
            h, cache = self._scan_stacked(lambda layer, h, _: layer(h, return_state=True), h)
        else:
            cache = []
            for layer in self.layers:
                h, state = layer(h, return_state=True)
                cache.append(state)
        return self._logits(h[:, -1]), cache

    def step(self, token: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Recurrent mode: one token int32 (B,) and the cache -> (logits (B, V), new cache)."""
        h = self.embed(token)  # (B, d_model)
        if self.scan_layers:
            h, new_cache = self._scan_stacked(lambda layer, h, state: layer.step(h, state), h, cache)
        else:
            new_cache = []
            for layer, state in zip(self.layers, cache):
                h, state = layer.step(h, state)
                new_cache.append(state)
        return self._logits(h), new_cache


def generate(model: MambaLM, prompt: jax.Array, num_tokens: int, key: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Sample `num_tokens` after `prompt` (B, T) in recurrent mode (constant memory per token) -> (B, num_tokens).

    temperature 0 is greedy decoding. Jit with the sizes static: `nnx.jit(generate, static_argnums=(2, 4))`.
    """
    logits, cache = model.prefill(prompt)

    def sample(logits, key):
        if temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits.astype(jnp.float32) / temperature).astype(jnp.int32)

    def body(carry, key):
        logits, cache = carry
        token = sample(logits, key)
        return model.step(token, cache), token

    _, tokens = jax.lax.scan(body, (logits, cache), jax.random.split(key, num_tokens))
    return tokens.swapaxes(0, 1)
