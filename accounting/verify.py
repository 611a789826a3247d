"""Verify a run's privacy record from its files alone: `privlora verify DIR`.

Checks, each reported as a plain sentence:

1. the ledger's hash chain (edits, removed, inserted, reordered or duplicated entries);
2. the anchors the run wrote elsewhere — ``report.json`` (entries and head hash of the whole
   ledger) and every line of ``metrics.jsonl`` and the checkpoint (entries and head hash at that
   moment): each must match the ledger's own chain at that length, which catches lines cut off
   the end of the ledger;
3. every client's epsilon, recomputed from the ledger with the ledger's accountant, against the
   client's budget;
4. every privacy number ``report.json`` states (`report_privacy_problems`): per client its
   epsilon, remaining budget, budget, rounds, steps, noise multipliers, sample rates, clip norms,
   record count and cross-check epsilons, and the record-level epsilon, delta, accountant and
   ledger hashes, each against the same number recomputed from the ledger (`privacy_summary`);
5. every epsilon ``metrics.jsonl`` states (`metrics_privacy_problems`): each client's epsilon and
   the maximum on every line, against the ledger as it stood when the line was written (the
   line's anchor), and the noise multiplier round 0 announced against what the ledger charged;
6. ``report.md``, the privacy statement people read and forward (`report_md_problems`): its
   privacy statement must be word for word the one `render_privacy_statement` gives for the
   summary recomputed from the ledger (so every number in it, to the digits it prints: headline
   ε and δ, each client's ε, cross-checks, budget and remaining, σ, q, C, ledger and config
   hashes); a problem names each differing line, found against expected. Every other ε it
   states (each round's "max ε", the audit's claimed ε, any "ε = x") must be one the ledger gives
   within the accountant's stated error and the printed digits. A folder without report.md
   (committed sweep folders keep only report.json) is not a problem unless `privlora report`
   left its ε plot there, which shows a report.md was written and then removed.

Numbers an accountant computes must match within that accountant's stated ``error`` plus a
relative ``rel_tol`` (1e-6) for floating point; every other number must match exactly. A problem
names the file, the field, the value found and the value the ledger gives. A run without
privacy (no ledger, ``privacy.enabled = false``) must not state an epsilon anywhere.

A hash chain detects tampering by anyone who does not rewrite every anchor too; publishing the
head hash outside the run folder (as the report invites) closes that gap.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accountants import Accountant, get_accountant, history_key
from .ledger import Charge, Ledger, check_chain
from .report import privacy_summary, render_privacy_statement

LEDGER_FILE = "ledger.jsonl"


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    epsilons: dict[int, float] = field(default_factory=dict)
    entries: int = 0
    head: str = ""
    checked_anchors: int = 0
    not_private: bool = False
    """The run's config.toml says ``privacy.enabled = false``: no ledger, no claim, nothing to verify."""
    unchecked: list[str] = field(default_factory=list)
    """Numbers of the run's files this verifier could not recompute (e.g. a cross-check by an
    accountant it does not have): not problems, but not verified either."""
    client_level: dict[str, dict[int, float]] = field(default_factory=dict)
    """Under privacy.unit = 'client': {"server": {client: epsilon}, "model_only": {...}} recomputed
    from client_level.jsonl alone (`client_level_problems`)."""
    report_md: str = ""
    """"checked": report.md's privacy statement and every ε it states were compared with the ledger;
    "absent": the folder has no report.md (committed sweep folders keep only report.json);
    "" when not reached (no ledger, or a broken one)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _anchor_problem(where: str, anchor: Any, heads: list[str]) -> str | None:
    """``heads[k]`` is the chain's hash after k charges (heads[0] = header hash)."""
    if not isinstance(anchor, dict):
        return f"{where}: the ledger anchor is missing or malformed"
    n, head = anchor.get("entries"), anchor.get("head")
    if not isinstance(n, int) or n < 0:
        return f"{where}: the ledger anchor has no valid entry count"
    if n >= len(heads):
        return f"{where}: records {n} ledger entries but the ledger holds {len(heads) - 1} (entries were cut off the ledger)"
    if heads[n] != head:
        return f"{where}: ledger head after {n} entries is {heads[n][:16]}…, but it recorded {str(head)[:16]}…"
    return None


def _privacy_disabled(run: Path) -> bool:
    """True if the run's config.toml sets ``[privacy] enabled = false`` (read with tomllib)."""
    import tomllib

    try:
        raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    privacy = raw.get("privacy", {})
    return isinstance(privacy, dict) and privacy.get("enabled") is False


def _show(v: Any) -> str:
    """A value as a problem states it: floats in full (a difference may sit past the 6th digit)."""
    if isinstance(v, float):
        return repr(v)
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _differs(found: Any, want: Any, tol: float) -> bool:
    """True unless ``found`` is ``want``: numbers within ``tol``, lists element by element, the rest equal."""
    if _is_number(want):
        return not _is_number(found) or not abs(float(found) - float(want)) <= tol
    if isinstance(want, list):
        return not isinstance(found, list) or len(found) != len(want) or any(_differs(f, w, tol) for f, w in zip(found, want))
    return found != want


def _tolerance(acc_error: float | None, want: Any, rel_tol: float) -> float:
    """How far a stated number may be from the ledger's. An accountant's number (``acc_error``
    given): its stated error plus ``rel_tol`` relative to max(1, value), as floating point allows.
    Any other number (``acc_error`` None: copied from the ledger, like delta or a sample rate):
    ``rel_tol`` relative to the value itself, so a small number is compared as closely as a big one."""
    values = [abs(float(x)) for x in (want if isinstance(want, list) else [want]) if _is_number(x)]
    if acc_error is None:
        return rel_tol * max(values, default=0.0)
    return acc_error + rel_tol * max([1.0, *values])


REPORT_TEXT_FIELDS = ("format", "unit_of_privacy", "adjacency")
"""Words, not numbers: report.json's privacy block states them; the ledger does not give them."""


def report_privacy_problems(
    privacy: Any,
    ledger: Ledger,
    client_sizes: dict[int, int] | None = None,
    rel_tol: float = 1e-6,
    where: str = "report.json",
) -> tuple[list[str], list[str]]:
    """Every number of report.json's ``privacy`` block against the same block recomputed from
    ``ledger`` alone by `privacy_summary` (with the ledger's accountant, the cross-check
    accountants the report names, and ``client_sizes`` from metrics.jsonl's round 0).

    Returns (problems, unchecked). A problem names the file, the field, the value found and the
    value the ledger gives. Epsilons (and what is computed from them: remaining budget,
    record-level epsilon) may differ by the computing accountant's stated error plus ``rel_tol``
    relative; every other number must match exactly (up to ``rel_tol``). ``unchecked`` lists
    cross-checks by accountants this process does not have (``prv`` needs ``import privlora``).
    The ledger anchor's ``entries`` and ``head`` are `verify_run`'s anchor check, not repeated here.
    """
    problems: list[str] = []
    unchecked: list[str] = []
    if not isinstance(privacy, dict):
        return [f"{where}: privacy is {_show(privacy)}, not the privacy summary the ledger gives"], unchecked
    if privacy.get("enabled", True) is not True:  # privlora's report says "enabled"; the summary alone does not
        return [(f"{where}: privacy.enabled is {_show(privacy.get('enabled'))}, but the run has a ledger of "
                 f"{len(ledger)} charges (expected true)")], unchecked
    name = str(ledger.header.get("accountant", "pld"))
    acc = get_accountant(name)
    listed = privacy.get("cross_checks")
    listed_names = [str(c.get("name")) for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    available, missing = [], []
    for n in listed_names:
        try:
            get_accountant(n)
            available.append(n)
        except ValueError:
            missing.append(n)
    want = privacy_summary(ledger, name, cross_checks=available, client_sizes=client_sizes)
    errors = {n: get_accountant(n).error for n in [name, *available]}

    def compare(field_: str, what: str, found: Any, expected: Any, err: float | None = None, how: str = "") -> None:
        tol = _tolerance(err, expected, rel_tol)
        if _differs(found, expected, tol):
            detail = f" ({how}, tolerance {tol:g})" if how else ""
            problems.append(f"{where}: {what} ({field_}) is {_show(found)}; the ledger gives {_show(expected)}{detail}")

    # the federation-level numbers
    compare("privacy.delta", "delta", privacy.get("delta"), want["delta"])
    compare("privacy.epsilon_record_level", "the record-level ε (the largest client ε)", privacy.get("epsilon_record_level"),
            want["epsilon_record_level"], errors[name], f"by {name}")
    found_acc = privacy.get("accountant") if isinstance(privacy.get("accountant"), dict) else {}
    compare("privacy.accountant.name", "the accountant", found_acc.get("name"), name)
    compare("privacy.accountant.error", "the accountant's stated error", found_acc.get("error"), acc.error)
    # each named once, and never the accountant itself (what privacy_summary would have written)
    compare("privacy.cross_checks", "the cross-check accountants", listed_names, [n for n in dict.fromkeys(listed_names) if n != name])
    found_ledger = privacy.get("ledger") if isinstance(privacy.get("ledger"), dict) else {}
    compare("privacy.ledger.file", "the ledger's file name", found_ledger.get("file"), want["ledger"]["file"])
    compare("privacy.ledger.header_hash", "the ledger header's hash", found_ledger.get("header_hash"), want["ledger"]["header_hash"])
    warnings = privacy.get("warnings") if isinstance(privacy.get("warnings"), list) else []
    for w in want["warnings"]:
        if w not in warnings:  # a warning the report leaves out; one more than the ledger gives is only cautious
            problems.append(f"{where}: privacy.warnings lacks the warning the ledger gives: {w!r}")
    known = set(want) | set(REPORT_TEXT_FIELDS) | {"enabled"}
    for key in sorted(set(privacy) - known):
        problems.append(f"{where}: privacy.{key} = {_show(privacy[key])} is not a number the ledger gives; verify cannot check it")

    # every client
    found_clients = privacy.get("clients") if isinstance(privacy.get("clients"), dict) else {}
    extra = sorted(set(found_clients) - set(want["clients"]), key=lambda c: (len(c), c))
    if extra:
        problems.append(f"{where} lists clients the ledger never charged nor budgeted (privacy.clients): {extra}")
    for c, expected in want["clients"].items():
        got = found_clients.get(c)
        if not isinstance(got, dict):
            problems.append(f"{where} has no ε for client {c} (privacy.clients.{c}); the ledger gives {_show(expected['epsilon'])} ({name})")
            continue
        for key, value in expected.items():
            field_ = f"privacy.clients.{c}.{key}"
            if key not in got:
                problems.append(f"{where}: client {c} has no {key} ({field_}); the ledger gives {_show(value)}")
            elif key == "cross_checks":
                found_cross = got[key] if isinstance(got[key], dict) else {}
                for n, eps in value.items():
                    compare(f"{field_}.{n}", f"client {c}'s ε by the {n} cross-check", found_cross.get(n), eps, errors[n], f"by {n}")
                for n in sorted(set(found_cross) - set(value)):
                    if n in missing:
                        unchecked.append(f"{where}: client {c}'s ε by the {n} cross-check ({field_}.{n} = {_show(found_cross[n])}): "
                                         f"this verifier has no {n!r} accountant")
                    else:
                        problems.append(f"{where}: {field_}.{n} = {_show(found_cross[n])} is a cross-check the report does not list")
            elif key in ("epsilon", "remaining"):
                compare(field_, f"client {c}'s {key}", got[key], value, errors[name], f"by {name}")
            else:
                compare(field_, f"client {c}'s {key}", got[key], value)
        for key in sorted(set(got) - set(expected)):
            problems.append(f"{where}: client {c}'s {key} (privacy.clients.{c}.{key} = {_show(got[key])}) is not a number "
                            "the ledger (or metrics.jsonl's round 0) gives; verify cannot check it")
    return problems, unchecked


def metrics_privacy_problems(
    rows: list[tuple[int, dict[str, Any]]],
    header: dict[str, Any],
    charges: list[Charge],
    accountant: Accountant,
    rel_tol: float = 1e-6,
) -> list[str]:
    """Every privacy number of metrics.jsonl against the ledger: on each line (``rows`` holds
    (line number, record)) each client's ``epsilon`` and ``epsilon_max``, recomputed from the
    ledger's charges as they stood when the line was written (the first ``ledger.entries``
    charges; a line without an anchor: the charges of its round and before), and round 0's
    ``noise_multiplier`` per client against every charge of that client.

    A line with an anchor that does not match the ledger is `verify_run`'s anchor problem and
    is not compared here. Clients the ledger never charged may be listed at 0 or left out; a
    charged client must be listed.
    """
    problems: list[str] = []
    delta = float(header.get("delta", 0))
    heads = [str(header.get("hash"))] + [c.hash for c in charges]
    budgeted = {int(k) for k in header.get("budgets", {})}
    sigmas_charged: dict[str, set[float]] = {}
    for ch in charges:
        sigmas_charged.setdefault(str(ch.client), set()).add(ch.mechanism.noise_multiplier)

    def tol_eps(v: float) -> float:
        return _tolerance(accountant.error, v, rel_tol)

    hist: dict[int, list] = {}  # the histories of charges[:done], grown line by line (lines only move forward)
    done = 0
    for i, rec in rows:
        where = f"metrics.jsonl line {i} (round {rec.get('round')})"
        anchor = rec.get("ledger")
        if anchor is None:
            upto_n = sum(1 for c in charges if _is_number(rec.get("round")) and c.round <= rec["round"])
            upto = f"charges up to round {rec.get('round')}"
        elif _anchor_problem(where, anchor, heads) is None:
            upto_n, upto = anchor["entries"], f"first {anchor['entries']} entries"
        else:
            continue
        if upto_n < done:
            hist, done = {}, 0
        for ch in charges[done:upto_n]:
            hist.setdefault(ch.client, []).append(ch.mechanism)
        done = upto_n
        if "epsilon" in rec or "epsilon_max" in rec:
            eps = rec.get("epsilon")
            if not isinstance(eps, dict):
                problems.append(f"{where}: epsilon is {_show(eps)}, not a mapping of clients to ε")
                eps = {}
            ids = set(hist)
            for k in eps:
                try:
                    ids.add(int(k))
                except ValueError:
                    problems.append(f"{where}: epsilon.{k} names no client")
            expected: dict[int, float] = {}
            for c in sorted(ids):
                expected[c] = accountant.epsilon(history_key(hist.get(c, [])), delta)
                found = eps.get(str(c))
                if found is None:
                    problems.append(f"{where}: no ε for client {c} (epsilon.{c}); the ledger's {upto} give "
                                    f"{_show(expected[c])} ({accountant.name})")
                elif _differs(found, expected[c], tol_eps(expected[c])):
                    problems.append(f"{where}: client {c}'s ε (epsilon.{c}) is {_show(found)}; the ledger's {upto} give "
                                    f"{_show(expected[c])} ({accountant.name}, tolerance {tol_eps(expected[c]):g})")
                if c not in budgeted and c not in hist:
                    problems.append(f"{where}: epsilon.{c} names a client the ledger never budgeted nor charged")
            top = max(expected.values(), default=0.0)
            found_top = rec.get("epsilon_max")
            nothing = found_top is None and not hist and not eps  # nothing spent and nothing claimed is fine
            if not nothing and _differs(found_top, top, tol_eps(top)):
                problems.append(f"{where}: the largest ε (epsilon_max) is {_show(found_top)}; the ledger's {upto} give "
                                f"{_show(top)} ({accountant.name}, tolerance {tol_eps(top):g})")
        sigmas = rec.get("noise_multiplier")
        if isinstance(sigmas, dict):
            for k, s in sigmas.items():
                charged = sorted(sigmas_charged.get(str(k), ()))
                if charged and _differs([s] * len(charged), charged, _tolerance(None, charged, rel_tol)):
                    problems.append(f"{where}: client {k}'s noise multiplier (noise_multiplier.{k}) is {_show(s)}; the "
                                    f"ledger charged it at {_show(charged if len(charged) > 1 else charged[0])}")
    return problems


# ---------------------------------------------------------------- report.md

REPORT_MD = "report.md"
PRIVACY_PLOT = "privacy_epsilon.png"
"""The ε plot `privlora report` draws for a DP run beside report.md (and names in the statement)."""
STATEMENT_HEADING = "## Privacy statement"
AUDIT_HEADING = "## Privacy audit"
SAMPLES_HEADING = "## Sample generations"

EPS_NUMBER = re.compile(
    r"(?:ε|(?i:\bepsilon\b))(?:\s*\([^)]*\))?\s*(=|≤|<=|<|≈|:)\s*\**\s*(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
)
"""An ε stated as a number: "ε = 6.95", "ε ≤ 8.0", "epsilon: 1.2", "ε (pld) = 6.954". Not "ε ≥ x":
a lower bound (an audit's finding) is not a number the ledger gives."""
CLAIMED_EPS = re.compile(r"claimed[^.;|]{0,40}?ε = \**(\d+(?:\.\d+)?)")
"""The audit section's upper bound "claimed by the accountant" (the ledger's); its other ε are lower bounds."""


def _excerpt(found: str, want: str, width: int = 36) -> tuple[str, str]:
    """The two lines around where they first differ (whole, when short)."""
    if len(found) <= 2 * width + 20 and len(want) <= 2 * width + 20:
        return found, want
    p = 0
    while p < min(len(found), len(want)) and found[p] == want[p]:
        p += 1
    s = 0
    while s < min(len(found), len(want)) - p and found[-1 - s] == want[-1 - s]:
        s += 1

    def cut(t: str) -> str:
        a = max(0, p - width)
        b = min(len(t), len(t) - s + width, a + 4 * width)
        return ("…" if a else "") + t[a:b] + ("…" if b < len(t) else "")

    return cut(found), cut(want)


def _clip(line: str, at: int = 0, width: int = 60) -> str:
    """``line`` whole when short, else about ``2 * width`` characters around position ``at``."""
    if len(line) <= 2 * width + 20:
        return line
    a = max(0, min(at - width, len(line) - 2 * width))
    b = min(len(line), a + 2 * width)
    return ("…" if a else "") + line[a:b] + ("…" if b < len(line) else "")


def _decimals(text: str) -> int:
    m = re.search(r"\.(\d+)", text.lower().split("e")[0])
    return len(m.group(1)) if m else 0


def _printed_tol(shown: str, err: float, value: float, rel_tol: float) -> float:
    """How far a number printed as ``shown`` may be from ``value``: half a unit of its last printed
    digit, plus the computing accountant's stated ``err``, plus ``rel_tol`` for floating point."""
    return 0.5 * 10.0 ** -_decimals(shown) + err + rel_tol * max(1.0, abs(value))


def _sections(lines: list[str]) -> list[str]:
    """For each line of report.md, the heading it sits under: "run" (above any), "statement",
    "audit", "samples" or "other"."""
    out, cur = [], "run"
    for line in lines:
        if line.startswith("## "):
            cur = ("statement" if line.startswith(STATEMENT_HEADING) else "audit" if line.startswith(AUDIT_HEADING)
                   else "samples" if line.startswith(SAMPLES_HEADING) else "other")
        out.append(cur)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _tables(lines: list[str]) -> list[tuple[int, list[str], list[tuple[int, list[str]]]]]:
    """Markdown tables: (header line index, header cells, [(row line index, cells)])."""
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|[\s:|-]+\|?", lines[i + 1].strip()):
            head, rows, j = _cells(lines[i]), [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append((j, _cells(lines[j])))
                j += 1
            out.append((i, head, rows))
            i = j
        else:
            i += 1
    return out


def _md_packages(lines: list[str]) -> list[tuple[str, str]]:
    """The "- **Packages:** a 1.0, b 2.0." line of report.md as (name, version) pairs, in its order."""
    for line in lines:
        if line.startswith("- **Packages:** "):
            items = line[len("- **Packages:** "):].rstrip(".").split(", ")
            return [tuple(x.rsplit(" ", 1)) for x in items if " " in x]  # type: ignore[misc]
    return []


def statement_context(run: Path, report: Any, md_lines: list[str], given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What `render_privacy_statement` needs beside the privacy summary, as `privlora report`
    passed it (``privlora.reporting.report.write_report``), from the run folder's files:

    - ``config_sha256``: the SHA-256 of the folder's config.toml (recomputed);
    - ``packages``: the versions report.json recorded when the report was rendered (report.json
      stores them sorted by name, so report.md's own order is kept when it names the same ones);
    - ``epsilon_plot``: `PRIVACY_PLOT`;
    - ``secagg``: the sentence on secure aggregation, privlora's wording of config.toml's
      ``[secagg]``: from ``given`` (`privlora verify` passes it) or else as report.md states it.

    ``given`` overrides any of these. Nothing here is stored for verify's sake: report.json and
    config.toml already hold it.
    """
    ctx: dict[str, Any] = {"epsilon_plot": PRIVACY_PLOT}
    try:
        ctx["config_sha256"] = hashlib.sha256((run / "config.toml").read_bytes()).hexdigest()
    except OSError:
        pass
    recorded = report.get("packages") if isinstance(report, dict) else None
    in_md = _md_packages(md_lines)
    if isinstance(recorded, dict) and recorded:
        if {k for k, _ in in_md} == set(recorded):
            ctx["packages"] = {k: recorded[k] for k, _ in in_md}
        else:
            ctx["packages"] = dict(recorded)
    elif in_md:
        ctx["packages"] = dict(in_md)
    for line in md_lines:
        if line.startswith("- **Secure aggregation:** "):
            ctx["secagg"] = line[len("- **Secure aggregation:** "):]
            break
    ctx.update(given or {})
    return ctx


def statement_summary(
    ledger: Ledger, privacy: Any, client_sizes: Mapping[int, int] | None, md_lines: list[str],
) -> tuple[dict[str, Any], list[str]]:
    """The privacy summary report.md's statement must render: `privacy_summary` of ``ledger``
    (its accountant; the cross-check accountants report.json lists, else those report.md's
    table names), with the words (unit of privacy, adjacency) and library versions report.json
    recorded. Returns (summary, accountants this process lacks): a missing accountant's
    per-client ε are report.json's, so report.md must agree with report.json there, and report.json's
    are listed NOT CHECKED by `report_privacy_problems`."""
    name = str(ledger.header.get("accountant", "pld"))
    privacy = privacy if isinstance(privacy, dict) else {}
    listed = privacy.get("cross_checks")
    if isinstance(listed, list):
        names = [str(c.get("name")) for c in listed if isinstance(c, dict)]
    else:  # no report.json to say: the columns of report.md's client table
        head = next((line for line in md_lines if line.startswith("| client |")), "")
        names = re.findall(r"ε \(([^)]+)\)", head)[1:] or ["pld", "rdp"]
    checks = [n for n in dict.fromkeys(names) if n != name]
    available, missing = [], []
    for n in checks:
        try:
            get_accountant(n)
            available.append(n)
        except ValueError:
            missing.append(n)
    summary = privacy_summary(ledger, name, cross_checks=available, client_sizes=client_sizes)
    for key in REPORT_TEXT_FIELDS[1:]:
        if isinstance(privacy.get(key), str):
            summary[key] = privacy[key]
    rec_acc = privacy.get("accountant") if isinstance(privacy.get("accountant"), dict) else {}
    if rec_acc.get("name") == name:
        for key in ("version", "description"):
            if isinstance(rec_acc.get(key), str):
                summary["accountant"][key] = rec_acc[key]
    rec_cross = {str(c.get("name")): c for c in listed if isinstance(c, dict)} if isinstance(listed, list) else {}
    cross = []
    for n in checks:
        rec = rec_cross.get(n, {})
        here = get_accountant(n) if n in available else None
        cross.append({k: rec[k] if isinstance(rec.get(k), str) else (getattr(here, k) if here else "?")
                      for k in ("version", "description")} | {"name": n})
    summary["cross_checks"] = cross
    rec_clients = privacy.get("clients") if isinstance(privacy.get("clients"), dict) else {}
    for c, v in summary["clients"].items():
        got = rec_clients.get(c, {}).get("cross_checks") if isinstance(rec_clients.get(c), dict) else None
        for n in missing:
            x = got.get(n) if isinstance(got, dict) else None
            v["cross_checks"][n] = float(x) if _is_number(x) else None
    return summary, missing


def _statement_problems(lines: list[str], expected: str, limit: int = 12) -> tuple[list[str], tuple[int, int] | None]:
    """report.md's privacy statement against ``expected`` line by line. Returns (problems, the
    statement's line range in ``lines``); each problem names the line, what it says and what the
    ledger gives."""
    exp = expected.splitlines()
    starts = [i for i, line in enumerate(lines) if line == exp[0]]
    for i in starts:
        if lines[i:i + len(exp)] == exp:
            return [], (i, i + len(exp))
    if not starts:
        missing = (f"{REPORT_MD} has no privacy statement (no line {exp[0]!r}), but the run has a ledger: "
                   "the statement the ledger gives is missing (re-render it with `privlora report`)")
        return [missing], None
    start = starts[0]
    rest = lines[start:]
    problems: list[str] = []
    end = 0
    what = "the privacy statement re-rendered from the ledger (and the run's config)"
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, exp, rest, autojunk=False).get_opcodes():
        if tag == "equal":
            end = j2
            continue
        if i1 == len(exp):  # text after the statement: not part of it
            break
        end = j2
        for k in range(max(i2 - i1, j2 - j1)):
            i, j = i1 + k, j1 + k
            if i < i2 and j < j2:
                f, w = _excerpt(rest[j], exp[i])
                problems.append(f"{REPORT_MD} line {start + j + 1}: found {f!r}; {what} has {w!r}")
            elif i < i2:
                problems.append(f"{REPORT_MD} line {start + j1 + (j2 - j1) + 1}: {what} has {_clip(exp[i])!r} "
                                "here, missing from report.md")
            else:
                problems.append(f"{REPORT_MD} line {start + j + 1}: found {_clip(rest[j])!r}, "
                                f"which {what} does not have")
    if len(problems) > limit:
        problems = problems[:limit] + [f"{REPORT_MD}: and {len(problems) - limit} more differing lines of the privacy statement"]
    return problems, (start, start + max(end, 1))


def _line_number(problem: str) -> int:
    m = re.match(rf"{re.escape(REPORT_MD)} line (\d+)", problem)
    return int(m.group(1)) if m else 0


def _eps_upto(charges: list[Charge], acc: Accountant, delta: float) -> dict[int, float]:
    hist: dict[int, list] = {}
    for ch in charges:
        hist.setdefault(ch.client, []).append(ch.mechanism)
    return {c: acc.epsilon(history_key(h), delta) for c, h in hist.items()}


def report_md_problems(
    run: Path,
    ledger: Ledger,
    report: Any,
    client_sizes: Mapping[int, int] | None,
    metric_rows: list[tuple[int, dict[str, Any]]],
    rel_tol: float = 1e-6,
    context: Mapping[str, Any] | None = None,
) -> tuple[list[str], list[str]]:
    """report.md, the privacy statement people read and forward, against the ledger:

    1. its privacy statement must be, word for word, `render_privacy_statement` of the summary
       the ledger gives (`statement_summary`) with the context of `statement_context`: every
       number in it (the headline ε and δ, each client's ε, cross-checks, budget and remaining,
       records, rounds, σ, q, C, the ledger's charges and head hash, the config hash) is compared
       to the digits it prints. A problem names each differing line: what it says, what it should;
    2. every other ε it states, against the ledger within the accountant's stated error plus half
       a unit of the last printed digit: the "max ε" of each round of the rounds table (the ledger
       as it stood at that round's metrics.jsonl line), the audit section's claimed ε (the ledger's
       largest over the clients holding canaries, audit.json), and any other "ε = x" / "ε ≤ x" or
       ε column: some client's ε, the record-level ε, a round's largest ε, a budget, or the
       config's target ε. Lower bounds (ε ≥ x, the audit's findings) and sample generations are
       not ledger numbers and are left alone.

    Returns (problems, missing accountants whose report.md numbers are report.json's)."""
    path = run / REPORT_MD
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return [f"{REPORT_MD} is not UTF-8 text at byte {exc.start}: it was damaged (re-render it with `privlora report`)"], []
    lines = text.splitlines()
    privacy = report.get("privacy") if isinstance(report, dict) else None
    name = str(ledger.header.get("accountant", "pld"))
    acc = get_accountant(name)
    summary, missing = statement_summary(ledger, privacy, client_sizes, lines)
    expected = render_privacy_statement(summary, statement_context(run, report, lines, context))
    in_statement_problems, region = _statement_problems(lines, expected)
    problems: list[str] = []

    # every other ε report.md states
    delta, charges = ledger.delta, ledger.charges
    heads = [str(ledger.header.get("hash"))] + [c.hash for c in charges]
    final = _eps_upto(charges, acc, delta)
    candidates: list[tuple[float, float]] = [(v, acc.error) for v in final.values()]
    for v in summary["clients"].values():
        candidates += [(x, get_accountant(n).error if n not in missing else 0.0) for n, x in v["cross_checks"].items() if _is_number(x)]
    candidates += [(b, 0.0) for b in ledger.budgets.values()]
    by_round: dict[int, float] = {}
    for i, rec in metric_rows:
        if "stopped" in rec or not isinstance(rec.get("round"), int):
            continue
        anchor = rec.get("ledger")
        if _anchor_problem("", anchor, heads) is None:
            upto = charges[:anchor["entries"]]
        else:
            upto = [ch for ch in charges if ch.round <= rec["round"]]
        by_round[rec["round"]] = max(_eps_upto(upto, acc, delta).values(), default=0.0)
    candidates += [(v, acc.error) for v in by_round.values()]
    target = None
    try:
        import tomllib

        raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8")).get("privacy", {})
        for key in ("target_epsilon", "budget_epsilon"):
            if _is_number(raw.get(key)) and raw[key] > 0:
                candidates.append((float(raw[key]), 0.0))
        for b in raw.get("budgets", []) if isinstance(raw.get("budgets"), list) else []:
            if _is_number(b):
                candidates.append((float(b), 0.0))
        target = float(raw["target_epsilon"]) if _is_number(raw.get("target_epsilon")) else None
    except (OSError, ValueError):
        pass
    claimed = None
    try:
        audit = json.loads((run / "audit.json").read_text(encoding="utf-8"))
        holders = {int(c) for c in audit["canary_client"]}
        last = max(by_round) if by_round else None
        row_eps = final
        if last is not None:
            rec = next(r for _, r in reversed(metric_rows) if r.get("round") == last and "stopped" not in r)
            anchor = rec.get("ledger")
            row_eps = _eps_upto(charges[:anchor["entries"]] if _anchor_problem("", anchor, heads) is None else
                                [ch for ch in charges if ch.round <= last], acc, delta)
        claimed = max((row_eps.get(c, 0.0) for c in holders), default=0.0)
    except (OSError, ValueError, KeyError, TypeError):
        pass

    never_trained = {int(c) for c in ledger.budgets} - {int(ch.client) for ch in charges}

    def known(shown: str) -> bool:
        v = float(shown)
        if v == 0.0:  # true of a budgeted client the ledger never charged, and of nobody else
            return bool(never_trained)
        return any(x > 0 and abs(v - x) <= _printed_tol(shown, err, x, rel_tol) for x, err in candidates)

    def unknown(lineno: int, shown: str, line: str, op: str = "=", at: int = 0) -> str:
        top = max(final.values(), default=0.0)
        low = min(final.values(), default=0.0)
        return (f"{REPORT_MD} line {lineno}: states ε {op} {shown}, which is no ε the ledger gives (record-level {top:.4f} by "
                f"{name}, clients {low:.4f} to {top:.4f}, nor a round's largest ε, a budget or the config's target): "
                f"{_clip(line, at)!r}")

    section = _sections(lines)
    in_statement = set(range(*region)) if region else set()
    in_table: set[int] = set()
    for h, head, rows in _tables(lines):
        in_table |= {h, h + 1, *(j for j, _ in rows)}
        if h in in_statement or section[h] in ("audit", "samples"):
            continue
        for col, title in enumerate(head):
            if "ε" not in title and "epsilon" not in title.lower():
                continue
            per_round = head[0].lower() == "round" and "max" in title.lower()
            for j, cells in rows:
                shown = cells[col] if col < len(cells) else ""
                if not re.fullmatch(r"\d+(?:\.\d+)?", shown):
                    continue
                if per_round and cells[0].isdigit():
                    rnd = int(cells[0])
                    want = by_round.get(rnd)
                    if want is None:
                        want = max(_eps_upto([ch for ch in charges if ch.round <= rnd], acc, delta).values(), default=0.0)
                    tol = _printed_tol(shown, acc.error, want, rel_tol)
                    if abs(float(shown) - want) > tol:
                        problems.append(f"{REPORT_MD} line {j + 1}: round {rnd}'s {title} is {shown}; the ledger gives "
                                        f"{want:.4f} ({name}, tolerance {tol:g}): {_clip(lines[j])!r}")
                elif not known(shown):
                    problems.append(unknown(j + 1, shown, lines[j], f"({title}) ="))
    for j, line in enumerate(lines):
        if j in in_statement or j in in_table or section[j] == "samples":
            continue
        if section[j] == "audit":
            for m in CLAIMED_EPS.finditer(line):
                shown = m.group(1)
                if claimed is None:
                    if not known(shown):
                        problems.append(unknown(j + 1, shown, line, "=", m.start()))
                elif abs(float(shown) - claimed) > _printed_tol(shown, acc.error, claimed, rel_tol):
                    problems.append(f"{REPORT_MD} line {j + 1}: the audit's claimed ε is {shown}; the ledger gives {claimed:.4f} "
                                    f"({name}, the largest over the clients holding canaries in audit.json): "
                                    f"{_clip(line, m.start())!r}")
            continue
        for m in EPS_NUMBER.finditer(line):
            shown = m.group(2)
            if m.group(1) in ("≤", "<=") and "calibrated" in line and target is not None:
                if float(shown) != target:
                    problems.append(f"{REPORT_MD} line {j + 1}: the calibration target is ε {m.group(1)} {shown}; config.toml's "
                                    f"privacy.target_epsilon is {target!r}")
            elif not known(shown):
                problems.append(unknown(j + 1, shown, line, m.group(1), m.start()))
    return in_statement_problems + sorted(problems, key=_line_number), missing


def report_md_claims_without_ledger(run: Path) -> list[str]:
    """A run without privacy: report.md has no privacy statement and states no ε (but for an
    audit's lower bounds), and its rounds table shows no "max ε"."""
    path = run / REPORT_MD
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        return [f"{REPORT_MD} is not UTF-8 text at byte {exc.start}: it was damaged (re-render it with `privlora report`)"]
    why = "but the run has no ledger (privacy.enabled = false in config.toml)"
    problems: list[str] = []
    section = _sections(lines)
    in_table: set[int] = set()
    for h, head, rows in _tables(lines):
        in_table |= {h, h + 1, *(j for j, _ in rows)}
        if section[h] in ("audit", "samples"):
            continue
        for col, title in enumerate(head):
            if "ε" in title or "epsilon" in title.lower():
                for j, cells in rows:
                    if col < len(cells) and cells[col] not in ("-", "—", ""):
                        problems.append(f"{REPORT_MD} line {j + 1}: {title} is {cells[col]}, {why}: expected -")
    for j, line in enumerate(lines):
        if line.startswith(STATEMENT_HEADING):
            problems.append(f"{REPORT_MD} line {j + 1}: a privacy statement, {why}")
        elif j not in in_table and section[j] not in ("audit", "samples"):
            for m in EPS_NUMBER.finditer(line):
                problems.append(f"{REPORT_MD} line {j + 1}: states ε {m.group(1)} {m.group(2)}, {why}: {_clip(line, m.start())!r}")
    return sorted(problems, key=_line_number)


def claims_without_ledger(run: Path) -> list[str]:
    """A run without privacy makes no privacy claim: report.json's privacy block says
    ``enabled: false`` and holds no ε, and no metrics.jsonl line states an ε."""
    problems: list[str] = []
    report_path = run / "report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            return [f"report.json is not valid JSON ({exc})"]
        privacy = report.get("privacy") if isinstance(report, dict) else None
        if isinstance(privacy, dict) and (privacy.get("enabled") is not False or set(privacy) - {"enabled"}):
            problems.append(f"report.json: privacy is {_show(privacy)}, but the run has no ledger (privacy.enabled = false "
                            'in config.toml): expected {"enabled": false} and no ε')
    metrics_path = run / "metrics.jsonl"
    if metrics_path.is_file():
        for i, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # not a claim (a line cut off by a crash)
            if not isinstance(rec, dict):
                continue
            for key, none in (("epsilon", {}), ("epsilon_max", None)):
                if rec.get(key, none) not in (none, None):
                    problems.append(f"metrics.jsonl line {i} (round {rec.get('round')}): {key} is {_show(rec[key])}, but the run "
                                    f"has no ledger (privacy.enabled = false in config.toml): expected {_show(none)}")
    return problems


def _run_config(run: Path) -> dict[str, Any]:
    import tomllib

    try:
        raw = tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def client_level_problems(run: Path, rel_tol: float = 1e-6) -> tuple[list[str], dict[str, dict[int, float]]]:
    """The client-level ledger (``client_level.jsonl``) checked and its epsilons recomputed from
    it alone (`accounting.client_level.client_epsilons`), then compared with everything the run
    states: each record's noise kind, clip norm and bits against config.toml, and every
    metrics.jsonl line's client-level epsilons, per-client noise (sigma or variance) and bits
    against the ledger up to that round. An edited variance or bit width is refused: the hash
    chain breaks, and if the chain was recomputed too, the recomputed epsilon or the recorded
    bits no longer match what the run stated and its config."""
    from .client_level import CLIENT_LEVEL_FILE, CentralGaussian, check_client_chain, client_epsilons

    problems: list[str] = []
    cfg = _run_config(run)
    privacy = cfg.get("privacy", {}) if isinstance(cfg.get("privacy"), dict) else {}
    path = run / CLIENT_LEVEL_FILE
    if privacy.get("unit") != "client":
        if path.is_file():
            problems.append(f"{CLIENT_LEVEL_FILE} exists but config.toml does not set privacy.unit = 'client'")
        return problems, {}
    if not path.is_file():
        return [f"{CLIENT_LEVEL_FILE} is missing, but config.toml sets privacy.unit = 'client': no client-level epsilon can be verified"], {}
    header, entries, chain = check_client_chain(path.read_text(encoding="utf-8").splitlines())
    problems += [f"{CLIENT_LEVEL_FILE} {p}" for p in chain]
    if not header:
        return problems, {}
    noise = privacy.get("client_noise", "central")
    if header.get("noise") != noise:
        problems.append(f"{CLIENT_LEVEL_FILE}: header says noise {header.get('noise')!r}, config.toml says {noise!r}")
    delta = float(header.get("delta", 0) or 0)
    if "delta" in privacy and delta != float(privacy["delta"]):
        problems.append(f"{CLIENT_LEVEL_FILE}: header delta {delta} differs from config.toml's privacy.delta {privacy['delta']}")
    for e in entries:
        rel = e.release
        where = f"{CLIENT_LEVEL_FILE} round {e.round}"
        if isinstance(rel, CentralGaussian) != (noise == "central"):
            problems.append(f"{where}: a {rel.to_dict()['mechanism']} record in a run with client_noise = {noise!r}")
        if "client_clip" in privacy and not math.isclose(rel.clip_norm, float(privacy["client_clip"]), rel_tol=1e-12):
            problems.append(f"{where}: clip_norm {rel.clip_norm} differs from config.toml's privacy.client_clip {privacy['client_clip']}")
        if not isinstance(rel, CentralGaussian) and rel.bits != int(privacy.get("client_bits", 16)):
            problems.append(f"{where}: bits {rel.bits} differs from config.toml's privacy.client_bits {privacy.get('client_bits', 16)}")
    try:
        eps = client_epsilons(entries, delta) if entries else {"server": {}, "model_only": {}}
    except (ValueError, TypeError) as exc:
        return problems + [f"{CLIENT_LEVEL_FILE}: {exc}"], {}
    heads = [str(header.get("hash"))] + [e.hash for e in entries]
    metrics = run / "metrics.jsonl"
    rows = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("client_level"), dict):
                rows.append(rec)
    for rec in rows:
        cl, rnd = rec["client_level"], rec.get("round")
        where = f"metrics.jsonl round {rnd} client_level"
        p = _anchor_problem(where, cl.get("ledger"), heads)
        if p:
            problems.append(p)
            continue
        upto = entries[: int(cl["ledger"]["entries"])]
        want = client_epsilons(upto, delta) if upto else {"server": {}, "model_only": {}}
        for name, key in (("server", "epsilon_server_max"), ("model_only", "epsilon_model_only_max")):
            expected = max(want[name].values(), default=0.0)
            found = cl.get(key)
            if not _is_number(found) or abs(float(found) - expected) > rel_tol * max(1.0, expected) + 1e-9:
                problems.append(f"{where}: {key} = {_show(found)}, but the ledger gives {expected:.6g}")
        for c, found in (cl.get("epsilon_server") or {}).items():
            expected = want["server"].get(int(c), 0.0)
            if not _is_number(found) or abs(float(found) - expected) > rel_tol * max(1.0, expected) + 1e-9:
                problems.append(f"{where}: client {c}'s epsilon = {_show(found)}, but the ledger gives {expected:.6g}")
        entry = next((e for e in upto if e.round == rnd), None)
        if entry is not None and not isinstance(entry.release, CentralGaussian):
            r = entry.release
            for field_, value in (("bits", r.bits), ("sigma", getattr(r, "sigma", None)), ("variance", getattr(r, "variance", None))):
                if field_ in cl and value is not None and (not _is_number(cl[field_]) or not math.isclose(float(cl[field_]), float(value), rel_tol=1e-12)):
                    problems.append(f"{where}: {field_} = {_show(cl[field_])}, but the ledger records {value!r}")
        elif entry is not None and "noise_multiplier" in cl and not math.isclose(float(cl["noise_multiplier"]), entry.release.noise_multiplier, rel_tol=1e-12):
            problems.append(f"{where}: noise_multiplier = {_show(cl['noise_multiplier'])}, but the ledger records {entry.release.noise_multiplier!r}")
    return problems, eps


def verify_run(run_dir: str | Path, rel_tol: float = 1e-6, statement_context: Mapping[str, Any] | None = None) -> VerifyResult:
    """Every check of the module docstring on the run folder ``run_dir``. ``statement_context``:
    what `privlora report` passed to `render_privacy_statement` that only privlora can word
    (``secagg``, from config.toml); without it, report.md's own sentence is used (`statement_context`)."""
    run = Path(run_dir)
    res = VerifyResult()
    cl_problems, res.client_level = client_level_problems(run, rel_tol)
    res.problems += cl_problems
    ledger_path = run / LEDGER_FILE
    if not ledger_path.is_file():
        if _privacy_disabled(run):
            res.not_private = True
            res.problems += claims_without_ledger(run) + report_md_claims_without_ledger(run)
            return res
        res.problems.append(
            f"{ledger_path}: no ledger, but the run's config enables privacy: the ledger was deleted or moved, "
            "so no epsilon of this run can be verified"
        )
        return res
    lines = ledger_path.read_bytes().decode("utf-8", errors="replace").splitlines()
    header, charges, problems = check_chain(lines)
    res.problems += [f"{LEDGER_FILE} {p}" for p in problems]
    if not header:
        return res
    heads = [str(header.get("hash"))] + [c.hash for c in charges]
    res.entries, res.head = len(charges), heads[-1]

    # anchors written by the run
    report_path = run / "report.json"
    report: dict[str, Any] = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            res.problems.append(f"report.json is not valid JSON ({exc})")
        privacy = report.get("privacy", {}) if isinstance(report, dict) else {}
        anchor = privacy.get("ledger") if isinstance(privacy, dict) else None
        p = _anchor_problem("report.json", anchor, heads)
        if p:
            res.problems.append(p)
        elif anchor["entries"] != len(charges):
            res.problems.append(
                f"report.json describes {anchor['entries']} ledger entries but the ledger holds {len(charges)} "
                "(the report is stale: re-render it with `privlora report`)"
            )
        res.checked_anchors += 1
    else:
        res.problems.append("report.json is missing: nothing anchors the end of the ledger (run `privlora report`)")
    metrics_path = run / "metrics.jsonl"
    metric_rows: list[tuple[int, dict[str, Any]]] = []
    if metrics_path.is_file():
        for i, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                res.problems.append(f"metrics.jsonl line {i}: not JSON")
                continue
            if not isinstance(rec, dict):
                res.problems.append(f"metrics.jsonl line {i}: not a JSON object")
                continue
            metric_rows.append((i, rec))
            if "ledger" in rec:
                p = _anchor_problem(f"metrics.jsonl line {i} (round {rec.get('round')})", rec["ledger"], heads)
                if p:
                    res.problems.append(p)
                res.checked_anchors += 1
    state_path = run / "checkpoint" / "state.json"
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
            p = _anchor_problem("checkpoint/state.json", state.get("ledger"), heads)
            if p:
                res.problems.append(p)
            res.checked_anchors += 1
        except ValueError as exc:
            res.problems.append(f"checkpoint/state.json is not valid JSON ({exc})")

    # epsilons from the ledger alone
    name = str(header.get("accountant", "pld"))
    try:
        acc = get_accountant(name)
    except ValueError as exc:
        res.problems.append(f"ledger header: {exc}")
        return res
    delta = float(header.get("delta", 0))
    hist: dict[int, list] = {}
    for c in charges:
        hist.setdefault(c.client, []).append(c.mechanism)
    budgets = {int(k): float(v) for k, v in header.get("budgets", {}).items()}
    for c in sorted(set(hist) | set(budgets)):
        eps = acc.epsilon(history_key(hist.get(c, [])), delta)
        res.epsilons[c] = eps
        if c in budgets and eps > budgets[c] + 1e-9:
            res.problems.append(f"client {c}: ε = {eps:.4f} ({name}) exceeds its budget {budgets[c]:g}")

    # every privacy number the run states, against the ledger
    sizes = next((rec.get("client_sizes") for _, rec in metric_rows if rec.get("round") == 0), None)
    client_sizes = {i: n for i, n in enumerate(sizes) if isinstance(n, int)} if isinstance(sizes, list) else {}
    if report and "hash" in header:  # a header without its hash is already a chain problem
        problems, unchecked = report_privacy_problems(
            report.get("privacy") if isinstance(report, dict) else None,
            Ledger(ledger_path, header, charges), client_sizes, rel_tol,
        )
        res.problems += problems
        res.unchecked += unchecked
    res.problems += metrics_privacy_problems(metric_rows, header, charges, acc, rel_tol)
    if (run / REPORT_MD).is_file():
        if "hash" in header:
            problems, missing = report_md_problems(run, Ledger(ledger_path, header, charges), report, client_sizes,
                                                   metric_rows, rel_tol, statement_context)
            res.problems += problems
            res.report_md = "checked"
            for n in missing:  # report.md shows report.json's number there: just as unchecked
                res.unchecked = [u + f"; report.md's ε ({n}) column shows the same number" if f".cross_checks.{n} " in u else u
                                 for u in res.unchecked]
    else:
        res.report_md = "absent"
        if report_path.is_file() and (run / PRIVACY_PLOT).is_file():
            res.problems.append(
                f"{REPORT_MD} is missing, but `privlora report` wrote one here (its plot {PRIVACY_PLOT} is beside report.json): "
                "the privacy statement people read was deleted or moved; re-render it with `privlora report`"
            )
    return res


@dataclass
class ClientLedgerResult:
    """`verify_client_ledger`'s findings for one client's own ledger."""

    client: int | None = None
    problems: list[str] = field(default_factory=list)
    epsilon: float = 0.0
    """The client's epsilon by its own ledger (the ledger's accountant, at its delta)."""
    reported: float | None = None
    """The server's report.json epsilon for that client."""
    charges: int = 0
    unclaimed: list[int] = field(default_factory=list)
    """Rounds the server charged this client for but the client never charged itself (it refused
    or never received the instruction): the server's mirror over-counts, which is conservative."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_client_ledger(run_dir: str | Path, client_ledger: str | Path, rel_tol: float = 1e-6) -> ClientLedgerResult:
    """Check a client's own ledger (a deployment node's ``ledger.jsonl``) against the server's run:

    1. the client's hash chain holds, and it is the ledger of one client of this run (same config
       hash, same delta);
    2. every release the client charged itself appears in the server's ledger for that client and
       round with the same mechanism (otherwise the server's report understates what it spent);
    3. the server's reported epsilon for the client is at least the epsilon of the client's own
       ledger (the report is an upper bound on what the client really released).
    """
    out = ClientLedgerResult()
    path = Path(client_ledger)
    if not path.is_file():
        out.problems.append(f"{path}: no client ledger here")
        return out
    header, charges, problems = check_chain(path.read_bytes().decode("utf-8", errors="replace").splitlines())
    out.problems += [f"{path.name} {p}" for p in problems]
    if not header:
        return out
    budgets = list(header.get("budgets", {}))
    if len(budgets) != 1:
        out.problems.append(f"{path}: budgets name {len(budgets)} clients; a client's own ledger names exactly one")
        return out
    cid = out.client = int(budgets[0])
    run = Path(run_dir)
    server_lines = (run / LEDGER_FILE).read_bytes().decode("utf-8", errors="replace").splitlines() if (run / LEDGER_FILE).is_file() else []
    s_header, s_charges, s_problems = check_chain(server_lines)
    if s_problems or not s_header:
        out.problems.append(f"the server's {LEDGER_FILE} does not verify (run `privlora verify {run}` first)")
        return out
    mine_run, theirs_run = header.get("run", {}), s_header.get("run", {})
    if mine_run.get("config_sha256") != theirs_run.get("config_sha256"):
        out.problems.append(f"client {cid}'s ledger belongs to a run of another config (sha256 {str(mine_run.get('config_sha256'))[:12]}…, "
                            f"the server's {str(theirs_run.get('config_sha256'))[:12]}…)")
    if header.get("delta") != s_header.get("delta"):
        out.problems.append(f"client {cid}'s ledger is at delta {header.get('delta')}, the server's at {s_header.get('delta')}")
    server = {(c.client, c.round): c.mechanism for c in s_charges}
    for c in charges:
        if c.client != cid:
            out.problems.append(f"client {cid}'s ledger holds a charge for client {c.client} (round {c.round})")
        elif (cid, c.round) not in server:
            out.problems.append(f"client {cid} charged itself for round {c.round} but the server's ledger has no such charge")
        elif server[(cid, c.round)] != c.mechanism:
            out.problems.append(f"client {cid}, round {c.round}: it charged {c.mechanism}, the server {server[(cid, c.round)]}")
    own_rounds = {c.round for c in charges}
    out.unclaimed = sorted(r for (k, r) in server if k == cid and r not in own_rounds)
    out.charges = len(charges)
    try:
        acc = get_accountant(str(header.get("accountant", "pld")))
    except ValueError as exc:
        out.problems.append(f"{path}: {exc}")
        return out
    out.epsilon = acc.epsilon(history_key([c.mechanism for c in charges]), float(header.get("delta", 0)))
    try:
        report = json.loads((run / "report.json").read_text(encoding="utf-8"))
        got = report["privacy"]["clients"][str(cid)]["epsilon"]
        out.reported = float(got)
    except (OSError, ValueError, KeyError, TypeError):
        out.problems.append(f"report.json has no epsilon for client {cid} to compare with")
        return out
    if out.reported < out.epsilon - rel_tol * max(1.0, out.epsilon):
        out.problems.append(f"client {cid}: the server reports ε = {out.reported:.6f} but the client's own ledger gives "
                            f"{out.epsilon:.6f}: the report understates what it spent")
    return out
