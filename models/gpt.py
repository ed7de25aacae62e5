"""GPT: a decoder-only Transformer language model (Radford et al. 2018/2019), with KV-cache sampling.

Pre-norm blocks x + attn(ln(x)), x + mlp(ln(x)), learned positions, a GELU MLP of 4x width (tanh
approximation, GPT-2's gelu_new), LayerNorm epsilon 1e-5 and (optionally) the output projection tied to the token
embedding, as GPT-2.
"""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import (FeedForward, KVCache, MultiHeadAttention, check_remat, cpu_dot, layer_stack, num_stacked,
                           run_stack)

_embed_init = nnx.initializers.normal(stddev=0.02)  # GPT-2's embedding initialisation


class Block(nnx.Module):
    """One pre-norm decoder block: causal self-attention and a feed-forward layer, each with a residual."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, dropout: float = 0.0, norm_eps: float = 1e-5,
                 dtype: str = "float32", rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = FeedForward(d_model, d_ff, activation="gelu", dropout=dropout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """(B, T, D) -> (B, T, D), and the advanced cache when one is given."""
        if cache is None:
            x = x + self.attn(self.ln1(x), causal=True)
        else:
            h, cache = self.attn(self.ln1(x), cache=cache)
            x = x + h
        return x + self.mlp(self.ln2(x)), cache


class GPT(nnx.Module):
    """Decoder-only language model: int32 tokens (B, T) -> logits (B, T, vocab_size).

    `scan_layers` stacks the blocks' parameters along a layer axis and runs them as one scan: one block is
    compiled whatever the depth. `remat` recomputes each block in the backward pass (models.layers.REMAT_POLICIES).
    """

    tasks = ("next_token",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, d_model: int, num_heads: int,
                 d_ff: int | None = None, dropout: float = 0.0, tie_embeddings: bool = True,
                 norm_eps: float = 1e-5, remat: str = "none", scan_layers: bool = False, dtype: str = "float32",
                 rngs: nnx.Rngs):
        check_remat("GPT", remat)
        self.max_len, self.remat, self.scan_layers = max_len, remat, scan_layers
        self.token_embed = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs,
                                     embedding_init=nnx.with_partitioning(_embed_init, ("vocab", "embed")))
        self.pos_embed = nnx.Embed(max_len, d_model, dtype=dtype, rngs=rngs,
                                   embedding_init=nnx.with_partitioning(_embed_init, (None, "embed")))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = layer_stack(lambda r: Block(d_model, num_heads, d_ff or 4 * d_model, dropout=dropout,
                                                  norm_eps=norm_eps, dtype=dtype, rngs=r), num_layers, rngs,
                                  scan=scan_layers)
        self.ln_f = nnx.LayerNorm(d_model, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.unembed = None if tie_embeddings else nnx.Linear(
            d_model, vocab_size, use_bias=False, dtype=dtype, dot_general=cpu_dot, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")))

    def init_cache(self, batch_size: int, max_len: int) -> list[KVCache] | KVCache:
        """Empty key/value caches of `max_len` positions: one per layer, or one stacked along the layer axis."""
        if self.scan_layers:
            cache = self.blocks.attn.init_cache(batch_size, max_len)
            return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_stacked(self.blocks), *a.shape)), cache)
        return [block.attn.init_cache(batch_size, max_len) for block in self.blocks]

    def __call__(self, tokens: jax.Array, caches: list[KVCache] | KVCache | None = None
                 ) -> jax.Array | tuple[jax.Array, list[KVCache] | KVCache]:
        """Logits (B, T, V); with `caches`, the tokens continue the cached ones and the new caches are returned."""
        first = caches if caches is None or self.scan_layers else caches[0]
        start = 0 if caches is None else jnp.ravel(first.index)[0]
        length = tokens.shape[1] if caches is None else first.k.shape[-3]
        if length > self.max_len:
            raise ValueError(f"GPT: sequence length {length} exceeds max_len {self.max_len} "
                             f"(valid: at most {self.max_len} positions)")
        positions = start + jnp.arange(tokens.shape[1])
        x = self.dropout(self.token_embed(tokens) + self.pos_embed(positions))  # (B, T) -> (B, T, D)
        if caches is None:
            x = run_stack(self.blocks, x, scan=self.scan_layers, remat=self.remat, call=lambda b, h: b(h)[0])
        elif self.scan_layers:  # decoding, maybe inside generate's own lax.scan: a plain scan over the state
            graphdef, state = nnx.split(self.blocks)
            x, caches = jax.lax.scan(lambda h, xs: nnx.merge(graphdef, xs[0])(h, xs[1]), x, (state, caches))
        else:
            caches = list(caches)
            for i, block in enumerate(self.blocks):
                x, caches[i] = block(x, caches[i])
        x = self.ln_f(x)
        logits = self.token_embed.attend(x) if self.unembed is None else self.unembed(x)  # (B, T, D) -> (B, T, V)
        return logits if caches is None else (logits, caches)


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
    """Next tokens (B,) from logits (B, V): argmax when temperature is 0, else sampled from the top-k / top-p set."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    masked = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit
        logits = jnp.where(logits < kth, masked, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (B, V), descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p. That
        # mass is the exclusive cumulative sum: cumsum - probs rounds (a + b) - b, off p0 by an ulp on jax 0.11.
        cumulative = jnp.cumsum(probs, axis=-1)
        keep = jnp.concatenate([jnp.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=-1) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)  # (B, 1)
        logits = jnp.where(logits < cutoff, masked, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, rng: jax.Array, *, max_new_tokens: int,
              temperature: float, top_k: int | None, top_p: float | None) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # on this traced copy only: the caller's model keeps its mode
    batch_size, prompt_len = prompt.shape
    caches = model.init_cache(batch_size, prompt_len + max_new_tokens)
    logits, caches = model(prompt, caches)  # prefill the whole prompt in one call
    rngs = jax.random.split(rng, max_new_tokens)
    token = sample_logits(logits[:, -1], rngs[0], temperature, top_k, top_p)

    def step(carry, rng):
        token, caches = carry
        logits, caches = model(token[:, None], caches)  # (B, 1) -> (B, 1, V)
        next_token = sample_logits(logits[:, -1], rng, temperature, top_k, top_p)
        return (next_token, caches), token

    (last, _), tokens = jax.lax.scan(step, (token, caches), rngs[1:])  # tokens: (N - 1, B)
    return jnp.concatenate([prompt, tokens.T, last[:, None]], axis=1)


def generate(model: GPT, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, rng: jax.Array | None = None) -> jax.Array:
    """Prompt (B, P) -> (B, P + max_new_tokens) tokens, sampled with a fixed-size KV cache under one jit.

    temperature 0 is greedy decoding; otherwise `rng` is required and top_k / top_p restrict the candidates.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.shape[1] + max_new_tokens > model.max_len:
        raise ValueError(f"generate: prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_len {model.max_len} (valid: max_new_tokens <= {model.max_len - prompt.shape[1]})")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens {max_new_tokens} must be at least 1")
    if temperature != 0.0 and rng is None:
        raise ValueError(f"generate: sampling at temperature {temperature} needs an rng (or temperature=0 for greedy)")
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    return _generate(graphdef, state, prompt, rng, max_new_tokens=max_new_tokens, temperature=float(temperature),
                     top_k=top_k, top_p=top_p)
