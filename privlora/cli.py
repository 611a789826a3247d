"""Command line: ``privlora run [CONFIG] --out DIR`` (or ``--resume DIR``), ``privlora report DIR``,
``privlora verify DIR`` and ``privlora audit [CONFIG] --out DIR``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from accounting import LedgerError

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .messages import MessageError
from .models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, MessageError, CheckpointError, LedgerError)


def _cmd_run(args: argparse.Namespace) -> int:
    from .simulation import OutputDirError, run_experiment

    if args.resume:
        if args.config or args.out or args.overwrite:
            raise ConfigError("--resume DIR continues the run in DIR with its own config.toml; give no CONFIG, --out or --overwrite")
        cfg, out = None, Path(args.resume)
        print(f"privlora: resuming {out}", file=sys.stderr)
    else:
        cfg = load_config(args.config)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"privlora: running {'the embedded default' if args.config is None else args.config} -> {out}", file=sys.stderr)
    try:
        final = run_experiment(cfg, out, progress=not args.quiet, overwrite=args.overwrite, resume=bool(args.resume))
    except OutputDirError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg is None:
        cfg = load_config(out / "config.toml")
    summary = {
        "out": str(out),
        "test_accuracy": final["test_accuracy"],
        "epsilon_max": final.get("epsilon_max"),
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "seconds": round(final["total_seconds"], 1),
    }
    print(json.dumps(summary))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(Path(args.dir))
    print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from accounting import verify_run

    from .privacy import get_accountant  # noqa: F401  (registers the "prv" accountant)

    res = verify_run(Path(args.dir))
    for problem in res.problems:
        print(f"FAIL: {problem}")
    if res.ok:
        eps = max(res.epsilons.values(), default=0.0)
        print(
            f"OK: {args.dir}: ledger of {res.entries} charges, hash chain intact (head {res.head[:16]}…), "
            f"{res.checked_anchors} anchors match, every ε recomputed from the ledger matches report.json "
            f"(largest {eps:.4f}) and no budget is exceeded"
        )
        return 0
    print(f"privlora verify: {len(res.problems)} problem(s) in {args.dir}", file=sys.stderr)
    return 1


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import AuditError, run_audit, verdict
    from .simulation import OutputDirError

    cfg = load_config(args.config)
    print(f"privlora: auditing {'the embedded default' if args.config is None else args.config} with {args.canaries} "
          f"{args.design} canaries -> {args.out}", file=sys.stderr)
    try:
        record = run_audit(cfg, Path(args.out), canaries=args.canaries, confidence=args.confidence, design=args.design,
                           seed=args.seed, progress=not args.quiet, overwrite=args.overwrite)
    except (AuditError, OutputDirError) as exc:
        raise ConfigError(str(exc)) from exc
    best = record["best"]
    print(json.dumps({"out": args.out, "epsilon_lower": round(record["epsilon_lower"], 4), "epsilon_claimed": record["epsilon_claimed"],
                      "confidence": record["confidence"], "score": best["score"], "m": record["canaries"], "r": best["r"],
                      "v": best["v"], "seconds": round(record["seconds"], 1)}))
    if record["violation"]:
        print(f"privlora audit: {verdict(record)} (details in {Path(args.out) / 'audit.json'})", file=sys.stderr)
        return 1
    print(f"privlora audit: {verdict(record)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privlora", description="Federated LoRA fine-tuning with differential privacy.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (the embedded default without CONFIG)")
    run.add_argument("config", nargs="?", default=None, help="TOML config; omit for the embedded default")
    run.add_argument("--out", default=None, help="output folder (default runs/NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted run from its checkpoint")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="re-render report.md from a run folder")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)
    ver = sub.add_parser("verify", help="check a run's ledger hash chain and recompute every epsilon from it")
    ver.add_argument("dir")
    ver.set_defaults(func=_cmd_verify)
    aud = sub.add_parser("audit", help="run a config with canaries and put an empirical lower bound on epsilon beside the claim")
    aud.add_argument("config", nargs="?", default=None, help="TOML config; omit for the embedded default")
    aud.add_argument("--out", required=True, help="output folder (a run folder plus audit.json)")
    aud.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    aud.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    aud.add_argument("--design", choices=("tokens", "mislabelled"), default="tokens", help="canary design (default tokens)")
    aud.add_argument("--seed", type=int, default=None, help="secret seed of the canaries (default: fresh; written to audit.json after training)")
    aud.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    aud.add_argument("--quiet", action="store_true", help="no progress bars")
    aud.set_defaults(func=_cmd_audit)
    return parser


def _quiet_library_warnings() -> None:
    """Hide known, harmless library chatter so that real warnings stand out."""
    warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")  # SECURITY.md states it
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"privlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privlora: interrupted; every finished round is checkpointed: continue with privlora run --resume DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
