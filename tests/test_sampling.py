"""Shuffled epochs: every example once an epoch, in the order its (seed, epoch) draws, split over hosts."""

import numpy as np
import pytest

from data.sampling import epoch_order, train_indices


def test_consecutive_batches_walk_each_epochs_order_once_and_hosts_split_each_batch():
    n, batch = 10, 4  # 2.5 batches an epoch: batch 2 spans epochs 0 and 1
    steps = [train_indices(n, batch, step, seed=3, shard=(0, 1)) for step in range(5)]
    flat = np.concatenate(steps)
    for epoch in range(2):
        np.testing.assert_array_equal(flat[epoch * n:(epoch + 1) * n],
                                      np.random.default_rng([3, epoch]).permutation(n))
    assert sorted(flat[:n]) == list(range(n)) and sorted(flat[n:2 * n]) == list(range(n))
    assert not np.array_equal(flat[:n], flat[n:2 * n])  # a fresh order each epoch
    halves = [train_indices(n, batch, 2, seed=3, shard=(host, 2)) for host in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), steps[2])
    assert not np.array_equal(train_indices(n, batch, 0, seed=4, shard=(0, 1)), steps[0])


def test_an_epochs_order_is_drawn_once_and_cannot_be_changed_in_place():
    first = epoch_order(1000, 0, 7)
    assert epoch_order(1000, 0, 7) is first
    with pytest.raises(ValueError):
        first[0] = 1
