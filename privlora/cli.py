"""Command line: ``privlora run [CONFIG] --out DIR`` and ``privlora report DIR``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .config import ConfigError, load_config
from .data import DataError
from .messages import MessageError
from .models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, MessageError)


def _cmd_run(args: argparse.Namespace) -> int:
    from .simulation import OutputDirError, run_experiment

    cfg = load_config(args.config)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"privlora: running {'the embedded default' if args.config is None else args.config} -> {out}", file=sys.stderr)
    try:
        final = run_experiment(cfg, out, progress=not args.quiet, overwrite=args.overwrite)
    except OutputDirError as exc:
        raise ConfigError(str(exc)) from exc
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="privlora", description="Federated LoRA fine-tuning with differential privacy.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (the embedded default without CONFIG)")
    run.add_argument("config", nargs="?", default=None, help="TOML config; omit for the embedded default")
    run.add_argument("--out", default=None, help="output folder (default runs/NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="re-render report.md from a run folder")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)
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
        print("privlora: interrupted; metrics.jsonl holds every finished round", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
