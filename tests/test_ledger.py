"""The hash-chained ledger and `verify_run`: every kind of tampering is caught."""

from __future__ import annotations

import hashlib
import json

import pytest

from accounting import Ledger, LedgerError, SubsampledGaussian, privacy_summary, verify_run
from accounting.ledger import check_chain, dp_event_from_json

DELTA = 1e-5
M = SubsampledGaussian(1.1, 0.05, 10, 1.0, DELTA)


def make_run(tmp_path, rounds=3, clients=(0, 1, 2)):
    """A minimal run folder: a ledger, metrics anchors per round, and report.json."""
    led = Ledger.create(tmp_path / "ledger.jsonl", DELTA, "pld", {c: 8.0 for c in clients})
    metrics = [{"round": 0, "ledger": {"entries": 0, "head": led.head}}]
    for r in range(1, rounds + 1):
        for c in clients:
            if (c + r) % 3:
                led.append(c, r, M)
        metrics.append({"round": r, "ledger": {"entries": len(led), "head": led.head}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (tmp_path / "report.json").write_text(json.dumps({"privacy": privacy_summary(led)}))
    return led


def lines(tmp_path):
    return (tmp_path / "ledger.jsonl").read_text().splitlines(keepends=True)


def write(tmp_path, ls):
    (tmp_path / "ledger.jsonl").write_text("".join(ls))


def test_entries_hold_the_mechanism_a_dp_event_and_a_chain(tmp_path):
    led = make_run(tmp_path)
    recs = [json.loads(x) for x in lines(tmp_path)]
    assert recs[0]["kind"] == "header" and recs[0]["prev"] == "0" * 64
    for prev, rec in zip(recs, recs[1:]):
        assert rec["prev"] == prev["hash"]
        body = {k: v for k, v in rec.items() if k != "hash"}
        assert rec["hash"] == hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert {"client", "round", "mechanism", "sampling", "sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "time"} <= set(rec)
        assert rec["sampling"] == "poisson" and rec["mechanism"] == "subsampled gaussian"
        assert dp_event_from_json(rec["dp_event"]) == M.to_dp_event()
    assert Ledger.open(tmp_path / "ledger.jsonl").head == led.head
    assert verify_run(tmp_path).ok


def test_a_round_is_charged_once_and_the_ledger_only_moves_forward(tmp_path):
    led = make_run(tmp_path)
    with pytest.raises(LedgerError, match="already charged"):
        led.append(1, 3, M)
    with pytest.raises(LedgerError, match="only moves forward"):
        led.append(2, 1, M)
    with pytest.raises(LedgerError, match="delta"):
        led.append(0, 4, SubsampledGaussian(1.1, 0.05, 10, 1.0, 1e-6))
    with pytest.raises(LedgerError, match="never overwritten"):
        Ledger.create(tmp_path / "ledger.jsonl", DELTA, "pld", {})


def edit_field(ls):
    rec = json.loads(ls[3])
    rec["noise_multiplier"] = 5.0  # a bigger sigma would shrink epsilon
    ls[3] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    return ls


def edit_and_rehash(ls):
    from accounting.ledger import entry_hash

    rec = json.loads(ls[2])
    rec["steps"] = 1
    rec["hash"] = entry_hash(rec)
    ls[2] = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
    return ls


def edit_budget(ls):
    rec = json.loads(ls[0])
    rec["budgets"]["0"] = 100.0
    ls[0] = json.dumps(rec) + "\n"
    return ls


TAMPERS = {
    "edited field": edit_field,
    "edited and re-hashed entry": edit_and_rehash,
    "edited budget in the header": edit_budget,
    "deleted entry": lambda ls: ls[:2] + ls[3:],
    "swapped entries": lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:],
    "duplicated entry": lambda ls: ls[:3] + [ls[2]] + ls[3:],
    "truncated tail": lambda ls: ls[:-2],
    "truncated to the header": lambda ls: ls[:1],
    "garbage line": lambda ls: ls + ["not json\n"],
    "emptied": lambda ls: [],
}


@pytest.mark.parametrize("how", sorted(TAMPERS))
def test_every_tampering_is_caught_by_verify(tmp_path, how):
    make_run(tmp_path)
    write(tmp_path, TAMPERS[how](lines(tmp_path)))
    res = verify_run(tmp_path)
    assert not res.ok, how


def test_a_report_that_understates_epsilon_is_caught(tmp_path):
    make_run(tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    rep["privacy"]["clients"]["1"]["epsilon"] *= 0.9
    (tmp_path / "report.json").write_text(json.dumps(rep))
    res = verify_run(tmp_path)
    assert any("client 1" in p for p in res.problems)


def test_a_torn_last_line_is_set_aside_not_lost(tmp_path):
    led = make_run(tmp_path)
    with open(tmp_path / "ledger.jsonl", "a") as fh:
        fh.write('{"kind":"charge","seq":')  # a crash mid-write
    again = Ledger.open(tmp_path / "ledger.jsonl")
    assert again.head == led.head and len(again) == len(led)
    torn = list(tmp_path.glob("ledger.jsonl.torn-*"))
    assert len(torn) == 1 and torn[0].read_text() == '{"kind":"charge","seq":'


def test_open_refuses_a_broken_chain(tmp_path):
    make_run(tmp_path)
    write(tmp_path, TAMPERS["swapped entries"](lines(tmp_path)))
    with pytest.raises(LedgerError, match="does not verify"):
        Ledger.open(tmp_path / "ledger.jsonl")
    _, _, problems = check_chain(lines(tmp_path))
    assert problems
