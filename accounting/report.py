"""The privacy part of a run's audit report, computed from the ledger alone.

`privacy_summary` reads a `Ledger` and returns the machine-readable record that goes into
``report.json``: delta, the accountants (name, library version, stated error), and per client
its epsilon, the rounds it was charged for, its budget and what remains; the federation's
record-level epsilon is the maximum over clients (each record belongs to exactly one client).

`render_privacy_statement` turns that record into the privacy statement a reader needs, in the
structure of Ponomareva et al. 2023 ("How to DP-fy ML", Sec. 5.3): the unit of privacy and
adjacency, what is covered and what is not, the accountant and its assumptions, the (epsilon,
delta) per client and overall, and the mechanism's parameters.

Rule: the epsilon shown for a client is the run's accountant's upper bound, and never below the
PLD reference by more than that accountant's stated error; if it ever were, the PLD value is
shown instead and a warning says so. RDP is shown beside it as an independent (looser) bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .accountants import get_accountant, history_key
from .budget import delta_warning
from .ledger import Ledger

REPORT_FORMAT = "privlora-report/1"
REFERENCE = "pld"


def epsilon_by_client(ledger: Ledger, accountant: str) -> dict[int, float]:
    acc = get_accountant(accountant)
    return {c: acc.epsilon(history_key(h), ledger.delta) for c, h in sorted(ledger.histories().items())}


def privacy_summary(
    ledger: Ledger,
    accountant: str | None = None,
    cross_checks: Sequence[str] = ("pld", "rdp"),
    client_sizes: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Everything about privacy that ``report.json`` states, recomputed from ``ledger``."""
    name = accountant or str(ledger.header.get("accountant", REFERENCE))
    acc = get_accountant(name)
    checks = [c for c in dict.fromkeys(cross_checks) if c != name]
    delta = ledger.delta
    histories = ledger.histories()
    budgets = ledger.budgets
    warnings: list[str] = []
    clients: dict[str, Any] = {}
    for c in sorted(set(budgets) | set(histories)):
        hist = histories.get(c, [])
        key = history_key(hist)
        eps = acc.epsilon(key, delta)
        cross = {n: get_accountant(n).epsilon(key, delta) for n in checks}
        ref = cross.get(REFERENCE, eps if name == REFERENCE else None)
        if ref is not None and eps < ref - acc.error - 1e-9:
            warnings.append(
                f"client {c}: {name} gives {eps:.4f}, below the PLD reference {ref:.4f} by more than its stated error "
                f"{acc.error}; the PLD value is reported instead"
            )
            eps = ref
        budget = budgets.get(c)
        if budget is not None and eps > budget + 1e-9:
            warnings.append(f"client {c}: epsilon {eps:.4f} is above its budget {budget:g} (a budget was exceeded)")
        rounds = [ch.round for ch in ledger.charges if ch.client == c]
        clients[str(c)] = {
            "epsilon": eps,
            "budget": budget,
            "remaining": None if budget is None else max(0.0, budget - eps),
            "rounds": rounds,
            "rounds_participated": len(rounds),
            "steps": sum(m.steps for m in hist),
            "noise_multipliers": sorted({m.noise_multiplier for m in hist}),
            "sample_rates": sorted({m.sample_rate for m in hist}),
            "clip_norms": sorted({m.clip_norm for m in hist}),
            "cross_checks": cross,
        }
        if client_sizes is not None and c in client_sizes:
            clients[str(c)]["num_examples"] = int(client_sizes[c])
            w = delta_warning(delta, int(client_sizes[c]))
            if w:
                warnings.append(f"client {c}: {w}")
    eps_all = [v["epsilon"] for v in clients.values()]
    return {
        "format": REPORT_FORMAT,
        "delta": delta,
        "epsilon_record_level": max(eps_all) if eps_all else 0.0,
        "unit_of_privacy": "one record (one labelled example) in one client's local dataset",
        "adjacency": "add or remove one record",
        "accountant": {"name": name, "version": acc.version, "description": acc.description, "error": acc.error},
        "cross_checks": [
            {"name": n, "version": get_accountant(n).version, "description": get_accountant(n).description} for n in checks
        ],
        "ledger": {"file": ledger.path.name, "entries": len(ledger), "head": ledger.head, "header_hash": ledger.header["hash"]},
        "clients": clients,
        "warnings": warnings,
    }


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def render_privacy_statement(summary: Mapping[str, Any], context: Mapping[str, Any]) -> str:
    """Markdown privacy statement. ``context`` supplies what the ledger cannot know: ``secagg``
    (a sentence on secure aggregation and its threat model), ``rounds``, ``config_sha256``,
    ``packages`` ({name: version}), ``sampling_note`` and ``epsilon_plot`` (file name)."""
    acc = summary["accountant"]
    clients = summary["clients"]
    eps = summary["epsilon_record_level"]
    delta = summary["delta"]
    sigmas = sorted({s for v in clients.values() for s in v["noise_multipliers"]})
    rates = sorted({q for v in clients.values() for q in v["sample_rates"]})
    clips = sorted({c for v in clients.values() for c in v["clip_norms"]})
    lines = [
        "## Privacy statement",
        "",
        f"**Every client's data is protected with record-level (ε = {eps:.2f}, δ = {delta:g})-differential privacy** "
        f"— the largest ε over clients; each client's own ε is in the table below. In words: whatever anyone does "
        f"with what the clients released, they cannot tell whether any single record was in a client's data with "
        f"odds better than e^ε to 1, except with probability δ. ε is an upper bound, computed with "
        f"{acc['description']}, {acc['version']}, from the ledger.",
        "",
        "- **Unit of privacy:** " + summary["unit_of_privacy"] + ". A person who contributed several examples is "
        "protected only by group privacy (ε grows with the number of their examples).",
        "- **Adjacency:** " + summary["adjacency"] + " (unbounded DP), within a client's dataset.",
        "- **What is covered:** every adapter update a client releases to the server (and so everything computed from "
        "them: the aggregated adapters, the final model, the accuracy curve). Each release is DP-SGD on the client: "
        "per-example gradients clipped to L2 norm C, Gaussian noise σ·C added to their sum, Poisson sampling of each "
        "record with probability q. Every release is charged in the ledger before it leaves the client.",
        "- **What is not covered:** hyperparameter tuning on this data, the pretraining data of the base model, the "
        "held-out evaluation set (the server evaluates on it in the clear), the number of records each client holds, "
        "and which clients took part in which round.",
        "- **Accountant and assumptions:** " + f"`{acc['name']}` ({acc['version']}); "
        + ("an upper bound by construction. " if not acc["error"] else f"an upper bound within its stated error {acc['error']}. ")
        + "Cross-checks: " + ", ".join(f"{c['name']} ({c['version']})" for c in summary["cross_checks"]) + ". "
        + context.get(
            "sampling_note",
            "Poisson sampling is what the clients ran. Client sampling by the server is not used to amplify privacy: "
            "a client is charged for every round it trains in and for nothing else.",
        ),
        "- **Mechanism:** noise multiplier σ ∈ {" + ", ".join(f"{s:.4g}" for s in sigmas) + "}, sample rate q ∈ {"
        + ", ".join(f"{q:.4g}" for q in rates) + "}, clip norm C ∈ {" + ", ".join(f"{c:g}" for c in clips) + "}.",
        "- **Secure aggregation:** " + context.get("secagg", "not used; the server sees each client's update."),
        f"- **Ledger:** `{summary['ledger']['file']}`, {summary['ledger']['entries']} charges, head hash "
        f"`{summary['ledger']['head']}`. `privlora verify` checks the hash chain and recomputes every ε from it.",
    ]
    if context.get("config_sha256"):
        lines.append(f"- **Config:** SHA-256 `{context['config_sha256']}` (of `config.toml`).")
    if context.get("packages"):
        lines.append("- **Packages:** " + ", ".join(f"{k} {v}" for k, v in context["packages"].items()) + ".")
    lines += ["", "| client | records | rounds trained | ε (" + acc["name"] + ") | "
              + " | ".join(f"ε ({c['name']})" for c in summary["cross_checks"]) + " | budget | remaining |",
              "|---:|---:|---:|---:|" + "---:|" * len(summary["cross_checks"]) + "---:|---:|"]
    for c, v in clients.items():
        cross = " | ".join(_fmt(v["cross_checks"].get(x["name"])) for x in summary["cross_checks"])
        budget = "—" if v["budget"] is None else f"{v['budget']:g}"
        lines.append(
            f"| {c} | {v.get('num_examples', '—')} | {v['rounds_participated']} | {_fmt(v['epsilon'])} | {cross} | "
            f"{budget} | {_fmt(v['remaining'])} |"
        )
    if context.get("epsilon_plot"):
        lines += ["", f"![ε per client over rounds, and budget remaining]({context['epsilon_plot']})"]
    if summary["warnings"]:
        lines += ["", "**Warnings**", ""] + [f"- {w}" for w in summary["warnings"]]
    return "\n".join(lines) + "\n"


def plot_epsilon(ledger: Ledger, accountant: str, path: str | Path, rounds: int | None = None, max_clients: int = 12,
                 max_points: int = 20) -> str:
    """Two panels: ε after each round for the clients with the largest final ε, and budget
    remaining per client. Returns a caption (it says when clients were left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    acc = get_accountant(accountant)
    histories = ledger.histories()
    final = {c: acc.epsilon(history_key(h), ledger.delta) for c, h in histories.items()}
    everyone = sorted(set(ledger.budgets) | set(histories))
    # a client that never trained spent nothing: it is drawn (flat at 0) and named, not left out
    shown = sorted(everyone, key=lambda c: (-final.get(c, 0.0), c))[:max_clients]
    idle = [c for c in shown if c not in histories]
    last_round = rounds or max((ch.round for ch in ledger.charges), default=0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curves: dict[tuple, list[int]] = {}  # clients whose curves are the same are drawn once, named together
    for c in sorted(shown):
        if c in idle:
            ax1.plot([0, last_round], [0.0, 0.0], ls=":", label=f"client {c} (never trained)")
            continue
        mine = [ch for ch in ledger.charges if ch.client == c]
        # at most `max_points` tight computations per curve: every k-th charge and the last
        stride = max(1, -(-len(mine) // max_points))
        xs, ys = [0], [0.0]
        for i in range(len(mine)):
            if (i + 1) % stride == 0 or i == len(mine) - 1:
                xs.append(mine[i].round)
                ys.append(acc.epsilon(history_key(ch.mechanism for ch in mine[: i + 1]), ledger.delta))
        xs.append(last_round)
        ys.append(ys[-1])
        curves.setdefault((tuple(xs), tuple(round(y, 9) for y in ys), stride == 1), []).append(c)
    styles = ("-", "--", "-.", ":")
    markers = ("o", "s", "^", "v", "D", "P", "X", "*")
    for i, ((xs, ys, steps), who) in enumerate(sorted(curves.items(), key=lambda kv: kv[1][0])):
        # each curve its own colour, dash and marker, so that lines that cross or nearly meet stay apart
        name = f"client {who[0]}" if len(who) == 1 else f"clients {', '.join(map(str, who))} (same ε)"
        ax1.plot(xs, ys, drawstyle="steps-post" if steps else "default", ls=styles[i % len(styles)],
                 marker=markers[i % len(markers)], markersize=4, lw=1.4, alpha=0.85, label=name)
    budgets = ledger.budgets
    if budgets and len(set(budgets.values())) == 1:
        ax1.axhline(next(iter(budgets.values())), color="k", ls="--", lw=1, label="budget")
    ax1.set_xlabel("round")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax1.set_ylabel(f"ε at δ={ledger.delta:g} ({accountant})")
    ax1.set_title("privacy spent per client")
    ax1.legend(fontsize=7, ncol=2)
    ids = sorted(budgets)
    remaining = [max(0.0, budgets[c] - final.get(c, 0.0)) for c in ids]
    spent = [min(budgets[c], final.get(c, 0.0)) for c in ids]
    ax2.bar([str(c) for c in ids], spent, label="spent")
    ax2.bar([str(c) for c in ids], remaining, bottom=spent, label="remaining", alpha=0.5)
    ax2.set_xlabel("client")
    ax2.set_ylabel("ε")
    ax2.set_title("budget spent and remaining")
    ax2.legend(fontsize=7)
    if len(ids) > 40:
        ax2.set_xticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    never = f"; never trained, so at ε = 0: client{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))}" if idle else ""
    if len(shown) < len(everyone):
        return f"the {len(shown)} clients with the largest ε (of {len(everyone)}){never}"
    return f"every client{never}"
