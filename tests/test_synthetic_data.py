"""Selective Copying and Induction Heads generators: sequences are what the task definitions say."""

import numpy as np
import pytest

from data.synthetic import NOISE, InductionHeads, SelectiveCopying


def test_selective_copying_sequences():
    ds = SelectiveCopying(length=40, num_tokens=5, vocab_size=8, seq_len=49)
    batch = ds.train_batch(3, 64)
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    assert tokens.shape == (64, 50) and tokens.dtype == np.int32 and loss_mask.shape == (64, 49)
    region, markers, answers = tokens[:, :40], tokens[:, 40:45], tokens[:, 45:]
    assert np.all(markers == 7)
    assert np.all((answers >= 1) & (answers <= 6))  # data tokens: neither noise nor marker
    for row in range(64):
        data = region[row][region[row] != NOISE]
        np.testing.assert_array_equal(data, answers[row])  # the M scattered tokens, in order
    # only the M answers count: targets tokens[:, 1:] at the masked positions are d_1 .. d_M
    np.testing.assert_array_equal(loss_mask.sum(1), 5)
    np.testing.assert_array_equal(tokens[:, 1:][loss_mask > 0].reshape(64, 5), answers)
    positions = np.argwhere(region != NOISE)[:, 1]
    assert len(np.unique(positions)) > 30  # positions are spread over the region, not fixed


def test_induction_heads_sequences():
    ds = InductionHeads(seq_len=30, vocab_size=6)
    tokens, loss_mask = (v for v in ds.train_batch(0, 128).values())
    assert tokens.shape == (128, 31) and loss_mask.shape == (128, 30)
    inputs = tokens[:, :-1]
    assert np.all(inputs[:, -1] == 5)
    assert np.all((inputs == 5).sum(1) == 2)  # the special token once in the sequence, once at the end
    first = np.argmax(inputs == 5, axis=1)
    np.testing.assert_array_equal(tokens[:, -1], inputs[np.arange(128), first + 1])  # target: what followed it
    assert np.all(first + 1 < 29)
    np.testing.assert_array_equal(loss_mask[:, -1], 1.0)
    assert loss_mask.sum() == 128


@pytest.mark.parametrize("ds", [SelectiveCopying(length=20, num_tokens=3, vocab_size=6), InductionHeads(seq_len=20)])
def test_training_batches_are_a_function_of_the_step_and_shard_the_global_batch(ds):
    a, b, other = ds.train_batch(7, 8), ds.train_batch(7, 8), ds.train_batch(8, 8)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], other["tokens"])
    halves = [ds.train_batch(7, 8, shard=(i, 2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["tokens"] for h in halves]), a["tokens"])
    np.testing.assert_array_equal(np.concatenate([h["loss_mask"] for h in halves]), a["loss_mask"])


def test_eval_set_is_fixed_and_padded():
    ds = InductionHeads(seq_len=20, eval_examples=10, seed=3)
    batches = list(ds.eval_batches(4))
    again = list(ds.eval_batches(4))
    assert [b["mask"].sum() for b in batches] == [4, 4, 2]
    for b1, b2 in zip(batches, again):
        np.testing.assert_array_equal(b1["tokens"], b2["tokens"])
    train_rows = {tuple(r) for s in range(5) for r in ds.train_batch(s, 8)["tokens"]}
    assert not train_rows & {tuple(r) for b in batches for r in b["tokens"]}  # a separate random stream


def test_inconsistent_sizes_fail_with_one_line():
    with pytest.raises(ValueError, match="seq_len 100 must be length \\+ 2 num_tokens - 1 = 95"):
        SelectiveCopying(length=64, num_tokens=16, seq_len=100)
    with pytest.raises(ValueError, match="num_tokens 9 in 1..length 8"):
        SelectiveCopying(length=8, num_tokens=9)
    with pytest.raises(ValueError, match="vocab_size 2"):
        InductionHeads(vocab_size=2)
