"""What each client receives and keeps (wire format version 3): commitments to every listed
client, keys in full for its share holders only, survivor and dropped sets as key-list positions.

Each test plays a server that deviates -- sends keys of a non-neighbour, hides a neighbour, uses
another graph, names survivors by id, forwards a signature from outside the recipient's holders
-- and expects the client to refuse by name before it releases anything. Expected neighbour sets
are computed independently: the plain Fisher-Yates shuffle of `test_secagg_primitives`, over
slots, from the session id recomputed here with hashlib.
"""

from __future__ import annotations

import hashlib
import random
import struct
import sys

import numpy as np
import pytest

from secagg import (
    STAGES,
    EncodingSpec,
    InconsistentSurvivors,
    MalformedMessage,
    ProtocolAborted,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    WrongNeighbours,
    generate_signing_keys,
    run_session,
)
from secagg import messages as m
from secagg.primitives import LABEL, hkdf
from secagg.server import key_list_for

from .test_secagg_primitives import plain_fisher_yates


def make(ids, m_len=8, params=None, signing=None, round_id=0, seed=0):
    params = params or SecAggParams(neighbours=8)
    ids = sorted(ids)
    plan = params.resolve(len(ids))
    spec = EncodingSpec.build(1.0, m_len, bits=plan.bits, max_clients=plan.n_max, precision_bits=plan.precision_bits)
    rng = np.random.default_rng(seed)
    clients = {c: SecAggClient(c, plan, spec, round_id, (signing or {}).get(c)) for c in ids}
    for c in ids:
        clients[c].set_input(rng.uniform(-1, 1, m_len), rng=np.random.default_rng([seed, c]))
        clients[c].encoding_before = [int(v) for v in clients[c].encoded_input]
    server = SecAggServer(plan, spec, round_id, expected=ids)
    return plan, spec, clients, server


def body_of(blob, n_max=100_000):
    env, body = m.read_envelope(blob)
    return m.decode_body(env.kind, body, m.Context(env.round_id, env.session, env.recipient, n_max))


def rebuild(blob, new_body):
    env, _ = m.read_envelope(blob)
    return m.encode(new_body, round_id=env.round_id, session=env.session, sender=env.sender, recipient=env.recipient)


def expected_sum(clients, survivors, bits=32):
    length = len(clients[survivors[0]].encoding_before)
    return [sum(clients[c].encoding_before[j] for c in survivors) % (1 << bits) for j in range(length)]


def reference_holders(kl: m.KeyList, round_id: int, plan, recipient: int) -> set[int]:
    """The recipient and its neighbours, recomputed from the key list's bytes with hashlib and the
    plain shuffle (not with secagg's own session id, ring or neighbour functions)."""
    listed = kl.listed
    ids = [struct.unpack(">I", listed[i : i + 4])[0] for i in range(0, len(listed), 36)]
    h = hashlib.sha256(LABEL + b"/session/v3" + kl.config_digest + struct.pack(">QI", round_id, len(ids)) + listed)
    order = plain_fisher_yates(ids, hkdf(h.digest(), LABEL + b"/graph"), plan.n_max)
    i, half, n = order.index(recipient), plan.degree // 2, plan.n_max
    return {v for v in (order[(i + d) % n] for d in range(-half, half + 1)) if v is not None}


SPARSE = [3 + 7 * i + (i * i) % 5 for i in range(60)]  # positions and ids differ everywhere


# ---- what an honest server sends --------------------------------------------------------------


def test_each_key_list_carries_every_commitment_and_only_the_recipients_holders_in_full():
    plan, spec, clients, server = make(SPARSE)
    absent = set(SPARSE[5:9])  # four empty slots: positions shift after them
    for c in clients:
        if c not in absent:
            server.receive(c, clients[c].advertise())
    listed_ids = server.close_stage()
    assert len(listed_ids) == 56 and plan.degree == 8
    for c in listed_ids:
        blob = server.message_for(c)
        kl = body_of(blob)
        holders = [e.client_id for e in kl.entries]
        assert kl.listed_count == 56 and m.listed_ids(kl.listed).tolist() == listed_ids
        assert set(holders) == reference_holders(kl, 0, plan, c) == server._neigh[c] | {c}
        assert len(holders) <= plan.degree + 1
        # 36 bytes per listed client, 164 per holder: nothing else grows with n
        assert len(blob) == m.ENVELOPE_BYTES + 32 + 4 + 36 * 56 + 4 + 164 * len(holders)
        ads = [m.KeyEntry(v, a.c_pk, a.s_pk, a.sig_pk, a.signature) for v, a in server._adv.items()]
        assert m.encode_body(key_list_for(server.digest, 0, plan, ads, c)) == b"".join(
            bytes(p) for p in server._key_list_body(holders))


def test_complete_graph_key_lists_carry_everyone_in_full():
    plan, spec, clients, server = make(SPARSE[:12], params=SecAggParams())
    for c in clients:
        server.receive(c, clients[c].advertise())
    ids = server.close_stage()
    for c in ids:
        assert [e.client_id for e in body_of(server.message_for(c)).entries] == ids


@pytest.mark.parametrize("params", [SecAggParams(neighbours=8), SecAggParams()], ids=["secagg+", "complete"])
def test_sparse_ids_and_dropouts_at_every_stage_give_the_exact_sum(params):
    """Complete graph: one dropout at every stage. SecAgg+ (k = 8, t = 5): the graph is drawn from
    fresh keys, so a dropout at a middle stage may leave a dropped client fewer than t revealing
    holders (a correct abort, not a wrong sum); there, one dropout before the key list and one
    during masked input, which leaves every dropped client at least k - 1 >= t holders."""
    ids = SPARSE[:40] if params.neighbours else SPARSE[:14]
    plan, spec, clients, server = make(ids, params=params)
    rnd = random.Random(3)
    pool = list(ids)
    rnd.shuffle(pool)
    stages = ("advertise_keys", "masked_input") if params.neighbours else STAGES
    drop = {stage: ({pool.pop()} if stage in stages else set()) for stage in STAGES}
    res, _ = run_session(clients, server, drop)
    gone = drop["advertise_keys"] | drop["share_keys"] | drop["masked_input"]
    survivors = sorted(set(ids) - gone)
    assert list(res.survivors) == survivors and list(res.dropped) == sorted(drop["masked_input"])
    assert [int(v) for v in res.field_sum] == expected_sum(clients, survivors)


def test_survivor_sets_on_the_wire_are_key_list_positions():
    plan, spec, clients, server = make(SPARSE[:40])
    seen = {}

    def tamper(kind, sender, recipient, blob):
        if kind in (m.Kind.SURVIVOR_LIST, m.Kind.UNMASK_REQUEST):
            seen[kind] = body_of(blob)
        return blob

    res, _ = run_session(clients, server, drop={"advertise_keys": {SPARSE[0]}, "masked_input": {SPARSE[10]}}, tamper=tamper)
    listed = [c for c in SPARSE[:40] if c != SPARSE[0]]
    assert seen[m.Kind.SURVIVOR_LIST].survivors.tolist() == [listed.index(c) for c in res.survivors]
    assert seen[m.Kind.UNMASK_REQUEST].dropped.tolist() == [listed.index(SPARSE[10])]


# ---- a server that chooses, hides or changes neighbours -----------------------------------------


def key_list_tamper(target, change):
    """Replace the key list sent to `target` with change(KeyList, every advertised entry) -> entries
    in full; the commitments stay those of the real list, so only the choice of entries differs."""
    state = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.ADVERTISE_KEYS:
            a = body_of(blob)
            state.setdefault("all", {})[sender] = m.KeyEntry(sender, a.c_pk, a.s_pk, a.sig_pk, a.signature)
        if kind is m.Kind.KEY_LIST and recipient == target:
            kl = body_of(blob)
            entries = change(kl, state["all"])
            return rebuild(blob, m.KeyList(kl.config_digest, tuple(sorted(entries, key=lambda e: e.client_id)), kl.listed))
        return blob

    return tamper


def run_expecting(clients, server, tamper, target, error):
    errors, transcript = {}, []
    try:
        run_session(clients, server, tamper=tamper, client_errors=errors, transcript=transcript)
    except SecAggError:
        pass
    assert isinstance(errors.get(target), error), errors.get(target)
    assert not any(sender == target for kind, sender, _, _ in transcript if kind is not m.Kind.ADVERTISE_KEYS)  # it sent nothing
    with pytest.raises(ProtocolAborted):
        clients[target].handle(b"")
    return errors


def test_client_refuses_the_keys_of_a_non_neighbour():
    plan, spec, clients, server = make(SPARSE)
    target = SPARSE[17]

    def add_stranger(kl, everyone):
        holders = {e.client_id for e in kl.entries}
        stranger = min(set(everyone) - holders)
        return list(kl.entries) + [everyone[stranger]]

    run_expecting(clients, server, key_list_tamper(target, add_stranger), target, WrongNeighbours)


def test_client_refuses_every_key_in_full_under_secagg_plus():
    plan, spec, clients, server = make(SPARSE)
    target = SPARSE[30]
    run_expecting(clients, server, key_list_tamper(target, lambda kl, everyone: everyone.values()), target, WrongNeighbours)


@pytest.mark.parametrize("how", ["swap", "hide"])
def test_client_refuses_a_neighbour_set_other_than_the_graph_gives(how):
    plan, spec, clients, server = make(SPARSE)
    target = SPARSE[2]

    def change(kl, everyone):
        entries = [e for e in kl.entries if e.client_id != target]
        gone = entries.pop(len(entries) // 2)  # one real neighbour out
        if how == "swap":  # ... and a client the server prefers in its place
            entries.append(everyone[min(set(everyone) - {e.client_id for e in kl.entries})])
        assert gone.client_id in server._neigh[target]
        return entries + [e for e in kl.entries if e.client_id == target]

    run_expecting(clients, server, key_list_tamper(target, change), target, WrongNeighbours)


class OtherGraphServer(SecAggServer):
    """A server that draws the graph from a session id of its choosing (not the list's): every
    key list it sends is well formed and self-consistent, but holds the neighbours it chose."""

    def close_stage(self):
        out = super().close_stage()
        if self.stage.value == "share_keys":
            from secagg.graph import neighbours

            self._neigh = neighbours(sorted(self._adv), self.plan.degree, bytes(32), slots=self.plan.n_max)
        return out


def test_every_client_refuses_a_server_that_uses_another_graph():
    ids = SPARSE[:40]
    params = SecAggParams(neighbours=8)
    plan, spec, clients, _ = make(ids, params=params)
    server = OtherGraphServer(plan, spec, 0, expected=ids)
    errors = {}
    with pytest.raises(SecAggError):
        run_session(clients, server, client_errors=errors)
    assert set(errors) == set(ids) and all(isinstance(e, WrongNeighbours) for e in errors.values())


@pytest.mark.parametrize("params", [SecAggParams(neighbours=8), SecAggParams()], ids=["secagg+", "complete"])
def test_keys_that_do_not_match_their_commitment_are_refused(params):
    ids = SPARSE[:30] if params.neighbours else SPARSE[:8]
    plan, spec, clients, server = make(ids, params=params)
    target = ids[3]

    def change(kl, everyone):  # a neighbour's encryption key swapped, its commitment left as it was
        e = next(e for e in kl.entries if e.client_id != target)
        other = next(x for x in everyone.values() if x.client_id not in (e.client_id, target))
        return [x if x is not e else m.KeyEntry(e.client_id, other.c_pk, e.s_pk, e.sig_pk, e.signature) for x in kl.entries]

    run_expecting(clients, server, key_list_tamper(target, change), target, MalformedMessage)


# ---- survivor sets by position ------------------------------------------------------------------


def test_survivors_named_by_id_instead_of_position_are_refused():
    """With sparse ids, a survivor list of ids names positions beyond the key list (or misses
    the recipient): the client refuses to sign rather than guess."""
    plan, spec, clients, server = make(SPARSE[:40])

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.SURVIVOR_LIST:
            return rebuild(blob, m.SurvivorList(tuple(server._survivors)))
        return blob

    errors = {}
    with pytest.raises(SecAggError):
        run_session(clients, server, tamper=tamper, client_errors=errors)
    assert set(errors) == set(SPARSE[:40]) and all(isinstance(e, InconsistentSurvivors) for e in errors.values())


def test_a_signature_from_outside_the_recipients_holders_is_refused():
    """Even a valid one, from a pinned key: a client checks only its holders' signatures, and
    an honest server forwards no others."""
    ids = SPARSE[:40]
    private, public = generate_signing_keys(ids)
    plan, spec, clients, server = make(ids, params=SecAggParams(neighbours=8, signing_keys=public), signing=private)
    target = ids[0]
    sigs = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.CONSISTENCY_SIGNATURE:
            sigs[sender] = body_of(blob).signature
        if kind is m.Kind.UNMASK_REQUEST and recipient == target:
            req = body_of(blob)
            stranger = min(set(sigs) - server._neigh[target] - {target})
            extra = tuple(sorted({**dict(req.signatures), stranger: sigs[stranger]}.items()))
            return rebuild(blob, m.UnmaskRequest(req.survivors, req.dropped, extra))
        return blob

    errors = {}
    run_session(clients, server, tamper=tamper, client_errors=errors)
    assert list(errors) == [target] and isinstance(errors[target], InconsistentSurvivors)
    assert "not one of its share holders" in str(errors[target])


def test_each_unmasking_request_carries_only_the_recipients_holders_signatures():
    plan, spec, clients, server = make(SPARSE)
    counts = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.UNMASK_REQUEST:
            counts[recipient] = {v for v, _ in body_of(blob).signatures}
        return blob

    run_session(clients, server, tamper=tamper)
    assert counts and all(v == server._neigh[c] | {c} for c, v in counts.items())


# ---- O(k) per client ----------------------------------------------------------------------------


def deep_size(obj, seen=None) -> int:
    """Bytes held by obj and everything it refers to (containers, bytes, ints, numpy arrays);
    the plan, the encoding and key objects, shared or fixed-size, are not counted."""
    from secagg import EncodingSpec, Plan

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (Plan, EncodingSpec)) or type(obj).__module__.startswith("cryptography"):
        return 0
    seen.add(id(obj))
    size = obj.nbytes if isinstance(obj, np.ndarray) else sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_size(x, seen) for x in obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("secagg"):
        size += deep_size(vars(obj), seen)
    return size


def client_state_after_each_stage(n: int) -> list[int]:
    ids = list(range(n))
    plan, spec, clients, server = make(ids, params=SecAggParams(neighbours=8, dropout_rate=0.0))
    watched = clients[n // 2]
    sizes = []

    def tamper(kind, sender, recipient, blob):
        if sender == watched.id and kind is not m.Kind.ADVERTISE_KEYS:
            sizes.append(deep_size(watched))
        return blob

    run_session(clients, server, tamper=tamper)
    return sizes


def test_a_clients_state_does_not_grow_with_the_number_of_clients():
    small, large = client_state_after_each_stage(60), client_state_after_each_stage(600)
    assert len(small) == len(large) == 4  # after shares, masked input, signature, unmasking shares
    # ten times the clients, the same degree: the same state, give or take a few ints (before,
    # every client kept all n key entries, about 0.5 KB each, and the survivor list)
    assert all(b <= a + 2048 for a, b in zip(small, large)), (small, large)
