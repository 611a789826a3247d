"""The server side of the protocol: collects one stage's messages, then closes the stage.

Drive it with `receive(sender, bytes)` for every message that arrives during a stage, then
`close_stage()`, which returns the clients to message next; `message_for(client)` gives each its
bytes. Clients that sent nothing before the stage was closed have dropped out. After the fifth
close, `result` holds the sum mod 2^b of the survivors' encoded inputs.

The server checks the threshold at every stage and raises `TooFewSurvivors` -- before sending
any unmasking request -- when fewer than t clients remain, or `TooFewClients` when fewer than
`plan.min_clients` advertised keys or sent masked inputs (clients would refuse such lists).
Those, and a failed reconstruction, abort the server for good (`ProtocolAborted` afterwards).
A *message* that fails a check (malformed, replayed, unsigned or badly signed, a low-order
X25519 key, a sender that is not a client id) raises its named error and leaves the server's
state untouched: the server does not abort, and a caller may ignore that client and go on (it
then counts as dropped). Masked inputs are added into one running sum as they arrive, after
their signature is checked (memory: one vector).

What each client is sent: its key list carries every listed client's 36-byte commitment (id and
SHA-256 of its keys, from which the session id is computed) and the keys in full of only that
client's share holders -- itself and its neighbours, everyone for the complete graph
(`key_list_for`); survivor and dropped sets are key-list positions; an unmasking request carries
the survivor-set signatures of that client's holders only. The server's own state is O(n k):
no per-client copy of anything of size n is kept.

Unmasking (Bonawitz et al.): for each survivor w, reconstruct b_w from t shares (checked against
one more share when there is one, and against w's commitment to b_w) and subtract PRG(b_w); for
each dropped client v (shared keys, sent no masked input), reconstruct s_sk_v, check it against
v's advertised s_pk, and remove the pairwise masks its surviving neighbours added for it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from . import messages as m
from . import shamir
from .client import advertise_message, check_session_nonce, config_digest, is_client_id, seed_commitment, survivors_message
from .encoding import EncodingSpec
from .errors import (
    BadSignature,
    ConfigurationError,
    DuplicateKey,
    InconsistentSurvivors,
    MalformedMessage,
    ProtocolAborted,
    ReconstructionFailed,
    ReplayedMessage,
    TooFewClients,
    TooFewSurvivors,
    WrongRecipient,
    WrongSender,
    WrongStage,
)
from .graph import CompleteGraph, is_complete, neighbours
from .params import MAX_CLIENT_ID, Plan
from .primitives import (
    MaskExpander,
    agree,
    check_x25519_public,
    listed_block,
    pair_mask_seed,
    session_id_of_listed,
    verify,
    x25519_from_private_bytes,
)


class ServerStage(Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


_EXPECT = {
    ServerStage.ADVERTISE_KEYS: m.Kind.ADVERTISE_KEYS,
    ServerStage.SHARE_KEYS: m.Kind.SHARE_KEYS,
    ServerStage.MASKED_INPUT: m.Kind.MASKED_INPUT,
    ServerStage.CONSISTENCY_CHECK: m.Kind.CONSISTENCY_SIGNATURE,
    ServerStage.UNMASKING: m.Kind.UNMASK_SHARES,
}


@dataclass(frozen=True)
class ServerResult:
    """The exact sum mod 2^b of the survivors' encoded vectors, and who the survivors are."""

    field_sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


def key_list_for(config_digest: bytes, round_id: int, plan: Plan, entries: Iterable[m.KeyEntry], recipient: int) -> m.KeyList:
    """The key list an honest server sends `recipient` when it lists `entries` (one per client,
    any order): every entry's commitment, and in full the entries of the recipient's share
    holders -- itself and its neighbours in the graph the list determines (all of them for the
    complete graph). For tests and for transports that build key lists themselves; the server
    makes the same bytes with `message_for`."""
    entries = sorted(entries, key=lambda e: e.client_id)
    listed = listed_block((e.client_id, e.c_pk, e.s_pk, e.sig_pk) for e in entries)
    ids = [e.client_id for e in entries]
    if recipient not in ids:
        raise WrongRecipient(f"client {recipient!r} is not in the key list")
    session = session_id_of_listed(config_digest, round_id, listed)
    holders = neighbours(ids, plan.degree, session, who=[recipient], slots=plan.n_max)[recipient] | {recipient}
    return m.KeyList(config_digest, tuple(e for e in entries if e.client_id in holders), listed)


class SecAggServer:
    """The server of one session. `expected`: the client ids invited (None: any valid id).

    `session_nonce` (optional, 32 bytes, e.g. `os.urandom(32)`): a fresh value for this session
    that the transport sends every invited client; clients bind it into their advertisement
    signatures, so an advertisement from another session with the same round id is refused.
    """

    def __init__(self, plan: Plan, spec: EncodingSpec, round_id: int = 0, expected: Iterable[int] | None = None,
                 session_nonce: bytes | None = None):
        if not isinstance(plan, Plan) or not isinstance(spec, EncodingSpec):
            raise ConfigurationError(f"expected a Plan and an EncodingSpec, found {type(plan).__name__} and {type(spec).__name__}")
        if spec.bits != plan.bits or spec.max_clients != plan.n_max:
            raise ConfigurationError("encoding spec and plan disagree on bits or number of clients")
        if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id < 1 << 64:
            raise ConfigurationError(f"round id must be an int in [0, 2^64), found {round_id!r}")
        self.plan, self.spec, self.round_id = plan, spec, round_id
        self.session_nonce = check_session_nonce(session_nonce)
        self.digest = config_digest(plan, spec, self.session_nonce)
        if expected is not None:
            try:
                expected = frozenset(expected)
            except TypeError as exc:
                raise ConfigurationError(f"expected must be an iterable of client ids: {exc}") from None
            bad = [c for c in expected if not is_client_id(c)]
            if bad:
                raise ConfigurationError(f"expected names {bad[:3]!r}, which are not client ids (ints in [0, {MAX_CLIENT_ID}])")
        self.expected = expected
        if self.expected is not None and len(self.expected) > plan.n_max:
            raise ConfigurationError(f"{len(self.expected)} clients invited but the plan is for at most n_max={plan.n_max}")
        self.stage = ServerStage.ADVERTISE_KEYS
        self.session = m.NO_SESSION
        self.result: ServerResult | None = None
        self._adv: dict[int, m.AdvertiseKeys] = {}
        self._keys_seen: set[bytes] = set()
        self._shares: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> ciphertext
        self._masked: set[int] = set()
        self._acc = np.zeros(spec.total_length, dtype=spec.dtype)
        self._sigs: dict[int, bytes] = {}
        self._commitments: dict[int, bytes] = {}
        self._unmask: dict[int, m.UnmaskShares] = {}
        self._out_cache: dict[m.Kind, bytes] = {}

    # ---- receiving --------------------------------------------------------------------------

    def receive(self, sender: int, blob: bytes) -> None:
        """Accept one client's message for the current stage, or raise its named error."""
        if self.stage in (ServerStage.DONE, ServerStage.ABORTED):
            raise ProtocolAborted(f"the server's session is {self.stage.value}; no more messages")
        if not is_client_id(sender):
            raise WrongSender(f"a message from {sender!r}, which is not a client id (an int in [0, {MAX_CLIENT_ID}])")
        expect = _EXPECT[self.stage]
        ctx = m.Context(
            self.round_id, self.session, m.SERVER, self.plan.n_max,
            vector_bytes=self.spec.total_length * self.spec.dtype.itemsize, sender=sender,
        )
        _, body = m.decode(blob, expect, ctx)
        if self.stage is ServerStage.ADVERTISE_KEYS:
            self._on_advertise(sender, body)
        elif self.stage is ServerStage.CONSISTENCY_CHECK:
            self._on_signature(sender, body)
        else:
            content = memoryview(blob)[m.ENVELOPE_BYTES : len(blob) - m.SIG_BYTES]
            signed = lambda what: self._check_signed(expect, sender, content, body.signature, what)  # noqa: E731
            if self.stage is ServerStage.SHARE_KEYS:
                self._on_shares(sender, body, signed)
            elif self.stage is ServerStage.MASKED_INPUT:
                self._on_masked(sender, body, signed)
            else:
                self._on_unmask_shares(sender, body, signed)

    def _check_signed(self, kind: m.Kind, sender: int, content, signature: bytes, what: str) -> None:
        digest = m.signed_digest(kind, self.round_id, self.session, sender, m.SERVER, content)
        verify(self._sig_pk(sender), signature, digest, f"client {sender}'s {what} (changed in transit, or not signed by it)")

    def _check_sender(self, sender: int, allowed, seen, what: str) -> None:
        if sender not in allowed:
            raise WrongSender(f"{what} from client {sender}, which is not part of this stage")
        if sender in seen:
            raise ReplayedMessage(f"second {what} from client {sender}")

    def _on_advertise(self, sender: int, adv: m.AdvertiseKeys) -> None:
        if self.expected is not None and sender not in self.expected:
            raise WrongSender(f"key advertisement from client {sender}, which was not invited")
        if sender in self._adv:
            raise ReplayedMessage(f"second key advertisement from client {sender}")
        if len(self._adv) >= self.plan.n_max:
            raise WrongSender(f"key advertisement from client {sender}: already {self.plan.n_max} clients")
        if self.plan.pinned:
            pinned = self.plan.signing_keys.get(sender)
            if pinned is None or adv.sig_pk != pinned:
                raise BadSignature(f"client {sender} advertised a signing key other than its pinned one")
        keys = [adv.c_pk, adv.s_pk] + ([] if self.plan.pinned else [adv.sig_pk])
        if len(set(keys)) != len(keys) or any(k in self._keys_seen for k in keys):
            raise DuplicateKey(f"client {sender} advertised a public key that is already in use")
        check_x25519_public(adv.c_pk, f"client {sender}'s encryption key (c_pk)")
        check_x25519_public(adv.s_pk, f"client {sender}'s masking key (s_pk)")
        verify(adv.sig_pk, adv.signature, advertise_message(self.digest, self.round_id, sender, adv.c_pk, adv.s_pk, adv.sig_pk),
               f"client {sender}'s key advertisement (or one made for another session: it binds the round and session nonce)")
        self._keys_seen.update(keys)
        self._adv[sender] = adv

    def _on_shares(self, sender: int, sk: m.ShareKeys, signed) -> None:
        self._check_sender(sender, self._adv, self._shares, "share message")
        signed("share message")
        recipients = tuple(r for r, _ in sk.shares)
        if recipients != tuple(sorted(self._neigh[sender])):
            raise MalformedMessage(f"client {sender} sent shares to {len(recipients)} clients, not exactly to its {len(self._neigh[sender])} neighbours")
        self._shares[sender] = dict(sk.shares)
        self._commitments[sender] = sk.commitment

    def _on_masked(self, sender: int, mi: m.MaskedInput, signed) -> None:
        self._check_sender(sender, self._u2, self._masked, "masked input")
        signed("masked input")
        vec = np.frombuffer(mi.vector, dtype=self.spec.dtype, count=self.spec.total_length)
        np.add(self._acc, vec, out=self._acc)
        self._masked.add(sender)

    def _on_signature(self, sender: int, cs: m.ConsistencySignature) -> None:
        self._check_sender(sender, self._u3, self._sigs, "consistency signature")
        verify(self._sig_pk(sender), cs.signature, self._survivors_msg, f"client {sender}'s survivor set")
        self._sigs[sender] = cs.signature

    def _on_unmask_shares(self, sender: int, us: m.UnmaskShares, signed) -> None:
        self._check_sender(sender, self._sigs, self._unmask, "unmasking shares")
        signed("unmasking shares")
        neigh = self._neigh[sender]
        if not all((w == sender or w in neigh) and w in self._u3 for w, _ in us.self_mask_shares):
            raise InconsistentSurvivors(f"client {sender} sent self-mask shares of clients it does not hold or that did not survive")
        if not all(v in neigh and v in self._dropped_set for v, _ in us.key_shares):
            raise InconsistentSurvivors(f"client {sender} sent mask-key shares of clients it does not hold or that did not drop")
        self._unmask[sender] = us

    def _sig_pk(self, cid: int) -> bytes:
        return self.plan.signing_keys[cid] if self.plan.pinned else self._adv[cid].sig_pk

    # ---- closing stages ---------------------------------------------------------------------

    def _need(self, count: int, what: str) -> None:
        if count < self.plan.threshold:
            later = "" if self.stage is ServerStage.UNMASKING else " Aborting before any unmasking share is requested."
            self.stage = ServerStage.ABORTED
            raise TooFewSurvivors(f"only {count} clients {what}; the threshold is {self.plan.threshold}.{later}")

    def _need_min_clients(self, count: int, what: str, before: str) -> None:
        if count < self.plan.min_clients:
            self.stage = ServerStage.ABORTED
            raise TooFewClients(
                f"only {count} clients {what}; this session needs at least {self.plan.min_clients} (min_clients, of "
                f"n_max={self.plan.n_max}) and clients would refuse a shorter list. Aborting before {before}."
            )

    def close_stage(self) -> list[int]:
        """End the current stage; return the (sorted) clients to send `message_for` to next."""
        if self.stage in (ServerStage.DONE, ServerStage.ABORTED):
            raise ProtocolAborted(f"the server's session is {self.stage.value}")
        self._out_cache.clear()
        if self.stage is ServerStage.ADVERTISE_KEYS:
            self._need(len(self._adv), "advertised keys")
            self._need_min_clients(len(self._adv), "advertised keys", "sending any key list")
            ids = sorted(self._adv)
            listed = listed_block((c, a.c_pk, a.s_pk, a.sig_pk) for c, a in self._adv.items())
            self.session = session_id_of_listed(self.digest, self.round_id, listed)
            self._pos = {c: i for i, c in enumerate(ids)}  # key-list positions
            self._complete = is_complete(len(ids), self.plan.degree, self.plan.n_max)
            self._neigh = CompleteGraph(ids) if self._complete else neighbours(ids, self.plan.degree, self.session, slots=self.plan.n_max)
            self._key_list_head = b"".join((self.digest, struct.pack(">I", len(ids)), listed))  # common to every key list
            self.stage = ServerStage.SHARE_KEYS
            return ids
        if self.stage is ServerStage.SHARE_KEYS:
            self._need(len(self._shares), "shared their keys")
            self._u2 = frozenset(self._shares)
            self.stage = ServerStage.MASKED_INPUT
            return sorted(self._u2)
        if self.stage is ServerStage.MASKED_INPUT:
            self._need(len(self._masked), "sent masked inputs")
            self._need_min_clients(len(self._masked), "sent masked inputs", "sending the survivor list")
            self._u3 = frozenset(self._masked)
            self._survivors = tuple(sorted(self._u3))
            self._dropped = tuple(sorted(self._u2 - self._u3))
            self._dropped_set = frozenset(self._dropped)
            s_pos = [self._pos[c] for c in self._survivors]  # increasing, as the ids are
            self._survivors_msg = survivors_message(self.session, self.round_id, s_pos)
            self._survivor_body = m.encode_ids(s_pos)
            self._unmask_head = self._survivor_body + m.encode_ids([self._pos[c] for c in self._dropped])
            self.stage = ServerStage.CONSISTENCY_CHECK
            return list(self._survivors)
        if self.stage is ServerStage.CONSISTENCY_CHECK:
            self._need(len(self._sigs), "signed the survivor set")
            self._check_connected()
            self.stage = ServerStage.UNMASKING
            return sorted(self._sigs)
        self._need(len(self._unmask), "sent unmasking shares")
        self._finish()
        return []

    def _check_connected(self) -> None:
        """SecAgg+: the survivors' masks must tie them into one component, otherwise unmasking
        would reveal the partial sum of each component. Abort before any share is requested."""
        if self.plan.degree is None:
            return
        start = self._survivors[0]
        seen, todo = {start}, [start]
        while todo:
            for w in self._neigh[todo.pop()] & self._u3:
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        if len(seen) != len(self._u3):
            self.stage = ServerStage.ABORTED
            raise TooFewSurvivors(
                f"the survivors' neighbour graph fell apart ({len(seen)} of {len(self._u3)} reachable): unmasking "
                "would reveal partial sums. Aborting before any unmasking share is requested; use a larger degree."
            )

    def message_for(self, cid: int) -> bytes:
        """The bytes to send to client `cid` for the stage just opened by `close_stage`.

        Raises `WrongRecipient` for a client that `close_stage` did not return."""
        allowed = {
            ServerStage.SHARE_KEYS: lambda: self._adv,
            ServerStage.MASKED_INPUT: lambda: self._u2,
            ServerStage.CONSISTENCY_CHECK: lambda: self._u3,
            ServerStage.UNMASKING: lambda: self._sigs,
        }.get(self.stage)
        if allowed is not None and not (is_client_id(cid) and cid in allowed()):
            raise WrongRecipient(f"no {self.stage.value} message for {cid!r}: not one of the clients this stage addresses")
        if self.stage is ServerStage.SHARE_KEYS:
            if self._complete:  # everyone's keys, the same bytes for every client
                body = self._cached(m.Kind.KEY_LIST, lambda: self._key_list_body(sorted(self._adv)))
            else:  # the commitments, and the keys of this client's holders only
                body = self._key_list_body(sorted(self._neigh[cid] | {cid}))
            return self._wrap(m.Kind.KEY_LIST, body, cid, m.NO_SESSION)
        if self.stage is ServerStage.MASKED_INPUT:
            shares = tuple((v, self._shares[v][cid]) for v in sorted(self._neigh[cid] & self._u2))
            return self._wrap(m.Kind.ROUTED_SHARES, m.encode_body(m.RoutedShares(shares)), cid, self.session)
        if self.stage is ServerStage.CONSISTENCY_CHECK:
            return self._wrap(m.Kind.SURVIVOR_LIST, self._survivor_body, cid, self.session)
        if self.stage is ServerStage.UNMASKING:
            if self._complete:
                body = self._cached(m.Kind.UNMASK_REQUEST, lambda: self._unmask_body(sorted(self._sigs)))
            else:  # the signatures of this client's holders only: it checks no others
                body = self._unmask_body(sorted(v for v in self._neigh[cid] | {cid} if v in self._sigs))
            return self._wrap(m.Kind.UNMASK_REQUEST, body, cid, self.session)
        raise WrongStage(f"no messages to send at server stage {self.stage.value}")

    def _key_list_body(self, holders: list[int]) -> tuple:
        """KEY_LIST body parts: digest | L | commitments (shared by every client) | the holders in full."""
        full = b"".join(m.entry_bytes(m.KeyEntry(c, a.c_pk, a.s_pk, a.sig_pk, a.signature))
                        for c, a in ((c, self._adv[c]) for c in holders))
        return (self._key_list_head, struct.pack(">I", len(holders)), full)

    def _unmask_body(self, signers: list[int]) -> tuple:
        """UNMASK_REQUEST body parts: survivor and dropped positions (shared), then signatures."""
        return (self._unmask_head, m.encode_signatures((v, self._sigs[v]) for v in signers))

    def _cached(self, kind: m.Kind, make) -> bytes:
        if kind not in self._out_cache:
            self._out_cache[kind] = make()
        return self._out_cache[kind]

    def _wrap(self, kind: m.Kind, body: bytes, cid: int, session: bytes) -> bytes:
        return m.frame(kind, body, round_id=self.round_id, session=session, sender=m.SERVER, recipient=cid)

    # ---- unmasking --------------------------------------------------------------------------

    def _finish(self) -> None:
        t = self.plan.threshold
        b_shares: dict[int, dict[int, bytes]] = {w: {} for w in self._survivors}
        k_shares: dict[int, dict[int, bytes]] = {v: {} for v in self._dropped}
        for r, us in self._unmask.items():
            for w, sh in us.self_mask_shares:
                b_shares[w][r + 1] = sh
            for v, sh in us.key_shares:
                k_shares[v][r + 1] = sh
        for w, shares in b_shares.items():
            if len(shares) < t:
                self._need(len(shares), f"revealed shares of client {w}'s self-mask seed")
        for v, shares in k_shares.items():
            if len(shares) < t:
                self._need(len(shares), f"revealed shares of dropped client {v}'s mask key")
        try:
            masks = []
            for w in self._survivors:
                seed = shamir.reconstruct(b_shares[w], t, f"client {w}'s self-mask seed")
                if seed_commitment(self.session, w, seed) != self._commitments[w]:
                    raise ReconstructionFailed(
                        f"client {w}'s self-mask seed, reconstructed from the shares of holders {sorted(x - 1 for x in b_shares[w])[:t]}, "
                        "does not match its commitment: a holder sent a corrupted or forged share"
                    )
                masks.append((seed, -1))
            for v in self._dropped:
                sk, pk = x25519_from_private_bytes(shamir.reconstruct(k_shares[v], t, f"client {v}'s mask key"))
                if pk != self._adv[v].s_pk:
                    raise ReconstructionFailed(f"reconstructed mask key of client {v} does not match its advertised public key")
                for w in sorted(self._neigh[v] & self._u3):
                    seed = pair_mask_seed(agree(sk, self._adv[w].s_pk), self.session, v, w)
                    masks.append((seed, -1 if w < v else +1))  # w added +PRG(s_wv) iff w < v: take it out
            acc = self._acc
            MaskExpander(self.spec.total_length, self.spec.dtype).apply(acc, masks)
            self.spec.reduce(acc)
        except Exception:
            self.stage = ServerStage.ABORTED
            raise
        self.result = ServerResult(field_sum=acc, survivors=self._survivors, dropped=self._dropped)
        self.stage = ServerStage.DONE
