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
from typing import Any, Callable


from accounting import delta_warning

from .client import Client
from .config import ConfigError, ExperimentConfig, config_to_toml, load_config
from .data import run_split
from .engine import RoundEngine, _bar
from .models import quiet_hf, write_model_card
from . import tasks
from .node import ClientNode
from . import preflight
from .errors import OutputDirError
from .progress import Progress, first_evaluation_stage
from .partition import partition
from .server import Server
from .strategies import strategy_from_config
from .transport import STAGE_TRAIN, InProcessTransport


SAMPLE_PROMPTS = 3
"""Task "causal-lm": how many held-out instructions report.md shows generations for."""


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
    (``test_ds``: already tokenized). Every transport builds it this way, so the same seed gives
    the same initial adapter."""
    import torch

    if test_ds is None:
        with (reporter or Progress(False)).stage(f"tokenizing {len(test)} held-out examples"):
            test_ds = tasks.tokenize_heldout(cfg, test, tokenizer)
    torch.manual_seed(cfg.seed)
    server = Server(cfg, strategy_from_config(cfg), base_model, test_ds)
    if tasks.is_causal(cfg):
        k = min(SAMPLE_PROMPTS, len(test))
        server.set_samples(tokenizer, test.texts[:k], test.responses[:k])
    return server


def load_split(cfg: ExperimentConfig, reporter: Progress | None = None):
    """(data, train, test) of ``data.source`` as every party of the run splits it."""
    quiet_hf()
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    with (reporter or Progress(False)).stage(f"loading data ({cfg.data.source})"):
        data = tasks.load_records(cfg)
    train, test = run_split(data, cfg.data, cfg.seed)
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
    shards = partition(train, cfg.data.partition, cfg.data.num_clients, cfg.seed, cfg.data.dirichlet_alpha)
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


def atomic_save_adapter(model, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # the vocabulary is never resized, so no embedding layer is saved (and peft need not look up the base)
    model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
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


def run_experiment(
    cfg: ExperimentConfig | None,
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    stop_after: int | None = None,
    drop: dict[str, set[int]] | None = None,
    prepare: Callable[[Federation], None] | None = None,
) -> dict[str, Any]:
    """Run every round in this process and write the output folder; returns the last metrics record.

    With ``resume``, continue the run in ``out_dir`` from its checkpoint (``cfg`` is then read
    from the folder's config.toml). ``stop_after`` ends the process after that many rounds as if
    it had been killed (no adapter, no report): used to test resuming. ``drop`` ({stage: client
    ids}, stages "describe", "train" or `secagg.STAGES`) makes clients fall silent from that
    stage on, as nodes that die (tests of dropout recovery). ``prepare`` is called with the
    federation right after it is built, before any noise is calibrated or any round runs
    (`privlora.audit` inserts its canaries into the clients' datasets there).
    """
    out = Path(out_dir)
    # pre-flight: nothing is written until config, data, model, folder and budgets are checked
    cfg = check_output(cfg, out, overwrite, resume)
    reporter = Progress(progress)
    fed = build_federation(cfg, reporter=reporter)
    if prepare is not None:
        prepare(fed)
    if cfg.secagg.enabled:
        fed.server.strategy.check_secure_aggregation()
    if (warning := preflight.momentum_warning(cfg)) and not resume:
        print(f"privlora: warning: {warning}", file=sys.stderr)
    start_output(cfg, out, overwrite, resume, fed.label_names)
    first_evaluation_stage(fed.server, reporter, len(fed.server.test_dataset), enabled=not resume)
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
