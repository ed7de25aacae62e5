"""The Pallas selective scan (interpret mode on CPU) computes what the reference scan computes, gradients included."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.mamba import MambaLM, scan_sequential
from models.pallas_scan import scan_pallas

# L = 37 is not a multiple of the chunk (8, so five chunks) and D = 24 not of block_d (16, so two channel blocks):
# both paddings are exercised. N = 3 is not a power of two, so the state axis is padded too.
SHAPES = dict(batch=2, length=37, d=24)
pallas_scan = functools.partial(scan_pallas, chunk=8, block_d=16)


def scan_inputs(n, with_h0, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    batch, length, d = SHAPES.values()
    dt = jax.nn.softplus(jax.random.normal(k[0], (batch, length, d)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[1], (d, n)))
    B, C = (jax.random.normal(kk, (batch, length, n)) for kk in k[2:4])
    x = jax.random.normal(k[4], (batch, length, d))
    h0 = jax.random.normal(k[5], (batch, d, n)) if with_h0 else None
    return dt, A, B, C, x, h0


CASES = pytest.mark.parametrize("n, with_h0", [(4, False), (3, True)], ids=["no_h0", "h0_odd_state_size"])


@CASES
def test_outputs_and_last_state_equal_the_sequential_scan(n, with_h0):
    inputs = scan_inputs(n, with_h0)
    for got, want in zip(jax.jit(pallas_scan)(*inputs), jax.jit(scan_sequential)(*inputs)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@CASES
def test_gradients_equal_the_sequential_scans(n, with_h0):
    inputs = scan_inputs(n, with_h0)
    y, h = scan_sequential(*inputs)
    w_y, w_h = jax.random.normal(jax.random.key(7), y.shape), jax.random.normal(jax.random.key(8), h.shape)

    def grads(scan):
        def loss(*a):  # a linear functional that weighs every output and every last-state entry differently
            y, h = scan(*a)
            return jnp.sum(w_y * y) + jnp.sum(w_h * h)
        argnums = (0, 1, 2, 3, 4, 5) if with_h0 else (0, 1, 2, 3, 4)
        return jax.jit(jax.grad(loss, argnums=argnums))(*inputs)

    for name, got, want in zip(["dt", "A", "B", "C", "x", "h0"], grads(pallas_scan), grads(scan_sequential)):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=1e-5, err_msg=f"d{name}")


def test_mamba_lm_with_pallas_scan_equals_sequential():
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 21)

    def logits(scan):
        model = MambaLM(vocab_size=21, d_model=16, num_layers=2, d_state=4, scan=scan, rngs=nnx.Rngs(0))
        return nnx.jit(lambda m, t: m(t))(model, tokens)

    np.testing.assert_allclose(logits("pallas"), logits("sequential"), rtol=1e-5, atol=1e-5)


def test_forward_and_backward_never_hold_every_state():
    batch, length, d, n = 1, 4096, 64, 16
    shapes = [(batch, length, d), (d, n), (batch, length, n), (batch, length, n), (batch, length, d), (batch, d, n)]

    def loss(*a):
        y, h = pallas_scan(*a)
        return jnp.sum(y) + jnp.sum(h)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))).lower(
        *[jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]).compile()
    every_state = batch * length * d * n * 4  # bytes of (B, L, D, N) float32: what the associative scan materialises
    assert compiled.memory_analysis().temp_size_in_bytes < every_state


def test_flops_count_each_kernel_call_by_its_cost_estimate():
    """train/flops.py sees a Pallas call as the CPU scan kernel's count: forward 6 and backward 18 FLOPs per
    (batch, step, channel, state) entry. It never walks the kernel's own jaxpr, whose operands are refs."""
    from train.flops import loop_flops

    inputs = scan_inputs(4, False)
    step = jax.grad(lambda *a: jnp.sum(pallas_scan(*a)[0]), argnums=(0, 1, 2, 3, 4))
    batch, length, d = SHAPES.values()
    padded = batch * (length + -length % 8) * (d + -d % 16) * 4  # L to chunks of 8, D to blocks of 16
    assert loop_flops(jax.make_jaxpr(step)(*inputs).jaxpr, {}) == (6 + 18) * padded
