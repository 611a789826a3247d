"""Aggregation mathematics, checked against products computed directly in the test."""

from __future__ import annotations

import numpy as np
import pytest

from privlora.strategies import WEIGHT_KEY, FedIT, FFALoRA, cross_term_error, shared_lora_a, sum_states

A_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B_KEY = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"
D_IN, D_OUT = 12, 10


def client_state(rng, rank, a=None):
    return {
        A_KEY: rng.normal(size=(rank, D_IN)).astype(np.float32) if a is None else a,
        B_KEY: rng.normal(size=(D_OUT, rank)).astype(np.float32),
        HEAD: rng.normal(size=(2, D_OUT)).astype(np.float32),
    }


def test_ffa_transmits_only_b_and_head():
    ffa = FFALoRA(max_rank=4, seed=1)
    rng = np.random.default_rng(0)
    template = client_state(rng, 4)
    global_state = ffa.initial_state(template)
    assert A_KEY not in ffa.broadcast(global_state, 4)
    contrib = ffa.contribution(client_state(rng, 4), num_examples=10, rank=4)
    assert A_KEY not in contrib and B_KEY in contrib and HEAD in contrib
    assert ffa.frozen("base_model.model.x.lora_A.default.weight") and not ffa.frozen(B_KEY)


def test_ffa_shared_a_is_derived_identically_and_prefix_stable():
    a8 = shared_lora_a(5, A_KEY, 8, D_IN)
    assert np.array_equal(shared_lora_a(5, A_KEY, 8, D_IN), a8)
    assert np.array_equal(shared_lora_a(5, A_KEY, 3, D_IN), a8[:3])  # first r rows do not depend on r
    assert not np.array_equal(shared_lora_a(6, A_KEY, 8, D_IN), a8)
    assert not np.array_equal(shared_lora_a(5, B_KEY, 8, D_IN), a8)
    assert np.abs(a8).max() <= 1 / np.sqrt(D_IN)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (8, 2, 5, 1)])
def test_ffa_aggregate_is_exactly_the_weighted_sum_of_products(ranks):
    """sum_k p_k B_k A[:r_k] == B_global A_global, with heterogeneous ranks and unequal n_k."""
    rng = np.random.default_rng(42)
    r_max = max(ranks)
    server = FFALoRA(max_rank=r_max, seed=9)
    g = server.initial_state(client_state(rng, r_max))
    sizes = rng.integers(5, 100, size=len(ranks))
    contribs, expected = [], np.zeros((D_OUT, D_IN))
    for r, n in zip(ranks, sizes):
        client = FFALoRA(max_rank=r_max, seed=9)  # a separate object: only the seed is shared
        template = client_state(rng, r)
        start = client.local_start(server.broadcast(g, r), template)
        assert np.array_equal(start[A_KEY], g[A_KEY][:r])
        trained = dict(start)
        trained[B_KEY] = rng.normal(size=(D_OUT, r)).astype(np.float32)
        contribs.append(client.contribution(trained, int(n), r))
        expected += (n / sizes.sum()) * trained[B_KEY].astype(np.float64) @ start[A_KEY].astype(np.float64)
    new = server.finish(sum_states(contribs), g)
    got = new[B_KEY].astype(np.float64) @ new[A_KEY].astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.array_equal(new[A_KEY], g[A_KEY])


def test_fedit_averages_factors_and_misses_the_cross_terms():
    """Constructed case: two clients with orthogonal updates. The mean of products is
    (B1 A1 + B2 A2)/2; FedIT gives ((B1+B2)/2)((A1+A2)/2); the gap is the closed-form cross
    terms (B1 A2 + B2 A1 - B1 A1 - B2 A2)/4."""
    e = np.eye(D_IN, dtype=np.float32)
    f = np.eye(D_OUT, dtype=np.float32)
    s1 = {A_KEY: e[:1], B_KEY: f[:, :1], HEAD: np.zeros((2, D_OUT), np.float32)}
    s2 = {A_KEY: e[1:2], B_KEY: f[:, 1:2], HEAD: np.ones((2, D_OUT), np.float32)}
    fedit = FedIT(max_rank=1)
    new = fedit.finish(sum_states([fedit.contribution(s1, 7, 1), fedit.contribution(s2, 7, 1)]), s1)
    B1, A1, B2, A2 = s1[B_KEY], s1[A_KEY], s2[B_KEY], s2[A_KEY]
    mean_of_products = 0.5 * (B1 @ A1 + B2 @ A2)
    fedit_product = new[B_KEY] @ new[A_KEY]
    np.testing.assert_allclose(new[A_KEY], 0.5 * (A1 + A2))
    np.testing.assert_allclose(new[HEAD], 0.5 * np.ones((2, D_OUT)))
    assert not np.allclose(fedit_product, mean_of_products)
    np.testing.assert_allclose(fedit_product - mean_of_products, 0.25 * (B1 @ A2 + B2 @ A1 - B1 @ A1 - B2 @ A2), atol=1e-7)


def test_fedit_cross_term_error_of_the_orthogonal_two_client_case():
    """From a zero start, the mean update (B1 A1 + B2 A2)/2 has squared norm 2/4; the gap is the
    four unit rank-one cross terms over 4, squared norm 4/16; the ratio is sqrt(1/2)."""
    e, f = np.eye(D_IN, dtype=np.float32), np.eye(D_OUT, dtype=np.float32)
    s1 = {A_KEY: e[:1], B_KEY: f[:, :1], HEAD: np.zeros((2, D_OUT), np.float32)}
    s2 = {A_KEY: e[1:2], B_KEY: f[:, 1:2], HEAD: np.ones((2, D_OUT), np.float32)}
    start = {A_KEY: np.zeros((1, D_IN), np.float32), B_KEY: np.zeros((D_OUT, 1), np.float32)}
    fedit = FedIT(max_rank=1)
    err = cross_term_error([fedit.contribution(s1, 7, 1), fedit.contribution(s2, 7, 1)], start)
    assert err == pytest.approx(np.sqrt(0.5), rel=1e-6)


def test_fedit_cross_term_error_matches_the_closed_form_with_weights_and_a_start():
    """Gap = sum_{j != k} p_j p_k B_j A_k - sum_k p_k (1 - p_k) B_k A_k, written term by term."""
    rng = np.random.default_rng(3)
    sizes = [3, 5, 12]
    p = np.array(sizes) / sum(sizes)
    states = [client_state(rng, 2) for _ in sizes]
    start = client_state(rng, 2)
    fedit = FedIT(max_rank=2)
    got = cross_term_error([fedit.contribution(s, n, 2) for s, n in zip(states, sizes)], start)
    B = [s[B_KEY].astype(np.float64) for s in states]
    A = [s[A_KEY].astype(np.float64) for s in states]
    gap = np.zeros((D_OUT, D_IN))
    for j in range(3):
        for k in range(3):
            if j != k:
                gap += p[j] * p[k] * B[j] @ A[k]
        gap -= p[j] * (1 - p[j]) * B[j] @ A[j]
    update = sum(p[k] * B[k] @ A[k] for k in range(3)) - start[B_KEY].astype(np.float64) @ start[A_KEY].astype(np.float64)
    assert got == pytest.approx(np.linalg.norm(gap) / np.linalg.norm(update), rel=1e-6)
    # when every client keeps the same A (as FFA-LoRA does), the average is exact
    shared = [dict(s, **{A_KEY: start[A_KEY]}) for s in states]
    assert cross_term_error([fedit.contribution(s, n, 2) for s, n in zip(shared, sizes)], start) == pytest.approx(0.0, abs=1e-7)


def test_fedit_weights_by_examples_and_refuses_other_ranks():
    rng = np.random.default_rng(1)
    fedit = FedIT(max_rank=3)
    s1, s2 = client_state(rng, 3), client_state(rng, 3)
    new = fedit.finish(sum_states([fedit.contribution(s1, 1, 3), fedit.contribution(s2, 3, 3)]), s1)
    np.testing.assert_allclose(new[B_KEY], 0.25 * s1[B_KEY] + 0.75 * s2[B_KEY], rtol=1e-6)
    with pytest.raises(ValueError, match="one rank"):
        fedit.contribution(client_state(rng, 2), 1, 2)


def test_uniform_weighting_ignores_sizes():
    rng = np.random.default_rng(2)
    fedit = FedIT(max_rank=2, weighting="uniform")
    s1, s2 = client_state(rng, 2), client_state(rng, 2)
    c = [fedit.contribution(s1, 1, 2), fedit.contribution(s2, 1000, 2)]
    assert all(x[WEIGHT_KEY][0] == 1.0 for x in c)
    new = fedit.finish(sum_states(c), s1)
    np.testing.assert_allclose(new[B_KEY], 0.5 * (s1[B_KEY] + s2[B_KEY]), rtol=1e-6)


def test_sum_rejects_mismatched_contributions():
    with pytest.raises(ValueError, match="different keys"):
        sum_states([{"a": np.zeros(2)}, {"b": np.zeros(2)}])
    with pytest.raises(ValueError, match="shape"):
        sum_states([{"a": np.zeros(2)}, {"a": np.zeros(3)}])
    with pytest.raises(ValueError, match="no contributions"):
        sum_states([])


def test_ffa_heterogeneous_ranks_through_peft_models_is_exact(tiny_cfg):
    """Clients of ranks 3, 1 and 2 on tiny BERT: each client's peft layer computes
    s B_k A[:r_k] with the shared A's first r_k rows (peft's alpha_k = s r_k); after
    aggregation the global peft layer (rank 3) computes exactly sum_k p_k of those updates.
    Updates are read from the layers' forward passes, not from the strategy's tensors."""
    import torch

    from privlora.tasks.adapters import adapter_state, load_adapter_state, make_peft_model

    from .conftest import tiny_bert
    from .test_flora import layer_update

    cfg = tiny_cfg(lora={"r": 2, "alpha": 4.0, "ranks": [3, 1, 2, 2]})
    base = tiny_bert()
    server = FFALoRA(cfg.max_rank, seed=cfg.seed)
    g = server.initial_state(adapter_state(make_peft_model(base, cfg, cfg.max_rank)))
    rng = np.random.default_rng(0)
    sizes = {0: 10, 1: 50, 2: 25}
    module = "base_model.model.bert.encoder.layer.1.attention.self.value"
    contributions, expected = [], 0
    for k, n in sizes.items():
        r = cfg.client_rank(k)
        client = FFALoRA(cfg.max_rank, seed=cfg.seed)
        model = make_peft_model(base, cfg, r)
        start = client.local_start(server.broadcast(g, r), adapter_state(model))
        np.testing.assert_array_equal(start[f"{module}.lora_A.weight"], g[f"{module}.lora_A.weight"][:r])
        trained = {key: (rng.normal(size=v.shape).astype(np.float32) if ".lora_B." in key else v) for key, v in start.items()}
        load_adapter_state(model, trained)
        expected = expected + (n / sum(sizes.values())) * layer_update(model, module).double()
        contributions.append(client.contribution(trained, n, r))
    new = server.finish(sum_states(contributions), g)
    global_model = make_peft_model(base, cfg, cfg.max_rank)
    load_adapter_state(global_model, new)
    torch.testing.assert_close(layer_update(global_model, module).double(), expected, rtol=1e-5, atol=1e-6)
