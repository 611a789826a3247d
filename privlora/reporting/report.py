"""A short human-readable report of a run, rendered from its output folder alone.

Reads ``config.toml``, ``metrics.jsonl`` and (for DP runs) ``ledger.jsonl``; writes
``report.json`` (machine-readable: accuracy, and the privacy summary recomputed from the ledger
by `accounting.privacy_summary`), ``report.md`` (for a person: the run, the accuracy per round,
and the privacy statement), ``accuracy_epsilon.png`` and ``privacy_epsilon.png``. Rendering
again gives the same files. What is task-specific (how accuracy is named, the task's own
metrics, sample outputs, the unit of privacy) is the run's task's to say (`privlora.tasks.Task`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from privlora.core.checkpoint import atomic_write
from privlora.core.config import load_config
from privlora.core.errors import RunFolderError, ledger_file
from privlora.tasks.registry import task_for


def _resume_hint(out: Path) -> str:
    if (out / "checkpoint" / "state.json").is_file():
        return f"continue the run with `privlora run --resume {out}` (it sets a cut-off line aside), then report again"
    return f"run it again with `privlora run {out / 'config.toml'} --out NEW_DIR`"


def read_metrics(out: Path) -> list[dict]:
    """Every round's metrics line; `RunFolderError` naming the problem and the fix when the file
    is missing, empty, or has a line that is not a JSON object with a round number."""
    out = Path(out)
    path = out / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(
            f"report: {path} is missing: the run never finished round 0 or the file was deleted; the report is made "
            f"from it, so restore it from a backup or {_resume_hint(out)}"
        )
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"report: {path} is not UTF-8 text at byte {exc.start}; it was damaged: restore it from a backup") from exc
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunFolderError(
                    f"report: {path} line {i} is not valid JSON ({exc.msg}): the run was cut off while writing it; "
                    f"{_resume_hint(out)}"
                ) from exc
            if not (isinstance(row, dict) and isinstance(row.get("round"), int) and "test_accuracy" in row):
                raise RunFolderError(f"report: {path} line {i} is not a privlora metrics record; it was edited: restore it from a backup")
            rows.append(row)
    if not rows or rows[0]["round"] != 0:
        raise RunFolderError(f"report: {path} has no round-0 line (the untrained model); restore it from a backup or {_resume_hint(out)}")
    return rows


def plot(rows: list[dict], path: Path, loss_label: str = "held-out loss") -> None:
    """Accuracy (or, for a task without accuracy, the held-out loss: ``loss_label``) and every
    client's epsilon per round, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if all(r["test_accuracy"] is not None for r in rows):
        ax1.plot(rounds, [r["test_accuracy"] for r in rows], marker="o", label="global model")
        if rows[0].get("majority_baseline") is not None:
            ax1.axhline(rows[0]["majority_baseline"], color="grey", ls="--", label="majority class")
        ax1.set_ylabel("held-out accuracy")
        ax1.set_title("Accuracy")
        ax1.legend(loc="lower right")
    else:  # e.g. open-ended instruction data: no accuracy, the held-out loss instead
        ax1.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="global model")
        ax1.set_ylabel(loss_label)
        ax1.set_title("Held-out loss")
        ax1.legend(loc="upper right")
    ax1.set_xlabel("round")
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
    integer_round_axis(ax1, ax2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plural(n: int, word: str) -> str:
    """``1 round``, ``6 rounds``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def accuracy_line(cfg, rows: list[dict], final: dict) -> str:
    """The report's lines on held-out quality, in the run's task's words (`Task.quality_lines`):
    accuracy against the untrained model and the majority class, then the task's own metrics
    (for "causal-lm": the response-token loss and perplexity)."""
    return "\n".join(task_for(cfg).quality_lines(rows, final, holdout_statement(cfg)))


def samples_section(out: Path, task) -> list[str]:
    """The task's rendering of samples.json (outputs for fixed held-out inputs, untrained and
    final), when the run wrote one."""
    path = out / "samples.json"
    if not path.is_file():
        return []
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["prompts"]
        return task.samples_section(record)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunFolderError(f"report: {path} is damaged ({exc}); run `privlora run --resume` or delete it") from exc


def integer_round_axis(*axes) -> None:
    """Rounds are whole numbers: ticks only at integers (never at 0.25)."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


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


def noise_statement(first: dict) -> str:
    """Which generator drew each client's DP noise (from round 0 of metrics.jsonl)."""
    sources = first.get("noise_source") or {}
    if not sources:
        return ""
    by = {}
    for c, src in sorted(sources.items(), key=lambda kv: int(kv[0])):
        by.setdefault(src, []).append(int(c))
    words = {"seeded": "torch's seeded generator (reproducible, not for a real release)",
             "secure": "the secure source (ChaCha20 keyed from os.urandom, `privlora.federation.noise`)"}
    parts = [f"clients {ids} from {words.get(src, src)}" for src, ids in by.items()]
    transport = first.get("transport")
    where = f" The rounds ran over the {transport} transport." if transport else ""
    return f"\nNoise: {'; '.join(parts)}.{where}\n"


STRATEGY_NAMES = {"fedit": "FedIT", "ffa": "FFA-LoRA", "flora": "FLoRA", "hetlora": "HetLoRA"}


def aggregation_statement(cfg) -> str:
    """What the server applied to the strategy's aggregate each round, in one sentence."""
    f = cfg.federation
    name = STRATEGY_NAMES.get(f.strategy, f.strategy)
    if f.server_momentum == 0 and f.server_lr == 1.0:
        return f"no server momentum: each round's global update is {name}'s own aggregate."
    text = (f"server momentum {f.server_momentum:g} (FedAvgM, server lr {f.server_lr:g}) applied after {name}'s "
            "aggregate each round")
    if f.strategy in ("flora", "hetlora"):
        text += f", so the global update is **not** the {name} paper's aggregate (set federation.server_momentum = 0 for it)"
    return text + "."


def calibration_statement(cfg, rows: list[dict]) -> str:
    """How each client's noise was chosen, and what stops it from overspending."""
    p, f = cfg.privacy, cfg.federation
    refusals = sum(1 for r in rows for reason in (r.get("refused") or {}).values() if "budget" in str(reason))
    enforced = (f"budgets are enforced before every round: a client whose next round would exceed its budget is "
                f"refused, never overspent ({refusals} such refusal{'s' if refusals != 1 else ''} in this run).")
    if p.noise_multiplier > 0:
        return f"The noise multiplier was set in the config; {enforced}"
    if cfg.calibration_rounds < f.rounds:
        return (f"Each client's noise multiplier was calibrated so that ε ≤ {p.target_epsilon} if it trained in "
                f"{cfg.calibration_rounds} of the {f.rounds} rounds, its expected share with {f.clients_per_round} of "
                f"{cfg.data.num_clients} clients sampled per round (privacy.participation = \"expected\"), not in all "
                f"of them; {enforced}")
    every = "every one of the " + f"{f.rounds} rounds" if f.rounds != 1 else "the run's 1 round"
    return f"Each client's noise multiplier was calibrated so that ε ≤ {p.target_epsilon} if it trained in {every}; {enforced}"


def tuning_statement(cfg) -> str | None:
    """Where the embedded default's hyperparameters came from (only for that config)."""
    from privlora.core.config import ExperimentConfig

    if cfg != ExperimentConfig():
        return None
    return ("- Hyperparameters: the embedded default, chosen by runs evaluated on a validation split of the training "
            "data (`benchmarks/results/dp_default.md`), never on the test split reported here. That choice used the "
            "clients' training data and is not covered by the ε below.")


def holdout_statement(cfg) -> str:
    if cfg.data.holdout == "validation":
        return ("a validation split of the training data (data.holdout = \"validation\": a tuning run; the test split "
                "was not used)")
    return "the held-out test split"


def read_run(out: Path):
    """``(cfg, config sha256, metrics rows, ledger or None)`` of a run folder; everything the
    report needs is read (and refused, naming the file) before anything is written."""
    from accounting import Ledger
    from accounting.verify import LEDGER_FILE

    cfg = load_config(out / "config.toml")
    chash = hashlib.sha256((out / "config.toml").read_bytes()).hexdigest()
    rows = read_metrics(out)
    ledger = None
    if cfg.privacy.enabled:
        if not (out / LEDGER_FILE).is_file():
            raise RunFolderError(
                f"report: {out / LEDGER_FILE} is missing but the run's config enables privacy, and every epsilon in the "
                "report is computed from it: restore it from a backup (no file was written)"
            )
        with ledger_file(out / LEDGER_FILE):
            ledger = Ledger.open(out / LEDGER_FILE)
    return cfg, chash, rows, ledger


def privacy_section(out: Path, cfg, task, ledger, rows: list[dict], final: dict, chash: str, packages: dict) -> tuple[dict, str]:
    """(report.json's ``privacy``, report.md's privacy statement) from the ledger alone; draws
    privacy_epsilon.png. Without DP: ``{"enabled": False}`` and no statement."""
    from accounting import plot_epsilon, privacy_summary, render_privacy_statement

    if ledger is None:
        return {"enabled": False}, ""
    p = cfg.privacy
    sizes = {i: n for i, n in enumerate(rows[0].get("client_sizes") or []) if n is not None}
    privacy = {"enabled": True, **privacy_summary(ledger, p.accountant, cross_checks=("pld", "rdp", "prv"), client_sizes=sizes)}
    if task.unit_of_privacy:
        privacy["unit_of_privacy"] = task.unit_of_privacy
    caption = plot_epsilon(ledger, p.accountant, out / "privacy_epsilon.png", rounds=final["round"])
    context = {"secagg": secagg_statement(cfg), "config_sha256": chash, "packages": packages, "epsilon_plot": "privacy_epsilon.png"}
    statement = (render_privacy_statement(privacy, context)
                 + f"\n{calibration_statement(cfg, rows)} The plot's left panel shows {caption}.\n" + noise_statement(rows[0]))
    return privacy, statement


def client_level_summary(rows: list[dict]) -> dict | None:
    """report.json's ``client_level``: the last metrics line's client-level record."""
    last = next((r["client_level"] for r in reversed(rows) if isinstance(r.get("client_level"), dict)), None)
    return None if last is None else dict(last)


def client_level_statement(cfg, rows: list[dict]) -> str:
    """report.md's plain words on the client-level guarantee: unit, noise, who must be trusted."""
    p = cfg.privacy
    last = client_level_summary(rows) or {}
    eps_s, eps_m = last.get("epsilon_server_max", 0.0), last.get("epsilon_model_only_max", 0.0)
    if p.client_noise == "central":
        how = (f"the server adds Gaussian noise (noise multiplier {last.get('noise_multiplier', 0):.4g}) to the sum: the server "
               "must be trusted, and it saw the un-noised sum (under secure aggregation too)")
    else:
        how = (f"each client adds its own share of {p.client_noise.replace('_', ' ')} noise in the integers mod 2^{p.client_bits} "
               f"before secure aggregation, sized for {last.get('min_inputs', '?')} counted inputs "
               f"({p.colluders} assumed colluder(s) not counted): the server only decodes a noised sum")
    return (f"- **Client-level DP** (unit: a client's whole data): each sampled client's whole contribution is clipped to "
            f"L2 norm {p.client_clip:g}, weights are uniform and the sum is divided by {cfg.federation.clients_per_round}; "
            f"{how}. Client-level epsilon at delta {p.delta:g}: {eps_s:.4f} against the server (every round a client took part "
            f"is charged; no sampling amplification) and {eps_m:.4f} against whoever sees only the released model (clients "
            "are sampled a fixed number per round, not by Poisson sampling, so no amplification is claimed). "
            "`privlora verify` recomputes both from client_level.jsonl.")


def report_record(cfg, task, chash: str, rows: list[dict], final: dict, stopped: str | None, privacy: dict,
                  packages: dict) -> dict:
    """What report.json holds (format privlora-run-report/1): the run, accuracy and loss per
    round, the task's own metrics (``task_metrics``: metrics.jsonl key -> final, untrained, per
    round), the privacy summary and the package versions."""
    done = [r for r in rows if "stopped" not in r]
    return {
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
            "per_round": [r["test_accuracy"] for r in done],
            "evaluated_on": cfg.data.holdout,
        },
        "loss": {
            "final": final["test_loss"],
            "untrained": rows[0]["test_loss"],
            "perplexity_final": final.get("test_perplexity"),
            "perplexity_untrained": rows[0].get("test_perplexity"),
        },
        "task_metrics": {key: {"final": final.get(key), "untrained": rows[0].get(key), "per_round": [r.get(key) for r in done]}
                         for key, _, _ in task.metric_columns(rows)},
        "task": cfg.model.task,
        "privacy": privacy,
        "client_level": client_level_summary(rows),
        "noise_source": rows[0].get("noise_source") or {},
        "transport": rows[0].get("transport", "in-process"),
        "packages": packages,
    }


def summary_lines(cfg, rows: list[dict], final: dict, stopped: str | None) -> list[str]:
    """report.md's title and bullet points: the run's setup, aggregation, held-out quality,
    where the hyperparameters came from, an early stop, and whether DP applies."""
    lines = [f"# privlora run: {cfg.name}", ""]
    lines += [
        f"- Strategy **{cfg.federation.strategy}**, {cfg.data.num_clients} clients "
        f"({cfg.data.partition} partition), {cfg.federation.clients_per_round} sampled per round, "
        f"{plural(cfg.federation.rounds, 'round')} x {plural(cfg.training.local_steps, 'local step')}, LoRA rank "
        f"{list(cfg.lora.ranks) or cfg.lora.r} on {list(cfg.lora.target_modules)}, seed {cfg.seed}.",
        f"- Aggregation: {aggregation_statement(cfg)}",
        accuracy_line(cfg, rows, final),
    ]
    if (tuned := tuning_statement(cfg)) is not None:
        lines.append(tuned)
    if stopped:
        lines.append(f"- **Stopped early:** {stopped}.")
    elif final["round"] < cfg.federation.rounds:
        lines.append(f"- **Unfinished:** the run was interrupted after round {final['round']} of {cfg.federation.rounds}; "
                     "every number here is that round's, not a finished run's. Continue it with `privlora run --resume` "
                     "on this folder; the report is written again at the end.")
    if cfg.privacy.unit == "client":
        lines.append(client_level_statement(cfg, rows))
    if not cfg.privacy.enabled and cfg.privacy.unit != "client":
        lines += ["- **No differential privacy**: this run is a non-private baseline; no epsilon applies."]
    elif not cfg.privacy.enabled:
        lines += ["- No record-level DP-SGD inside the clients (privacy.enabled = false): only the client-level guarantee applies."]
    lines.append("- Upload and download are the mean tensor bytes (float32) one client sent and received in the round "
                 "(under secure aggregation: every message of the protocol).")
    return lines


def round_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """report.md's table, one line per round; ``columns`` are the task's metrics
    (`Task.metric_columns`: key, title, format), between loss and train loss."""
    lines = ["", "| round | accuracy | loss |" + "".join(f" {title} |" for _, title, _ in columns)
             + " train loss | max ε | clients trained | not admitted | upload / client | download / client | seconds |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|---|---|---|---|---|"]
    for r in rows:
        if "stopped" in r:
            continue
        eps = "-" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.3f}"
        tl = "-" if r.get("train_loss") is None else f"{r['train_loss']:.4f}"
        pc = r.get("per_client") or []
        up = _kb(sum(c["upload_bytes"] for c in pc) / len(pc)) if pc else "-"
        down = _kb(sum(c["download_bytes"] for c in pc) / len(pc)) if pc else "-"
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
        extra = "".join(f" {format(r[k], fmt)} |" if r.get(k) is not None else " - |" for k, _, fmt in columns)
        lines.append(
            f"| {r['round']} | {acc} | {r['test_loss']:.4f} |{extra} {tl} | {eps} | "
            f"{len(r.get('clients', []))} | {len(r.get('refused', {}))} | {up} | {down} | {r['seconds']:.1f} |"
        )
    return lines


def write_report(out: str | Path) -> Path:
    """Write report.json, report.md and the plots from the run folder's files alone."""
    from privlora.reporting.audit_section import render_audit_section

    out = Path(out)
    cfg, chash, rows, ledger = read_run(out)
    task = task_for(cfg)
    plot(rows, out / "accuracy_epsilon.png", task.loss_label)
    final = next(r for r in reversed(rows) if "stopped" not in r)
    stopped = next((r["stopped"] for r in rows if "stopped" in r), None)
    packages = package_versions()
    privacy, statement = privacy_section(out, cfg, task, ledger, rows, final, chash, packages)
    report = report_record(cfg, task, chash, rows, final, stopped, privacy, packages)
    atomic_write(out / "report.json", json.dumps(report, indent=1, sort_keys=True) + "\n")

    lines = summary_lines(cfg, rows, final, stopped) + round_table(rows, task.metric_columns(rows))
    lines += ["", "![accuracy and epsilon per round](accuracy_epsilon.png)", ""]
    lines += samples_section(out, task)
    if statement:
        lines += [statement]
    lines += render_audit_section(out)  # only when the folder holds audit.json (`privlora audit`)
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path
