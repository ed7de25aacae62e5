"""GPT: causality, KV-cache sampling, sampling filters, length checks, and the GPT-2 / GPT-Model-X sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra.utils import instantiate

from models.gpt import GPT, generate, sample_logits
from train.config import compose

V, L = 40, 24


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT(vocab_size=V, max_len=L, num_layers=2, d_model=32, num_heads=4, rngs=nnx.Rngs(0))


def test_changing_a_later_token_leaves_earlier_logits_unchanged(model):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, V)
    logits = model(tokens)
    for t in range(11):
        changed = tokens.at[:, t + 1].set((tokens[:, t + 1] + 1) % V)
        new = model(changed)
        np.testing.assert_allclose(new[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        assert not np.allclose(new[:, t + 1:], logits[:, t + 1:], atol=1e-6)


def test_cached_greedy_sampling_equals_uncached_recomputation(model):
    prompt = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
    cached = generate(model, prompt, 12, temperature=0.0)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    # Recompute the whole sequence for every new token; positions after t do not change logits at t (causal).
    tokens = jnp.zeros((3, 17), jnp.int32).at[:, :5].set(prompt)
    for t in range(5, 17):
        tokens = tokens.at[:, t].set(jnp.argmax(forward(state, tokens)[:, t - 1], axis=-1))
    np.testing.assert_array_equal(cached, tokens)
    assert len(np.unique(np.asarray(cached[:, 5:]))) > 1  # not a degenerate constant sequence


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    prompt = jax.random.randint(jax.random.key(1), (3, 5), 0, V)
    first = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    np.testing.assert_array_equal(first, generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7)))
    assert not np.array_equal(first, generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(8)))
    np.testing.assert_array_equal(generate(model, prompt, 8, temperature=0.7, top_k=1, rng=jax.random.key(7)),
                                  generate(model, prompt, 8, temperature=0.0))


def test_top_k_and_top_p_keep_only_their_candidates():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 2000))
    rng = jax.random.key(0)
    assert set(np.unique(sample_logits(logits, rng, top_k=2))) == {0, 1}
    assert set(np.unique(sample_logits(logits, rng, top_p=0.85))) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.9
    assert set(np.unique(sample_logits(logits, rng, top_p=0.5))) == {0}
    assert set(np.unique(sample_logits(logits, rng))) == {0, 1, 2, 3, 4}
    counts = np.bincount(np.asarray(sample_logits(logits, rng, temperature=1.0)), minlength=5) / 2000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.1, 0.06, 0.04], atol=0.04)


def test_sequences_longer_than_max_len_are_one_line_errors(model):
    with pytest.raises(ValueError, match=f"sequence length {L + 1} exceeds max_len {L}"):
        model(jnp.zeros((1, L + 1), jnp.int32))
    with pytest.raises(ValueError, match=f"prompt length 20 \\+ max_new_tokens 5 exceeds max_len {L}"):
        generate(model, jnp.zeros((1, 20), jnp.int32), 5, temperature=0.0)


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def abstract_params(name: str):
    cfg = compose([f"model={name}"])
    model = nnx.eval_shape(lambda: instantiate(cfg.model, _convert_="all", rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def test_gpt2_small_has_124_439_808_parameters():
    assert count(abstract_params("gpt2_small")) == 124_439_808


def test_gpt_model_x_is_6_4b_non_embedding_parameters_one_third_attention():
    params = abstract_params("gpt_model_x")
    d, layers = 4096, 32
    blocks = params["blocks"]
    attention = count([blocks[i]["attn"] for i in range(layers)])
    feed_forward = count([blocks[i]["mlp"] for i in range(layers)])
    embedding = count(params["token_embed"]) + count(params["pos_embed"])
    non_embedding = count(params) - embedding
    assert 6.3e9 < non_embedding < 6.5e9
    assert attention == layers * (4 * d * d + 4 * d)  # q, k, v, out: 4 D^2 weights + biases
    assert feed_forward == layers * (8 * d * d + 5 * d)  # D x 4D and 4D x D: 8 D^2 weights + biases
    assert attention / (attention + feed_forward) == pytest.approx(1 / 3, abs=1e-3)
