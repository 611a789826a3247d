"""The round engine through the in-process transport: dropouts, aborted rounds, clients that
guard their own budget, pinned keys, and the secure noise source."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from accounting import Ledger
from privlora.commands.cli import main
from privlora.core.config import config_from_dict


def cfg_for(tiny_model_dir, **over):
    raw = {
        "name": "eng", "seed": 4, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 300, "num_clients": 5, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": "ffa", "rounds": 1, "clients_per_round": 5, "server_momentum": 0.0},
        "training": {"local_steps": 2, "batch_size": 24, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.2},
        "secagg": {"enabled": True, "bits": 64, "value_bound": 8.0, "max_weight": 1000.0},
    }
    for sec, vals in over.items():
        raw.setdefault(sec, {}).update(vals)
    return config_from_dict(raw)


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def head(adapter):
    state = load_file(str(adapter / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if "lora_B" in k or "classifier" in k}


def test_a_client_killed_after_key_sharing_is_recovered_and_its_charge_stays_spent(tiny_model_dir, tmp_path):
    from privlora.transports.inprocess import run_experiment

    # client 2 shares its keys, then dies before sending its masked input
    out = tmp_path / "drop"
    rec = run_experiment(cfg_for(tiny_model_dir), out, progress=False, drop={"masked_input": {2}})
    last = rows(out)[-1]
    assert "stopped" not in rec
    assert last["secagg"]["survivors"] == [0, 1, 3, 4] and last["secagg"]["dropped"] == [2]
    led = Ledger.open(out / "ledger.jsonl")
    assert sorted(c.client for c in led.charges) == [0, 1, 2, 3, 4]  # the dropout was charged and stays so
    assert last["epsilon"]["2"] == last["epsilon"]["0"] > 0
    assert main(["verify", str(out)]) == 0

    # the aggregate is the four survivors' sum: the same as a clear run where client 2 never answers
    clear = tmp_path / "clear"
    run_experiment(cfg_for(tiny_model_dir, secagg={"enabled": False}), clear, progress=False, drop={"train": {2}})
    assert rows(clear)[-1]["clients"] == [0, 1, 3, 4]
    a, b = head(out / "adapter"), head(clear / "adapter")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=1e-4, err_msg=k)


def test_too_many_dropouts_abort_the_round_before_any_unmasking_share_leaves(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from secagg import SecAggClient

    from privlora.transports.inprocess import run_experiment

    sent = []
    real = SecAggClient.handle

    def spy(self, blob):
        reply = real(self, blob)
        sent.append(self.stage.value)
        return reply

    monkeypatch.setattr(SecAggClient, "handle", spy)
    out = tmp_path / "abort"
    # 5 clients, threshold 3: three drop after sharing keys, two masked inputs are too few
    rec = run_experiment(cfg_for(tiny_model_dir), out, progress=False, drop={"masked_input": {0, 1, 2}})
    assert rec["stopped"] and rec["aborted"]
    assert "TooFewSurvivors" in rec["stopped"] and "--resume" in rec["stopped"]
    assert "done" not in sent and "signed" not in sent  # no client signed, none released an unmasking share
    last = rows(out)[-1]
    assert last["aborted"] and last["epsilon_max"] > 0  # the charges of the aborted round are shown as spent
    assert len(Ledger.open(out / "ledger.jsonl").charges) == 5
    assert "aborted" in capsys.readouterr().err
    # the global model is the untrained one: round 0's checkpoint is what a resume continues from
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == 0


def test_an_aborted_round_resumes_with_the_clients_whose_release_never_entered_a_sum(tiny_model_dir, tmp_path):
    from privlora.transports.inprocess import run_experiment

    # clients 0, 1, 2 die before their masked inputs; 3 and 4 send theirs, then the sum aborts
    cfg = cfg_for(tiny_model_dir)
    cut, fewer = tmp_path / "cut", tmp_path / "fewer"
    run_experiment(cfg, cut, progress=False, drop={"masked_input": {0, 1, 2}})
    run_experiment(None, cut, progress=False, resume=True)
    # on resume 3 and 4 refuse (their releases entered the aborted sum: never a second one);
    # round 1 runs with 0, 1 and 2, the charges already spent are never charged twice
    last = rows(cut)[-1]
    assert last["clients"] == [0, 1, 2] and sorted(last["refused"]) == ["3", "4"]
    assert all("already entered a secure sum" in r for r in last["refused"].values())
    assert [(c.client, c.round) for c in Ledger.open(cut / "ledger.jsonl").charges] == [(c, 1) for c in range(5)]
    # the same model as a run where 3 and 4 never answer the instruction
    run_experiment(cfg, fewer, progress=False, drop={"train": {3, 4}})
    a, b = head(fewer / "adapter"), head(cut / "adapter")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["verify", str(cut)]) == 0


def test_a_resumed_round_whose_releases_all_entered_a_sum_is_skipped_not_summed_again(tiny_model_dir, tmp_path):
    from privlora.transports.inprocess import run_experiment

    # every client sends its masked input, then 3 of 5 die before signing: below t = 3, abort
    cfg = cfg_for(tiny_model_dir, federation={"rounds": 2})
    cut = tmp_path / "cut"
    rec = run_experiment(cfg, cut, progress=False, drop={"consistency_check": {0, 1, 2}})
    assert rec["aborted"]
    run_experiment(None, cut, progress=False, resume=True)
    r1, r2 = [r for r in rows(cut) if r["round"] in (1, 2)]
    # round 1 is skipped: every release of it already entered the aborted sum
    assert r1["skipped"] and r1["clients"] == [] and sorted(r1["refused"]) == ["0", "1", "2", "3", "4"]
    assert r1["test_accuracy"] == rows(cut)[0]["test_accuracy"]  # the model is unchanged
    # round 2 runs, under new charges, with fresh releases
    assert r2["clients"] == [0, 1, 2, 3, 4] and "skipped" not in r2
    charges = [(c.client, c.round) for c in Ledger.open(cut / "ledger.jsonl").charges]
    assert charges == [(c, 1) for c in range(5)] + [(c, 2) for c in range(5)]
    assert r1["epsilon"]["0"] > 0 and r2["epsilon"]["0"] > r1["epsilon"]["0"]
    assert main(["verify", str(cut)]) == 0


# ---------------------------------------------------------------- a client guards its own budget


def guarded_node(tiny_model_dir, tmp_path, budget=None):
    """Client 0 behind a ClientGuard with ``budget``; None = halfway between what one and two
    rounds of its release cost by the PLD accountant (computed here, not by the guard)."""
    from privlora.federation.node import ClientGuard, ClientNode
    from privlora.core.accountants import get_accountant
    from privlora.federation.startup import build_federation

    cfg = cfg_for(tiny_model_dir, secagg={"enabled": False})
    fed = build_federation(cfg)
    client = fed.clients[0]
    planned = client.planned_mechanism()
    one = get_accountant("pld").epsilon([planned], cfg.privacy.delta)
    two = get_accountant("pld").epsilon([planned, planned], cfg.privacy.delta)
    budget = (one + two) / 2 if budget is None else budget
    guard = ClientGuard(tmp_path / "client0", 0, budget, cfg.privacy.delta, cfg.privacy.accountant, run={"name": cfg.name})
    return cfg, fed, ClientNode(client, guard=guard), budget


def test_a_client_refuses_an_instruction_over_its_own_budget_from_a_server_that_skips_admission(tiny_model_dir, tmp_path):
    from privlora.federation.messages import Message
    from privlora.core.accountants import get_accountant

    # the budget lies between the cost of one round and of two
    cfg, fed, node, budget = guarded_node(tiny_model_dir, tmp_path)
    planned = node.client.planned_mechanism()
    first = Message.from_bytes(node.handle(fed.server.instruction(1, 0, planned)), ("client_update", "refusal"))
    assert first.kind == "client_update"
    # the server (malicious, or buggy) skips admission and asks for a second round
    second = Message.from_bytes(node.handle(fed.server.instruction(2, 0, planned)), ("client_update", "refusal"))
    assert second.kind == "refusal" and f"over its budget {budget:g}" in second.header["reason"]
    led = Ledger.open(tmp_path / "client0" / "ledger.jsonl")
    assert [(c.client, c.round) for c in led.charges] == [(0, 1)]  # the refused round was never charged
    assert get_accountant("pld").epsilon(led.history(0), cfg.privacy.delta) <= budget


def test_a_client_refuses_a_mechanism_other_than_its_own_and_repeats_a_release_byte_for_byte(tiny_model_dir, tmp_path):
    import dataclasses

    from privlora.federation.messages import Message

    cfg, fed, node, _ = guarded_node(tiny_model_dir, tmp_path, budget=20.0)
    planned = node.client.planned_mechanism()
    weaker = dataclasses.replace(planned, noise_multiplier=planned.noise_multiplier / 2)
    reply = Message.from_bytes(node.handle(fed.server.instruction(1, 0, weaker)), ("client_update", "refusal"))
    assert reply.kind == "refusal" and "differs from its own" in reply.header["reason"]
    assert len(Ledger.open(tmp_path / "client0" / "ledger.jsonl").charges) == 0
    once = node.handle(fed.server.instruction(1, 0, planned))
    again = node.handle(fed.server.instruction(1, 0, planned))  # a resumed server asks for round 1 again
    assert once == again
    assert len(Ledger.open(tmp_path / "client0" / "ledger.jsonl").charges) == 1


# ---------------------------------------------------------------- pinned keys and secure noise


def test_pinned_keys_from_a_registry_made_by_privlora_keys(tiny_model_dir, tmp_path):
    from privlora.transports.inprocess import run_experiment

    assert main(["keys", "simulation", "--clients", "5", "--out", str(tmp_path / "keys")]) == 0
    registry = tmp_path / "keys" / "registry.json"
    assert oct((tmp_path / "keys" / "client-3.key").stat().st_mode & 0o777) == "0o600"
    out = tmp_path / "pinned"
    run_experiment(cfg_for(tiny_model_dir, secagg={"key_registry": str(registry)}), out, progress=False)
    assert rows(out)[-1]["secagg"]["survivors"] == [0, 1, 2, 3, 4]
    # a private key that does not match the registry is refused by name
    (tmp_path / "keys" / "client-1.key").write_bytes((tmp_path / "keys" / "client-2.key").read_bytes())
    with pytest.raises(Exception, match="does not match the client's key in the registry"):
        run_experiment(cfg_for(tiny_model_dir, secagg={"key_registry": str(registry)}), tmp_path / "bad", progress=False)


def test_the_secure_noise_source_is_standard_normal_and_replaces_opacus_noise():
    import torch
    from scipy import stats

    from privlora.federation.noise import SecureGaussian, noise_source

    z = SecureGaussian().standard_normal(200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert stats.kstest(z, "norm").pvalue > 1e-3
    from opacus.optimizers import optimizer as mod

    ref = torch.zeros(1000)
    torch.manual_seed(0)
    seeded = mod._generate_noise(2.0, ref)
    with noise_source("secure"):
        torch.manual_seed(0)
        a = mod._generate_noise(2.0, ref)
        torch.manual_seed(0)
        b = mod._generate_noise(2.0, ref)
    assert not torch.equal(a, b) and not torch.equal(a, seeded)  # not torch's seeded stream
    assert 1.8 < float(a.std()) < 2.2
    torch.manual_seed(0)
    assert torch.equal(mod._generate_noise(2.0, ref), seeded)  # restored after the block


# ---------------------------------------------------------------- a client's ledger against the server's


def test_verify_checks_a_client_ledger_against_the_servers_report(tiny_model_dir, tmp_path, capsys):
    from accounting import verify_client_ledger
    from privlora.transports.inprocess import run_experiment

    out = tmp_path / "run"
    run_experiment(cfg_for(tiny_model_dir, secagg={"enabled": False}), out, progress=False)
    server = Ledger.open(out / "ledger.jsonl")
    mine = [c for c in server.charges if c.client == 1]

    def client_ledger(name, config_sha256=server.header["run"]["config_sha256"], extra_round=None):
        led = Ledger.create(tmp_path / name / "ledger.jsonl", server.delta, server.header["accountant"], {1: 8.0},
                            run={"config_sha256": config_sha256})
        for c in mine:
            led.append(1, c.round, c.mechanism)
        if extra_round is not None:
            led.append(1, extra_round, mine[0].mechanism)
        return led.path

    good = client_ledger("good")
    res = verify_client_ledger(out, good)
    assert res.ok and res.client == 1 and res.reported >= res.epsilon > 0
    assert main(["verify", str(out), "--client-ledger", str(good)]) == 0
    assert "client 1's own ledger" in capsys.readouterr().out

    # a charge the server never recorded: its report would understate what client 1 spent
    extra = verify_client_ledger(out, client_ledger("extra", extra_round=7))
    assert any("round 7 but the server's ledger has no such charge" in p for p in extra.problems)
    assert any("understates" in p for p in extra.problems)
    other = verify_client_ledger(out, client_ledger("other", config_sha256="0" * 64))
    assert any("another config" in p for p in other.problems)
    assert main(["verify", str(out), "--client-ledger", str(tmp_path / "extra" / "ledger.jsonl")]) == 1
