"""Command line: ``privlora run [CONFIG] --out DIR`` (or ``--resume DIR``), ``privlora report DIR``
and ``privlora verify DIR``."""

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
    client_problems = 0
    for path in args.client_ledger or []:
        from accounting import verify_client_ledger

        cl = verify_client_ledger(Path(args.dir), Path(path))
        for problem in cl.problems:
            print(f"FAIL: client ledger {path}: {problem}")
        client_problems += len(cl.problems)
        if cl.ok:
            extra = f"; the server also charged it for rounds {cl.unclaimed} it never charged itself (over-counted, conservative)" if cl.unclaimed else ""
            print(f"OK: client {cl.client}'s own ledger ({cl.charges} charges, ε = {cl.epsilon:.4f}) matches the server's "
                  f"ledger charge for charge, and report.json's ε = {cl.reported:.4f} covers it{extra}")
    if res.ok and client_problems:
        print(f"privlora verify: {client_problems} problem(s) in the client ledgers", file=sys.stderr)
        return 1
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


def _cmd_keys(args: argparse.Namespace) -> int:
    from .keys import generate_keys

    registry = generate_keys(args.clients, Path(args.out))
    print(f"privlora: wrote {registry} (public: set secagg.key_registry to it) and {args.clients} private keys "
          f"client-K.key beside it (each for its own client's node config only)", file=sys.stderr)
    print(registry)
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
    ver.add_argument("--client-ledger", action="append", metavar="PATH",
                     help="also check a client's own ledger.jsonl (a deployment node's) against this run; repeatable")
    ver.set_defaults(func=_cmd_verify)
    keys = sub.add_parser("keys", help="generate pinned Ed25519 signing keys for secure aggregation (a registry and one private key per client)")
    keys.add_argument("--clients", type=int, required=True, help="number of clients (ids 0..N-1)")
    keys.add_argument("--out", required=True, help="folder for registry.json and client-K.key")
    keys.set_defaults(func=_cmd_keys)
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
