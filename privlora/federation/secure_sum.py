"""The transport of one round's contributions: a plain sum, or a secure sum through `secagg`.

Every strategy's contribution is a dict of arrays whose key-wise sum is all the server needs
(`strategies.base`). Under secure aggregation each client's dict is flattened in sorted key
order into one float64 vector (on its own node, `privlora.federation.node`) and fed to the masked protocol:
`secure_sum_over` runs `secagg`'s server here and every client's state machine on its node, one
transport exchange per stage, whatever the transport (in process or Flower); the server gets
back only the decoded sum, which is unflattened into the same dict layout.

Fixed point needs public ranges: the contribution's weight (``__weight__``) lies in
[0, secagg.max_weight] and every other coordinate in +-(secagg.value_bound * max_weight).
Values outside are clipped; the count of clipped coordinates is returned and written to
metrics.jsonl (never silent).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from privlora.core.config import ExperimentConfig
from privlora.strategies import WEIGHT_KEY

State = dict[str, np.ndarray]


@dataclass
class SecureSumReport:
    survivors: list[int]
    clipped: int
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    seconds: float
    values: int
    dropped: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        n = max(1, len(self.bytes_up))
        return {
            "survivors": self.survivors,
            "dropped": self.dropped,
            "clipped": self.clipped,
            "values": self.values,
            "bytes_up_per_client": sum(self.bytes_up.values()) / n,
            "bytes_down_per_client": sum(self.bytes_down.values()) / n,
            "seconds": self.seconds,
        }


def layout(state: State) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(state[k].shape)) for k in sorted(state)]


def flatten(state: State, spec: list[tuple[str, tuple[int, ...]]]) -> np.ndarray:
    if [k for k, _ in spec] != sorted(state) or any(tuple(state[k].shape) != s for k, s in spec):
        raise ValueError("contributions of one round must have the same keys and shapes to be summed securely")
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k, _ in spec])


def unflatten(vec: np.ndarray, spec: list[tuple[str, tuple[int, ...]]]) -> State:
    out, at = {}, 0
    for k, shape in spec:
        n = int(np.prod(shape))
        out[k] = vec[at : at + n].reshape(shape).astype(np.float32)
        at += n
    return out


def clip_segments(cfg: ExperimentConfig, spec: list[tuple[str, tuple[int, ...]]]) -> list[tuple[int, float]]:
    s = cfg.secagg
    return [(int(np.prod(shape)), s.max_weight if k == WEIGHT_KEY else s.value_bound * s.max_weight) for k, shape in spec]


def params_from_config(cfg: ExperimentConfig):
    """The `secagg.SecAggParams` of a run: bits, threshold, SecAgg+ degree, pinned keys, the
    assumed dropout rate and the least list size (`privlora.federation.session_rules`), all from
    the config."""
    from privlora.federation.keys import load_registry
    from privlora.federation.session_rules import session_size
    from secagg import SecAggParams

    s = cfg.secagg
    z = session_size(cfg)
    registry = load_registry(s.key_registry) if s.key_registry else None
    return SecAggParams(bits=s.bits, threshold=z.threshold, neighbours=z.degree, signing_keys=registry,
                        dropout_rate=float(s.dropout_rate), min_clients=z.least)


def session_plan(cfg: ExperimentConfig, spec: list[tuple[str, tuple[int, ...]]]):
    """(plan, encoding) of one round's session, computed alike by the server and every client from
    the config and the contribution's layout, never from how many clients the server invites: at
    most ``federation.clients_per_round`` clients (n_max), the config's threshold, and at least
    max(3, t) live inputs (`session_rules.session_size`). The protocol's config digest makes any
    difference between the parties an error, never a wrong sum."""
    from secagg import EncodingSpec

    z = _size(cfg)
    plan = params_from_config(cfg).resolve(z.size)
    if (plan.threshold, plan.degree, plan.min_clients) != (z.threshold, z.degree, z.least):
        raise RuntimeError(f"secagg resolved {plan} but the config says {z}")  # a bug, never a session
    length = int(sum(int(np.prod(shape)) for _, shape in spec))
    if _integer_spec(cfg, spec):  # distributed DP: integers mod 2^client_bits, no fixed point
        encoding = EncodingSpec.integers(length, modulus_bits=int(cfg.privacy.client_bits), bits=plan.bits, max_clients=plan.n_max)
        return plan, encoding
    encoding = EncodingSpec.build(clip_segments(cfg, spec), length, bits=plan.bits, max_clients=plan.n_max, precision_bits=plan.precision_bits)
    return plan, encoding


def _integer_spec(cfg: ExperimentConfig, spec: list[tuple[str, tuple[int, ...]]]) -> bool:
    """True when this round's contributions are distributed DP's integer vectors: the config says
    so (never the layout alone), and the layout must then be exactly that one vector."""
    from privlora.federation.client_level import DISTRIBUTED_KEY, is_distributed

    if not is_distributed(cfg):
        return False
    if [k for k, _ in spec] != [DISTRIBUTED_KEY] or len(spec[0][1]) != 1:
        raise ValueError(f"under distributed noise a contribution is one vector {DISTRIBUTED_KEY!r}; found the layout {spec[:3]}")
    return True


def _size(cfg: ExperimentConfig):
    from privlora.federation.session_rules import session_size

    return session_size(cfg)


def _request(rnd: int, cid: int, stage: str, blob: bytes = b"", invited: list[int] | None = None, nonce: bytes | None = None) -> bytes:
    from privlora.federation.messages import Message, bytes_tensor

    header = {"round": rnd, "client_id": cid, "stage": stage}
    if invited is not None:
        header["invited"] = list(invited)
    if nonce is not None:
        header["session_nonce"] = nonce.hex()
    return Message("secagg_request", header, {"blob": bytes_tensor(blob)}).to_bytes()


def _reply_blob(blob: bytes, cid: int, rnd: int, stage: str) -> bytes:
    from privlora.federation.messages import Message, MessageError, tensor_bytes

    msg = Message.from_bytes(blob, "secagg_reply")
    h = msg.header
    if h.get("client_id") != cid or h.get("round") != rnd or h.get("stage") != stage:
        raise MessageError(f"secagg reply from client {cid} claims client {h.get('client_id')}, round {h.get('round')}, stage {h.get('stage')}")
    return tensor_bytes(msg)


def secure_sum_over(transport, cfg: ExperimentConfig, rnd: int, clients: list[int],
                    spec: list[tuple[str, tuple[int, ...]]]) -> tuple[State, SecureSumReport]:
    """The key-wise sum of the ``clients``' contributions of round ``rnd``, computed by running
    `secagg`'s server here and each client's state machine on its node, one `Transport.exchange`
    per protocol stage. A client that does not answer a stage within ``secagg.stage_timeout`` (or
    whose message is refused by the server) is a dropout; the protocol removes its masks or, below
    the threshold, the server aborts (`secagg.TooFewSurvivors`) before any unmasking share is
    requested. The server never holds an unmasked contribution."""
    from secagg import STAGES, SecAggError, SecAggServer

    clients = sorted(clients)
    plan, encoding = session_plan(cfg, spec)
    # a fresh nonce binds every advertisement to this session: a round that is run again (after
    # a resume, or an aborted attempt) never accepts an advertisement of the earlier session
    nonce = os.urandom(32)
    server = SecAggServer(plan, encoding, rnd, expected=clients, session_nonce=nonce)
    timeout = cfg.secagg.stage_timeout
    up0, down0 = dict(transport.stats.bytes_up), dict(transport.stats.bytes_down)
    t = time.perf_counter()
    messages = {c: _request(rnd, c, STAGES[0], invited=clients, nonce=nonce) for c in clients}
    for stage_index, stage in enumerate(STAGES):
        replies = transport.exchange(stage, messages, timeout)
        for c, blob in replies.items():
            try:
                server.receive(c, _reply_blob(blob, c, rnd, stage))
            except SecAggError as exc:  # one client's bad message makes it a dropout, not the round's end
                print(f"privlora: round {rnd}: secure aggregation refused client {c}'s {stage} message: "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)
        recipients = server.close_stage()
        if stage_index + 1 < len(STAGES):
            nxt = STAGES[stage_index + 1]
            messages = {c: _request(rnd, c, nxt, server.message_for(c)) for c in recipients}
    res = server.result
    total, counts = encoding.decode(res.field_sum)
    summed = {spec[0][0]: np.asarray(total)} if encoding.modulus_bits else unflatten(np.asarray(total), spec)
    up = {c: transport.stats.bytes_up.get(c, 0) - up0.get(c, 0) for c in clients}
    down = {c: transport.stats.bytes_down.get(c, 0) - down0.get(c, 0) for c in clients}
    report = SecureSumReport(
        survivors=list(res.survivors),
        clipped=int(sum(counts)),
        bytes_up=up,
        bytes_down=down,
        seconds=time.perf_counter() - t,
        values=int(sum(n for n, _ in clip_segments(cfg, spec))),
        dropped=list(res.dropped),
    )
    return summed, report
