"""A short human-readable report of a run, rendered from its output folder alone.

Reads ``config.toml`` and ``metrics.jsonl`` and writes ``report.md`` with accuracy, loss and
per-client epsilon per round, and ``accuracy_epsilon.png``. Rendering again gives the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def write_report(out: str | Path) -> Path:
    out = Path(out)
    cfg = load_config(out / "config.toml")
    rows = read_metrics(out)
    plot(rows, out / "accuracy_epsilon.png")
    p = cfg.privacy
    lines = [f"# privlora run: {cfg.name}", ""]
    final = rows[-1]
    lines += [
        f"- Strategy **{cfg.federation.strategy}**, {cfg.data.num_clients} clients "
        f"({cfg.data.partition} partition), {cfg.federation.clients_per_round} per round, "
        f"{cfg.federation.rounds} rounds x {cfg.training.local_steps} local steps, LoRA rank "
        f"{list(cfg.lora.ranks) or cfg.lora.r} on {list(cfg.lora.target_modules)}, server momentum "
        f"{cfg.federation.server_momentum} (lr {cfg.federation.server_lr}), seed {cfg.seed}.",
        f"- Held-out accuracy: **{final['test_accuracy']:.4f}** after round {final['round']} "
        f"(untrained model {rows[0]['test_accuracy']:.4f}; always predicting the majority class "
        f"{rows[0]['majority_baseline']:.4f}).",
    ]
    if p.enabled:
        sig = rows[0].get("noise_multiplier", {})
        sig_vals = sorted(set(round(v, 4) for v in sig.values()))
        how = f"calibrated to epsilon {p.target_epsilon} per client assuming it trains in every round" if p.noise_multiplier == 0 else "set in the config"
        lines += [
            f"- Differential privacy: DP-SGD (Opacus) with Poisson sampling, per-example clipping at "
            f"{p.max_grad_norm}, noise multiplier {sig_vals} ({how}). Epsilon is per client, at delta "
            f"{p.delta}, for adding or removing one of that client's examples, computed by Opacus's "
            f"{p.accountant.upper()} accountant from the rounds the client actually trained in (an upper bound). "
            f"Largest epsilon after the last round: **{final['epsilon_max']:.3f}**.",
            "- Not covered by that epsilon: the number of examples each client holds (sent to the "
            "server in the clear when federation.weighting = 'num_examples'), which clients took part, "
            "hyperparameter tuning, and the pretraining data of the base model. Contributions are summed "
            "in the clear: there is no secure aggregation yet.",
        ]
    else:
        lines += ["- **No differential privacy**: this run is a non-private baseline; no epsilon applies."]
    lines += ["", "| round | accuracy | loss | train loss | max epsilon | clients | seconds |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.3f}"
        tl = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        lines.append(
            f"| {r['round']} | {r['test_accuracy']:.4f} | {r['test_loss']:.4f} | {tl} | {eps} | "
            f"{len(r.get('clients', []))} | {r['seconds']:.1f} |"
        )
    lines += ["", "![accuracy and epsilon per round](accuracy_epsilon.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
