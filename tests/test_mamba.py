"""Mamba: the three scans agree, recurrent mode equals parallel mode, causality, the reference's shapes and init."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hydra.utils import instantiate

from models.mamba import SCANS, MambaBlock, MambaLM, generate, scan_sequential, selective_scan, ssm_step
from scripts.interop import flat_state, load_flat
from tests.conftest import run_cli
from train.loop import run
from train.optim import decay_mask
from train.pretrained import match_layout


def scan_inputs(batch=2, length=37, d=6, n=4, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    dt = jax.nn.softplus(jax.random.normal(k[0], (batch, length, d)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[1], (d, n)))
    B, C = (jax.random.normal(kk, (batch, length, n)) for kk in k[2:4])
    x = jax.random.normal(k[4], (batch, length, d))
    return dt, A, B, C, x


def naive_scan(dt, A, B, C, x):
    """The recurrence written out in numpy float64, one step at a time."""
    dt, A, B, C, x = (np.asarray(v, np.float64) for v in (dt, A, B, C, x))
    h = np.zeros((x.shape[0], *A.shape))
    ys = []
    for t in range(x.shape[1]):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
    return np.stack(ys, 1), h


@pytest.mark.parametrize("method", list(SCANS))
def test_scan_matches_the_recurrence(method):
    inputs = scan_inputs()
    y, h = selective_scan(*inputs, method=method, chunk=8)  # 37 is not a multiple of 8: exercises the padding
    y_ref, h_ref = naive_scan(*inputs)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)


def test_scan_gradients_agree():
    inputs = scan_inputs()
    w = jax.random.normal(jax.random.key(9), inputs[-1].shape)  # a loss that weighs every output differently

    def grads(method):
        loss = lambda *a: jnp.sum(w * selective_scan(*a, method=method, chunk=8)[0])
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)

    reference = grads("sequential")
    for method in ("associative", "chunked"):
        for g, g_ref in zip(grads(method), reference):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


def test_initial_state_continues_a_split_sequence():
    dt, A, B, C, x = scan_inputs()
    y_full, h_full = selective_scan(dt, A, B, C, x, method="associative")
    first = [v[:, :20] for v in (dt, B, C, x)]
    rest = [v[:, 20:] for v in (dt, B, C, x)]
    y1, h1 = selective_scan(first[0], A, *first[1:], method="associative")
    y2, h2 = selective_scan(rest[0], A, *rest[1:], method="sequential", h0=h1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h2, h_full, rtol=1e-5, atol=1e-5)


def small_lm(**kwargs):
    return MambaLM(vocab_size=kwargs.pop("vocab_size", 21), d_model=16, num_layers=2, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("selective", [True, False])
def test_recurrent_mode_equals_parallel_mode(selective):
    model = small_lm(selective=selective, scan="associative")
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 21)

    @nnx.jit
    def both_modes(model, tokens):
        cache, steps = jax.lax.scan(lambda c, tok: model.step(tok, c)[::-1], model.init_cache(2), tokens.T)
        return model(tokens), steps.swapaxes(0, 1), cache, model.prefill(tokens)

    parallel, steps, cache, (last, prefilled) = both_modes(model, tokens)
    np.testing.assert_allclose(steps, parallel, rtol=1e-5, atol=1e-5)
    # the parallel pass hands over the same state as 19 recurrent steps
    np.testing.assert_allclose(last, parallel[:, -1], rtol=1e-5, atol=1e-5)
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(cache, prefilled):
        np.testing.assert_allclose(conv_a, conv_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ssm_a, ssm_b, rtol=1e-5, atol=1e-6)


def test_generation_continues_the_greedy_parallel_prediction():
    model = small_lm()
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 21)
    out = nnx.jit(generate, static_argnums=(2, 4))(model, prompt, 6, jax.random.key(0), 0)
    assert out.shape == (2, 6) and out.dtype == jnp.int32
    # Greedy: each new token is the argmax of the parallel model's logits at the position before it.
    logits = model(jnp.concatenate([prompt, out[:, :-1]], 1))  # (2, 10, V)
    np.testing.assert_array_equal(out, jnp.argmax(logits[:, 4:], -1))


def test_scanned_layers_generate_and_remat_like_the_loop():
    loop, scanned = small_lm(), nnx.eval_shape(lambda: small_lm(scan_layers=True, remat="full"))  # weights: the loop's
    load_flat(scanned, match_layout(flat_state(loop), {k: v.shape for k, v in flat_state(scanned).items()}))
    assert jax.tree.map(jnp.shape, scanned.init_cache(3)) == ((2, 3, 3, 32), (2, 3, 32, 16))  # (L, B, ...)
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 21)
    sample = nnx.jit(generate, static_argnums=(2, 4))
    np.testing.assert_array_equal(sample(scanned, prompt, 6, jax.random.key(0), 0),
                                  sample(loop, prompt, 6, jax.random.key(0), 0))
    loss = lambda model: jnp.sum(jnp.cos(model(prompt)))
    grad = nnx.jit(nnx.grad(loss))
    grads_loop = flat_state(grad(loop))
    grads_scan = match_layout(flat_state(grad(scanned)), {k: v.shape for k, v in grads_loop.items()})
    assert grads_scan.keys() == grads_loop.keys()
    for key, g in grads_loop.items():
        np.testing.assert_allclose(grads_scan[key], g, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("scan", list(SCANS))
def test_outputs_are_causal(scan):
    block = MambaBlock(8, scan=scan, chunk_size=4, rngs=nnx.Rngs(0))
    u = jax.random.normal(jax.random.key(3), (1, 10, 8))
    jac = nnx.jit(lambda b, v: jax.jacrev(lambda w: b(w)[0, :, 0])(v))(block, u)[:, 0]  # d out_t / d u_s: (T, T, D)
    influence = jnp.abs(jac).sum(-1)
    assert jnp.all(jnp.triu(influence, k=1) == 0)  # no output sees a later input
    assert jnp.all(jnp.diag(influence) > 0)


def test_non_selective_parameters_do_not_depend_on_the_input():
    block = MambaBlock(8, selective=False, rngs=nnx.Rngs(0))
    dt1, _, B1, C1 = block._ssm_inputs(jax.random.normal(jax.random.key(4), (2, 5, 16)))
    dt2, _, B2, C2 = block._ssm_inputs(jax.random.normal(jax.random.key(5), (2, 5, 16)))
    for a, b in ((dt1, dt2), (B1, B2), (C1, C2)):
        np.testing.assert_array_equal(a, b)
    selective = MambaBlock(8, rngs=nnx.Rngs(0))
    dt_plus, dt_minus = (selective._ssm_inputs(v * jnp.ones((1, 1, 16)))[0] for v in (1.0, -1.0))
    assert not jnp.allclose(dt_plus, dt_minus)


def test_reference_initialisation():
    block = MambaBlock(64, rngs=nnx.Rngs(0))  # d_inner 128, dt_rank 4
    assert block.dt_rank == 4
    s4d_real = jnp.broadcast_to(jnp.arange(1.0, 17.0), (128, 16))  # A = -(1..N) in every channel
    np.testing.assert_allclose(-jnp.exp(block.A_log[...]), -s4d_real, rtol=1e-6)
    np.testing.assert_array_equal(block.D[...], jnp.ones(128))
    dt = jax.nn.softplus(block.dt_proj.bias[...])  # softplus(bias) is the initial dt: log-uniform in [1e-3, 1e-1]
    assert 1e-3 <= float(dt.min()) and float(dt.max()) <= 1e-1 + 1e-6
    assert float(jnp.abs(block.dt_proj.kernel[...]).max()) <= 4**-0.5
    assert block.in_proj.bias is None and block.x_proj.bias is None and block.out_proj.bias is None


def test_mamba_130m_parameter_count():
    model = nnx.eval_shape(lambda: MambaLM(vocab_size=50277, d_model=768, num_layers=24, rngs=nnx.Rngs(0)))
    assert sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))) == 129_135_360
    assert model.embed.embedding.shape == (50280, 768)  # padded to a multiple of 8, tied with the output


def test_logits_cover_the_unpadded_vocabulary():
    assert small_lm(vocab_size=21)(jnp.zeros((1, 3), jnp.int32)).shape == (1, 3, 21)


def test_a_log_and_d_are_not_decayed():
    model = small_lm()
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1.0, weight_decay=0.5, mask=decay_mask)  # zero gradients: only decay moves a parameter
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    mixer = updates["layers"][0]["mixer"]
    assert jnp.all(mixer["A_log"][...] == 0) and jnp.all(mixer["D"][...] == 0)
    assert jnp.any(mixer["in_proj"]["kernel"][...] != 0)  # weight matrices are decayed


def test_partition_metadata():
    block = MambaBlock(8, rngs=nnx.Rngs(0))
    assert block.in_proj.kernel.get_metadata()["out_sharding"] == ("embed", "mlp")
    assert block.out_proj.kernel.get_metadata()["out_sharding"] == ("mlp", "embed")
    assert small_lm().embed.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")


def test_bad_scan_name_fails_in_the_constructor():
    with pytest.raises(ValueError, match="unknown scan 'fast'.*associative, sequential, chunked"):
        MambaBlock(8, scan="fast", rngs=nnx.Rngs(0))


def test_short_selective_copying_run_learns(cfg_for, tmp_path):
    cfg = cfg_for("model=mamba", "data=selective_copy", "data.length=16", "data.num_tokens=2", "data.vocab_size=6",
                  "data.seq_len=19", "model.d_model=32", "model.num_layers=2", "optim.lr=1e-2", "optim.warmup_steps=20",
                  "trainer.steps=300", "trainer.batch_size=32", "trainer.eval_every=300", "checkpoint.every=300")
    final = run(cfg, tmp_path)
    assert final["eval/loss"] < 0.4 * np.log(4)  # chance: 4 data tokens
    assert final["eval/accuracy"] > 0.6


@pytest.mark.parametrize("name", ["selective_copy_s6", "selective_copy_s4", "selective_copy_paper",
                                  "induction_heads_mamba", "induction_heads_gpt"])
def test_experiment_presets_compose_and_their_data_builds(cfg_for, name):
    cfg = cfg_for(f"+experiment={name}")
    data = instantiate(cfg.data, _convert_="all")
    assert data.task == "next_token" and cfg.model.num_layers == 2 and cfg.model.d_model == 64
    if name.startswith("selective_copy"):
        assert cfg.model.selective == (name != "selective_copy_s4")


@pytest.mark.parametrize("batch, length, d, n", [
    (2, 37, 6, 4),      # fewer channels than a vector, any state size
    (1, 150, 40, 16),   # 16 states (the kernel's registers), chunks of 64 and a partial one, one row split by channels
])
def test_sequential_scan_backward_matches_autodiff_of_the_recurrence(kernels, batch, length, d, n):
    """The hand-written backward pass (models/sequential_scan.py, and the kernel's) against autodiff of `ssm_step`
    in a lax.scan, with an initial state and both outputs' cotangents."""
    dt, A, B, C, x = scan_inputs(batch, length, d, n)
    h0 = jax.random.normal(jax.random.key(11), (x.shape[0], *A.shape))
    w = jax.random.normal(jax.random.key(9), x.shape)

    def autodiff_scan(dt, A, B, C, x, h0):
        step = lambda h, v: ssm_step(h, v[0], A, *v[1:])
        h, y = jax.lax.scan(step, h0, [jnp.swapaxes(v, 0, 1) for v in (dt, B, C, x)])
        return jnp.swapaxes(y, 0, 1), h

    def grads(scan):  # a loss on both outputs, so both cotangents reach the backward pass
        loss = lambda *a: jnp.sum(w * jnp.sin(scan(*a)[0])) + jnp.sum(scan(*a)[1] ** 2)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(dt, A, B, C, x, h0)

    for name, got, want in zip(["dt", "A", "B", "C", "x", "h0"], grads(scan_sequential), grads(autodiff_scan)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)  # fp32 sums


def test_the_sequential_scan_runs_as_the_cpu_kernel_on_one_cpu_device(kernels):
    """fp32 on one CPU device: the forward and backward are archlab's two kernel calls, their FLOPs counted as XLA
    counts the lax.scan's forward; without the kernels, lax.scan."""
    from train.flops import compiled_flops

    inputs = scan_inputs(2, 70, 20, 16)
    loss = lambda *a: jnp.sum(scan_sequential(*a)[0] ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs))
    native = kernels == "native"
    assert ("archlab_selective_scan" in text and "archlab_selective_scan_grad" in text) == native
    assert ("scan[" in text) != native
    elements = 2 * 70 * 20 * 16
    assert compiled_flops(lambda *a: scan_sequential(*a)[0], *inputs) == pytest.approx(6 * elements, rel=0.05)


def test_scaling_script_fits_linear_memory_for_both_layers(tmp_path):
    """scripts/scaling.py (the chapter's O(N) claim): rows for each layer and length, a plot, and XLA's own memory
    account growing linearly with L for Mamba (chunk states) and for attention (the fused kernel holds no T x S)."""
    run_cli(["--lengths", "256", "512", "1024", "--repeats", "1", "--fit-from", "256", "--out", str(tmp_path)],
            module="scripts/scaling.py")
    result = json.loads((tmp_path / "scaling.json").read_text())
    assert sorted((r["layer"], r["length"]) for r in result["rows"]) == [
        (layer, length) for layer in ("attention", "mamba") for length in (256, 512, 1024)]
    for layer in ("mamba", "attention"):
        assert 0.85 <= result["slopes"][layer]["memory"] <= 1.1
        assert math.isfinite(result["slopes"][layer]["time"])  # its sign is a timing, at one repeat: never checked
    assert all(r["seconds"] > 0 for r in result["rows"])
    assert (tmp_path / "scaling.png").stat().st_size > 0
