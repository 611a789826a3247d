"""A Flower node's memory between messages: sealed with the node's own key, refused otherwise,
and a whole pinned SecAgg session survives being sealed and unsealed at every stage."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from privlora.transports.flower.state import node_key, seal, unseal  # noqa: E402
from privlora.federation.messages import MessageError  # noqa: E402


def test_a_secagg_session_survives_sealing_at_every_stage(tmp_path):
    from secagg import EncodingSpec, SecAggClient, SecAggParams, SecAggServer, generate_signing_keys

    key = node_key(tmp_path)
    assert oct((tmp_path / "state.key").stat().st_mode & 0o777) == "0o600" and node_key(tmp_path) == key
    priv, pub = generate_signing_keys([0, 1, 2])
    plan = SecAggParams(bits=64, signing_keys=pub).resolve(3)
    spec = EncodingSpec.build(1.0, 6, bits=64, max_clients=plan.n_max)
    xs = {c: np.linspace(-0.3, 0.3, 6) * (c + 1) for c in range(3)}  # within the clip range 1
    clients = {c: SecAggClient(c, plan, spec, 1, priv[c]) for c in range(3)}
    server = SecAggServer(plan, spec, 1, expected=[0, 1, 2])
    for c in clients:
        clients[c].set_input(xs[c])
        server.receive(c, clients[c].advertise())
    while True:
        recipients = server.close_stage()
        if not recipients:
            break
        for c in recipients:
            clients[c] = unseal(seal(clients[c], key), key)  # a new process at every stage
            server.receive(c, clients[c].handle(server.message_for(c)))
    total, _ = spec.decode(server.result.field_sum)
    np.testing.assert_allclose(total, sum(xs.values()), atol=1e-4)


def test_state_sealed_under_another_key_or_altered_is_refused(tmp_path):
    blob = seal({"round": 3}, node_key(tmp_path / "a"))
    with pytest.raises(MessageError, match="does not verify"):
        unseal(blob, node_key(tmp_path / "b"))
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(MessageError, match="does not verify"):
        unseal(tampered, node_key(tmp_path / "a"))
    assert unseal(blob, node_key(tmp_path / "a")) == {"round": 3}


def test_a_validly_sealed_blob_naming_anything_outside_the_allow_list_is_refused(tmp_path):
    import os
    import pickle

    key = node_key(tmp_path)
    body = pickle.dumps(os.system)  # what a stolen key could seal: a callable outside the allow-list
    import hashlib
    import hmac

    blob = hmac.new(key, body, hashlib.sha256).digest() + body
    with pytest.raises(MessageError, match="posix.system|os.system"):
        unseal(blob, key)
