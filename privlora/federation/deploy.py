"""A client node of a deployment, built from its own node config: its data, ledger and key.

A node (a hospital, a branch) holds its own copy of the federation's agreed config and reads
everything else from its node config (Flower's ``--node-config``), never from the server:

=============== ===================================================================
``config``      path to the federation's TOML, the same file the server runs; the node refuses
                to take part if the server's resolved config differs from its own
``client-id``   this client's id, 0 .. data.num_clients - 1 (its budget and rank in the config)
``data``        ``"partition"`` (demo: this client's share of ``data.source`` split exactly as
                the simulation splits it) or a local csv/json/jsonl/parquet file with the
                config's text and label columns (all of it is this node's training data)
``node-dir``    this node's own folder: its identity, its lifetime ledger of every release its
                data made across runs and each run's own ledger (DP runs,
                `privlora.federation.node_ledger`), the updates it released and the key that
                seals its memory between messages; default ``privlora-node``
``signing-key`` this node's own Ed25519 private key file (``privlora keys node``), required
                when the config pins a key registry (which must hold its public key)
``noise``       ``"secure"`` (default: ChaCha20 from the OS, `privlora.federation.noise`) or
                ``"seeded"`` (reproducible, for tests and experiments only)
``node-socket`` where the node process (``privlora node serve``, `privlora.federation.node_process`)
                listens and the ClientApp relay connects; default ``NODE-DIR/node.sock``
``socket-group`` the OS group whose members may connect to that socket (the SuperNode's user;
                mode 0660), when the node process runs as its own user; default: none (0600)
``pause-at``    fault injection for tests: on the first message of this secure-aggregation
                stage the node writes ``NODE-DIR/paused-at-STAGE`` and stops answering (so that
                a test can kill it exactly there); never set it in a deployment
=============== ===================================================================

Every message the node answers is appended to ``NODE-DIR/activity.jsonl`` (time, kind, round,
stage): the node's own record of what it was asked and what it sent back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from privlora.core.config import ConfigError, load_config, resolved_sha256

NODE_KEYS = ("config", "client-id", "data", "node-dir", "signing-key", "noise", "node-socket", "socket-group", "pause-at")


@dataclass(frozen=True)
class NodeSettings:
    config: Path
    client_id: int
    data: str = "partition"
    node_dir: Path = Path("privlora-node")
    signing_key: str = ""
    noise: str = "secure"
    pause_at: str = ""
    node_socket: str = ""
    socket_group: str = ""


def node_settings(node_config: Mapping) -> NodeSettings:
    """Validate a node config; ConfigError names the key and the fix."""
    from privlora.federation.noise import NOISE_SOURCES

    unknown = sorted(set(node_config) - set(NODE_KEYS) - {"partition-id", "num-partitions"})
    if unknown:
        raise ConfigError(f"node config: unknown keys {unknown}; allowed: {', '.join(NODE_KEYS)}")
    if "config" not in node_config:
        raise ConfigError("node config: 'config' is missing: give the path of the federation's TOML (--node-config 'config=\"...\"')")
    cid = node_config.get("client-id", node_config.get("partition-id"))
    if cid is None:
        raise ConfigError("node config: 'client-id' is missing: give this node's client id (--node-config 'client-id=0')")
    try:
        cid = int(cid)
    except (TypeError, ValueError):
        raise ConfigError(f"node config: 'client-id' must be an integer, found {cid!r}") from None
    noise = str(node_config.get("noise", "secure"))
    if noise not in NOISE_SOURCES:
        raise ConfigError(f"node config: 'noise' must be one of {NOISE_SOURCES}, found {noise!r}")
    return NodeSettings(
        config=Path(str(node_config["config"])),
        client_id=cid,
        data=str(node_config.get("data", "partition")),
        node_dir=Path(str(node_config.get("node-dir", "privlora-node"))),
        signing_key=str(node_config.get("signing-key", "")),
        noise=noise,
        pause_at=str(node_config.get("pause-at", "")),
        node_socket=str(node_config.get("node-socket", "")),
        socket_group=str(node_config.get("socket-group", "")),
    )


_PARTITIONS: dict[str, tuple] = {}


def _partitioned(cfg):
    """(train split, client shards) of ``data.source`` as the simulation splits it. Kept for the
    life of the process: Flower's simulation engine runs many virtual nodes in one process, and
    each would otherwise load and split the whole data set for every message."""
    from privlora.tasks import task_for

    key = resolved_sha256(cfg)
    if key not in _PARTITIONS:
        task = task_for(cfg)
        train, _ = task.split(task.load_records())
        _PARTITIONS.clear()
        _PARTITIONS[key] = (train, task.partition(train))
    return _PARTITIONS[key]


def node_training_data(cfg, settings: NodeSettings):
    """This node's training examples (a `LabelledData`)."""
    from privlora.tasks import load_records
    from privlora.tasks.data import DataError

    if settings.data == "partition":
        train, shards = _partitioned(cfg)
        return train.subset(shards[settings.client_id])
    path = Path(settings.data).expanduser()
    if not path.is_file():
        raise DataError(f"node config 'data': {settings.data!r} is neither 'partition' nor an existing file")
    return load_records(cfg, dataclasses.replace(cfg.data, source=str(path), partition="iid", group_column=""))


def build_client_node(settings: NodeSettings):
    """The `ClientNode` this node runs: its own ledger and signing key now, its data and base
    model when a message first needs them."""
    from privlora import tasks
    from privlora.federation.client import Client
    from privlora.federation.node import ClientGuard, ClientNode, ledger_folder, run_identity
    from privlora.strategies import strategy_from_config
    from privlora.tasks.models import quiet_hf

    cfg = load_config(settings.config)
    if not 0 <= settings.client_id < cfg.data.num_clients:
        raise ConfigError(f"node config: client-id {settings.client_id} is outside 0..{cfg.data.num_clients - 1} (data.num_clients)")

    def load_client() -> Client:
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        quiet_hf()
        data = node_training_data(cfg, settings)
        tokenizer = tasks.load_tokenizer(cfg)
        base = tasks.load_model(cfg, data.num_labels)
        client = Client(settings.client_id, cfg, base, tasks.tokenize_train(cfg, data, tokenizer), strategy_from_config(cfg))
        client.label_names = data.label_names
        return client

    guard = None
    if cfg.privacy.enabled:
        from privlora.federation.node_ledger import NodeLedger, data_fingerprint

        lifetime = NodeLedger(settings.node_dir, lambda: data_fingerprint(node_training_data(cfg, settings)))
        guard = ClientGuard(ledger_folder(settings.node_dir, cfg), settings.client_id, cfg.client_budget(settings.client_id),
                            cfg.privacy.delta, cfg.privacy.accountant, run_identity(cfg), lifetime=lifetime)
    key = None
    if cfg.secagg.enabled and cfg.secagg.key_registry:
        from privlora.federation.keys import load_private_key, load_registry

        if not settings.signing_key:
            raise ConfigError("node config: 'signing-key' is missing but the config pins a key registry; "
                              "give this node's own private key file (written on this node by `privlora keys node --out DIR`)")
        key = load_private_key(settings.signing_key, settings.client_id, load_registry(cfg.secagg.key_registry))
    def data_facts() -> tuple[int, list[str]]:
        data = node_training_data(cfg, settings)
        return len(data), data.label_names

    return ClientNode(load_client, guard=guard, signing_key=key, noise=settings.noise,
                      config_sha256=resolved_sha256(cfg), cfg=cfg, client_id=settings.client_id, data_facts=data_facts,
                      folder=settings.node_dir)
