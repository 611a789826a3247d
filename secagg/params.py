"""Protocol parameters: what the caller chooses (`SecAggParams`) and what it resolves to (`Plan`).

`SecAggParams.resolve(n)` fixes, for a session of at most n clients, the graph degree k (None =
complete graph) and the Shamir threshold t, and refuses insecure choices:

- complete graph: share holders h = n; t must satisfy n/2 < t <= n (default: floor(n/2) + 1);
- SecAgg+ with degree k (even): h = k + 1 (the neighbours and the client itself); t must satisfy
  k/2 < t <= k + 1 (default: k/2 + 1; with ``neighbours="auto"``, Bell et al.'s choice of k and t,
  see `secagg.graph.choose_degree`).

What t buys (h share holders): against an honest-but-curious server colluding with fewer than t
clients, nothing beyond the sum is learnt; against a malicious server (with pinned signing keys),
colluding with c clients, nothing beyond the sum of at least t inputs is learnt if c < 2t - h. The
protocol completes while at least t holders of every needed secret stay online.

`min_clients` is the fewest clients a client accepts in the key list and in the survivor list: t
for the complete graph, ceil((1 - dropout_rate) n_max) for SecAgg+ (Bell et al.'s dropout
assumption; SECURITY.md gives the bound a malicious server faces for each choice).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import ConfigurationError, InsecureThreshold
from .graph import choose_degree

MAX_CLIENT_ID = 0xFFFFFFFE  # 0xFFFFFFFF denotes the server on the wire


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_rate(name: str, x) -> None:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or not 0 <= x < 1:
        raise ConfigurationError(f"{name} must be a number in [0, 1), found {x!r}")


@dataclass(frozen=True)
class SecAggParams:
    """Caller-facing parameters of one secure-aggregation session.

    bits: modulus 2^bits of the masked sum, the int 32 or 64.
    threshold: Shamir threshold t; None = the smallest secure value (see module docstring).
    neighbours: None = complete graph (SecAgg); an even int k = SecAgg+ with degree k;
        "auto" = Bell et al.'s O(log n) degree for `corrupt_rate` and `dropout_rate`. A degree
        of n - 1 or more is the complete graph.
    signing_keys: optional registry {client id: raw 32-byte Ed25519 public key}, pinned in
        advance. With it, clients authenticate key advertisements and survivor-set signatures
        against the registry (malicious-server model). Without it, signing keys are advertised
        per session and the guarantee is honest-but-curious only.
    precision_bits: each client's clip range is resolved into at least 2^precision_bits steps;
        an int in [1, bits - 2].
    corrupt_rate, dropout_rate: assumed fractions of n_max, numbers in [0, 1). `"auto"` chooses
        k and t from both; `dropout_rate` also sets SecAgg+'s default `min_clients`.
    min_clients: the fewest clients a client accepts in the key list and in the survivor list
        (a malicious server would show a victim a short list). None = the default: t for the
        complete graph; ceil((1 - dropout_rate) n_max) for SecAgg+, Bell et al.'s assumption
        that at most a dropout_rate fraction of the n_max clients drops over the whole session.
        Must lie in [t, n_max].
    """

    bits: int = 32
    threshold: int | None = None
    neighbours: int | str | None = None
    signing_keys: Mapping[int, bytes] | None = None
    precision_bits: int = 16
    corrupt_rate: float = 0.05
    dropout_rate: float = 0.1
    min_clients: int | None = None

    def __post_init__(self):
        if not _is_int(self.bits) or self.bits not in (32, 64):
            raise ConfigurationError(f"bits must be the int 32 or 64, found {self.bits!r}")
        if self.threshold is not None and not _is_int(self.threshold):
            raise ConfigurationError(f"threshold must be an int or None, found {self.threshold!r}")
        if not _is_int(self.precision_bits) or not 1 <= self.precision_bits <= self.bits - 2:
            raise ConfigurationError(f"precision_bits must be an int in [1, {self.bits - 2}] for bits={self.bits}, found {self.precision_bits!r}")
        _check_rate("corrupt_rate", self.corrupt_rate)
        _check_rate("dropout_rate", self.dropout_rate)
        if self.min_clients is not None and (not _is_int(self.min_clients) or self.min_clients < 2):
            raise ConfigurationError(f"min_clients must be an int >= 2 or None, found {self.min_clients!r}")
        nb = self.neighbours
        if not (nb is None or nb == "auto" or _is_int(nb)):
            raise ConfigurationError(f'neighbours must be None, an even int or "auto", found {nb!r}')
        if _is_int(nb) and (nb < 2 or nb % 2):
            raise ConfigurationError(f"neighbours (the SecAgg+ degree) must be an even int >= 2, found {nb}")
        if self.signing_keys is not None:
            if not isinstance(self.signing_keys, Mapping):
                raise ConfigurationError(f"signing_keys must be a mapping {{client id: 32-byte key}}, found {type(self.signing_keys).__name__}")
            reg = {}
            for cid, pk in self.signing_keys.items():
                if not _is_int(cid) or not 0 <= cid <= MAX_CLIENT_ID:
                    raise ConfigurationError(f"signing_keys: client id {cid!r} is not an int in [0, {MAX_CLIENT_ID}]")
                if not isinstance(pk, (bytes, bytearray)) or len(pk) != 32:
                    raise ConfigurationError(f"signing_keys[{cid}] must be a raw 32-byte Ed25519 public key")
                reg[cid] = bytes(pk)
            if len(set(reg.values())) != len(reg):
                raise ConfigurationError("signing_keys: two clients share the same Ed25519 public key")
            object.__setattr__(self, "signing_keys", MappingProxyType(reg))

    def resolve(self, n_clients: int) -> "Plan":
        """The concrete degree, threshold and least list size for at most `n_clients` clients."""
        if not _is_int(n_clients) or n_clients < 2:
            raise ConfigurationError(f"secure aggregation needs at least 2 clients, found {n_clients!r}")
        degree: int | None
        t_default: int
        if self.neighbours is None:
            degree = None
        elif self.neighbours == "auto":
            found = choose_degree(n_clients, self.corrupt_rate, self.dropout_rate)
            degree = None if found is None else found[0]
        else:
            degree = int(self.neighbours)
        if degree is not None and degree >= n_clients - 1:
            degree = None
        holders = n_clients if degree is None else degree + 1
        if self.neighbours == "auto" and degree is not None:
            t_default = found[1]
        else:
            t_default = holders // 2 + 1
        t = t_default if self.threshold is None else self.threshold
        if self.min_clients is not None:
            least = self.min_clients
        elif degree is None:
            least = t
        else:
            least = max(t, min(n_clients, math.ceil((1 - self.dropout_rate) * n_clients - 1e-9)))
        return Plan(
            n_max=n_clients,
            bits=self.bits,
            degree=degree,
            threshold=t,
            precision_bits=self.precision_bits,
            signing_keys=self.signing_keys,
            min_clients=least,
        )


@dataclass(frozen=True)
class Plan:
    """Resolved session parameters, identical at every party (their digest is in the session id).

    min_clients: the fewest clients a client accepts in a key list or survivor list (see
    `SecAggParams`); None when built directly = the threshold t.
    """

    n_max: int
    bits: int
    degree: int | None
    threshold: int
    precision_bits: int
    signing_keys: Mapping[int, bytes] | None = field(default=None, compare=False)
    min_clients: int | None = None

    def __post_init__(self):
        if not _is_int(self.n_max) or self.n_max < 2:
            raise ConfigurationError(f"secure aggregation needs at least 2 clients, found {self.n_max!r}")
        if not _is_int(self.bits) or self.bits not in (32, 64):
            raise ConfigurationError(f"bits must be the int 32 or 64, found {self.bits!r}")
        if not _is_int(self.precision_bits) or not 1 <= self.precision_bits <= self.bits - 2:
            raise ConfigurationError(f"precision_bits must be an int in [1, {self.bits - 2}], found {self.precision_bits!r}")
        if not _is_int(self.threshold):
            raise ConfigurationError(f"threshold must be an int, found {self.threshold!r}")
        if self.degree is not None and (not _is_int(self.degree) or self.degree < 2 or self.degree % 2 or self.degree >= self.n_max - 1):
            raise ConfigurationError(f"SecAgg+ degree must be even, >= 2 and < n - 1 = {self.n_max - 1}; found {self.degree}")
        t, holders = self.threshold, self.holders
        what = "n" if self.degree is None else "the neighbourhood size k + 1"
        if 2 * t <= holders:
            raise InsecureThreshold(
                f"threshold t={t} is not above half of the {holders} share holders ({what}): a server "
                f"could collect both shares of one client from two disjoint groups and unmask it. "
                f"Use t >= {holders // 2 + 1} (or threshold=None for the smallest secure value)."
            )
        if t > holders:
            raise InsecureThreshold(f"threshold t={t} exceeds the {holders} share holders ({what}): nothing could ever be reconstructed")
        if self.min_clients is None:
            object.__setattr__(self, "min_clients", t)
        if not _is_int(self.min_clients) or not t <= self.min_clients <= self.n_max:
            raise ConfigurationError(
                f"min_clients={self.min_clients!r} must be an int between the threshold t={t} and n_max={self.n_max}: "
                "a client could never gather t shares from fewer clients, and no list can be longer than n_max"
            )
        reg = hashlib.sha256(b"privlora-secagg/v1/registry")
        if self.signing_keys is not None:
            for cid in sorted(self.signing_keys):
                reg.update(struct.pack(">I", cid) + self.signing_keys[cid])
        object.__setattr__(self, "_registry_digest", reg.digest())  # hashed once, not per client

    @property
    def holders(self) -> int:
        """Share holders per client: n (complete graph) or k + 1."""
        return self.n_max if self.degree is None else self.degree + 1

    @property
    def pinned(self) -> bool:
        return self.signing_keys is not None

    @property
    def tolerated_colluders(self) -> int:
        """Colluders among one client's share holders that a malicious server may have without
        collecting both kinds of that client's shares: 2t - h - 1 (h = holders, see SECURITY.md)."""
        return max(0, 2 * self.threshold - self.holders - 1)

    def digest(self, encoding_digest: bytes, vector_length: int) -> bytes:
        h = hashlib.sha256(b"privlora-secagg/v2/plan")
        h.update(struct.pack(">IBIIBBQI", self.n_max, self.bits, self.degree or 0, self.threshold, self.precision_bits,
                             self.pinned, vector_length, self.min_clients))
        h.update(self._registry_digest)
        h.update(encoding_digest)
        return h.digest()
