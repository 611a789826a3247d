"""Pinned signing keys for secure aggregation against a malicious server.

Each node makes its own key; the registry is built from public keys only, so nobody (least of
all the coordinator) ever holds another party's private key:

1. on each node, ``privlora keys node --out DIR [--client-id K]`` writes ``DIR/node.key``, this
   node's Ed25519 private key (PKCS#8 PEM, mode 0600, never leaves the node: its node config's
   ``signing-key``), and ``DIR/node.pub``,
   ``{"format": "privlora-public-key/1", "public_key": hex, "client_id": K or null}``;
2. the node operators send their ``node.pub`` files to the coordinator, who runs
   ``privlora keys registry --out registry.json [--id K ...] PUBFILE...`` (client ids given by
   ``--id`` in the files' order, or from each file's ``client_id``);
3. ``registry.json``, ``{"format": "privlora-key-registry/1", "keys": {"0": hex, ...}}``, every
   client's raw 32-byte public key in hex, goes into the config as ``secagg.key_registry`` and to
   every party. A node refuses to start with a registry that does not hold its own public key
   under its client id.

Simulation only: when one process plays every client (``privlora run`` in process, tests),
``privlora keys simulation --clients N --out DIR`` writes a registry and every client's private
key ``client-K.key`` beside it, where that process reads them. Never use it for a deployment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from privlora.core.config import ConfigError

FORMAT = "privlora-key-registry/1"
PUBLIC_FORMAT = "privlora-public-key/1"
NODE_KEY, NODE_PUB = "node.key", "node.pub"


def private_key_path(registry: str | Path, client: int) -> Path:
    """Simulation only: where `generate_simulation_keys` put client ``client``'s private key."""
    return Path(registry).parent / f"client-{int(client)}.key"


def _new_private_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    sk = Ed25519PrivateKey.generate()
    pem = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, pub


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file (never overwrite), fsynced, folder fsynced."""
    from privlora.core.checkpoint import fsync_dir

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path.parent)


def generate_node_key(out: str | Path, client_id: int | None = None) -> tuple[Path, Path]:
    """This node's own key pair: (``out/node.key`` mode 0600, ``out/node.pub``); never overwrites."""
    if client_id is not None and int(client_id) < 0:
        raise ConfigError(f"--client-id: must be >= 0, found {client_id}")
    out = Path(out)
    key, pubfile = out / NODE_KEY, out / NODE_PUB
    for p in (key, pubfile):
        if p.exists():
            raise ConfigError(f"--out: {p} already exists; a node's key is never overwritten (choose another folder)")
    out.mkdir(parents=True, exist_ok=True)
    pem, pub = _new_private_key()
    _write_new(key, pem, 0o600)
    doc = {"format": PUBLIC_FORMAT, "public_key": pub.hex(), "client_id": None if client_id is None else int(client_id)}
    _write_new(pubfile, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    return key, pubfile


def read_public_key(path: str | Path) -> tuple[bytes, int | None]:
    """(raw public key, client id or None) of a ``node.pub`` file; refuses anything holding a private key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p} does not exist; each node writes its node.pub with `privlora keys node --out DIR`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not a readable public key file ({exc})") from None
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{p} holds a PRIVATE key: a registry is built from public keys only (each node's node.pub); "
                          "the private key never leaves its node")
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != PUBLIC_FORMAT:
            raise ValueError(f"not a {PUBLIC_FORMAT} file")
        raw = bytes.fromhex(doc["public_key"])
        cid = doc.get("client_id")
        cid = None if cid is None else int(cid)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{p} is not a node public key written by `privlora keys node` ({exc})") from None
    if len(raw) != 32:
        raise ConfigError(f"{p}: the public key has {len(raw)} bytes, an Ed25519 public key has 32")
    return raw, cid


def build_registry(out: str | Path, pubfiles: list[str | Path], ids: list[int] | None = None) -> Path:
    """``out`` (registry.json) from nodes' public key files; ids from ``ids`` (in order) or the files."""
    from privlora.core.checkpoint import atomic_write

    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out: {out} already exists; a registry is never overwritten (choose another name)")
    if not pubfiles:
        raise ConfigError("give the public key file (node.pub) of every client")
    if ids is not None and len(ids) != len(pubfiles):
        raise ConfigError(f"--id: {len(ids)} ids for {len(pubfiles)} public key files; give one --id per file, in order, or none")
    keys: dict[int, bytes] = {}
    for i, f in enumerate(pubfiles):
        raw, cid = read_public_key(f)
        if ids is not None:
            cid = int(ids[i])
        if cid is None:
            raise ConfigError(f"{f} names no client id: give --id for every file (in order), or write the node's key "
                              "with `privlora keys node --client-id K`")
        if cid < 0:
            raise ConfigError(f"client id {cid} of {f}: must be >= 0")
        if cid in keys:
            raise ConfigError(f"client {cid} appears twice; every client has exactly one public key")
        if raw in keys.values():
            raise ConfigError(f"{f}: the same public key is given for two clients; each node makes its own key")
        keys[cid] = raw
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps({"format": FORMAT, "keys": {str(k): v.hex() for k, v in sorted(keys.items())}},
                                 indent=1, sort_keys=True) + "\n")
    return out


def generate_simulation_keys(n_clients: int, out: str | Path) -> Path:
    """SIMULATION ONLY (one process plays every client): a registry and every client's private
    key ``client-K.key`` beside it. A deployment uses `generate_node_key` on each node and
    `build_registry`; refuses to overwrite an existing registry."""
    if n_clients < 1:
        raise ConfigError(f"--clients: must be >= 1, found {n_clients}")
    out = Path(out)
    registry = out / "registry.json"
    if registry.exists():
        raise ConfigError(f"--out: {registry} already exists; keys are never overwritten (choose another folder)")
    out.mkdir(parents=True, exist_ok=True)
    public = {}
    for k in range(n_clients):
        pem, pub = _new_private_key()
        _write_new(private_key_path(registry, k), pem, 0o600)
        public[str(k)] = pub.hex()
    registry.write_text(json.dumps({"format": FORMAT, "keys": public}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return registry


def load_registry(path: str | Path) -> dict[int, bytes]:
    """{client id: raw Ed25519 public key} from a registry file, or ConfigError naming the problem."""
    p = Path(path)
    where = "secagg.key_registry"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: {p} does not exist; build one with `privlora keys registry --out FILE PUBFILE...` from the nodes' node.pub files") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {p} is not a readable JSON key registry ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
        raise ConfigError(f"{where}: {p} is not a {FORMAT} file (written by `privlora keys registry`)")
    out = {}
    for k, v in doc["keys"].items():
        try:
            raw = bytes.fromhex(v)
            cid = int(k)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {p}: entry {k!r} is not a client id with a hex key") from None
        if len(raw) != 32:
            raise ConfigError(f"{where}: {p}: client {k}'s key has {len(raw)} bytes, an Ed25519 public key has 32")
        out[cid] = raw
    return out


def load_private_key(path: str | Path, client: int, registry: dict[int, bytes] | None = None):
    """Client ``client``'s Ed25519 private key; checked against its registry entry if given."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise ConfigError(f"signing key of client {client}: {p} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"signing key of client {client}: {p} is not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key of client {client}: {p} is not an Ed25519 key")
    if registry is not None:
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        mine = [c for c, k in registry.items() if k == pub]
        if int(client) not in registry:
            raise ConfigError(f"signing key of client {client}: the key registry holds no public key for client {client}"
                              + (f" (it holds this node's key under client {mine[0]})" if mine else "")
                              + "; this node refuses a registry without its own public key: send this node's node.pub to the "
                              "coordinator and use the registry `privlora keys registry` builds from it")
        if registry[int(client)] != pub:
            raise ConfigError(f"signing key of client {client}: {p} does not match the client's key in the registry "
                              + (f"(this node's public key is registered as client {mine[0]}); " if mine else
                                 "(the registry does not hold this node's public key); ")
                              + "this node refuses a registry without its own public key: check its client-id, or rebuild the "
                              "registry from every node's node.pub with `privlora keys registry`")
    return key
