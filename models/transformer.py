"""Transformer encoder-decoder (Vaswani et al. 2017, "Attention Is All You Need"), with cached decoding.

Encoder blocks: self-attention + feed-forward; decoder blocks: causal self-attention + cross-attention to the
encoder's output + feed-forward; each sublayer has a residual and a LayerNorm, before it ("pre", default) or
after the residual sum ("post", as the paper). Token id 0 is padding: the encoder masks padded keys.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.layers import (FeedForward, KVCache, MultiHeadAttention, check_remat, cpu_dot, layer_stack, num_stacked,
                           run_stack)

PAD, BOS, EOS = 0, 1, 2


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...) (section 3.5), float32 (length, d)."""
    angles = np.arange(length)[:, None] / 10000.0 ** (np.arange(0, d_model, 2) / d_model)  # (L, d/2)
    table = np.zeros((length, d_model), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles[:, : d_model // 2])
    return table


def padding_mask(tokens: jax.Array) -> jax.Array:
    """Key mask (B, 1, 1, S) that is False at padded positions (id 0)."""
    return (tokens != PAD)[:, None, None, :]


def residual(pre: bool, norm: nnx.LayerNorm, x: jax.Array, sublayer) -> jax.Array:
    """x + sublayer(norm(x)) (pre-norm) or norm(x + sublayer(x)) (post-norm, as the paper)."""
    return x + sublayer(norm(x)) if pre else norm(x + sublayer(x))


class EncoderBlock(nnx.Module):
    """Self-attention over the source (padded keys masked), then a feed-forward layer."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, norm: str = "pre", dropout: float = 0.0,
                 activation: str = "relu", dtype: str = "float32", rngs: nnx.Rngs):
        self.pre = norm == "pre"
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
        self.mlp = FeedForward(d_model, d_ff, activation=activation, dropout=dropout, dtype=dtype, rngs=rngs)
        self.norm1, self.norm2 = (nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) for _ in range(2))

    def __call__(self, x: jax.Array, src_mask: jax.Array) -> jax.Array:
        """(B, S, D) -> (B, S, D)."""
        x = residual(self.pre, self.norm1, x, lambda h: self.self_attn(h, mask=src_mask))
        return residual(self.pre, self.norm2, x, self.mlp)


class DecoderBlock(nnx.Module):
    """Causal self-attention, cross-attention to the encoder memory, then a feed-forward layer.

    `cross_attention=False` leaves the cross-attention out (a decoder with no encoder: `TransformerLM`)."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, norm: str = "pre", dropout: float = 0.0,
                 activation: str = "relu", cross_attention: bool = True, dtype: str = "float32", rngs: nnx.Rngs):
        self.pre = norm == "pre"
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
        self.cross_attn = (MultiHeadAttention(d_model, num_heads, dropout=dropout, dtype=dtype, rngs=rngs)
                           if cross_attention else None)
        self.mlp = FeedForward(d_model, d_ff, activation=activation, dropout=dropout, dtype=dtype, rngs=rngs)
        self.norm1, self.norm3 = (nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) for _ in range(2))
        self.norm2 = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if cross_attention else None

    def __call__(self, y: jax.Array, memory: jax.Array | KVCache | None, src_mask: jax.Array | None,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """(B, T, D) -> (B, T, D); `memory` is the encoder output (B, S, D) or its projected keys/values."""
        h = self.norm1(y) if self.pre else y
        if cache is None:
            h = self.self_attn(h, causal=True)
        else:
            h, cache = self.self_attn(h, cache=cache)
        y = y + h if self.pre else self.norm1(y + h)
        if self.cross_attn is not None:
            y = residual(self.pre, self.norm2, y, lambda h: self.cross_attn(h, memory, mask=src_mask))
        return residual(self.pre, self.norm3, y, self.mlp), cache


class Transformer(nnx.Module):
    """Encoder-decoder: src (B, S), tgt_in (B, T) int32 with pad 0 -> logits (B, T, vocab_size).

    `scan_layers` stacks the encoder's and the decoder's blocks along a layer axis and runs each stack as one
    scan: one encoder and one decoder block are compiled whatever the depth. `remat` recomputes each block in the
    backward pass (models.layers.REMAT_POLICIES).
    """

    tasks = ("seq2seq",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(self, *, vocab_size: int, src_len: int, tgt_len: int, num_layers: int, d_model: int,
                 num_heads: int, d_ff: int, num_decoder_layers: int | None = None, dropout: float = 0.0,
                 activation: str = "relu", share_embeddings: bool = True, positions: str = "sinusoidal",
                 norm: str = "pre", remat: str = "none", scan_layers: bool = False, dtype: str = "float32",
                 rngs: nnx.Rngs):
        check_remat("Transformer", remat)
        if positions not in ("sinusoidal", "learned"):
            raise ValueError(f"Transformer: positions {positions!r} is not known (valid: sinusoidal, learned)")
        if norm not in ("pre", "post"):
            raise ValueError(f"Transformer: norm {norm!r} is not known (valid: pre, post)")
        self.src_len, self.tgt_len, self.d_model, self.positions = src_len, tgt_len, d_model, positions
        self.remat, self.scan_layers = remat, scan_layers
        # Embeddings ~ N(0, 1/d), scaled by sqrt(d) on input (section 3.4): unit-variance inputs, and tied
        # output logits of unit scale.
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=d_model ** -0.5), ("vocab", "embed"))

        def embed(n: int) -> nnx.Embed:
            return nnx.Embed(n, d_model, dtype=dtype, embedding_init=init, rngs=rngs)

        self.src_embed = embed(vocab_size)
        self.tgt_embed = None if share_embeddings else embed(vocab_size)
        self.unembed = None if share_embeddings else nnx.Linear(
            d_model, vocab_size, use_bias=False, dtype=dtype, dot_general=cpu_dot, rngs=rngs,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")))
        if positions == "learned":
            pos_init = nnx.with_partitioning(nnx.initializers.normal(stddev=0.02), (None, "embed"))
            self.src_pos_embed = nnx.Embed(src_len, d_model, dtype=dtype, embedding_init=pos_init, rngs=rngs)
            self.tgt_pos_embed = nnx.Embed(tgt_len, d_model, dtype=dtype, embedding_init=pos_init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        block_args = dict(norm=norm, dropout=dropout, activation=activation, dtype=dtype)
        self.encoder = layer_stack(lambda r: EncoderBlock(d_model, num_heads, d_ff, **block_args, rngs=r),
                                   num_layers, rngs, scan=scan_layers)
        self.decoder = layer_stack(lambda r: DecoderBlock(d_model, num_heads, d_ff, **block_args, rngs=r),
                                   num_decoder_layers or num_layers, rngs, scan=scan_layers)
        # Pre-norm leaves the residual stream unnormalised: one final LayerNorm per stack.
        self.norm_enc = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if norm == "pre" else None
        self.norm_dec = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if norm == "pre" else None

    def _embed(self, tokens: jax.Array, start: jax.Array | int, source: bool) -> jax.Array:
        """Scaled token embedding + positions start..start+T-1: (B, T) -> (B, T, D)."""
        table = self.src_embed if source or self.tgt_embed is None else self.tgt_embed
        positions = start + jnp.arange(tokens.shape[1])
        if self.positions == "learned":
            pos = (self.src_pos_embed if source else self.tgt_pos_embed)(positions)
        else:
            pos = jnp.asarray(sinusoidal_positions(self.src_len if source else self.tgt_len, self.d_model))[positions]
        return self.dropout(table(tokens) * jnp.sqrt(self.d_model).astype(table.dtype) + pos.astype(table.dtype))

    def encode(self, src: jax.Array) -> jax.Array:
        """Encoder memory (B, S, D) of source tokens (B, S)."""
        if src.shape[1] > self.src_len:
            raise ValueError(f"Transformer: source length {src.shape[1]} exceeds src_len {self.src_len}")
        x, mask = self._embed(src, 0, source=True), padding_mask(src)
        x = run_stack(self.encoder, x, scan=self.scan_layers, remat=self.remat, call=lambda block, h: block(h, mask))
        return x if self.norm_enc is None else self.norm_enc(x)

    def decode(self, tgt_in: jax.Array, memory: jax.Array | list[KVCache] | KVCache, src: jax.Array,
               caches: list[KVCache] | KVCache | None = None) -> jax.Array | tuple[jax.Array, list[KVCache] | KVCache]:
        """Logits (B, T, V) for decoder inputs (B, T) given the encoder memory (or its per-layer keys/values).

        With self-attention `caches` the inputs continue the cached positions and the new caches are returned.
        Under `scan_layers` per-layer keys/values and caches are one KVCache stacked along a leading layer axis.
        """
        first = caches if caches is None or self.scan_layers else caches[0]
        length = tgt_in.shape[1] if caches is None else first.k.shape[-3]
        if length > self.tgt_len:
            raise ValueError(f"Transformer: target length {length} exceeds tgt_len {self.tgt_len}")
        y = self._embed(tgt_in, 0 if caches is None else jnp.ravel(first.index)[0], source=False)
        mask = padding_mask(src)
        if caches is None and not isinstance(memory, (list, KVCache)):  # teacher forcing
            y = run_stack(self.decoder, y, scan=self.scan_layers, remat=self.remat,
                          call=lambda block, h: block(h, memory, mask)[0])
        elif self.scan_layers:  # decoding, maybe inside the token loop's lax.scan: a plain scan over the state
            graphdef, state = nnx.split(self.decoder)
            per_layer = memory if isinstance(memory, KVCache) else None  # projected keys/values, one row per layer

            def layer(h, xs):
                state, layer_memory, cache = xs
                return nnx.merge(graphdef, state)(h, memory if layer_memory is None else layer_memory, mask, cache)

            y, caches = jax.lax.scan(layer, y, (state, per_layer, caches))
        else:
            new_caches = []
            for i, block in enumerate(self.decoder):
                layer_memory = memory[i] if isinstance(memory, list) else memory
                y, cache = block(y, layer_memory, mask, None if caches is None else caches[i])
                new_caches.append(cache)
            caches = None if caches is None else new_caches
        y = y if self.norm_dec is None else self.norm_dec(y)
        logits = self.src_embed.attend(y) if self.unembed is None else self.unembed(y)  # (B, T, D) -> (B, T, V)
        return logits if caches is None else (logits, caches)

    def __call__(self, src: jax.Array, tgt_in: jax.Array) -> jax.Array:
        """Teacher-forced logits (B, T, V)."""
        return self.decode(tgt_in, self.encode(src), src)

    def init_decoding(self, src: jax.Array) -> tuple[list[KVCache] | KVCache, list[KVCache] | KVCache]:
        """Encoder memory projected once per decoder layer, and empty self-attention caches of tgt_len
        (under `scan_layers`, each one KVCache stacked along the layer axis)."""
        memory = self.encode(src)
        if self.scan_layers:
            graphdef, state = nnx.split(self.decoder)
            cross = jax.vmap(lambda s: nnx.merge(graphdef, s).cross_attn.project_context(memory))(state)
            cache = self.decoder.self_attn.init_cache(src.shape[0], self.tgt_len)
            return cross, jax.tree.map(lambda a: jnp.broadcast_to(a, (num_stacked(self.decoder), *a.shape)), cache)
        cross = [block.cross_attn.project_context(memory) for block in self.decoder]
        caches = [block.self_attn.init_cache(src.shape[0], self.tgt_len) for block in self.decoder]
        return cross, caches


class TransformerLM(nnx.Module):
    """The Transformer's decoder stack alone as a language model: int32 tokens (B, T) -> logits (B, T, vocab_size).

    The decoder blocks above without cross-attention (there is no encoder), with the paper's sinusoidal positions,
    sqrt(d)-scaled tied embeddings and ReLU feed-forward. GPT is the same stack as Radford et al. took it, with
    learned positions and GELU; the shoot-out's language arena trains both.
    """

    tasks = ("next_token",)  # the data tasks it reads (train/datafit.py checks the pair)

    def __init__(self, *, vocab_size: int, num_layers: int, d_model: int, num_heads: int, d_ff: int,
                 dropout: float = 0.0, activation: str = "relu", norm: str = "pre", remat: str = "none",
                 scan_layers: bool = False, dtype: str = "float32", rngs: nnx.Rngs):
        check_remat("TransformerLM", remat)
        if norm not in ("pre", "post"):
            raise ValueError(f"TransformerLM: norm {norm!r} is not known (valid: pre, post)")
        self.d_model, self.remat, self.scan_layers = d_model, remat, scan_layers
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=d_model ** -0.5), ("vocab", "embed"))
        self.embed = nnx.Embed(vocab_size, d_model, dtype=dtype, embedding_init=init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = layer_stack(
            lambda r: DecoderBlock(d_model, num_heads, d_ff, norm=norm, dropout=dropout, activation=activation,
                                   cross_attention=False, dtype=dtype, rngs=r), num_layers, rngs, scan=scan_layers)
        self.norm = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs) if norm == "pre" else None

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits (B, T, V) of every next token (causal: position t sees tokens 0..t)."""
        pos = jnp.asarray(sinusoidal_positions(tokens.shape[1], self.d_model))
        x = self.embed(tokens) * jnp.sqrt(self.d_model).astype(self.embed.dtype)  # (B, T) -> (B, T, D)
        x = self.dropout(x + pos.astype(x.dtype))
        x = run_stack(self.blocks, x, scan=self.scan_layers, remat=self.remat, call=lambda b, h: b(h, None, None)[0])
        return self.embed.attend(x if self.norm is None else self.norm(x))


@partial(jax.jit, static_argnames="graphdef")
def _greedy(graphdef: nnx.GraphDef, state: nnx.State, src: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # on this traced copy only: the caller's model keeps its mode
    cross, caches = model.init_decoding(src)

    def step(carry, _):
        token, done, caches = carry
        logits, caches = model.decode(token[:, None], cross, src, caches)  # (B, 1) -> (B, 1, V)
        next_token = jnp.where(done, PAD, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32))
        return (next_token, done | (next_token == EOS) | (next_token == PAD), caches), next_token

    start = jnp.full((src.shape[0],), BOS, jnp.int32)
    _, tokens = jax.lax.scan(step, (start, jnp.zeros_like(start, bool), caches), None, length=model.tgt_len)
    return tokens.T  # (T, B) -> (B, T)


def greedy_decode(model: Transformer, src: jax.Array) -> jax.Array:
    """Greedy translation (B, tgt_len) of src (B, S): the tokens after BOS, up to EOS, then padding."""
    graphdef, state = nnx.split(model)
    return _greedy(graphdef, state, jnp.asarray(src, jnp.int32))


@partial(jax.jit, static_argnames=("graphdef", "beam_size"))
def _beam(graphdef: nnx.GraphDef, state: nnx.State, src: jax.Array, beam_size: int) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.eval()  # on this traced copy only: the caller's model keeps its mode
    batch, k, max_len = src.shape[0], beam_size, model.tgt_len
    src = jnp.repeat(src, k, axis=0)  # (B, S) -> (B*K, S): row b*K+j is beam j of example b
    cross, caches = model.init_decoding(src)

    def step(carry, i):
        token, done, scores, history, caches = carry
        logits, caches = model.decode(token[:, None], cross, src, caches)
        logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)  # (B*K, V)
        pad_only = jnp.full_like(logp, -jnp.inf).at[:, PAD].set(0.0)  # a finished beam extends with padding only
        logp = jnp.where(done[:, None], pad_only, logp).reshape(batch, k, -1)  # (B, K, V)
        vocab = logp.shape[-1]
        scores, flat = jax.lax.top_k((scores[:, :, None] + logp).reshape(batch, k * vocab), k)  # (B, K)
        parent = (flat // vocab + jnp.arange(batch)[:, None] * k).reshape(-1)  # (B*K,): rows of the old beams
        token = (flat % vocab).reshape(-1).astype(jnp.int32)
        if model.scan_layers:  # stacked caches (layers, B*K, ...)
            caches = caches._replace(k=caches.k[:, parent], v=caches.v[:, parent])
        else:
            caches = [c._replace(k=c.k[parent], v=c.v[parent]) for c in caches]
        history = history[parent].at[:, i].set(token)
        done = done[parent] | (token == EOS) | (token == PAD)
        return (token, done, scores, history, caches), None

    start = jnp.full((batch * k,), BOS, jnp.int32)
    # Only beam 0 is live at first, so the first expansion does not pick K copies of one token.
    scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1)), (batch, 1))  # (B, K) summed log-probs
    carry = (start, jnp.zeros_like(start, bool), scores, jnp.zeros((batch * k, max_len), jnp.int32), caches)
    _, _, scores, history, _ = jax.lax.scan(step, carry, jnp.arange(max_len))[0]
    best = jnp.argmax(scores, axis=1)  # (B,)
    return history.reshape(batch, k, max_len)[jnp.arange(batch), best]


def beam_search(model: Transformer, src: jax.Array, beam_size: int) -> jax.Array:
    """Highest-scoring (summed log-probability) translation (B, tgt_len) among `beam_size` beams."""
    graphdef, state = nnx.split(model)
    return _beam(graphdef, state, jnp.asarray(src, jnp.int32), beam_size)


def translation_metrics(model: Transformer, dataset, batch_size: int = 256) -> dict[str, float]:
    """Exact-match accuracy and corpus BLEU (sacrebleu) of greedy decodes over `dataset.eval_batches`.

    `dataset.detokenize(ids)` turns token ids (stopping at EOS or padding) back into text.
    """
    import sacrebleu

    hypotheses, references = [], []
    for batch in dataset.eval_batches(batch_size):
        decoded = np.asarray(greedy_decode(model, batch["src"]))
        for hyp, tgt, keep in zip(decoded, batch["tgt"][:, 1:], batch["mask"]):
            if keep:
                hypotheses.append(dataset.detokenize(hyp))
                references.append(dataset.detokenize(tgt))
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return {"exact_match": exact, "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score}
