"""The one start-up path of every run, whatever transport carries its messages.

config -> pre-flight -> data -> model -> server -> output folder, then a `RoundEngine` over the
transport the caller brings: the in-process runner (`privlora.transports.inprocess`) and the Flower
ServerApp (`privlora.transports.flower.server_app`) both call `start_run`, so what one checks,
warns about or writes, the other does too. Nothing is written to the output folder until the
config, the data, the model, the folder and (where this process holds the clients' data) the
budgets have been checked.

Which parts a process loads depends on what it plays: the in-process runner holds every client
(``with_clients=True``: the training split is partitioned and tokenized here), while a Flower
server holds only the held-out split; its clients load their own data on their own machines.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from accounting import delta_warning
from privlora import tasks
from privlora.core.config import ConfigError, ExperimentConfig, config_to_toml, load_config
from privlora.core.errors import OutputDirError
from privlora.core.progress import Progress, first_evaluation_stage
from privlora.federation import preflight
from privlora.federation.client import Client
from privlora.federation.engine import RoundEngine
from privlora.federation.node import ClientNode
from privlora.federation.server import Server
from privlora.federation.transport import Transport
from privlora.strategies import strategy_from_config
from privlora.tasks.models import quiet_hf, write_model_card


@dataclass
class Federation:
    cfg: ExperimentConfig
    server: Server
    clients: list[Client]
    majority_baseline: float
    client_sizes: list[int]
    label_names: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def build_server(cfg: ExperimentConfig, test, tokenizer, base_model, reporter: Progress | None = None, test_ds=None) -> Server:
    """The server of a run: the global adapter on ``base_model`` and the held-out ``test`` split
    (``test_ds``: already tokenized), with the task's sample prompts if it has any. Every
    transport builds it this way, so the same seed gives the same initial adapter."""
    import torch

    if test_ds is None:
        with (reporter or Progress(False)).stage(f"tokenizing {len(test)} held-out examples"):
            test_ds = tasks.tokenize_heldout(cfg, test, tokenizer)
    torch.manual_seed(cfg.seed)
    server = Server(cfg, strategy_from_config(cfg), base_model, test_ds)
    prompts = server.task.sample_prompts(test)
    if prompts is not None:
        server.set_samples(tokenizer, prompts)
    return server


def load_split(cfg: ExperimentConfig, reporter: Progress | None = None):
    """(data, train, test) of ``data.source`` as every party of the run splits it."""
    quiet_hf()
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with (reporter or Progress(False)).stage(f"loading data ({cfg.data.source})"):
        data = tasks.load_records(cfg)
    train, test = tasks.task_for(cfg).split(data)
    return data, train, test


def load_base(cfg: ExperimentConfig, num_labels: int, reporter: Progress | None = None, tokenizer=None, base_model=None):
    """(tokenizer, base model) of the run, with a progress stage."""
    with (reporter or Progress(False)).stage(f"loading the model ({cfg.model.path})"):
        if tokenizer is None:
            tokenizer = tasks.load_tokenizer(cfg)
        if base_model is None:
            base_model = tasks.load_model(cfg, num_labels)
    return tokenizer, base_model


def build_federation(cfg: ExperimentConfig, base_model=None, tokenizer=None, reporter: Progress | None = None) -> Federation:
    """Load data and model, partition, tokenize; return a server and its clients.

    ``reporter`` shows each stage (loading, tokenizing) on stderr; None = silent."""
    data, train, test = load_split(cfg, reporter)
    shards = tasks.task_for(cfg).partition(train)
    preflight.check_budgets(cfg, [len(s) for s in shards], reporter)  # before the model loads
    tokenizer, base_model = load_base(cfg, data.num_labels, reporter, tokenizer, base_model)
    with (reporter or Progress(False)).stage(f"tokenizing {len(train) + len(test)} examples"):
        test_ds = tasks.tokenize_heldout(cfg, test, tokenizer)
        shard_ds = [tasks.tokenize_train(cfg, train.subset(idx), tokenizer) for idx in shards]
    server = build_server(cfg, test, tokenizer, base_model, reporter, test_ds=test_ds)
    clients = []
    for k, ds in enumerate(shard_ds):
        # each client gets its own strategy object: nothing is shared with the server
        client_strategy = strategy_from_config(cfg)
        clients.append(Client(k, cfg, base_model, ds, client_strategy))
    return Federation(
        cfg=cfg,
        server=server,
        clients=clients,
        majority_baseline=test.majority_fraction(),
        client_sizes=[len(s) for s in shards],
        label_names=data.label_names,
    )


def prepare_out_dir(out: Path, overwrite: bool = False) -> None:
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputDirError(
                f"--out: {out} already holds files; choose a new folder or pass --overwrite to replace that run"
            )
        if not (out / "config.toml").is_file():
            raise OutputDirError(f"--out: {out} is not empty and does not look like a privlora run; refusing to delete it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"--out: cannot create {out} ({exc.strerror}); choose a folder you can write to") from exc


def client_nodes(cfg: ExperimentConfig, clients: list[Client], out: Path | None = None) -> dict[int, ClientNode]:
    """One `ClientNode` per client; with a key registry, each signs with its own private key
    (read beside the registry: in simulation this process plays every client). Under secure
    aggregation with a run folder ``out``, each node records the secure sums its releases entered
    in ``out/nodes/client-K`` (`session_rules.SessionRecord`), so a resumed simulation refuses
    to put a release into a second sum as a deployed node would; without ``out``, in memory."""
    keys = {}
    if cfg.secagg.enabled and cfg.secagg.key_registry:
        from privlora.federation.keys import load_private_key, load_registry, private_key_path

        registry = load_registry(cfg.secagg.key_registry)
        for c in clients:
            if c.client_id not in registry:
                raise ConfigError(f"secagg.key_registry: client {c.client_id} has no key in {cfg.secagg.key_registry}")
            keys[c.client_id] = load_private_key(private_key_path(cfg.secagg.key_registry, c.client_id), c.client_id, registry)
    def folder(k: int) -> Path | None:
        return None if out is None or not cfg.secagg.enabled else Path(out) / "nodes" / f"client-{k}"

    return {c.client_id: ClientNode(c, signing_key=keys.get(c.client_id), folder=folder(c.client_id)) for c in clients}


def check_output(cfg: ExperimentConfig | None, out: Path, overwrite: bool, resume: bool) -> ExperimentConfig:
    """Pre-flight of the run folder (nothing is written): the run's config, read from ``out``
    on resume."""
    if resume:
        preflight.check_resume_folder(out)
        return load_config(out / "config.toml")
    assert cfg is not None
    preflight.check_out_dir(out, overwrite)
    return cfg


def start_output(cfg: ExperimentConfig, out: Path, overwrite: bool, resume: bool, label_names: list[str]) -> None:
    """Once data and model have loaded: the fresh folder with its config.toml, and model.json."""
    if not resume:
        prepare_out_dir(out, overwrite or preflight.is_failed_start(out))
        (out / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
    write_model_card(out, cfg, label_names)


@dataclass
class StartedRun:
    """A run whose pre-flight passed and whose folder is written: what `engine` needs."""

    cfg: ExperimentConfig
    out: Path
    server: Server
    majority_baseline: float
    label_names: list[str]
    resume: bool
    federation: Federation | None = None
    """The clients, when this process plays them (``with_clients``); None on a Flower server."""

    def engine(self, transport: Transport, progress: bool = True) -> RoundEngine:
        return RoundEngine(self.cfg, self.server, transport, self.out, majority_baseline=self.majority_baseline,
                           label_names=self.label_names, progress=progress)


def start_run(
    cfg: ExperimentConfig | None,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    with_clients: bool,
    reporter: Progress | None = None,
    prepare: Callable[[Federation], None] | None = None,
) -> StartedRun:
    """Pre-flight, load, build the server (and, ``with_clients``, every client), write the output
    folder's config.toml and model.json; ``cfg`` is read from ``out`` on ``resume``. ``prepare``
    sees the federation before any noise is calibrated or any round runs (`privlora audit` inserts
    its canaries there); it needs ``with_clients``."""
    out = Path(out)
    reporter = reporter or Progress(False)
    cfg = check_output(cfg, out, overwrite, resume)
    fed = None
    if with_clients:
        fed = build_federation(cfg, reporter=reporter)
        server, majority, label_names = fed.server, fed.majority_baseline, fed.label_names
        if prepare is not None:
            prepare(fed)
    else:
        if prepare is not None:
            raise ValueError("start_run: prepare needs the clients in this process (with_clients=True)")
        data, _, test = load_split(cfg, reporter)
        tokenizer, base = load_base(cfg, data.num_labels, reporter)
        server = build_server(cfg, test, tokenizer, base, reporter)
        majority, label_names = test.majority_fraction(), data.label_names
    if cfg.secagg.enabled:
        server.strategy.check_secure_aggregation()
    if (warning := preflight.momentum_warning(cfg)) and not resume:
        print(f"privlora: warning: {warning}", file=sys.stderr)
    start_output(cfg, out, overwrite, resume, label_names)
    first_evaluation_stage(server, reporter, len(server.test_dataset), enabled=not resume)
    if fed is not None and cfg.privacy.enabled:
        over = [c for c in fed.clients if delta_warning(cfg.privacy.delta, c.num_examples)]
        if over:  # one line for the whole federation (allowed by privacy.allow_large_delta)
            smallest = min(over, key=lambda c: c.num_examples)
            others = f" (and {len(over) - 1} other client{'s' if len(over) > 2 else ''})" if len(over) > 1 else ""
            print(f"privlora: warning: client {smallest.client_id}{others}: "
                  f"{delta_warning(cfg.privacy.delta, smallest.num_examples)}", file=sys.stderr)
    return StartedRun(cfg=cfg, out=out, server=server, majority_baseline=majority, label_names=label_names,
                      resume=resume, federation=fed)
