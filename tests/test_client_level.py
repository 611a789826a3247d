"""Client-level DP (privacy.unit = 'client'): config refusals, clipping, the central and distributed
noise paths end to end on a tiny model, the integer secure sum, the accounting and verify."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from privlora.core.config import ConfigError


def client_cfg(tiny_cfg, noise="central", secagg=False, strategy="ffa", **privacy):
    p = {"unit": "client", "client_noise": noise, "client_clip": 0.5, "client_target_epsilon": 8.0, **privacy}
    sections = {"privacy": p, "federation": {"strategy": strategy, "weighting": "uniform", "rounds": 2, "clients_per_round": 3}}
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


def test_client_level_without_record_level_dp_reports_and_verifies(tiny_cfg, tmp_path):
    from accounting.verify import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = tiny_cfg(privacy={"enabled": False, "unit": "client", "client_noise": "central", "client_clip": 0.5,
                            "client_noise_multiplier": 1.5},
                   federation={"weighting": "uniform", "rounds": 2, "clients_per_round": 3})
    out = tmp_path / "run"
    run_experiment(cfg, out)
    rows = read_metrics(out)
    assert not (out / "ledger.jsonl").exists()
    assert rows[-1]["client_level"]["noise_multiplier"] == 1.5
    # a client took part in at most 2 rounds: its epsilon is that of 2 Gaussian releases at z = 1.5
    from dp_accounting.pld import privacy_loss_distribution as pld

    counts = {}
    for r in rows[1:]:
        for c in r["clients"]:
            counts[c] = counts.get(c, 0) + 1
    for c, k in counts.items():  # dp_accounting directly: k Gaussian mechanisms of std 1.5 x sensitivity, no sampling
        want = pld.from_gaussian_mechanism(1.5, value_discretization_interval=1e-4).self_compose(k).get_epsilon_for_delta(1e-5)
        assert rows[-1]["client_level"]["epsilon_server"][str(c)] == pytest.approx(want, rel=2e-3)
    md = (out / "report.md").read_text()
    assert "Client-level DP" in md and "No differential privacy" not in md
    report = json.loads((out / "report.json").read_text())
    assert report["client_level"]["noise"] == "central"
    res = verify_run(out)
    assert res.ok, res.problems
    assert res.client_level["server"] == pytest.approx({int(k): v for k, v in rows[-1]["client_level"]["epsilon_server"].items()})


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

CLIENT = {"unit": "client", "client_noise": "central", "client_clip": 1.0}


@pytest.mark.parametrize("raw,field,words", [
    ({"federation": {"strategy": "hetlora", "weighting": "uniform"}}, "federation.strategy", "depend on the client"),
    ({"federation": {"strategy": "flora", "flora_form": "slot", "weighting": "uniform"}}, "federation.flora_form", "slot"),
    ({"federation": {"strategy": "ffa", "weighting": "num_examples"}}, "federation.weighting", "uniform"),
    ({"federation": {"weighting": "uniform"}, "privacy": {**CLIENT, "client_noise": "skellam"}}, "secagg.enabled", "secure aggregation"),
    ({"federation": {"weighting": "uniform", "clients_per_round": 4}, "secagg": {"enabled": True},
      "privacy": {**CLIENT, "client_noise": "discrete_gaussian", "colluders": 3}}, "privacy.colluders", "at most 2"),
    ({"federation": {"weighting": "uniform", "clients_per_round": 4}, "secagg": {"enabled": True, "bits": 32},
      "privacy": {**CLIENT, "client_noise": "discrete_gaussian", "client_bits": 40}}, "privacy.client_bits", "secagg.bits"),
    ({"federation": {"weighting": "uniform"}, "privacy": {**CLIENT, "client_noise": "laplace"}}, "privacy.client_noise", "not one of"),
    ({"federation": {"weighting": "uniform"}, "privacy": {**CLIENT, "unit": "user"}}, "privacy.unit", "not one of"),
    ({"federation": {"weighting": "uniform"}, "privacy": {**CLIENT, "client_clip": 0.0}}, "privacy.client_clip", "> 0"),
])
def test_refusals_name_the_field_and_the_reason(raw, field, words):
    from privlora.core.config import config_from_dict

    raw = {"data": {"num_clients": 8}, "privacy": dict(CLIENT), **raw}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert str(exc.value).startswith(field) and words in str(exc.value), str(exc.value)


def test_fedit_ffa_and_flora_product_are_accepted():
    from privlora.core.config import config_from_dict

    for fed in ({"strategy": "fedit"}, {"strategy": "ffa"}, {"strategy": "flora", "flora_form": "product"}):
        cfg = config_from_dict({"data": {"num_clients": 8}, "privacy": dict(CLIENT), "federation": {**fed, "weighting": "uniform"}})
        assert cfg.privacy.unit == "client"


# ---------------------------------------------------------------------------------------------
# clipping and the server's finish (numpy only)
# ---------------------------------------------------------------------------------------------


def _ffa_states(rng, rank=2, d=6):
    keys = {"m.lora_A.weight": (rank, d), "m.lora_B.weight": (d, rank), "classifier.weight": (2, d)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in keys.items()}


def test_whole_contribution_clipped_head_included_and_mean_of_clipped_deltas_applied():
    from privlora.federation.client_level import client_delta, clip_delta, finish_client_level
    from privlora.strategies.ffa import FFALoRA

    class Cfg:  # only what finish_client_level reads
        class federation:
            clients_per_round = 4

    rng = np.random.default_rng(0)
    strategy = FFALoRA(2, seed=1, weighting="uniform")
    glob = strategy.initial_state(_ffa_states(rng))
    template = _ffa_states(rng)
    start = strategy.local_start(strategy.broadcast(glob, 2), template)
    C = 0.3
    deltas = []
    for k in range(3):  # 3 of the 4 expected clients answer
        trained = {key: v + rng.normal(scale=1.0, size=v.shape).astype(np.float32) for key, v in start.items()}
        trained["m.lora_A.weight"] = start["m.lora_A.weight"]  # frozen under FFA
        d = client_delta(strategy, trained, start, 2, k)
        assert set(d) == {"m.lora_B.weight", "classifier.weight"}  # the head is part of the contribution
        # independently: the change of every tensor sent, flattened together
        raw = np.concatenate([(trained[n] - start[n]).astype(np.float64).ravel() for n in sorted(d)])
        clipped, norm = clip_delta(d, C)
        assert norm == pytest.approx(np.linalg.norm(raw), rel=1e-6)
        flat = np.concatenate([clipped[n].ravel() for n in sorted(d)])
        assert np.linalg.norm(flat) <= C
        np.testing.assert_allclose(flat, raw * C / np.linalg.norm(raw), rtol=1e-6)
        deltas.append(clipped)
    summed = {n: sum(d[n] for d in deltas) for n in deltas[0]}
    finished = finish_client_level(strategy, glob, template, summed, Cfg)
    new = strategy.finish(finished, glob)
    for n in ("m.lora_B.weight", "classifier.weight"):
        np.testing.assert_allclose(new[n], glob[n] + summed[n] / 4.0, rtol=1e-5, atol=1e-6)  # divided by E = 4, not by 3
    np.testing.assert_array_equal(new["m.lora_A.weight"], glob["m.lora_A.weight"])
