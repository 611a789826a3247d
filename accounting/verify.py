"""Verify a run's privacy record from its files alone: `privlora verify DIR`.

Checks, each reported as a plain sentence:

1. the ledger's hash chain (edits, removed, inserted, reordered or duplicated entries);
2. the anchors the run wrote elsewhere — ``report.json`` (entries and head hash of the whole
   ledger) and every line of ``metrics.jsonl`` and the checkpoint (entries and head hash at that
   moment): each must match the ledger's own chain at that length, which catches lines cut off
   the end of the ledger;
3. every client's epsilon, recomputed from the ledger with the ledger's accountant, against
   ``report.json`` (relative tolerance 1e-6) and against the client's budget.

A hash chain detects tampering by anyone who does not rewrite every anchor too; publishing the
head hash outside the run folder (as the report invites) closes that gap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .accountants import get_accountant, history_key
from .ledger import check_chain

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


def verify_run(run_dir: str | Path, rel_tol: float = 1e-6) -> VerifyResult:
    run = Path(run_dir)
    res = VerifyResult()
    ledger_path = run / LEDGER_FILE
    if not ledger_path.is_file():
        if _privacy_disabled(run):
            res.not_private = True
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
    if metrics_path.is_file():
        for i, line in enumerate(metrics_path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rec = json.loads(line)
            except ValueError:
                res.problems.append(f"metrics.jsonl line {i}: not JSON")
                continue
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
    reported = report.get("privacy", {}).get("clients", {}) if isinstance(report, dict) else {}
    for c in sorted(set(hist) | set(budgets)):
        eps = acc.epsilon(history_key(hist.get(c, [])), delta)
        res.epsilons[c] = eps
        if c in budgets and eps > budgets[c] + 1e-9:
            res.problems.append(f"client {c}: ε = {eps:.4f} ({name}) exceeds its budget {budgets[c]:g}")
        if reported:
            got = reported.get(str(c), {}).get("epsilon")
            if got is None:
                res.problems.append(f"report.json has no ε for client {c}")
            elif abs(float(got) - eps) > rel_tol * max(1.0, eps):
                res.problems.append(f"client {c}: report.json says ε = {float(got):.6f}, the ledger gives {eps:.6f} ({name})")
    if reported:
        extra = set(reported) - {str(c) for c in res.epsilons}
        if extra:
            res.problems.append(f"report.json lists clients the ledger never charged nor budgeted: {sorted(extra)}")
        top = report["privacy"].get("epsilon_record_level")
        want = max(res.epsilons.values(), default=0.0)
        if top is None or abs(float(top) - want) > rel_tol * max(1.0, want):
            res.problems.append(f"report.json's record-level ε {top} differs from the ledger's maximum {want:.6f}")
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
