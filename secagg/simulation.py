"""In-process transport: runs the real client and server state machines, bytes only between them.

`aggregate_in_process` is what privlora calls in simulation: it encodes each client's float
vector, runs the five stages with every message serialised to bytes and parsed again on the other
side (no Python object crosses the "wire"), optionally drops clients before any stage, and decodes
the sum. `run_session` is the lower-level loop over already-built clients and server; its `tamper`
hook sees (and may replace or drop) every message in transit, which is how the tests play a
malicious server or network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import messages as m
from .client import SecAggClient
from .encoding import ClipArg, EncodingSpec
from .errors import BadSignature, ConfigurationError, DuplicateKey, InvalidInput, MessageError, SecAggError
from .params import Plan, SecAggParams
from .primitives import ed25519_keypair
from .server import SecAggServer, ServerResult

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmasking")

Tamper = Callable[[m.Kind, int, int, bytes], "bytes | None"]
"""tamper(kind, sender, recipient, blob) -> the bytes to deliver instead, or None to drop them."""


@dataclass
class SessionStats:
    """What crossed the wire, and how long each party computed."""

    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    client_stage_seconds: dict[str, dict[int, float]] = field(default_factory=lambda: {s: {} for s in ("encode",) + STAGES})
    server_seconds: float = 0.0


@dataclass
class SumResult:
    """The outcome of one secure aggregation.

    sum: float64 vector, the decoded sum of the survivors' (clipped, quantized) inputs.
    survivors: sorted ids whose input is in the sum.
    dropped: sorted ids that shared keys but whose input is not in the sum (masks removed).
    clipped: total number of clipped coordinates over the survivors (learnt through the secure
        sum, never per client); clipped_per_segment: the same per clip segment.
    bytes_up / bytes_down: per client, bytes sent to / received from the server.
    client_seconds: per client, compute time in its own state machine (encoding included);
        client_stage_seconds: the same per stage; server_seconds: the server's compute time.
    field_sum: the exact sum mod 2^b of the encodings (data then clipped counts).
    """

    sum: np.ndarray
    survivors: list[int]
    dropped: list[int]
    clipped: int
    clipped_per_segment: tuple[int, ...]
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    client_seconds: dict[int, float]
    client_stage_seconds: dict[str, dict[int, float]]
    server_seconds: float
    field_sum: np.ndarray
    plan: Plan
    spec: EncodingSpec


def generate_signing_keys(client_ids) -> tuple[dict[int, Ed25519PrivateKey], dict[int, bytes]]:
    """Fresh Ed25519 keys: (private keys each client keeps, the public registry to pin)."""
    private, public = {}, {}
    for cid in client_ids:
        private[cid], public[cid] = ed25519_keypair()
    return private, public


def _normalise_drop(drop: Mapping[str, set[int]] | None, ids) -> dict[str, set[int]]:
    out = {s: set() for s in STAGES}
    for stage, who in (drop or {}).items():
        if stage not in out:
            raise ConfigurationError(f"unknown stage {stage!r} in drop; stages are {STAGES}")
        unknown = set(who) - set(ids)
        if unknown:
            raise ConfigurationError(f"drop[{stage!r}] names unknown clients {sorted(unknown)[:5]}")
        out[stage] = set(who)
    return out


def run_session(
    clients: Mapping[int, SecAggClient],
    server: SecAggServer,
    drop: Mapping[str, set[int]] | None = None,
    tamper: Tamper | None = None,
    transcript: list | None = None,
    client_errors: dict | None = None,
    provide_input: Callable[[int], np.ndarray] | None = None,
    server_errors: dict | None = None,
) -> tuple[ServerResult, SessionStats]:
    """Run the five stages. A client in drop[stage] stops before sending its message of that
    stage (and never comes back). Errors of either side propagate with their names, unless
    `client_errors` is a dict: then a client's `SecAggError` is recorded there (id -> error) and
    the client counts as dropped, as a real client that aborts simply goes silent.
    `server_errors`, if a dict, plays a server that ignores a client whose message it refused:
    the refusal (a `MessageError`, `BadSignature` or `DuplicateKey`, which leave the server's
    state untouched) is recorded there (id -> error) and that client is treated as silent from
    then on. Without it the refusal propagates.
    `transcript`, if given, receives (kind, sender, recipient, nbytes) for every message sent.
    `provide_input(id)`, if given, is called just before a client masks, and its vector is set as
    that client's input then (encoding counted as client time): clients need not hold encoded
    inputs for the whole session, which keeps memory at one vector for large simulations.
    """
    drop = _normalise_drop(drop, clients)
    st = SessionStats()
    for cid in clients:
        st.bytes_up[cid] = st.bytes_down[cid] = 0
        st.client_seconds[cid] = 0.0

    def on_client(cid: int, stage: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            dt = time.perf_counter() - t0
            st.client_seconds[cid] += dt
            st.client_stage_seconds[stage][cid] = st.client_stage_seconds[stage].get(cid, 0.0) + dt

    def on_server(fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            st.server_seconds += time.perf_counter() - t0

    def transit(kind, sender, recipient, blob):
        if transcript is not None:
            transcript.append((kind, sender, recipient, len(blob)))
        return blob if tamper is None else tamper(kind, sender, recipient, blob)

    def up(cid: int, blob: bytes) -> None:
        blob = transit(m.peek_kind(blob), cid, m.SERVER, blob)
        if blob is not None:
            st.bytes_up[cid] += len(blob)
            try:
                on_server(server.receive, cid, blob)
            except (MessageError, BadSignature, DuplicateKey) as exc:
                if server_errors is None:
                    raise
                server_errors[cid] = exc
                alive.discard(cid)

    alive = set(clients) - drop["advertise_keys"]
    for cid in sorted(alive):
        up(cid, on_client(cid, "advertise_keys", clients[cid].advertise))
    for stage in STAGES[1:]:
        recipients = on_server(server.close_stage)
        alive -= drop[stage]
        for cid in recipients:
            if cid not in alive:
                continue
            blob = on_server(server.message_for, cid)
            blob = transit(m.peek_kind(blob), m.SERVER, cid, blob)
            if blob is None:
                continue
            st.bytes_down[cid] += len(blob)
            try:
                if provide_input is not None and stage == "masked_input":
                    on_client(cid, "encode", clients[cid].set_input, provide_input(cid))
                reply = on_client(cid, stage, clients[cid].handle, blob)
            except SecAggError as exc:
                if client_errors is None:
                    raise
                client_errors[cid] = exc
                alive.discard(cid)
                continue
            up(cid, reply)
    on_server(server.close_stage)
    return server.result, st


def aggregate_in_process(
    inputs: Mapping[int, np.ndarray],
    clip: ClipArg,
    params: SecAggParams,
    round_id: int = 0,
    drop: Mapping[str, set[int]] | None = None,
    *,
    client_signing_keys: Mapping[int, Ed25519PrivateKey] | None = None,
    tamper: Tamper | None = None,
    transcript: list | None = None,
) -> SumResult:
    """Securely sum float64 vectors of equal length, one per client id, in one process.

    clip: one range for every coordinate, or a list of (length, range) segments in order.
    drop: {stage: client ids that drop before sending their message of that stage}, stages as in
        `STAGES`. Clients dropped before "masked_input" are not in the sum; later ones are.
    client_signing_keys: each client's Ed25519 private key; required when
        `params.signing_keys` pins a registry (see `generate_signing_keys`).
    tamper, transcript: see `run_session` (tests and fault injection).

    Every call draws a fresh 32-byte session nonce (os.urandom) for its server and clients, so
    two calls with the same round id are two different sessions.

    Raises a `SecAggError` subclass on any refusal. It never returns a sum that differs from the
    sum of the survivors' encoded inputs: every message that carries what the sum is made of is
    signed, and every reconstructed secret is checked (see SECURITY.md for what this assumes).
    """
    if not inputs:
        raise InvalidInput("no inputs")
    ids = sorted(inputs)
    if any(not isinstance(c, int) or isinstance(c, bool) for c in ids):
        raise InvalidInput("client ids must be ints")
    lengths = {np.asarray(inputs[c]).shape for c in ids}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise InvalidInput(f"inputs must be 1-D vectors of one common length, found shapes {sorted(lengths)[:3]}")
    (length,) = next(iter(lengths))
    plan = params.resolve(len(ids))
    spec = EncodingSpec.build(clip, length, bits=plan.bits, max_clients=plan.n_max, precision_bits=plan.precision_bits)
    if plan.pinned and client_signing_keys is None:
        raise ConfigurationError("params.signing_keys pins a registry: pass client_signing_keys (each client's private key)")
    keys = client_signing_keys or {}
    nonce = os.urandom(32)
    clients = {c: SecAggClient(c, plan, spec, round_id, keys.get(c), session_nonce=nonce) for c in ids}
    encode_seconds = {}
    for c in ids:
        t0 = time.perf_counter()
        clients[c].set_input(inputs[c])
        encode_seconds[c] = time.perf_counter() - t0
    server = SecAggServer(plan, spec, round_id, expected=ids, session_nonce=nonce)
    res, st = run_session(clients, server, drop, tamper, transcript)
    for c in ids:
        st.client_seconds[c] += encode_seconds[c]
    st.client_stage_seconds["encode"].update(encode_seconds)
    total, counts = spec.decode(res.field_sum)
    return SumResult(
        sum=total,
        survivors=list(res.survivors),
        dropped=list(res.dropped),
        clipped=sum(counts),
        clipped_per_segment=counts,
        bytes_up=st.bytes_up,
        bytes_down=st.bytes_down,
        client_seconds=st.client_seconds,
        client_stage_seconds=st.client_stage_seconds,
        server_seconds=st.server_seconds,
        field_sum=res.field_sum,
        plan=plan,
        spec=spec,
    )
