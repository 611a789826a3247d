"""The ClientApp: one privlora client node behind Flower's Message API.

A deployment runs it as a **relay**: the SuperNode's node config names the node process's socket
(``flower-supernode --node-config 'node-socket="/srv/privlora-node/node.sock"'``, optionally
``client-id=K`` and ``relay-timeout=SECONDS``), and each message's bytes go to the node process
(`privlora.federation.node_process`, ``privlora node serve``), its reply's bytes come back. The
relay holds no data, ledger, key or state: a ClientApp shipped by a hostile server can do no
more than send privlora messages, which the node judges by its own rules. No node process, or one
that dies mid-message or does not answer within ``relay-timeout`` (default 900 s): a round
instruction gets a privlora ``refusal`` (``code = "node_unreachable"``, the reason inside; the
server records it in metrics.jsonl), any other message an error reply naming the reason
(`privlora.federation.node_process.NodeUnreachable`; the server counts a dropout); never a hang.

Without ``node-socket`` (Flower's simulation engine: virtual nodes in warm Ray actors; tests) the
node runs in the ClientApp itself: each message rebuilds the `ClientNode` from its node config
(`privlora.federation.deploy`, cheap: no model is loaded until a message needs training),
restores what it remembered from ``context.state`` (sealed with this node's own key,
`privlora.transports.flower.state`), answers, and saves its memory again.
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
    if RELAY_KEY in context.node_config:
        return _relay(msg, dict(context.node_config))
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
    from privlora.federation.node_process import log_activity

    return log_activity(settings.node_dir, blob)


def _pause(settings) -> None:
    """Fault injection (`pause-at`): mark the spot and stop answering, so a test can kill the node."""
    from privlora.federation.node_process import pause

    pause(settings.node_dir, settings.pause_at)


# ------------------------------------------------------------------------------------------ relay
RELAY_KEY = "node-socket"
RELAY_KEYS = frozenset({RELAY_KEY, "client-id", "relay-timeout"})
RELAY_TIMEOUT = 900.0
"""Seconds the relay waits for the node process's reply (time queued behind other messages included)."""
UNREACHABLE = "node_unreachable"
"""The ``code`` of a relay's refusal when the node process cannot answer."""


def _relay(msg: Message, nc: dict) -> Message:
    """Forward one message's bytes to the node process and its reply back; nothing else."""
    from privlora.core.config import ConfigError
    from privlora.federation.node_process import OP_WHOAMI, NodeUnreachable, ask

    unknown = sorted(set(nc) - RELAY_KEYS - SIMULATION_NODE_KEYS)
    if unknown:
        raise ConfigError(f"node config: a relay (node-socket set) takes only {sorted(RELAY_KEYS)}; found {unknown}: the "
                          "node's config, folder, data and keys belong in the node process's own config (privlora node serve)")
    path = str(nc[RELAY_KEY])
    try:
        timeout = float(nc.get("relay-timeout", RELAY_TIMEOUT))
    except (TypeError, ValueError):
        raise ConfigError(f"node config: relay-timeout must be a number of seconds, found {nc.get('relay-timeout')!r}") from None
    record = msg.content[RECORD]
    if "whoami" in record:
        if "client-id" in nc:
            cid = int(nc["client-id"])
        else:
            import json

            cid = int(json.loads(ask(path, b"", 30.0, op=OP_WHOAMI))["client-id"])
        return Message(RecordDict({RECORD: ConfigRecord({"client-id": cid})}), reply_to=msg)
    blob = bytes(record["blob"])
    try:
        reply = ask(path, blob, timeout)
    except NodeUnreachable as exc:
        reply = _unreachable(blob, str(exc), nc)
    # a NodeError (the node refused or failed on the message) goes back to the server as Flower's
    # error reply, as when the node ran in this process: the node is a dropout, the reason logged
    return Message(RecordDict({RECORD: ConfigRecord({"blob": reply})}), reply_to=msg)


def _unreachable(blob: bytes, reason: str, nc: dict) -> bytes:
    """A round instruction's refusal naming why the node process could not answer; for any other
    message `NodeUnreachable` (a refusal is a reply only to a round instruction; Flower returns the
    error to the server, which counts a dropout and logs the reason)."""
    from privlora.federation.messages import Message as PrivloraMessage
    from privlora.federation.messages import MessageError
    from privlora.federation.node_process import NodeUnreachable

    print(f"privlora: relay: {reason}", file=sys.stderr, flush=True)
    try:
        asked = PrivloraMessage.from_bytes(blob, ("round_instruction",))
    except MessageError:
        raise NodeUnreachable(f"node process unreachable: {reason}") from None
    cid = asked.header.get("client_id", nc.get("client-id"))
    header = {"client_id": cid, "round": asked.header.get("round"), "reason": f"node process unreachable: {reason}",
              "code": UNREACHABLE}
    return PrivloraMessage("refusal", header).to_bytes()
