"""The audit's part of report.md: what `privlora audit` found (``audit.json``), in plain words.

Rendering only: the bounds themselves are computed by `accounting.audit` and recorded by
`privlora.commands.audit`; this module reads the record so `privlora report` can show it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.json"


def sound_lower(record: dict[str, Any]) -> tuple[float, str]:
    """The largest epsilon lower bound of the record that is a statement about (eps, delta)-DP
    (Theorem 5.2, or the f-DP reading of the (eps, delta) curve), and which one it is."""
    fdp = (record.get("fdp") or {}).get("epsilon_lower")
    if fdp is not None and fdp > record["epsilon_lower"]:
        return fdp, "f-DP analysis"
    return record["epsilon_lower"], "Theorem 5.2"


def verdict(record: dict[str, Any]) -> str:
    """One plain sentence on what this audit shows."""
    claimed, conf = record["epsilon_claimed"], record["confidence"]
    lower, how = sound_lower(record)
    if claimed is None:
        return (f"No differential privacy was claimed for this run; the audit shows its leakage is at least "
                f"ε = {lower:.2f} (at {conf:.0%} confidence, δ = {record['delta']:g}, {how}).")
    if record["violation"]:
        return (f"PRIVACY CLAIM CONTRADICTED: the empirical lower bound ε ≥ {lower:.3f} ({how}) exceeds the claimed "
                f"ε = {claimed:.3f} (at {conf:.0%} confidence, δ = {record['delta']:g}). Training did not do what the "
                "ledger records: look for noise, clipping or sampling that differ from the charged mechanism, or a wrong "
                "accountant.")
    return (f"The empirical lower bound ε ≥ {lower:.3f} ({how}) is below the claimed ε = {claimed:.3f}: no contradiction "
            "found. This does not prove the run private; a stronger attack could give a higher lower bound.")


def render_audit_section(out: Path) -> list[str]:
    """The report.md lines for a run folder's audit.json (none when there is none)."""
    path = Path(out) / AUDIT_FILE
    if not path.is_file():
        return []
    a = json.loads(path.read_text(encoding="utf-8"))
    best = a["best"]
    fdp = a.get("fdp")
    claimed = "none (no DP)" if a["epsilon_claimed"] is None else f"{a['epsilon_claimed']:.3f} (the ledger's largest over clients holding canaries)"
    lines = [
        "## Privacy audit (empirical lower bound)", "",
        f"- Method: {a['method']}; `privlora audit` with {a['canaries']} **{a['design']}** canaries, each in its client's "
        f"training data with probability 1/2 ({a['included_canaries']} were); never in the evaluation set.",
        f"- **Lower bound ε ≥ {a['epsilon_lower']:.3f}** (Theorem 5.2) at {a['confidence']:.0%} confidence, δ = {a['delta']:g}; "
        f"upper bound claimed by the accountant: ε = {claimed}.",
        f"- From the **{best['score']}** score: r = {best['r']} guesses ({best['k_in']} \"in\", {best['k_out']} \"out\"), "
        f"v = {best['v']} correct, m = {a['canaries']}; {a['tests']} (method, score, guess count) tests, each at "
        f"confidence {a['level_per_test']:.4f}, so every bound here holds at {a['confidence']:.0%} together.",
    ]
    if fdp:
        fb, gb = fdp["best"], fdp["best_gdp"]
        eps_mu = "" if fdp["epsilon_of_mu"] is None else f", whose ε at δ = {a['delta']:g} is {fdp['epsilon_of_mu']:.3f}"
        lines += [
            f"- f-DP reading (Mahloujifar, Melis and Chaudhuri 2024), same guesses: **ε ≥ {fdp['epsilon_lower']:.3f}** "
            f"for the (ε, δ)-DP curve ({fb['score']}, r = {fb['r']}, v = {fb['v']}); the mechanism is not μ-GDP for "
            f"μ < **{fdp['mu_lower']:.3f}** ({gb['score']}, r = {gb['r']}, v = {gb['v']}){eps_mu}. That last ε bounds "
            "the mechanism's ε only if its trade-off curve is Gaussian, which DP-SGD's is not exactly: it is read beside "
            "the claim, never against it.",
        ]
    lines += [
        "",
        "| score | r | v | ε lower (Thm 5.2, at this r) | ε lower (f-DP, best r) | μ lower (f-DP, best r) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in a["per_score"].items():
        b = s["best"]
        cands = s["candidates"]
        f = max((c.get("epsilon_lower_fdp", 0.0) for c in cands), default=0.0)
        mu = max((c.get("mu_lower", 0.0) for c in cands), default=0.0)
        lines.append(f"| {name} | {b['r']} | {b['v']} | {b['epsilon_lower']:.3f} | {f:.3f} | {mu:.3f} |")
    lines += [
        "",
        verdict(a),
        "",
        "What this does and does not show: a lower bound above the claimed ε proves (at the stated confidence) that the "
        "training or its accounting is broken; a lower bound below it proves nothing about privacy, because a weak "
        "attack gives a low bound on a leaking model too. The audit tests record-level DP within each client, the "
        "unit privlora claims. A client's Poisson sample rate depends on its dataset size, and so by at most a rounding "
        "step on how many of its canaries were included; the bound assumes fixed mechanism parameters.",
        "",
    ]
    return lines
