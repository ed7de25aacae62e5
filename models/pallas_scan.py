"""Mamba's selective scan as Pallas kernels: the hardware-aware scan of Gu & Dao 2023, Section 3.3.2.

Computes what `models.mamba.scan_sequential` (the reference) computes, h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,
y_t = C_t h_t, in one kernel launch per direction. The grid runs over (batch, blocks of `block_d` channels), in
parallel; each program walks the sequence in order, keeping its state h (block_d, N) on chip as a loop carry and
reading dt, x, B, C one time step at a time. The (B, L, D, N) states never reach device memory: the forward writes
only y, the state entering each chunk of `chunk` steps (B, L/chunk, D, N) and the last state. The backward walks
the chunks in reverse; for each it recomputes the chunk's `chunk` states from the saved one into on-chip values
(the chunk loop is unrolled, so every state is a named value rather than an indexed buffer), then runs the adjoint
recurrence dh_t = C_t dy_t + exp(dt_{t+1} A) dh_{t+1} through them. Only the sums over batch (dA) and over channel
blocks (dB, dC) run outside the kernels.

Lowering constraints designed for: every value a kernel loads, stores or computes has a power-of-two size (block_d
and N are padded up to powers of two); the only dynamic index is the time step on a ref's leading axis; no scratch
buffers (the Triton backend has none). On TPU, Mosaic wants the last block axis a multiple of 128 or whole, hence
block_d 128 there. The kernels have run only in interpret mode; lowering them to Triton and Mosaic IR passes on CPU,
but neither compiler has seen them.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from models import cpu_kernels

Array = jax.Array


# ---- Kernels ----


def _decay_and_input(A: Array, dt: Array, x: Array, B: Array) -> tuple[Array, Array]:
    """One step's exp(dt A) and dt B x, both (block_d, N), from dt, x (block_d,) and B (N,)."""
    return jnp.exp(dt[:, None] * A), (dt * x)[:, None] * B[None, :]


def _forward_kernel(dt_ref, x_ref, B_ref, C_ref, A_ref, h0_ref, y_ref, chunk_states_ref, last_state_ref, *,
                    chunk: int):
    """One program's walk through its sequence, saving the state entering each chunk."""
    A = A_ref[...]  # (block_d, N)

    def chunk_body(k, h):
        chunk_states_ref[k] = h

        def step(s, h):
            t = k * chunk + s
            decay, u = _decay_and_input(A, dt_ref[t], x_ref[t], B_ref[t])
            h = decay * h + u
            y_ref[t] = jnp.sum(h * C_ref[t][None, :], axis=1)
            return h

        return jax.lax.fori_loop(0, chunk, step, h)

    last_state_ref[...] = jax.lax.fori_loop(0, chunk_states_ref.shape[0], chunk_body, h0_ref[...])


def _backward_kernel(dt_ref, x_ref, B_ref, C_ref, A_ref, chunk_states_ref, dy_ref, dlast_ref,
                     ddt_ref, dx_ref, dB_ref, dC_ref, dA_ref, dh0_ref, *, chunk: int):
    """One program's reverse walk, chunk by chunk: recompute the chunk's states, then run the adjoint through them."""
    A = A_ref[...]
    num_chunks = chunk_states_ref.shape[0]

    def chunk_body(i, carry):
        dh, dA = carry  # dh: the gradient reaching the chunk's last state from the steps after it
        start = (num_chunks - 1 - i) * chunk
        states = [chunk_states_ref[num_chunks - 1 - i]]  # states[s] = h_{start+s-1}: the chunk, recomputed on chip
        for s in range(chunk):
            t = start + s
            decay, u = _decay_and_input(A, dt_ref[t], x_ref[t], B_ref[t])
            states.append(decay * states[-1] + u)
        for s in reversed(range(chunk)):
            t = start + s
            dt, x, B, dy = dt_ref[t], x_ref[t], B_ref[t], dy_ref[t]
            dh = dh + dy[:, None] * C_ref[t][None, :]  # now dL/dh_t in full
            dC_ref[t] = jnp.sum(dy[:, None] * states[s + 1], axis=0)
            dB_ref[t] = jnp.sum(dh * (dt * x)[:, None], axis=0)
            dh_B = jnp.sum(dh * B[None, :], axis=1)  # (block_d,)
            decay = jnp.exp(dt[:, None] * A)
            d_log_decay = dh * states[s] * decay  # gradient of dt_t A, through exp(dt_t A) h_{t-1}
            ddt_ref[t] = jnp.sum(d_log_decay * A, axis=1) + x * dh_B
            dx_ref[t] = dt * dh_B
            dA = dA + d_log_decay * dt[:, None]
            dh = decay * dh
        return dh, dA

    dh0, dA = jax.lax.fori_loop(0, num_chunks, chunk_body, (dlast_ref[...], jnp.zeros_like(A)))
    dh0_ref[...] = dh0
    dA_ref[...] = dA


# ---- Block specs: programs (b, j) own batch row b and channels j*block_d ... (j+1)*block_d - 1 ----


def _per_channel(length: int, block_d: int) -> pl.BlockSpec:
    """(B, L, D) arrays: the whole sequence of a channel block."""
    return pl.BlockSpec((None, length, block_d), lambda b, j: (b, 0, j))


def _per_row(length: int, n: int) -> pl.BlockSpec:
    """(B, L, N) arrays: the whole sequence of a batch row, shared by its channel blocks."""
    return pl.BlockSpec((None, length, n), lambda b, j: (b, 0, 0))


def _state(block_d: int, n: int) -> pl.BlockSpec:
    """(B, D, N) states."""
    return pl.BlockSpec((None, block_d, n), lambda b, j: (b, j, 0))


def _chunk_states(num_chunks: int, block_d: int, n: int) -> pl.BlockSpec:
    """(B, L/chunk, D, N) states entering each chunk."""
    return pl.BlockSpec((None, num_chunks, block_d, n), lambda b, j: (b, 0, j, 0))


# ---- Forward and backward ----


def _cost(backward: bool, operands: list[Array], out_shape: list) -> pl.CostEstimate:
    """What a call costs, for XLA's and train/flops.py's counts (a kernel's insides are opaque to both): the CPU
    scan kernel's FLOPs on the padded shapes (models/cpu_kernels.kernel_flops), one exp per (batch, step, channel,
    state) entry and direction, and each operand and result read or written once."""
    dt, A = operands[0], operands[4]  # operands: dt, x, B, C, A, ...
    target = "archlab_selective_scan_grad" if backward else "archlab_selective_scan"
    flops = cpu_kernels.kernel_flops(target, [dt.shape, A.shape], [], {})
    moved = sum(a.size * a.dtype.itemsize for a in [*operands, *out_shape])
    return pl.CostEstimate(flops=int(flops), transcendentals=dt.size * A.shape[1], bytes_accessed=int(moved))


def _backend_settings() -> tuple[int, pl.CompilerParams | None]:
    """(default block_d, compiler params) for the default backend.

    GPU: Triton (Mosaic GPU, jax's default there, wants 128-element blocks) with 16 channels per program, so that a
    chunk of states fits in registers. TPU: 128 channels, the lane width Mosaic requires of the last block axis.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        return 16, pltriton.CompilerParams()
    if backend == "tpu":
        return 128, pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    return 16, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _scan(dt, A, B, C, x, h0, chunk, block_d, interpret):
    y, _, last_state = _forward(dt, A, B, C, x, h0, chunk, block_d, interpret)
    return y, last_state


def _forward(dt, A, B, C, x, h0, chunk, block_d, interpret):
    """Padded shapes -> (y (B, L, D), chunk states (B, L/chunk, D, N), last state (B, D, N))."""
    batch, length, d = x.shape
    n = A.shape[1]
    num_chunks = length // chunk
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((batch, num_chunks, d, n), x.dtype),
                 jax.ShapeDtypeStruct(h0.shape, x.dtype)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk),
        grid=(batch, d // block_d),
        in_specs=[_per_channel(length, block_d), _per_channel(length, block_d), _per_row(length, n),
                  _per_row(length, n), pl.BlockSpec((block_d, n), lambda b, j: (j, 0)), _state(block_d, n)],
        out_specs=[_per_channel(length, block_d), _chunk_states(num_chunks, block_d, n), _state(block_d, n)],
        out_shape=out_shape,
        compiler_params=_backend_settings()[1],
        cost_estimate=_cost(False, [dt, x, B, C, A, h0], out_shape),
        interpret=interpret,
        name="selective_scan_forward",
    )(dt, x, B, C, A, h0)


def _scan_fwd(dt, A, B, C, x, h0, chunk, block_d, interpret):
    y, chunk_states, last_state = _forward(dt, A, B, C, x, h0, chunk, block_d, interpret)
    return (y, last_state), (dt, A, B, C, x, chunk_states)


def _scan_bwd(chunk, block_d, interpret, residuals, cotangents):
    dt, A, B, C, x, chunk_states = residuals
    dy, dlast = cotangents
    batch, length, d = x.shape
    n = A.shape[1]
    num_blocks = d // block_d
    partial_over_channels = pl.BlockSpec((None, None, length, n), lambda b, j: (b, j, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((batch, num_blocks, length, n), x.dtype),
                 jax.ShapeDtypeStruct((batch, num_blocks, length, n), x.dtype),
                 jax.ShapeDtypeStruct((batch, d, n), x.dtype), jax.ShapeDtypeStruct((batch, d, n), x.dtype)]
    operands = [dt, x, B, C, A, chunk_states, dy, dlast]
    ddt, dx, dB, dC, dA, dh0 = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk),
        grid=(batch, num_blocks),
        in_specs=[_per_channel(length, block_d), _per_channel(length, block_d), _per_row(length, n),
                  _per_row(length, n), pl.BlockSpec((block_d, n), lambda b, j: (j, 0)),
                  _chunk_states(length // chunk, block_d, n), _per_channel(length, block_d), _state(block_d, n)],
        out_specs=[_per_channel(length, block_d), _per_channel(length, block_d), partial_over_channels,
                   partial_over_channels, _state(block_d, n), _state(block_d, n)],
        out_shape=out_shape,
        compiler_params=_backend_settings()[1],
        cost_estimate=_cost(True, operands, out_shape),
        interpret=interpret,
        name="selective_scan_backward",
    )(*operands)
    return ddt, dA.sum(0), dB.sum(1), dC.sum(1), dx, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def scan_pallas(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array | None = None, *, chunk: int = 32,
                block_d: int | None = None, interpret: bool | None = None) -> tuple[Array, Array]:
    """The selective scan in one Pallas kernel per direction; states stay on chip, saved only every `chunk` steps.

    dt, x (B, L, D); A (D, N); B, C (B, L, N); h0 (B, D, N) or None -> (y (B, L, D), last state (B, D, N)).
    `interpret` None runs the kernels in interpret mode on CPU, where Pallas cannot compile, and compiled elsewhere;
    `block_d` None takes the backend's choice (`_backend_settings`).
    The backward unrolls `chunk` steps and holds `chunk` states of (block_d, N) on chip: keep both small.
    Reverse mode only: a jax.custom_vjp has no forward mode (jax.jvp, jacfwd).
    """
    batch, length, d = x.shape
    n = A.shape[1]
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    block_d = min(block_d or _backend_settings()[0], pl.next_power_of_2(d))
    pad_l, pad_d, pad_n = -length % chunk, -d % block_d, pl.next_power_of_2(n) - n
    h0 = jnp.zeros((batch, d, n), x.dtype) if h0 is None else h0
    # Padded steps and channels have dt = 0, so exp(dt A) = 1 and dt B x = 0: they carry the state unchanged.
    # Padded state entries have A = B = C = h0 = 0, so they stay 0 and never reach y.
    per_channel = [jnp.pad(v, ((0, 0), (0, pad_l), (0, pad_d))) for v in (dt, x)]
    per_row = [jnp.pad(v, ((0, 0), (0, pad_l), (0, pad_n))) for v in (B, C)]
    y, last_state = _scan(per_channel[0], jnp.pad(A, ((0, pad_d), (0, pad_n))), *per_row, per_channel[1],
                          jnp.pad(h0, ((0, 0), (0, pad_d), (0, pad_n))), chunk, block_d, interpret)
    return y[:, :length, :d], last_state[:, :d, :n]
