"""The sequential selective scan, one token per step, with its backward pass written by hand.

    h_t = a_t h_{t-1} + b_t,   a_t = exp(dt_t A),   b_t = dt_t x_t B_t,   y_t = C_t h_t

Autodiff of a `lax.scan` stores several (B, D, N) residuals per step (exp(dt A), both states, broadcasts) and
runs about twice as many kernels per step backwards as forwards. Here the forward pass stores only the state
entering each step, and the backward pass is one reverse recurrence for the state's adjoint g_t:

    g_t = a_{t+1} g_{t+1} + C_t dy_t        (dy_t: the gradient of y_t)
    dC_t = sum_d h_t dy_t    dB_t = sum_d g_t dt_t x_t    dx_t = dt_t sum_n g_t B_t
    ddt_t = sum_n g_t h_{t-1} a_t A + x_t sum_n g_t B_t    dA = sum_{b,t} g_t h_{t-1} a_t dt_t

with a_t and h_t recomputed from the stored h_{t-1}. On a 2-core CPU this made the Mamba LM's training step
1.1-1.25x faster than autodiff of the same scan (README, Performance). Where archlab's CPU kernels apply (fp32, one
CPU device), the same two recurrences run as one C++ kernel each (models/cpu_scan.cc), the state in registers.
"""

import jax
import jax.numpy as jnp

from models import cpu_kernels
from models.layers import cpu_kernels_apply

Array = jax.Array


def _decay(dt_t: Array, A: Array) -> Array:
    return jnp.exp(dt_t[..., None] * A)  # a_t, (B, D, N)


def _input(dt_t: Array, B_t: Array, x_t: Array) -> Array:
    return (dt_t * x_t)[..., None] * B_t[:, None, :]  # b_t, (B, D, N)


def _forward(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array) -> tuple[Array, Array, Array]:
    """Time-major inputs (L, B, ...) -> y (L, B, D), the states entering each step (L, B, D, N), the last state."""

    def step(h, inputs):
        dt_t, B_t, C_t, x_t = inputs
        h_next = _decay(dt_t, A) * h + _input(dt_t, B_t, x_t)
        return h_next, (jnp.sum(h_next * C_t[:, None, :], axis=-1), h)

    h_last, (y, h_before) = jax.lax.scan(step, h0, (dt, B, C, x))
    return y, h_before, h_last


@jax.custom_vjp
def _scan(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array) -> tuple[Array, Array]:
    y, _, h_last = _forward(dt, A, B, C, x, h0)
    return y, h_last


def _scan_fwd(dt, A, B, C, x, h0):
    y, h_before, h_last = _forward(dt, A, B, C, x, h0)
    return (y, h_last), (dt, A, B, C, x, h_before)


def _scan_bwd(residuals, cotangents):
    dt, A, B, C, x, h_before = residuals
    dy, dh_last = cotangents

    def step(carry, inputs):
        g, dA = carry  # g: the adjoint of h_t arriving from step t + 1
        dt_t, B_t, C_t, x_t, dy_t, h_prev = inputs
        a = _decay(dt_t, A)
        h = a * h_prev + _input(dt_t, B_t, x_t)
        g = g + dy_t[..., None] * C_t[:, None, :]
        g_da = g * h_prev * a  # the gradient of dt_t A, elementwise
        g_b = jnp.sum(g * B_t[:, None, :], axis=-1)  # (B, D)
        grads = (jnp.sum(g_da * A, axis=-1) + x_t * g_b,  # ddt_t
                 jnp.sum(g * (dt_t * x_t)[..., None], axis=1),  # dB_t
                 jnp.sum(h * dy_t[..., None], axis=1),  # dC_t
                 dt_t * g_b)  # dx_t
        return (g * a, dA + jnp.sum(g_da * dt_t[..., None], axis=0)), grads

    (dh0, dA), (ddt, dB, dC, dx) = jax.lax.scan(step, (dh_last, jnp.zeros_like(A)), (dt, B, C, x, dy, h_before),
                                                reverse=True)
    return ddt, dA, dB, dC, dx, dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


@jax.custom_vjp
def _kernel_scan(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array) -> tuple[Array, Array]:
    y, h_last, _ = cpu_kernels.selective_scan(dt, A, B, C, x, h0)
    return y, h_last


def _kernel_scan_fwd(dt, A, B, C, x, h0):
    y, h_last, chunk_states = cpu_kernels.selective_scan(dt, A, B, C, x, h0)
    return (y, h_last), (dt, A, B, C, x, chunk_states)


def _kernel_scan_bwd(residuals, cotangents):
    return cpu_kernels.selective_scan_grad(*residuals, *cotangents)


_kernel_scan.defvjp(_kernel_scan_fwd, _kernel_scan_bwd)


def scan_sequential(dt: Array, A: Array, B: Array, C: Array, x: Array, h0: Array | None = None) -> tuple[Array, Array]:
    """One step per token; the fastest scan on CPU.

    dt, x (B, L, D); A (D, N); B, C (B, L, N); h0 (B, D, N) or None -> (y (B, L, D), last state (B, D, N)).
    """
    dtype = jnp.result_type(dt, A, B, C, x)  # float32 under bfloat16 compute: Mamba passes x in float32
    dt, A, B, C, x = (v.astype(dtype) for v in (dt, A, B, C, x))
    h0 = jnp.zeros((x.shape[0], *A.shape), dtype) if h0 is None else h0.astype(dtype)
    if A.shape[1] <= cpu_kernels.SCAN_MAX_STATES and cpu_kernels_apply(dt, A, B, C, x, h0):
        return _kernel_scan(dt, A, B, C, x, h0)
    time_major = [jnp.swapaxes(v, 0, 1) for v in (dt, B, C, x)]  # (L, B, ...)
    y, h = _scan(time_major[0], A, *time_major[1:], h0)
    return jnp.swapaxes(y, 0, 1), h
