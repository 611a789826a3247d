"""`FlowerTransport`: the round engine's exchanges as Flower messages over a `Grid`.

Each `exchange` pushes one ``query.privlora`` message per client and pulls the replies until all
have come or the stage's timeout has passed (polling every 0.1 s; Flower's own
``send_and_receive`` sleeps 3 s between pulls). A client is a dropout when SuperLink refuses
its message (the node is known to be offline), when its node answers with an error (its
ClientApp raised: a refusal of the protocol, a crash), or when it has not answered in time.

Flower addresses nodes by random node ids; privlora by client ids. `discover` asks every
connected node for the client id in its node config (a ``whoami`` record) once, waiting until
the expected number of nodes is connected or ``wait`` seconds have passed.
"""

from __future__ import annotations

import sys
import time

from flwr.app import ConfigRecord, Message, RecordDict

from privlora.federation.transport import Transport
from privlora.transports.flower import MESSAGE_TYPE, RECORD

DEFAULT_TIMEOUT = 600.0
"""Seconds to wait when the config sets no limit: a dead node must not hang a run forever."""


def log(message: str) -> None:
    print(f"privlora: {message}", file=sys.stderr, flush=True)


class FlowerTransport(Transport):
    name = "flower"

    def __init__(self, grid, expected: int, wait: float = 120.0, poll: float = 0.1):
        super().__init__()
        self.grid = grid
        self.poll = poll
        self.node_of: dict[int, int] = {}
        self.discover(expected, wait)

    def clients(self) -> list[int]:
        return sorted(self.node_of)

    def _push_pull(self, msgs: list[Message], timeout: float) -> dict[int, Message]:
        """{node id: reply} for the messages answered without error within ``timeout``."""
        ids = list(self.grid.push_messages(msgs))
        sent = {mid: m.metadata.dst_node_id for m, mid in zip(msgs, ids) if mid}
        pending, replies = set(sent), {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for rep in self.grid.pull_messages(list(pending)):
                mid = rep.metadata.reply_to_message_id
                if mid not in pending:
                    continue
                pending.discard(mid)
                if rep.has_error():
                    log(f"node {sent[mid]} answered with an error ({rep.error.code}): {str(rep.error.reason)[:300]}")
                    continue
                replies[sent[mid]] = rep
            if pending:
                time.sleep(self.poll)
        return replies

    def discover(self, expected: int, wait: float) -> None:
        deadline = time.monotonic() + wait
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected:
                break
            time.sleep(0.5)
        msgs = [Message(RecordDict({RECORD: ConfigRecord({"whoami": True})}), dst_node_id=n, message_type=MESSAGE_TYPE,
                        ttl=max(wait, 60.0)) for n in nodes]
        replies = self._push_pull(msgs, max(deadline - time.monotonic(), 60.0))
        for node, rep in replies.items():
            cid = int(rep.content[RECORD]["client-id"])
            if cid in self.node_of:
                raise ValueError(f"two nodes ({self.node_of[cid]} and {node}) both say they are client {cid}; "
                                 "give every node its own client-id")
            self.node_of[cid] = node
        log(f"{len(self.node_of)} of {expected} clients connected: {sorted(self.node_of)}")

    def _exchange(self, stage: str, messages: dict[int, bytes], timeout: float | None) -> dict[int, bytes]:
        timeout = timeout or DEFAULT_TIMEOUT
        by_node = {}
        msgs = []
        for c, blob in messages.items():
            node = self.node_of.get(c)
            if node is None:
                continue
            by_node[node] = c
            msgs.append(Message(RecordDict({RECORD: ConfigRecord({"blob": blob, "stage": stage})}), dst_node_id=node,
                                message_type=MESSAGE_TYPE, group_id=stage, ttl=timeout + 30.0))
        replies = self._push_pull(msgs, timeout) if msgs else {}
        return {by_node[n]: bytes(rep.content[RECORD]["blob"]) for n, rep in replies.items()}
