"""A short human-readable report of a run, rendered from its output folder alone.

Reads ``config.toml``, ``metrics.jsonl`` and (for DP runs) ``ledger.jsonl``; writes
``report.json`` (machine-readable: accuracy, and the privacy summary recomputed from the ledger
by `accounting.privacy_summary`), ``report.md`` (for a person: the run, the accuracy per round,
and the privacy statement), ``accuracy_epsilon.png`` and ``privacy_epsilon.png``. Rendering
again gives the same files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .checkpoint import atomic_write
from .config import load_config


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {out} a privlora run folder?")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i} is not valid JSON ({exc}); the run was cut off mid-write") from exc
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(rounds, [r["test_accuracy"] for r in rows], marker="o", label="global model")
    ax1.axhline(rows[0]["majority_baseline"], color="grey", ls="--", label="majority class")
    ax1.set_xlabel("round")
    ax1.set_ylabel("held-out accuracy")
    ax1.set_title("Accuracy")
    ax1.legend(loc="lower right")
    eps_rows = [r for r in rows if r.get("epsilon")]
    if eps_rows and any(r.get("epsilon_max") for r in eps_rows):
        clients = sorted(eps_rows[-1]["epsilon"], key=int)
        for c in clients:
            ax2.plot([r["round"] for r in eps_rows], [r["epsilon"].get(c, 0.0) for r in eps_rows], alpha=0.6, lw=1)
        ax2.plot([r["round"] for r in eps_rows], [r["epsilon_max"] or 0 for r in eps_rows], color="black", lw=2, label="max over clients")
        ax2.legend(loc="lower right")
        ax2.set_title("Epsilon per client (upper bound)")
    else:
        ax2.text(0.5, 0.5, "no differential privacy", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title("Epsilon")
    ax2.set_xlabel("round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PACKAGES = ("privlora", "torch", "opacus", "peft", "transformers", "dp-accounting", "numpy", "cryptography")


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _kb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def secagg_statement(cfg) -> str:
    s = cfg.secagg
    if not s.enabled:
        return (
            "not used in this run: the server sees each client's update (which is differentially private, so the "
            "guarantee above holds against the server too)."
        )
    graph = "every pair of clients (SecAgg)" if s.neighbours == 0 else f"{s.neighbours} neighbours per client (SecAgg+)"
    return (
        f"on: masked secure aggregation (Bonawitz et al. 2017) over {graph}, {s.bits}-bit fixed point, threshold "
        f"{s.threshold or 'the smallest secure value'}; the server learns only each round's sum of contributions, "
        "against an honest-but-curious server (no signing keys are pinned in the config) and fewer than t colluding "
        "clients. Not hidden: who took part, vector sizes, each client's DP parameters in the ledger (its sample "
        "rate reveals its dataset size to within a batch). See SECURITY.md."
    )


def write_report(out: str | Path) -> Path:
    """Write report.json, report.md and the plots from the run folder's files alone."""
    from accounting import Ledger, plot_epsilon, privacy_summary, render_privacy_statement
    from accounting.verify import LEDGER_FILE

    from .privacy import get_accountant  # noqa: F401  (registers the "prv" accountant)

    out = Path(out)
    cfg = load_config(out / "config.toml")
    chash = hashlib.sha256((out / "config.toml").read_bytes()).hexdigest()
    rows = read_metrics(out)
    plot(rows, out / "accuracy_epsilon.png")
    p = cfg.privacy
    final = next(r for r in reversed(rows) if "stopped" not in r)
    stopped = next((r["stopped"] for r in rows if "stopped" in r), None)
    sizes = {i: n for i, n in enumerate(rows[0].get("client_sizes", []))}
    packages = package_versions()
    privacy: dict = {"enabled": False}
    statement = ""
    if p.enabled:
        ledger = Ledger.open(out / LEDGER_FILE)
        privacy = {"enabled": True, **privacy_summary(ledger, p.accountant, cross_checks=("pld", "rdp", "prv"), client_sizes=sizes)}
        caption = plot_epsilon(ledger, p.accountant, out / "privacy_epsilon.png", rounds=final["round"])
        calibration = (
            f"Each client's noise multiplier was calibrated so that ε ≤ {p.target_epsilon} if it trained in every one of "
            f"the {cfg.federation.rounds} rounds; budgets are enforced before every round."
            if p.noise_multiplier == 0 else "The noise multiplier was set in the config; budgets are enforced before every round."
        )
        statement = render_privacy_statement(
            privacy,
            {
                "secagg": secagg_statement(cfg),
                "config_sha256": chash,
                "packages": packages,
                "epsilon_plot": "privacy_epsilon.png",
            },
        ) + f"\n{calibration} The plot's left panel shows {caption}.\n"
    report = {
        "format": "privlora-run-report/1",
        "run": {
            "name": cfg.name,
            "config_sha256": chash,
            "strategy": cfg.federation.strategy,
            "rounds_planned": cfg.federation.rounds,
            "rounds_completed": final["round"],
            "stopped": stopped,
        },
        "accuracy": {
            "final": final["test_accuracy"],
            "untrained": rows[0]["test_accuracy"],
            "majority_baseline": rows[0]["majority_baseline"],
            "per_round": [r["test_accuracy"] for r in rows if "stopped" not in r],
        },
        "privacy": privacy,
        "packages": packages,
    }
    atomic_write(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")

    lines = [f"# privlora run: {cfg.name}", ""]
    lines += [
        f"- Strategy **{cfg.federation.strategy}**, {cfg.data.num_clients} clients "
        f"({cfg.data.partition} partition), {cfg.federation.clients_per_round} sampled per round, "
        f"{cfg.federation.rounds} rounds x {cfg.training.local_steps} local steps, LoRA rank "
        f"{list(cfg.lora.ranks) or cfg.lora.r} on {list(cfg.lora.target_modules)}, server momentum "
        f"{cfg.federation.server_momentum} (lr {cfg.federation.server_lr}), seed {cfg.seed}.",
        f"- Held-out accuracy: **{final['test_accuracy']:.4f}** after round {final['round']} "
        f"(untrained model {rows[0]['test_accuracy']:.4f}; always predicting the majority class "
        f"{rows[0]['majority_baseline']:.4f}).",
    ]
    if stopped:
        lines.append(f"- **Stopped early:** {stopped}.")
    if not p.enabled:
        lines += ["- **No differential privacy**: this run is a non-private baseline; no epsilon applies."]
    lines.append("- Upload and download are the mean tensor bytes (float32) one client sent and received in the round "
                 "(under secure aggregation: every message of the protocol).")
    lines += ["", "| round | accuracy | loss | train loss | max ε | clients trained | not admitted | "
              "upload / client | download / client | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "stopped" in r:
            continue
        eps = "-" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.3f}"
        tl = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        pc = r.get("per_client") or []
        up = _kb(sum(c["upload_bytes"] for c in pc) / len(pc)) if pc else "-"
        down = _kb(sum(c["download_bytes"] for c in pc) / len(pc)) if pc else "-"
        lines.append(
            f"| {r['round']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | {tl} | {eps} | "
            f"{len(r.get('clients', []))} | {len(r.get('refused', {}))} | {up} | {down} | {r['seconds']:.1f} |"
        )
    lines += ["", "![accuracy and epsilon per round](accuracy_epsilon.png)", ""]
    if statement:
        lines += [statement]
    from .audit import render_audit_section

    lines += render_audit_section(out)  # only when the folder holds audit.json (`privlora audit`)
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path
