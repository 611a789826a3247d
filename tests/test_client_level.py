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


@pytest.mark.parametrize("noise,secagg,strategy", [
    ("central", False, "ffa"), ("central", True, "ffa"), ("discrete_gaussian", True, "ffa"), ("skellam", True, "ffa"),
    ("central", False, "fedit"), ("discrete_gaussian", True, "flora"),
])
def test_end_to_end_tiny_run_of_each_noise_kind(tiny_cfg, tmp_path, noise, secagg, strategy):
    from accounting.verify import verify_run
    from privlora.transports.inprocess import run_experiment

    cfg = client_cfg(tiny_cfg, noise, secagg, strategy)
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
            assert cl["min_inputs"] == 3 and cl["inputs"] == 3
        else:
            assert cl["noise_multiplier"] > 0
    ledger = [json.loads(line) for line in (out / "client_level.jsonl").read_text().splitlines()]
    assert [e["round"] for e in ledger[1:]] == [1, 2]
    assert all(set(e["clients"]) >= set(r["clients"]) for e, r in zip(ledger[1:], rows))  # every contributor charged
    res = verify_run(out)
    assert res.ok, res.problems
    assert max(res.client_level["server"].values()) == pytest.approx(rows[-1]["client_level"]["epsilon_server_max"])


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


def test_client_level_without_record_level_dp_reports_and_verifies(tiny_cfg, tmp_path, capsys):
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
    from privlora.commands.cli import main

    assert main(["verify", str(out)]) == 0
    said = capsys.readouterr().out
    assert "client-level" in said and "NOTHING TO VERIFY" not in said
    # the metrics claim a smaller epsilon than the ledger gives: verify exits non-zero
    rows[-1]["client_level"]["epsilon_server_max"] /= 2
    (out / "metrics.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    assert main(["verify", str(out)]) == 1
    assert "epsilon_server_max" in capsys.readouterr().out


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


# ---------------------------------------------------------------------------------------------
# distributed noise: the accounted variance, dropouts down to the threshold, the integer secure sum
# ---------------------------------------------------------------------------------------------


def dist_cfg(noise, **privacy):
    from privlora.core.config import config_from_dict

    return config_from_dict({
        "data": {"num_clients": 10},
        "federation": {"weighting": "uniform", "clients_per_round": 5, "rounds": 3},
        "secagg": {"enabled": True, "dropout_rate": 0.4},  # t = 3: a sum of 5 survives 2 dropouts
        "privacy": {"unit": "client", "client_noise": noise, "client_clip": 0.5, "client_target_epsilon": 4.0, **privacy},
    })


def discrete_gaussian_variance(sigma: float) -> float:
    """Var of N_Z(0, sigma^2), summed exactly over its support (independent of the sampler)."""
    k = np.arange(-int(40 * sigma) - 20, int(40 * sigma) + 21, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * sigma**2))
    return float(np.sum(k**2 * w) / np.sum(w))


def accounted_share_variance(params) -> float:
    return discrete_gaussian_variance(params.sigma) if params.sigma is not None else float(params.variance)


Z = 4.0  # one-sided threshold per check: P(N(0,1) > 4) = 3.2e-5; with T = 120 iid trials and the
# t distribution of the studentized mean, each check's false-alarm rate is about 1e-4.


@pytest.mark.parametrize("noise", ["discrete_gaussian", "skellam"])
def test_decoded_sum_minus_exact_clipped_sum_has_the_accounted_variance(noise):
    """Five clients with contributions of norm 2C (so each is clipped) encode, the sum is taken mod
    2^bits, the server decodes. The error decoded - sum of clipped contributions (clipped here,
    independently) must have per-coordinate variance gamma^2 (n v + r) with v the accounted share
    variance and 0 <= r <= n/4 the rounding's: checked as two one-sided z tests over T trials."""
    from privlora.federation.client_level import distributed_params
    from privlora.federation.distributed_noise import Layout, decode_sum, encode_contribution, modular_sum, noise_generator

    cfg = dist_cfg(noise)
    layout = Layout((("a", (150,)), ("b", (2, 25))))
    params = distributed_params(cfg, layout, rnd=1)
    n, C, gamma = 5, cfg.privacy.client_clip, params.gamma
    v = accounted_share_variance(params)
    assert params.min_inputs == 3 and params.bits == 16
    low, high = gamma**2 * n * v, gamma**2 * (n * v + n / 4.0)
    rng = np.random.default_rng(7)
    stats = []
    for trial in range(120):
        xs = []
        for _ in range(n):
            x = rng.normal(size=200)
            xs.append(x * (2 * C / np.linalg.norm(x)))
        enc = [encode_contribution({"a": x[:150], "b": x[150:].reshape(2, 25)}, params, noise_generator(1000 * trial + i))[0]
               for i, x in enumerate(xs)]
        out, rep = decode_sum(modular_sum(enc, params.bits), params, num_inputs=n)
        assert rep.suspect == 0
        exact = sum(x * min(1.0, C / np.linalg.norm(x)) for x in xs)
        err = np.concatenate([out["a"], out["b"].ravel()]) - exact
        stats.append(float(np.mean(err**2)))
    stats = np.array(stats)
    se = stats.std(ddof=1) / math.sqrt(len(stats))
    assert (stats.mean() - low) / se > -Z, (stats.mean(), low)   # at least the accounted noise
    assert (stats.mean() - high) / se < Z, (stats.mean(), high)  # and no more than noise + rounding


def test_dropout_down_to_the_threshold_keeps_the_accounted_noise():
    """Through the real secure sum (integer mode, `session_plan`): 5 clients, 2 drop before their
    masked input, so 3 = min_inputs inputs remain. The sum is exactly the survivors' encodings mod
    2^bits, and with zero contributions (rounding exact) the decoded noise has at least the
    accounted variance gamma^2 * min_inputs * v. A sum of 2 is refused by the decoder."""
    import os

    from privlora.federation.client_level import DISTRIBUTED_KEY, distributed_params
    from privlora.federation.distributed_noise import Layout, decode_sum, encode_contribution, modular_sum, noise_generator
    from privlora.federation.secure_sum import session_plan
    from secagg import SecAggClient, SecAggServer
    from secagg.simulation import run_session

    cfg = dist_cfg("discrete_gaussian")
    layout = Layout((("a", (100,)),))
    params = distributed_params(cfg, layout, rnd=2)
    plan, spec = session_plan(cfg, [(DISTRIBUTED_KEY, (params.padded_dim,))])
    assert spec.modulus_bits == params.bits == 16 and plan.min_clients == 3
    v = accounted_share_variance(params)
    stats = []
    for trial in range(40):
        enc = {c: encode_contribution({"a": np.zeros(100)}, params, noise_generator(50 * trial + c))[0] for c in range(5)}
        nonce = os.urandom(32)
        clients = {c: SecAggClient(c, plan, spec, 2, session_nonce=nonce) for c in enc}
        for c, e in enc.items():
            clients[c].set_input(e)
        server = SecAggServer(plan, spec, 2, expected=sorted(enc), session_nonce=nonce)
        res, _ = run_session(clients, server, {"masked_input": {3, 4}})
        assert sorted(res.survivors) == [0, 1, 2]
        residues, _ = spec.decode(res.field_sum)
        np.testing.assert_array_equal(residues, modular_sum([enc[0], enc[1], enc[2]], params.bits))
        with pytest.raises(ValueError, match="fewer inputs holds less noise"):
            decode_sum(residues, params, num_inputs=2)
        out, _ = decode_sum(residues, params, num_inputs=3)
        stats.append(float(np.mean(out["a"] ** 2)))
    stats = np.array(stats)
    se = stats.std(ddof=1) / math.sqrt(len(stats))
    accounted = params.gamma**2 * params.min_inputs * v
    assert (stats.mean() - accounted) / se > -Z, (stats.mean(), accounted)
    # and the record charged is the one of min_inputs shares, whatever the number of survivors
    assert params.release().min_inputs == 3 and params.release().total_variance == pytest.approx(3 * params.sigma**2)


def test_integer_secure_sum_reduces_what_leaves_a_client_mod_2_to_the_bits():
    """The masked vector a client sends holds residues mod 2^m only (nothing above the modulus
    the server could read wraps from), and the server's sum is the inputs' sum mod 2^m."""
    import os

    from secagg import EncodingSpec, SecAggClient, SecAggParams, SecAggServer
    from secagg.messages import Kind
    from secagg.simulation import run_session

    plan = SecAggParams(bits=64, threshold=3, min_clients=3).resolve(4)
    spec = EncodingSpec.integers(64, modulus_bits=12, bits=64, max_clients=plan.n_max)
    rng = np.random.default_rng(3)
    inputs = {c: rng.integers(0, 1 << 12, size=64, dtype=np.uint64) for c in range(4)}
    nonce = os.urandom(32)
    clients = {c: SecAggClient(c, plan, spec, 5, session_nonce=nonce) for c in inputs}
    for c, x in inputs.items():
        clients[c].set_input(x)
    server = SecAggServer(plan, spec, 5, expected=sorted(inputs), session_nonce=nonce)
    seen = []

    def tamper(kind, sender, recipient, blob):
        if kind == Kind.MASKED_INPUT:
            seen.append(blob)
        return blob

    res, _ = run_session(clients, server, None, tamper)
    total, _ = spec.decode(res.field_sum)
    np.testing.assert_array_equal(total, sum(inputs.values()) % (1 << 12))
    assert len(seen) == 4
    for blob in seen:  # the vector sits right after the envelope: find it by its dtype and length
        words = np.frombuffer(blob[-(64 * 0 + spec.total_length * 8 + 64):-64], dtype="<u8")
        assert words.max() < (1 << 12)
    with pytest.raises(Exception, match="values must be in"):
        spec.encode(np.array([1 << 12] + [0] * 63, dtype=np.uint64))


def test_the_508_client_benchmark_grid_is_valid_configs():
    import importlib.util
    from pathlib import Path

    from privlora.core.config import config_from_dict
    from privlora.federation.client_level import min_inputs

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "client_level.py"
    spec = importlib.util.spec_from_file_location("bench_client_level", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    jobs = bench.jobs()
    assert len({bench.key(j) for j in jobs}) == len(jobs) == 3 * (1 + 8 + 10)
    for j in jobs:
        cfg = config_from_dict(j["config"])
        assert cfg.data.num_clients == 508 and cfg.data.partition == "natural"
        if j["noise"] in ("discrete_gaussian", "skellam"):
            assert cfg.privacy.client_bits == j["bits"] and min_inputs(cfg) == 68


def test_a_killed_client_level_run_resumes_without_lost_or_doubled_charges(tiny_cfg, tmp_path, monkeypatch):
    """Killed in round 2 after its client-level charge: the resumed run reuses that record (never
    writes a second) and ends with the same client-level ledger, metrics and model as a whole run."""
    from privlora.federation.client import Client
    from privlora.transports.inprocess import run_experiment

    cfg = client_cfg(tiny_cfg, "central", False)
    whole = tmp_path / "whole"
    run_experiment(cfg, whole, progress=False)
    real, calls = Client.handle, {"n": 0}

    def dies_in_round_2(self, instruction, progress=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, instruction, progress)

    cut = tmp_path / "cut"
    monkeypatch.setattr(Client, "handle", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, cut, progress=False)
    monkeypatch.setattr(Client, "handle", real)

    def releases(out):
        return [(e["round"], e["clients"], e["mechanism"]) for e in map(json.loads, (out / "client_level.jsonl").read_text().splitlines()[1:])]

    assert [r for r, _, _ in releases(cut)] == [1, 2]  # round 2 charged before any client trained
    run_experiment(None, cut, progress=False, resume=True)
    assert releases(cut) == releases(whole)
    def strip(rows):  # times differ, and so do the hashes anchored (each ledger's header holds its creation time)
        out = []
        for r in rows:
            r = {k: v for k, v in r.items() if k not in ("seconds", "total_seconds", "ledger")}
            if "client_level" in r:
                r["client_level"] = {k: v for k, v in r["client_level"].items() if k != "ledger"}
            out.append(r)
        return out

    assert strip(read_metrics(cut)) == strip(read_metrics(whole))
    assert [r["client_level"]["ledger"]["entries"] for r in read_metrics(cut)] == [0, 1, 2]


def test_each_node_records_its_own_client_level_release_before_sending(tiny_cfg, tmp_path):
    """Under secure aggregation every simulated node has a folder: each records, in its own
    client-level ledger, the release its config decides for every round it took part in, equal
    to the server's record of that round."""
    from accounting.client_level import ClientLevelLedger
    from privlora.transports.inprocess import run_experiment

    cfg = client_cfg(tiny_cfg, "discrete_gaussian", True)
    out = tmp_path / "run"
    run_experiment(cfg, out, progress=False)
    server = ClientLevelLedger.open(out / "client_level.jsonl")
    rows = [r for r in read_metrics(out) if r["round"] >= 1]
    seen = 0
    for k in range(cfg.data.num_clients):
        files = list((out / "nodes" / f"client-{k}").glob("client_level-*.jsonl"))
        took_part = [r["round"] for r in rows if k in r["clients"]]
        if not took_part:
            continue
        (path,) = files
        mine = ClientLevelLedger.open(path)
        assert [e.round for e in mine.entries] == took_part
        for e in mine.entries:
            assert e.clients == (k,) and e.release == server.entry_for(e.round).release
        seen += 1
    assert seen >= 3


def test_central_noise_is_secure_outside_the_simulation_and_has_the_stated_std():
    from privlora.core.config import config_from_dict
    from privlora.federation.client_level import central_noise

    cfg = config_from_dict({"data": {"num_clients": 8}, "federation": {"weighting": "uniform"},
                            "privacy": {**CLIENT, "client_noise_multiplier": 2.0, "client_clip": 0.25}})
    zero = {"x": np.zeros(20000)}
    a, b = central_noise(cfg, zero, 1, secure=True)["x"], central_noise(cfg, zero, 1, secure=True)["x"]
    assert not np.array_equal(a, b)  # never reproducible from the seed
    np.testing.assert_array_equal(central_noise(cfg, zero, 1, secure=False)["x"], central_noise(cfg, zero, 1, secure=False)["x"])
    for x in (a, central_noise(cfg, zero, 1, secure=False)["x"]):
        # std 0.5 = z C; the sample sd of 20000 normals is within 4 standard errors (0.5 / sqrt(2 x 20000))
        assert abs(x.std() - 0.5) < 4 * 0.5 / math.sqrt(40000) and abs(x.mean()) < 4 * 0.5 / math.sqrt(20000)


# ---------------------------------------------------------------------------------------------
# the mechanism-level audit
# ---------------------------------------------------------------------------------------------

AUDIT_TOML = """
[data]
num_clients = 200
[federation]
weighting = "uniform"
clients_per_round = 120
rounds = 3
[secagg]
enabled = true
threshold = 61
[privacy]
enabled = false
unit = "client"
client_noise = "{noise}"
client_clip = 1.0
client_target_epsilon = 1.0
"""


@pytest.mark.parametrize("noise", ["discrete_gaussian", "skellam"])
def test_audit_passes_honest_noise_and_fails_clients_that_skip_theirs(noise, tmp_path, monkeypatch, capsys):
    """Honest clients: the canaries' lower bound stays below the claimed epsilon 1 (exit 0). Clients
    that skip their noise share while the ledger charges it: the bound exceeds the claim (exit 1)."""
    from privlora.federation import distributed_noise as dn
    from privlora.federation.client_level_audit import main

    config = tmp_path / "audit.toml"
    config.write_text(AUDIT_TOML.format(noise=noise))
    assert main([str(config)]) == 0
    honest = capsys.readouterr().out
    monkeypatch.setattr(dn.ClientEncoder, "noise", lambda self, rng=None: np.zeros(self.params.padded_dim, dtype=np.int64))
    assert main([str(config)]) == 1
    broken = capsys.readouterr().out
    assert "FAIL" in broken and "FAIL" not in honest


def test_a_tiny_explicit_noise_multiplier_is_accounted_without_exhausting_memory():
    """z = 1e-4 (a sanity run found it): the PLD's grid would need 10^11 points and the run died
    at its first epsilon. The RDP bound is reported instead: the Gaussian's alpha / (2 z^2) per
    round, converted (checked here against the closed form at the best of a fine grid of orders)."""
    import time

    from accounting.client_level import CentralGaussian, Entry, client_epsilons

    t = time.perf_counter()
    got = client_epsilons([Entry(i, i + 1, (0,), CentralGaussian(1e-4, 100.0), "", "") for i in range(3)], 1e-5)["server"][0]
    assert time.perf_counter() - t < 10
    def conversion(a):  # Canonne, Kamath & Steinke's conversion of 3 rounds of RDP alpha / (2 z^2)
        return 3 * a / (2 * 1e-8) + np.log1p(-1 / a) - (math.log(1e-5) + np.log(a)) / (a - 1)

    assert got >= np.min(conversion(np.linspace(1.001, 2000, 200000)))  # an upper bound: never below the best order
    assert got == pytest.approx(np.min(conversion(np.arange(2.0, 257.0))), rel=1e-9)  # the integer orders' best
