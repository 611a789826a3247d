"""The ClientApp: one privlora client node behind Flower's Message API.

Each message is handled by a fresh process (Flower's SuperNode starts one per message): the node
rebuilds its `ClientNode` from its node config (`privlora.federation.deploy`, cheap: no model is loaded
until a message needs training), restores what it remembered from ``context.state`` (sealed
with this node's own key, `privlora.transports.flower.state`), answers, and saves its memory again.
A ``whoami`` record is answered with the node's client id alone (the server's address book).
"""

from __future__ import annotations

import sys

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from privlora.transports.flower import RECORD

app = ClientApp()
STATE = "privlora-node"


def node_for(context: Context, run_config: dict | None = None):
    """(settings, node) for this node: from its node config, or under Flower's simulation engine
    (virtual nodes have only a partition id) from the run config."""
    from privlora.federation.deploy import build_client_node, node_settings

    settings = node_settings(_node_config(context, run_config))
    return settings, build_client_node(settings)


SIMULATION_NODE_KEYS = frozenset({"partition-id", "num-partitions"})
"""All a virtual node of Flower's simulation engine has in its node config (flwr's
``server/superlink/fleet/vce/vce_api.py``: ``_register_node_info_stores``)."""


def under_simulation_engine() -> bool:
    """True only inside a Ray actor of Flower's simulation engine (its ``ClientAppActor``, flwr's
    ``simulation/ray_transport/ray_actor.py``), which is where the engine runs a ClientApp. A
    SuperNode runs its ClientApp in a ``flwr-clientapp`` process with no Ray: nothing the server
    sends (run config, node count, messages) can make this true there. Never starts Ray."""
    ray = sys.modules.get("ray")
    if ray is None:
        return False
    try:
        return bool(ray.is_initialized()) and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - any doubt means: not the simulation engine
        return False


def _node_config(context: Context, run_config: dict | None = None) -> dict:
    """This node's config. A SuperNode's comes from its operator (``--node-config``) and must hold
    ``config``; only a virtual node of Flower's simulation engine (one process plays every client,
    so there is no node operator) builds one from the run config."""
    nc = dict(context.node_config)
    rc = {**dict(context.run_config), **(run_config or {})}
    if "config" not in nc:
        if not (set(nc) <= SIMULATION_NODE_KEYS and "partition-id" in nc and "config" in rc and under_simulation_engine()):
            from privlora.core.config import ConfigError

            raise ConfigError(
                "node config: 'config' is missing: this SuperNode's operator must give the federation's TOML and "
                "this node's own settings (flower-supernode --node-config 'config=\"PATH\" client-id=K node-dir=\"DIR\"'); "
                "a node never takes its config, folders, keys or noise source from the server's run config (only "
                "Flower's simulation engine, where one process plays every client, does)")
        cid = int(nc.get("partition-id", -1))
        nc = {"config": rc["config"], "client-id": cid, "data": "partition",
              "node-dir": f"{rc.get('node-root', 'privlora-nodes')}/client-{cid}", "noise": rc.get("noise", "seeded")}
        if rc.get("key-dir"):
            nc["signing-key"] = f"{rc['key-dir']}/client-{cid}.key"
    return {k: v for k, v in nc.items() if k not in ("partition-id", "num-partitions")}


@app.query("privlora")
def handle(msg: Message, context: Context, run_config: dict | None = None) -> Message:
    """One message. ``run_config`` adds to the context's run config (the simulation engine's
    context has none, and it cannot be modified)."""
    from privlora.transports.flower.state import node_key, seal, unseal

    record = msg.content[RECORD]
    if "whoami" in record:
        from privlora.federation.deploy import node_settings

        cid = node_settings(_node_config(context, run_config)).client_id
        return Message(RecordDict({RECORD: ConfigRecord({"client-id": cid})}), reply_to=msg)
    settings, node = node_for(context, run_config)
    key = node_key(settings.node_dir)
    saved = context.state.get(STATE)
    if saved is not None:
        node.import_state(unseal(saved["blob"], key))
    blob = bytes(record["blob"])
    seen = _activity(settings, blob)
    if settings.pause_at and seen.get("stage") == settings.pause_at:
        _pause(settings)
    reply = node.handle(blob)
    context.state[STATE] = ConfigRecord({"blob": seal(node.export_state(), key)})
    _activity(settings, reply)
    return Message(RecordDict({RECORD: ConfigRecord({"blob": reply})}), reply_to=msg)


def _activity(settings, blob: bytes) -> dict:
    """Append (time, kind, round, stage) of a message this node received or sent to its log."""
    import json
    import time

    from privlora.federation.messages import KINDS
    from privlora.federation.messages import Message as PrivloraMessage

    msg = PrivloraMessage.from_bytes(blob, KINDS)
    entry = {"time": time.time(), "kind": msg.kind, "round": msg.header.get("round"), "stage": msg.header.get("stage")}
    settings.node_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.node_dir / "activity.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def _pause(settings) -> None:
    """Fault injection (`pause-at`): mark the spot and stop answering, so a test can kill the node."""
    import time

    (settings.node_dir / f"paused-at-{settings.pause_at}").write_text("paused\n", encoding="utf-8")
    time.sleep(600)
    raise RuntimeError(f"node paused at {settings.pause_at} (pause-at) and was not killed")
