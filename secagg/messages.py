"""Typed, versioned protocol messages as length-checked bytes (struct; never pickle).

Every message is a 64-byte envelope followed by a body:

    magic "PLSA" | version u8 | kind u8 | reserved u16 (=0) | round u64 | session 32 bytes |
    sender u32 | recipient u32 | body length u64 | body

(big-endian; the server's id on the wire is 0xFFFFFFFF). Before the session id exists -- the key
advertisement and the key list -- the session field is all zero. `decode` checks, in order: type,
the hard size cap, length, magic, version, kind, reserved bits, body length (truncated or
trailing bytes -> `MalformedMessage`); round and session (-> `ReplayedMessage`); recipient
(-> `WrongRecipient`); sender (-> `WrongSender`); kind against the receiver's stage
(-> `WrongStage`); the size limit of that kind for this session (-> `MalformedMessage`); then
the body, whose every count and length must match exactly. (Only the 64-byte envelope is read
before the size limit, so a well-formed message of another stage is refused by name, whatever
its size.) Lists of
client ids and of positions must be strictly increasing (no duplicates, one canonical encoding).
Masked vectors are little-endian uint32/uint64.

Bodies (counts are u32, ids u32, positions u32):
    ADVERTISE_KEYS  c_pk 32 | s_pk 32 | sig_pk 32 | signature 64
    KEY_LIST        config digest 32 | count L | L x (id | entry digest 32)
                    | count h | h x (id | c_pk | s_pk | sig_pk | signature)
                    (commitments to every listed client, then the recipient's share holders in full)
    SHARE_KEYS      count | count x (recipient | encrypted shares 168) | seed commitment 32 | signature 64
    ROUTED_SHARES   count | count x (sender | encrypted shares 168)
    MASKED_INPUT    the masked vector, exactly (length x bits/8) bytes | signature 64
    SURVIVOR_LIST   count | positions
    CONSISTENCY_SIGNATURE  signature 64
    UNMASK_REQUEST  count | survivor positions | count | dropped positions | count | count x (id | signature)
    UNMASK_SHARES   count | count x (owner | share 66) | count | count x (owner | share 66) | signature 64
                    (self-mask seed shares of survivors, then mask-key shares of dropped clients)

A *position* is an index into the key list's L commitments (sorted by client id), which the
session id binds: the survivor and dropped sets are named by position so that a client can check
them (every member listed, its own holders' membership) knowing only L and its holders' positions.

Version 2 added the trailing signature of the three client messages that carry what the sum is
made of (`SIGNED_KINDS`): Ed25519, by the sender's signing key, over `signed_digest` -- the
envelope's kind, round, session, sender and recipient and SHA-256 of the body before the
signature -- so a flipped bit anywhere in a masked vector or an unmasking share is refused by
the server (`BadSignature`) instead of changing the sum. SHARE_KEYS also carries the client's
commitment to its self-mask seed, against which the server checks the seed it reconstructs.

Version 3: a key list carries every listed client's 36-byte commitment (id and SHA-256 of its
keys, `primitives.entry_digest`) and only the recipient's share holders' entries in full (all
of them for the complete graph), instead of every entry in full; survivor and dropped sets are
key-list positions instead of ids. A client receives and keeps O(k) keys, not O(n).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .errors import MalformedMessage, ReplayedMessage, WrongRecipient, WrongSender, WrongStage
from .primitives import KEY_BYTES, LISTED_BYTES, NONCE_BYTES, SIG_BYTES, TAG_BYTES, listed_block
from .shamir import SHARE_BYTES

MAGIC = b"PLSA"
VERSION = 3
SERVER = 0xFFFFFFFF
NO_SESSION = bytes(32)
_ENVELOPE = struct.Struct(">4sBBHQ32sIIQ")
ENVELOPE_BYTES = _ENVELOPE.size  # 64
SHARE_PLAINTEXT_BYTES = 4 + 4 + 2 * SHARE_BYTES  # sender | recipient | b share | s_sk share
SHARE_CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES  # 168
ENTRY_BYTES = 4 + 3 * KEY_BYTES + SIG_BYTES  # one key entry in full: id | c_pk | s_pk | sig_pk | signature
MAX_MESSAGE_BYTES = (1 << 33) + ENVELOPE_BYTES  # hard cap whatever the context


class Stage(IntEnum):
    """The five stages of Bonawitz et al., bound into AEAD associated data and signatures."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY_CHECK = 4
    UNMASKING = 5


class Kind(IntEnum):
    ADVERTISE_KEYS = 1  # client -> server
    KEY_LIST = 2  # server -> client
    SHARE_KEYS = 3  # client -> server
    ROUTED_SHARES = 4  # server -> client
    MASKED_INPUT = 5  # client -> server
    SURVIVOR_LIST = 6  # server -> client
    CONSISTENCY_SIGNATURE = 7  # client -> server
    UNMASK_REQUEST = 8  # server -> client
    UNMASK_SHARES = 9  # client -> server


PRE_SESSION_KINDS = (Kind.ADVERTISE_KEYS, Kind.KEY_LIST)
SIGNED_KINDS = (Kind.SHARE_KEYS, Kind.MASKED_INPUT, Kind.UNMASK_SHARES)  # body ends in a signature
COMMITMENT_BYTES = 32


def signed_digest(kind: Kind, round_id: int, session: bytes, sender: int, recipient: int, content) -> bytes:
    """What the sender of a `SIGNED_KINDS` message signs: SHA-256 over a label, the envelope's
    binding fields and the body before its signature (`content`, bytes or a memoryview)."""
    h = hashlib.sha256(b"privlora-secagg/v2/signed-message")
    h.update(struct.pack(">BQ32sII", kind, round_id, session, sender, recipient))
    h.update(content)
    return h.digest()


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    round_id: int
    session: bytes
    sender: int
    recipient: int


@dataclass(frozen=True)
class Context:
    """What the receiver expects: its round, session, own id, and the size bounds of a body."""

    round_id: int
    session: bytes
    recipient: int
    n_max: int
    vector_bytes: int = 0  # exact size of a MASKED_INPUT body
    sender: int | None = None  # the party the message arrived from, when the transport knows it


# ---- bodies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    c_pk: bytes
    s_pk: bytes
    sig_pk: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyEntry:
    client_id: int
    c_pk: bytes
    s_pk: bytes
    sig_pk: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyList:
    """`entries`: the key entries sent in full (the recipient's share holders), ids increasing.
    `listed`: the commitments to every listed client, L x (id u32 | entry digest 32) in increasing
    id order (`primitives.listed_block`); None when building one means "every entry is in
    `entries`" and derives them from it. Decoded key lists always carry them (bytes)."""

    config_digest: bytes
    entries: tuple[KeyEntry, ...]
    listed: bytes | None = None

    @property
    def listed_count(self) -> int:
        return len(self.listed_bytes()) // LISTED_BYTES

    def listed_bytes(self) -> bytes:
        if self.listed is not None:
            return self.listed
        return listed_block((e.client_id, e.c_pk, e.s_pk, e.sig_pk) for e in self.entries)


_LISTED_DTYPE = np.dtype([("id", ">u4"), ("digest", "V32")])


def listed_ids(listed: bytes | memoryview) -> np.ndarray:
    """The client ids of a key list's commitments, as a native uint32 array."""
    return np.frombuffer(listed, dtype=_LISTED_DTYPE)["id"].astype(np.uint32)


def listed_digest(listed: bytes | memoryview, position: int) -> bytes:
    """The entry digest committed at `position` of a key list's commitments."""
    start = position * LISTED_BYTES + 4
    return bytes(listed[start : start + 32])


def entry_bytes(e: KeyEntry) -> bytes:
    """One key entry as it appears in full in a KEY_LIST body (`ENTRY_BYTES`)."""
    return (_u32(e.client_id) + _fixed(e.c_pk, KEY_BYTES, "c_pk") + _fixed(e.s_pk, KEY_BYTES, "s_pk")
            + _fixed(e.sig_pk, KEY_BYTES, "sig_pk") + _fixed(e.signature, SIG_BYTES, "signature"))


@dataclass(frozen=True)
class ShareKeys:
    shares: tuple[tuple[int, bytes], ...]  # (recipient, ciphertext), recipients increasing
    commitment: bytes = bytes(COMMITMENT_BYTES)  # to the sender's self-mask seed
    signature: bytes = bytes(SIG_BYTES)


@dataclass(frozen=True)
class RoutedShares:
    shares: tuple[tuple[int, bytes], ...]  # (sender, ciphertext), senders increasing


@dataclass(frozen=True)
class MaskedInput:
    vector: bytes | memoryview
    signature: bytes = bytes(SIG_BYTES)


@dataclass(frozen=True, eq=False)
class SurvivorList:
    survivors: tuple[int, ...] | np.ndarray  # key-list positions, increasing (decoded: a uint32 array)


@dataclass(frozen=True)
class ConsistencySignature:
    signature: bytes


@dataclass(frozen=True, eq=False)
class UnmaskRequest:
    survivors: tuple[int, ...] | np.ndarray  # key-list positions, increasing (decoded: uint32 arrays)
    dropped: tuple[int, ...] | np.ndarray
    signatures: tuple[tuple[int, bytes], ...]  # (client id, signature over the survivor set), ids increasing


@dataclass(frozen=True)
class UnmaskShares:
    self_mask_shares: tuple[tuple[int, bytes], ...]  # (owner, share) for survivors
    key_shares: tuple[tuple[int, bytes], ...]  # (owner, share) for dropped clients
    signature: bytes = bytes(SIG_BYTES)


Body = (
    AdvertiseKeys | KeyList | ShareKeys | RoutedShares | MaskedInput | SurvivorList
    | ConsistencySignature | UnmaskRequest | UnmaskShares
)
_KIND_OF = {
    AdvertiseKeys: Kind.ADVERTISE_KEYS,
    KeyList: Kind.KEY_LIST,
    ShareKeys: Kind.SHARE_KEYS,
    RoutedShares: Kind.ROUTED_SHARES,
    MaskedInput: Kind.MASKED_INPUT,
    SurvivorList: Kind.SURVIVOR_LIST,
    ConsistencySignature: Kind.CONSISTENCY_SIGNATURE,
    UnmaskRequest: Kind.UNMASK_REQUEST,
    UnmaskShares: Kind.UNMASK_SHARES,
}


# ---- encoding -------------------------------------------------------------------------------


def _u32(x: int) -> bytes:
    return struct.pack(">I", x)


def _fixed(b: bytes, n: int, what: str) -> bytes:
    if len(b) != n:
        raise ValueError(f"{what} must be {n} bytes, found {len(b)}")
    return bytes(b)


def _ids(ids) -> bytes:
    """count | the ids (or positions), from any sequence of ints or an integer array."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel()
    if arr.size and (np.any(arr[1:] <= arr[:-1]) or arr[0] < 0 or arr[-1] > 0xFFFFFFFF):
        raise ValueError("id lists must be strictly increasing u32 values")
    return _u32(int(arr.size)) + arr.astype(">u4").tobytes()


def encode_ids(ids) -> bytes:
    """count | u32 values: a SURVIVOR_LIST body, or one of an UNMASK_REQUEST's two position lists."""
    return _ids(ids)


def encode_signatures(pairs) -> bytes:
    """count | (id | signature) pairs, ids increasing: the end of an UNMASK_REQUEST body."""
    return _pairs(pairs, SIG_BYTES, "signatures")


def _pairs(pairs, size: int, what: str) -> bytes:
    pairs = list(pairs)
    if any(b[0] <= a[0] for a, b in zip(pairs, pairs[1:])):
        raise ValueError(f"{what} must be sorted by strictly increasing id")
    return _u32(len(pairs)) + b"".join(_u32(i) + _fixed(x, size, what) for i, x in pairs)


def encode_body(body: Body) -> bytes:
    if isinstance(body, AdvertiseKeys):
        return (
            _fixed(body.c_pk, KEY_BYTES, "c_pk") + _fixed(body.s_pk, KEY_BYTES, "s_pk")
            + _fixed(body.sig_pk, KEY_BYTES, "sig_pk") + _fixed(body.signature, SIG_BYTES, "signature")
        )
    if isinstance(body, KeyList):
        ids = [e.client_id for e in body.entries]
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise ValueError("key list entries must be sorted by strictly increasing id")
        listed = body.listed_bytes()
        if len(listed) % LISTED_BYTES:
            raise ValueError(f"key list commitments are {LISTED_BYTES} bytes each")
        return b"".join((
            _fixed(body.config_digest, 32, "config digest"), _u32(len(listed) // LISTED_BYTES), bytes(listed),
            _u32(len(body.entries)), *(entry_bytes(e) for e in body.entries),
        ))
    if isinstance(body, ShareKeys):
        return (_pairs(body.shares, SHARE_CIPHERTEXT_BYTES, "encrypted shares") + _fixed(body.commitment, COMMITMENT_BYTES, "commitment")
                + _fixed(body.signature, SIG_BYTES, "signature"))
    if isinstance(body, RoutedShares):
        return _pairs(body.shares, SHARE_CIPHERTEXT_BYTES, "encrypted shares")
    if isinstance(body, MaskedInput):
        return bytes(body.vector) + _fixed(body.signature, SIG_BYTES, "signature")
    if isinstance(body, SurvivorList):
        return _ids(body.survivors)
    if isinstance(body, ConsistencySignature):
        return _fixed(body.signature, SIG_BYTES, "signature")
    if isinstance(body, UnmaskRequest):
        return _ids(body.survivors) + _ids(body.dropped) + _pairs(body.signatures, SIG_BYTES, "signatures")
    if isinstance(body, UnmaskShares):
        return (_pairs(body.self_mask_shares, SHARE_BYTES, "self-mask shares") + _pairs(body.key_shares, SHARE_BYTES, "key shares")
                + _fixed(body.signature, SIG_BYTES, "signature"))
    raise TypeError(f"not a message body: {type(body).__name__}")


def frame(kind: Kind, payload, *, round_id: int, session: bytes, sender: int, recipient: int) -> bytes:
    """Envelope + an already encoded body (bytes, a memoryview, or a tuple of parts joined once)."""
    if len(session) != 32:
        raise ValueError("session ids are 32 bytes")
    parts = tuple(payload) if isinstance(payload, tuple) else (payload,)
    size = sum(memoryview(p).nbytes for p in parts)
    head = _ENVELOPE.pack(MAGIC, VERSION, kind, 0, round_id, session, sender, recipient, size)
    return b"".join((head, *parts))


def encode(body: Body, *, round_id: int, session: bytes, sender: int, recipient: int) -> bytes:
    """Envelope + body as bytes. `session` is NO_SESSION for the two pre-session kinds."""
    kind = _KIND_OF[type(body)]
    if isinstance(body, MaskedInput):  # no extra copy of a vector
        payload = (memoryview(body.vector).cast("B"), _fixed(body.signature, SIG_BYTES, "signature"))
    else:
        payload = encode_body(body)
    return frame(kind, payload, round_id=round_id, session=session, sender=sender, recipient=recipient)


# ---- decoding -------------------------------------------------------------------------------


class _Reader:
    def __init__(self, buf: memoryview, kind: Kind):
        self.buf, self.pos, self.kind = buf, 0, kind

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise MalformedMessage(f"{self.kind.name} body is truncated")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def count(self, item_bytes: int, limit: int) -> int:
        n = self.u32()
        if n > limit:
            raise MalformedMessage(f"{self.kind.name} lists {n} items, more than the {limit} allowed")
        if self.pos + n * item_bytes > len(self.buf):
            raise MalformedMessage(f"{self.kind.name} body is truncated ({n} items announced)")
        return n

    def ids(self, limit: int) -> np.ndarray:
        """count | u32 values, strictly increasing, as a uint32 array (no per-id Python object)."""
        n = self.count(4, limit)
        out = np.frombuffer(self.buf, dtype=">u4", count=n, offset=self.pos).astype(np.uint32)
        self.pos += 4 * n
        _check_increasing_array(out, self.kind)
        return out

    def pairs(self, size: int, limit: int) -> tuple[tuple[int, bytes], ...]:
        n = self.count(4 + size, limit)
        block = self.take(n * (4 + size))
        step = 4 + size
        out = tuple((int.from_bytes(block[i : i + 4], "big"), block[i + 4 : i + step]) for i in range(0, len(block), step))
        _check_increasing([i for i, _ in out], self.kind)
        return out

    def done(self) -> None:
        if self.pos != len(self.buf):
            raise MalformedMessage(f"{self.kind.name} body has {len(self.buf) - self.pos} trailing bytes")


def _check_increasing(ids, kind: Kind) -> None:
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise MalformedMessage(f"{kind.name}: ids are not strictly increasing (duplicate or unsorted)")
    if ids and ids[-1] == SERVER:
        raise MalformedMessage(f"{kind.name}: the server's id is not a client id")


def _check_increasing_array(ids: np.ndarray, kind: Kind) -> None:
    if ids.size > 1 and not np.all(ids[1:] > ids[:-1]):
        raise MalformedMessage(f"{kind.name}: ids are not strictly increasing (duplicate or unsorted)")
    if ids.size and int(ids[-1]) == SERVER:
        raise MalformedMessage(f"{kind.name}: the server's id is not a client id")


def max_body_bytes(kind: Kind, n_max: int, vector_bytes: int) -> int:
    """Largest acceptable body of `kind` for a session of at most n_max clients."""
    n = n_max
    return {
        Kind.ADVERTISE_KEYS: 3 * KEY_BYTES + SIG_BYTES,
        Kind.KEY_LIST: 40 + n * (LISTED_BYTES + ENTRY_BYTES),
        Kind.SHARE_KEYS: 4 + n * (4 + SHARE_CIPHERTEXT_BYTES) + COMMITMENT_BYTES + SIG_BYTES,
        Kind.ROUTED_SHARES: 4 + n * (4 + SHARE_CIPHERTEXT_BYTES),
        Kind.MASKED_INPUT: vector_bytes + SIG_BYTES,
        Kind.SURVIVOR_LIST: 4 + 4 * n,
        Kind.CONSISTENCY_SIGNATURE: SIG_BYTES,
        Kind.UNMASK_REQUEST: 12 + 8 * n + n * (4 + SIG_BYTES),
        Kind.UNMASK_SHARES: 8 + 2 * n * (4 + SHARE_BYTES) + SIG_BYTES,
    }[kind]


def decode_body(kind: Kind, body: memoryview | bytes, ctx: Context) -> Body:
    """Parse a body of a known kind; every count and length must match exactly."""
    body = memoryview(body)
    r = _Reader(body, kind)
    n = ctx.n_max
    if kind is Kind.ADVERTISE_KEYS:
        out = AdvertiseKeys(r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(SIG_BYTES))
    elif kind is Kind.KEY_LIST:
        digest = r.take(32)
        listed = r.take(r.count(LISTED_BYTES, n) * LISTED_BYTES)
        _check_increasing_array(listed_ids(listed), kind)
        count = r.count(ENTRY_BYTES, n)
        entries = tuple(
            KeyEntry(r.u32(), r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(SIG_BYTES))
            for _ in range(count)
        )
        _check_increasing([e.client_id for e in entries], kind)
        out = KeyList(digest, entries, listed)
    elif kind is Kind.SHARE_KEYS:
        out = ShareKeys(r.pairs(SHARE_CIPHERTEXT_BYTES, n), r.take(COMMITMENT_BYTES), r.take(SIG_BYTES))
    elif kind is Kind.ROUTED_SHARES:
        out = RoutedShares(r.pairs(SHARE_CIPHERTEXT_BYTES, n))
    elif kind is Kind.MASKED_INPUT:
        if len(body) != ctx.vector_bytes + SIG_BYTES:
            raise MalformedMessage(f"masked input is {len(body)} bytes, expected exactly {ctx.vector_bytes} + a {SIG_BYTES}-byte signature")
        return MaskedInput(body[:-SIG_BYTES], bytes(body[-SIG_BYTES:]))
    elif kind is Kind.SURVIVOR_LIST:
        out = SurvivorList(r.ids(n))
    elif kind is Kind.CONSISTENCY_SIGNATURE:
        out = ConsistencySignature(r.take(SIG_BYTES))
    elif kind is Kind.UNMASK_REQUEST:
        out = UnmaskRequest(r.ids(n), r.ids(n), r.pairs(SIG_BYTES, n))
    elif kind is Kind.UNMASK_SHARES:
        out = UnmaskShares(r.pairs(SHARE_BYTES, n), r.pairs(SHARE_BYTES, n), r.take(SIG_BYTES))
    else:  # pragma: no cover - Kind is closed
        raise MalformedMessage(f"unknown kind {kind}")
    r.done()
    return out


def peek_kind(blob: bytes) -> Kind | None:
    """The kind byte of a message, if it names a known kind (no other check)."""
    if isinstance(blob, (bytes, bytearray, memoryview)) and len(blob) >= ENVELOPE_BYTES:
        try:
            return Kind(blob[5])
        except ValueError:
            return None
    return None


def decode(blob: bytes, expect: Kind, ctx: Context) -> tuple[Envelope, Body]:
    """Check the envelope against the receiver's context and parse the body (see module doc)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, found {type(blob).__name__}")
    if len(blob) > MAX_MESSAGE_BYTES:
        raise MalformedMessage(f"message of {len(blob)} bytes is oversized (hard limit {MAX_MESSAGE_BYTES})")
    if len(blob) < ENVELOPE_BYTES:
        raise MalformedMessage(f"message of {len(blob)} bytes is shorter than the {ENVELOPE_BYTES}-byte envelope")
    view = memoryview(blob)
    magic, version, kind_b, reserved, round_id, session, sender, recipient, body_len = _ENVELOPE.unpack_from(view)
    if magic != MAGIC:
        raise MalformedMessage("not a secagg message (bad magic)")
    if version != VERSION:
        raise MalformedMessage(f"unsupported message version {version} (this is version {VERSION})")
    try:
        kind = Kind(kind_b)
    except ValueError:
        raise MalformedMessage(f"unknown message kind {kind_b}") from None
    if reserved:
        raise MalformedMessage("reserved envelope bits are set")
    if body_len != len(blob) - ENVELOPE_BYTES:
        raise MalformedMessage(f"body length field says {body_len} bytes but {len(blob) - ENVELOPE_BYTES} follow (truncated or trailing data)")
    if round_id != ctx.round_id:
        when = "an earlier" if round_id < ctx.round_id else "a later"
        raise ReplayedMessage(f"{kind.name} message from {when} round ({round_id}; this is round {ctx.round_id})")
    expected_session = NO_SESSION if kind in PRE_SESSION_KINDS else ctx.session
    if session != expected_session:
        raise ReplayedMessage(f"{kind.name} message from another session")
    if recipient != ctx.recipient:
        raise WrongRecipient(f"{kind.name} message addressed to {recipient:#x}, this is {ctx.recipient:#x}")
    if ctx.sender is not None and sender != ctx.sender:
        raise WrongSender(f"{kind.name} message claims sender {sender:#x} but arrived from {ctx.sender:#x}")
    if kind is not expect:
        raise WrongStage(f"received {kind.name} while expecting {expect.name}")
    limit = ENVELOPE_BYTES + max_body_bytes(expect, ctx.n_max, ctx.vector_bytes)
    if len(blob) > limit:
        raise MalformedMessage(f"message of {len(blob)} bytes is oversized for {expect.name} (limit {limit})")
    env = Envelope(kind, round_id, bytes(session), sender, recipient)
    return env, decode_body(kind, view[ENVELOPE_BYTES:], ctx)


def read_envelope(blob: bytes) -> tuple[Envelope, memoryview]:
    """The envelope and body of a structurally valid message, with no context checks.

    For transports that need to route by recipient, and for tests that play a malicious party.
    """
    if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < ENVELOPE_BYTES:
        raise MalformedMessage("message shorter than the envelope")
    magic, version, kind_b, reserved, round_id, session, sender, recipient, body_len = _ENVELOPE.unpack_from(blob)
    if magic != MAGIC or version != VERSION or reserved or body_len != len(blob) - ENVELOPE_BYTES:
        raise MalformedMessage("not a well-formed secagg envelope")
    try:
        kind = Kind(kind_b)
    except ValueError:
        raise MalformedMessage(f"unknown message kind {kind_b}") from None
    return Envelope(kind, round_id, bytes(session), sender, recipient), memoryview(blob)[ENVELOPE_BYTES:]
