"""`privlora verify` covers report.md, the privacy statement people read and forward (issue 31,
item 3): the statement is re-rendered from the ledger and must be in report.md word for word; every
other ε report.md states (each round's "max ε", the audit's claimed ε, any "ε = x") must be one the
ledger gives. An edited privacy number fails naming report.md and the line (found and expected);
an edited line that states no privacy number does not.

Copies of the committed examples/default-run are edited; the committed folder is only read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from accounting import verify_run
from privlora.commands.cli import main  # "prv" comes from privlora's accounting.accountants entry point

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "examples" / "default-run"
SWEEP_RUN = ROOT / "benchmarks" / "results" / "sweep-default" / "runs" / "ffa-eps1-seed0"
FREE_RUN = ROOT / "benchmarks" / "results" / "sweep-default" / "runs" / "ffa-epsinf-seed0"
MD = DEFAULT_RUN / "report.md"

HEADLINE = "(ε = 6.95, δ = 1e-05)"
CLIENT_3 = "| 3 | 1151 | 2 | 5.606 | 6.773 | 5.617 | 8 | 2.394 |"


def line_of(text: str, run: Path = DEFAULT_RUN) -> int:
    """The 1-based number of the (only) line of run's report.md that contains ``text``."""
    hits = [i for i, line in enumerate((run / "report.md").read_text(encoding="utf-8").splitlines(), 1) if text in line]
    assert len(hits) == 1, (text, hits)
    return hits[0]


def copy_run(tmp_path: Path, src: Path = DEFAULT_RUN) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def edit_md(run: Path, old: str, new: str) -> None:
    path = run / "report.md"
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def verify_cli(run: Path, capsys) -> tuple[int, str]:
    code = main(["verify", str(run)])
    return code, capsys.readouterr().out


def only_md_problem(run: Path) -> str:
    res = verify_run(run)
    assert not res.ok
    assert len(res.problems) == 1 and res.problems[0].startswith("report.md line "), res.problems
    return res.problems[0]


# ------------------------------------------------------------------ the committed run


def test_the_committed_default_run_verifies_report_md_too(capsys):
    assert HEADLINE in MD.read_text(encoding="utf-8") and CLIENT_3 in MD.read_text(encoding="utf-8")
    res = verify_run(DEFAULT_RUN)
    assert res.ok, res.problems
    assert res.report_md == "checked" and not res.unchecked
    code, out = verify_cli(DEFAULT_RUN, capsys)
    assert code == 0 and out.startswith("OK: ") and "FAIL" not in out
    assert "report.md's privacy statement (re-rendered from the ledger, word for word)" in out


def test_a_sweep_folder_without_report_md_verifies_and_says_so(capsys):
    """Committed sweep folders keep report.json but no report.md (nor its plots): OK, and the OK
    line says no statement was checked."""
    assert not (SWEEP_RUN / "report.md").exists() and (SWEEP_RUN / "report.json").is_file()
    res = verify_run(SWEEP_RUN)
    assert res.ok and res.report_md == "absent", res.problems
    code, out = verify_cli(SWEEP_RUN, capsys)
    assert code == 0 and out.startswith("OK: ") and "no report.md, so no privacy statement was checked" in out


# ------------------------------------------------------------------ edits that must fail


def test_headline_epsilon_edited_fails_naming_report_md_and_the_line(tmp_path, capsys):
    """The issue's case: the headline ε edited from 6.95 to 1.00 no longer verifies OK."""
    run = copy_run(tmp_path)
    assert verify_run(run).ok
    edit_md(run, HEADLINE, "(ε = 1.00, δ = 1e-05)")
    problem = only_md_problem(run)
    assert problem.startswith(f"report.md line {line_of(HEADLINE)}: found ")
    assert "(ε = 1.00, δ = 1e-05)" in problem.split("; ")[0] and HEADLINE in problem.split("; ")[1]
    code, out = verify_cli(run, capsys)
    assert code == 1 and not out.startswith("OK")
    fails = [line for line in out.splitlines() if line.startswith("FAIL: ")]
    assert fails == [f"FAIL: {problem}"]


def test_a_client_epsilon_edited_in_the_table_fails_naming_its_row(tmp_path, capsys):
    run = copy_run(tmp_path)
    edited = CLIENT_3.replace("| 5.606 |", "| 4.606 |")
    edit_md(run, CLIENT_3, edited)
    problem = only_md_problem(run)
    assert problem == (f"report.md line {line_of(CLIENT_3)}: found {edited!r}; the privacy statement re-rendered from the "
                       f"ledger (and the run's config) has {CLIENT_3!r}")
    assert verify_cli(run, capsys)[0] == 1


# (what was edited, old text, new text): numbers of the statement other than the headline and client ε
STATEMENT_EDITS: dict[str, tuple[str, str]] = {
    "rdp cross-check": ("| 8.260 | 6.965 | 8 | 1.046 |\n| 3 ", "| 7.260 | 6.965 | 8 | 1.046 |\n| 3 "),
    "remaining budget": ("| 5.617 | 8 | 2.394 |", "| 5.617 | 8 | 3.394 |"),
    "record count": ("| 3 | 1151 | 2 |", "| 3 | 11510 | 2 |"),
    "delta": ("δ = 1e-05)", "δ = 1e-07)"),
    "noise multiplier": ("σ ∈ {0.6543, 0.666}", "σ ∈ {1.6543, 1.666}"),
    "ledger charges": ("`ledger.jsonl`, 30 charges", "`ledger.jsonl`, 20 charges"),
    "a client's row removed": (CLIENT_3 + "\n", ""),
}


@pytest.mark.parametrize("what", sorted(STATEMENT_EDITS))
def test_every_number_of_the_statement_is_compared(tmp_path, what):
    old, new = STATEMENT_EDITS[what]
    run = copy_run(tmp_path)
    edit_md(run, old, new)
    res = verify_run(run)
    assert not res.ok and all(p.startswith("report.md line ") for p in res.problems), (what, res.problems)


def test_a_rounds_max_epsilon_edited_fails_naming_the_line(tmp_path):
    """Outside the statement: the rounds table's "max ε", against the ledger at that round."""
    row = "| 5 | 0.7783 | 1.1423 | - | 6.954 |"
    run = copy_run(tmp_path)
    edit_md(run, row, row.replace("6.954", "5.954"))
    problem = only_md_problem(run)
    assert problem.startswith(f"report.md line {line_of(row)}: round 5's max ε is 5.954; the ledger gives 6.9543 (pld")


def test_an_epsilon_stated_anywhere_else_must_be_the_ledgers(tmp_path):
    run = copy_run(tmp_path)
    upload = "- Upload and download are the mean"
    edit_md(run, upload, "- Privacy: every client at ε = 1.00.\n" + upload)
    problem = only_md_problem(run)
    assert problem.startswith(f"report.md line {line_of(upload)}: states ε = 1.00, which is no ε the ledger gives")
    # one the ledger does give (client 9's, 4.734) is fine there
    edit_md(run, "ε = 1.00.", "ε = 4.73.")
    assert verify_run(run).ok, verify_run(run).problems


def test_epsilon_zero_is_true_only_of_a_client_the_ledger_never_charged(tmp_path):
    """Every client of the default run trained, so "ε = 0" about any of them is false; in a run
    where a budgeted client never trained (tests/test_resume_budget.py) the report says so and
    verifies."""
    run = copy_run(tmp_path)
    upload = "- Upload and download are the mean"
    edit_md(run, upload, "- never trained, so at ε = 0: client 1.\n" + upload)
    assert only_md_problem(run).startswith(f"report.md line {line_of(upload)}: states ε = 0, which is no ε the ledger gives")


def test_the_calibration_target_must_be_the_configs(tmp_path):
    run = copy_run(tmp_path)
    edit_md(run, "so that ε ≤ 8.0 if", "so that ε ≤ 2.0 if")
    problem = only_md_problem(run)
    assert "the calibration target is ε ≤ 2.0; config.toml's privacy.target_epsilon is 8.0" in problem


def test_the_secure_aggregation_sentence_is_re_rendered_by_the_cli(tmp_path, capsys):
    """The sentence is privlora's wording of config.toml's [secagg]: `privlora verify` passes it
    (accounting alone takes it as report.md states it)."""
    run = copy_run(tmp_path)
    edit_md(run, "not used in this run: the server sees", "on: masked secure aggregation; the server sees")
    code, out = verify_cli(run, capsys)
    assert code == 1
    assert "FAIL: report.md line " in out and "Secure aggregation:** on: masked" in out and "not used in this run" in out
    assert verify_run(run).ok  # without the CLI's context


def test_report_md_deleted_after_privlora_report_wrote_it_fails(tmp_path, capsys):
    """The statement's plot is still there, so `privlora report` wrote a report.md that is gone."""
    run = copy_run(tmp_path)
    (run / "report.md").unlink()
    res = verify_run(run)
    assert len(res.problems) == 1 and res.problems[0].startswith("report.md is missing"), res.problems
    assert verify_cli(run, capsys)[0] == 1


def test_a_cross_check_this_verifier_cannot_compute_must_agree_with_report_json(tmp_path, monkeypatch):
    """Without privlora's "prv": report.md's ε (prv) column is compared with report.json's (which
    is listed NOT CHECKED), so the two files cannot disagree unnoticed."""
    from accounting import accountants

    monkeypatch.delitem(accountants._REGISTRY, "prv", raising=False)
    monkeypatch.delitem(accountants._INSTANCES, "prv", raising=False)
    monkeypatch.setattr(accountants, "_plugin", lambda name: None)
    run = copy_run(tmp_path)
    res = verify_run(run)
    assert res.ok, res.problems
    assert len(res.unchecked) == 10 and all("report.md's ε (prv) column shows the same number" in u for u in res.unchecked)
    edit_md(run, "| 5.617 | 8 | 2.394 |", "| 5.600 | 8 | 2.394 |")
    assert only_md_problem(run).startswith(f"report.md line {line_of(CLIENT_3)}: found ")


# ------------------------------------------------------------------ edits that must not fail


def test_lines_without_a_privacy_number_are_not_checked(tmp_path, capsys):
    run = copy_run(tmp_path)
    edit_md(run, "- Accuracy on the held-out test split: **0.7799**", "- Accuracy on a test set: **0.9999**")
    edit_md(run, "| 6 | 0.7799 | 1.0877 |", "| 6 | 0.8000 | 1.0000 |")
    edit_md(run, "Noise: clients", "Noise (as drawn): clients")
    res = verify_run(run)
    assert res.ok and res.report_md == "checked", res.problems
    code, out = verify_cli(run, capsys)
    assert code == 0 and out.startswith("OK: ")


def test_an_audit_section_claimed_epsilon_is_checked_and_its_lower_bounds_are_not(tmp_path):
    """`privlora audit` appends a section: its claimed ε is the ledger's largest over the clients
    holding canaries; its lower bounds (ε ≥ x) are findings of the audit, not ledger numbers."""
    from privlora.reporting.audit_section import render_audit_section

    run = copy_run(tmp_path)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()][-1]
    holders = [3, 9]
    claimed = max(last["epsilon"][str(c)] for c in holders)
    best = {"score": "loss", "r": 10, "k_in": 5, "k_out": 5, "v": 7, "epsilon_lower": 0.25}
    audit = {"method": "one-run audit", "design": "mislabelled", "canaries": 100, "included_canaries": 50,
             "confidence": 0.95, "delta": 1e-5, "epsilon_lower": 0.25, "epsilon_claimed": claimed, "violation": False,
             "best": best, "fdp": None, "per_score": {"loss": {"best": best, "candidates": []}}, "tests": 4,
             "level_per_test": 0.0125, "canary_client": [3, 9, 9, 3]}
    (run / "audit.json").write_text(json.dumps(audit), encoding="utf-8")
    md = run / "report.md"
    md.write_text(md.read_text(encoding="utf-8") + "\n" + "\n".join(render_audit_section(run)), encoding="utf-8")
    assert f"ε = {claimed:.3f} (the ledger's largest" in md.read_text(encoding="utf-8")
    assert verify_run(run).ok, verify_run(run).problems
    text = md.read_text(encoding="utf-8")
    md.write_text(text.replace("ε ≥ 0.250", "ε ≥ 0.500"), encoding="utf-8")
    assert verify_run(run).ok  # a lower bound is not the ledger's
    md.write_text(text.replace(f"ε = {claimed:.3f} (the ledger's", "ε = 9.000 (the ledger's"), encoding="utf-8")
    problem = only_md_problem(run)
    assert "the audit's claimed ε is 9.000; the ledger gives" in problem


def test_privlora_report_re_renders_what_verify_expects(tmp_path, capsys):
    """Drift guard: `privlora report` on a copy writes report.md afresh (this environment's
    packages) and it verifies; a run without DP re-rendered has nothing to verify, and an ε put
    into its report.md fails."""
    from privlora.reporting.report import write_report

    run = copy_run(tmp_path)
    write_report(run)
    code, out = verify_cli(run, capsys)
    assert code == 0 and out.startswith("OK: ") and "report.md's privacy statement" in out, out
    free = copy_run(tmp_path, FREE_RUN)
    write_report(free)
    code, out = verify_cli(free, capsys)
    assert code == 0 and out.startswith("NOTHING TO VERIFY"), out
    edit_md(free, "| 6 | 0.7838 | 0.4649 | 0.4966 | - |", "| 6 | 0.7838 | 0.4649 | 0.4966 | 2.000 |")
    res = verify_run(free)
    assert res.not_private and len(res.problems) == 1, res.problems
    assert res.problems[0].startswith("report.md line ") and "max ε is 2.000, but the run has no ledger" in res.problems[0]
