"""How the round engine reaches clients: send messages to a set of clients, collect the replies.

The engine (`privlora.federation.engine`) knows clients only through a `Transport`. One call does all it
needs: ``exchange(stage, messages, timeout)`` sends ``messages[c]`` (bytes) to each client ``c``
and returns the replies that arrived within ``timeout`` seconds. A client that does not answer
in time, or whose node reports an error, is simply absent from the result (a dropout); the
engine and the secure-aggregation protocol decide what an absence means. Nothing else crosses:
no shared memory, no Python objects, only the bytes of `privlora.federation.messages`.

Transports:

- `privlora.transports.inprocess.InProcessTransport`: every client is a `privlora.federation.node.ClientNode` in this process;
  the embedded default, experiments and tests. ``drop`` makes chosen clients fall silent from
  a chosen stage on, the in-process stand-in for a node that dies.
- `privlora.transports.flower.FlowerTransport`: the same calls over Flower's Message API (a SuperLink and
  SuperNodes over gRPC, or Flower's simulation engine).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

STAGE_DESCRIBE = "describe"
STAGE_TRAIN = "train"
"""Stage names besides the secure-aggregation stages of `secagg.STAGES`."""


@dataclass
class ExchangeStats:
    """Bytes that crossed, per client, summed over every exchange so far."""

    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)

    def add(self, down: Mapping[int, bytes], up: Mapping[int, bytes]) -> None:
        for c, blob in down.items():
            self.bytes_down[c] = self.bytes_down.get(c, 0) + len(blob)
        for c, blob in up.items():
            self.bytes_up[c] = self.bytes_up.get(c, 0) + len(blob)


class Transport(ABC):
    """Delivers bytes to clients and brings their replies back."""

    name: str = "transport"

    def __init__(self) -> None:
        self.stats = ExchangeStats()

    @abstractmethod
    def clients(self) -> list[int]:
        """The client ids this transport can reach now (sorted)."""

    @abstractmethod
    def _exchange(self, stage: str, messages: dict[int, bytes], timeout: float | None) -> dict[int, bytes]:
        """Send and collect; the subclass's one job."""

    def exchange(self, stage: str, messages: Mapping[int, bytes], timeout: float | None = None) -> dict[int, bytes]:
        """Send ``messages[c]`` to every client ``c``; return ``{c: reply}`` for the clients that
        answered within ``timeout`` seconds (None: no limit). Replies come back keyed by client
        id in sorted order, whatever order they arrived in."""
        messages = {int(c): bytes(b) for c, b in sorted(messages.items())}
        if not messages:
            return {}
        replies = self._exchange(stage, messages, timeout)
        replies = {c: replies[c] for c in sorted(replies) if c in messages}
        self.stats.add({c: messages[c] for c in messages}, replies)
        return replies

    def close(self) -> None:
        """Release whatever the transport holds (connections, processes)."""
