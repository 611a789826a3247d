"""Checks made before a run writes anything: its folder, its privacy budgets, a resume's files.

`run_experiment` loads the data and the model and builds the federation *before* it creates the
output folder or writes ``config.toml``, and calls these checks in between. A run that is
refused therefore leaves nothing behind: fix the config and run the same command again.

- `check_out_dir`: ``--out`` is a folder (or can be created as one) and holds no earlier run
  (unless ``--overwrite``). Nothing is created here.
- `check_budgets`: every client's first round fits its budget, checked right after the data is
  partitioned (before the model loads). Noise is calibrated here (the slow part for a large
  delta or many clients, shown as a stage), and each client's one-round
  release is put to `accounting.Admission`, the same admission every round uses. A client whose
  budget is below one round's cost could never train; the run is refused with the numbers and
  the fix instead of exiting 0 with an untrained adapter.
- `check_resume_folder`: ``--resume DIR`` has the files a resume needs; says which is missing
  and what to do, without changing any file.
- `is_failed_start`: a folder left by a start that never finished round 0 (nothing trained,
  nothing charged) may be reused by the same command without ``--overwrite``.
- `momentum_warning`: server momentum on top of FLoRA or HetLoRA changes the papers' aggregate.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from privlora.core.config import ExperimentConfig
from privlora.core.errors import OutputDirError, PreflightError, RunFolderError
from privlora.core.progress import Progress


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out: Path, overwrite: bool = False) -> None:
    """Refuse an ``--out`` that is a file, cannot be created, or holds files (without overwrite)."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise OutputDirError(f"--out: {out} is a file, not a folder; give the path of a new folder (e.g. {out}.run)")
    if out.is_dir():
        if any(out.iterdir()) and not is_failed_start(out):
            if not overwrite:
                raise OutputDirError(
                    f"--out: {out} already holds files; choose a new folder or pass --overwrite to replace that run"
                )
            if not (out / "config.toml").is_file():
                raise OutputDirError(f"--out: {out} is not empty and does not look like a privlora run; refusing to delete it")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputDirError(f"--out: cannot write into {out} (permission denied); choose a folder you can write to")
        return
    anchor = _nearest_existing(out)
    if not anchor.is_dir():
        raise OutputDirError(f"--out: cannot create {out}: {anchor} is a file, not a folder; choose a path under a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out: cannot create {out}: no permission to write in {anchor}; choose a folder you can write to")


FAILED_START_FILES = {"config.toml", "ledger.jsonl", "metrics.jsonl", "checkpoint", "model.json"}


def is_failed_start(out: Path) -> bool:
    """True if ``out`` holds only what a start that never finished round 0 leaves: a config,
    no checkpoint, no metrics, and a ledger with no charge (nothing trained, nothing spent)."""
    out = Path(out)
    if not (out / "config.toml").is_file():
        return False
    names = {p.name for p in out.iterdir()}
    if not names <= FAILED_START_FILES:
        return False
    ckpt = out / "checkpoint"
    if ckpt.exists() and (not ckpt.is_dir() or any(ckpt.iterdir())):
        return False
    for name, allowed in (("metrics.jsonl", 0), ("ledger.jsonl", 1)):  # the ledger's header alone
        p = out / name
        if p.exists():
            try:
                lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
            except (OSError, UnicodeDecodeError):
                return False
            if len(lines) > allowed:
                return False
    return True


def check_resume_folder(out: Path) -> None:
    """The files ``--resume`` needs, each named with what to do when it is missing."""
    out = Path(out)
    if not out.is_dir():
        raise RunFolderError(f"--resume: {out} is not a folder; give the --out folder of an interrupted run")
    if not (out / "config.toml").is_file():
        raise RunFolderError(f"--resume: {out} holds no config.toml; is it a privlora run folder (the --out of privlora run)?")
    if not (out / "checkpoint" / "state.json").is_file():
        if is_failed_start(out):
            raise RunFolderError(
                f"--resume: {out} holds a start that never finished round 0 (nothing was trained or charged), so there "
                f"is nothing to resume; start it with `privlora run {out / 'config.toml'} --out {out}`"
            )
        raise RunFolderError(
            f"--resume: {out / 'checkpoint' / 'state.json'} is missing although the run has finished rounds; restore "
            f"{out / 'checkpoint'} from a backup, or start over in a new folder (`privlora run {out / 'config.toml'} "
            f"--out NEW_DIR`), which spends the clients' privacy budgets again"
        )
    metrics = out / "metrics.jsonl"
    first = None
    if metrics.is_file():
        text = metrics.read_text(encoding="utf-8", errors="replace")
        first = next((ln for ln in text.splitlines() if ln.strip()), None)
    if first is None:
        raise RunFolderError(
            f"--resume: {metrics} is {'empty' if metrics.is_file() else 'missing'}; the checkpoint and the ledger are "
            "intact, but the per-round record the report is made from is gone: restore metrics.jsonl from a backup "
            f"and resume again (no file in {out} was changed)"
        )
    try:
        json.loads(first)
    except ValueError:
        raise RunFolderError(
            f"--resume: the first line of {metrics} (round 0) is not valid JSON; restore metrics.jsonl from a backup "
            f"and resume again (no file in {out} was changed)"
        ) from None


def _budget_field(cfg: ExperimentConfig, client: int) -> str:
    p = cfg.privacy
    if p.budgets:
        return f"privacy.budgets[{client}] = {p.budgets[client]:g}"
    if p.budget_epsilon:
        return f"privacy.budget_epsilon = {p.budget_epsilon:g}"
    return f"privacy.target_epsilon = {p.target_epsilon:g} (the budget, as privacy.budget_epsilon is 0)"


def check_budgets(cfg: ExperimentConfig, client_sizes: list[int], reporter: Progress | None = None) -> None:
    """Calibrate every client's noise and refuse the run if any client's budget is below the
    cost of one round (that client could never train). ``client_sizes[k]`` is client k's number
    of training records; this needs neither the model nor tokenized data, so it runs right after
    the data is partitioned."""
    empty = [k for k, n in enumerate(client_sizes) if n == 0]
    if empty:
        raise PreflightError(
            f"data.num_clients: the {cfg.data.partition} partition leaves client {empty[0]} with no training "
            f"examples ({len(empty)} of {len(client_sizes)} clients); lower data.num_clients or use more data"
        )
    if not cfg.privacy.enabled:
        return
    from accounting import Admission
    from privlora.core.accountants import get_accountant
    from privlora.federation.client import planned_mechanism

    p = cfg.privacy
    reporter = reporter or Progress(False)
    calibrating = p.noise_multiplier == 0
    name = "calibrating noise" if calibrating else "checking budgets"
    planned = {}
    with reporter.stage(f"{name} for {len(client_sizes)} clients ({p.accountant})", total=len(client_sizes)) as st:
        for k, n in enumerate(client_sizes):
            planned[k] = planned_mechanism(cfg, n)  # the same release Client.planned_mechanism charges
            st.advance()
    acc = get_accountant(p.accountant)
    admission = Admission(acc, p.delta, {k: cfg.client_budget(k) for k in planned})
    refused = [d for d in (admission.decide(k, m) for k, m in sorted(planned.items())) if not d.admitted]
    if not refused:
        return
    cost = {d.client: acc.epsilon([planned[d.client]], p.delta) for d in refused}
    worst = max(refused, key=lambda d: (cost[d.client] - d.budget, -d.client))
    m = planned[worst.client]
    others = len(refused) - 1
    more = f"; {others} other client{'s' if others != 1 else ''} cannot train either" if others else ""
    if calibrating:
        sigma = (f"sigma {m.noise_multiplier:.4g}, calibrated for privacy.target_epsilon = {p.target_epsilon:g} over "
                 f"{cfg.calibration_rounds} rounds")
        noise = "or add noise per round (lower privacy.target_epsilon, which sigma is calibrated to, or set privacy.noise_multiplier)"
    else:
        sigma = f"sigma {m.noise_multiplier:g}"
        noise = "or raise privacy.noise_multiplier"
    raise PreflightError(
        f"{_budget_field(cfg, worst.client)} but one round costs epsilon {cost[worst.client]:.2f} for client "
        f"{worst.client} ({sigma}, q {m.sample_rate:.4g}, {m.steps} steps, delta {p.delta:g}, {p.accountant}){more}; "
        "no client may train past its budget, so the run would only save an untrained adapter: raise the budget, "
        f"lower training.local_steps, {noise}"
    )


PAPER_STRATEGIES = {"flora": "FLoRA (Wang et al. 2024)", "hetlora": "HetLoRA (Cho et al. 2024)"}


def momentum_warning(cfg: ExperimentConfig) -> str | None:
    """A warning when server momentum is set on top of a strategy whose paper aggregates without it."""
    f = cfg.federation
    if f.strategy in PAPER_STRATEGIES and (f.server_momentum > 0 or f.server_lr != 1.0):
        return (
            f"federation.server_momentum = {f.server_momentum:g} (server_lr {f.server_lr:g}) is applied after "
            f"{PAPER_STRATEGIES[f.strategy]}'s aggregate, so the global update is not the paper's; set "
            "server_momentum = 0 and server_lr = 1 for the paper's method"
        )
    return None
