"""Command line: ``privlora run [CONFIG] --out DIR`` (or ``--resume DIR``), ``privlora report DIR``,
``privlora verify DIR``, ``privlora predict DIR TEXT...``, ``privlora audit [CONFIG] --out DIR``,
``privlora sweep [CONFIG] --epsilons ... --seeds ... --out DIR``, ``privlora keys node|registry|simulation`` and
``privlora node serve|status|reset-ledger``. ``run``, ``audit``
and ``sweep`` take ``--set KEY=VALUE`` overrides (`privlora.core.overrides`).

Every failure a user can cause prints one line, ``privlora: error: <problem>; <fix>``, and exits
non-zero (2 for bad input, 130 for Ctrl-C), without a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from privlora.core.checkpoint import CheckpointError
from privlora.core.config import ConfigError, load_config
from privlora.core.errors import RunFolderError, UserError, continue_hint, explain_os_error, interrupted_message
from privlora.core.overrides import load_with_overrides
from privlora.core.progress import quiet_library_warnings


def _checkpoint_next_step(exc: CheckpointError, out: Path) -> str:
    """A damaged or foreign checkpoint: what it is, and the two ways on."""
    msg = str(exc)
    if "different config.toml" in msg:
        return msg
    if "ledger" in msg and "altered" in msg:
        return (
            f"{msg}; restore {out / 'ledger.jsonl'} from a backup and resume again; `privlora verify {out}` shows "
            "where the chain breaks"
        )
    return (
        f"{msg}; the run cannot continue from it: restore {out / 'checkpoint'} from a backup and resume again, or "
        f"start over in a new folder (`privlora run {out / 'config.toml'} --out NEW_DIR`), which spends the "
        f"clients' privacy budgets again ({out / 'ledger.jsonl'} records what this run already spent)"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.set:
            raise ConfigError(
                f"--set cannot be used with --resume: {args.resume} continues with its own config.toml (its checkpoint and "
                "ledger belong to that config); drop --set, or start a new run with CONFIG --set KEY=VALUE --out NEW_DIR"
            )
        if args.config or args.out or args.overwrite:
            raise ConfigError("--resume DIR continues the run in DIR with its own config.toml; give no CONFIG, --out or --overwrite")
        cfg, out = None, Path(args.resume)
        if (done := finished_run(out)) is not None:
            print(f"privlora: {out} is already finished ({done}); there is nothing to resume. Its results are in "
                  f"{out / 'report.md'}; to train again, start a new run: `privlora run {out / 'config.toml'} --out NEW_DIR`",
                  file=sys.stderr)
            return 0
        print(f"privlora: resuming {out}", file=sys.stderr)
    else:
        cfg = load_with_overrides(args.config, args.set)
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"privlora: running {'the embedded default' if args.config is None else args.config} -> {out}", file=sys.stderr)
    from privlora.transports.inprocess import run_experiment  # torch and friends: seconds, so after the first line

    try:
        final = run_experiment(cfg, out, progress=not args.quiet, overwrite=args.overwrite, resume=bool(args.resume))
    except CheckpointError as exc:
        raise CheckpointError(_checkpoint_next_step(exc, out) if args.resume else str(exc)) from exc
    except Terminated:
        print(f"privlora: terminated (SIGTERM); {continue_hint(out)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"privlora: {interrupted_message(out)}", file=sys.stderr)
        return 130
    except OSError as exc:
        raise UserError(explain_os_error(exc, out)) from exc
    if cfg is None:
        cfg = load_config(out / "config.toml")
    summary = {
        "out": str(out),
        "test_accuracy": final["test_accuracy"],
        **({"test_loss": final["test_loss"], "test_perplexity": final["test_perplexity"]} if "test_perplexity" in final else {}),
        "epsilon_max": final.get("epsilon_max"),
        "delta": cfg.privacy.delta if cfg.privacy.enabled else None,
        "seconds": round(final["total_seconds"], 1),
    }
    if final.get("stopped"):
        summary["stopped"] = final["stopped"]
    print(json.dumps(summary))
    return 0


def finished_run(out: Path) -> str | None:
    """How a run folder that has nothing left to run ended ("all 6 rounds", "stopped after round
    2: ..."), read from its metrics.jsonl and report; None when it is not finished (or not a
    run folder: --resume then says what is wrong with it)."""
    metrics, cfg_path = out / "metrics.jsonl", out / "config.toml"
    if not (metrics.is_file() and cfg_path.is_file() and (out / "report.md").is_file()):
        return None
    try:
        rows = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
        rounds = load_config(cfg_path).federation.rounds
    except (ValueError, UserError, OSError):
        return None
    if not rows:
        return None
    last = rows[-1]
    if last.get("stopped") and not last.get("aborted"):
        return f"stopped in round {last['round']}: {last['stopped']}"
    if last.get("round") == rounds and not last.get("stopped"):
        return f"all {rounds} round{'s' if rounds != 1 else ''}"
    return None


def _run_folder(path: str, command: str) -> Path:
    """A run folder for report/verify: it exists and holds a config.toml."""
    run = Path(path)
    if not run.exists():
        raise RunFolderError(f"{command}: {run} does not exist; give the --out folder of a privlora run")
    if not run.is_dir():
        raise RunFolderError(f"{command}: {run} is a file; give the --out folder of a privlora run, not a file in it")
    if not (run / "config.toml").is_file():
        raise RunFolderError(f"{command}: {run} holds no config.toml; is it a privlora run folder (the --out of privlora run)?")
    return run


def _cmd_report(args: argparse.Namespace) -> int:
    from privlora.reporting.report import write_report

    run = _run_folder(args.dir, "report")
    try:
        path = write_report(run)
    except OSError as exc:
        raise UserError(explain_os_error(exc)) from exc
    print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from accounting import verify_run

    run = _run_folder(args.dir, "verify")
    try:  # report.md's secure-aggregation sentence is privlora's wording of config.toml: verify re-renders it too
        from privlora.reporting.report import secagg_statement

        context = {"secagg": secagg_statement(load_config(run / "config.toml"))}
    except (UserError, OSError, ValueError):
        context = None  # verify_run says what is wrong with the folder; the sentence is then taken as written
    res = verify_run(run, statement_context=context)
    if res.client_level and res.ok:
        server = max(res.client_level["server"].values(), default=0.0)
        model = max(res.client_level["model_only"].values(), default=0.0)
        print(f"OK: client-level (privacy.unit = 'client'): client_level.jsonl's hash chain is intact and its recomputed "
              f"epsilons match every metrics line: largest ε {server:.4f} against the server, {model:.4f} against whoever "
              "sees only the released model (no sampling amplification claimed)")
    if res.not_private and res.ok and res.client_level:
        print("record level: privacy.enabled = false: no record-level DP-SGD, no record-level ledger")
        return 0
    if res.not_private and res.ok:
        print(
            f"NOTHING TO VERIFY: {args.dir} is a non-private run (privacy.enabled = false in its config.toml): it makes "
            "no privacy claim and has no ledger; only DP runs have an epsilon to recompute"
        )
        return 0
    for problem in res.problems:
        print(f"FAIL: {problem}")
    for item in res.unchecked:
        print(f"NOT CHECKED: {item}")
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
            f"{res.checked_anchors} anchors match, no budget is exceeded, and every privacy number of report.json "
            f"(largest ε {eps:.4f}), "
            + ("report.md's privacy statement (re-rendered from the ledger, word for word) and every other ε in it, and "
               if res.report_md == "checked" else "and ")
            + "every ε per round in metrics.jsonl match the ε recomputed from the ledger"
            + (" (but for those NOT CHECKED above)" if res.unchecked else "")
            + ("; this folder has no report.md, so no privacy statement was checked" if res.report_md == "absent" else "")
        )
        return 0
    print(f"privlora verify: {len(res.problems)} problem(s) in {args.dir}", file=sys.stderr)
    return 1


def _cmd_keys(args: argparse.Namespace) -> int:
    from privlora.federation import keys

    if args.keys_command == "node":
        key, pub = keys.generate_node_key(Path(args.out), args.client_id)
        print(f"privlora: wrote this node's private key {key} (mode 0600: it never leaves this node; give it as the node "
              f"config's signing-key) and its public key {pub} (send it to the coordinator for the registry)", file=sys.stderr)
        print(pub)
        return 0
    if args.keys_command == "registry":
        registry = keys.build_registry(Path(args.out), args.pubfiles, args.id)
        print(f"privlora: wrote {registry} from {len(args.pubfiles)} public keys (public: set secagg.key_registry to it "
              f"and give it to every party)", file=sys.stderr)
        print(registry)
        return 0
    registry = keys.generate_simulation_keys(args.clients, Path(args.out))
    print(f"privlora: SIMULATION ONLY: wrote {registry} and all {args.clients} private keys client-K.key beside it, for "
          f"one process playing every client; a deployment uses `privlora keys node` on each node and "
          f"`privlora keys registry`", file=sys.stderr)
    print(registry)
    return 0


def _cmd_node_serve(args: argparse.Namespace) -> int:
    from privlora.federation.deploy import node_settings
    from privlora.federation.node_process import read_node_config, serve

    return serve(node_settings(read_node_config(args.node_config)), preload=not args.lazy)


def _cmd_node(args: argparse.Namespace) -> int:
    from privlora.federation.node_ledger import NodeLedger

    folder = Path(args.node_dir)
    if not folder.is_dir():
        raise ConfigError(f"--node-dir: {folder} is not a folder (the node config's node-dir)")
    ledger = NodeLedger(folder)
    if args.node_command == "reset-ledger":
        record = ledger.reset(args.reason)
        print(f"privlora: reset the lifetime ledger of node {folder}: kept the old files ({', '.join(record['kept']) or 'none left'}), "
              f"carried {sum(record['carried'].values())} known charges into the new ledger(s); recorded in "
              f"{folder / 'resets.jsonl'}", file=sys.stderr)
        print(json.dumps(record, indent=1, sort_keys=True))
        return 0
    status = ledger.status()
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
    else:
        print(f"node {status['node_id']} ({status['node_dir']})")
        for fp, d in status["data"].items():
            eps = d["lifetime_epsilon"]
            print(f"  data {fp[:16]}…: {d['charges']} charges over its lifetime, epsilon "
                  f"{'unknown' if eps is None else f'{eps:.4g}'} (delta {d['delta']}, {d['accountant']})"
                  + (f"; reset {d['reset']['time']}: {d['reset']['reason']}" if d.get("reset") else ""))
        for name, r in status["runs"].items():
            if "error" in r:
                print(f"  run {name}: {r['error']}")
            else:
                print(f"  run {name}: rounds {r['rounds']}, epsilon " + ", ".join(f"client {k} {v:.4g}" for k, v in r["epsilon"].items()))
        print("  integrity: intact" if status["intact"] else
              "  integrity: NOT INTACT (the node refuses to train until `privlora node reset-ledger --node-dir "
              f"{folder} --reason TEXT`):\n    " + "\n    ".join(status["problems"]))
    return 0 if status["intact"] else 1


def _cmd_predict(args: argparse.Namespace) -> int:
    from privlora.tasks.models import read_model_card
    from privlora.tasks.predict import format_prediction, load_run, read_texts

    texts = list(args.texts)
    if args.file:
        card = read_model_card(args.dir) if Path(args.dir, "model.json").is_file() else {}
        texts += read_texts(args.file, args.column or card.get("text_column", "text"))
    if not texts:
        raise UserError('predict: no text given; pass texts (privlora predict DIR "a text" ...) or --file texts.csv')
    task, model, tokenizer, names = load_run(args.dir)
    for p in task.predict(model, tokenizer, names, texts, batch_size=args.batch_size):
        print(format_prediction(p, as_json=args.json))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {value}")
    return value


def _cmd_audit(args: argparse.Namespace) -> int:
    from privlora.commands.audit import DEFAULT_CANARIES, DEFAULT_DESIGN, AuditError, default_auditor_dir, run_audit, verdict
    from privlora.core.errors import OutputDirError

    if args.resume:
        given = [name for name, val in (("CONFIG", args.config), ("--out", args.out), ("--overwrite", args.overwrite),
                                        ("--canaries", args.canaries), ("--confidence", args.confidence),
                                        ("--design", args.design), ("--seed", args.seed), ("--set", args.set)) if val not in (None, False, [])]
        if given:
            raise ConfigError(f"--resume DIR continues the audit in DIR with its own config and options; drop {', '.join(given)}")
        out, cfg = Path(args.resume), None
        print(f"privlora: resuming the audit in {out}", file=sys.stderr)
    else:
        if not args.out:
            raise ConfigError("audit: --out DIR is required (or --resume DIR to continue an interrupted audit)")
        out, cfg = Path(args.out), load_with_overrides(args.config, args.set)
        canaries = DEFAULT_CANARIES if args.canaries is None else args.canaries
        design = args.design or DEFAULT_DESIGN
        print(f"privlora: auditing {'the embedded default' if args.config is None else args.config} with {canaries} "
              f"{design} canaries -> {out}", file=sys.stderr)
    auditor_dir = Path(args.auditor_dir) if args.auditor_dir else default_auditor_dir(out)
    try:
        if args.resume:
            record = run_audit(None, out, progress=not args.quiet, resume=True, auditor_dir=auditor_dir)
        else:
            record = run_audit(cfg, out, canaries=canaries, confidence=0.95 if args.confidence is None else args.confidence,
                               design=design, seed=args.seed, progress=not args.quiet,
                               overwrite=args.overwrite, auditor_dir=auditor_dir)
    except (AuditError, OutputDirError) as exc:
        raise ConfigError(str(exc)) from exc
    except KeyboardInterrupt as exc:
        word = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        if (out / "checkpoint" / "state.json").is_file():
            extra = "" if args.auditor_dir is None else f" --auditor-dir {auditor_dir}"
            print(f"privlora: {word}; every finished round and the audit's state ({auditor_dir}, keep it from the "
                  f"server) are kept: continue with `privlora audit --resume {out}{extra}`", file=sys.stderr)
        else:
            print(f"privlora: {word} before any round finished: run the same command again", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    best = record["best"]
    print(json.dumps({"out": str(out), "epsilon_lower": round(record["epsilon_lower"], 4),
                      "epsilon_lower_fdp": round(record["fdp"]["epsilon_lower"], 4), "mu_lower": round(record["fdp"]["mu_lower"], 4),
                      "epsilon_claimed": record["epsilon_claimed"],
                      "confidence": record["confidence"], "score": best["score"], "m": record["canaries"], "r": best["r"],
                      "v": best["v"], "seconds": round(record["seconds"], 1)}))
    if record["violation"]:
        print(f"privlora audit: {verdict(record)} (details in {out / 'audit.json'})", file=sys.stderr)
        return 1
    print(f"privlora audit: {verdict(record)}", file=sys.stderr)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from privlora.commands.sweep import make_grid, resume_grid, run_sweep, write_tables

    grid_options = [name for name, value in (("CONFIG", args.config), ("--grid", args.grid), ("--epsilons", args.epsilons),
                                             ("--seeds", args.seeds), ("--strategies", args.strategies),
                                             ("--set", args.set), ("--out", args.out)) if value]
    if args.table:
        if grid_options or args.resume or args.workers:
            raise ConfigError(f"--table DIR rebuilds the table and plot from DIR's run folders and runs nothing; give no "
                              f"{', '.join(grid_options + (['--resume'] if args.resume else []) + (['--workers'] if args.workers else []))}")
        rows = write_tables(Path(args.table))
        print(f"privlora: sweep: rebuilt {Path(args.table) / 'table.md'}, table.csv, points.csv and sweep.png from "
              f"{sum(r['runs'] for r in rows)} finished runs", file=sys.stderr)
        print(Path(args.table) / "table.md")
        return 0
    if args.resume:
        if grid_options:
            raise ConfigError(f"--resume DIR continues DIR's sweep with the grid recorded in its sweep.json; give no "
                              f"{', '.join(grid_options)} (only --workers may change)")
        out = Path(args.resume)
        grid = resume_grid(out, args.workers)
    else:
        grid, grid_out = make_grid(args.config, args.epsilons, args.seeds, args.strategies, args.set, args.workers, args.grid)
        if not (args.out or grid_out):
            raise ConfigError("sweep: no output folder; give --out DIR (or out = \"DIR\" in the grid file's [sweep] table)")
        out = Path(args.out or grid_out)
    try:
        result = run_sweep(grid, out, command=["privlora", *getattr(args, "argv", [])], progress=not args.quiet)
    except KeyboardInterrupt as exc:
        print(f"privlora: sweep {'terminated (SIGTERM)' if isinstance(exc, Terminated) else 'interrupted'}; every finished point in {out / 'runs'} is kept and {out / 'sweep.json'} "
              f"records each point's status: continue with `privlora sweep --resume {out}`", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    print(json.dumps({"out": str(out), "points": result["total"], "done": result["done"], "failed": result["failed"],
                      "aborted": result["aborted"], "table": str(out / "table.md"), "plot": str(out / "sweep.png")}))
    if result["failed"] or result["aborted"]:
        bad = [r for r in result["points"].values() if r["status"] in ("failed", "aborted")]
        print(f"privlora: sweep: {len(bad)} of {result['total']} points did not finish (first: {bad[0]['name']}: "
              f"{bad[0]['error']}); the table holds the others; run `privlora sweep --resume {out}` to try them again",
              file=sys.stderr)
        return 1
    return 0


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, validated like the file, e.g. --set federation.rounds=3 "
                        "(a TOML value; repeatable; recorded in the run's config.toml)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    parser = argparse.ArgumentParser(prog="privlora", description="Federated LoRA fine-tuning with differential privacy.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", parents=[common], help="run a federated experiment (the embedded default without CONFIG)")
    run.add_argument("config", nargs="?", default=None, help="TOML config; omit for the embedded default")
    run.add_argument("--out", default=None, help="output folder (default runs/NAME-TIMESTAMP)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    run.add_argument("--quiet", action="store_true", help="no progress stages or bars")
    run.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted run from its checkpoint")
    _add_set(run)
    run.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", parents=[common], help="re-render report.md from a run folder")
    rep.add_argument("dir")
    rep.set_defaults(func=_cmd_report)
    ver = sub.add_parser("verify", parents=[common], help="check a run's ledger hash chain and recompute every epsilon from it")
    ver.add_argument("dir")
    ver.add_argument("--client-ledger", action="append", metavar="PATH",
                     help="also check a client's own ledger.jsonl (a deployment node's) against this run; repeatable")
    ver.set_defaults(func=_cmd_verify)
    keys = sub.add_parser("keys", parents=[common], help="pinned Ed25519 signing keys for secure aggregation: each node "
                                                          "makes its own (keys node), the registry holds public keys only (keys registry)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("node", parents=[common], help="on a node: its own private key (node.key, mode 0600) and public key (node.pub)")
    kn.add_argument("--out", required=True, help="folder for node.key and node.pub")
    kn.add_argument("--client-id", type=int, default=None, help="this node's client id, recorded in node.pub")
    kn.set_defaults(func=_cmd_keys)
    kr = ksub.add_parser("registry", parents=[common], help="build registry.json (secagg.key_registry) from the nodes' public keys")
    kr.add_argument("--out", required=True, help="the registry file to write (e.g. registry.json)")
    kr.add_argument("--id", type=int, action="append", default=None, metavar="K",
                    help="client id of each PUBFILE, in order (default: the id in each file)")
    kr.add_argument("pubfiles", nargs="+", metavar="PUBFILE", help="each node's node.pub")
    kr.set_defaults(func=_cmd_keys)
    ks = ksub.add_parser("simulation", parents=[common], help="SIMULATION ONLY (one process plays every client): a registry "
                                                            "and every client's private key in one folder")
    ks.add_argument("--clients", type=int, required=True, help="number of clients (ids 0..N-1)")
    ks.add_argument("--out", required=True, help="folder for registry.json and client-K.key")
    ks.set_defaults(func=_cmd_keys)
    node = sub.add_parser("node", parents=[common], help="a deployment node: its long-lived process, its lifetime privacy ledger")
    nsub = node.add_subparsers(dest="node_command", required=True)
    nv = nsub.add_parser("serve", parents=[common], help="run this machine's node process (data, ledger, key, model loaded once) "
                                                       "on a Unix socket in its folder; Flower's ClientApp relays to it")
    nv.add_argument("--node-config", required=True, metavar="FILE.toml",
                    help="the node config: a TOML file, or Flower's form 'config=\"fed.toml\" client-id=0 node-dir=\"DIR\"' "
                         "(keys: config, client-id, data, node-dir, signing-key, noise, node-socket)")
    nv.add_argument("--lazy", action="store_true", help="load the data and model on the first training message, not before listening")
    nv.set_defaults(func=_cmd_node_serve)
    ns = nsub.add_parser("status", parents=[common], help="identity, data fingerprints, lifetime and per-run spend, integrity")
    ns.add_argument("--node-dir", required=True, help="the node's folder (its node config's node-dir)")
    ns.add_argument("--json", action="store_true", help="print the status as JSON")
    ns.set_defaults(func=_cmd_node)
    nr = nsub.add_parser("reset-ledger", parents=[common], help="after a lost or altered lifetime ledger: start a new one "
                                                              "(keeps the old files, carries every charge still known, records the reset)")
    nr.add_argument("--node-dir", required=True, help="the node's folder (its node config's node-dir)")
    nr.add_argument("--reason", required=True, help="why (recorded with the reset)")
    nr.set_defaults(func=_cmd_node)
    pre = sub.add_parser("predict", parents=[common], help="label texts with a run's trained model")
    pre.add_argument("dir", help="a finished run's folder (its --out)")
    pre.add_argument("texts", nargs="*", help="texts to label")
    pre.add_argument("--file", default=None, help="a csv/tsv/jsonl/json/txt file of texts")
    pre.add_argument("--column", default=None, help="the text column in --file (default: the run's data.text_column)")
    pre.add_argument("--json", action="store_true", help="one JSON object per text, with every label's probability")
    pre.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward pass")
    pre.set_defaults(func=_cmd_predict)
    aud = sub.add_parser("audit", parents=[common], help="run a config with canaries and put an empirical lower bound on epsilon beside the claim")
    aud.add_argument("config", nargs="?", default=None, help="TOML config; omit for the embedded default")
    aud.add_argument("--out", default=None, help="output folder (a run folder plus audit.json)")
    aud.add_argument("--resume", metavar="DIR", default=None, help="continue an interrupted audit from its run's checkpoint and the auditor's state")
    aud.add_argument("--auditor-dir", default=None,
                     help="where the secret and the scores so far wait until training ends (default: DIR.auditor beside the run folder; keep it from the server)")
    aud.add_argument("--canaries", type=int, default=None, help="number of canaries m (default 2000)")
    aud.add_argument("--confidence", type=float, default=None, help="confidence of the lower bound (default 0.95)")
    aud.add_argument("--design", choices=("tokens", "mislabelled"), default=None, help="canary design (default mislabelled: the highest bound measured on the default config; tokens needs no training data to replace)")
    aud.add_argument("--seed", type=int, default=None, help="secret seed of the canaries (default: fresh; written to audit.json after training)")
    aud.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    aud.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_set(aud)
    aud.set_defaults(func=_cmd_audit)
    sw = sub.add_parser("sweep", parents=[common], help="run a grid of strategies x epsilons x seeds, one run folder each, "
                                                        "and write a privacy-utility table and plot")
    sw.add_argument("config", nargs="?", default=None, help="base TOML config; omit for the embedded default")
    sw.add_argument("--grid", default=None, metavar="GRID.toml", help="a TOML file with a [sweep] table (config, epsilons, "
                                                                     "seeds, strategies, set, workers, out); options given here win")
    sw.add_argument("--epsilons", nargs="+", default=None, metavar="EPS", help="target epsilons per client; inf = no DP")
    sw.add_argument("--seeds", nargs="+", default=None, metavar="SEED", help="seeds (each point's config seed)")
    sw.add_argument("--strategies", nargs="+", default=None, metavar="STRATEGY",
                    help="federation.strategy values (default: the config's)")
    sw.add_argument("--workers", type=_positive_int, default=None, help="points run at once, each in its own process (default 1)")
    sw.add_argument("--out", default=None, help="the sweep's folder (runs/, sweep.json, table.md, table.csv, sweep.png)")
    sw.add_argument("--resume", metavar="DIR", default=None, help="continue the sweep in DIR with the grid it recorded")
    sw.add_argument("--table", metavar="DIR", default=None, help="rebuild DIR's table and plot from its run folders; runs nothing")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_set(sw)
    sw.set_defaults(func=_cmd_sweep)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; ``predict DIR --json "a text"`` takes texts after its options too (argparse
    alone stops at the first option after DIR)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) == "predict" and not any(x.startswith("-") for x in extra):
            args.texts = list(args.texts) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (`kill`, a scheduler ending the job): unwinds as Ctrl-C does (every
    handler of KeyboardInterrupt keeps what it keeps for Ctrl-C), then exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _parse(argv)
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        return _main(args, argv)
    except Terminated:
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        hint = continue_hint(Path(out)) if out else "run the same command again"
        print(f"privlora: terminated (SIGTERM); {hint}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    args.argv = list(sys.argv[1:] if argv is None else argv)
    debug = getattr(args, "debug", False)
    quiet_library_warnings()
    try:
        return args.func(args)
    except UserError as exc:  # the one family of errors a user can cause (privlora.core.errors)
        if debug:
            raise
        print(f"privlora: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if debug:
            raise
        print(f"privlora: error: {explain_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("privlora: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's doing: one line, and how to get the traceback
        if debug:
            raise
        print(
            f"privlora: internal error: {type(exc).__name__}: {exc}; this is a bug in privlora, not in your input: "
            f"run the same command with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
