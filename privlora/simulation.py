"""In-process simulation of a federation: one server, many clients, bytes between them.

`run_experiment(cfg, out_dir)` does a whole run and writes the output folder:

- ``config.toml``: the resolved config (reloadable with ``privlora run config.toml``);
- ``metrics.jsonl``: one JSON line per round (round 0 = the untrained model), flushed and
  fsynced as each round ends, so a crash loses at most the round in progress;
- ``adapter/``: the final global adapter in peft format (``adapter_config.json`` and
  ``adapter_model.safetensors``; `PeftModel.from_pretrained(base, "adapter")` loads it);
- ``report.md`` and ``accuracy_epsilon.png``: accuracy and per-client epsilon per round.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .client import Client
from .config import ExperimentConfig, config_to_toml
from .data import load_labelled_data, tokenize, train_test_split
from .models import load_classifier, load_tokenizer, quiet_hf
from .partition import partition
from .privacy import PrivacyTracker
from .server import Server
from .strategies import make_strategy


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
    strategy = make_strategy(cfg.federation.strategy, cfg.max_rank, cfg.seed, cfg.federation.weighting)
    test_ds = tokenize(test, tokenizer, cfg.model.max_length)
    torch.manual_seed(cfg.seed)
    server = Server(cfg, strategy, base_model, test_ds)
    clients = []
    for k, idx in enumerate(shards):
        # each client gets its own strategy object: nothing is shared with the server
        client_strategy = make_strategy(cfg.federation.strategy, cfg.max_rank, cfg.seed, cfg.federation.weighting)
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


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Run every round and write the output folder; returns the final metrics record."""
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    metrics_path = out / "metrics.jsonl"
    t_start = time.perf_counter()

    fed = build_federation(cfg)
    server, clients = fed.server, fed.clients
    tracker = PrivacyTracker(cfg.privacy.delta, cfg.privacy.accountant)
    sigmas = {c.client_id: (c.noise_multiplier if cfg.privacy.enabled else 0.0) for c in clients}

    ev = server.evaluate()
    record: dict[str, Any] = {
        "round": 0,
        "test_accuracy": ev["accuracy"],
        "test_loss": ev["loss"],
        "majority_baseline": fed.majority_baseline,
        "clients": [],
        "epsilon": {str(k): 0.0 for k in range(len(clients))},
        "epsilon_max": 0.0,
        "noise_multiplier": {str(k): v for k, v in sigmas.items()},
        "client_sizes": fed.client_sizes,
        "seconds": time.perf_counter() - t_start,
    }
    _append_jsonl(metrics_path, record)

    rounds_bar = _bar(cfg.federation.rounds, "rounds", 0, progress)
    for rnd in range(1, cfg.federation.rounds + 1):
        t_round = time.perf_counter()
        chosen = server.sample_clients()
        contributions, reports, bytes_down = [], [], 0
        for cid in chosen:
            instruction = server.instruction(rnd, cid)
            bytes_down += len(instruction)
            client = clients[cid]
            bar = _bar(cfg.training.local_steps, f"round {rnd} client {cid}", 1, progress)
            update = client.handle(instruction, progress=bar)
            bar.close()
            report, tensors = server.read_update(update, rnd, set(chosen))
            if report.mechanism is not None:
                tracker.charge(report.client_id, rnd, report.mechanism)
            contributions.append(tensors)
            reports.append(report)
        server.aggregate(contributions)
        ev = server.evaluate()
        eps = {str(k): tracker.epsilon(k) for k in range(len(clients))} if cfg.privacy.enabled else {}
        record = {
            "round": rnd,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            "majority_baseline": fed.majority_baseline,
            "clients": chosen,
            # only non-private runs report a training loss (a DP client keeps its own)
            "train_loss": None if any(r.train_loss is None for r in reports) else float(np.nanmean([r.train_loss for r in reports])),
            "epsilon": eps,
            "epsilon_max": max(eps.values()) if eps else None,
            "bytes_up": int(sum(r.bytes_up for r in reports)),
            "bytes_down": int(bytes_down),
            "seconds": time.perf_counter() - t_round,
        }
        _append_jsonl(metrics_path, record)
        rounds_bar.set_postfix(acc=f"{ev['accuracy']:.3f}", eps=f"{record['epsilon_max'] or 0:.2f}")
        rounds_bar.update(1)
    rounds_bar.close()

    _atomic_save_adapter(server.global_model, out / "adapter")
    from .report import write_report

    write_report(out)
    record["total_seconds"] = time.perf_counter() - t_start
    return record

