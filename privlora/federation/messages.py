"""Messages between server and clients, as bytes: nothing else crosses between them.

A message is a kind, a JSON-serialisable header, and named float/int arrays. The wire format is
a safetensors blob (no pickle: a length-checked JSON header followed by raw little-endian
tensor bytes) whose metadata carries ``privlora.kind``, ``privlora.version`` and the header.
Decoding checks the kind and the version and rejects anything else with `MessageError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privlora.core.errors import UserError

VERSION = 1
MAX_MESSAGE_BYTES = 1 << 31
KINDS = (
    "describe",  # server -> client: tell me your planned release and what you can do
    "client_description",  # client -> server: the reply to describe
    "round_instruction",  # server -> client: train this round from this global state
    "client_update",  # client -> server: the contribution (or, under secure aggregation, its header)
    "refusal",  # client -> server: the client will not train this round, and why
    "secagg_request",  # server -> client: one secure-aggregation stage (the secagg bytes inside)
    "secagg_reply",  # client -> server: the client's secagg message for that stage
)


class MessageError(UserError):
    """A message could not be decoded: malformed, wrong kind, wrong version, or too large."""


@dataclass
class Message:
    kind: str
    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        if self.kind not in KINDS:
            raise MessageError(f"unknown message kind {self.kind!r}; expected one of {KINDS}")
        meta = {
            "privlora.kind": self.kind,
            "privlora.version": str(VERSION),
            "privlora.header": json.dumps(self.header, sort_keys=True, allow_nan=False),
        }
        tensors = {k: np.ascontiguousarray(v) for k, v in self.tensors.items()}
        return save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, blob: bytes, expect_kind: "str | tuple[str, ...]") -> "Message":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        if not isinstance(blob, (bytes, bytearray)):
            raise MessageError(f"expected bytes, found {type(blob).__name__}")
        if len(blob) > MAX_MESSAGE_BYTES:
            raise MessageError(f"message of {len(blob)} bytes exceeds the {MAX_MESSAGE_BYTES} byte limit")
        if len(blob) < 8:
            raise MessageError("message is truncated (shorter than its length prefix)")
        header_len = int.from_bytes(blob[:8], "little")
        if header_len > len(blob) - 8:
            raise MessageError("message header length exceeds the message")
        try:
            raw_header = json.loads(bytes(blob[8 : 8 + header_len]))
            meta = raw_header.get("__metadata__") or {}
            tensors = load(bytes(blob))
        except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise MessageError(f"malformed message: {exc}") from exc
        if meta.get("privlora.version") != str(VERSION):
            raise MessageError(f"message version {meta.get('privlora.version')!r} is not {VERSION}")
        kinds = (expect_kind,) if isinstance(expect_kind, str) else tuple(expect_kind)
        if meta.get("privlora.kind") not in kinds:
            want = repr(kinds[0]) if len(kinds) == 1 else " or ".join(map(repr, kinds))
            raise MessageError(f"expected a {want} message, found {meta.get('privlora.kind')!r}")
        try:
            header = json.loads(meta["privlora.header"])
        except (KeyError, ValueError) as exc:
            raise MessageError(f"message header is missing or not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise MessageError("message header is not a JSON object")
        return cls(kind=meta["privlora.kind"], header=header, tensors=dict(tensors))


def bytes_tensor(blob: bytes) -> np.ndarray:
    """Opaque bytes (a secagg message) as a uint8 tensor, to travel inside a `Message`."""
    return np.frombuffer(bytes(blob), dtype=np.uint8).copy()


def tensor_bytes(msg: Message, key: str = "blob") -> bytes:
    """The opaque bytes `bytes_tensor` packed under ``key``; MessageError if absent or not uint8."""
    arr = msg.tensors.get(key)
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 1:
        raise MessageError(f"{msg.kind} message carries no byte payload {key!r}")
    return arr.tobytes()
