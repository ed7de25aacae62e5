"""Transformer encoder-decoder: causality, padding masks, cached greedy decoding, beam search, options; its decoder
stack alone as a language model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.gpt import GPT
from models.transformer import (BOS, EOS, Transformer, TransformerLM, beam_search, greedy_decode,
                                sinusoidal_positions)
from scripts.interop import flat_state, load_flat
from train.pretrained import match_layout

V, S, T = 24, 10, 9
VARIANTS = [dict(norm="pre", positions="sinusoidal", share_embeddings=True),
            dict(norm="post", positions="learned", share_embeddings=False)]


def make(**options) -> Transformer:
    model = Transformer(vocab_size=V, src_len=S, tgt_len=T, num_layers=2, d_model=32, num_heads=4, d_ff=64,
                        rngs=nnx.Rngs(0), **options)
    # Random weights of a larger scale than the initialisation: an untrained model would repeat one token,
    # which would make the decoding comparisons below trivially true.
    graphdef, params = nnx.split(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [x + 0.5 * jax.random.normal(k, x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else x
              for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


def jitted(model: Transformer):
    """model(src, tgt) compiled once per shape (eager op-by-op calls are slow on CPU)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, src, tgt: nnx.merge(graphdef, state)(src, tgt))
    return lambda src, tgt: forward(state, src, tgt)


def batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    src = rng.integers(3, V, (4, S))
    src[:, 7:] = 0  # padding
    src[0, 4:] = 0
    tgt = rng.integers(3, V, (4, T))
    tgt[:, 0] = BOS
    return jnp.asarray(src, jnp.int32), jnp.asarray(tgt, jnp.int32)


@pytest.fixture(scope="module", params=range(len(VARIANTS)), ids=["pre-sinusoidal-shared", "post-learned-separate"])
def model(request) -> Transformer:
    return make(**VARIANTS[request.param])


def test_decoder_is_causal(model):
    src, tgt = batch()
    forward = jitted(model)
    logits = forward(src, tgt)
    assert logits.shape == (4, T, V)
    for t in range(T - 1):
        changed = tgt.at[:, t + 1].set((tgt[:, t + 1] + 1) % V)
        np.testing.assert_allclose(forward(src, changed)[:, :t + 1], logits[:, :t + 1], atol=1e-6)


def test_encoder_padding_is_masked(model):
    src, tgt = batch()
    logits = model(src, tgt)
    np.testing.assert_allclose(model(src[:, :7], tgt), logits, atol=1e-5)  # trailing padding columns dropped
    shorter = src.at[:, 6].set(0)  # one more padded source token does change the output
    assert not np.allclose(model(shorter, tgt), logits, atol=1e-3)


def uncached_greedy(model: Transformer, src: jax.Array) -> np.ndarray:
    """Re-runs the full teacher-forced model for each new token; stops each row at EOS or padding."""
    forward = jitted(model)
    tgt = jnp.zeros((src.shape[0], T), jnp.int32).at[:, 0].set(BOS)
    out = np.zeros((src.shape[0], T), np.int32)
    done = np.zeros(src.shape[0], bool)
    for t in range(T):
        token = np.asarray(jnp.argmax(forward(src, tgt)[:, t], axis=-1))
        token = np.where(done, 0, token)
        out[:, t] = token
        done |= (token == EOS) | (token == 0)
        if t + 1 < T:
            tgt = tgt.at[:, t + 1].set(token)
    return out


def test_cached_greedy_decoding_equals_uncached_recomputation(model):
    src, _ = batch(1)
    decoded = np.asarray(greedy_decode(model, src))
    np.testing.assert_array_equal(decoded, uncached_greedy(model, src))
    assert len(np.unique(decoded)) > 2


def test_beam_size_1_equals_greedy(model):
    src, _ = batch(2)
    np.testing.assert_array_equal(beam_search(model, src, 1), greedy_decode(model, src))


def test_beam_search_scores_at_least_greedy():
    model = make(**VARIANTS[0])
    src, _ = batch(3)

    def log_prob(tokens: np.ndarray) -> np.ndarray:
        tgt_in = jnp.concatenate([jnp.full((len(tokens), 1), BOS, jnp.int32), tokens[:, :-1]], axis=1)
        logp = jax.nn.log_softmax(model(src, tgt_in), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], axis=-1)[..., 0]
        alive = np.cumsum(np.isin(tokens, (EOS, 0)), axis=1) - np.isin(tokens, (EOS, 0)) == 0  # up to EOS
        return np.sum(np.where(alive, picked, 0.0), axis=1)

    greedy, beam = np.asarray(greedy_decode(model, src)), np.asarray(beam_search(model, src, 4))
    assert (log_prob(beam) >= log_prob(greedy) - 1e-4).all()


def test_scanned_layers_decode_as_the_loop():
    loop, scanned = make(), make(scan_layers=True)
    load_flat(scanned, match_layout(flat_state(loop), {k: v.shape for k, v in flat_state(scanned).items()}))
    src, _ = batch(4)
    greedy = np.asarray(greedy_decode(loop, src))
    assert len(np.unique(greedy)) > 2
    np.testing.assert_array_equal(greedy_decode(scanned, src), greedy)
    np.testing.assert_array_equal(beam_search(scanned, src, 3), beam_search(loop, src, 3))


def test_sinusoidal_positions_follow_the_paper():
    table = sinusoidal_positions(50, 16)
    np.testing.assert_allclose(table[7, 4], np.sin(7 / 10000 ** (4 / 16)), rtol=1e-6)
    np.testing.assert_allclose(table[7, 5], np.cos(7 / 10000 ** (4 / 16)), rtol=1e-6)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="norm 'middle' is not known \\(valid: pre, post\\)"):
        make(norm="middle")
    with pytest.raises(ValueError, match="positions 'rotary' is not known"):
        make(positions="rotary")
    with pytest.raises(ValueError, match=f"source length {S + 1} exceeds src_len {S}"):
        make()(jnp.ones((1, S + 1), jnp.int32), jnp.ones((1, 2), jnp.int32))


def test_decoder_stack_language_model_is_causal_and_gpt_sized_without_positions():
    lm = TransformerLM(vocab_size=V, num_layers=2, d_model=32, num_heads=4, d_ff=128, rngs=nnx.Rngs(0))
    gpt = GPT(vocab_size=V, max_len=T, num_layers=2, d_model=32, num_heads=4, rngs=nnx.Rngs(0))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(lm) == count(gpt) - T * 32  # GPT's learned positions; every other parameter alike
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, T)), jnp.int32)
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % V)
    a, b = lm(tokens), lm(changed)
    assert a.shape == (2, T, V)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])  # position t sees tokens 0..t only
    assert not np.allclose(a[:, 5:], b[:, 5:])
