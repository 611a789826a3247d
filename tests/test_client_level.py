"""Client-level DP (privacy.unit = 'client'): config refusals, clipping, the central and distributed
noise paths end to end on a tiny model, the integer secure sum, the accounting and verify."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from privlora.core.config import ConfigError


def client_cfg(tiny_cfg, noise="central", secagg=False, **privacy):
    p = {"unit": "client", "client_noise": noise, "client_clip": 0.5, "client_target_epsilon": 8.0, **privacy}
    sections = {"privacy": p, "federation": {"strategy": privacy.pop("strategy", "ffa") if "strategy" in privacy else "ffa",
                                            "weighting": "uniform", "rounds": 2, "clients_per_round": 3}}
    if secagg:
        sections["secagg"] = {"enabled": True}
    return tiny_cfg(**sections)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("noise,secagg", [("central", False), ("central", True), ("discrete_gaussian", True), ("skellam", True)])
def test_end_to_end_tiny_run_of_each_noise_kind(tiny_cfg, tmp_path, noise, secagg):
    from accounting.verify import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = client_cfg(tiny_cfg, noise, secagg)
    out = tmp_path / "run"
    run_experiment(cfg, out)
    rows = [r for r in read_metrics(out) if r["round"] >= 1]
    assert len(rows) == 2
    for r in rows:
        cl = r["client_level"]
        assert cl["unit"] == "client" and cl["noise"] == noise
        assert 0 < cl["epsilon_server_max"] <= 8.0 + 1e-6
        if noise != "central":
            assert cl["bits"] == 16 and cl["wraps_seen"] == 0 and cl["wrap_probability"] < 1e-3
    res = verify_run(out)
    assert res.ok, res.problems
