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

The rounds themselves are run by `privlora.engine.RoundEngine`, the one round engine every
transport uses; here every client is a `privlora.node.ClientNode` in this process, reached
through `privlora.transport.InProcessTransport`.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accounting import delta_warning

from .client import Client
from .config import ConfigError, ExperimentConfig, config_to_toml, load_config
from .data import load_labelled_data, tokenize, train_test_split
from .engine import RoundEngine, _bar
from .models import load_classifier, load_tokenizer, quiet_hf
from .node import ClientNode
from .partition import partition
from .server import Server
from .strategies import strategy_from_config
from .transport import STAGE_TRAIN, InProcessTransport


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


def build_server(cfg: ExperimentConfig, test, tokenizer, base_model) -> Server:
    """The server of a run: the global adapter on ``base_model`` and the held-out ``test`` split.
    Every transport builds it this way, so the same seed gives the same initial adapter."""
    import torch

    test_ds = tokenize(test, tokenizer, cfg.model.max_length)
    torch.manual_seed(cfg.seed)
    return Server(cfg, strategy_from_config(cfg), base_model, test_ds)


def load_split(cfg: ExperimentConfig):
    """(data, train, test) of ``data.source`` as every party of the run splits it."""
    quiet_hf()
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_labelled_data(cfg.data)
    train, test = train_test_split(data, cfg.data.test_fraction, cfg.seed, cfg.data.max_examples)
    return data, train, test


def build_federation(cfg: ExperimentConfig, base_model=None, tokenizer=None) -> Federation:
    """Load data and model, partition, tokenize; return a server and its clients."""
    data, train, test = load_split(cfg)
    shards = partition(train, cfg.data.partition, cfg.data.num_clients, cfg.seed, cfg.data.dirichlet_alpha)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.path)
    if base_model is None:
        base_model = load_classifier(cfg.model.path, data.num_labels, cfg.seed)
    server = build_server(cfg, test, tokenizer, base_model)
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


def atomic_save_adapter(model, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def client_nodes(cfg: ExperimentConfig, clients: list[Client]) -> dict[int, ClientNode]:
    """One `ClientNode` per client; with a key registry, each signs with its own private key
    (read beside the registry: in simulation this process plays every client)."""
    keys = {}
    if cfg.secagg.enabled and cfg.secagg.key_registry:
        from .keys import load_private_key, load_registry, private_key_path

        registry = load_registry(cfg.secagg.key_registry)
        for c in clients:
            if c.client_id not in registry:
                raise ConfigError(f"secagg.key_registry: client {c.client_id} has no key in {cfg.secagg.key_registry}")
            keys[c.client_id] = load_private_key(private_key_path(cfg.secagg.key_registry, c.client_id), c.client_id, registry)
    return {c.client_id: ClientNode(c, signing_key=keys.get(c.client_id)) for c in clients}


def open_output(cfg: ExperimentConfig | None, out: Path, overwrite: bool, resume: bool) -> ExperimentConfig:
    """The run's config: read from ``out`` on resume, else written into a fresh ``out``."""
    if resume:
        if not (out / "config.toml").is_file():
            raise OutputDirError(f"--resume: {out} holds no config.toml; is it a privlora run folder?")
        return load_config(out / "config.toml")
    assert cfg is not None
    prepare_out_dir(out, overwrite)
    (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    return cfg


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    drop: dict[str, set[int]] | None = None,
) -> dict[str, Any]:
    """Run every round in this process and write the output folder; returns the last metrics record.

    With ``resume``, continue the run in ``out_dir`` from its checkpoint (``cfg`` is then read
    from the folder's config.toml). ``stop_after`` ends the process after that many rounds as if
    it had been killed (no adapter, no report): used to test resuming. ``drop`` ({stage: client
    ids}, stages "describe", "train" or `secagg.STAGES`) makes clients fall silent from that
    stage on, as nodes that die (tests of dropout recovery).
    """
    out = Path(out_dir)
    cfg = open_output(cfg, out, overwrite, resume)
    fed = build_federation(cfg)
    if cfg.secagg.enabled:
        fed.server.strategy.check_secure_aggregation()
    if cfg.privacy.enabled:
        for c in fed.clients:
            w = delta_warning(cfg.privacy.delta, c.num_examples)
            if w:
                print(f"privlora: warning: client {c.client_id}: {w}", file=sys.stderr)
    nodes = client_nodes(cfg, fed.clients)
    bars = None
    if progress:
        def bars(stage, cid):
            if stage != STAGE_TRAIN:
                return None
            return _bar(cfg.training.local_steps, f"client {cid}", 1, True)
    transport = InProcessTransport(nodes, drop=drop, progress=bars)
    engine = RoundEngine(cfg, fed.server, transport, out, majority_baseline=fed.majority_baseline,
                         label_names=fed.label_names, progress=progress)
    return engine.run(resume=resume, stop_after=stop_after)
