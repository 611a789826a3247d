"""Random and mutated bytes into every decoder and both state machines: only named errors come out.

A `SecAggError` subclass is the only acceptable failure; an IndexError, struct.error, ValueError,
UnicodeDecodeError or anything else escaping would fail these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secagg import EncodingSpec, MessageError, SecAggClient, SecAggError, SecAggParams, SecAggServer
from secagg import messages as m

N, LEN = 3, 6
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def new_session():
    plan = SecAggParams().resolve(N)
    spec = EncodingSpec.build(1.0, LEN, bits=32, max_clients=N)
    clients = {c: SecAggClient(c, plan, spec, 1) for c in range(N)}
    for c in clients:
        clients[c].set_input(np.linspace(-1, 1, LEN))
    return clients, SecAggServer(plan, spec, 1, expected=range(N)), spec


def client_at(step: int):
    """Client 0 of a fresh session, waiting for server message `step` (0 = key list), and that message."""
    clients, server, _ = new_session()
    for c in clients:
        server.receive(c, clients[c].advertise())
    for k in range(step + 1):
        ids = server.close_stage()
        msgs = {c: server.message_for(c) for c in ids}
        if k == step:
            return clients[0], msgs[0]
        for c in ids:
            server.receive(c, clients[c].handle(msgs[c]))


def server_at(step: int):
    """A fresh server waiting for client messages of stage `step` (0 = advertisements), with client
    1's real message for that stage; the other clients' messages have already arrived."""
    clients, server, _ = new_session()
    blobs = {c: clients[c].advertise() for c in clients}
    for k in range(step + 1):
        for c in clients:
            if k == step and c == 1:
                return server, blobs[1]
            server.receive(c, blobs[c])
        ids = server.close_stage()
        blobs = {c: clients[c].handle(server.message_for(c)) for c in ids}


def context_for(kind: m.Kind, session: bytes = bytes(32)) -> m.Context:
    to_server = kind in (m.Kind.ADVERTISE_KEYS, m.Kind.SHARE_KEYS, m.Kind.MASKED_INPUT, m.Kind.CONSISTENCY_SIGNATURE, m.Kind.UNMASK_SHARES)
    return m.Context(1, session, m.SERVER if to_server else 0, N, vector_bytes=4 * (LEN + 1))


@st.composite
def mutated(draw, blob: bytes):
    """A real message with one random corruption: bit flip, truncation, extension or overwrite."""
    data = bytearray(blob)
    op = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite"]))
    if op == "flip":
        i = draw(st.integers(0, len(data) * 8 - 1))
        data[i // 8] ^= 1 << (i % 8)
    elif op == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "extend":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        i = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        data[i : i + len(patch)] = patch
    return bytes(data)


# ---- decoders ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(m.Kind))
@SETTINGS
@given(blob=st.binary(max_size=700))
def test_random_bytes_to_every_decoder_give_only_message_errors(kind, blob):
    with pytest.raises(MessageError):
        m.decode(blob, kind, context_for(kind))


@pytest.mark.parametrize("kind", list(m.Kind))
@SETTINGS
@given(body=st.binary(max_size=700))
def test_random_bodies_in_valid_envelopes_parse_or_give_named_errors(kind, body):
    ctx = context_for(kind)
    session = m.NO_SESSION if kind in m.PRE_SESSION_KINDS else ctx.session
    sender = 0 if ctx.recipient == m.SERVER else m.SERVER
    blob = m.frame(kind, body, round_id=1, session=session, sender=sender, recipient=ctx.recipient)
    try:
        m.decode(blob, kind, ctx)
    except SecAggError:
        pass


def test_decoders_refuse_non_bytes_and_oversized_input():
    ctx = context_for(m.Kind.SURVIVOR_LIST)
    with pytest.raises(m.MalformedMessage, match="expected bytes"):
        m.decode("text", m.Kind.SURVIVOR_LIST, ctx)
    huge = m.frame(m.Kind.SURVIVOR_LIST, bytes(4 + 4 * (N + 1)), round_id=1, session=bytes(32), sender=m.SERVER, recipient=0)
    with pytest.raises(m.MalformedMessage, match="oversized"):
        m.decode(huge, m.Kind.SURVIVOR_LIST, ctx)


# ---- state machines ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", range(4))
@SETTINGS
@given(data=st.data())
def test_client_given_corrupted_or_random_bytes_raises_only_named_errors(step, data):
    client, real = client_at(step)
    blob = data.draw(st.one_of(mutated(real), st.binary(max_size=300)))
    try:
        client.handle(blob)
    except SecAggError:
        pass


@pytest.mark.parametrize("step", range(5))
@SETTINGS
@given(data=st.data())
def test_server_given_corrupted_or_random_bytes_raises_only_named_errors(step, data):
    server, real = server_at(step)
    blob = data.draw(st.one_of(mutated(real), st.binary(max_size=300)))
    try:
        server.receive(1, blob)
    except SecAggError:
        pass
