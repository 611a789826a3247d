"""Budgets bind, runs resume without lost or doubled charges, and `privlora verify` checks a run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from accounting import Ledger, get_accountant
from privlora.commands.cli import main
from privlora.core.config import config_from_dict
from privlora.transports.inprocess import run_experiment


def tiny(tiny_model_dir, **privacy):
    return config_from_dict({
        "name": "rb", "seed": 3, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 300, "num_clients": 4, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": "ffa", "rounds": 3, "clients_per_round": 3, "min_clients": 2},
        "training": {"local_steps": 2, "batch_size": 24, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.2, **privacy},
    })


def charges(out):
    return [(c.client, c.round, c.mechanism) for c in Ledger.open(out / "ledger.jsonl").charges]


def metrics(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "ledger")} for r in rows]


def test_a_binding_budget_is_never_exceeded_and_the_run_stops_cleanly(tiny_model_dir, tmp_path):
    # one round costs 2.94 and two cost 3.83 (q = 1/3, sigma 1.2, 2 steps): a budget of 3.5
    # allows each client one round only
    cfg = tiny(tiny_model_dir, budget_epsilon=3.5)
    out = tmp_path / "run"
    run_experiment(cfg, out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("refused") for r in rows)
    assert "stopped" in rows[-1] and "min_clients" in rows[-1]["stopped"]
    led = Ledger.open(out / "ledger.jsonl")
    pld = get_accountant("pld")
    for c, hist in led.histories().items():
        assert pld.epsilon(hist, cfg.privacy.delta) <= 3.5
        assert len(hist) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["stopped"] and max(v["epsilon"] for v in report["privacy"]["clients"].values()) <= 3.5
    assert main(["verify", str(out)]) == 0


def test_a_killed_run_resumes_with_the_same_ledger_metrics_and_adapter(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny(tiny_model_dir)
    whole = tmp_path / "whole"
    run_experiment(cfg, whole, progress=False)

    from privlora.federation.client import Client

    calls = {"n": 0}
    real = Client.handle

    def dies_in_round_2(self, instruction, progress=None):
        calls["n"] += 1
        if calls["n"] == 5:  # round 2, second client: its charge is on disk, its update is not
            raise KeyboardInterrupt
        return real(self, instruction, progress)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Client, "handle", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cut, progress=False)
    monkeypatch.setattr(Client, "handle", real)
    before = charges(cut)
    assert [r for _, r, _ in before].count(2) == 3  # round 2 was charged in full before training
    run_experiment(None, cut, progress=False, resume=True)

    assert charges(cut) == charges(whole)  # nothing lost, nothing charged twice
    assert metrics(cut) == metrics(whole)
    from safetensors.numpy import load_file

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert main(["verify", str(cut)]) == 0


def test_resume_refuses_a_changed_config_and_verify_fails_on_a_cut_ledger(tiny_model_dir, tmp_path, capsys):
    cfg = tiny(tiny_model_dir)
    out = tmp_path / "run"
    run_experiment(cfg, out, progress=False, stop_after=1)
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text(text.replace("rounds = 3", "rounds = 4"))
    assert main(["run", "--resume", str(out), "--quiet"]) == 2
    assert "different config.toml" in capsys.readouterr().err
    (out / "config.toml").write_text(text)
    lines = (out / "ledger.jsonl").read_text().splitlines(keepends=True)
    (out / "ledger.jsonl").write_text("".join(lines[:-1]))
    assert main(["verify", str(out)]) == 1
    assert "cut off" in capsys.readouterr().out
