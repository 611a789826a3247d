"""FLoRA stacking: the merged update is sum_k p_k s B_k A_k, in both forms, for any ranks and any
subset of clients; it is merged into the base weights and every round starts a fresh adapter.
Expected values are computed in the tests from the clients' factors directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privlora.strategies import WEIGHT_KEY, FLoRA, strategy_from_config, sum_states
from privlora.strategies.base import BASE_DELTA_PREFIX
from privlora.strategies.flora import delta_to_lora, numerical_rank

from .conftest import tiny_bert

LAYERS = {  # module -> (d_in, d_out): two layers of different shapes
    "base_model.model.bert.encoder.layer.0.attention.self.query": (12, 10),
    "base_model.model.bert.encoder.layer.1.output.dense": (9, 14),
}
HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"


def a_key(m):
    return f"{m}.lora_A.weight"


def b_key(m):
    return f"{m}.lora_B.weight"


def delta_key(m):
    return f"{BASE_DELTA_PREFIX}{m}.base_layer.weight"


def client_state(rng, rank):
    out = {}
    for m, (d_in, d_out) in LAYERS.items():
        out[a_key(m)] = rng.normal(size=(rank, d_in)).astype(np.float32)
        out[b_key(m)] = rng.normal(size=(d_out, rank)).astype(np.float32)
    out[HEAD_W] = rng.normal(size=(2, 10)).astype(np.float32)
    out[HEAD_B] = rng.normal(size=(2,)).astype(np.float32)
    return out


def a_round(seed, num_clients=7, taking_part=4):
    """Random ranks and sizes for a federation; a random subset takes part with random factors."""
    rng = np.random.default_rng(seed)
    ranks = [int(r) for r in rng.integers(1, 9, size=num_clients)]
    sizes = [int(n) for n in rng.integers(3, 300, size=num_clients)]
    chosen = sorted(int(k) for k in rng.choice(num_clients, size=taking_part, replace=False))
    states = {k: client_state(rng, ranks[k]) for k in chosen}
    return ranks, sizes, chosen, states


def expected_update(scaling, sizes, chosen, states, module):
    total = sum(sizes[k] for k in chosen)
    return sum(
        scaling * (sizes[k] / total) * states[k][b_key(module)].astype(np.float64) @ states[k][a_key(module)].astype(np.float64)
        for k in chosen
    )


def summed_round(form, scaling, ranks, sizes, chosen, states, weighting="num_examples"):
    # each client uses its own strategy object; only the config is shared
    contribs = [
        FLoRA(max(ranks), scaling, form, ranks, weighting).contribution(states[k], sizes[k], ranks[k], client_id=k)
        for k in chosen
    ]
    return sum_states(contribs)


def global_state(ranks, rng=None):
    rng = rng or np.random.default_rng(99)
    template = client_state(rng, max(ranks))
    return FLoRA(max(ranks), 1.0).initial_state(template)


@pytest.mark.parametrize("form", ["product", "slot"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_update_is_the_weighted_sum_of_products(form, seed):
    """Random ranks in 1..8, 4 of 7 clients taking part, p_k = n_k / sum of n over those 4."""
    scaling = 1.7
    ranks, sizes, chosen, states = a_round(seed)
    server = FLoRA(max(ranks), scaling, form, ranks)
    delta = server.round_delta(summed_round(form, scaling, ranks, sizes, chosen, states))
    for m in LAYERS:
        np.testing.assert_allclose(delta[f"{m}.base_layer.weight"], expected_update(scaling, sizes, chosen, states, m), rtol=1e-10, atol=1e-12)


def test_slot_form_sum_is_the_stack():
    """The summed slot contributions are [B_1 .. B_K] and [w_1 A_1; ..; w_K A_K] with every
    client's block in its own rows (clients that did not take part: zeros)."""
    ranks, sizes, chosen, states = a_round(5)
    summed = summed_round("slot", 1.0, ranks, sizes, chosen, states)
    total = sum(sizes[k] for k in chosen)
    offsets = np.concatenate([[0], np.cumsum(ranks)])
    ((m, b_stack, a_stack), *_) = FLoRA(max(ranks), 1.0, "slot", ranks).stacked(summed)
    assert a_stack.shape == (sum(ranks), LAYERS[m][0]) and b_stack.shape == (LAYERS[m][1], sum(ranks))
    for k in range(len(ranks)):
        rows = slice(offsets[k], offsets[k + 1])
        if k in chosen:
            np.testing.assert_allclose(a_stack[rows], sizes[k] / total * states[k][a_key(m)], rtol=1e-6)
            np.testing.assert_array_equal(b_stack[:, rows], states[k][b_key(m)])
        else:
            assert not a_stack[rows].any() and not b_stack[:, rows].any()


@pytest.mark.parametrize("seed", [3, 4])
def test_slot_and_product_forms_give_the_same_merged_weights(seed):
    ranks, sizes, chosen, states = a_round(seed)
    g = global_state(ranks)
    new = {
        form: FLoRA(max(ranks), 0.5, form, ranks).finish(summed_round(form, 0.5, ranks, sizes, chosen, states), g)
        for form in ("product", "slot")
    }
    assert set(new["product"]) == set(new["slot"]) == set(g)
    for k in g:
        np.testing.assert_allclose(new["product"][k], new["slot"][k], rtol=1e-5, atol=1e-6, err_msg=k)
    for m in LAYERS:
        np.testing.assert_allclose(new["slot"][delta_key(m)], expected_update(0.5, sizes, chosen, states, m), rtol=1e-5, atol=1e-6)


def test_finish_accumulates_merges_and_restarts_the_adapter():
    """Two rounds with different participants: the base delta is the sum of both rounds'
    updates; B is zero (fresh adapters), A unchanged, the head the n-weighted mean."""
    ranks, sizes, chosen1, states1 = a_round(6)
    chosen2 = [0, 2, 5]  # round 2: other clients, other factors
    states2 = {k: client_state(np.random.default_rng(k), ranks[k]) for k in chosen2}
    server = FLoRA(max(ranks), 2.0, "product", ranks)
    g0 = global_state(ranks)
    g1 = server.finish(summed_round("product", 2.0, ranks, sizes, chosen1, states1), g0)
    g2 = server.finish(summed_round("product", 2.0, ranks, sizes, chosen2, states2), g1)
    total2 = sum(sizes[k] for k in chosen2)
    for m in LAYERS:
        expected = expected_update(2.0, sizes, chosen1, states1, m) + expected_update(2.0, sizes, chosen2, states2, m)
        np.testing.assert_allclose(g2[delta_key(m)], expected, rtol=1e-5, atol=1e-5)
        assert not g2[b_key(m)].any()
        np.testing.assert_array_equal(g2[a_key(m)], g0[a_key(m)])
    np.testing.assert_allclose(g2[HEAD_W], sum(sizes[k] / total2 * states2[k][HEAD_W] for k in chosen2), rtol=1e-5)


def test_broadcast_sends_head_and_merged_deltas_and_the_client_starts_fresh():
    ranks, sizes, chosen, states = a_round(8)
    server = FLoRA(max(ranks), 1.0, "product", ranks)
    g = server.finish(summed_round("product", 1.0, ranks, sizes, chosen, states), global_state(ranks))
    payload = server.broadcast(g, 3)
    assert set(payload) == {HEAD_W, HEAD_B} | {delta_key(m) for m in LAYERS}
    template = client_state(np.random.default_rng(1), 3)
    template.update({b_key(m): np.zeros_like(template[b_key(m)]) for m in LAYERS})
    start = server.local_start(payload, template)
    for m in LAYERS:
        np.testing.assert_array_equal(start[a_key(m)], template[a_key(m)])  # the client's own fresh A
        assert not start[b_key(m)].any()
    np.testing.assert_array_equal(start[HEAD_W], g[HEAD_W])
    assert set(server.base_update(payload)) == {f"{m}.base_layer.weight" for m in LAYERS}


def test_uniform_weighting_ignores_sizes():
    ranks, sizes, chosen, states = a_round(9)
    delta = FLoRA(max(ranks), 1.0, "slot", ranks).round_delta(summed_round("slot", 1.0, ranks, sizes, chosen, states, "uniform"))
    m = next(iter(LAYERS))
    expected = sum(states[k][b_key(m)].astype(np.float64) @ states[k][a_key(m)] for k in chosen) / len(chosen)
    np.testing.assert_allclose(delta[f"{m}.base_layer.weight"], expected, rtol=1e-6)


def test_slot_form_is_refused_under_secure_aggregation_and_product_form_is_not():
    slot, product = FLoRA(4, 1.0, "slot", (4, 2)), FLoRA(4, 1.0, "product")
    assert not slot.secagg_compatible and product.secagg_compatible
    with pytest.raises(ValueError, match="flora_form = 'product'"):
        slot.check_secure_aggregation()
    product.check_secure_aggregation()


def test_slot_contribution_checks_the_clients_slot():
    f = FLoRA(4, 1.0, "slot", (4, 2))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="client id"):
        f.contribution(client_state(rng, 2), 5, 2)
    with pytest.raises(ValueError, match="slot holds rank 4"):
        f.contribution(client_state(rng, 2), 5, 2, client_id=0)
    with pytest.raises(ValueError, match="client_ranks"):
        FLoRA(4, 1.0, "slot")


def test_upload_and_download_bytes_per_form():
    """Product: d_out x d_in per layer. Slot: the client's r_k (d_in + d_out) per layer only.
    Both: the head and the weight. Download: head and dense merged deltas."""
    ranks = (5, 2, 3)
    state = client_state(np.random.default_rng(0), 2)
    head = 2 * 10 + 2
    dense = sum(d_in * d_out for d_in, d_out in LAYERS.values())
    low_rank = sum(2 * (d_in + d_out) for d_in, d_out in LAYERS.values())
    product, slot = FLoRA(5, 1.0, "product", ranks), FLoRA(5, 1.0, "slot", ranks)
    assert product.upload_bytes(product.contribution(state, 10, 2, client_id=1), 2) == 4 * (dense + head + 1)
    assert slot.upload_bytes(slot.contribution(state, 10, 2, client_id=1), 2) == 4 * (low_rank + head + 1)
    g = global_state(ranks)
    assert product.download_bytes(product.broadcast(g, 2)) == 4 * (dense + head)


def test_delta_to_lora_factors_reproduce_the_delta():
    rng = np.random.default_rng(3)
    delta = rng.normal(size=(10, 3)) @ rng.normal(size=(3, 12))
    assert numerical_rank(delta) == 3
    b, a = delta_to_lora(delta, 2.0, 5)
    assert b.shape == (10, 5) and a.shape == (5, 12)
    np.testing.assert_allclose(2.0 * b.astype(np.float64) @ a, delta, atol=1e-5)


# ---------------------------------------------------------------------------------- on models

def layer_update(model, module: str) -> torch.Tensor:
    """A peft LoRA layer's effective update Delta W, read from its forward pass on the identity
    (independently of peft's own delta computation): layer(I) - base_layer(I) = I Delta W^T."""
    layer = dict(model.named_modules())[module]
    eye = torch.eye(layer.base_layer.in_features)
    with torch.no_grad():
        return (layer(eye) - layer.base_layer(eye)).T


def tiny_dataset(n, seed):
    from privlora.tasks.data import LabelledData, tokenize
    from privlora.tasks.models import load_tokenizer

    texts = ["a gorgeous, witty, seductive movie.", "dull", "the plot is nothing but boilerplate clichés",
             "an utterly charming and hilarious film", "rarely has so much been done with so little"]
    rng = np.random.default_rng(seed)
    data = LabelledData([texts[i % len(texts)] for i in range(n)], rng.integers(0, 2, n), None, ["rotten", "fresh"])
    return tokenize(data, load_tokenizer("embedded:minilm"), 24)


@pytest.mark.parametrize("form", ["product", "slot"])
def test_a_federated_round_through_messages_merges_into_every_base(tiny_cfg, tmp_path, form):
    """Tiny BERT, DP clients of ranks 2, 1 and 3 (of 4), bytes between them: after the round the
    server's base weight is W0 + s sum p_k B_k A_k; the next round's clients build on the same
    merged base with fresh adapters; the exported adapter reloads with peft to the same logits."""
    from peft import PeftModel

    from privlora.federation.client import Client
    from privlora.federation.server import Server

    cfg = tiny_cfg(federation={"strategy": "flora", "flora_form": form, "server_momentum": 0.0},
                   lora={"ranks": [2, 1, 3, 1], "r": 2, "alpha": 3.0}, training={"local_steps": 2, "batch_size": 8})
    s = 3.0 / 2
    base = tiny_bert()
    w0 = {n: p.detach().numpy().copy() for n, p in base.named_parameters()}
    test_ds = tiny_dataset(8, 9)
    server = Server(cfg, strategy_from_config(cfg), base, test_ds)
    sizes = {0: 16, 1: 24, 2: 40}
    clients = {k: Client(k, cfg, base, tiny_dataset(n, k), strategy_from_config(cfg)) for k, n in sizes.items()}
    updates, states = [], {}
    from privlora.federation.messages import Message

    for k, client in clients.items():
        msg = Message.from_bytes(server.instruction(1, k), "round_instruction")
        result = client.train(msg.tensors, 1, msg.header["rank"])
        states[k] = result.state
        report, tensors = server.read_update(client.encode_update(result, 1, msg.header["rank"]), 1, set(clients))
        assert report.upload_bytes > 0 and report.next_rank == cfg.client_rank(k)
        updates.append(tensors)
    server.aggregate(updates)

    total = sum(sizes.values())
    for module in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"):
        prefix = f"base_model.model.{module}"
        expected = w0[f"{module}.weight"].astype(np.float64) + sum(
            s * sizes[k] / total * states[k][f"{prefix}.lora_B.weight"].astype(np.float64) @ states[k][f"{prefix}.lora_A.weight"]
            for k in clients
        )
        merged = dict(server.global_model.named_parameters())[f"{prefix}.base_layer.weight"].detach().numpy()
        np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-6)
        assert np.abs(expected - w0[f"{module}.weight"]).max() > 1e-4  # the round really moved it
        # the adapter restarted: the global model's adapter adds nothing
        assert torch.count_nonzero(layer_update(server.global_model, prefix)) == 0
        # a client of the next round builds on the merged base with a fresh adapter
        payload = Message.from_bytes(server.instruction(2, 3), "round_instruction").tensors
        model = Client(3, cfg, base, tiny_dataset(8, 3), strategy_from_config(cfg)).build_model(payload, 1)
        np.testing.assert_allclose(dict(model.named_parameters())[f"{prefix}.base_layer.weight"].detach().numpy(), merged, rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(layer_update(model, prefix)) == 0
    assert np.array_equal(dict(base.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"].detach().numpy(),
                          w0["bert.encoder.layer.0.attention.self.query.weight"])  # the shared base is untouched

    exported = server.export_model()
    exported.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    ids, mask, _ = test_ds.tensors
    with torch.inference_mode():
        expected_logits = server.global_model.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(exported.eval()(input_ids=ids, attention_mask=mask).logits, expected_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_merged_minilm_equals_base_plus_scaled_sum_of_products():
    """On the real MiniLM: three clients of ranks 8, 2 and 5 train (here: random B and head,
    peft's own A); after one FLoRA round the server's weights of layer 0's query and layer 5's
    value equal W0 + (alpha/r) sum_k p_k B_k A_k, and its logits equal those of a plain
    transformers model whose weights were set to that sum by hand."""
    from transformers import AutoModelForSequenceClassification

    from privlora.tasks.adapters import adapter_state, load_adapter_state, make_peft_model
    from privlora.core.config import config_from_dict
    from privlora.tasks.models import load_classifier, load_tokenizer, resolve_model_path
    from privlora.federation.server import Server

    torch.set_num_threads(1)
    cfg = config_from_dict({
        "seed": 1, "data": {"num_clients": 3}, "lora": {"r": 4, "alpha": 6.0, "ranks": [8, 2, 5]},
        "federation": {"strategy": "flora", "clients_per_round": 3, "server_momentum": 0.0},
    })
    s = 6.0 / 4
    base = load_classifier(cfg.model.path, 2, cfg.seed)
    server = Server(cfg, strategy_from_config(cfg), base, None)
    sizes = [30, 50, 20]
    rng = np.random.default_rng(0)
    contributions, states = [], []
    for k, n in enumerate(sizes):
        strategy = strategy_from_config(cfg)
        model = make_peft_model(base, cfg, cfg.client_rank(k))
        payload = server.strategy.broadcast(server.global_state, cfg.client_rank(k))
        state = strategy.local_start(payload, adapter_state(model))
        state = {key: (rng.normal(scale=0.02, size=v.shape).astype(np.float32) if ".lora_B." in key or "classifier" in key else v)
                 for key, v in state.items()}
        load_adapter_state(model, state)  # what the client's model computes is what it contributes
        states.append(state)
        contributions.append(strategy.contribution(state, n, cfg.client_rank(k), client_id=k))
        del model
    server.aggregate(contributions)

    merged_by_hand = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path(cfg.model.path)), num_labels=2).eval()
    params = dict(merged_by_hand.named_parameters())
    global_params = dict(server.global_model.named_parameters())
    adapted = [n for n in global_params if n.endswith(".base_layer.weight")]
    assert len(adapted) == 12  # query and value in 6 layers
    for name in adapted:
        module = name[len("base_model.model.") : -len(".base_layer.weight")]
        w0 = dict(base.named_parameters())[f"{module}.weight"].detach().numpy().astype(np.float64)
        update = sum(
            s * (n / sum(sizes)) * st[f"base_model.model.{module}.lora_B.weight"].astype(np.float64) @ st[f"base_model.model.{module}.lora_A.weight"]
            for st, n in zip(states, sizes)
        )
        if module in ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.5.attention.self.value"):
            np.testing.assert_allclose(global_params[name].detach().numpy(), w0 + update, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            params[f"{module}.weight"].copy_(torch.from_numpy(w0 + update))
    with torch.no_grad():
        for part in ("weight", "bias"):
            head = sum((n / sum(sizes)) * st[f"base_model.model.classifier.{part}"] for st, n in zip(states, sizes))
            params[f"classifier.{part}"].copy_(torch.from_numpy(head))
    tok = load_tokenizer(cfg.model.path)
    batch = tok(["a gorgeous, witty, seductive movie.", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        got = server.global_model.eval()(**batch).logits
        expected = merged_by_hand(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
