"""The privacy ledger: an append-only, hash-chained record of every DP release.

File format (``ledger.jsonl``, UTF-8, one JSON object per line):

- line 1, the header: ``{"kind": "header", "format": "privlora-ledger/1", "created", "delta",
  "accountant", "budgets": {client: epsilon}, "run": {...}, "prev": 64 zeros, "hash"}``;
- every other line, one charge: ``{"kind": "charge", "seq", "client", "round", "mechanism",
  "sampling", "sample_rate", "noise_multiplier", "steps", "clip_norm", "delta", "time",
  "dp_event", "prev", "hash"}``: client ``client`` released, in round ``round``, the output of
  ``steps`` steps of the Poisson-subsampled Gaussian mechanism (see `SubsampledGaussian`);
  ``dp_event`` is the same release as a dp_accounting ``DpEvent`` (JSON), so any accountant can
  consume it.

``hash`` is the SHA-256 (hex) of the entry's JSON with ``hash`` removed, keys sorted and no
whitespace (``json.dumps(e, sort_keys=True, separators=(",", ":"))``); ``prev`` is the previous
line's ``hash``. Editing, dropping, reordering or duplicating a line breaks the chain; cutting
lines off the end does not, so the run also records the head hash and entry count elsewhere
(metrics, checkpoint, report.json) and `privlora verify` compares them.

Invariants: an entry is on disk (flushed and fsynced) before `append` returns, and `append` is
called before the release it records; entries are never rewritten. A line torn by a crash in
the middle of a write is set aside (never silently dropped) when the ledger is reopened.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mechanism import SubsampledGaussian

FORMAT = "privlora-ledger/1"
GENESIS = "0" * 64
MECHANISM_FIELDS = ("mechanism", "sampling", "sample_rate", "noise_multiplier", "steps", "clip_norm", "delta")


class LedgerError(ValueError):
    """The ledger file is missing, malformed, or its hash chain does not hold."""


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def dp_event_to_json(event: Any) -> dict[str, Any]:
    """A dp_accounting DpEvent as plain JSON: ``{"type": class name, field: value, ...}``."""
    import attr

    out: dict[str, Any] = {"type": type(event).__name__}
    for f in attr.fields(type(event)):
        v = getattr(event, f.name)
        out[f.name] = dp_event_to_json(v) if attr.has(type(v)) else v
    return out


def dp_event_from_json(d: dict[str, Any]) -> Any:
    """Inverse of `dp_event_to_json` for dp_accounting's own event classes."""
    from dp_accounting import dp_event

    cls = getattr(dp_event, str(d.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
        raise LedgerError(f"dp_event type {d.get('type')!r} is not a dp_accounting DpEvent")
    kwargs = {k: dp_event_from_json(v) if isinstance(v, dict) else v for k, v in d.items() if k != "type"}
    return cls(**kwargs)


@dataclass(frozen=True)
class Charge:
    """One ledger line after the header."""

    seq: int
    client: int
    round: int
    mechanism: SubsampledGaussian
    time: str
    prev: str
    hash: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_chain(lines: list[str]) -> tuple[dict[str, Any], list[Charge], list[str]]:
    """Parse ledger lines; return (header, charges, problems). Nothing is trusted unchecked."""
    problems: list[str] = []
    if not lines:
        return {}, [], ["the ledger is empty (no header line)"]
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            problems.append(f"line {i}: not a ledger entry ({exc})")
            return {}, [], problems
        records.append(rec)
    header = records[0]
    if header.get("kind") != "header" or header.get("format") != FORMAT:
        problems.append(f"line 1: expected a {FORMAT} header, found kind={header.get('kind')!r} format={header.get('format')!r}")
    prev = GENESIS
    charges: list[Charge] = []
    seen: set[tuple[int, int]] = set()
    last_round = -1
    for i, rec in enumerate(records, start=1):
        if rec.get("prev") != prev:
            problems.append(f"line {i}: 'prev' does not match the hash of line {i - 1} (an entry was edited, removed, reordered or inserted)")
        if rec.get("hash") != entry_hash(rec):
            problems.append(f"line {i}: 'hash' does not match the entry's contents (the entry was edited)")
        prev = str(rec.get("hash"))
        if i == 1:
            continue
        if rec.get("kind") != "charge":
            problems.append(f"line {i}: kind {rec.get('kind')!r} is not 'charge'")
            continue
        try:
            mech = SubsampledGaussian.from_dict({k: rec[k] for k in MECHANISM_FIELDS})
            c = Charge(int(rec["seq"]), int(rec["client"]), int(rec["round"]), mech, str(rec["time"]), rec["prev"], rec["hash"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"line {i}: malformed charge ({exc})")
            continue
        if c.seq != len(charges):
            problems.append(f"line {i}: seq {c.seq}, expected {len(charges)} (entries missing, duplicated or reordered)")
        if (c.client, c.round) in seen:
            problems.append(f"line {i}: client {c.client} is charged twice for round {c.round}")
        seen.add((c.client, c.round))
        if c.round < last_round:
            problems.append(f"line {i}: round {c.round} comes after round {last_round} (entries reordered)")
        last_round = max(last_round, c.round)
        if "delta" in header and mech.delta != header["delta"]:
            problems.append(f"line {i}: delta {mech.delta} differs from the ledger's delta {header['delta']}")
        try:
            if dp_event_from_json(rec["dp_event"]) != mech.to_dp_event():
                problems.append(f"line {i}: dp_event does not describe the same release as the entry's fields")
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"line {i}: dp_event is unreadable ({exc})")
        charges.append(c)
    return header, charges, problems


def write_chain_header(path: Path, header: dict[str, Any]) -> None:
    """Create a hash-chained file holding only ``header`` (never overwriting one), the file and
    its folder fsynced: the one way every ledger of this package starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as fh:
        fh.write(canonical(header).decode() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(path.parent)


def append_chain_line(path: Path, entry: dict[str, Any]) -> None:
    """Append one chained entry; on disk (fsynced) when this returns."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(canonical(entry).decode() + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class Ledger:
    """An open ledger file. Create with `Ledger.create`, reopen (e.g. to resume) with `Ledger.open`."""

    def __init__(self, path: Path, header: dict[str, Any], charges: list[Charge]):
        self.path = path
        self.header = header
        self.charges = charges
        self.head = charges[-1].hash if charges else header["hash"]
        self._index = {(c.client, c.round): c for c in charges}

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | Path, delta: float, accountant: str, budgets: dict[int, float], run: dict[str, Any] | None = None) -> "Ledger":
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path} already exists; a ledger is never overwritten (open it to resume instead)")
        header = {
            "kind": "header",
            "format": FORMAT,
            "created": _now(),
            "delta": float(delta),
            "accountant": accountant,
            "budgets": {str(k): float(v) for k, v in sorted(budgets.items())},
            "run": run or {},
            "prev": GENESIS,
        }
        header["hash"] = entry_hash(header)
        write_chain_header(path, header)
        return cls(path, header, [])

    @classmethod
    def open(cls, path: str | Path) -> "Ledger":
        """Read and check a ledger; a torn last line (a crash mid-write) is moved aside first."""
        path = Path(path)
        if not path.is_file():
            raise LedgerError(f"{path}: no ledger here")
        raw = path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            torn = path.with_name(f"{path.name}.torn-{int(time.time())}")
            torn.write_bytes(raw[cut:])
            with open(path, "r+b") as fh:
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
            raw = raw[:cut]
        lines = raw.decode("utf-8").splitlines()
        header, charges, problems = check_chain(lines)
        if problems:
            raise LedgerError(f"{path}: the ledger does not verify: " + "; ".join(problems[:5]))
        return cls(path, header, charges)

    # ------------------------------------------------------------------ reading
    @property
    def delta(self) -> float:
        return float(self.header["delta"])

    @property
    def budgets(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.header.get("budgets", {}).items()}

    def __len__(self) -> int:
        return len(self.charges)

    def history(self, client: int) -> list[SubsampledGaussian]:
        return [c.mechanism for c in self.charges if c.client == client]

    def histories(self) -> dict[int, list[SubsampledGaussian]]:
        out: dict[int, list[SubsampledGaussian]] = {}
        for c in self.charges:
            out.setdefault(c.client, []).append(c.mechanism)
        return out

    def charge_for(self, client: int, rnd: int) -> Charge | None:
        return self._index.get((client, rnd))

    # ------------------------------------------------------------------ writing
    def append(self, client: int, rnd: int, mechanism: SubsampledGaussian) -> Charge:
        """Record a release; on disk (fsynced) when this returns. Call it *before* releasing."""
        if mechanism.delta != self.delta:
            raise LedgerError(f"charge for client {client}: delta {mechanism.delta} differs from the ledger's {self.delta}")
        if self.charge_for(client, rnd) is not None:
            raise LedgerError(f"client {client} is already charged for round {rnd}; a round is charged once")
        if self.charges and rnd < self.charges[-1].round:
            raise LedgerError(f"round {rnd} comes after round {self.charges[-1].round}; the ledger only moves forward")
        entry: dict[str, Any] = {
            "kind": "charge",
            "seq": len(self.charges),
            "client": int(client),
            "round": int(rnd),
            **mechanism.to_dict(),
            "time": _now(),
            "dp_event": dp_event_to_json(mechanism.to_dp_event()),
            "prev": self.head,
        }
        entry["hash"] = entry_hash(entry)
        append_chain_line(self.path, entry)
        charge = Charge(entry["seq"], client, rnd, mechanism, entry["time"], entry["prev"], entry["hash"])
        self.charges.append(charge)
        self._index[(client, rnd)] = charge
        self.head = charge.hash
        return charge


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
