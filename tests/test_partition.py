"""Partitioners cover every example once; Dirichlet skews labels; natural keeps groups whole."""

from __future__ import annotations

import numpy as np
import pytest

from privlora.tasks.data import DataError
from privlora.tasks.partition import partition_dirichlet, partition_iid, partition_natural


def assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_near_equal_and_seeded():
    parts = partition_iid(103, 10, seed=1)
    assert_exact_cover(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 10, seed=1)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(103, 10, seed=2)))


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    labels = np.repeat([0, 1], 1000)

    def mean_skew(alpha):
        parts = partition_dirichlet(labels, 10, alpha, seed=0)
        assert_exact_cover(parts, len(labels))
        return np.mean([abs(labels[p].mean() - 0.5) for p in parts])

    assert mean_skew(0.1) > 0.25
    assert mean_skew(1000.0) < 0.05


def test_natural_keeps_each_group_on_one_client():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 50, size=2000)
    parts = partition_natural(groups, 7, seed=4)
    assert_exact_cover(parts, len(groups))
    owners = {}
    for k, p in enumerate(parts):
        for g in np.unique(groups[p]):
            assert owners.setdefault(int(g), k) == k
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= np.bincount(groups).max()


def test_too_many_clients_is_a_named_error():
    with pytest.raises(DataError, match="data.num_clients"):
        partition_natural(np.array([0, 0, 1]), 3, seed=0)
    with pytest.raises(DataError, match="data.num_clients"):
        partition_iid(2, 3, seed=0)
