"""HetLoRA: zero-padding, weights S_k = ||B_k A_k||_F, truncation on broadcast, rank self-pruning,
and the tail penalty under Opacus. Expected values are computed in the tests from the factors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privlora.strategies import WEIGHT_KEY, HetLoRA, strategy_from_config, sum_states
from privlora.strategies.hetlora import rank_norms, tail_penalty, tail_start

from .conftest import tiny_bert

LAYERS = {
    "base_model.model.bert.encoder.layer.0.attention.self.query": (12, 10),
    "base_model.model.bert.encoder.layer.1.attention.self.value": (8, 6),
}
HEAD = "base_model.model.classifier.weight"


def a_key(m):
    return f"{m}.lora_A.weight"


def b_key(m):
    return f"{m}.lora_B.weight"


def client_state(rng, rank):
    out = {}
    for m, (d_in, d_out) in LAYERS.items():
        out[a_key(m)] = rng.normal(size=(rank, d_in)).astype(np.float32)
        out[b_key(m)] = rng.normal(size=(d_out, rank)).astype(np.float32)
    out[HEAD] = rng.normal(size=(2, 10)).astype(np.float32)
    return out


def padded(x, rank, rows):
    """Zero-pad by hand (independent of the code under test): rows of A or columns of B."""
    if rows:
        out = np.zeros((rank, x.shape[1]))
        out[: x.shape[0]] = x
    else:
        out = np.zeros((x.shape[0], rank))
        out[:, : x.shape[1]] = x
    return out


def fro(b, a):
    return np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64), "fro")


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_aggregate_is_the_norm_weighted_mean_of_zero_padded_factors(scope):
    rng = np.random.default_rng(0)
    ranks, sizes = (6, 2, 4), (10, 30, 60)
    states = [client_state(rng, r) for r in ranks]
    g = client_state(rng, 6)
    summed = sum_states([HetLoRA(6, norm_scope=scope).contribution(st, n, r) for st, n, r in zip(states, sizes, ranks)])
    new = HetLoRA(6, norm_scope=scope).finish(summed, g)
    for m in LAYERS:
        if scope == "layer":
            s = [fro(st[b_key(m)], st[a_key(m)]) for st in states]
        else:  # one weight per client: the Frobenius norm of its whole update
            s = [np.sqrt(sum(fro(st[b_key(l)], st[a_key(l)]) ** 2 for l in LAYERS)) for st in states]
        expected_a = sum(sk * padded(st[a_key(m)], 6, True) for sk, st in zip(s, states)) / sum(s)
        expected_b = sum(sk * padded(st[b_key(m)], 6, False) for sk, st in zip(s, states)) / sum(s)
        np.testing.assert_allclose(new[a_key(m)], expected_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new[b_key(m)], expected_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[HEAD], sum(n / 100 * st[HEAD] for st, n in zip(states, sizes)), rtol=1e-5)


def test_contribution_carries_the_weighted_factors_and_the_norm():
    rng = np.random.default_rng(1)
    st = client_state(rng, 3)
    c = HetLoRA(5).contribution(st, 7, 3)
    m = next(iter(LAYERS))
    s = fro(st[b_key(m)], st[a_key(m)])
    np.testing.assert_allclose(c[f"hetlora_norm/{m}"], [s])
    np.testing.assert_allclose(c[a_key(m)], s * padded(st[a_key(m)], 5, True), rtol=1e-6)
    assert c[b_key(m)].shape == (LAYERS[m][1], 5) and not c[b_key(m)][:, 3:].any()
    assert c[WEIGHT_KEY][0] == 7


def test_a_layer_no_client_moved_keeps_its_global_factors():
    rng = np.random.default_rng(2)
    states = [client_state(rng, 2), client_state(rng, 3)]
    m = next(iter(LAYERS))
    for st in states:
        st[b_key(m)][:] = 0
    g = client_state(rng, 3)
    new = HetLoRA(3).finish(sum_states([HetLoRA(3).contribution(st, 5, st[a_key(m)].shape[0]) for st in states]), g)
    np.testing.assert_array_equal(new[a_key(m)], g[a_key(m)])
    np.testing.assert_array_equal(new[b_key(m)], g[b_key(m)])


def test_broadcast_truncates_the_global_adapter_to_the_clients_rank():
    rng = np.random.default_rng(3)
    g = client_state(rng, 6)
    h = HetLoRA(6)
    payload = h.broadcast(g, 4)
    for m in LAYERS:
        np.testing.assert_array_equal(payload[a_key(m)], g[a_key(m)][:4])
        np.testing.assert_array_equal(payload[b_key(m)], g[b_key(m)][:, :4])
    np.testing.assert_array_equal(payload[HEAD], g[HEAD])
    start = h.local_start(payload, client_state(rng, 4))
    np.testing.assert_array_equal(start[a_key(m)], g[a_key(m)][:4])
    with pytest.raises(ValueError, match="client expects"):
        h.local_start(payload, client_state(rng, 3))
    with pytest.raises(ValueError, match="outside"):
        h.broadcast(g, 7)


def test_rank_norms_are_the_norms_of_each_ranks_part_of_the_update():
    rng = np.random.default_rng(4)
    st = client_state(rng, 4)
    expected = [
        np.sqrt(sum(np.linalg.norm(np.outer(st[b_key(m)][:, i], st[a_key(m)][i])) ** 2 for m in LAYERS)) for i in range(4)
    ]
    np.testing.assert_allclose(rank_norms(st), expected, rtol=1e-6)


def scaled_ranks(rng, factors):
    """A rank-len(factors) state whose rank i is multiplied by factors[i] (in B)."""
    st = client_state(rng, len(factors))
    for m in LAYERS:
        st[b_key(m)] = st[b_key(m)] * np.asarray(factors, dtype=np.float32)
    return st


def test_pruning_drops_a_tail_rank_below_the_threshold_and_keeps_one_above():
    """Rank 5, decay 0.5: the tail is ranks 2..4. Rank 4 is far below threshold x max and is
    dropped; rank 3 is above it and kept, so pruning stops there (the rank stays a prefix)."""
    rng = np.random.default_rng(5)
    st = scaled_ranks(rng, [1.0, 1.0, 1.0, 1.0, 1e-4])
    norms = rank_norms(st)
    threshold = 0.5 * norms[3] / norms.max()  # rank 3 is twice the cut-off, rank 4 far below it
    assert norms[4] < threshold * norms.max() < norms[3]
    h = HetLoRA(8, prune=True, decay=0.5, threshold=threshold)
    pruned, rank = h.prune(st, 5)
    assert rank == 4
    for m in LAYERS:
        np.testing.assert_array_equal(pruned[a_key(m)], st[a_key(m)][:4])
        np.testing.assert_array_equal(pruned[b_key(m)], st[b_key(m)][:, :4])
    # just above the cut-off a rank is kept; just below it is dropped
    cut = norms[4] / norms.max()
    assert HetLoRA(8, prune=True, decay=0.5, threshold=cut * 0.999).prune(st, 5)[1] == 5
    assert HetLoRA(8, prune=True, decay=0.5, threshold=cut * 1.001).prune(st, 5)[1] == 4


def test_pruning_never_goes_below_the_tail_and_is_off_unless_asked():
    rng = np.random.default_rng(6)
    st = scaled_ranks(rng, [1.0, 1e-5, 1e-5, 1e-5])  # ranks 1..3 all weak
    assert tail_start(4, 0.5) == 2
    assert HetLoRA(4, prune=True, decay=0.5, threshold=0.1).prune(st, 4)[1] == 2  # rank 1 is not in the tail
    assert HetLoRA(4, prune=False, decay=0.5, threshold=0.1).prune(st, 4) == (st, 4)
    assert HetLoRA(4, prune=True, penalty=0.1).penalty(1) is None  # a rank-1 client has no tail


def peft_model(cfg, rank, seed=0):
    from privlora.tasks.adapters import adapter_state, load_adapter_state, make_peft_model

    torch.manual_seed(seed)
    model = make_peft_model(tiny_bert(), cfg, rank)
    rng = np.random.default_rng(seed)
    # B starts at zero in LoRA; give it values so the tail penalty and A's gradient are non-zero
    state = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.5 if ".lora_B." in k else v) for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    return model, state


def test_tail_penalty_value(tiny_cfg):
    cfg = tiny_cfg(lora={"r": 4, "alpha": 8.0})
    model, state = peft_model(cfg, 4)
    expected = 0.3 * sum(
        np.linalg.norm(state[b].astype(np.float64)[:, 2:] @ state[a].astype(np.float64)[2:])
        for a, b in ((k, k.replace(".lora_A.", ".lora_B.")) for k in state if ".lora_A." in k)
    )
    assert float(tail_penalty(model, 2, 0.3).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(tail_penalty(model, 4, 0.3)) == 0.0


def test_tail_penalty_under_opacus_is_added_after_clipping_and_noise(tiny_cfg):
    """One DP step (noise 0, clipping active, two physical batches): the update must be
    -lr * (mean_i clip(g_i) + grad penalty), with g_i the gradient of example i alone. This
    fails if Opacus's per-sample gradients are wrong, if the penalty is lost (it would be, in
    the loss: Opacus overwrites p.grad), or if it is clipped with the data gradient."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from privlora.federation.client import Client, penalty_step

    from .test_flora import tiny_dataset

    cfg = tiny_cfg(federation={"strategy": "hetlora", "hetlora_prune": True, "hetlora_penalty": 0.5, "hetlora_decay": 0.5},
                   lora={"r": 4, "alpha": 8.0}, training={"batch_size": 6, "physical_batch_size": 4})
    strategy = strategy_from_config(cfg)
    ds = tiny_dataset(6, 1)
    client = Client(0, cfg, tiny_bert(), ds, strategy)
    model, _ = peft_model(cfg, 4, seed=2)
    model.train()
    reference = copy.deepcopy(model)
    lr, clip = 0.1, 0.05
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(params.values()), lr=lr)
    gsm, dp_opt, _ = PrivacyEngine(accountant="prv").make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(ds, batch_size=6),
        noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=True,
    )
    assert dp_opt.expected_batch_size == 6
    before = {n: p.detach().clone() for n, p in params.items()}
    ids, mask, labels = ds.tensors
    client._dp_step(gsm, dp_opt, ids, mask, labels, penalty_step(model, strategy.penalty(4)))

    ref = dict(reference.named_parameters())
    clipped = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(6):
        reference.zero_grad()
        F.cross_entropy(reference(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits, labels[i : i + 1]).backward()
        g = {n: ref[n].grad.clone() for n in params}
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        assert norm > clip  # clipping is active
        for n in params:
            clipped[n] += g[n] * min(1.0, clip / (float(norm) + 1e-6))
    reference.zero_grad()
    pen = dict(zip(params, torch.autograd.grad(tail_penalty(reference, 2, 0.5), [ref[n] for n in params], allow_unused=True)))
    assert max(float(v.abs().max()) for v in pen.values() if v is not None) > 1e-2  # the penalty matters
    for n, p in params.items():
        expected = before[n] - lr * (clipped[n] / 6 + (pen[n] if pen[n] is not None else 0))
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=n)
    gsm._close()


def test_a_client_prunes_reports_its_rank_and_the_server_keeps_it(tiny_cfg):
    """Through messages, under DP: the global adapter's ranks 2 and 3 are made negligible and
    training barely moves them (tiny learning rate); the client drops them, contributes zeros
    there, reports next_rank 2, and its next instruction asks for rank 2."""
    from privlora.federation.client import Client
    from privlora.federation.messages import Message
    from privlora.federation.server import Server

    from .test_flora import tiny_dataset

    cfg = tiny_cfg(federation={"strategy": "hetlora", "hetlora_prune": True, "hetlora_decay": 0.5, "hetlora_threshold": 0.01,
                               "hetlora_penalty": 0.0, "server_momentum": 0.0},
                   lora={"r": 4, "alpha": 8.0}, training={"lr": 1e-9, "batch_size": 8})
    base = tiny_bert()
    server = Server(cfg, strategy_from_config(cfg), base, None)
    rng = np.random.default_rng(0)
    for k in server.global_state:
        if ".lora_B." in k:
            server.global_state[k] = (rng.normal(size=server.global_state[k].shape) * [1.0, 1.0, 1e-6, 1e-6]).astype(np.float32)
    client = Client(1, cfg, base, tiny_dataset(16, 0), strategy_from_config(cfg))
    update = client.handle(server.instruction(1, 1))
    report, tensors = server.read_update(update, 1, {1})
    assert (report.rank, report.next_rank) == (4, 2)
    a = next(k for k in tensors if ".lora_A." in k)
    assert tensors[a].shape[0] == 4 and not tensors[a][2:].any() and tensors[a][:2].any()
    assert server.client_ranks[1] == 2 and server.client_record(report)["next_rank"] == 2
    assert Message.from_bytes(server.instruction(2, 1), "round_instruction").header["rank"] == 2
    server.aggregate([tensors])


def test_dp_client_training_with_the_penalty_shrinks_the_tail(tiny_cfg):
    """The whole Client.train path under DP (Opacus, Poisson sampling, noise 1): no Opacus
    error, three counted steps, and with the same seed (same batches, same noise) the tail
    ranks end smaller with the penalty than without it. (Not necessarily smaller than at the
    start: at this noise level DP noise grows every rank.)"""
    from privlora.tasks.adapters import adapter_state, make_peft_model
    from privlora.federation.client import Client

    from .test_flora import tiny_dataset

    def run(penalty):
        cfg = tiny_cfg(federation={"strategy": "hetlora", "hetlora_prune": True, "hetlora_penalty": penalty,
                                   "hetlora_decay": 0.5, "hetlora_threshold": 0.0},
                       lora={"r": 4, "alpha": 8.0}, training={"local_steps": 3, "batch_size": 8, "lr": 0.5})
        base = tiny_bert()
        strategy = strategy_from_config(cfg)
        g = strategy.initial_state(adapter_state(make_peft_model(base, cfg, 4)))
        rng = np.random.default_rng(0)
        g = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.5 if ".lora_B." in k else v) for k, v in g.items()}
        result = Client(0, cfg, base, tiny_dataset(32, 0), strategy).train(strategy.broadcast(g, 4), rnd=1, rank=4)
        assert result.mechanism is not None and result.mechanism.steps == 3 and result.next_rank == 4
        return rank_norms(result.state)

    with_penalty = run(2.0)
    without = run(0.0)
    assert (with_penalty[2:] < without[2:]).all()
