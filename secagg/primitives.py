"""The cryptographic primitives of the protocol, all from `cryptography` (OpenSSL).

- Key agreement: X25519. Each client holds two key pairs per session: ``c`` to encrypt the
  shares it sends to its neighbours, ``s`` to agree the pairwise mask seeds.
- Key derivation: HKDF-SHA256. The ``info`` always carries a protocol label, the session id and
  the pair of client ids: ordered (sender, recipient) for the share-encryption key, which is
  therefore different in each direction, and (min, max) for the pairwise mask seed, which both
  ends must agree on.
- Authenticated encryption: AES-256-GCM with a fresh 96-bit random nonce per message; the
  associated data binds session, round, sender, recipient and stage, so a ciphertext moved to any
  other context fails with `DecryptionFailed` (never returns garbage).
- Mask PRG: AES-256-CTR keyed by a 256-bit seed, counter block starting at zero, read as
  little-endian uint32 / uint64 words. Every seed is used for one mask only: self-mask seeds are
  fresh per session and pairwise seeds are derived with the session id, so no key/counter pair
  repeats.
- Signatures: Ed25519, over the key advertisement and over the survivor set.
- Session id: SHA-256 over a label, the configuration digest, the round and, for every listed
  client in increasing id order, its id and a SHA-256 commitment to its advertised public keys
  (`entry_digest`): so a client needs every listed client's 36-byte commitment but only its
  neighbours' keys to compute it.

Randomness comes only from `secrets` / `os.urandom` (directly, or inside OpenSSL's key
generation).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from .errors import BadSignature, DecryptionFailed, InvalidPublicKey

LABEL = b"privlora-secagg/v1"
SEED_BYTES = 32
KEY_BYTES = 32  # raw X25519 / Ed25519 public key
SIG_BYTES = 64
NONCE_BYTES = 12
TAG_BYTES = 16


def random_seed() -> bytes:
    """A fresh 256-bit seed from the operating system's CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


# ---- X25519 ---------------------------------------------------------------------------------


def x25519_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair: (private key object, raw 32-byte public key)."""
    sk = X25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def x25519_from_private_bytes(raw: bytes) -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.from_private_bytes(raw)
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(sk: X25519PrivateKey, peer_public: bytes, what: str = "a peer's key") -> bytes:
    """X25519 shared secret; a low-order peer key (all-zero secret) is refused (`InvalidPublicKey`)."""
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise InvalidPublicKey(f"{what} is not a usable X25519 public key (low-order point: all-zero shared secret): {exc}") from exc


_PROBE = X25519PrivateKey.generate()  # its secrecy does not matter: only zero / non-zero is looked at


def check_x25519_public(peer_public: bytes, what: str) -> None:
    """Refuse a small-order X25519 public key (`InvalidPublicKey`).

    X25519 clamps every private scalar to a multiple of the cofactor 8, so the shared secret with
    a point of order 1, 2, 4 or 8 (u = 0, 1, p - 1, the two order-8 u's, and their non-canonical
    encodings >= p) is all zero for *every* private key, and OpenSSL (through `cryptography`)
    raises on it. One agreement with a throw-away key therefore decides it for everyone.
    """
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != KEY_BYTES:
        raise InvalidPublicKey(f"{what} must be {KEY_BYTES} bytes")
    agree(_PROBE, bytes(peer_public), what)


def hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def share_key(shared: bytes, session: bytes, sender: int, recipient: int) -> bytes:
    """AES-256-GCM key for shares sent from `sender` to `recipient` (direction-specific)."""
    return hkdf(shared, LABEL + b"/share-key" + session + struct.pack(">II", sender, recipient))


def pair_mask_seed(shared: bytes, session: bytes, u: int, v: int) -> bytes:
    """The 256-bit seed of the pairwise mask between clients u and v (symmetric in u, v)."""
    lo, hi = (u, v) if u < v else (v, u)
    return hkdf(shared, LABEL + b"/pair-mask" + session + struct.pack(">II", lo, hi))


# ---- AES-256-GCM ----------------------------------------------------------------------------


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """nonce || ciphertext || tag, with a fresh random 96-bit nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes) -> bytes:
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise DecryptionFailed("ciphertext shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise DecryptionFailed(
            "encrypted share failed authentication (tampered, or bound to another session, round, "
            "sender, recipient or stage)"
        ) from exc


# ---- Ed25519 --------------------------------------------------------------------------------


def ed25519_keypair() -> tuple[Ed25519PrivateKey, bytes]:
    sk = Ed25519PrivateKey.generate()
    return sk, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_public_bytes(sk: Ed25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def verify(public: bytes, signature: bytes, message: bytes, what: str, error: type = BadSignature) -> None:
    """Raise `error` (default `BadSignature`) unless `signature` verifies over `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise error(f"signature of {what} does not verify") from exc


# ---- key list commitments and session id --------------------------------------------------

LISTED_BYTES = 4 + 32  # a key list's commitment to one client: id | entry digest


def entry_digest(cid: int, c_pk: bytes, s_pk: bytes, sig_pk: bytes) -> bytes:
    """SHA-256 commitment to one client's advertised public keys (bound to its id)."""
    return hashlib.sha256(LABEL + b"/key-entry" + struct.pack(">I", cid) + c_pk + s_pk + sig_pk).digest()


def listed_block(entries: Iterable[tuple[int, bytes, bytes, bytes]]) -> bytes:
    """The key list's commitments: id | `entry_digest` for every (id, c_pk, s_pk, signing pk),
    in increasing id order (36 bytes each)."""
    return b"".join(struct.pack(">I", e[0]) + entry_digest(*e) for e in sorted(entries))


def session_id_of_listed(config_digest: bytes, round_id: int, listed: bytes | memoryview) -> bytes:
    """SHA-256 over the label, configuration digest, round, and the key list's commitments
    (`listed_block`): a client that holds the commitments of all L listed clients and the keys
    of only some of them computes the same session id as one that holds every key."""
    if len(listed) % LISTED_BYTES:
        raise ValueError(f"a key list's commitments are {LISTED_BYTES} bytes each")
    h = hashlib.sha256()
    h.update(LABEL + b"/session/v3")
    h.update(config_digest)
    h.update(struct.pack(">QI", round_id, len(listed) // LISTED_BYTES))
    h.update(listed)
    return h.digest()


def session_id(config_digest: bytes, round_id: int, entries: Iterable[tuple[int, bytes, bytes, bytes]]) -> bytes:
    """The session id of a key list given in full: `entries` are (client id, c_pk, s_pk, signing pk),
    hashed sorted by client id, each through its `entry_digest` (see `session_id_of_listed`)."""
    return session_id_of_listed(config_digest, round_id, listed_block(entries))


# ---- mask PRG -------------------------------------------------------------------------------

_ZERO_IV = bytes(16)


def keystream(seed: bytes, nbytes: int) -> bytes:
    """AES-256-CTR keystream of `nbytes` bytes for a 256-bit seed (a fresh buffer)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, found {len(seed)}")
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor().update(bytes(nbytes))


CHUNK_BYTES = 1 << 17  # 128 KiB: a keystream chunk and its slice of the accumulator stay in L2


class MaskExpander:
    """Expands 256-bit seeds into masks of `length` words of `dtype` (uint32 or uint64).

    `apply` adds (or subtracts) many masks to an accumulator in one pass over it, a cache-sized
    chunk at a time: for each chunk, every seed's AES-CTR stream writes its next 128 KiB into one
    reusable buffer (``update_into``), which is added in place with numpy's wrapping arithmetic
    while both are still in cache. No per-mask allocation and no full-length keystream buffer, so
    the cost stays close to the keystream alone. `expand` gives one whole mask (tests, reference).
    """

    def __init__(self, length: int, dtype: np.dtype):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.length = int(length)
        self.nbytes = self.length * self.dtype.itemsize
        self._buffers: dict[int, tuple[bytes, bytearray, np.ndarray]] = {}

    def _scratch(self, words: int) -> tuple[bytes, bytearray, np.ndarray]:
        """Zero input, output buffer (update_into needs 15 spare bytes) and its numpy view."""
        if words not in self._buffers:
            buf = bytearray(words * self.dtype.itemsize + 15)
            self._buffers[words] = (bytes(words * self.dtype.itemsize), buf, np.frombuffer(buf, dtype=self.dtype, count=words))
        return self._buffers[words]

    def apply(self, acc: np.ndarray, masks: list[tuple[bytes, int]]) -> None:
        """acc += sum(sign * PRG(seed)) mod 2^b for (seed, sign) in masks, sign in {+1, -1}."""
        if acc.shape != (self.length,) or acc.dtype != self.dtype:
            raise ValueError(f"accumulator must be {self.dtype} of length {self.length}")
        streams = []
        for seed, sign in masks:
            if len(seed) != SEED_BYTES:
                raise ValueError(f"mask seeds are {SEED_BYTES} bytes, found {len(seed)}")
            op = np.add if sign > 0 else np.subtract
            streams.append((Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor(), op))
        words = min(self.length, max(1, CHUNK_BYTES // self.dtype.itemsize))
        zeros, buf, full_view = self._scratch(words)
        zeros = memoryview(zeros)
        for start in range(0, self.length, words):
            seg = acc[start : start + words]
            chunk, view = zeros[: seg.shape[0] * self.dtype.itemsize], full_view[: seg.shape[0]]
            for enc, op in streams:
                enc.update_into(chunk, buf)
                op(seg, view, out=seg)

    def expand(self, seed: bytes) -> np.ndarray:
        """The mask for `seed`, as a view valid until the next call."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"mask seeds are {SEED_BYTES} bytes, found {len(seed)}")
        zeros, buf, view = self._scratch(self.length)
        Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor().update_into(zeros, buf)
        return view

    def add(self, acc: np.ndarray, seed: bytes) -> None:
        np.add(acc, self.expand(seed), out=acc)

    def subtract(self, acc: np.ndarray, seed: bytes) -> None:
        np.subtract(acc, self.expand(seed), out=acc)
