"""The client side of the protocol: a state machine that takes bytes and returns bytes.

Stages (Bonawitz et al. 2017, Fig. 4; SecAgg+ neighbourhoods of Bell et al. 2020):

0. AdvertiseKeys   -> fresh X25519 pairs (c: share encryption, s: mask agreement), signed
                      with the pinned Ed25519 key (or a per-session one when nothing is pinned)
                      over the config digest, which binds the plan, the encoding, the round
                      and the server's session nonce (if the transport passes one).
1. ShareKeys       <- key list: a 36-byte commitment (id, SHA-256 of its keys) for each of the
                      L listed clients, and in full the entries of this client's share holders
                      (itself and its neighbours; everyone for the complete graph). Checks: our
                      config digest, our own fresh keys are in it (else a replay), L >=
                      `plan.min_clients` (TooFewClients), every entry in full matches its
                      commitment (MalformedMessage). Computes the session id from the
                      commitments and our neighbours' positions from L alone (n_max slots, see
                      `secagg.graph`); the entries in full must be exactly those neighbours' and
                      our own (WrongNeighbours). Then: no duplicate public key among them,
                      pinned signing keys, our neighbours' advertisement signatures and X25519
                      points (InvalidPublicKey), at least t share holders. We keep our holders'
                      ids, positions (and, unpinned, signing keys) -- O(k), never the list.
                      Draws the self-mask seed b_u, Shamir-shares b_u and s_sk
                      t-of-h among the holders (neighbours and itself) and encrypts each
                      neighbour's pair of shares (AES-256-GCM, AD = session | round | sender |
                      recipient | stage). The signed reply carries a commitment to b_u.
2. MaskedInput     <- routed shares (decrypted and checked) -> y = x + PRG(b_u)
                      + sum_{v in U2, v neighbour} (+1 if u < v else -1) PRG(s_uv)  mod 2^b,
                      sent signed (a flipped bit in transit is refused by the server).
3. ConsistencyCheck <- survivor list S, as key-list positions (whose masked inputs the server
                      holds). Checks we are in S, every member is listed (a position below L),
                      |S| >= min_clients (TooFewClients), every neighbour in S shared keys with
                      us, |S among our holders| >= t; signs (session, round, S).
4. Unmasking       <- (S, dropped D, signatures). Refuses, before releasing anything: S differing
                      from the S we signed (InconsistentSurvivors), any position in both S and D
                      (SurvivedAndDropped), a signature from anyone but our holders or one that
                      does not verify over our S (InconsistentSurvivors), fewer than t valid
                      signatures from our holders (TooFewSurvivors). Then releases the b-share
                      of each survivor and the s_sk-share of each dropped neighbour -- never
                      both kinds for one client, in a signed message.

Any error in `handle` aborts the client for good: secrets are dropped and every later call raises
`ProtocolAborted`. A client never sends anything after it has aborted.
"""

from __future__ import annotations

import hashlib
import struct
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import messages as m
from . import shamir
from .encoding import ClipReport, EncodingSpec
from .errors import (
    BadSignature,
    ConfigMismatch,
    ConfigurationError,
    DecryptionFailed,
    DuplicateKey,
    InconsistentSurvivors,
    InvalidInput,
    MalformedMessage,
    ProtocolAborted,
    ReplayedMessage,
    SurvivedAndDropped,
    TooFewClients,
    TooFewSurvivors,
    WrongNeighbours,
    WrongSender,
    WrongStage,
)
from .graph import neighbour_positions
from .params import MAX_CLIENT_ID, Plan
from .primitives import (
    LABEL,
    MaskExpander,
    agree,
    ed25519_keypair,
    ed25519_public_bytes,
    entry_digest,
    open_sealed,
    pair_mask_seed,
    random_seed,
    seal,
    session_id_of_listed,
    share_key,
    verify,
    x25519_keypair,
    x25519_private_bytes,
)


class ClientStage(Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    SIGNED = "signed"
    DONE = "done"
    ABORTED = "aborted"


_EXPECT = {
    ClientStage.ADVERTISED: m.Kind.KEY_LIST,
    ClientStage.SHARED: m.Kind.ROUTED_SHARES,
    ClientStage.MASKED: m.Kind.SURVIVOR_LIST,
    ClientStage.SIGNED: m.Kind.UNMASK_REQUEST,
}


def associated_data(session: bytes, round_id: int, sender: int, recipient: int, stage: m.Stage) -> bytes:
    """AEAD associated data binding a ciphertext to its session, round, sender, recipient, stage."""
    return LABEL + b"/ad" + session + struct.pack(">QIIB", round_id, sender, recipient, stage)


def advertise_message(config_digest: bytes, round_id: int, cid: int, c_pk: bytes, s_pk: bytes, sig_pk: bytes) -> bytes:
    """What a client signs when it advertises its keys."""
    return LABEL + b"/advertise" + config_digest + struct.pack(">QI", round_id, cid) + c_pk + s_pk + sig_pk


def survivors_message(session: bytes, round_id: int, survivors) -> bytes:
    """What a client signs in the consistency check: the survivor set it was shown, as key-list
    positions (increasing; the session id binds which client each position is), through their
    SHA-256 so that what is signed and verified stays 100 bytes whatever the number of clients."""
    packed = np.asarray(survivors if isinstance(survivors, np.ndarray) else list(survivors), dtype=np.int64).astype(">u4").tobytes()
    return (LABEL + b"/consistency/v3" + session + struct.pack(">QI", round_id, len(packed) // 4)
            + hashlib.sha256(packed).digest())


def config_digest(plan: Plan, spec: EncodingSpec, session_nonce: bytes | None = None) -> bytes:
    """SHA-256 binding the plan, the encoding and the server's session nonce (none: 32 zeros)."""
    nonce = bytes(32) if session_nonce is None else session_nonce
    return hashlib.sha256(LABEL + b"/config" + plan.digest(spec.digest(), spec.total_length) + nonce).digest()


def check_session_nonce(nonce) -> bytes | None:
    if nonce is None:
        return None
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != 32:
        raise ConfigurationError(f"session_nonce must be None or 32 bytes, found {type(nonce).__name__} of length {len(nonce) if hasattr(nonce, '__len__') else '?'}")
    return bytes(nonce)


def seed_commitment(session: bytes, cid: int, seed: bytes) -> bytes:
    """A client's commitment to its self-mask seed: SHA-256(label | session | id | seed)."""
    return hashlib.sha256(LABEL + b"/seed-commitment" + session + struct.pack(">I", cid) + seed).digest()


def is_client_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_CLIENT_ID


class SecAggClient:
    """One client's side of one session. Drive it with `advertise()` then `handle(bytes)`.

    `signing_key` is required when the plan pins signing keys and must match the registry entry
    for `client_id`. Give the input with `set_input` any time before the masked-input stage.
    `session_nonce` (optional, 32 bytes): the server's fresh value for this session, passed by the
    transport with the invitation; it is bound into the advertisement signature and the session
    id, so an advertisement recorded in another session with the same round id is refused.
    Without it, a round id must never repeat under one configuration (SECURITY.md).
    """

    def __init__(self, client_id: int, plan: Plan, spec: EncodingSpec, round_id: int = 0, signing_key: Ed25519PrivateKey | None = None,
                 session_nonce: bytes | None = None):
        if not is_client_id(client_id):
            raise ConfigurationError(f"client id must be an int in [0, {MAX_CLIENT_ID}], found {client_id!r}")
        if not isinstance(round_id, int) or isinstance(round_id, bool) or not 0 <= round_id < 1 << 64:
            raise ConfigurationError(f"round id must be an int in [0, 2^64), found {round_id!r}")
        if not isinstance(plan, Plan) or not isinstance(spec, EncodingSpec):
            raise ConfigurationError(f"expected a Plan and an EncodingSpec, found {type(plan).__name__} and {type(spec).__name__}")
        if spec.bits != plan.bits or spec.max_clients != plan.n_max:
            raise ConfigurationError("encoding spec and plan disagree on bits or number of clients")
        if signing_key is not None and not isinstance(signing_key, Ed25519PrivateKey):
            raise ConfigurationError(f"signing_key must be an Ed25519PrivateKey, found {type(signing_key).__name__}")
        self.id = client_id
        self.plan = plan
        self.spec = spec
        self.round_id = round_id
        self.session_nonce = check_session_nonce(session_nonce)
        self.digest = config_digest(plan, spec, self.session_nonce)
        if plan.pinned:
            if signing_key is None:
                raise ConfigurationError(f"client {client_id}: signing keys are pinned, so its Ed25519 private key is required")
            pinned = plan.signing_keys.get(client_id)
            if pinned is None or ed25519_public_bytes(signing_key) != pinned:
                raise ConfigurationError(f"client {client_id}: its signing key does not match the pinned registry")
            self._sign_sk, self._sig_pk = signing_key, pinned
        else:
            self._sign_sk, self._sig_pk = ed25519_keypair() if signing_key is None else (signing_key, ed25519_public_bytes(signing_key))
        self.stage = ClientStage.NEW
        self.clip_report: ClipReport | None = None
        self._x: np.ndarray | None = None
        self._session = m.NO_SESSION

    # ---- public driving API -----------------------------------------------------------------

    def set_input(self, x: np.ndarray, rng: np.random.Generator | None = None) -> ClipReport:
        """Encode this client's float vector (clipping counted in the returned report)."""
        if self.stage in (ClientStage.MASKED, ClientStage.SIGNED, ClientStage.DONE, ClientStage.ABORTED):
            raise WrongStage(f"client {self.id}: input can no longer be set at stage {self.stage.value}")
        self._x, self.clip_report = self.spec.encode(x, rng)
        return self.clip_report

    @property
    def encoded_input(self) -> np.ndarray | None:
        """The encoded input (for tests; None once it has been masked and sent)."""
        return self._x

    def advertise(self) -> bytes:
        """Stage 0: the signed key advertisement."""
        if self.stage is not ClientStage.NEW:
            self._abort()
            raise WrongStage(f"client {self.id}: keys already advertised")
        self._c_sk, self._c_pk = x25519_keypair()
        self._s_sk, self._s_pk = x25519_keypair()
        sig = self._sign_sk.sign(advertise_message(self.digest, self.round_id, self.id, self._c_pk, self._s_pk, self._sig_pk))
        self.stage = ClientStage.ADVERTISED
        return m.encode(
            m.AdvertiseKeys(self._c_pk, self._s_pk, self._sig_pk, sig),
            round_id=self.round_id, session=m.NO_SESSION, sender=self.id, recipient=m.SERVER,
        )

    def handle(self, blob: bytes) -> bytes:
        """Process the server's message for the current stage and return this client's reply."""
        if self.stage is ClientStage.ABORTED:
            raise ProtocolAborted(f"client {self.id} aborted earlier in this session and will not continue")
        expect = _EXPECT.get(self.stage)
        if expect is None:
            raise WrongStage(f"client {self.id} expects no message at stage {self.stage.value}")
        try:
            ctx = m.Context(self.round_id, self._session, self.id, self.plan.n_max, sender=m.SERVER)
            _, body = m.decode(blob, expect, ctx)
            if expect is m.Kind.KEY_LIST:
                return self._on_key_list(body)
            if expect is m.Kind.ROUTED_SHARES:
                return self._on_routed_shares(body)
            if expect is m.Kind.SURVIVOR_LIST:
                return self._on_survivors(body)
            return self._on_unmask(body)
        except Exception:
            self._abort()
            raise

    # ---- internals --------------------------------------------------------------------------

    def _abort(self) -> None:
        """Abort for good: drop every secret and remember the abort."""
        for name in ("_c_sk", "_s_sk", "_c_shared", "_s_shared", "_b", "_own_shares", "_received", "_x", "_sign_sk"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.stage = ClientStage.ABORTED

    def _send(self, body) -> bytes:
        return m.encode(body, round_id=self.round_id, session=self._session, sender=self.id, recipient=m.SERVER)

    def _send_signed(self, kind: m.Kind, parts: tuple) -> bytes:
        """A `SIGNED_KINDS` message: body parts, then the signature over `signed_digest`."""
        content = b"".join(parts) if kind is not m.Kind.MASKED_INPUT else parts[0]
        digest = m.signed_digest(kind, self.round_id, self._session, self.id, m.SERVER, content)
        sig = self._sign_sk.sign(digest)
        return m.frame(kind, (*parts, sig), round_id=self.round_id, session=self._session, sender=self.id, recipient=m.SERVER)

    def _signing_pk(self, cid: int) -> bytes:
        """A holder's Ed25519 key: pinned, or (unpinned) as its key-list entry advertised it."""
        return self.plan.signing_keys[cid] if self.plan.pinned else self._sig_pks[cid]

    def _on_key_list(self, kl: m.KeyList) -> bytes:
        t = self.plan.threshold
        if kl.config_digest != self.digest:
            raise ConfigMismatch(f"client {self.id}: the server's session parameters differ from this client's")
        listed = kl.listed_bytes()
        ids = m.listed_ids(listed)  # strictly increasing (checked when decoded); not kept
        count = len(ids)
        full = {e.client_id: e for e in kl.entries}
        mine = full.get(self.id)
        me = int(np.searchsorted(ids, self.id))
        if (mine is None or (mine.c_pk, mine.s_pk, mine.sig_pk) != (self._c_pk, self._s_pk, self._sig_pk)
                or me >= count or int(ids[me]) != self.id
                or m.listed_digest(listed, me) != entry_digest(self.id, self._c_pk, self._s_pk, self._sig_pk)):
            raise ReplayedMessage(f"client {self.id}: the key list does not carry this client's fresh keys (replayed or substituted)")
        if count < self.plan.min_clients:
            raise TooFewClients(
                f"client {self.id}: the key list names {count} clients, fewer than the {self.plan.min_clients} "
                f"(min_clients) this session requires of n_max={self.plan.n_max}; a server that shows a short list "
                "could choose who holds this client's shares"
            )
        # the session id binds every listed client's keys through its commitment; the graph
        # depends on the list only through its length, so our holders follow from L and our position
        self._session = session_id_of_listed(self.digest, self.round_id, listed)
        pos = {int(ids[q]): q for q in neighbour_positions(count, self.plan.degree, self._session, me, slots=self.plan.n_max)}
        pos[self.id] = me
        del ids
        extra = sorted(set(full) - set(pos))
        if extra:
            raise WrongNeighbours(
                f"client {self.id}: the key list carries the keys of client(s) {extra[:5]}, which are not its neighbours "
                "in the graph the list determines (a server choosing who holds this client's shares)"
            )
        missing = sorted(set(pos) - set(full))
        if missing:
            raise WrongNeighbours(f"client {self.id}: the key list lacks the keys of its neighbour(s) {missing[:5]}")
        seen: set[bytes] = set()
        for v in sorted(full):
            e = full[v]
            if m.listed_digest(listed, pos[v]) != entry_digest(v, e.c_pk, e.s_pk, e.sig_pk):
                raise MalformedMessage(f"client {self.id}: the keys of client {v} do not match the key list's commitment to them")
            keys = (e.c_pk, e.s_pk) if self.plan.pinned else (e.c_pk, e.s_pk, e.sig_pk)
            for k in keys:
                if k in seen:
                    raise DuplicateKey(f"client {self.id}: public key advertised twice in the key list (client {v})")
                seen.add(k)
            if self.plan.pinned:
                pinned = self.plan.signing_keys.get(v)
                if pinned is None:
                    raise BadSignature(f"client {self.id}: client {v} has no pinned signing key")
                if e.sig_pk != pinned:
                    raise BadSignature(f"client {self.id}: client {v} advertised a signing key other than its pinned one")
        self._neigh = frozenset(pos) - {self.id}
        self._pos = pos  # holder id -> key-list position
        self._listed_count = count
        if not self.plan.pinned:
            self._sig_pks = {v: full[v].sig_pk for v in pos}
        holders = sorted(pos)
        if len(holders) < t:
            raise TooFewSurvivors(f"client {self.id}: {len(holders)} share holders in the key list, threshold is {t}")
        if self.plan.pinned:  # unpinned, the advertised key vouches only for itself: nothing to check
            for v in sorted(self._neigh):
                e = full[v]
                verify(self._signing_pk(v), e.signature, advertise_message(self.digest, self.round_id, v, e.c_pk, e.s_pk, e.sig_pk), f"client {v}'s key advertisement")
        # both agreements with every neighbour now, before anything is released: a low-order key
        # (all-zero secret) is refused here by name (InvalidPublicKey), at no extra cost
        self._s_shared = {v: agree(self._s_sk, full[v].s_pk, f"client {self.id}: client {v}'s masking key (s_pk)") for v in sorted(self._neigh)}
        self._c_shared = {v: agree(self._c_sk, full[v].c_pk, f"client {self.id}: client {v}'s encryption key (c_pk)") for v in sorted(self._neigh)}
        self._b = random_seed()
        b_shares = shamir.share(self._b, [h + 1 for h in holders], t)
        k_shares = shamir.share(x25519_private_bytes(self._s_sk), [h + 1 for h in holders], t)
        self._own_shares = (b_shares[self.id + 1], k_shares[self.id + 1])
        out = []
        for v in sorted(self._neigh):
            key = share_key(self._c_shared[v], self._session, self.id, v)
            pt = struct.pack(">II", self.id, v) + b_shares[v + 1] + k_shares[v + 1]
            ad = associated_data(self._session, self.round_id, self.id, v, m.Stage.SHARE_KEYS)
            out.append((v, seal(key, pt, ad)))
        self.stage = ClientStage.SHARED
        body = m.encode_body(m.ShareKeys(tuple(out), seed_commitment(self._session, self.id, self._b)))
        return self._send_signed(m.Kind.SHARE_KEYS, (body[: -m.SIG_BYTES],))

    def _on_routed_shares(self, rs: m.RoutedShares) -> bytes:
        t = self.plan.threshold
        received: dict[int, tuple[bytes, bytes]] = {}
        for v, ct in rs.shares:
            if v not in self._neigh:
                raise WrongSender(f"client {self.id}: shares routed from {v}, which is not a neighbour")
            key = share_key(self._c_shared[v], self._session, v, self.id)
            pt = open_sealed(key, ct, associated_data(self._session, self.round_id, v, self.id, m.Stage.SHARE_KEYS))
            if struct.unpack(">II", pt[:8]) != (v, self.id):
                raise DecryptionFailed(f"client {self.id}: decrypted shares name the wrong sender or recipient")
            b_sh, k_sh = pt[8 : 8 + shamir.SHARE_BYTES], pt[8 + shamir.SHARE_BYTES :]
            received[v] = (b_sh, k_sh)
        if len(received) + 1 < t:
            raise TooFewSurvivors(f"client {self.id}: shares from {len(received)} neighbours, {t - 1} needed (threshold {t})")
        if self._x is None:
            raise InvalidInput(f"client {self.id}: no input set before the masked-input stage (call set_input)")
        self._received = received
        masks = [(self._b, +1)]  # the self mask, then +PRG(s_uv) for larger ids, -PRG(s_uv) for smaller
        for v in sorted(received):
            seed = pair_mask_seed(self._s_shared[v], self._session, self.id, v)
            masks.append((seed, +1 if self.id < v else -1))
        y, self._x = self._x, None  # mask the encoded input in place; it is not needed afterwards
        MaskExpander(self.spec.total_length, self.spec.dtype).apply(y, masks)
        self.spec.reduce(y)  # integer mode: only the residue mod 2^m leaves the client
        del masks
        self._b = self._s_sk = self._c_sk = self._c_shared = self._s_shared = None  # no longer needed: forget them
        self.stage = ClientStage.MASKED
        return self._send_signed(m.Kind.MASKED_INPUT, (memoryview(y).cast("B"),))

    def _in(self, positions: np.ndarray, who) -> set[int]:
        """The holders among `who` whose key-list positions are in the sorted array `positions`."""
        who = sorted(who)
        if not who or positions.size == 0:
            return set()
        want = np.array([self._pos[v] for v in who], dtype=np.int64)
        at = np.minimum(np.searchsorted(positions, want), positions.size - 1)
        return {v for v, hit in zip(who, positions[at] == want) if hit}

    def _on_survivors(self, sl: m.SurvivorList) -> bytes:
        t = self.plan.threshold
        s = np.asarray(sl.survivors, dtype=np.int64)
        holders = self._neigh | {self.id}
        alive = self._in(s, holders)
        if self.id not in alive:
            raise InconsistentSurvivors(f"client {self.id}: not in the survivor list although it sent its masked input")
        if s[-1] >= self._listed_count:
            raise InconsistentSurvivors(f"client {self.id}: survivor list names clients that never advertised keys (positions beyond the key list)")
        if len(s) < self.plan.min_clients:
            raise TooFewClients(
                f"client {self.id}: the survivor list names {len(s)} clients, fewer than the {self.plan.min_clients} "
                f"(min_clients) this session requires of n_max={self.plan.n_max}"
            )
        if not (alive & self._neigh) <= set(self._received):
            raise InconsistentSurvivors(f"client {self.id}: survivor list names neighbours that never shared keys with it")
        if len(alive) < t:
            raise TooFewSurvivors(f"client {self.id}: {len(alive)} of its share holders survived, threshold is {t}")
        self._signed = survivors_message(self._session, self.round_id, s)  # ~100 bytes, not the list
        sig = self._sign_sk.sign(self._signed)
        self.stage = ClientStage.SIGNED
        return self._send(m.ConsistencySignature(sig))

    def _on_unmask(self, req: m.UnmaskRequest) -> bytes:
        t = self.plan.threshold
        s = np.asarray(req.survivors, dtype=np.int64)
        d = np.asarray(req.dropped, dtype=np.int64)
        both = np.intersect1d(s, d, assume_unique=True)
        if both.size:
            raise SurvivedAndDropped(
                f"client {self.id}: server lists {both.size} client(s) (key-list positions {both[:5].tolist()}) as both "
                "survived and dropped; refusing to unmask"
            )
        if survivors_message(self._session, self.round_id, s) != self._signed:
            raise InconsistentSurvivors(f"client {self.id}: the survivor list at unmasking differs from the one it signed")
        if d.size and d[-1] >= self._listed_count:
            raise InconsistentSurvivors(f"client {self.id}: dropped list names clients that never advertised keys (positions beyond the key list)")
        holders = self._neigh | {self.id}
        alive, gone = self._in(s, holders), self._in(d, self._neigh)
        if not gone <= set(self._received):
            raise InconsistentSurvivors(f"client {self.id}: dropped list names neighbours that never shared keys with it")
        if not set(self._received) <= alive | gone:
            raise InconsistentSurvivors(f"client {self.id}: the server does not account for every neighbour that shared keys")
        valid = 0
        for v, sig in req.signatures:
            if v not in holders:  # only holders' signatures count; an honest server sends no others
                raise InconsistentSurvivors(f"client {self.id}: signature from client {v}, which is not one of its share holders")
            if v not in alive:
                raise InconsistentSurvivors(f"client {self.id}: signature from {v}, who is not a survivor")
            verify(self._signing_pk(v), sig, self._signed, f"client {v}'s survivor set", error=InconsistentSurvivors)
            valid += 1
        if valid < t:
            raise TooFewSurvivors(f"client {self.id}: {valid} of its share holders signed the survivor set, threshold is {t}")
        b_out = [(w, self._own_shares[0] if w == self.id else self._received[w][0]) for w in sorted(alive)]
        k_out = [(v, self._received[v][1]) for v in sorted(gone)]
        self._own_shares = self._received = None
        self.stage = ClientStage.DONE
        body = m.encode_body(m.UnmaskShares(tuple(b_out), tuple(k_out)))
        return self._send_signed(m.Kind.UNMASK_SHARES, (body[: -m.SIG_BYTES],))
