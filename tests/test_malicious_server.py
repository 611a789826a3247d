"""A malicious server against the client node (issue 29): one test per attack, each driven through
`ClientNode.handle` with the messages such a server builds (`privlora.federation.messages`, and the
`secagg` server's own bytes), with pinned signing keys.

1. size a secure sum around a victim (the victim and one colluder);
2. put one release into two secure sums and subtract;
3. end an honest sum of 3 with one dropout during masked input (a sum of 2);
4. send crafted weights (3e38 in the head, NaN, a base-weight delta for a non-FLoRA strategy);
9. read the local training's wall-clock seconds.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from privlora.core.config import ConfigError, config_from_dict
from privlora.federation.messages import Message, MessageError, bytes_tensor, tensor_bytes


def cfg_for(tiny_model_dir, registry=None, **over):
    raw = {
        "name": "mal", "seed": 5, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 240, "num_clients": 4, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": "ffa", "rounds": 2, "clients_per_round": 3, "server_momentum": 0.0},
        "training": {"local_steps": 1, "batch_size": 24, "physical_batch_size": 24},
        "privacy": {"noise_multiplier": 1.0},
        "secagg": {"enabled": True, "bits": 64, "value_bound": 8.0, "max_weight": 1000.0,
                   **({"key_registry": str(registry)} if registry else {})},
    }
    for sec, vals in over.items():
        raw.setdefault(sec, {}).update(vals)
    return config_from_dict(raw)


def write_registry(folder, ids):
    """Pinned Ed25519 keys: (private keys, the registry file the config names)."""
    from privlora.federation.keys import FORMAT
    from secagg import generate_signing_keys

    private, public = generate_signing_keys(ids)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "registry.json"
    path.write_text(json.dumps({"format": FORMAT, "keys": {str(c): k.hex() for c, k in public.items()}}), encoding="utf-8")
    return private, path


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_registry(tmp_path_factory.mktemp("keys"), range(4))


@pytest.fixture(scope="module")
def federation(tiny_model_dir, keys):
    """The server and every client of one small federation, built once (nodes are made per test)."""
    from privlora.federation.startup import build_federation

    return build_federation(cfg_for(tiny_model_dir, keys[1]))


def nodes_for(fed, keys, tmp_path, ids):
    """Fresh nodes for ``ids`` (pinned keys, each recording its secure sums in its own folder)."""
    from privlora.federation.node import ClientNode

    return {c: ClientNode(fed.clients[c], signing_key=keys[0][c], folder=tmp_path / f"node-{c}") for c in ids}


def train(fed, nodes, rnd, payload=None):
    """Send each node round ``rnd``'s instruction; return {client: reply message}."""
    replies = {}
    for c, node in nodes.items():
        blob = fed.server.instruction(rnd, c, node.client.planned_mechanism())
        if payload is not None:
            msg = Message.from_bytes(blob, "round_instruction")
            blob = Message("round_instruction", msg.header, payload(dict(msg.tensors))).to_bytes()
        replies[c] = Message.from_bytes(node.handle(blob), ("client_update", "refusal"))
    return replies


def request(rnd, cid, stage, blob=b"", invited=None, nonce=None):
    header = {"round": rnd, "client_id": cid, "stage": stage}
    if invited is not None:
        header["invited"] = list(invited)
    if nonce is not None:
        header["session_nonce"] = nonce.hex()
    return Message("secagg_request", header, {"blob": bytes_tensor(blob)}).to_bytes()


def node_plan(cfg, layout):
    """The plan (and encoding) the nodes resolve: a server that wants its messages accepted uses it."""
    from privlora.federation.secure_sum import session_plan

    return session_plan(cfg, layout)


def run_session(nodes, cfg, rnd, layout, invited, *, drop=None, skip_min_check=False):
    """A server runs one secure sum with ``nodes`` through `ClientNode.handle`, inviting
    ``invited``. ``drop`` = {stage: clients that fall silent from then on};
    ``skip_min_check``: a malicious server that does not abort below the plan's min_clients.
    Returns (the server's result or the error it aborted with, {client: error it refused with},
    {client: stages it answered})."""
    from secagg import STAGES, SecAggError, SecAggServer

    plan, encoding = node_plan(cfg, layout)
    nonce = os.urandom(32)
    server = SecAggServer(plan, encoding, rnd, session_nonce=nonce)
    if skip_min_check:
        server._need_min_clients = lambda *a, **k: None
    refused, answered, dead = {}, {c: [] for c in nodes}, set()
    messages = {c: request(rnd, c, STAGES[0], invited=invited, nonce=nonce) for c in nodes}
    try:
        for i, stage in enumerate(STAGES):
            dead |= set((drop or {}).get(stage, ()))
            for c, blob in messages.items():
                if c in dead or c in refused:
                    continue
                try:
                    reply = Message.from_bytes(nodes[c].handle(blob), "secagg_reply")
                except (SecAggError, MessageError) as exc:
                    refused[c] = exc
                    continue
                answered[c].append(stage)
                server.receive(c, tensor_bytes(reply))
            recipients = server.close_stage()
            if i + 1 < len(STAGES):
                messages = {c: request(rnd, c, STAGES[i + 1], server.message_for(c)) for c in recipients}
    except SecAggError as exc:
        return exc, refused, answered
    return server.result, refused, answered


def layout_of(reply):
    return [(str(k), tuple(int(x) for x in s)) for k, s in reply.header["layout"]]


# ------------------------------------------------------------------ attack 1


def test_attack1_a_victim_refuses_a_secure_sum_sized_around_it_with_one_colluder(tiny_model_dir, federation, keys, tmp_path):
    from secagg import TooFewClients

    cfg = federation.cfg
    nodes = nodes_for(federation, keys, tmp_path, [0, 1])
    replies = train(federation, nodes, 1)
    layout = layout_of(replies[0])
    # the server invites the victim (0) and its colluder (1) alone: threshold 2 if the nodes
    # sized the session from the invitation, and the colluder subtracts its own input
    result, refused, answered = run_session(nodes, cfg, 1, layout, invited=[0, 1])
    assert 0 in refused and "at least 3 live inputs" in str(refused[0])
    assert answered[0] == []  # not even a key advertisement left the victim
    assert not hasattr(result, "field_sum")

    # the invitation claims three clients, but only the two advertise: the key list of 2 is
    # refused by the victim's own plan (min_clients 3), bound into the session's digest
    nodes = nodes_for(federation, keys, tmp_path / "again", [0, 1])
    train(federation, nodes, 1)
    result, refused, answered = run_session(nodes, cfg, 1, layout, invited=[0, 1, 2], skip_min_check=True)
    assert isinstance(refused.get(0), TooFewClients)
    assert answered[0] == ["advertise_keys"]  # no share, no masked input
    assert not hasattr(result, "field_sum")

    # nor a session larger than the node's config allows (clients_per_round = 3)
    nodes = nodes_for(federation, keys, tmp_path / "big", [0])
    train(federation, nodes, 1)
    with pytest.raises(MessageError, match="at most federation.clients_per_round = 3"):
        nodes[0].handle(request(1, 0, "advertise_keys", invited=[0, 1, 2, 3], nonce=os.urandom(32)))


# ------------------------------------------------------------------ attack 2


def test_attack2_one_release_never_enters_two_secure_sums(tiny_model_dir, keys, tmp_path):
    from privlora.federation.node import ClientNode
    from privlora.federation.startup import build_federation

    cfg = cfg_for(tiny_model_dir, keys[1], federation={"clients_per_round": 4})
    fed = build_federation(cfg)
    nodes = nodes_for(fed, keys, tmp_path, [0, 1, 2, 3])
    layout = layout_of(train(fed, nodes, 1)[0])
    first, refused, _ = run_session(nodes, cfg, 1, layout, invited=[0, 1, 2, 3])
    assert hasattr(first, "field_sum") and not refused and list(first.survivors) == [0, 1, 2, 3]

    # the server instructs round 1 again (a node would re-arm its kept release) for a second
    # sum over {1, 2, 3}: the difference of the two sums would be client 0's exact update
    again = train(fed, {c: nodes[c] for c in (1, 2, 3)}, 1)
    assert all(m.kind == "refusal" and m.header["code"] == "entered_secure_sum" for m in again.values())
    second, refused, answered = run_session({c: nodes[c] for c in (1, 2, 3)}, cfg, 1, layout, invited=[1, 2, 3])
    assert not hasattr(second, "field_sum") and sorted(refused) == [1, 2, 3]
    assert all("already entered secure-sum session" in str(e) for e in refused.values())
    assert all(a == [] for a in answered.values())

    # the record is on disk: a node restarted from its folder refuses as well
    reborn = ClientNode(fed.clients[1], signing_key=keys[0][1], folder=tmp_path / "node-1")
    blob = fed.server.instruction(1, 1, reborn.client.planned_mechanism())
    msg = Message.from_bytes(reborn.handle(blob), ("client_update", "refusal"))
    assert msg.kind == "refusal" and "already entered a secure sum" in msg.header["reason"]
    recorded = json.loads(next((tmp_path / "node-1").glob("secure-sums-*.json")).read_text())
    assert list(recorded["rounds"]) == ["1"]


def test_attack2_without_a_folder_the_record_travels_with_the_nodes_state(tiny_model_dir, federation, keys, tmp_path):
    from privlora.federation.node import ClientNode

    # a Flower node without a folder is rebuilt for every message from its exported state
    nodes = {c: ClientNode(federation.clients[c], signing_key=keys[0][c]) for c in (0, 1, 2)}
    layout = layout_of(train(federation, nodes, 1)[0])
    result, refused, _ = run_session(nodes, federation.cfg, 1, layout, invited=[0, 1, 2])
    assert hasattr(result, "field_sum") and not refused
    reborn = ClientNode(federation.clients[0], signing_key=keys[0][0])
    reborn.import_state(nodes[0].export_state())
    again = train(federation, {0: reborn}, 1)[0]
    assert again.kind == "refusal" and again.header["code"] == "entered_secure_sum"


def test_a_damaged_secure_sum_record_is_refused_by_name(tiny_model_dir, federation, keys, tmp_path):
    from privlora.federation.node import ClientNode

    folder = tmp_path / "node"
    nodes = {c: ClientNode(federation.clients[c], signing_key=keys[0][c], folder=folder if c == 0 else tmp_path / f"n{c}")
             for c in (0, 1, 2)}
    layout = layout_of(train(federation, nodes, 1)[0])
    run_session(nodes, federation.cfg, 1, layout, invited=[0, 1, 2])
    record = next(folder.glob("secure-sums-*.json"))
    record.write_text(record.read_text()[:5])
    with pytest.raises(MessageError, match="is not a secure-sum record"):
        ClientNode(federation.clients[0], signing_key=keys[0][0], folder=folder)


# ------------------------------------------------------------------ attack 3


def test_attack3_a_sum_of_3_with_one_dropout_during_masked_input_aborts_not_completes_over_2(tiny_model_dir, federation, keys, tmp_path):
    from secagg import TooFewClients, TooFewSurvivors

    cfg = federation.cfg
    nodes = nodes_for(federation, keys, tmp_path, [0, 1, 2])
    layout = layout_of(train(federation, nodes, 1)[0])
    # an honest server: client 2 dies before its masked input; the session aborts
    result, refused, answered = run_session(nodes, cfg, 1, layout, invited=[0, 1, 2], drop={"masked_input": {2}})
    assert isinstance(result, TooFewSurvivors), result
    assert all("unmasking" not in a and "consistency_check" not in a for a in answered.values())

    # a server that does not abort: the survivor list names 2 clients, and both refuse it
    nodes = nodes_for(federation, keys, tmp_path / "mal", [0, 1, 2])
    train(federation, nodes, 1)
    result, refused, answered = run_session(nodes, cfg, 1, layout, invited=[0, 1, 2], drop={"masked_input": {2}},
                                            skip_min_check=True)
    assert isinstance(refused.get(0), TooFewClients) and isinstance(refused.get(1), TooFewClients)
    assert all("consistency_check" not in a and "unmasking" not in a for a in answered.values())
    assert not hasattr(result, "field_sum")


# ------------------------------------------------------------------ attack 4


def head_key(tensors):
    return next(k for k in sorted(tensors) if "classifier" in k and k.endswith("weight"))


@pytest.mark.parametrize("value, says", [(3e38, "above federation.broadcast_bound"), (np.nan, "non-finite")])
def test_attack4_crafted_head_weight_is_refused_before_any_training(tiny_model_dir, federation, keys, tmp_path, monkeypatch, value, says):
    from privlora.federation.client import Client

    trained = []
    monkeypatch.setattr(Client, "train", lambda self, *a, **k: trained.append(1) or pytest.fail("trained on crafted weights"))
    nodes = nodes_for(federation, keys, tmp_path, [0])

    def craft(t):
        k = head_key(t)
        t[k] = t[k].copy()
        t[k][0, 0] = value
        return t

    reply = train(federation, nodes, 1, payload=craft)[0]
    assert reply.kind == "refusal" and says in reply.header["reason"] and head_key(federation.server.global_state) in reply.header["reason"]
    assert trained == []


def test_attack4_a_base_weight_delta_is_refused_by_a_strategy_that_does_not_merge(tiny_model_dir, federation, keys, tmp_path):
    nodes = nodes_for(federation, keys, tmp_path, [0])
    name = "base_delta/base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight"

    def craft(t):
        return {**t, name: np.full((16, 16), 0.5, dtype=np.float32)}

    reply = train(federation, nodes, 1, payload=craft)[0]
    assert reply.kind == "refusal" and name in reply.header["reason"] and "flora only" in reply.header["reason"]


@pytest.mark.parametrize("header, says", [
    ({"strategy": "flora"}, "this node's config runs 'ffa'"),
    ({"rank": 3}, "not an integer in [1, 2]"),
    ({"rank": 0}, "not an integer in [1, 2]"),
    ({"round": 0}, "round 0 is not an integer >= 1"),
])
def test_attack4_an_instruction_for_another_strategy_or_rank_is_refused(tiny_model_dir, federation, keys, tmp_path, header, says):
    node = nodes_for(federation, keys, tmp_path, [0])[0]
    msg = Message.from_bytes(federation.server.instruction(1, 0, node.client.planned_mechanism()), "round_instruction")
    reply = Message.from_bytes(node.handle(Message("round_instruction", {**msg.header, **header}, msg.tensors).to_bytes()),
                               ("client_update", "refusal"))
    assert reply.kind == "refusal" and says in reply.header["reason"]


def test_strategies_declare_their_incoming_fields(tiny_model_dir):
    from privlora.strategies import strategy_from_config
    from privlora.tasks.adapters import adapter_state
    from privlora.tasks.registry import task_for
    from tests.conftest import tiny_bert

    base = tiny_bert()
    for strategy, merges in (("ffa", False), ("fedit", False), ("hetlora", False), ("flora", True)):
        cfg = cfg_for(tiny_model_dir, federation={"strategy": strategy}, secagg={"enabled": False})
        template = adapter_state(task_for(cfg).make_adapter(base, 2))
        fields = strategy_from_config(cfg).incoming(template, 2)
        deltas = [k for k in fields if k.startswith("base_delta/")]
        assert bool(deltas) == merges, strategy
        assert any("classifier" in k for k in fields)
        sends_a = any(".lora_A." in k for k in fields)  # FFA derives A from a shared seed, FLoRA starts fresh
        assert sends_a == (strategy in ("fedit", "hetlora")), strategy


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_attack4_an_update_that_would_be_non_finite_is_never_released(tiny_model_dir, keys, tmp_path):
    from privlora.federation.startup import build_federation

    # a node whose bound lets 3e38 in: local training then overflows, and the node refuses to
    # release rather than send inf/NaN (which would say whether a record was sampled)
    cfg = cfg_for(tiny_model_dir, keys[1], federation={"broadcast_bound": 1e39})
    fed = build_federation(cfg)
    nodes = nodes_for(fed, keys, tmp_path, [0])

    def craft(t):
        k = head_key(t)
        t[k] = np.full_like(t[k], 3e38)
        return t

    reply = train(fed, nodes, 1, payload=craft)[0]
    assert reply.kind == "refusal" and "non-finite" in reply.header["reason"] and "not released" in reply.header["reason"]
    assert nodes[0].export_state()["pending"] is None  # nothing kept for a secure sum either


def test_a_non_finite_per_example_gradient_contributes_zero_before_clipping():
    import torch
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from privlora.federation.client import zero_nonfinite_samples

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")  # example 2's gradient is NaN
    y = torch.randn(4, 1)
    clip = 0.5

    def model():
        torch.manual_seed(1)
        return torch.nn.Linear(3, 1)

    # reference, computed apart: each finite example's gradient clipped to C, summed, / batch size
    ref = model()
    total = [torch.zeros_like(p) for p in ref.parameters()]
    for i in (0, 1, 3):
        ref.zero_grad()
        ((ref(x[i : i + 1]) - y[i : i + 1]) ** 2).mean().backward()
        grads = [p.grad.clone() for p in ref.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        total = [t + g * min(1.0, clip / (float(norm) + 1e-6)) for t, g in zip(total, grads)]
    want = [t / 4 for t in total]

    gs = GradSampleModule(model())
    opt = DPOptimizer(torch.optim.SGD(gs.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=4)
    opt.zero_grad()
    ((gs(x) - y) ** 2).mean().backward()
    assert zero_nonfinite_samples(opt.params) == 1
    opt.step()
    for p, w in zip(gs.parameters(), want):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ attack 9


def test_attack9_a_dp_client_sends_no_training_time_nor_loss(tiny_model_dir, federation, keys, tmp_path):
    nodes = nodes_for(federation, keys, tmp_path, [0, 1])
    replies = train(federation, nodes, 1)
    for reply in replies.values():
        h = reply.header
        assert h["seconds"] is None and h["train_loss"] is None and h["num_examples"] is None
        assert reply.tensors == {}  # under secure aggregation the contribution stays on the node
    # what is left in the header is the same for every client but its id, except the mechanism
    # (public: computed from the config and the client's dataset size, announced at describe)
    a, b = (dict(r.header) for r in replies.values())
    for h in (a, b):
        h.pop("client_id"), h.pop("mechanism")
    assert a == b


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("over, field, says", [
    ({"secagg": {"dropout_rate": 1.0}}, "secagg.dropout_rate", "[0, 1)"),
    ({"secagg": {"dropout_rate": -0.1}}, "secagg.dropout_rate", "[0, 1)"),
    # 3 per round, 34% dropouts: 1 dropout leaves 2 live inputs
    ({"secagg": {"dropout_rate": 0.34}}, "secagg.dropout_rate", "leaves 2 live inputs, fewer than the 3"),
    # 5 per round, threshold 5, 20% dropouts: 4 live inputs cannot reach t = 5
    ({"federation": {"clients_per_round": 5}, "data": {"num_clients": 5}, "secagg": {"threshold": 5, "dropout_rate": 0.2}},
     "secagg.dropout_rate", "fewer than the 5"),
    ({"federation": {"clients_per_round": 5}, "data": {"num_clients": 5}, "secagg": {"threshold": 2}}, "secagg.threshold", "above half"),
    ({"secagg": {"threshold": 4}}, "secagg.threshold", "at most"),
    ({"federation": {"clients_per_round": 2}}, "federation.clients_per_round", "at least 3"),
    ({"federation": {"broadcast_bound": 0.0}}, "federation.broadcast_bound", "finite number > 0"),
    ({"federation": {"broadcast_bound": float("inf")}}, "federation.broadcast_bound", "finite number"),
    ({"federation": {"broadcast_bound": float("nan")}}, "federation.broadcast_bound", "finite number"),
])
def test_config_refuses_sessions_and_bounds_it_cannot_keep(tiny_model_dir, over, field, says):
    with pytest.raises(ConfigError) as exc:
        cfg_for(tiny_model_dir, **over)
    assert field in str(exc.value) and says in str(exc.value)


def test_config_sizes_every_secure_sum_from_its_own_fields(tiny_model_dir):
    from privlora.core.config import ExperimentConfig, secure_sum_size

    z = secure_sum_size(cfg_for(tiny_model_dir))
    assert (z.size, z.threshold, z.least, z.dropouts) == (3, 2, 3, 0)  # 3 live inputs, never 2
    z = secure_sum_size(cfg_for(tiny_model_dir, federation={"clients_per_round": 4}, secagg={"dropout_rate": 0.25}))
    assert (z.size, z.threshold, z.least, z.dropouts) == (4, 3, 3, 1)
    # SecAgg+ (degree 4 of 10): t = 3, and lists shorter than 10 - floor(0.1 x 10) = 9 are refused
    z = secure_sum_size(cfg_for(tiny_model_dir, data={"num_clients": 10}, federation={"clients_per_round": 10},
                                secagg={"neighbours": 4}))
    assert (z.size, z.degree, z.threshold, z.least) == (10, 4, 3, 9)
    # the default run (no secure aggregation) is valid and its bound is loose
    d = ExperimentConfig()
    assert d.federation.broadcast_bound == 1e4 and d.secagg.dropout_rate == 0.1
    # the node's secagg plan is the config's
    from privlora.federation.secure_sum import session_plan

    plan, _ = session_plan(cfg_for(tiny_model_dir), [("x", (4,)), ("__weight__", (1,))])
    assert (plan.n_max, plan.threshold, plan.min_clients) == (3, 2, 3)
