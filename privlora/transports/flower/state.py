"""A node's memory between Flower messages, sealed with a key only that node holds.

Flower starts a new ClientApp process for every message, so what a client must remember from
one stage to the next (this round's contribution, its secure-aggregation session with its
secret keys and shares) is kept in the node's ``context.state``, which the SuperNode holds in
its own memory on the client's machine. It is serialised with `pickle` (the session holds key
objects and numpy arrays) and authenticated with HMAC-SHA256 under a 256-bit key stored in the
node's own folder (mode 0600): a blob is unpickled only if its tag verifies, so bytes that did
not come from this node's own earlier process are refused, never deserialised. Even then the
unpickler resolves only an allow-list of classes (`secagg`'s session objects, numpy arrays, the
key reducers here, the node's pending contribution), each named exactly as a (module, name) pair:
a blob naming anything else (``os.system``, or any other function of an allowed module) is
refused by name before anything runs, so a leaked key does not become code execution. Nothing received from
the network is ever unpickled.
"""

from __future__ import annotations

import copyreg
import hashlib
import hmac
import io
import os
import pickle
import tempfile
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from privlora.federation.messages import MessageError

KEY_FILE = "state.key"


def _raw(key) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _x25519(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def _ed25519(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def _raw_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _x25519_public(raw: bytes) -> X25519PublicKey:
    return X25519PublicKey.from_public_bytes(raw)


def _ed25519_public(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def _mappingproxy(d: dict) -> MappingProxyType:
    return MappingProxyType(d)


class _Pickler(pickle.Pickler):
    dispatch_table = copyreg.dispatch_table.copy()
    dispatch_table[type(X25519PrivateKey.generate())] = lambda k: (_x25519, (_raw(k),))
    dispatch_table[type(Ed25519PrivateKey.generate())] = lambda k: (_ed25519, (_raw(k),))
    dispatch_table[type(X25519PrivateKey.generate().public_key())] = lambda k: (_x25519_public, (_raw_public(k),))
    dispatch_table[type(Ed25519PrivateKey.generate().public_key())] = lambda k: (_ed25519_public, (_raw_public(k),))
    dispatch_table[MappingProxyType] = lambda mp: (_mappingproxy, (dict(mp),))


_ALLOWED = frozenset({
    # the node's pending contribution and its secure-aggregation session (`secagg.SecAggClient`
    # and what it holds); listed exactly: every other name, even in these modules, is refused
    ("privlora.federation.node", "_Pending"),
    ("secagg.client", "SecAggClient"), ("secagg.client", "ClientStage"),
    ("secagg.params", "Plan"),
    ("secagg.encoding", "EncodingSpec"), ("secagg.encoding", "Segment"), ("secagg.encoding", "ClipReport"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    (__name__, "_x25519"), (__name__, "_ed25519"), (__name__, "_x25519_public"), (__name__, "_ed25519_public"),
    (__name__, "_mappingproxy"),
})
"""Every (module, name) a node's sealed state may name, and nothing else."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise MessageError(f"the node's saved state names {module}.{name}, which a node's state never holds; refusing it")


KEY_BYTES = 32


def node_key(folder: str | Path) -> bytes:
    """This node's sealing key, created on first use (mode 0600). Created atomically: the 32 bytes
    are written to a private temporary file and fsynced, then hard-linked to the key's name (which
    fails if another process got there first: its key is used), so no reader ever sees a partial
    key; a key file of any other length is refused."""
    from privlora.core.checkpoint import fsync_dir

    folder = Path(folder)
    path = folder / KEY_FILE
    if not path.is_file():
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=folder)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first; both use that one
        finally:
            os.unlink(tmp)
        fsync_dir(folder)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise MessageError(f"{path} is damaged (not a {KEY_BYTES}-byte key); delete it and start the run again")
    return key


def seal(obj, key: bytes) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    body = buf.getvalue()
    return hmac.new(key, body, hashlib.sha256).digest() + body


def unseal(blob: bytes, key: bytes):
    tag, body = blob[:32], blob[32:]
    if len(blob) < 32 or not hmac.compare_digest(tag, hmac.new(key, body, hashlib.sha256).digest()):
        raise MessageError("the node's saved state does not verify under its own key; refusing to load it")
    return _Unpickler(io.BytesIO(body)).load()
