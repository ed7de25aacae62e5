"""Multi-head attention (self, causal, cross, cached), its kernel choice, and the feed-forward block; the CPU
helpers' kernels (convolutions, pooling, dense weight gradients, attention)."""

import logging
import os
import platform
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import cpu_kernels, layers
from models.layers import FeedForward, MultiHeadAttention, attention_kernel, dot_product_attention
from tests.conftest import ROOT

D, H, T = 16, 4, 6


@pytest.fixture(scope="module")
def attn() -> MultiHeadAttention:
    return MultiHeadAttention(D, H, rngs=nnx.Rngs(0))


def inputs(seed: int, length: int = T) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (2, length, D))


def test_causal_attention_ignores_the_future(attn):
    x = inputs(0)
    for t in range(T - 1):
        changed = x.at[:, t + 1:].set(inputs(1)[:, t + 1:])
        np.testing.assert_allclose(attn(changed, causal=True)[:, :t + 1], attn(x, causal=True)[:, :t + 1], atol=1e-6)
    assert not np.allclose(attn(x, causal=True), attn(x))  # without the mask the future does leak in


def test_cached_attention_equals_full_causal_attention(attn):
    x = inputs(0)
    cache = attn.init_cache(2, T + 2)
    first, cache = attn(x[:, :2], cache=cache)  # a two-token prefill, then one token at a time
    outputs = [first]
    for t in range(2, T):
        out, cache = attn(x[:, t:t + 1], cache=cache)
        outputs.append(out)
    assert int(cache.index) == T
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), attn(x, causal=True), atol=1e-5)


def test_cross_attention_with_projected_context_equals_raw_context(attn):
    x, context = inputs(0), inputs(2, length=9)
    out = attn(x, context)
    assert out.shape == x.shape
    np.testing.assert_allclose(attn(x, attn.project_context(context)), out, atol=1e-6)


def test_masked_keys_have_no_influence(attn):
    x, context = inputs(0), inputs(2, length=9)
    mask = jnp.arange(9)[None, None, None, :] < 5  # (1, 1, 1, S): keys 5.. are padding
    changed = context.at[:, 5:].set(100.0)
    np.testing.assert_allclose(attn(x, changed, mask=mask), attn(x, context, mask=mask), atol=1e-6)


def test_einsum_attention_matches_jax_dot_product_attention():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, H, 8)) for i in range(3))
    mask = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask),
                               jax.nn.dot_product_attention(q, k, v, mask=mask), atol=1e-5)


@pytest.mark.parametrize("backend, dtype, masked, seq_len, kernel", [
    ("cpu", jnp.bfloat16, False, 128, "einsum"),
    ("gpu", jnp.bfloat16, False, 100, "cudnn"),
    ("gpu", jnp.float16, False, 64, "cudnn"),
    ("gpu", jnp.float32, False, 64, "xla"),     # cuDNN flash attention takes no fp32
    ("gpu", jnp.bfloat16, True, 64, "xla"),     # explicit (padding) masks stay on the plain path
    ("tpu", jnp.float32, False, 256, "pallas_flash"),
    ("tpu", jnp.bfloat16, False, 100, "xla"),   # not whole 128-blocks
    ("tpu", jnp.bfloat16, True, 128, "xla"),
])
def test_attention_kernel_choice(backend, dtype, masked, seq_len, kernel):
    assert attention_kernel(dtype, masked=masked, seq_len=seq_len, backend=backend)[0] == kernel


@pytest.mark.parametrize("masked, seq_len, kernel", [
    (False, 128, "blocked_causal"),
    (False, 1024, "blocked_causal"),
    (False, 64, "einsum"),    # short: one masked product is as fast
    (False, 130, "einsum"),   # not 4 whole query blocks
    (True, 256, "einsum"),    # an explicit mask besides the causal one
])
def test_causal_attention_on_cpu_takes_query_blocks_from_128_positions(masked, seq_len, kernel):
    """Without archlab's kernels (`runtime.cpu_kernels=false`, no compiler, several devices)."""
    choice = lambda backend: attention_kernel(jnp.float32, masked=masked, seq_len=seq_len, backend=backend,
                                              causal=True, cpu_kernels_on=False)[0]
    assert choice("cpu") == kernel and choice("gpu") != kernel


@pytest.mark.parametrize("dtype, masked, causal, head_dim, key_len, on, kernel", [
    (jnp.float32, False, True, 64, None, True, "cpu_fused"),     # GPT
    (jnp.float32, False, False, 16, 17, True, "cpu_fused"),      # ViT-tiny
    (jnp.float32, False, False, 32, 50, True, "cpu_fused"),      # unmasked cross-attention
    (jnp.float32, "keys", False, 32, 56, True, "cpu_fused"),     # the Transformer's padding mask
    (jnp.float32, False, True, 64, 50, True, "einsum"),          # causal needs as many keys as queries
    (jnp.float32, True, False, 64, None, True, "einsum"),        # an explicit mask over queries and keys
    (jnp.float32, "keys", True, 64, None, True, "einsum"),       # a padding mask with a causal one
    (jnp.float32, False, False, 24, None, True, "einsum"),       # heads not whole vectors
    (jnp.bfloat16, False, False, 64, None, True, "einsum"),
    (jnp.float32, False, True, 64, None, False, "einsum"),       # kernels off (256 positions: blocked below)
])
def test_fused_cpu_attention_choice(dtype, masked, causal, head_dim, key_len, on, kernel):
    got = attention_kernel(dtype, masked=bool(masked), seq_len=60, backend="cpu", causal=causal, head_dim=head_dim,
                           key_len=key_len, key_masked=masked == "keys", cpu_kernels_on=on)[0]
    assert got == kernel
    if masked == "keys":  # a padding mask stays on the plain path on GPU and TPU
        assert attention_kernel(dtype, masked=True, seq_len=128, backend="gpu", key_masked=True)[0] == "xla"


@pytest.mark.parametrize("batch, t, s, heads, head_dim, causal", [
    (2, 256, 256, 3, 64, True),    # 4 query blocks of 64; GPT's head size
    (3, 100, 100, 2, 32, True),    # a partial query block, keys that are not whole vectors
    (5, 17, 17, 4, 16, False),     # ViT-tiny: 16 patches and the CLS token
    (2, 37, 50, 2, 16, False),     # more keys than queries
])
def test_fused_attention_equals_the_einsums_values_and_gradients(batch, t, s, heads, head_dim, causal, kernels):
    q, dy = (jax.random.normal(jax.random.key(i), (batch, t, heads, head_dim)) for i in (0, 1))
    k, v = (jax.random.normal(jax.random.key(i), (batch, s, heads, head_dim)) for i in (2, 3))
    mask = jnp.tril(jnp.ones((t, s), bool))[None, None] if causal else None
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * dy)
    fused = jax.jit(jax.value_and_grad(loss(partial_attention(causal)), argnums=(0, 1, 2)))
    plain = jax.jit(jax.value_and_grad(loss(lambda q, k, v: layers.einsum_attention(q, k, v, mask)), argnums=(0, 1, 2)))
    for got, want in zip(jax.tree.leaves(fused(q, k, v)), jax.tree.leaves(plain(q, k, v))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    jaxpr = str(jax.make_jaxpr(fused)(q, k, v))
    assert ("archlab_attention_grad" in jaxpr) == (kernels == "native")
    if causal and kernels == "native":  # the future never leaks: the last key and value reach only the last query
        attend = jax.jit(partial_attention(causal))
        y, y2 = attend(q, k, v), attend(q, k.at[:, -1].set(50.0), v.at[:, -1].set(50.0))
        np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
        assert not np.allclose(y[:, -1], y2[:, -1])


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_is_stable_for_large_logits_and_lets_nans_show(causal):
    """Logits of thousands (a diverging run) give the einsums' softmax, not inf/NaN; a NaN in a query, key or value
    reaches every output that attends to it and no other (a causal mask keeps it from earlier positions, where the
    einsums' 0 x NaN leaks it), so that `trainer.nan_policy` sees it."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 70, 2, 16)) for i in range(3))
    mask = jnp.tril(jnp.ones((70, 70), bool))[None, None] if causal else None
    fused, plain = jax.jit(partial_attention(causal)), jax.jit(lambda q, k, v: layers.einsum_attention(q, k, v, mask))
    assert "archlab_attention" in str(jax.make_jaxpr(fused)(q, k, v))
    big = fused(q * 30, k * 30, v)  # logits of a few thousand: fp32 rounds each to ~1e-4, both sum in other orders
    assert np.isfinite(big).all()
    np.testing.assert_allclose(big, plain(q * 30, k * 30, v), rtol=1e-3, atol=1e-3)
    for arg in range(3):  # a NaN at position 30 of example 1's head 0, in q, k or v
        args = [q, k, v]
        args[arg] = args[arg].at[1, 30, 0].set(jnp.nan)
        want = np.zeros((2, 70, 2, 16), bool)
        want[1, 30 if arg == 0 else slice(30 if causal else 0, None), 0] = True
        np.testing.assert_array_equal(np.isnan(fused(*args)), want)


@pytest.mark.parametrize("mask_batch", [3, 1])
def test_fused_attention_with_a_padding_mask_equals_the_einsums(mask_batch, kernels):
    """A (B, 1, 1, S) key mask, as the Transformer's source padding: keys past each length and one inside masked,
    and an example with every key masked (attends uniformly, no gradient to q or k, as the einsums' select)."""
    q, dy = (jax.random.normal(jax.random.key(i), (3, 37, 2, 32)) for i in (0, 1))
    k, v = (jax.random.normal(jax.random.key(i), (3, 50, 2, 32)) for i in (2, 3))
    mask = (jnp.arange(50) < jnp.array([50, 20, 0])[:, None]).at[0, 7].set(False)[:mask_batch, None, None]
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * dy)
    fused = jax.jit(jax.value_and_grad(loss(lambda q, k, v: dot_product_attention(q, k, v, mask)), argnums=(0, 1, 2)))
    plain = jax.jit(jax.value_and_grad(loss(lambda q, k, v: layers.einsum_attention(q, k, v, mask)), argnums=(0, 1, 2)))
    got, want = fused(q, k, v), plain(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    assert ("archlab_attention_grad" in str(jax.make_jaxpr(fused)(q, k, v))) == (kernels == "native")
    dk = np.asarray(got[1][1])
    assert (dk[0, 7] == 0).all() and (mask_batch == 1 or (dk[1, 20:] == 0).all() and (dk[2] == 0).all())


def partial_attention(causal: bool):
    return lambda q, k, v: dot_product_attention(q, k, v, causal=causal)


def test_blocked_causal_attention_matches_the_masked_product_values_and_gradients():
    t = 128
    q, k, v, dy = (jax.random.normal(jax.random.key(i), (2, t, H, 8)) for i in range(4))
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    loss = lambda attend: lambda q, k, v: (attend(q, k, v) * dy).sum()
    blocked = jax.jit(jax.value_and_grad(loss(layers.causal_blocked_attention), argnums=(0, 1, 2)))(q, k, v)
    masked = jax.jit(jax.value_and_grad(loss(lambda q, k, v: layers.einsum_attention(q, k, v, mask)),
                                        argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(jax.tree.leaves(blocked), jax.tree.leaves(masked)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    attend = jax.jit(layers.causal_blocked_attention)
    if jax.default_backend() == "cpu":  # where dot_product_attention(causal=True) takes the blocks
        np.testing.assert_array_equal(jax.jit(partial_attention(True))(q, k, v), attend(q, k, v))
    # the future never leaks: changing the last key and value leaves every earlier output as it was
    y, y2 = attend(q, k, v), attend(q, k.at[:, -1].set(50.0), v.at[:, -1].set(50.0))
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    assert not np.allclose(y[:, -1], y2[:, -1])
    with pytest.raises(ValueError, match="130 queries and 130 keys.*divisible by blocks=4"):
        layers.causal_blocked_attention(*(jnp.zeros((1, 130, H, 8)) for _ in range(3)))


def test_causal_flag_equals_the_causal_mask_and_is_logged_once(caplog):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, H, 8)) for i in range(3))
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
    layers._announced.clear()
    with caplog.at_level(logging.INFO, logger="models.layers"):
        np.testing.assert_allclose(dot_product_attention(q, k, v, causal=True), dot_product_attention(q, k, v, mask),
                                   atol=1e-6)
        dot_product_attention(q, k, v, causal=True)
    assert [r.getMessage() for r in caplog.records] == [f"attention kernel: einsum ({jax.default_backend()}: "
                                                        "einsum + softmax)"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_kernel_matches_the_plain_path_forward_and_gradients():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 256, 4, 64), jnp.bfloat16) for i in range(3))
    mask = jnp.tril(jnp.ones((256, 256), bool))[None, None]

    def loss(impl, q, k, v):
        if impl == "cudnn":
            y = dot_product_attention(q, k, v, causal=True)
        else:
            y = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(64)))

    assert attention_kernel(q.dtype, masked=False, seq_len=256)[0] == "cudnn"
    for impl_grads, plain_grads in zip(jax.grad(loss, (1, 2, 3))("cudnn", q, k, v),
                                       jax.grad(loss, (1, 2, 3))("xla", q, k, v)):
        np.testing.assert_allclose(np.asarray(impl_grads, np.float32), np.asarray(plain_grads, np.float32),
                                   atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, causal=True), np.float32),
                               np.asarray(jax.nn.dot_product_attention(q, k, v, mask=mask), np.float32),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_flops_count_cudnn_attention_as_the_cpu_kernel():
    """Model FLOPs of cuDNN's fused attention, a custom call XLA does not count: what the CPU kernel's count is."""
    from train.flops import compiled_flops

    q = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)
    step = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, causal=True).astype(jnp.float32)),
                    argnums=(0, 1, 2))
    assert "dot_product_attention_bwd_wrapper" in str(jax.make_jaxpr(step)(q, q, q))
    assert compiled_flops(step, q, q, q) == pytest.approx(6 * 2 * 2 * 2 * 128 * 128 * 64 / 2, rel=0.01)


def test_fully_masked_rows_stay_finite():
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 3, H, 8)) for i in range(3))
    assert np.isfinite(dot_product_attention(q, k, v, jnp.zeros((1, 1, 3, 3), bool))).all()


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match=r"d_model 12 is not divisible by num_heads 5 \(valid: 1, 2, 3, 4, 6, 12\)"):
        MultiHeadAttention(12, 5, rngs=nnx.Rngs(0))


def test_projections_carry_logical_axis_names(attn):
    ff = FeedForward(D, 64, rngs=nnx.Rngs(0))
    assert attn.query.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert attn.out.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    assert ff.fc1.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert ff.fc2.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert ff(inputs(0)).shape == (2, T, D)


def test_unknown_activation_is_a_one_line_error():
    with pytest.raises(ValueError, match="activation 'swish' is not known"):
        FeedForward(D, 64, activation="swish", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape, window", [((2, 24, 24, 3), 2), ((1, 9, 7, 2), 2), ((2, 9, 9, 1), 3)])
def test_max_pool_equals_nnx_max_pool_and_routes_the_gradient_to_the_maximum(shape, window):
    x = jax.random.normal(jax.random.key(0), shape)  # no ties: the maximum of each window is unique
    want = nnx.max_pool(x, (window, window), strides=(window, window))
    np.testing.assert_array_equal(layers.max_pool(x, window), want)
    grad = jax.grad(lambda v: jnp.sum(layers.max_pool(v, window) * jnp.arange(1.0, want.size + 1).reshape(want.shape)))(x)
    grad_ref = jax.grad(lambda v: jnp.sum(nnx.max_pool(v, (window, window), strides=(window, window))
                                          * jnp.arange(1.0, want.size + 1).reshape(want.shape)))(x)
    np.testing.assert_array_equal(grad, grad_ref)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_activation_max_pool_equals_the_activation_then_the_pool(act):
    """ReLU runs after the pool (max commutes with it): the same values and gradients, windows of negative values
    included (0, and no gradient); other activations run first."""
    fn = layers.activation_fn(act)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 6)) - 0.5  # many windows entirely below 0
    weights = jax.random.normal(jax.random.key(1), (3, 4, 4, 6))
    fast = lambda v: jnp.sum(layers.activation_max_pool(v, fn, 2) * weights)
    plain = lambda v: jnp.sum(layers.max_pool(fn(v), 2) * weights)
    np.testing.assert_array_equal(layers.activation_max_pool(x, fn, 2), layers.max_pool(fn(x), 2))
    np.testing.assert_array_equal(jax.jit(jax.grad(fast))(x), jax.jit(jax.grad(plain))(x))
    first = jax.make_jaxpr(lambda v: layers.activation_max_pool(v, fn, 2))(x).jaxpr.eqns[0]
    assert (first.outvars[0].aval.shape == x.shape) == (act != "relu")  # the activation first: on all of x


@pytest.mark.parametrize("c_in, c_out, k, stride, padding", [
    (1, 6, 5, 1, "VALID"),                # LeNet conv1 (XLA: shifted multiply-adds)
    (6, 16, 5, 1, "VALID"),               # LeNet conv2 (XLA: col2im input gradient)
    (3, 16, 3, 1, [(1, 1), (1, 1)]),      # a CIFAR stem, torchvision padding
    (2, 4, 3, 1, "SAME"),
    (16, 16, 3, 1, "SAME"),               # many channels (XLA: lax's, gradients from materialised x and dy)
    (16, 32, 3, 2, [(1, 1), (1, 1)]),     # ResNet's strided 3x3
    (16, 32, 1, 2, "VALID"),              # and its projection shortcut
    (32, 16, 5, 3, [(2, 0), (1, 3)]),     # strides and paddings the input gradient's phases must cover
    (40, 24, 3, 1, "SAME"),               # channels that are not whole vectors
    (64, 64, 3, 1, "SAME"),               # two vectors at a time; weight gradient in 6 x 4-vector blocks
    (5, 64, 3, 1, "SAME"),                # and their last rows (15 = 2 x 6 + 3)
    (1, 8, 3, 2, "SAME"),                 # strided (XLA: lax's, materialised)
    (6, 16, 5, 2, [(2, 1), (0, 3)]),      # few input channels (kernel: dy's channels a vector) by phases
    (4, 32, 3, 1, "SAME"),                # and two vectors of them, the border taps skipped
])
def test_cpu_conv_equals_nnx_conv_values_and_gradients(c_in, c_out, k, stride, padding, kernels):
    def model(conv_fn) -> nnx.Conv:
        return nnx.Conv(c_in, c_out, (k, k), strides=stride, padding=padding, conv_general_dilated=conv_fn,
                        rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(1), (3, 11, 10, c_in))  # 3 images over 2 threads
    fast, plain = model(layers.cpu_conv), model(jax.lax.conv_general_dilated)

    def loss(m: nnx.Conv, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(m(x)))  # a non-constant output gradient

    # values and gradients in one compiled call each (eager dispatch of every small op took most of the time)
    outputs = nnx.jit(lambda m, x: (m(x), nnx.grad(loss, argnums=(0, 1))(m, x)))
    (y_fast, (gm_fast, gx_fast)), (y_plain, (gm_plain, gx_plain)) = (outputs(m, x) for m in (fast, plain))
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_fast, gx_plain, rtol=1e-4, atol=1e-5)
    # sums over the batch's pixels in another order: a few 1e-5 apart where a value is near 0
    np.testing.assert_allclose(gm_fast["kernel"][...], gm_plain["kernel"][...], rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(gm_fast["bias"][...], gm_plain["bias"][...], rtol=1e-4, atol=1e-5)
    if kernels == "native":  # the same bits every time, however the threads split the batch
        np.testing.assert_array_equal(outputs(fast, x)[1][0]["kernel"][...], gm_fast["kernel"][...])
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda v: fast(v))(x))
    backward = str(jax.make_jaxpr(nnx.grad(loss, argnums=(0, 1)))(fast, x))
    for target in ["forward", "input_grad", "weight_grad"]:
        assert (f"archlab_conv_{target}" in backward) == (kernels == "native"), target
    if kernels == "xla":
        assert "cond[" in backward  # _materialize's fusion boundary: x and dy (many channels), or the col2im's sum


@pytest.mark.parametrize("k, c_out, padding", [(5, 6, "VALID"), (3, 12, "SAME"), (7, 4, [(3, 2), (0, 3)]),
                                               (2, 15, "VALID"), (3, 1, "SAME")])
def test_one_channel_layer_by_pixels_equals_lax(k, c_out, padding):
    """A one-channel stride-1 layer's forward and weight gradient, vectorised over output pixels (LeNet's conv1):
    rows of one and two vectors of pixels and a partial last one, 1 to 15 output channels interleaved, kernel
    widths of 2 to 7, padding on every side."""
    x = jax.random.normal(jax.random.key(0), (3, 28, 21, 1))
    w = jax.random.normal(jax.random.key(1), (k, k, 1, c_out))
    padding = padding if isinstance(padding, str) else tuple(padding)
    conv = lambda fn, w: fn(x, w, (1, 1), padding, dimension_numbers=layers.NHWC)
    loss = lambda fn, w: jnp.sum(jnp.sin(conv(fn, w)))
    outputs = lambda fn: jax.jit(lambda w: (conv(fn, w), jax.grad(partial(loss, fn))(w)))(w)
    (y_fast, dw_fast), (y_plain, dw_plain) = outputs(layers.cpu_conv), outputs(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    assert "archlab_conv_weight_grad" in str(jax.make_jaxpr(jax.grad(partial(loss, layers.cpu_conv)))(w))
    np.testing.assert_allclose(dw_fast, dw_plain, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("hw, c_in, c_out, k, padding", [
    (11, 64, 64, 3, ((1, 1), (1, 1))),  # padded copies: groups of 3 images, a chunk's last group smaller
    (20, 6, 16, 5, ((0, 0), (0, 0))),   # x read in place: groups of 2 images (16x16 output pixels)
])
def test_conv_weight_grad_over_groups_of_images(hw, c_in, c_out, k, padding):
    """The weight-gradient kernel sums each register block over a group of small images (kSweepPixels): 9 images
    over two threads' chunks of 4 and 5, so that a chunk holds whole groups and a smaller last one."""
    if not cpu_kernels.available():
        pytest.skip("archlab's CPU kernels did not build here")
    x = jax.random.normal(jax.random.key(0), (9, hw, hw, c_in))
    w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=layers.NHWC)
    y, pullback = jax.vjp(conv, x, w)
    dy = jnp.sin(y)
    fast = jax.jit(lambda x, dy: cpu_kernels.conv_weight_grad(x, dy, w.shape, (1, 1), padding))(x, dy)
    np.testing.assert_allclose(fast, pullback(dy)[1], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("shape, d_out, bias", [
    ((128, 40), 24, True),       # an MLP's batch: 2 kernel chunks of 64 rows; widths that are not whole vectors
    ((4, 17, 64), 64, False),    # 68 rows: 2 chunks of 34
    ((8, 64, 48), 96, True),     # a GPT's (B, T, D): 512 rows, 4 chunks of 128
    ((2, 3, 5, 16), 7, True),    # 30 rows: no chunks of 16 or more -> lax's gradient
    ((31, 40), 8, False),        # a prime count -> lax's gradient
    ((600, 203), 272, False),    # dense kernel: 2 x 2 tiles, partial ones; the rows in 2 parts (256 + 44 each)
    ((300, 100), 128, False),    # dense kernel, 4-vector blocks: 2 tiles, the second 4 rows deep
    ((2, 300, 70), 64, True),    # dense kernel, 4-vector blocks: 1 tile of 70 rows (11 blocks of 6, then 4), 2 parts
])
def test_cpu_dot_equals_nnx_linear_values_and_gradients(shape, d_out, bias, kernels):
    def model(dot_fn) -> nnx.Linear:
        return nnx.Linear(shape[-1], d_out, use_bias=bias, dot_general=dot_fn, rngs=nnx.Rngs(0))

    x = jax.random.normal(jax.random.key(1), shape)
    fast, plain = model(layers.cpu_dot), model(jax.lax.dot_general)

    def loss(m: nnx.Linear, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(m(x)))

    outputs = nnx.jit(lambda m, x: (m(x), nnx.grad(loss, argnums=(0, 1))(m, x)))
    (y_fast, (gm_fast, gx_fast)), (y_plain, (gm_plain, gx_plain)) = (outputs(m, x) for m in (fast, plain))
    np.testing.assert_array_equal(y_fast, y_plain)  # the forward is lax's dot either way
    np.testing.assert_allclose(gx_fast, gx_plain, rtol=1e-5, atol=1e-6)
    rows = int(np.prod(shape[:-1]))
    dense = d_out % cpu_kernels.DENSE_WIDTH == 0  # the dense kernel; else the 1x1 convolution's, rows permitting
    kernel = kernels == "native" and (
        (dense and layers._dense_kernel_pays(d_out)) or (not dense and layers._rows_per_chunk(rows, d_out) is not None))
    backward = str(jax.make_jaxpr(nnx.grad(loss, argnums=(0, 1)))(fast, x))
    assert ("archlab_dense_weight_grad" in backward) == (kernel and dense)
    assert ("archlab_conv_weight_grad" in backward) == (kernel and not dense)
    xla_dot = kernels == "native" and dense and not kernel  # XLA's dot of the 2-D rows (16 registers, wide dy)
    # which sums up to 600 products of values up to ~30 in another order than lax's gradient: fp32 rounding ~5e-5
    atol = 1e-4 if xla_dot else 2e-5
    np.testing.assert_allclose(gm_fast["kernel"][...], gm_plain["kernel"][...], rtol=1e-4, atol=atol)
    if kernel:  # the same bits every time, however the threads split the rows
        np.testing.assert_array_equal(outputs(fast, x)[1][0]["kernel"][...], gm_fast["kernel"][...])


def test_cpu_dot_leaves_other_contractions_and_dtypes_to_lax():
    x, w = jnp.ones((256, 16)), jnp.ones((16, 8))
    dot = lambda *a, **k: str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(layers.cpu_dot(x, w, *a, **k)),
                                                       argnums=1))(x, w))
    assert "archlab_conv_weight_grad" in dot((((1,), (0,)), ((), ())))
    assert "archlab_conv_weight_grad" not in dot((((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    bf16 = jax.grad(lambda w: jnp.sum(layers.cpu_dot(x.astype(jnp.bfloat16), w, (((1,), (0,)), ((), ())))))
    assert bf16(w.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert "archlab" not in str(jax.make_jaxpr(bf16)(w.astype(jnp.bfloat16)))
    xt = jnp.ones((16, 256))  # contracting x's first axis: lax
    assert jnp.allclose(layers.cpu_dot(xt, w, (((0,), (0,)), ((), ()))), xt.T @ w)


def test_tall_weight_gradient_is_the_transpose_of_the_wide_product():
    """XLA's dense weight gradient: a dW at least TALL_RATIO times taller than wide, over TALL_MIN_ROWS rows or
    more, is computed as (dy^T x)^T (Eigen's faster orientation); others as x^T dy. 100 columns: never the kernel."""
    def dots(rows: int) -> list[str]:
        x, dy = jax.random.normal(jax.random.key(1), (rows, 400)), jax.random.normal(jax.random.key(2), (rows, 100))
        dw = jax.jit(layers._dense_weight_grad)
        np.testing.assert_allclose(dw(x, dy), x.T @ dy, rtol=1e-4, atol=1e-3)
        hlo = dw.lower(x, dy).compile().as_text()
        return re.findall(r"f32\[(\d+),(\d+)\][^ ]* dot\(", hlo)

    assert layers.TALL_RATIO * 100 <= 400 and layers.TALL_MIN_ROWS <= 800
    assert dots(800) == [("100", "400")]
    assert dots(layers.TALL_MIN_ROWS // 2) == [("400", "100")]


@pytest.mark.parametrize("intel, registers, kernel_at", [
    (False, 32, (64, 384, 1024, 1536)), (True, 32, (64, 384, 1024)), (False, 16, (64,)), (True, 16, (64,))])
def test_dense_weight_gradient_takes_the_kernel_where_it_was_measured_faster(monkeypatch, intel, registers, kernel_at):
    """The dense kernel takes dy narrower than DENSE_NARROW_COLUMNS everywhere, wider with 32 vector registers,
    but not dy wider than DENSE_INTEL_COLUMNS on Intel's CPUs (XLA's dot ran GPT 6x384's 1536 faster there)."""
    monkeypatch.setattr(cpu_kernels, "intel", lambda: intel)
    monkeypatch.setattr(cpu_kernels, "vector_registers", lambda: registers)
    widths = (64, 384, 1024, 1536)
    assert layers.DENSE_NARROW_COLUMNS <= 384 and layers.DENSE_INTEL_COLUMNS in range(1024, 1536)
    assert tuple(w for w in widths if layers._dense_kernel_pays(w)) == kernel_at
    assert not layers._dense_kernel_pays(72)  # not a multiple of DENSE_WIDTH (16) columns: XLA's dot


def test_dense_weight_gradient_of_1536_columns_follows_the_rule_on_this_machine():
    x, dy = jax.random.normal(jax.random.key(1), (256, 64)), jax.random.normal(jax.random.key(2), (256, 1536))
    jaxpr = str(jax.make_jaxpr(layers._dense_weight_grad)(x, dy))
    assert ("archlab_dense_weight_grad" in jaxpr) == layers._dense_kernel_pays(1536)
    assert layers._dense_kernel_pays(1536) == (cpu_kernels.vector_registers() >= 32 and not cpu_kernels.intel())
    np.testing.assert_allclose(jax.jit(layers._dense_weight_grad)(x, dy), x.T @ dy, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(8, 5, 5, 12), (64, 3), (4, 9, 9, 40)])
def test_batch_norm_equals_nnx_batch_norm_values_gradients_and_running_averages(shape, kernels):
    x = jax.random.normal(jax.random.key(0), shape) * 3 + 1
    weights = jax.random.normal(jax.random.key(1), shape)
    norms = []
    for cls in (layers.BatchNorm, nnx.BatchNorm):
        bn = cls(shape[-1], momentum=0.9, epsilon=1e-5, rngs=nnx.Rngs(0))
        bn.scale[...] = jnp.linspace(0.5, 2, shape[-1])
        bn.bias[...] = jnp.linspace(-1, 1, shape[-1])
        grads_then_values = nnx.jit(lambda m, x: (nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x)) * weights),
                                                               argnums=(0, 1))(m, x), m(x)))
        grads, y = grads_then_values(bn, x)
        norms.append((bn, y, grads))
    (fast, y_fast, (gm_fast, gx_fast)), (plain, y_plain, (gm_plain, gx_plain)) = norms
    graphdef, state = nnx.split(fast)
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))
    backward = str(jax.make_jaxpr(nnx.grad(lambda m, x: jnp.sum(m(x) * weights), argnums=(0, 1)))(fast, x))
    assert backward.count("archlab_channel_moments") == (2 if kernels == "native" else 0)  # forward, backward
    np.testing.assert_allclose(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_fast, gx_plain, rtol=1e-4, atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(gm_fast[name][...], gm_plain[name][...], rtol=1e-4, atol=1e-4)
    for name in ("mean", "var"):  # two updates each (grad, then the call)
        np.testing.assert_allclose(getattr(fast, name)[...], getattr(plain, name)[...], rtol=1e-5, atol=1e-6)
    fast.use_running_average = plain.use_running_average = True
    # eval mode: nnx's own path (the running averages differ in the last bits: the kernel sums in another order)
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda v: fast(v))(x))


# one source of the kernels (with their header): a build quick enough for the build's own tests
ONE_SOURCE = ("cpu_norm.cc", "cpu_kernels.h")


def test_cpu_kernels_build_with_the_compiler_it_is_given(tmp_path, monkeypatch):
    """The build compiles through a temporary file renamed into place (one source: the full build is every other
    test's, through the cache), and names a missing compiler."""
    norm = [f for f in cpu_kernels.SOURCES if f.name in ONE_SOURCE]
    cpu_kernels.build(tmp_path / "conv.so", norm)
    assert (tmp_path / "conv.so").stat().st_size > 0 and not list(tmp_path.glob("*.so.*"))
    monkeypatch.setenv("CXX", "no-such-c++")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-c\\+\\+'"):
        cpu_kernels.build(tmp_path / "other.so", norm)
    assert not (tmp_path / "other.so").exists()


def test_processes_needing_the_same_build_compile_it_once(tmp_path):
    """Two processes' first use at once (a sweep's jobs): one compiles, the other waits and loads that build."""
    log = tmp_path / "compiles"
    compiler = tmp_path / "c++"
    compiler.write_text(f"#!/bin/sh\necho $PPID >> {log}\nexec c++ \"$@\"\n")  # the process building
    compiler.chmod(0o755)
    code = ("from models import cpu_kernels; "
            f"print(cpu_kernels.built([f for f in cpu_kernels.SOURCES if f.name in {ONE_SOURCE}]))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CXX": str(compiler)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1 and Path(paths.pop()).stat().st_size > 0
    builders = log.read_text().splitlines()  # one line per compiler run: each .cc, then the link
    assert len(builders) == sum(name.endswith(".cc") for name in ONE_SOURCE) + 1 and len(set(builders)) == 1


def test_another_build_of_the_kernels_is_called_by_its_own_names():
    """`register` puts a build's handlers under another prefix and calls traced in `tracing_with` call them: two
    builds side by side in one process (scripts/conv_bench.py --against)."""
    assert cpu_kernels.available()
    cpu_kernels.register(cpu_kernels.built(), "test_twin_")
    x, w = jax.random.normal(jax.random.key(0), (2, 9, 9, 16)), jax.random.normal(jax.random.key(1), (3, 3, 16, 8))
    conv = lambda x, w: layers.cpu_conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=layers.NHWC)
    with cpu_kernels.tracing_with("test_twin_"):
        twin = jax.jit(lambda x, w: conv(x, w)).lower(x, w)
    mine = jax.jit(lambda x, w: conv(x, w)).lower(x, w)  # a new function: jit reuses a function's trace
    assert "test_twin_conv_forward" in twin.as_text() and "archlab_conv_forward" not in twin.as_text()
    assert "archlab_conv_forward" in mine.as_text() and cpu_kernels.target("conv_forward") == "archlab_conv_forward"
    np.testing.assert_array_equal(twin.compile()(x, w), mine.compile()(x, w))


def test_cpu_conv_keeps_bfloat16_and_other_ranks():
    conv = nnx.Conv(1, 4, (3, 3), dtype=jnp.bfloat16, conv_general_dilated=layers.cpu_conv, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 1))
    plain = nnx.Conv(1, 4, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert conv(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(conv(x).astype(jnp.float32), plain(x).astype(jnp.float32), rtol=2e-2, atol=2e-2)
    conv1d = nnx.Conv(2, 3, (3,), conv_general_dilated=layers.cpu_conv, rngs=nnx.Rngs(0))  # (B, L, C): lax
    assert conv1d(jnp.ones((2, 7, 2))).shape == (2, 7, 3)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda v: conv1d(v))(jnp.ones((2, 7, 2))))


@pytest.mark.parametrize("shape, window", [((2, 24, 24, 6), 2), ((1, 9, 7, 20), 2), ((2, 9, 9, 1), 3),
                                           # few channels: 16 // c pixels a vector, a partial last group, edges
                                           ((2, 9, 11, 3), 2), ((1, 8, 22, 1), 2), ((2, 6, 10, 7), 2)])
def test_max_pool_kernel_routes_ties_to_the_first_maximum(shape, window, kernels):
    """archlab's CPU kernel and the reshape-and-max agree on values and, without ties, on gradients; with ties the
    kernel gives the whole gradient to the first maximum of each window, as select-and-scatter does."""
    x = jax.random.normal(jax.random.key(0), shape)
    weights = jax.random.normal(jax.random.key(1), jax.eval_shape(lambda v: layers.max_pool(v, window), x).shape)
    pooled = lambda v: jnp.sum(layers.max_pool(v, window) * weights)
    np.testing.assert_array_equal(jax.jit(lambda v: layers.max_pool(v, window))(x),
                                  jax.jit(lambda v: nnx.max_pool(v, (window, window), (window, window)))(x))
    grad, grad_ref = jax.jit(jax.grad(pooled)), jax.jit(jax.grad(
        lambda v: jnp.sum(nnx.max_pool(v, (window, window), (window, window)) * weights)))
    np.testing.assert_array_equal(grad(x), grad_ref(x))
    ties = jnp.round(x)  # many windows with equal maxima
    if kernels == "native":
        assert "archlab_max_pool_grad" in str(jax.make_jaxpr(jax.grad(pooled))(x))
        np.testing.assert_array_equal(grad(ties), grad_ref(ties))
    else:
        np.testing.assert_allclose(jnp.sum(grad(ties)), jnp.sum(grad_ref(ties)), rtol=1e-5)


@pytest.mark.parametrize("shape, window, stride, padding", [
    ((2, 9, 9, 3), 3, 2, 1),     # ResNet's stem pool: 3x3, stride 2, one pixel of padding
    ((2, 8, 7, 20), 3, 2, 1),    # an odd width: the last window's right column is padding
    ((1, 10, 10, 5), 2, 1, 0),   # overlapping without padding
    ((1, 6, 6, 2), 4, 2, 2),     # padding wider than the stride
])
def test_overlapping_max_pool_equals_nnx_max_pool_with_ties_to_the_first_maximum(shape, window, stride, padding):
    """Windows that overlap take the max of their strided taps on CPU (no reduce_window, no select-and-scatter),
    with the values of nnx.max_pool and, ties included, its gradient: each window's to its first maximum, the
    overlaps' shares added."""
    x = jax.random.normal(jax.random.key(0), shape)
    pads = ((padding, padding),) * 2
    want = nnx.max_pool(x, (window, window), (stride, stride), pads)
    weights = jax.random.normal(jax.random.key(1), want.shape)
    pooled = lambda v: jnp.sum(layers.max_pool(v, window, stride=stride, padding=padding) * weights)
    reference = lambda v: jnp.sum(nnx.max_pool(v, (window, window), (stride, stride), pads) * weights)
    pool = jax.jit(lambda v: layers.max_pool(v, window, stride, padding))
    np.testing.assert_array_equal(pool(x), want)
    grad, grad_ref = jax.jit(jax.grad(pooled)), jax.jit(jax.grad(reference))
    for v in (x, jnp.round(x)):  # the second with many tied windows
        np.testing.assert_allclose(grad(v), grad_ref(v), rtol=1e-6, atol=1e-6)
    backward = str(jax.make_jaxpr(jax.grad(pooled))(x))
    assert "reduce_window" not in backward and "select_and_scatter" not in backward
    nan = x.at[0, 1, 1, 0].set(jnp.nan)  # a NaN wins its windows, as in nnx's pool
    np.testing.assert_array_equal(jnp.isnan(pool(nan)),
                                  jnp.isnan(nnx.max_pool(nan, (window, window), (stride, stride), pads)))


@pytest.mark.parametrize("x_shape, w_shape, stride, padding", [
    ((2, 2, 2, 512), (3, 3, 512, 512), 1, "SAME"),             # ResNet-18's last stage at 64x64
    ((2, 4, 4, 256), (3, 3, 256, 512), 2, [(1, 1), (1, 1)]),    # its strided first block
    ((3, 5, 4, 200), (3, 3, 200, 208), (3, 2), [(0, 2), (1, 0)]),  # strides and asymmetric padding
    ((2, 4, 4, 256), (3, 3, 256, 130), 1, [(2, 0), (-1, 1)]),   # cropping, and a width no dense kernel takes
    ((2, 5, 5, 512), (1, 1, 512, 512), 1, "VALID"),             # a 1x1 layer of 1 MiB: a plain matmul
    ((2, 6, 5, 512), (1, 1, 512, 1024), 2, "VALID"),            # ResNet's projection shortcut
])
def test_cpu_conv_with_large_weights_and_few_pixels_is_a_patch_matmul(x_shape, w_shape, stride, padding):
    """A layer whose weights outgrow the direct kernels' cache and whose images have few output pixels runs as
    patches @ W (`layers._matmul_conv`): values and gradients as lax's convolution."""
    strides = (stride, stride) if isinstance(stride, int) else stride
    pads = jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding) if isinstance(padding, str) else padding
    assert layers._matmul_pays(x_shape, w_shape, strides, tuple(map(tuple, pads)))
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape) * w_shape[0] ** -1 * w_shape[2] ** -0.5
    fast = lambda x, w: layers.cpu_conv(x, w, strides, padding, dimension_numbers=layers.NHWC)
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=layers.NHWC)
    np.testing.assert_allclose(jax.jit(fast)(x, w), jax.jit(plain)(x, w), rtol=1e-4, atol=1e-4)
    loss = lambda conv: jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))
    for got, want in zip(loss(fast)(x, w), loss(plain)(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    backward = str(jax.make_jaxpr(loss(fast))(x, w))
    assert "archlab_conv" not in backward
    assert ("archlab_dense_weight_grad" in backward) == layers._dense_kernel_pays(w_shape[3])


@pytest.mark.parametrize("x_shape, w_shape, stride, matmul", [
    ((32, 2, 2, 512), (3, 3, 512, 512), 1, True),    # ResNet-18 at 64x64: 9 MiB of weights on 2x2 pixels
    ((32, 4, 4, 256), (3, 3, 256, 256), 1, True),    # 2.25 MiB on 4x4
    ((32, 8, 8, 128), (3, 3, 128, 128), 1, False),   # 8x8 pixels fill the direct kernel's blocks
    ((32, 7, 7, 512), (3, 3, 512, 512), 1, False),   # 7x7: the patches would cost more than they save,
    ((8, 7, 7, 512), (3, 3, 512, 512), 1, True),     # unless the weights are large and the patches fit in cache
    ((8, 14, 14, 256), (3, 3, 256, 256), 1, False),
    ((8, 7, 7, 2048), (1, 1, 2048, 512), 1, True),   # ResNet-50's 1x1 layers of 1 MiB and more
    ((128, 7, 7, 64), (3, 3, 64, 64), 1, False),     # ResNet-20: every layer stays on the direct kernels
    ((128, 28, 28, 16), (1, 1, 16, 32), 2, False),
    ((128, 4, 4, 256), (3, 3, 256, 256), 1, False),  # 19 MB of patches: past the cache, slower than direct
])
def test_which_convolutions_take_the_patch_matmul(x_shape, w_shape, stride, matmul):
    pad = w_shape[0] // 2
    assert layers._matmul_pays(x_shape, w_shape, (stride, stride), ((pad, pad), (pad, pad))) == matmul


def test_flops_count_the_cpu_kernels_convolutions():
    """XLA's cost analysis cannot see into a custom call: train/flops.py adds the kernels' convolutions, full
    windows as PyTorch's FlopCounterMode counts them (XLA's own count of its convolutions leaves out the taps
    that fall on padding)."""
    from train.flops import compiled_flops

    conv = nnx.Conv(16, 32, (3, 3), conv_general_dilated=layers.cpu_conv, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv)
    step = lambda: jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2), argnums=(0, 1))  # traced anew
    x = jax.ShapeDtypeStruct((4, 9, 9, 16), jnp.float32)
    macs = 4 * 9 * 9 * 32 * 3 * 3 * 16  # the forward, the input gradient and the weight gradient each
    assert compiled_flops(step(), state, x) == pytest.approx(3 * 2 * macs, rel=0.01)
    cpu_kernels.enable(False)
    try:
        assert 0.85 * 3 * 2 * macs < compiled_flops(step(), state, x) < 3 * 2 * macs  # 9x9 SAME: (25/27)^2 = 0.857
    finally:
        cpu_kernels.enable(True)


@pytest.mark.parametrize("rows, d_out, target", [
    (128, 24, "archlab_conv_weight_grad"),   # a width that is not whole vectors: the 1x1 convolution's kernel
    (96, 32, "archlab_dense_weight_grad"),   # the dense kernel
])
def test_flops_count_the_cpu_dot_weight_gradient(rows, d_out, target):
    from train.flops import compiled_flops

    linear = nnx.Linear(40, d_out, use_bias=False, dot_general=layers.cpu_dot, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(linear)
    step = lambda: jax.grad(lambda s, x: jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x))), argnums=(0, 1))
    x = jax.ShapeDtypeStruct((rows, 40), jnp.float32)
    assert target in str(jax.make_jaxpr(step())(state, x))
    assert compiled_flops(step(), state, x) == pytest.approx(3 * 2 * rows * 40 * d_out, rel=0.01)


def test_channel_moments_sum_in_one_pass_and_repeat_bitwise():
    """BatchNorm's statistics kernel: sum(a) and sum(a * b) per channel, against float64, for channels of one,
    two and four vectors and a remainder, and the same bits on a second call."""
    moments = jax.jit(cpu_kernels.channel_moments)
    for shape in [(128, 28, 28, 16), (7, 5, 5, 32), (3, 11, 64), (300, 21), (2, 3)]:
        a = np.asarray(jax.random.normal(jax.random.key(0), shape)) + 0.5
        b = np.asarray(jax.random.normal(jax.random.key(1), shape))
        for first, second in ((a, a), (a, b)):
            sums = moments(first, second)
            axes = tuple(range(len(shape) - 1))
            want = (first.astype(np.float64).sum(axes), (first.astype(np.float64) * second).sum(axes))
            for got, expected in zip(sums, want):
                np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6 * np.sqrt(first.size))
            for again, got in zip(moments(first, second), sums):
                np.testing.assert_array_equal(again, got)


def test_flops_count_the_fused_attention():
    """Model FLOPs: q k^T and p v forward, four products backward (not the recomputed logits), half of each
    under a causal mask."""
    from train.flops import compiled_flops

    q = jax.ShapeDtypeStruct((2, 128, 2, 32), jnp.float32)
    for causal in (False, True):
        step = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, causal=causal)), argnums=(0, 1, 2))
        assert "archlab_attention_grad" in str(jax.make_jaxpr(step)(q, q, q))
        products = 6 * 2 * 2 * 2 * 128 * 128 * 32 / (2 if causal else 1)
        assert compiled_flops(step, q, q, q) == pytest.approx(products, rel=0.01)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction sets")
def test_cpu_kernels_built_for_narrower_vectors_compute_the_same(tmp_path):
    """Laptops without AVX-512 build the kernels with 8-float (AVX2) or 4-float (SSE) vectors: both built here, side
    by side in one fresh process (the build's flags patched, the SSE build under its own names), convolutions, the
    max pool (values and gradients), attention and the selective scan still equal lax's, computed once for both
    (everything jitted: eager dispatch took half the test's time)."""
    code = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from models import cpu_kernels, layers
from models.sequential_scan import scan_sequential
from tests.test_mamba import scan_inputs
march = lambda name: lambda: ["-O2", f"-march={name}", "-std=c++17", "-shared", "-fPIC", "-w"]
cpu_kernels._flags = march("x86-64")  # SSE: 4-float vectors
cpu_kernels.register(cpu_kernels.built(), "sse_")
cpu_kernels._flags = march("haswell")  # AVX2: 8-float vectors, under archlab's own names
assert cpu_kernels.available()
# 16 vector registers in both, so the dense kernel's 1-2 vector blocks (the 6 x 4-vector ones need 32); cpu_dot gives
# it dy of fewer than 128 columns and leaves wider ones to XLA's dot
assert cpu_kernels.vector_registers() == 16
assert layers._dense_kernel_pays(64) and not layers._dense_kernel_pays(272)
references = {}
def reference(compute, *key):  # lax's results, computed once for both builds
    if key not in references:
        references[key] = compute()
    return references[key]
loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
outputs = lambda: nnx.jit(lambda m, x: (m(x), nnx.grad(loss, argnums=(0, 1))(m, x)))
def check(prefix):
    for c_in, c_out, k, stride in [(20, 24, 3, 1), (20, 40, 3, 2), (20, 16, 5, 1), (6, 16, 5, 1), (3, 32, 3, 1)]:
        x = jax.random.normal(jax.random.key(1), (3, 11, 10, c_in))
        fast, plain = (nnx.Conv(c_in, c_out, (k, k), strides=stride, conv_general_dilated=f, rngs=nnx.Rngs(0))
                       for f in (layers.cpu_conv, jax.lax.conv_general_dilated))
        y, (g, gx) = outputs()(fast, x)
        y_want, (g_want, gx_want) = reference(lambda: outputs()(plain, x), "conv", c_in, c_out, k, stride)
        np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gx, gx_want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g["kernel"][...], g_want["kernel"][...], rtol=1e-4, atol=5e-5)
        assert prefix + "conv_weight_grad" in str(jax.make_jaxpr(nnx.grad(loss))(fast, x))
    # the max pool's vectors over a pixel's channels, their last few lanes (1, 3, 6: under a vector, whole-vector
    # stores spilling onto the next taps; 20: 2.5 vectors), odd widths; with ties, each window's gradient to its
    # first maximum, as select-and-scatter's
    for shape in [(3, 11, 10, 20), (2, 9, 11, 3), (2, 24, 24, 6), (1, 8, 22, 1)]:
        x = jnp.round(jax.random.normal(jax.random.key(1), shape) * 2)
        weights = jax.random.normal(jax.random.key(2), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))
        both = lambda pool: jax.jit(lambda v: (pool(v), jax.grad(lambda v: jnp.sum(pool(v) * weights))(v)))(x)
        want = reference(lambda: both(lambda v: nnx.max_pool(v, (2, 2), (2, 2))), "pool", shape)
        for got, expected in zip(both(lambda v: layers.max_pool(v, 2)), want):
            np.testing.assert_array_equal(got, expected)
        assert prefix + "max_pool_grad" in str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(layers.max_pool(v, 2))))(x))
    # 203 -> 272: tiles and rows split; 70 -> 64: one tile with a short last block
    for d_in, d_out in [(203, 272), (70, 64)]:
        x = jax.random.normal(jax.random.key(1), (600, d_in))
        dy = jax.random.normal(jax.random.key(2), (600, d_out))
        # a new function for each build: jit would reuse a function's trace, and with it the first build's kernel
        dense = jax.jit(lambda x, dy: cpu_kernels.dense_weight_grad(x, dy))
        assert prefix + "dense_weight_grad" in dense.lower(x, dy).as_text()
        np.testing.assert_allclose(dense(x, dy), x.T @ dy, rtol=1e-4, atol=1e-3)
        fast, plain = (nnx.Linear(d_in, d_out, dot_general=f, rngs=nnx.Rngs(0))
                       for f in (layers.cpu_dot, jax.lax.dot_general))
        assert (prefix + "dense_weight_grad" in str(jax.make_jaxpr(nnx.grad(loss))(fast, x))) == (d_out < 128)
        np.testing.assert_allclose(nnx.jit(nnx.grad(loss))(fast, x)["kernel"][...],
                                   reference(lambda: nnx.jit(nnx.grad(loss))(plain, x), "dense", d_in)["kernel"][...],
                                   rtol=1e-4, atol=5e-5)
    x = jax.random.normal(jax.random.key(1), (4, 9, 9, 21)) * 3 + 1
    moments = jax.jit(lambda a, b: cpu_kernels.channel_moments(a, b))
    assert prefix + "channel_moments" in moments.lower(x, x).as_text()
    sums = moments(x, x)
    np.testing.assert_allclose(sums[0], x.sum((0, 1, 2)), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(sums[1], (x * x).sum((0, 1, 2)), rtol=1e-5, atol=1e-3)
    # keys and head sizes of 9, 7, 4, 3, 2 and 1 vectors: AVX2's register blocks of 3 vectors, 2 + 2, 3 + 2 + 2, 1
    for t, dh, causal, padded in [(70, 16, True, False), (50, 32, True, False), (6, 16, False, False),
                                  (17, 16, False, True)]:  # padded: 9 keys of the first
        q, k, v, dy = (jax.random.normal(jax.random.key(i), (2, t, 2, dh)) for i in range(4))
        key_mask = (jnp.arange(t) < jnp.array([9, t])[:, None])[:, None, None] if padded else None
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None] if causal else key_mask
        loss_of = lambda attend: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(attend(*a) * dy), argnums=(0, 1, 2)))(
            q, k, v)
        fused = loss_of(lambda q, k, v: layers.dot_product_attention(q, k, v, key_mask, causal=causal))
        assert prefix + "attention" in str(jax.make_jaxpr(lambda q: layers.dot_product_attention(q, q, q, key_mask))(q))
        want = reference(lambda: loss_of(lambda *a: layers.einsum_attention(*a, mask)), "attention", t, dh, causal)
        for got, expected in zip(jax.tree.leaves(fused), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
    # the selective scan's channels in vectors: 6 (under AVX2's 8, SSE's 4 + 2) and 20 (2.5 and 5 vectors), chunks
    # of 64 tokens and a partial one; values and all six gradients against XLA's lax.scan of the same recurrence
    for batch, length, d, n in [(2, 37, 6, 4), (1, 150, 20, 16)]:
        k = jax.random.split(jax.random.key(d), 2)
        inputs = (*scan_inputs(batch, length, d, n), jax.random.normal(k[0], (batch, d, n)))  # the last: h0
        w = jax.random.normal(k[1], (batch, length, d))
        def scan_grads():  # both outputs in the loss, so both cotangents reach the backward
            loss = lambda *a: jnp.sum(w * jnp.sin(scan_sequential(*a)[0])) + jnp.sum(scan_sequential(*a)[1] ** 2)
            return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))(*inputs)
        def xla_scan_grads():  # the same function with the kernels off: its lax.scan
            cpu_kernels.enable(False)
            try:
                return scan_grads()
            finally:
                cpu_kernels.enable(True)
        backward = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(scan_sequential(*a)[0])))(*inputs)
        assert prefix + "selective_scan_grad" in str(backward)
        want = reference(xla_scan_grads, "scan", d)
        for got, expected in zip(jax.tree.leaves(scan_grads()), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
for prefix in ("sse_", "archlab_"):
    with cpu_kernels.tracing_with(prefix):
        check(prefix)
    print(prefix, "same")
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.stdout.split() == ["sse_", "same", "archlab_", "same"], done.stderr[-2000:]
    assert len(list((tmp_path / "archlab" / "native").glob("cpu_kernels-*.so"))) == 2
