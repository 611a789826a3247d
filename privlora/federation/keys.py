"""Pinned signing keys for secure aggregation against a malicious server.

``privlora keys --clients N --out DIR`` writes:

- ``DIR/registry.json``: ``{"format": "privlora-key-registry/1", "keys": {"0": hex, ...}}``,
  every client's raw 32-byte Ed25519 public key in hex; public, goes into the run's config as
  ``secagg.key_registry`` and to every party;
- ``DIR/client-K.key``: client K's private key (PKCS#8 PEM, file mode 0600); it belongs to that
  client alone and goes into its node config (``signing-key``), never to the server.

In simulation one process plays every client, so it reads the private keys beside the registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from privlora.core.config import ConfigError

FORMAT = "privlora-key-registry/1"


def private_key_path(registry: str | Path, client: int) -> Path:
    return Path(registry).parent / f"client-{int(client)}.key"


def generate_keys(n_clients: int, out: str | Path) -> Path:
    """Fresh keys for clients 0..n-1; refuses to overwrite an existing registry."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if n_clients < 1:
        raise ConfigError(f"--clients: must be >= 1, found {n_clients}")
    out = Path(out)
    registry = out / "registry.json"
    if registry.exists():
        raise ConfigError(f"--out: {registry} already exists; keys are never overwritten (choose another folder)")
    out.mkdir(parents=True, exist_ok=True)
    public = {}
    for k in range(n_clients):
        sk = Ed25519PrivateKey.generate()
        pem = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        path = private_key_path(registry, k)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        public[str(k)] = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    registry.write_text(json.dumps({"format": FORMAT, "keys": public}, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return registry


def load_registry(path: str | Path) -> dict[int, bytes]:
    """{client id: raw Ed25519 public key} from a registry file, or ConfigError naming the problem."""
    p = Path(path)
    where = "secagg.key_registry"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: {p} does not exist; create one with `privlora keys --clients N --out DIR`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: {p} is not a readable JSON key registry ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
        raise ConfigError(f"{where}: {p} is not a {FORMAT} file (written by `privlora keys`)")
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
        if registry.get(int(client)) != pub:
            raise ConfigError(f"signing key of client {client}: {p} does not match the client's key in the registry")
    return key
