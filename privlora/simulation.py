"""In-process simulation of a federation: one server, many clients, bytes between them.

`run_experiment(cfg, out_dir)` does a whole run and writes the output folder:

- ``config.toml``: the resolved config (reloadable with ``privlora run config.toml``);
- ``metrics.jsonl``: one JSON line per round (round 0 = the untrained model), flushed and
  fsynced as each round ends, so a crash loses at most the round in progress;
- ``adapter/``: the final global adapter in peft format (``adapter_config.json`` and
  ``adapter_model.safetensors``; `PeftModel.from_pretrained(base, "adapter")` loads it);
- ``ledger.jsonl`` (DP runs): the hash-chained privacy ledger (`accounting.ledger`), one charge
  per client per round it trained in, written before the client trains;
- ``checkpoint/``: the server's state after the last finished round (`privlora.checkpoint`);
  ``privlora run --resume DIR`` continues from it, reusing (never repeating) the charges of an
  unfinished round;
- ``report.json``, ``report.md`` and plots: see `privlora.report`.

Each round: sample clients -> admit those whose next release fits their budget -> charge the
ledger -> broadcast -> local DP-SGD -> check each client ran what it was charged for -> sum ->
strategy.finish -> evaluate -> metrics line -> checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from accounting import Admission, Ledger, delta_warning
from accounting.verify import LEDGER_FILE

from .client import Client
from .config import ExperimentConfig, config_to_toml, load_config
from .privacy import get_accountant
from .data import load_labelled_data, tokenize, train_test_split
from .models import load_classifier, load_tokenizer, quiet_hf
from .partition import partition
from .checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from .messages import Message
from .secure_sum import secure_sum
from .server import Server
from .strategies import cross_term_error, strategy_from_config


class OutputDirError(ValueError):
    """The output folder already holds a run, or cannot be written."""


@dataclass
class Federation:
    cfg: ExperimentConfig
    server: Server
    clients: list[Client]
    majority_baseline: float
    client_sizes: list[int]
    label_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def build_federation(cfg: ExperimentConfig, base_model=None, tokenizer=None) -> Federation:
    """Load data and model, partition, tokenize; return a server and its clients."""
    quiet_hf()
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_labelled_data(cfg.data)
    train, test = train_test_split(data, cfg.data.test_fraction, cfg.seed, cfg.data.max_examples)
    shards = partition(train, cfg.data.partition, cfg.data.num_clients, cfg.seed, cfg.data.dirichlet_alpha)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.path)
    if base_model is None:
        base_model = load_classifier(cfg.model.path, data.num_labels, cfg.seed)
    strategy = strategy_from_config(cfg)
    test_ds = tokenize(test, tokenizer, cfg.model.max_length)
    torch.manual_seed(cfg.seed)
    server = Server(cfg, strategy, base_model, test_ds)
    clients = []
    for k, idx in enumerate(shards):
        # each client gets its own strategy object: nothing is shared with the server
        client_strategy = strategy_from_config(cfg)
        clients.append(Client(k, cfg, base_model, tokenize(train.subset(idx), tokenizer, cfg.model.max_length), client_strategy))
    return Federation(
        cfg=cfg,
        server=server,
        clients=clients,
        majority_baseline=test.majority_fraction(),
        client_sizes=[len(s) for s in shards],
        label_names=data.label_names,
    )


def prepare_out_dir(out: Path, overwrite: bool = False) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"--out: {out} already holds files; choose a new folder or pass --overwrite to replace that run"
            )
        if not (out / "config.toml").is_file():
            raise OutputDirError(f"--out: {out} is not empty and does not look like a privlora run; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_save_adapter(model, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _bar(total: int, desc: str, position: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=position == 0, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def split_update(update: bytes) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the update message without its tensors, the tensors): the tensors go to secure aggregation."""
    msg = Message.from_bytes(update, "client_update")
    return Message("client_update", msg.header).to_bytes(), msg.tensors


def config_sha256(out: Path) -> str:
    return hashlib.sha256((out / "config.toml").read_bytes()).hexdigest()


def _server_tensors(server: Server) -> dict[str, np.ndarray]:
    tensors = {f"global/{k}": v for k, v in server.global_state.items()}
    if server.velocity is not None:
        tensors.update({f"velocity/{k}": v for k, v in server.velocity.items()})
    return tensors


def _restore_server(server: Server, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    glob = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
    vel = {k[len("velocity/"):]: v for k, v in tensors.items() if k.startswith("velocity/")}
    if set(glob) != set(server.global_state):
        raise CheckpointError("checkpoint: the saved adapter does not match this config's adapter layout")
    server.global_state = glob
    server.velocity = vel or None
    server.load_global_state(glob)
    server.client_ranks = {int(k): int(v) for k, v in state["client_ranks"].items()}
    server.rng.bit_generator.state = state["server_rng"]


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Keep the metrics of rounds <= last_round; set later lines (an unfinished round) aside."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep, extra = [], []
    for line in lines:
        try:
            rnd = json.loads(line)["round"]
        except (ValueError, KeyError, TypeError):
            extra.append(line)
            continue
        (keep if rnd <= last_round else extra).append(line)
    if extra:
        aside = path.with_name(f"metrics.jsonl.unfinished-{int(time.time())}")
        aside.write_text("".join(extra), encoding="utf-8")
        atomic_write(path, "".join(keep))


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    prepare: Callable[[Federation], None] | None = None,
) -> dict[str, Any]:
    """Run every round and write the output folder; returns the last metrics record.

    With ``resume``, continue the run in ``out_dir`` from its checkpoint (``cfg`` is then read
    from the folder's config.toml). ``stop_after`` ends the process after that many rounds as if
    it had been killed (no adapter, no report): used to test resuming. ``prepare`` is called
    with the federation right after it is built, before any noise is calibrated or any round
    runs (`privlora.audit` inserts its canaries into the clients' datasets there).
    """
    out = Path(out_dir)
    metrics_path = out / "metrics.jsonl"
    if resume:
        if not (out / "config.toml").is_file():
            raise OutputDirError(f"--resume: {out} holds no config.toml; is it a privlora run folder?")
        cfg = load_config(out / "config.toml")
    else:
        assert cfg is not None
        prepare_out_dir(out, overwrite)
        (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    chash = config_sha256(out)
    t_start = time.perf_counter()
    dp = cfg.privacy.enabled

    fed = build_federation(cfg)
    if prepare is not None:
        prepare(fed)
    server, clients = fed.server, fed.clients
    if cfg.secagg.enabled:
        server.strategy.check_secure_aggregation()
    sigmas = {c.client_id: (c.noise_multiplier if dp else 0.0) for c in clients}
    ledger: Ledger | None = None
    admission: Admission | None = None
    first_round = 1
    if dp:
        accountant = get_accountant(cfg.privacy.accountant)
        budgets = {k: cfg.client_budget(k) for k in range(len(clients))}
        admission = Admission(accountant, cfg.privacy.delta, budgets)
        for c in clients:
            w = delta_warning(cfg.privacy.delta, c.num_examples)
            if w:
                print(f"privlora: warning: client {c.client_id}: {w}", file=sys.stderr)
    if resume:
        state, tensors = load_checkpoint(out, chash)
        _restore_server(server, state, tensors)
        first_round = int(state["round"]) + 1
        if dp:
            ledger = Ledger.open(out / LEDGER_FILE)
            anchor = state.get("ledger", {})
            n = int(anchor.get("entries", -1))
            chain = [ledger.header["hash"]] + [c.hash for c in ledger.charges]
            if not (0 <= n < len(chain) and chain[n] == anchor.get("head")):
                raise CheckpointError(f"checkpoint: the ledger does not extend the one the checkpoint saw ({out / LEDGER_FILE} was altered)")
            # charges of the unfinished round stay spent; they are reused below, not repeated
            admission.load({c: [ch.mechanism for ch in ledger.charges if ch.client == c and ch.round < first_round]
                            for c in range(len(clients))})
        _truncate_metrics(metrics_path, first_round - 1)
        if first_round > cfg.federation.rounds or state.get("stopped"):
            print(f"privlora: {out} is already complete; nothing to resume", file=sys.stderr)
    else:
        if dp:
            ledger = Ledger.create(
                out / LEDGER_FILE, cfg.privacy.delta, cfg.privacy.accountant, budgets,
                run={"name": cfg.name, "config_sha256": chash, "seed": cfg.seed},
            )
        ev = server.evaluate()
        record: dict[str, Any] = {
            "round": 0,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            "majority_baseline": fed.majority_baseline,
            "clients": [],
            "epsilon": {str(k): 0.0 for k in range(len(clients))} if dp else {},
            "epsilon_max": 0.0 if dp else None,
            "noise_multiplier": {str(k): v for k, v in sigmas.items()},
            "client_sizes": fed.client_sizes,
            "client_ranks": list(cfg.client_ranks()),
            "seconds": time.perf_counter() - t_start,
        }
        if ledger is not None:
            record["ledger"] = {"entries": len(ledger), "head": ledger.head}
        _append_jsonl(metrics_path, record)
        save_checkpoint(out, 0, _server_tensors(server), _ckpt_meta(server, ledger, chash))

    record = _last_record(metrics_path)
    stopped = None
    rounds_bar = _bar(cfg.federation.rounds, "rounds", 0, progress)
    rounds_bar.update(first_round - 1)
    rnd = first_round
    while rnd <= cfg.federation.rounds:
        t_round = time.perf_counter()
        chosen = server.sample_clients()
        admitted, refused = list(chosen), {}
        if dp:
            planned = {c: clients[c].planned_mechanism() for c in chosen}
            pending = {c: ledger.charge_for(c, rnd) for c in chosen}
            fresh, decisions = admission.admit({c: m for c, m in planned.items() if pending[c] is None})
            refused = {str(d.client): d.reason for d in decisions if not d.admitted}
            admitted = sorted(fresh + [c for c in chosen if pending[c] is not None])
            for reason in refused.values():
                print(f"privlora: round {rnd}: not admitted: {reason}", file=sys.stderr)
            # a secure sum of two lets each client subtract its own input: never fewer than three
            fewest = max(cfg.federation.min_clients, 3 if cfg.secagg.enabled else 1)
            if len(admitted) < fewest:
                stopped = (
                    f"round {rnd}: only {len(admitted)} of the {len(chosen)} sampled clients fit their privacy budget, "
                    f"fewer than {fewest} (federation.min_clients = {cfg.federation.min_clients}"
                    f"{', and secure aggregation needs 3' if cfg.secagg.enabled else ''}); the run stops here"
                )
                print(f"privlora: {stopped}", file=sys.stderr)
                break
            # charge before any update leaves a client; a crash from here on never un-spends it
            for c in admitted:
                if pending[c] is None:
                    ledger.append(c, rnd, planned[c])
                elif pending[c].mechanism != planned[c]:
                    raise CheckpointError(f"ledger: client {c}'s charge for round {rnd} differs from what it would run now")
                admission.record(c, planned[c])
        contributions, reports, bytes_down, masked_inputs = [], [], 0, {}
        fedit_error = None
        for cid in admitted:
            instruction = server.instruction(rnd, cid)
            bytes_down += len(instruction)
            bar = _bar(cfg.training.local_steps, f"round {rnd} client {cid}", 1, progress)
            update = clients[cid].handle(instruction, progress=bar)
            bar.close()
            if cfg.secagg.enabled:
                # the client's side of the transport: its contribution goes into the masked sum,
                # and the server receives the header alone
                update, masked_inputs[cid] = split_update(update)
            report, tensors = server.read_update(update, rnd, set(admitted))
            if dp and report.mechanism != ledger.charge_for(cid, rnd).mechanism:
                raise RuntimeError(
                    f"client {cid} ran {report.mechanism} in round {rnd} but was charged for "
                    f"{ledger.charge_for(cid, rnd).mechanism}; refusing its update"
                )
            contributions.append(tensors)
            reports.append(report)
        secure = None
        if cfg.secagg.enabled:
            summed, secure = secure_sum(cfg, masked_inputs, rnd)
            if secure.clipped:
                print(f"privlora: round {rnd}: secure aggregation clipped {secure.clipped} of {secure.values} values "
                      "to secagg.value_bound x secagg.max_weight; raise the bounds", file=sys.stderr)
            server.aggregate_sum(summed)
            for r in reports:  # what each client really sent: every message of the protocol
                r.upload_bytes = int(secure.bytes_up.get(r.client_id, 0))
        else:
            if cfg.federation.strategy == "fedit":  # only the clear path sees single contributions
                fedit_error = cross_term_error(contributions, server.global_state)
            server.aggregate(contributions)
        ev = server.evaluate()
        eps = {str(k): admission.spent(k) for k in range(len(clients))} if dp else {}
        if dp:
            over = {k: e for k, e in eps.items() if e > cfg.client_budget(int(k)) + 1e-9}
            if over:
                raise RuntimeError(f"privacy invariant broken: clients {over} exceed their budgets; the ledger holds the evidence")
        record = {
            "round": rnd,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            "majority_baseline": fed.majority_baseline,
            "clients": admitted,
            "sampled": chosen,
            "refused": refused,
            # only non-private runs report a training loss (a DP client keeps its own)
            "train_loss": None if any(r.train_loss is None for r in reports) else float(np.nanmean([r.train_loss for r in reports])),
            "epsilon": eps,
            "epsilon_max": max(eps.values()) if eps else None,
            "per_client": [server.client_record(r) for r in reports],
            "client_ranks": [server.client_ranks[k] for k in range(len(clients))],
            "secagg": None if secure is None else secure.to_dict(),
            "bytes_up": int(sum(r.bytes_up for r in reports)),
            "bytes_down": int(bytes_down),
            "seconds": time.perf_counter() - t_round,
        }
        if fedit_error is not None:
            # ||FedIT's update - the mean of the clients' updates|| / ||the mean update||
            record["fedit_cross_term_error"] = fedit_error if np.isfinite(fedit_error) else None
        if ledger is not None:
            record["ledger"] = {"entries": len(ledger), "head": ledger.head}
        _append_jsonl(metrics_path, record)
        save_checkpoint(out, rnd, _server_tensors(server), _ckpt_meta(server, ledger, chash))
        rounds_bar.set_postfix(acc=f"{ev['accuracy']:.3f}", eps=f"{record['epsilon_max'] or 0:.2f}")
        rounds_bar.update(1)
        if stop_after is not None and rnd >= stop_after:
            rounds_bar.close()
            return record
        rnd += 1
    rounds_bar.close()
    if stopped:
        record = dict(record, stopped=stopped)
        stop = {"round": rnd, "stopped": stopped, "clients": [], "refused": refused,
                "test_accuracy": record["test_accuracy"], "test_loss": record["test_loss"],
                "majority_baseline": fed.majority_baseline, "epsilon": record.get("epsilon", {}),
                "epsilon_max": record.get("epsilon_max"), "seconds": 0.0}
        if ledger is not None:
            stop["ledger"] = {"entries": len(ledger), "head": ledger.head}
        _append_jsonl(metrics_path, stop)
        save_checkpoint(out, rnd - 1, _server_tensors(server), {**_ckpt_meta(server, ledger, chash), "stopped": stopped})

    _atomic_save_adapter(server.export_model(), out / "adapter")
    from .report import write_report

    write_report(out)
    record["total_seconds"] = time.perf_counter() - t_start
    return record


def _ckpt_meta(server: Server, ledger: Ledger | None, chash: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "server_rng": server.rng.bit_generator.state,
        "config_sha256": chash,
        "client_ranks": {str(k): v for k, v in server.client_ranks.items()},
    }
    if ledger is not None:
        meta["ledger"] = {"entries": len(ledger), "head": ledger.head}
    return meta


def _last_record(path: Path) -> dict[str, Any]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise CheckpointError(f"{path} is empty; the run cannot be resumed — start it again with --overwrite")
    return json.loads(lines[-1])
