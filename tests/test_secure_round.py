"""A federated round under secure aggregation gives the same global adapter as in the clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from privlora.core.config import ConfigError, config_from_dict
from privlora.transports.inprocess import run_experiment


def cfg_for(tiny_model_dir, strategy, secure, bits=64, **fed):
    return config_from_dict({
        "name": "sec", "seed": 4, "threads": 1,
        "model": {"path": str(tiny_model_dir), "max_length": 32},
        "data": {"max_examples": 300, "num_clients": 4, "partition": "iid", "test_fraction": 0.2},
        "lora": {"r": 2, "alpha": 4.0},
        "federation": {"strategy": strategy, "rounds": 1, "clients_per_round": 3, "server_momentum": 0.0, **fed},
        "training": {"local_steps": 2, "batch_size": 24, "physical_batch_size": 16},
        "privacy": {"noise_multiplier": 1.2},
        "secagg": {"enabled": secure, "bits": bits, "value_bound": 8.0, "max_weight": 1000.0},
    })


def effective_update(adapter_dir):
    """Each adapted layer's update s * B @ A (FLoRA's export rank may differ), and the head."""
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for k, v in state.items():
        if ".lora_A." in k:
            b = state[k.replace(".lora_A.", ".lora_B.")]
            out[k.replace(".lora_A.weight", "")] = (conf["lora_alpha"] / conf["r"]) * (b.astype(np.float64) @ v.astype(np.float64))
        elif ".lora_B." not in k:
            out[k] = v
    return out


@pytest.mark.parametrize("strategy, bits, fed, atol", [
    ("ffa", 32, {}, 1e-5),
    ("ffa", 64, {}, 1e-6),
    ("flora", 64, {"flora_form": "product"}, 1e-6),
    ("hetlora", 64, {}, 1e-6),
])
def test_one_round_with_secure_aggregation_matches_the_clear_sum(tiny_model_dir, tmp_path, strategy, bits, fed, atol):
    clear, secure = tmp_path / "clear", tmp_path / "secure"
    run_experiment(cfg_for(tiny_model_dir, strategy, False, **fed), clear, progress=False)
    run_experiment(cfg_for(tiny_model_dir, strategy, True, bits, **fed), secure, progress=False)
    a, b = effective_update(clear / "adapter"), effective_update(secure / "adapter")
    assert a.keys() == b.keys()
    # 32 bits: 2^32 levels over 3 x (8 x 1000) per coordinate, steps of ~1e-5 before dividing
    # by the summed weight (~180 examples); 64 bits: float32 rounding of the messages dominates
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=atol, rtol=1e-4, err_msg=k)
    row = [json.loads(x) for x in (secure / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["secagg"]["clipped"] == 0 and len(row["secagg"]["survivors"]) == 3
    assert all(pc["upload_bytes"] > 0 for pc in row["per_client"])


def test_the_server_never_sees_a_single_contribution_or_dataset_size(tiny_model_dir, tmp_path, monkeypatch):
    from privlora.federation.server import Server

    seen = []
    real = Server.read_update

    def spy(self, blob, rnd, expected):
        report, tensors = real(self, blob, rnd, expected)
        seen.append((report.num_examples, dict(tensors)))
        return report, tensors

    monkeypatch.setattr(Server, "read_update", spy)
    run_experiment(cfg_for(tiny_model_dir, "ffa", True), tmp_path / "run", progress=False)
    assert len(seen) == 3 and all(n is None and t == {} for n, t in seen)


def test_clipping_is_reported_not_silent(tiny_model_dir, tmp_path, capsys):
    import dataclasses

    cfg = cfg_for(tiny_model_dir, "ffa", True)
    cfg = dataclasses.replace(cfg, secagg=dataclasses.replace(cfg.secagg, value_bound=1e-6))
    run_experiment(cfg, tmp_path / "run", progress=False)
    row = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["secagg"]["clipped"] > 0
    assert "clipped" in capsys.readouterr().err


def test_slot_form_stacking_is_refused_under_secure_aggregation(tiny_model_dir):
    with pytest.raises(ConfigError, match="flora_form = 'product'"):
        cfg_for(tiny_model_dir, "flora", True, flora_form="slot")


def test_secure_aggregation_never_runs_with_fewer_than_three_clients(tiny_model_dir, tmp_path):
    import dataclasses

    # one round costs 2.94 (q = 1/3, sigma 1.2, 2 steps) and a budget of 3.5 allows only one
    # round per client: in round 2 at most one of the 4 clients fits, below the 3 a secure sum needs
    cfg = cfg_for(tiny_model_dir, "ffa", True)
    cfg = dataclasses.replace(
        cfg,
        federation=dataclasses.replace(cfg.federation, rounds=3, min_clients=1),
        privacy=dataclasses.replace(cfg.privacy, budget_epsilon=3.5),
    )
    run_experiment(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "secure aggregation needs 3" in rows[-1]["stopped"]
    assert all(len(r["clients"]) >= 3 for r in rows[1:] if "stopped" not in r)
