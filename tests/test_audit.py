"""`privlora audit`: canaries go where the secret says, a broken training path is caught, DP is not.

The fault injections (noise switched off inside Opacus, or per-sample clipping switched off,
while the ledger still charges the calibrated sigma and clip norm) are monkeypatches in these
tests only: no config field or flag can do either.
The audit model is a 2-layer BERT with hidden size 64 whose weights are drawn with a large
initializer range (1.0): at the usual 0.02 a random BERT maps every input to nearly the same
representation, so every canary has the same gradient up to its label's sign and no audit can
tell them apart (measured: 97% of the variance of canary gradients along one direction).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy import optimize, stats

from privlora.core.config import config_to_toml

from .conftest import TOKENIZER_FILES

CANARIES = 200
CLIP = 1e-3  # the clip norm of the clipping fault test (and its DP control)



def make_audit_model(tmp_path_factory, initializer_range):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from privlora.tasks.models import quiet_hf, resolve_model_path

    quiet_hf()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=128, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=initializer_range)
    out = tmp_path_factory.mktemp("audit-bert")
    BertForSequenceClassification(cfg).eval().save_pretrained(out)
    src = resolve_model_path("embedded:minilm")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def audit_model_dir(tmp_path_factory):
    return make_audit_model(tmp_path_factory, 1.0)


@pytest.fixture(scope="session")
def mild_model_dir(tmp_path_factory):
    """The same BERT at initializer range 0.3: per-sample gradient norms spread over about one
    order of magnitude (1.1 to 15 from the 5th to the 95th percentile, measured), where the 1.0
    model spreads them over more than two (14 to 7,000), so that unclipped gradients of similar
    size compete, not a few giants."""
    return make_audit_model(tmp_path_factory, 0.3)


@pytest.fixture()
def clipping_cfg(audit_cfg, mild_model_dir):
    """audit_cfg on the milder model with clip norm C = 1e-3 and lr 0.05 (little drift within a
    round, so each round's start model still describes its gradients)."""
    from dataclasses import replace

    return replace(audit_cfg, model=replace(audit_cfg.model, path=str(mild_model_dir)),
                   privacy=replace(audit_cfg.privacy, max_grad_norm=CLIP),
                   training=replace(audit_cfg.training, lr=0.05, head_lr=0.05))


@pytest.fixture()
def audit_cfg(tiny_cfg, audit_model_dir):
    """200 reviews over 4 clients, all 4 train in each of 3 rounds of 8 DP-SGD steps; the claim is
    epsilon 0.5 (noise calibrated to it), small enough that a leak shows above it."""
    return tiny_cfg(
        # BERT's pooler head: the model these bounds were measured on (the default now mean-pools)
        model={"path": str(audit_model_dir), "max_length": 32, "pooling": "model"},
        data={"max_examples": 200},
        lora={"r": 8, "alpha": 16.0, "target_modules": ["query", "key", "value", "dense"]},
        federation={"rounds": 3, "clients_per_round": 4, "server_momentum": 0.0},
        training={"local_steps": 8, "batch_size": 32, "physical_batch_size": 64, "lr": 0.5, "head_lr": 0.5},
        privacy={"enabled": True, "noise_multiplier": 0.0, "target_epsilon": 0.5},
    )


def reference_bound(m, r, v, delta, level):
    """Theorem 5.2 of Steinke, Nasr and Jagielski (2023), solved with brentq."""
    def p(eps):
        q = np.exp(eps) / (1 + np.exp(eps))
        f = lambda k: 1.0 if k <= 0 else stats.binom.sf(k - 1, r, q)  # noqa: E731
        return min(1.0, f(v) + 2 * m * delta * max([(f(v - i) - f(v)) / i for i in range(1, v + 1)], default=0.0))
    if p(0.0) >= 1 - level:
        return 0.0
    return optimize.brentq(lambda e: p(e) - (1 - level), 0.0, 50.0, xtol=1e-9)


def run_cli(cfg, tmp_path, *extra):
    from privlora.commands.cli import main

    path = tmp_path / "audit.toml"
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    out = tmp_path / "audit-run"
    code = main(["audit", str(path), "--out", str(out), "--canaries", str(CANARIES), "--design", "tokens", "--seed", "11", "--quiet", *extra])
    return code, out, json.loads((out / "audit.json").read_text())


def check_published_bounds(audit):
    """Anyone can recount v from the published scores and secret bits, and recompute the bounds:
    Theorem 5.2 with brentq, the f-DP (eps, delta) bound with the linear program of
    tests/test_audit_bound.py (the largest P[C >= v] its constraints allow stays below the
    per-test level just under the bound and reaches it just above)."""
    from .test_audit_bound import lp_largest_tail

    truth = np.array(audit["canary_included"]) == 1
    level = 1 - (1 - 0.95) / audit["tests"]

    def recount(best):
        scores = np.array(audit["scores"][best["score"]])
        order = np.argsort(-scores, kind="stable")
        v = int(truth[order[: best["k_in"]]].sum() + (~truth[order[len(scores) - best["k_out"]:]]).sum())
        assert v == best["v"]
        return v

    best = audit["best"]
    v = recount(best)
    assert audit["epsilon_lower"] == pytest.approx(reference_bound(CANARIES, best["r"], v, audit["delta"], level), abs=1e-5)
    fb = audit["fdp"]["best"]
    v = recount(fb)
    eps = audit["fdp"]["epsilon_lower"]
    assert eps == fb["epsilon_lower_fdp"] > 0
    assert lp_largest_tail(CANARIES, fb["r"], v, eps * 0.999, audit["delta"]) < 1 - level
    assert lp_largest_tail(CANARIES, fb["r"], v, eps * 1.001 + 1e-6, audit["delta"]) >= 1 - level
    recount(audit["fdp"]["best_gdp"])


@pytest.fixture()
def noise_off(monkeypatch):
    """Fault injection for tests only: Opacus adds zero noise, whatever sigma it was given."""
    import torch
    from opacus.optimizers import optimizer as dp_optimizer

    monkeypatch.setattr(dp_optimizer, "_generate_noise", lambda std, reference, *a, **k: torch.zeros_like(reference))


def test_noise_switched_off_is_caught_above_the_claim_and_the_command_fails(audit_cfg, tmp_path, noise_off, capsys):
    code, out, audit = run_cli(audit_cfg, tmp_path)
    err = capsys.readouterr().err
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()[1:]]
    assert ledger and all(e["noise_multiplier"] > 1.0 for e in ledger)  # the ledger still claims the noise
    assert audit["epsilon_claimed"] == pytest.approx(0.5, abs=0.01)
    assert audit["epsilon_lower"] > 2 * audit["epsilon_claimed"]
    assert audit["violation"] is True
    assert code == 1
    assert "PRIVACY CLAIM CONTRADICTED" in err and "exceeds the claimed" in err and "audit.json" in err
    report = (out / "report.md").read_text()
    assert "## Privacy audit" in report and "PRIVACY CLAIM CONTRADICTED" in report
    check_published_bounds(audit)


@pytest.fixture()
def clipping_off(monkeypatch):
    """Fault injection for tests only: Opacus sums the per-sample gradients unclipped (its clip
    factor is computed against an infinite norm, so it is 1), then adds noise of std
    sigma x max_grad_norm as configured; the ledger still records that clip norm and sigma.
    Returns each example's gradient norm as Opacus saw it."""
    import torch
    from opacus.optimizers.optimizer import DPOptimizer

    clip = DPOptimizer.clip_and_accumulate
    seen: list[float] = []

    def unclipped(self):
        configured = self.max_grad_norm
        norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in self.grad_samples]
        if norms and len(norms[0]):
            seen.extend(torch.stack(norms, dim=1).norm(2, dim=1).tolist())
        self.max_grad_norm = float("inf")
        try:
            clip(self)
        finally:
            self.max_grad_norm = configured

    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", unclipped)
    return seen


def test_clipping_switched_off_is_caught_above_the_claim_and_the_command_fails(clipping_cfg, tmp_path, clipping_off, capsys):
    """Clipping off alone, the noise still sigma x C as recorded. With C = 1e-3 nearly every
    per-sample gradient is over 100 C (checked below: 1.1 to 15 from the 5th to the 95th
    percentile when written), so an included canary moves its client's update by a thousand
    times the sensitivity the noise was calibrated for.

    On the 1.0 model of the noise test this is not caught (at most 0.47 over lr 0.5, 0.005 and
    0.0005, measured): its gradient norms spread from 14 to 7,000 and the largest few dominate
    every update, whatever the canaries do. The milder model and a smaller lr (less drift
    within a round) make it visible: 1.21 here, 1.62 with another secret seed."""
    code, out, audit = run_cli(clipping_cfg, tmp_path)
    err = capsys.readouterr().err
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()[1:]]
    assert ledger and all(e["noise_multiplier"] > 1.0 and e["clip_norm"] == CLIP for e in ledger)  # the claim stands
    norms = np.array(clipping_off)
    assert len(norms) > 100 and np.mean(norms > 100 * CLIP) > 0.9  # what went in unclipped was far above C
    assert audit["epsilon_claimed"] == pytest.approx(0.5, abs=0.01)
    assert max(audit["epsilon_lower"], audit["fdp"]["epsilon_lower"]) > 2 * audit["epsilon_claimed"]
    assert audit["violation"] is True
    assert code == 1
    assert "PRIVACY CLAIM CONTRADICTED" in err and "exceeds the claimed" in err and "audit.json" in err
    assert "PRIVACY CLAIM CONTRADICTED" in (out / "report.md").read_text()
    check_published_bounds(audit)


@pytest.mark.parametrize("which", ["audit_cfg", "clipping_cfg"])
def test_with_dp_on_the_bound_stays_below_the_claim_and_the_run_verifies(request, tmp_path, which):
    from accounting import verify_run

    code, out, audit = run_cli(request.getfixturevalue(which), tmp_path)
    assert code == 0
    assert audit["violation"] is False
    assert audit["epsilon_lower"] < audit["epsilon_claimed"]
    assert audit["fdp"]["epsilon_lower"] < audit["epsilon_claimed"]
    report = (out / "report.md").read_text()
    assert "no contradiction found" in report and "f-DP reading" in report
    assert "does not prove" in (out / "report.md").read_text()
    assert verify_run(out).ok


def test_canaries_enter_their_clients_data_exactly_when_the_secret_says(tiny_cfg):
    from privlora.commands.audit import Auditor
    from privlora.federation.startup import build_federation

    for design in ("tokens", "mislabelled"):
        fed = build_federation(tiny_cfg())
        before = {c.client_id: c.dataset.tensors for c in fed.clients}
        test_rows = {tuple(r.tolist()) for r in fed.server.test_dataset.tensors[0]}
        aud = Auditor(40, design, seed=5)
        aud.prepare(fed)
        can = aud.canaries
        assert can.included.sum() not in (0, 40) and len(np.unique(can.client)) == 4
        for c in fed.clients:
            own = np.flatnonzero(can.client == c.client_id)
            rows = {(tuple(i.tolist()), int(y)) for i, y in zip(c.dataset.tensors[0], c.dataset.tensors[2])}
            for j in own:
                key = (tuple(can.ids[j].tolist()), int(can.labels[j]))
                assert (key in rows) == bool(can.included[j])
                assert tuple(can.ids[j].tolist()) not in test_rows
            removed = len(own) if design == "mislabelled" else 0
            assert c.num_examples == len(before[c.client_id][0]) - removed + int(can.included[own].sum())
            assert fed.client_sizes[c.client_id] == c.num_examples
            if design == "mislabelled":  # a client's own example, with another label
                old = {tuple(i.tolist()): int(y) for i, y in zip(*before[c.client_id][::2])}
                for j in own:
                    assert old[tuple(can.ids[j].tolist())] != int(can.labels[j])
                    assert (tuple(can.ids[j].tolist()), old[tuple(can.ids[j].tolist())]) not in rows


def test_the_same_secret_deals_the_same_canaries_and_another_does_not():
    from privlora.commands.audit import deal

    a, b, c = deal(1000, 10, 1), deal(1000, 10, 1), deal(1000, 10, 2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert np.bincount(a[0]).tolist() == [100] * 10
    assert 440 < a[1].sum() < 560  # fair coins: 500 +- 4 sd


def test_too_many_mislabelled_canaries_for_the_data_is_a_clear_error(tiny_cfg):
    from privlora.commands.audit import AuditError, Auditor
    from privlora.federation.startup import build_federation

    fed = build_federation(tiny_cfg())
    with pytest.raises(AuditError, match="too few for its"):
        Auditor(2000, "mislabelled", seed=1).prepare(fed)


def test_the_command_defaults_to_the_design_measured_strongest_and_says_when_the_data_is_too_small(tiny_cfg, tmp_path, capsys):
    """Without --design and --canaries the command deals 2000 mislabelled canaries (the highest
    bound on the default config, benchmarks/results/audit.md); the tiny config's clients hold
    far fewer than their 2000/k canaries, which is one clear error, not a traceback."""
    from privlora.commands.cli import main

    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(tiny_cfg()), encoding="utf-8")
    assert main(["audit", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "with 2000 mislabelled canaries" in err
    assert "--canaries 2000: client" in err and "use fewer canaries or more data" in err


def test_a_bad_canary_count_is_refused_before_anything_is_written(tiny_cfg, tmp_path, capsys):
    from privlora.commands.cli import main

    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(tiny_cfg()), encoding="utf-8")
    assert main(["audit", str(path), "--out", str(tmp_path / "out"), "--canaries", "1", "--quiet"]) == 2
    assert "--canaries: need at least 2 canaries" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


SECRET = 987654321987


def test_an_interrupted_audit_resumes_to_the_uninterrupted_result_without_leaking_its_secret(audit_cfg, tmp_path, capsys):
    import os
    import stat

    from privlora.commands.audit import run_audit
    from privlora.commands.cli import main

    code, _, full = run_cli(audit_cfg, tmp_path, "--seed", str(SECRET))
    assert code == 0

    out = tmp_path / "cut"
    assert run_audit(audit_cfg, out, canaries=CANARIES, design="tokens", seed=SECRET, progress=False, stop_after=1) is None
    state_dir = tmp_path / "cut.auditor"
    state_file = state_dir / "audit-state.json"
    # while training runs the secret is only in the auditor's folder, never in the run folder
    assert not (out / "audit.json").exists()
    for f in out.rglob("*"):
        if f.is_file():
            assert str(SECRET).encode() not in f.read_bytes(), f
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700 and stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
    state = json.loads(state_file.read_text())
    assert state["secret_seed"] == str(SECRET) and {r for r, _, _ in state["whitebox"]} == {1}
    # a crash part-way through round 2 leaves increments of that unfinished round: dropped on
    # resume (and here every client trains again in round 2, so they would be replaced anyway)
    state["whitebox"] += [[2, c, [123.0] * len(inc)] for _, c, inc in state["whitebox"]]
    state_file.write_text(json.dumps(state))

    assert main(["audit", "--resume", str(out), "--canaries", "5", "--quiet"]) == 2
    assert "drop --canaries" in capsys.readouterr().err
    assert main(["audit", "--resume", str(out), "--quiet"]) == 0
    resumed = json.loads((out / "audit.json").read_text())
    for key in ("secret_seed", "canary_client", "canary_included", "scores", "epsilon_lower", "fdp", "best", "per_score",
                "epsilon_claimed", "violation", "tests", "included_canaries", "whitebox_client_rounds", "test_accuracy"):
        assert resumed[key] == full[key], key
    assert not state_dir.exists()  # audit.json now holds the secret; the auditor's copy is gone
    capsys.readouterr()
    assert main(["audit", "--resume", str(out), "--quiet"]) == 2
    assert "already finished" in capsys.readouterr().err
    (out / "audit.json").unlink()
    assert main(["audit", "--resume", str(out), "--quiet"]) == 2
    assert "audit-state.json is missing, and with it the canaries' secret" in capsys.readouterr().err


def test_the_auditor_state_keeps_only_rounds_the_checkpoint_has(tmp_path):
    from privlora.commands.audit import AuditError, AuditorState

    run = tmp_path / "run"
    run.mkdir()
    st = AuditorState(tmp_path / "run.auditor", run, {"secret_seed": "5", "canaries": 4, "design": "tokens", "confidence": 0.9})
    inc = {(1, 0): np.array([0.5, -0.25]), (2, 0): np.array([1 / 3, 2.0]), (3, 1): np.array([7.0, 8.0])}
    st.save(inc)
    back = AuditorState.load(tmp_path / "run.auditor", run, last_round=2)
    assert sorted(back.contributions) == [(1, 0), (2, 0)]
    assert back.contributions[(2, 0)].tolist() == [1 / 3, 2.0]  # floats round-trip exactly
    assert back.options == {"secret_seed": "5", "canaries": 4, "design": "tokens", "confidence": 0.9}
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AuditError, match="belongs to the audit of"):
        AuditorState.load(tmp_path / "run.auditor", other, last_round=2)
