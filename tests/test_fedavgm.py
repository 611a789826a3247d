"""Server momentum: the closed form over rounds, and frozen tensors stay put."""

from __future__ import annotations

import numpy as np
import pytest

from privlora.strategies.fedavgm import server_momentum_step


def test_momentum_matches_the_recurrence_written_out():
    g0 = {"b": np.array([1.0, 2.0]), "a": np.array([5.0])}
    a1 = {"b": np.array([2.0, 2.0]), "a": np.array([5.0])}
    g1, v1 = server_momentum_step(g0, a1, None, beta=0.5, server_lr=2.0)
    np.testing.assert_allclose(g1["b"], [1.0 + 2.0 * 1.0, 2.0])  # v1 = a1 - g0
    a2 = {"b": g1["b"] + np.array([1.0, -1.0]), "a": np.array([5.0])}
    g2, _ = server_momentum_step(g1, a2, v1, beta=0.5, server_lr=2.0)
    v2 = 0.5 * np.array([1.0, 0.0]) + np.array([1.0, -1.0])
    np.testing.assert_allclose(g2["b"], g1["b"] + 2.0 * v2)
    assert g2["a"][0] == 5.0  # a tensor the strategy keeps fixed never moves


def test_zero_momentum_unit_lr_is_the_plain_aggregate():
    g0 = {"b": np.arange(4.0)}
    a = {"b": np.arange(4.0) * 3}
    g1, _ = server_momentum_step(g0, a, None, 0.0, 1.0)
    np.testing.assert_array_equal(g1["b"], a["b"])


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="0 <= beta < 1"):
        server_momentum_step({"b": np.zeros(1)}, {"b": np.zeros(1)}, None, 1.0, 1.0)
