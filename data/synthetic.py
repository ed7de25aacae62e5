"""Synthetic data: the sequence tasks of the Mamba paper (Gu & Dao 2023, Section 4.1), fresh random data every
step, and random images for throughput benchmarks.

- `SelectiveCopying` (data=selective_copy, paper Table 1): M data tokens at random positions of a noise sequence
  of length L, then M markers; the model must then output the M data tokens in order.
  Tokens: 0 noise, 1 .. V-2 data, V-1 marker. Sequence (T + 1 = L + 2M tokens):
  `[noise and data (L)] [marker x M] [d_1 .. d_M]`; the loss counts the M answer positions only.
- `InductionHeads` (data=induction_heads, paper Table 2): random tokens over V-1 symbols; a special token
  (V-1) appears once at a random position followed by a token t, and again at the end; the target is t.
  Sequence (T + 1 tokens): `[random with "s t" planted] [s] [t]`; the loss counts the last position only.

Training batch `step` is drawn from its own random stream (seed, step), so resumed runs see the same data;
the evaluation set is a fixed stream of `eval_examples` sequences.
"""

from collections.abc import Iterator

import numpy as np

from data.sampling import Shard, eval_indices, host_rows

NOISE = 0


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per (seed, key): key (0, step) for training batches, (1,) for the evaluation set."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class _Synthetic:
    """Batches of a generator `make(num, rng)`: one stream per training step, one fixed evaluation set."""

    task = "next_token"

    def __init__(self, eval_examples: int, seed: int):
        self.eval_examples, self.seed = eval_examples, seed

    def make(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_batch(self, step: int, batch_size: int, shard: Shard = (0, 1)) -> dict[str, np.ndarray]:
        """The rows of global batch `step` for this host; a pure function of (seed, step)."""
        batch = self.make(batch_size, _rng(self.seed, 0, step))
        rows = host_rows(batch_size, shard)
        return {k: v[rows] for k, v in batch.items()}

    def eval_batches(self, batch_size: int, shard: Shard = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
        """The fixed evaluation set in full batches; padding rows carry mask 0."""
        data = self.make(self.eval_examples, _rng(self.seed, 1))
        for idx, mask in eval_indices(self.eval_examples, batch_size, shard):
            yield {k: v[idx] for k, v in data.items()} | {"mask": mask}


class SelectiveCopying(_Synthetic):
    """Remember M tokens scattered in L noise positions and recall them, in order, after M markers."""

    def __init__(self, length: int = 256, num_tokens: int = 16, vocab_size: int = 16, seq_len: int | None = None,
                 eval_examples: int = 512, seed: int = 0, **metadata):
        if vocab_size < 3 or not 1 <= num_tokens <= length:
            raise ValueError(f"selective_copy: vocab_size {vocab_size} must be >= 3 (noise, marker, data) and "
                             f"num_tokens {num_tokens} in 1..length {length}")
        if seq_len is not None and seq_len != length + 2 * num_tokens - 1:
            raise ValueError(f"selective_copy: seq_len {seq_len} must be length + 2 num_tokens - 1 = "
                             f"{length + 2 * num_tokens - 1}")
        super().__init__(eval_examples, seed)
        self.length, self.num_tokens, self.vocab_size = length, num_tokens, vocab_size
        self.marker = vocab_size - 1

    def make(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """tokens (num, L + 2M) and loss_mask (num, L + 2M - 1) over the M answers."""
        L, M = self.length, self.num_tokens
        data = rng.integers(1, self.marker, size=(num, M))  # (B, M) in 1 .. V-2
        positions = np.sort(np.argsort(rng.random((num, L)), axis=1)[:, :M], axis=1)  # M distinct, in order
        region = np.full((num, L), NOISE)
        np.put_along_axis(region, positions, data, axis=1)
        tokens = np.concatenate([region, np.full((num, M), self.marker), data], axis=1)
        loss_mask = np.zeros((num, L + 2 * M - 1), np.float32)
        loss_mask[:, -M:] = 1.0  # targets tokens[L + M:] = d_1 .. d_M
        return {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask}


class InductionHeads(_Synthetic):
    """Recall the token that followed the one occurrence of a special token, when it appears again at the end."""

    def __init__(self, seq_len: int = 256, vocab_size: int = 16, eval_examples: int = 512, seed: int = 0,
                 extrapolation_lengths: tuple[int, ...] = (), extrapolation_examples: int = 64,
                 extrapolation_batch_tokens: int = 2**17, **metadata):
        if vocab_size < 3 or min((seq_len, *extrapolation_lengths)) < 3:
            raise ValueError(f"induction_heads: vocab_size {vocab_size}, seq_len {seq_len} and extrapolation_lengths "
                             f"{list(extrapolation_lengths)} must all be >= 3")
        super().__init__(eval_examples, seed)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.special = vocab_size - 1
        self.extrapolation_lengths, self.extrapolation_examples = tuple(extrapolation_lengths), extrapolation_examples
        self.extrapolation_batch_tokens = extrapolation_batch_tokens

    def make(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """tokens (num, T + 1) and loss_mask (num, T) on the last position."""
        T = self.seq_len
        tokens = rng.integers(0, self.special, size=(num, T + 1))  # never the special token
        where = rng.integers(0, T - 2, size=num)  # "s t" fits before the final s at T - 1
        rows = np.arange(num)
        tokens[rows, where] = self.special
        tokens[:, T - 1] = self.special
        tokens[:, T] = tokens[rows, where + 1]
        loss_mask = np.zeros((num, T), np.float32)
        loss_mask[:, -1] = 1.0
        return {"tokens": tokens.astype(np.int32), "loss_mask": loss_mask}

    def final_metrics(self, model) -> dict[str, float]:
        """Accuracy at each of `extrapolation_lengths` (paper Table 2: trained at 256, tested up to 2^20).

        Batches hold about `extrapolation_batch_tokens` tokens, which bounds the memory of long sequences.
        """
        from flax import nnx

        last_logits = nnx.jit(lambda m, tokens: m(tokens)[:, -1])
        metrics = {}
        for length in self.extrapolation_lengths:
            data = InductionHeads(length, self.vocab_size, seed=self.seed).make(
                self.extrapolation_examples, _rng(self.seed, 2, length))
            batch = max(1, min(self.extrapolation_examples, self.extrapolation_batch_tokens // length))
            correct = 0
            for start in range(0, self.extrapolation_examples, batch):
                tokens = data["tokens"][start:start + batch]
                correct += int((np.asarray(last_logits(model, tokens[:, :-1])).argmax(-1) == tokens[:, -1]).sum())
            metrics[f"accuracy_at_{length}"] = correct / self.extrapolation_examples
        return metrics


class RandomImages(_Synthetic):
    """Random images and labels of any size, for throughput benchmarks where no image dataset is on disk.

    A fixed pool of `pool` images is drawn once; every batch takes rows of it, so feeding costs a copy.
    """

    task = "classify"

    def __init__(self, image_size: int = 224, channels: int = 3, num_classes: int = 1000, pool: int = 256,
                 eval_examples: int = 256, seed: int = 0, **metadata):
        super().__init__(eval_examples, seed)
        rng = _rng(seed, 2)
        self.images = rng.standard_normal((pool, image_size, image_size, channels), np.float32)
        self.labels = rng.integers(0, num_classes, pool).astype(np.int32)

    def make(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = rng.integers(0, len(self.labels), num)
        return {"image": self.images[rows], "label": self.labels[rows]}
