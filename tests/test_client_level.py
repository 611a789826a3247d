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


def test_verify_refuses_an_edited_variance_or_bit_width(tiny_cfg, tmp_path):
    """Edit the per-client variance, or the bits, of a Skellam run's client-level ledger, and
    recompute the hash chain so only the numbers betray it: verify must refuse both."""
    import shutil

    from accounting.client_level import CLIENT_LEVEL_FILE
    from accounting.ledger import entry_hash
    from accounting.verify import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = client_cfg(tiny_cfg, "skellam", True)
    out = tmp_path / "run"
    run_experiment(cfg, out)
    assert verify_run(out).ok

    def edited(field, change):
        copy = tmp_path / f"edit-{field}"
        shutil.copytree(out, copy)
        path = copy / CLIENT_LEVEL_FILE
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        recs[1]["mechanism"][field] = change(recs[1]["mechanism"][field])
        prev = recs[0]["hash"]
        for r in recs[1:]:  # a careful forger re-chains every later line
            r["prev"] = prev
            r["hash"] = entry_hash(r)
            prev = r["hash"]
        path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in recs))
        # the anchors in metrics.jsonl name the old heads: move them too, so only the numbers differ
        rows = read_metrics(copy)
        heads = [recs[0]["hash"]] + [r["hash"] for r in recs[1:]]
        for row in rows:
            if "client_level" in row:
                row["client_level"]["ledger"]["head"] = heads[row["client_level"]["ledger"]["entries"]]
        (copy / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return verify_run(copy)

    more_noise = edited("variance", lambda v: v * 4.0)
    assert not more_noise.ok and any("epsilon" in p for p in more_noise.problems), more_noise.problems
    fewer_bits = edited("bits", lambda b: b - 4)
    assert not fewer_bits.ok and any("bits" in p for p in fewer_bits.problems), fewer_bits.problems
    # without re-chaining, the hash chain itself breaks
    copy = tmp_path / "plain-edit"
    shutil.copytree(out, copy)
    path = copy / CLIENT_LEVEL_FILE
    path.write_text(path.read_text().replace('"bits":16', '"bits":20', 1))
    assert any("hash does not match" in p for p in verify_run(copy).problems)
