"""Every committed run folder verifies with `privlora verify`'s own code: the ledger's hash chain
and anchors, every epsilon recomputed from the ledger alone, every privacy number of
report.json and every epsilon per round of metrics.jsonl against the ledger (within the
accountant's stated error). Also: the default run's headline numbers, and that an edited
epsilon makes verify fail naming the file, the field, the value found and the value expected.

The folders are found on disk and their number is asserted, so a deleted folder fails here.
The committed folders are only read (checked by hashing them before and after).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from accounting import Ledger, SubsampledGaussian, get_accountant, privacy_summary, verify_run
from accounting.ledger import check_chain
from privlora.commands.cli import main  # "prv" comes from privlora's accounting.accountants entry point

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "examples" / "default-run"
SWEEP = ROOT / "benchmarks" / "results" / "sweep-default"
SWEEP_RUNS = SWEEP / "runs"
EXPECTED_SWEEP_RUNS = 30  # {ffa, fedit} x epsilon {1, 2, 4, 8, no DP} x seeds {0, 1, 2}
EXPECTED_SWEEP_PRIVATE = 24  # the 6 "epsinf" points run without DP: no ledger, no claim


def sweep_run_folders() -> list[Path]:
    return sorted(p for p in SWEEP_RUNS.iterdir() if p.is_dir()) if SWEEP_RUNS.is_dir() else []


RUNS = [DEFAULT_RUN, *sweep_run_folders()]


def name(run: Path) -> str:
    return str(run.relative_to(ROOT))


def is_private(run: Path) -> bool:
    raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    return raw.get("privacy", {}).get("enabled", True) is not False


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def ledger_header(run: Path) -> dict:
    return json.loads((run / "ledger.jsonl").read_text(encoding="utf-8").splitlines()[0])


# ------------------------------------------------------------------ the committed folders


def test_every_committed_run_folder_is_there():
    assert DEFAULT_RUN.is_dir() and is_private(DEFAULT_RUN)
    found = sweep_run_folders()
    assert len(found) == EXPECTED_SWEEP_RUNS, [p.name for p in found]
    points = json.loads((SWEEP / "sweep.json").read_text(encoding="utf-8"))["points"]
    assert {Path(p["folder"]).name for p in points} == {p.name for p in found}  # the sweep's record names each one
    private = [p for p in found if is_private(p)]
    assert len(private) == EXPECTED_SWEEP_PRIVATE
    assert {p.name for p in found if p not in private} == {f"{s}-epsinf-seed{k}" for s in ("ffa", "fedit") for k in range(3)}


@pytest.mark.parametrize("run", RUNS, ids=name)
def test_committed_run_verifies_against_its_ledger(run, capsys):
    before = snapshot(run)
    res = verify_run(run)  # what `privlora verify` calls
    rows = metrics_rows(run)
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    if not is_private(run):
        assert res.not_private and res.ok, res.problems
        assert not (run / "ledger.jsonl").exists()
        assert report["privacy"] == {"enabled": False}
        assert all(r["epsilon"] == {} and r["epsilon_max"] is None for r in rows)
    else:
        assert res.ok, "\n".join(res.problems)
        assert not res.unchecked, res.unchecked  # every cross-check accountant is here (prv registered)
        header, charges, problems = check_chain((run / "ledger.jsonl").read_text(encoding="utf-8").splitlines())
        assert not problems and res.entries == len(charges) > 0
        # every anchor the run wrote was compared: report.json, each metrics line, the checkpoint if any
        assert all("ledger" in r for r in rows)
        assert res.checked_anchors == 1 + len(rows) + (run / "checkpoint" / "state.json").is_file()
        assert set(res.epsilons) == {int(c) for c in header["budgets"]}
        assert set(report["privacy"]["clients"]) == {str(c) for c in res.epsilons}
        top = max(res.epsilons.values())
        assert report["privacy"]["epsilon_record_level"] == pytest.approx(top, rel=1e-6)
        assert rows[-1]["epsilon_max"] == pytest.approx(top, rel=1e-6)
        assert all(res.epsilons[c] <= b for c, b in ((int(c), b) for c, b in header["budgets"].items()))
    # and through the command line itself
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK:" if is_private(run) else "NOTHING TO VERIFY:"), out
    assert "FAIL" not in out and "NOT CHECKED" not in out
    assert snapshot(run) == before  # verify only reads


def test_default_run_headline_numbers():
    rows = metrics_rows(DEFAULT_RUN)
    final = [r for r in rows if "stopped" not in r][-1]
    report = json.loads((DEFAULT_RUN / "report.json").read_text(encoding="utf-8"))
    assert final["round"] == report["run"]["rounds_planned"] == report["run"]["rounds_completed"]
    assert f"{final['test_accuracy']:.5f}" == "0.77986"
    assert f"{final['epsilon_max']:.4f}" == "6.9543"
    assert report["accuracy"]["final"] == final["test_accuracy"]
    assert f"{report['privacy']['epsilon_record_level']:.4f}" == "6.9543"
    res = verify_run(DEFAULT_RUN)
    assert res.ok and f"{max(res.epsilons.values()):.4f}" == "6.9543"  # the ledger's own maximum


def test_default_run_report_md_states_the_ledgers_numbers():
    """report.md is what a person reads: its headline and per-client table, to the digits it
    prints, are the ledger's numbers."""
    text = (DEFAULT_RUN / "report.md").read_text(encoding="utf-8")
    res = verify_run(DEFAULT_RUN)
    assert res.ok
    top = max(res.epsilons.values())
    assert f"record-level (ε = {top:.2f}, δ = 1e-05)" in text
    final = [r for r in metrics_rows(DEFAULT_RUN) if "stopped" not in r][-1]
    assert f"**{final['test_accuracy']:.4f}** after round {final['round']}" in text
    header = ledger_header(DEFAULT_RUN)
    _, charges, _ = check_chain((DEFAULT_RUN / "ledger.jsonl").read_text(encoding="utf-8").splitlines())
    table = {int(m[0]): m for m in re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                                              text, flags=re.MULTILINE)}
    assert set(table) == set(res.epsilons)
    printed = 5e-4 + 1e-6  # three decimals, plus floating point

    def near(shown: str, value: float, acc: str) -> bool:
        return abs(float(shown) - value) <= get_accountant(acc).error + printed

    for c, eps in res.epsilons.items():
        _, _, rounds, pld, rdp, prv, budget, remaining = table[c]
        mine = [ch.mechanism for ch in charges if ch.client == c]
        assert int(rounds) == len(mine)
        assert near(pld, eps, "pld")
        assert near(rdp, get_accountant("rdp").epsilon(mine, header["delta"]), "rdp")
        assert near(prv, get_accountant("prv").epsilon(mine, header["delta"]), "prv")
        assert float(budget) == header["budgets"][str(c)] and near(remaining, header["budgets"][str(c)] - eps, "pld")


# ------------------------------------------------------------------ an edited number fails verify


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def edit_report(run: Path, fn: Callable[[dict], None]) -> None:
    path = run / "report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    fn(report["privacy"])
    path.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def edit_metrics(run: Path, line: int, fn: Callable[[dict], None]) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[line - 1])
    fn(rec)
    lines[line - 1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def ledger_value(problem: str) -> float:
    """The number a problem says the ledger gives."""
    m = re.search(r"the ledger(?:'s [^)]*?)? give[s]? (-?[\d.e+-]+)", problem)
    assert m, problem
    return float(m.group(1))


def test_verify_fails_naming_an_edited_epsilon_in_report_json_and_metrics_jsonl(tmp_path, capsys):
    """The test that can fail: one epsilon of report.json and one of metrics.jsonl understated."""
    run = copy_run(DEFAULT_RUN, tmp_path)
    assert verify_run(run).ok  # the copy verifies before the edits
    report = json.loads((run / "report.json").read_text(encoding="utf-8"))
    true_report = report["privacy"]["clients"]["3"]["epsilon"]
    true_metrics = metrics_rows(run)[4]["epsilon"]["1"]  # line 5: round 4
    assert true_metrics > 0
    edit_report(run, lambda p: p["clients"]["3"].update(epsilon=5.5))
    edit_metrics(run, 5, lambda r: r["epsilon"].update({"1": 3.25}))

    res = verify_run(run)
    assert not res.ok and len(res.problems) == 2, res.problems
    in_report = [p for p in res.problems if p.startswith("report.json")]
    in_metrics = [p for p in res.problems if p.startswith("metrics.jsonl")]
    assert len(in_report) == len(in_metrics) == 1, res.problems
    assert "privacy.clients.3.epsilon" in in_report[0] and " is 5.5;" in in_report[0]
    assert ledger_value(in_report[0]) == pytest.approx(true_report, rel=1e-6)
    assert "line 5 (round 4)" in in_metrics[0] and "epsilon.1" in in_metrics[0] and " is 3.25;" in in_metrics[0]
    assert ledger_value(in_metrics[0]) == pytest.approx(true_metrics, rel=1e-6)

    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL: ")]
    assert len(fails) == 2 and not out.startswith("OK")
    assert any("report.json" in f and "privacy.clients.3.epsilon" in f for f in fails)
    assert any("metrics.jsonl line 5" in f and "epsilon.1" in f for f in fails)


def _client(key: str, fn: Callable) -> Callable[[dict], None]:
    def edit(privacy: dict) -> None:
        privacy["clients"]["3"][key] = fn(privacy["clients"]["3"][key])
    return edit


def _cross(acc: str, delta: float) -> Callable[[dict], None]:
    def edit(privacy: dict) -> None:
        privacy["clients"]["3"]["cross_checks"][acc] += delta
    return edit


# (what was edited, the edit, the field the problem must name)
REPORT_EDITS: dict[str, tuple[Callable[[dict], None], str]] = {
    "client ε understated": (_client("epsilon", lambda v: v * 0.9), "privacy.clients.3.epsilon"),
    "remaining budget overstated": (_client("remaining", lambda v: v + 0.5), "privacy.clients.3.remaining"),
    "budget raised": (_client("budget", lambda v: 9.0), "privacy.clients.3.budget"),
    "a round left out": (_client("rounds", lambda v: v[:-1]), "privacy.clients.3.rounds"),
    "rounds participated": (_client("rounds_participated", lambda v: v - 1), "privacy.clients.3.rounds_participated"),
    "steps": (_client("steps", lambda v: v - 10), "privacy.clients.3.steps"),
    "noise multiplier": (_client("noise_multipliers", lambda v: [x * 2 for x in v]), "privacy.clients.3.noise_multipliers"),
    "sample rate": (_client("sample_rates", lambda v: [x / 2 for x in v]), "privacy.clients.3.sample_rates"),
    "clip norm": (_client("clip_norms", lambda v: [0.5]), "privacy.clients.3.clip_norms"),
    "record count": (_client("num_examples", lambda v: v * 10), "privacy.clients.3.num_examples"),
    "rdp cross-check": (_cross("rdp", -0.5), "privacy.clients.3.cross_checks.rdp"),
    "prv cross-check beyond its stated error 0.01": (_cross("prv", -0.02), "privacy.clients.3.cross_checks.prv"),
    "record-level ε": (lambda p: p.update(epsilon_record_level=p["epsilon_record_level"] - 0.1), "privacy.epsilon_record_level"),
    "delta": (lambda p: p.update(delta=1e-6), "privacy.delta"),
    "accountant": (lambda p: p["accountant"].update(name="rdp"), "privacy.accountant.name"),
    "accountant's stated error": (lambda p: p["accountant"].update(error=0.5), "privacy.accountant.error"),
    "ledger header hash": (lambda p: p["ledger"].update(header_hash="0" * 64), "privacy.ledger.header_hash"),
    "a client left out": (lambda p: p["clients"].pop("9"), "(privacy.clients.9)"),
    "a client added": (lambda p: p["clients"].update({"10": p["clients"]["9"]}), "never charged nor budgeted"),
    "a number verify cannot check": (lambda p: p.update(epsilon_bonus=1.0), "privacy.epsilon_bonus"),
    "privacy said disabled": (lambda p: p.update(enabled=False), "privacy.enabled"),
}


@pytest.mark.parametrize("what", sorted(REPORT_EDITS))
def test_verify_names_each_edited_privacy_number_of_report_json(tmp_path, what):
    edit, field = REPORT_EDITS[what]
    run = copy_run(DEFAULT_RUN, tmp_path)
    edit_report(run, edit)
    res = verify_run(run)
    assert not res.ok, what
    assert any(p.startswith("report.json") and field in p for p in res.problems), res.problems


def _line(key: str, fn: Callable) -> Callable[[dict], None]:
    def edit(rec: dict) -> None:
        fn(rec[key])
    return edit


METRICS_EDITS: dict[str, tuple[int, Callable[[dict], None], str]] = {
    "client ε understated": (7, _line("epsilon", lambda e: e.update({"0": e["0"] / 2})), "line 7 (round 6): client 0's ε (epsilon.0) is"),
    "largest ε understated": (7, lambda r: r.update(epsilon_max=r["epsilon_max"] - 1), "line 7 (round 6): the largest ε (epsilon_max)"),
    "a charged client left out": (3, _line("epsilon", lambda e: e.pop("0")), "line 3 (round 2): no ε for client 0 (epsilon.0)"),
    "ε of a client with no budget": (7, _line("epsilon", lambda e: e.update({"42": 0.0})), "epsilon.42"),
    "noise multiplier announced": (1, _line("noise_multiplier", lambda s: s.update({"3": s["3"] * 1.1})), "noise_multiplier.3"),
    "ε from a later round": (2, lambda r: r.update(epsilon=metrics_rows(DEFAULT_RUN)[6]["epsilon"]), "line 2 (round 1): client"),
    "no anchor: compared with the charges up to its round": (
        3, lambda r: (r.pop("ledger"), r["epsilon"].update({"0": 0.0})),
        "line 3 (round 2): client 0's ε (epsilon.0) is 0.0; the ledger's charges up to round 2 give"),
}


@pytest.mark.parametrize("what", sorted(METRICS_EDITS))
def test_verify_names_each_edited_epsilon_of_metrics_jsonl(tmp_path, what):
    line, edit, field = METRICS_EDITS[what]
    run = copy_run(DEFAULT_RUN, tmp_path)
    edit_metrics(run, line, edit)
    res = verify_run(run)
    assert not res.ok, what
    assert any(p.startswith("metrics.jsonl") and field in p for p in res.problems), res.problems


def test_differences_within_the_accountants_stated_error_pass(tmp_path):
    """prv states an error of 0.01: a cross-check 0.005 off is within it; pld states 0: only
    floating-point noise (relative 1e-6) is allowed, in report.json and in metrics.jsonl alike."""
    assert get_accountant("prv").error == 0.01 and get_accountant("pld").error == 0.0
    run = copy_run(DEFAULT_RUN, tmp_path)
    edit_report(run, _cross("prv", 0.005))
    edit_report(run, _client("epsilon", lambda v: v * (1 + 1e-9)))
    edit_metrics(run, 7, _line("epsilon", lambda e: e.update({"0": e["0"] * (1 - 1e-9)})))
    res = verify_run(run)
    assert res.ok, res.problems
    edit_report(run, _client("epsilon", lambda v: v * (1 - 1e-5)))  # pld: 1e-5 is beyond floating point
    assert any("privacy.clients.3.epsilon" in p for p in verify_run(run).problems)


def test_a_cross_check_this_verifier_cannot_compute_is_reported_unchecked(monkeypatch, capsys):
    """Without privlora (accounting alone) there is no "prv" accountant: its cross-checks are
    listed as not checked, not passed silently and not failed."""
    from accounting import accountants

    monkeypatch.delitem(accountants._REGISTRY, "prv", raising=False)
    monkeypatch.delitem(accountants._INSTANCES, "prv", raising=False)
    monkeypatch.setattr(accountants, "_plugin", lambda name: None)  # as if privlora were not installed
    res = verify_run(DEFAULT_RUN)
    assert res.ok, res.problems
    assert len(res.unchecked) == 10 and all("privacy.clients." in u and ".cross_checks.prv" in u for u in res.unchecked)
    assert main(["verify", str(DEFAULT_RUN)]) == 0
    out = capsys.readouterr().out
    assert out.count("NOT CHECKED: ") == 10 and "(but for those NOT CHECKED above)" in out


def test_a_warning_the_ledger_gives_must_be_in_the_report(tmp_path):
    """delta above 1/n for a client is a warning privacy_summary writes; a report that drops it fails."""
    delta = 0.05
    led = Ledger.create(tmp_path / "ledger.jsonl", delta, "pld", {0: 50.0, 1: 50.0})
    led.append(0, 1, SubsampledGaussian(1.0, 0.1, 5, 1.0, delta))
    rows = [{"round": 0, "client_sizes": [100, 10], "epsilon": {"0": 0.0, "1": 0.0}, "epsilon_max": 0.0,
             "ledger": {"entries": 0, "head": led.header["hash"]}}]
    eps0 = get_accountant("pld").epsilon(led.history(0), delta)
    rows.append({"round": 1, "epsilon": {"0": eps0, "1": 0.0}, "epsilon_max": eps0, "ledger": {"entries": 1, "head": led.head}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = privacy_summary(led, "pld", cross_checks=("pld", "rdp"), client_sizes={0: 100, 1: 10})
    assert len(summary["warnings"]) == 1 and summary["warnings"][0].startswith("client 0: delta=0.05")
    (tmp_path / "report.json").write_text(json.dumps({"privacy": summary}))  # as `accounting` alone writes it
    assert verify_run(tmp_path).ok, verify_run(tmp_path).problems
    (tmp_path / "report.json").write_text(json.dumps({"privacy": {"enabled": True, **summary}}))  # as privlora's report
    assert verify_run(tmp_path).ok, verify_run(tmp_path).problems
    (tmp_path / "report.json").write_text(json.dumps({"privacy": {"enabled": True, **summary, "warnings": []}}))
    problems = verify_run(tmp_path).problems
    assert len(problems) == 1 and "privacy.warnings lacks" in problems[0] and "client 0: delta=0.05" in problems[0]


@pytest.mark.parametrize("where", ["report.json", "metrics.jsonl"])
def test_a_run_without_privacy_that_states_an_epsilon_fails(tmp_path, capsys, where):
    run = copy_run(SWEEP_RUNS / "ffa-epsinf-seed0", tmp_path)
    assert verify_run(run).not_private and verify_run(run).ok
    if where == "report.json":
        edit_report(run, lambda p: p.update(epsilon_record_level=1.0))
    else:
        edit_metrics(run, 7, lambda r: r.update(epsilon={"0": 1.0}, epsilon_max=1.0))
    res = verify_run(run)
    assert res.not_private and not res.ok
    assert all(p.startswith(where) for p in res.problems) and "no ledger" in res.problems[0]
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: " + where in out and "NOTHING TO VERIFY" not in out
