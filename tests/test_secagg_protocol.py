"""Secure aggregation, end to end: exact sums under dropouts, and every attack or fault refused by name.

Each test drives the real client and server state machines over bytes (`run_session`), playing a
faulty network or a malicious server through the `tamper` hook or a server subclass. Expected
values are computed independently (Python integers mod 2^b, numpy float sums of clipped inputs).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from secagg import (
    STAGES,
    BadSignature,
    ConfigMismatch,
    ConfigurationError,
    DecryptionFailed,
    DuplicateKey,
    EncodingSpec,
    InconsistentSurvivors,
    InsecureThreshold,
    ProtocolAborted,
    ReplayedMessage,
    SecAggClient,
    SecAggError,
    SecAggParams,
    SecAggServer,
    SurvivedAndDropped,
    TooFewSurvivors,
    WrongRecipient,
    WrongSender,
    WrongStage,
    aggregate_in_process,
    generate_signing_keys,
    run_session,
)
from secagg import messages as m
from secagg.graph import permutation
from secagg.primitives import ed25519_keypair


def make_session(n, m_len=48, params=None, round_id=0, clip=1.0, seed=0, signing=None, server_cls=SecAggServer):
    """n clients with inputs uniform in [-1.2, 1.2] (so some coordinates clip), and a server."""
    params = params or SecAggParams()
    ids = list(range(n))
    rng = np.random.default_rng(seed)
    xs = {c: rng.uniform(-1.2, 1.2, m_len) for c in ids}
    plan = params.resolve(n)
    spec = EncodingSpec.build(clip, m_len, bits=plan.bits, max_clients=n, precision_bits=plan.precision_bits)
    clients = {c: SecAggClient(c, plan, spec, round_id, (signing or {}).get(c)) for c in ids}
    for c in ids:
        clients[c].set_input(xs[c], rng=np.random.default_rng([seed, c]))
    server = server_cls(plan, spec, round_id, expected=ids)
    return xs, clients, server, spec


def rebuild(blob: bytes, new_body) -> bytes:
    env, _ = m.read_envelope(blob)
    return m.encode(new_body, round_id=env.round_id, session=env.session, sender=env.sender, recipient=env.recipient)


def body_of(blob: bytes, n_max: int = 1000):
    env, body = m.read_envelope(blob)
    return m.decode_body(env.kind, body, m.Context(env.round_id, env.session, env.recipient, n_max))


def kinds_sent(transcript):
    return {kind for kind, *_ in transcript}


# ---- correctness under dropouts ---------------------------------------------------------------


@pytest.mark.parametrize(
    "n, neighbours, bits, stages",
    [
        (12, None, 32, STAGES),  # SecAgg, one random dropout before every stage: ends with exactly t
        (12, None, 64, STAGES),
        (30, 10, 32, STAGES),  # SecAgg+, degree 10
        (30, "auto", 64, STAGES[1:]),  # SecAgg+, Bell et al.'s degree for n = 30
    ],
)
def test_sum_is_exact_mod_2b_with_random_dropouts_at_every_stage(n, neighbours, bits, stages):
    rnd = random.Random(f"{n}-{neighbours}-{bits}")
    for trial in range(2):
        xs, clients, server, spec = make_session(n, params=SecAggParams(bits=bits, neighbours=neighbours), seed=trial)
        encoded = {c: [int(v) for v in clients[c].encoded_input] for c in clients}
        pool = list(clients)
        rnd.shuffle(pool)
        drop = {stage: {pool.pop()} for stage in stages}
        res, _ = run_session(clients, server, drop)

        gone_before_input = set().union(*(drop.get(s, set()) for s in STAGES[:3]))
        survivors = sorted(set(clients) - gone_before_input)
        assert list(res.survivors) == survivors
        assert list(res.dropped) == sorted(drop["masked_input"])  # shared keys, sent no input
        mod = 1 << bits
        want = [sum(encoded[c][j] for c in survivors) % mod for j in range(spec.total_length)]
        assert [int(v) for v in res.field_sum] == want

        total, counts = spec.decode(res.field_sum)
        ref = sum(np.clip(xs[c], -1.0, 1.0) for c in survivors)
        float_error = 4 * np.finfo(float).eps * len(survivors)  # of the float reference itself
        assert np.max(np.abs(total - ref)) <= len(survivors) * spec.segments[0].step + float_error
        assert sum(counts) == sum(int(np.sum(np.abs(xs[c]) > 1.0)) for c in survivors)


def test_in_process_api_sums_segments_of_very_different_magnitudes():
    rng = np.random.default_rng(5)
    n, m_len = 8, 200
    # a weight n_k ~ 1000 followed by LoRA-like factors ~ 0.05, as privlora concatenates them
    inputs = {c: np.concatenate([[float(rng.integers(500, 1500))], rng.normal(0, 0.05, m_len - 1)]) for c in range(n)}
    inputs[3][10] = 0.7  # one coordinate beyond its clip range
    clip = [(1, 2000.0), (m_len - 1, 0.2)]
    res = aggregate_in_process(inputs, clip, SecAggParams(bits=32), round_id=4, drop={"masked_input": {6}})
    survivors = [c for c in range(n) if c != 6]
    assert res.survivors == survivors
    ref = sum(np.concatenate([inputs[c][:1], np.clip(inputs[c][1:], -0.2, 0.2)]) for c in survivors)
    steps = [s.step for s in res.spec.segments]
    assert abs(res.sum[0] - ref[0]) <= len(survivors) * steps[0]
    assert np.max(np.abs(res.sum[1:] - ref[1:])) <= len(survivors) * steps[1]
    assert steps[1] < 1e-6 < steps[0]  # each segment gets a scale of its own
    assert res.clipped == 1 and res.clipped_per_segment == (0, 1)
    assert set(res.bytes_up) == set(range(n))
    assert all(res.bytes_up[c] - res.bytes_up[6] >= 4 * m_len for c in survivors)  # 6 sent no vector


# ---- thresholds -------------------------------------------------------------------------------


@pytest.mark.parametrize("n, neighbours, t", [(10, None, 5), (10, None, 3), (11, None, 5), (30, 8, 4), (30, 8, 2)])
def test_threshold_at_or_below_half_of_the_share_holders_is_refused(n, neighbours, t):
    with pytest.raises(InsecureThreshold, match="not above half"):
        SecAggParams(threshold=t, neighbours=neighbours).resolve(n)
    transcript = []
    with pytest.raises(InsecureThreshold):
        aggregate_in_process({c: np.zeros(4) for c in range(n)}, 1.0, SecAggParams(threshold=t, neighbours=neighbours), transcript=transcript)
    assert transcript == []  # refused before any message


def test_smallest_secure_threshold_is_the_default():
    assert SecAggParams().resolve(10).threshold == 6
    assert SecAggParams().resolve(11).threshold == 6
    assert SecAggParams(neighbours=8).resolve(30).threshold == 5
    SecAggParams(threshold=6).resolve(10)  # accepted


def test_fewer_than_t_signers_aborts_at_the_server_before_any_unmasking_request():
    _, clients, server, _ = make_session(10)  # t = 6
    transcript = []
    with pytest.raises(TooFewSurvivors, match="before any unmasking share"):
        run_session(clients, server, drop={"consistency_check": {0, 2, 4, 6, 8}}, transcript=transcript)
    assert not kinds_sent(transcript) & {m.Kind.UNMASK_REQUEST, m.Kind.UNMASK_SHARES}


class ThresholdIgnoringServer(SecAggServer):
    """A malicious server that skips its own threshold checks and presses on regardless."""

    def _need(self, count, what):
        pass

    def _need_min_clients(self, count, what, before):
        pass


@pytest.mark.parametrize("stage", ["masked_input", "consistency_check"])
def test_clients_refuse_to_unmask_for_a_server_that_ignores_the_threshold(stage):
    _, clients, server, _ = make_session(10, server_cls=ThresholdIgnoringServer)  # t = 6
    transcript, errors = [], {}
    with pytest.raises(SecAggError):  # the server ends up with nothing to reconstruct from
        run_session(clients, server, drop={stage: {1, 3, 5, 7, 9}}, transcript=transcript, client_errors=errors)
    assert sorted(errors) == [0, 2, 4, 6, 8]
    assert all(isinstance(e, TooFewSurvivors) for e in errors.values())
    assert m.Kind.UNMASK_SHARES not in kinds_sent(transcript)  # no share left any client
    if stage == "masked_input":  # only 5 inputs: clients refuse already to sign the survivor set
        assert m.Kind.CONSISTENCY_SIGNATURE not in kinds_sent(transcript)


def test_too_few_clients_after_key_advertisement_aborts():
    _, clients, server, _ = make_session(6)  # t = 4
    transcript = []
    with pytest.raises(TooFewSurvivors):
        run_session(clients, server, drop={"advertise_keys": {0, 1, 2}}, transcript=transcript)
    assert kinds_sent(transcript) == {m.Kind.ADVERTISE_KEYS}


def test_secagg_plus_aborts_when_the_survivor_graph_falls_apart():
    _, clients, server, _ = make_session(30, params=SecAggParams(neighbours=2))  # a ring, t = 2
    victims: set[int] = set()

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.MASKED_INPUT:
            if not victims:
                ring = permutation(list(clients), server.session)
                victims.update({ring[0], ring[15]})  # cutting a ring twice splits it
            if sender in victims:
                return None
        return blob

    transcript = []
    with pytest.raises(TooFewSurvivors, match="fell apart"):
        run_session(clients, server, tamper=tamper, transcript=transcript)
    assert not kinds_sent(transcript) & {m.Kind.UNMASK_REQUEST, m.Kind.UNMASK_SHARES}


# ---- a lying server ---------------------------------------------------------------------------


def test_client_listed_as_both_survived_and_dropped_is_refused():
    _, clients, server, _ = make_session(7)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.UNMASK_REQUEST:
            req = body_of(blob)
            return rebuild(blob, m.UnmaskRequest(req.survivors, tuple(sorted(set(req.dropped) | {5})), req.signatures))
        return blob

    transcript = []
    with pytest.raises(SurvivedAndDropped, match="both survived and dropped"):
        run_session(clients, server, tamper=tamper, transcript=transcript)
    assert m.Kind.UNMASK_SHARES not in kinds_sent(transcript)


def test_survivor_list_changed_after_signing_is_refused():
    _, clients, server, _ = make_session(7)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.UNMASK_REQUEST and recipient == 2:
            req = body_of(blob)
            return rebuild(blob, m.UnmaskRequest(req.survivors[1:], req.dropped, req.signatures))
        return blob

    with pytest.raises(InconsistentSurvivors, match="differs from the one it signed"):
        run_session(clients, server, tamper=tamper)


class SplitViewServer(SecAggServer):
    """A malicious server that tells group A the target dropped and everyone else it survived,
    hoping to collect the target's mask-key shares from A and its self-mask shares from B."""

    group_a = frozenset({0, 1, 2, 3})
    target = 8
    forward_all_signatures = True

    def _on_signature(self, sender, cs):  # accepts signatures over whatever list it showed
        self._sigs[sender] = cs.signature

    def _on_unmask_shares(self, sender, us, signed):
        self.revealed = getattr(self, "revealed", {})
        self.revealed[sender] = us
        self._unmask[sender] = us

    def message_for(self, cid):
        blob = super().message_for(cid)
        env, _ = m.read_envelope(blob)
        in_a = cid in self.group_a
        if env.kind is m.Kind.SURVIVOR_LIST and in_a:
            return rebuild(blob, m.SurvivorList(tuple(s for s in self._survivors if s != self.target)))
        if env.kind is m.Kind.UNMASK_REQUEST:
            req = body_of(blob)
            sigs = req.signatures
            if not self.forward_all_signatures:  # only signatures that verify over this client's list
                sigs = tuple((v, s) for v, s in sigs if (v in self.group_a) == in_a)
            if in_a:
                return rebuild(blob, m.UnmaskRequest(
                    tuple(s for s in req.survivors if s != self.target), tuple(sorted({*req.dropped, self.target})), sigs))
            return rebuild(blob, m.UnmaskRequest(req.survivors, req.dropped, sigs))
        return blob


@pytest.mark.parametrize("forward_all", [True, False])
def test_different_survivor_lists_to_different_clients_are_detected_with_pinned_keys(forward_all):
    private, public = generate_signing_keys(range(9))
    server_cls = type("Split", (SplitViewServer,), {"forward_all_signatures": forward_all})
    _, clients, server, _ = make_session(9, params=SecAggParams(signing_keys=public), signing=private, server_cls=server_cls)
    assert server.plan.threshold == 5  # group A has 4 clients, group B 5
    errors = {}
    try:
        run_session(clients, server, client_errors=errors)
    except SecAggError:
        pass
    revealed = getattr(server, "revealed", {})
    if forward_all:  # every client sees a signature over a list other than its own
        assert set(errors) == set(range(9))
        assert all(isinstance(e, InconsistentSurvivors) for e in errors.values())
        assert revealed == {}
    else:  # group A cannot gather t signatures over its list, so it reveals nothing
        assert set(errors) == set(SplitViewServer.group_a)
        assert all(isinstance(e, TooFewSurvivors) for e in errors.values())
    key_shares_of_target = [v for us in revealed.values() for v, _ in us.key_shares if v == SplitViewServer.target]
    assert key_shares_of_target == []  # the target's mask key never leaves any client


# ---- tampering, replay, misdelivery -----------------------------------------------------------


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
@pytest.mark.parametrize("direction", ["up", "down"])
def test_flipped_bit_in_an_encrypted_share_is_detected(where, direction):
    """On the way up the whole share message is signed: the server refuses it (BadSignature);
    on the way down (routed by the server) the recipient's AEAD check refuses it."""
    _, clients, server, _ = make_session(5)
    offset = {"nonce": 3, "ciphertext": 12 + 70, "tag": m.SHARE_CIPHERTEXT_BYTES - 1}[where]
    kind, party = (m.Kind.SHARE_KEYS, 3) if direction == "up" else (m.Kind.ROUTED_SHARES, 2)

    def tamper(k, sender, recipient, blob):
        if k is kind and party in (sender, recipient):
            pos = m.ENVELOPE_BYTES + 4 + 4 + offset  # first entry: id, then the ciphertext
            blob = bytearray(blob)
            blob[pos] ^= 0x10
            return bytes(blob)
        return blob

    with pytest.raises(BadSignature if direction == "up" else DecryptionFailed):
        run_session(clients, server, tamper=tamper)


def _record(store):
    def tamper(kind, sender, recipient, blob):
        store[(kind, sender, recipient)] = blob
        return blob

    return tamper


def _replace(key, blob_for_key):
    def tamper(kind, sender, recipient, blob):
        return blob_for_key if (kind, sender, recipient) == key else blob

    return tamper


@pytest.mark.parametrize("kind", list(m.Kind))
@pytest.mark.parametrize("earlier", ["round", "session"])
def test_message_replayed_from_an_earlier_round_or_session_is_refused(kind, earlier):
    old = {}
    _, clients, server, _ = make_session(5, round_id=6)
    run_session(clients, server, tamper=_record(old))
    key = (kind, 1, m.SERVER) if kind.name in ("ADVERTISE_KEYS", "SHARE_KEYS", "MASKED_INPUT", "CONSISTENCY_SIGNATURE", "UNMASK_SHARES") else (kind, m.SERVER, 1)
    _, clients, server, _ = make_session(5, round_id=7 if earlier == "round" else 6)
    with pytest.raises(ReplayedMessage):
        run_session(clients, server, tamper=_replace(key, old[key]))


@pytest.mark.parametrize("kind", [m.Kind.KEY_LIST, m.Kind.ROUTED_SHARES, m.Kind.SURVIVOR_LIST, m.Kind.UNMASK_REQUEST])
def test_message_for_another_client_is_refused(kind):
    _, clients, server, _ = make_session(5)
    seen = {}

    def tamper(k, sender, recipient, blob):
        if k is kind and recipient == 0:
            seen[0] = blob
        if k is kind and recipient == 1:
            return seen[0]
        return blob

    with pytest.raises(WrongRecipient):
        run_session(clients, server, tamper=tamper)


def test_message_to_the_server_readdressed_is_refused():
    _, clients, server, _ = make_session(4)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.SHARE_KEYS and sender == 2:
            blob = bytearray(blob)
            blob[52:56] = (3).to_bytes(4, "big")  # the envelope's recipient field
            return bytes(blob)
        return blob

    with pytest.raises(WrongRecipient):
        run_session(clients, server, tamper=tamper)


def test_encrypted_share_moved_to_another_recipient_does_not_decrypt():
    _, clients, server, _ = make_session(5)
    seen = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.ROUTED_SHARES:
            shares = dict(body_of(blob).shares)
            if recipient == 0:
                seen["from 4 to 0"] = shares[4]
            if recipient == 1:  # give client 1 the ciphertext client 4 made for client 0
                shares[4] = seen["from 4 to 0"]
                return rebuild(blob, m.RoutedShares(tuple(sorted(shares.items()))))
        return blob

    with pytest.raises(DecryptionFailed):
        run_session(clients, server, tamper=tamper)


def test_message_claiming_another_sender_is_refused():
    _, clients, server, _ = make_session(4)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.MASKED_INPUT and sender == 1:
            blob = bytearray(blob)
            blob[48:52] = (2).to_bytes(4, "big")  # the envelope's sender field
            return bytes(blob)
        return blob

    with pytest.raises(WrongSender):
        run_session(clients, server, tamper=tamper)


def test_second_copy_of_a_message_in_the_same_stage_is_refused():
    _, clients, server, _ = make_session(4)
    blob = clients[0].advertise()
    server.receive(0, blob)
    with pytest.raises(ReplayedMessage, match="second key advertisement"):
        server.receive(0, blob)


def test_message_of_another_stage_is_refused():
    _, clients, server, _ = make_session(4)
    blobs = {c: clients[c].advertise() for c in clients}
    for c, b in blobs.items():
        server.receive(c, b)
    server.close_stage()
    with pytest.raises(WrongStage):
        server.receive(0, blobs[0])  # an advertisement while shares are expected
    key_list = server.message_for(1)
    clients[1].handle(key_list)
    with pytest.raises(WrongStage):
        clients[1].handle(server.message_for(1))  # the key list again, while shares are expected
    with pytest.raises(ProtocolAborted):
        clients[1].handle(b"anything")  # an aborted client stays aborted


# ---- keys -------------------------------------------------------------------------------------


def test_duplicate_public_key_from_a_client_is_refused_by_the_server():
    _, clients, server, _ = make_session(4)
    first = {}

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.ADVERTISE_KEYS:
            if sender == 0:
                first["c_pk"] = body_of(blob).c_pk
            if sender == 2:  # client 2 re-advertises client 0's encryption key (and signs it itself)
                adv = body_of(blob)
                return rebuild(blob, m.AdvertiseKeys(first["c_pk"], adv.s_pk, adv.sig_pk, adv.signature))
        return blob

    with pytest.raises(DuplicateKey):
        run_session(clients, server, tamper=tamper)


@pytest.mark.parametrize("field", ["s_pk", "c_pk"])
def test_duplicate_public_key_in_the_key_list_is_refused_by_clients(field):
    _, clients, server, _ = make_session(5)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.KEY_LIST and recipient == 3:
            kl = body_of(blob)
            e0, e1 = kl.entries[0], kl.entries[1]
            forged = m.KeyEntry(e1.client_id, *(getattr(e0, f) if f == field else getattr(e1, f) for f in ("c_pk", "s_pk")), e1.sig_pk, e1.signature)
            return rebuild(blob, m.KeyList(kl.config_digest, (e0, forged) + kl.entries[2:]))
        return blob

    with pytest.raises(DuplicateKey):
        run_session(clients, server, tamper=tamper)


def test_key_substituted_by_the_server_is_caught_by_pinned_signatures():
    private, public = generate_signing_keys(range(5))
    _, clients, server, _ = make_session(5, params=SecAggParams(signing_keys=public), signing=private)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.KEY_LIST and recipient == 3:
            kl = body_of(blob)
            e = kl.entries[0]
            fake = m.KeyEntry(e.client_id, bytes(31) + b"\x09", e.s_pk, e.sig_pk, e.signature)
            return rebuild(blob, m.KeyList(kl.config_digest, (fake,) + kl.entries[1:]))
        return blob

    with pytest.raises(BadSignature):
        run_session(clients, server, tamper=tamper)


def test_advertisement_not_signed_by_the_pinned_key_is_refused_by_the_server():
    private, public = generate_signing_keys(range(4))
    impostor, _ = ed25519_keypair()
    _, clients, server, _ = make_session(4, params=SecAggParams(signing_keys=public), signing=private)

    def tamper(kind, sender, recipient, blob):
        if kind is m.Kind.ADVERTISE_KEYS and sender == 1:
            adv = body_of(blob)
            return rebuild(blob, m.AdvertiseKeys(adv.c_pk, adv.s_pk, adv.sig_pk, impostor.sign(b"not the advertisement")))
        return blob

    with pytest.raises(BadSignature):
        run_session(clients, server, tamper=tamper)


def test_client_key_must_match_the_pinned_registry():
    private, public = generate_signing_keys(range(3))
    plan = SecAggParams(signing_keys=public).resolve(3)
    spec = EncodingSpec.build(1.0, 4, bits=32, max_clients=3)
    with pytest.raises(ConfigurationError, match="does not match the pinned registry"):
        SecAggClient(0, plan, spec, 0, private[1])
    with pytest.raises(ConfigurationError, match="required"):
        SecAggClient(0, plan, spec, 0, None)


def test_client_with_other_session_parameters_refuses_the_key_list():
    _, clients, server, _ = make_session(4)  # bits = 32
    for c in clients:
        server.receive(c, clients[c].advertise())
    server.close_stage()
    odd = SecAggClient(0, SecAggParams(bits=64).resolve(4), EncodingSpec.build(1.0, 48, bits=64, max_clients=4))
    odd.advertise()
    with pytest.raises(ConfigMismatch):
        odd.handle(server.message_for(0))


def test_pinned_signing_keys_and_dropouts_still_give_the_exact_sum():
    private, public = generate_signing_keys(range(8))
    rng = np.random.default_rng(1)
    inputs = {c: rng.uniform(-1, 1, 16) for c in range(8)}
    res = aggregate_in_process(inputs, 1.0, SecAggParams(signing_keys=public, bits=64), round_id=2,
                               drop={"masked_input": {3}, "unmasking": {5}}, client_signing_keys=private)
    survivors = [c for c in range(8) if c != 3]
    assert res.survivors == survivors and res.dropped == [3]
    assert np.max(np.abs(res.sum - sum(inputs[c] for c in survivors))) <= 8 * res.spec.segments[0].step + 1e-14
    with pytest.raises(ConfigurationError, match="client_signing_keys"):
        aggregate_in_process(inputs, 1.0, SecAggParams(signing_keys=public))
