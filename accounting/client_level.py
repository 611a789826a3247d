"""Client-level DP (DP-FedAvg): the ledger of each round's release and its epsilons.

The unit is a client: two neighbouring federations differ in one client's whole data (zero-out
adjacency: its clipped contribution, of L2 norm at most C, is present or replaced by zero). One
round releases the noised sum of the participating clients' clipped contributions.

File format (``client_level.jsonl``, one JSON object per line, hash-chained like ``ledger.jsonl``:
``hash`` is the SHA-256 of the entry's canonical JSON without ``hash``, ``prev`` the previous
line's hash):

- line 1, the header: ``{"kind": "header", "format": "privlora-client-level/1", "delta", "noise",
  "sampling", "run", "prev": 64 zeros, "hash"}``;
- one line per round whose sum was released: ``{"kind": "release", "seq", "round", "clients",
  "mechanism": {...}, "prev", "hash"}``. ``clients`` are the clients whose contributions entered
  the sum (charged: every one of them). ``mechanism`` is either

  - central Gaussian: ``{"mechanism": "central gaussian", "noise_multiplier", "clip_norm"}``:
    the server added N(0, (noise_multiplier * clip_norm)^2) to every coordinate of the sum;
  - a distributed record of `accounting.distributed_dp` (``DistributedDiscreteGaussian`` or
    ``DistributedSkellam``, `to_dict` form): everything needed to recompute it (C, scale, the
    inflated L2 and L1 sensitivities, the per-client noise, ``min_inputs`` counted, the padded
    dimension, the bits).

Epsilon (what `client_epsilons` implements):

- **against the server** (it knows who took part): every round a client's contribution entered
  a sum is charged in full, with no amplification by client sampling. Central Gaussian: the
  composition of one Gaussian mechanism (sensitivity C, std noise_multiplier * C, i.e. q = 1 and
  one step per round) per round, by dp_accounting's PLD (pessimistic). Distributed: the Renyi
  bounds of `accounting.distributed_dp`, composed over rounds and converted.
- **against whoever sees only the released models**: privlora samples a fixed number of clients
  per round uniformly without replacement, not by Poisson sampling, and dp_accounting amplifies
  only Poisson-sampled Gaussian events; so NO amplification is claimed and this epsilon equals
  the one against the server. (A round in which a client was not sampled costs it nothing under
  either observer: sampling does not depend on the data.) Both are recorded and recomputed, so a
  later amplification claim would show as a difference.

Under central noise the server must be trusted with the un-noised sum (even under secure
aggregation, it sees the sum before adding noise); under distributed noise the server only ever
decodes a noised sum, and the guarantee needs at least ``min_inputs`` honest clients' noise
shares in each sum (the assumed colluders are not counted).

Never imports torch or ``secagg``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed_dp import DistributedRelease, distributed_epsilon, release_from_dict
from .ledger import GENESIS, LedgerError, append_chain_line, entry_hash, write_chain_header
from .mechanism import SubsampledGaussian

FORMAT = "privlora-client-level/1"
CLIENT_LEVEL_FILE = "client_level.jsonl"
CENTRAL = "central gaussian"


@dataclass(frozen=True)
class CentralGaussian:
    """One round's central Gaussian release: std ``noise_multiplier * clip_norm`` on the sum of
    contributions clipped to L2 norm ``clip_norm``."""

    noise_multiplier: float
    clip_norm: float

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"central gaussian: {name} must be a finite number > 0. Found {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": CENTRAL, "noise_multiplier": float(self.noise_multiplier), "clip_norm": float(self.clip_norm)}

    def as_subsampled(self, delta: float) -> SubsampledGaussian:
        """The same release as one step of the Gaussian mechanism at q = 1 (sensitivity 1 after
        dividing by C), for the PLD accountant."""
        return SubsampledGaussian(noise_multiplier=float(self.noise_multiplier), sample_rate=1.0, steps=1,
                                  clip_norm=float(self.clip_norm), delta=float(delta))


Release = CentralGaussian | DistributedRelease


def release_of(d: Any) -> Release:
    """The release of a ledger line's ``mechanism`` field (every field checked)."""
    if not isinstance(d, dict):
        raise LedgerError(f"a client-level mechanism must be a JSON object. Found {d!r}")
    if d.get("mechanism") == CENTRAL:
        if set(d) != {"mechanism", "noise_multiplier", "clip_norm"}:
            raise LedgerError(f"a central gaussian record has exactly mechanism, noise_multiplier, clip_norm. Found {sorted(d)}")
        return CentralGaussian(d["noise_multiplier"], d["clip_norm"])
    try:
        return release_from_dict(d)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"client-level mechanism: {exc}") from exc


@dataclass(frozen=True)
class Entry:
    seq: int
    round: int
    clients: tuple[int, ...]
    release: Release
    prev: str
    hash: str


def check_client_chain(lines: list[str]) -> tuple[dict[str, Any], list[Entry], list[str]]:
    """(header, entries, problems) of a client-level ledger's lines; nothing trusted unchecked."""
    problems: list[str] = []
    if not lines:
        return {}, [], ["the client-level ledger is empty (no header line)"]
    recs = []
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return {}, [], [f"line {i}: not a ledger entry ({exc})"]
        recs.append(rec)
    header = recs[0]
    if header.get("kind") != "header" or header.get("format") != FORMAT:
        problems.append(f"line 1: expected a {FORMAT} header, found kind={header.get('kind')!r} format={header.get('format')!r}")
    prev = GENESIS
    entries: list[Entry] = []
    for i, rec in enumerate(recs, start=1):
        if rec.get("prev") != prev:
            problems.append(f"line {i}: prev does not match the previous line's hash (a line was edited, dropped or reordered)")
        if rec.get("hash") != entry_hash(rec):
            problems.append(f"line {i}: hash does not match its content (the line was edited)")
        prev = str(rec.get("hash"))
        if i == 1:
            continue
        try:
            if rec.get("kind") != "release" or rec.get("seq") != i - 2:
                raise LedgerError(f"expected release number {i - 2}, found kind={rec.get('kind')!r} seq={rec.get('seq')!r}")
            clients = tuple(int(c) for c in rec["clients"])
            entries.append(Entry(i - 2, int(rec["round"]), clients, release_of(rec["mechanism"]), rec["prev"], rec["hash"]))
        except (LedgerError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"line {i}: {exc}")
    return header, entries, problems


class ClientLevelLedger:
    """An open client-level ledger (create, or open to resume); `append` is on disk when it returns."""

    def __init__(self, path: Path, header: dict[str, Any], entries: list[Entry]):
        self.path, self.header, self.entries = path, header, entries
        self.head = entries[-1].hash if entries else header["hash"]

    @classmethod
    def create(cls, path: str | Path, delta: float, noise: str, sampling: str, run: dict[str, Any] | None = None) -> ClientLevelLedger:
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path} already exists; a ledger is never overwritten")
        header = {"kind": "header", "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "delta": float(delta), "noise": str(noise), "sampling": str(sampling), "run": run or {}, "prev": GENESIS}
        header["hash"] = entry_hash(header)
        write_chain_header(path, header)
        return cls(path, header, [])

    @classmethod
    def open(cls, path: str | Path) -> ClientLevelLedger:
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"{path}: no client-level ledger here")
        header, entries, problems = check_client_chain(path.read_text(encoding="utf-8").splitlines())
        if problems:
            raise LedgerError(f"{path}: the client-level ledger does not verify: " + "; ".join(problems[:5]))
        return cls(path, header, entries)

    @property
    def delta(self) -> float:
        return float(self.header["delta"])

    def __len__(self) -> int:
        return len(self.entries)

    def entry_for(self, rnd: int) -> Entry | None:
        return next((e for e in self.entries if e.round == rnd), None)

    def append(self, rnd: int, clients: list[int], release: Release) -> Entry:
        """Record round ``rnd``'s release of the sum of ``clients``' contributions: call it before
        the release (for central noise, before the noised sum leaves the server's hands; for
        distributed noise, before any client's noised input is sent)."""
        if self.entry_for(rnd) is not None:
            raise LedgerError(f"round {rnd} is already recorded in the client-level ledger")
        entry: dict[str, Any] = {"kind": "release", "seq": len(self.entries), "round": int(rnd),
                                 "clients": sorted(int(c) for c in clients), "mechanism": release.to_dict(), "prev": self.head}
        entry["hash"] = entry_hash(entry)
        append_chain_line(self.path, entry)
        e = Entry(entry["seq"], int(rnd), tuple(entry["clients"]), release, entry["prev"], entry["hash"])
        self.entries.append(e)
        self.head = e.hash
        return e


def client_epsilons(entries: list[Entry], delta: float) -> dict[str, dict[int, float]]:
    """{"server": {client: epsilon}, "model_only": {client: epsilon}} at ``delta``: each client's
    releases composed (see the module docstring; no sampling amplification for either observer)."""
    from .accountants import get_accountant

    by_client: dict[int, list[Release]] = {}
    for e in entries:
        for c in e.clients:
            by_client.setdefault(c, []).append(e.release)
    server: dict[int, float] = {}
    pld = get_accountant("pld")
    seen: dict[tuple, float] = {}  # clients with the same history (common: same rounds' releases) computed once
    for c, releases in sorted(by_client.items()):
        key = tuple(releases)
        if key in seen:
            server[c] = seen[key]
            continue
        central = [r for r in releases if isinstance(r, CentralGaussian)]
        distributed = [r for r in releases if isinstance(r, DistributedRelease)]
        if central and distributed:
            raise LedgerError(f"client {c}: central and distributed releases in one ledger; one run uses one noise")
        if central:
            server[c] = central_history_epsilon(central, delta, pld)
        else:
            server[c] = float(distributed_epsilon(distributed, delta))
        seen[key] = server[c]
    return {"server": server, "model_only": dict(server)}


PLD_CEILING = 100.0
"""Above this epsilon (by the RDP bound) the PLD's grid would not fit in memory (a noise multiplier
of 1e-4 asks for 10^11 points): the RDP bound, itself an upper bound, is reported instead."""


def central_history_epsilon(releases: list[CentralGaussian], delta: float, pld=None) -> float:
    """Epsilon of composing central Gaussian releases: dp_accounting's PLD (pessimistic), or, when
    the RDP bound is already above `PLD_CEILING`, that RDP bound (both are upper bounds)."""
    from .accountants import get_accountant, history_key
    from .rdp import epsilon_from_rdp, rdp_vector

    history = [r.as_subsampled(delta) for r in releases]
    if not history:
        return 0.0
    rough = float(epsilon_from_rdp(rdp_vector(history_key(history)), delta))
    if rough > PLD_CEILING:
        return rough
    return float((pld or get_accountant("pld")).epsilon(history, delta))


def central_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon against the server of ``rounds`` central Gaussian releases (PLD)."""
    from .accountants import get_accountant

    if rounds == 0:
        return 0.0
    return float(get_accountant("pld").epsilon([SubsampledGaussian(float(noise_multiplier), 1.0, int(rounds), 1.0, float(delta))], delta))


__all__ = ["CENTRAL", "CLIENT_LEVEL_FILE", "CentralGaussian", "ClientLevelLedger", "Entry", "check_client_chain",
           "central_epsilon", "client_epsilons", "release_of"]
