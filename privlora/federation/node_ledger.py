"""A node's lifetime privacy ledger: every release its data ever made, across every run.

A client's budget belongs to its data, not to one run: a new config (another name, another
number of rounds), a new run folder or a server that starts over never gives the same records a
fresh budget. The node (its folder, ``NODE-DIR``) keeps:

- ``node.json``: the node's identity, ``{"format": "privlora-node/1", "node_id": 32 hex, "created"}``,
  made once (atomically) the first time the node runs;
- ``lifetime/DATA.jsonl``: one hash-chained ledger per data set the node trained on, ``DATA`` the
  set's fingerprint (`data_fingerprint`: SHA-256 over its records, in any order). Line 1 is a
  header ``{"kind": "header", "format": "privlora-node-ledger/1", "node_id", "data_sha256",
  "created", "reset", "prev", "hash"}``; every other line one charge ``{"kind": "charge", "seq",
  "run": {"name", "config_sha256", "seed", "accountant"}, "client", "round", <mechanism fields>,
  "time", "prev", "hash"}``; ``hash``/``prev`` as in `accounting.ledger`. Appended and fsynced
  before a release is trained;
- ``lifetime/DATA.head`` and ``lifetime-heads.json``: two mirrors of each ledger's head
  (``{"count": charges, "head": last hash}``), each replaced atomically (fsynced file, rename,
  fsynced folder) after every charge;
- one folder per run (``NAME-CONFIGHASH``, `privlora.federation.node.ledger_folder`) with the run's own
  ledger (``ledger.jsonl``, the `accounting.ledger` format `privlora verify --client-ledger` reads)
  and the updates it released (``released/``);
- ``resets.jsonl``: every reset its operator made (time, reason, what was found).

Integrity (`NodeLedger.problems`): the chains verify; each lifetime ledger extends both head
mirrors (cutting lines off its end, or deleting it, is seen from either); its header names this
node; every charge of every run's ledger and every released update is in a lifetime ledger; and a
run's own ledger holds every lifetime charge of that run. Any problem and the node refuses to
train (a refusal the server records) until its operator runs ``privlora node reset-ledger
--node-dir D --reason TEXT``: the old files are kept beside the new ones, the new ledger carries
every charge still known (the verified part of the old one and every run's own ledger), and the
reset is recorded in the new ledger's header and in ``resets.jsonl``. ``privlora node status
--node-dir D`` shows identity, fingerprints, lifetime and per-run spend, and integrity.

What this cannot see: a whole node folder deleted (a new identity starts with nothing), or records
that reach the node again as part of a different data set (another fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accounting import Ledger, LedgerError, SubsampledGaussian
from accounting.ledger import GENESIS, MECHANISM_FIELDS, canonical, entry_hash
from privlora.core.errors import UserError
from privlora.federation.messages import Message, MessageError

FORMAT = "privlora-node-ledger/1"
IDENTITY_FORMAT = "privlora-node/1"
IDENTITY_FILE = "node.json"
HEADS_FILE = "lifetime-heads.json"
RESETS_FILE = "resets.jsonl"
LIFETIME = "lifetime"


class NodeLedgerError(UserError):
    """A node's lifetime ledger cannot be used as it is (or a reset was asked for without cause)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def data_fingerprint(data) -> str:
    """SHA-256 (hex) over a node's training records (`LabelledData`), independent of their order:
    the sorted hashes of each (text, label name, response) record, hashed together."""
    names = list(data.label_names)
    responses = data.responses if getattr(data, "responses", None) is not None else [None] * len(data.texts)
    rows = sorted(hashlib.sha256(canonical({"text": t, "label": names[int(y)], "response": r})).hexdigest()
                  for t, y, r in zip(data.texts, data.labels, responses))
    return hashlib.sha256(("privlora-data/1\n" + "\n".join(rows)).encode()).hexdigest()


def _make_dir(folder: Path) -> None:
    """``folder`` and its missing parents, each new entry fsynced into its parent."""
    from privlora.core.checkpoint import fsync_dir

    if folder.is_dir():
        return
    _make_dir(folder.parent)
    folder.mkdir(exist_ok=True)
    fsync_dir(folder.parent)


def _link_new(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` atomically (complete, fsynced, then linked in); False if it exists."""
    from privlora.core.checkpoint import fsync_dir

    _make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            created = True
        except FileExistsError:
            created = False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return created


def node_identity(node_dir: str | Path) -> str:
    """This node's id (``node.json``), made once, atomically, the first time it is asked for."""
    path = Path(node_dir) / IDENTITY_FILE
    if not path.is_file():
        doc = {"format": IDENTITY_FORMAT, "node_id": os.urandom(16).hex(), "created": _now()}
        _link_new(path, (json.dumps(doc, indent=1) + "\n").encode())
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        node_id = str(doc["node_id"])
        if doc.get("format") != IDENTITY_FORMAT or len(node_id) != 32:
            raise ValueError("not a privlora node identity")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NodeLedgerError(f"{path} is damaged ({exc}); a node's identity is never edited: restore it from a backup") from None
    return node_id


def _fsync_append(path: Path, line: str) -> None:
    from privlora.core.checkpoint import fsync_dir

    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)


class _Chain:
    """One lifetime ledger read from disk: its entries, the verified prefix, its problems."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.problems: list[str] = []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            self.problems.append(f"{path} is unreadable ({exc})")
            return
        prev = GENESIS
        for i, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self.problems.append(f"{path} line {i}: not a ledger entry ({exc})")
                return
            if rec.get("prev") != prev or rec.get("hash") != entry_hash(rec):
                self.problems.append(f"{path} line {i}: the hash chain breaks (an entry was edited, removed or inserted)")
                return
            if i == 1 and (rec.get("kind") != "header" or rec.get("format") != FORMAT):
                self.problems.append(f"{path} line 1: not a {FORMAT} header")
                return
            if i > 1:
                try:
                    if rec.get("kind") != "charge" or int(rec["seq"]) != i - 2:
                        raise ValueError("not the next charge")
                    SubsampledGaussian.from_dict({k: rec[k] for k in MECHANISM_FIELDS})
                except (KeyError, TypeError, ValueError) as exc:
                    self.problems.append(f"{path} line {i}: malformed charge ({exc})")
                    return
            prev = rec["hash"]
            self.records.append(rec)

    @property
    def header(self) -> dict[str, Any]:
        return self.records[0] if self.records else {}

    @property
    def charges(self) -> list[dict[str, Any]]:
        return self.records[1:]

    def hash_at(self, count: int) -> str | None:
        """The head hash after ``count`` charges (None if the chain is shorter)."""
        return self.records[count]["hash"] if 0 <= count < len(self.records) else None


def _mechanism(rec: dict[str, Any]) -> SubsampledGaussian:
    return SubsampledGaussian.from_dict({k: rec[k] for k in MECHANISM_FIELDS})


def _charge_key(rec: dict[str, Any]) -> tuple[str, int, int]:
    return (str(rec["run"].get("config_sha256")), int(rec["client"]), int(rec["round"]))


RUN_FIELDS = ("name", "config_sha256", "seed", "accountant", "folder")


def _folder_of(rec: dict[str, Any]) -> str:
    """The run folder (in the node folder) of a lifetime charge."""
    run = rec["run"]
    return str(run.get("folder") or f"{run.get('name')}-{str(run.get('config_sha256'))[:12]}")


def _round_of(released: Path) -> int:
    return int(released.stem.split("-")[1])


class NodeLedger:
    """The lifetime ledgers of the node whose folder is ``node_dir``.

    ``fingerprint`` is this node's data set (`data_fingerprint`), or a zero-argument callable
    that computes it when first needed (the node then loads its data only to train or describe),
    or None (status and reset, which need no data)."""

    def __init__(self, node_dir: str | Path, fingerprint: str | Callable[[], str] | None = None):
        self.node_dir = Path(node_dir)
        self._fingerprint = fingerprint

    # ------------------------------------------------------------------ places
    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):
            self._fingerprint = str(self._fingerprint())
        if not self._fingerprint:
            raise ValueError("this NodeLedger was opened without a data fingerprint")
        return self._fingerprint

    def path(self, fp: str) -> Path:
        return self.node_dir / LIFETIME / f"{fp}.jsonl"

    def head_path(self, fp: str) -> Path:
        return self.node_dir / LIFETIME / f"{fp}.head"

    @property
    def node_id(self) -> str:
        return node_identity(self.node_dir)

    def _heads(self) -> dict[str, Any]:
        p = self.node_dir / HEADS_FILE
        if not p.is_file():
            return {}
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {"?": "not an object"}
        except (OSError, ValueError):
            return {"?": "unreadable"}

    def _head_file(self, fp: str) -> dict[str, Any] | None:
        p = self.head_path(fp)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {"count": None, "head": "unreadable"}

    def known_fingerprints(self) -> list[str]:
        """Every data set this node has a lifetime record of (a ledger or a head mirror)."""
        found = {k for k in self._heads() if k != "?"}
        folder = self.node_dir / LIFETIME
        if folder.is_dir():
            found |= {p.name.split(".")[0] for p in folder.iterdir() if p.suffix in (".jsonl", ".head")}
        if isinstance(self._fingerprint, str) and self._fingerprint:
            found.add(self._fingerprint)
        return sorted(found)

    @staticmethod
    def _released(folder: Path) -> list[Path]:
        return sorted((folder / "released").glob("round-*.bin")) if (folder / "released").is_dir() else []

    def run_folders(self) -> list[Path]:
        """This node's per-run folders (each with its own ``ledger.jsonl``)."""
        if not self.node_dir.is_dir():
            return []
        return sorted(p for p in self.node_dir.iterdir() if p.is_dir() and p.name != LIFETIME and
                      ((p / "ledger.jsonl").is_file() or (p / "released").is_dir()))

    # ------------------------------------------------------------------ integrity
    def problems(self) -> list[str]:
        """Everything that says a lifetime record was lost or altered (empty: intact)."""
        out: list[str] = []
        node_id = self.node_id
        heads = self._heads()
        if "?" in heads:
            out.append(f"{self.node_dir / HEADS_FILE} is {heads['?']}")
        lifetime_keys: set[tuple[str, int, int]] = set()
        for fp in self.known_fingerprints():
            path = self.path(fp)
            mirrors = {str(self.head_path(fp)): self._head_file(fp), f"{self.node_dir / HEADS_FILE}[{fp[:12]}…]": heads.get(fp)}
            if not path.is_file():
                if any(m is not None for m in mirrors.values()):
                    out.append(f"{path} is missing but its head mirrors record it (the lifetime ledger of data {fp[:12]}… was deleted)")
                continue
            chain = _Chain(path)
            out += chain.problems
            if chain.header and chain.header.get("node_id") != node_id:
                out.append(f"{path} belongs to node {chain.header.get('node_id')}, not to this node ({node_id}): "
                           f"{self.node_dir / IDENTITY_FILE} was replaced or the ledger copied from another node")
            if chain.header and chain.header.get("data_sha256") != fp:
                out.append(f"{path} records data {str(chain.header.get('data_sha256'))[:12]}…, not {fp[:12]}…")
            for where, m in mirrors.items():
                if m is None:
                    out.append(f"{where}: the head mirror of {path.name} is missing")
                    continue
                count = m.get("count") if isinstance(m, dict) else None
                if not isinstance(count, int) or chain.hash_at(count) != m.get("head"):
                    have = len(chain.charges)
                    out.append(f"{path} does not extend its head mirror {where} ({count} charges, head "
                               f"{str(m.get('head') if isinstance(m, dict) else m)[:12]}…; the ledger has {have}): "
                               "charges were cut off or the ledger was replaced")
            lifetime_keys |= {_charge_key(r) for r in chain.charges}
        lifetime_rounds = {(_folder_of(r), int(r["round"])) for fp in self.known_fingerprints() if self.path(fp).is_file()
                           for r in _Chain(self.path(fp)).charges}
        for folder in self.run_folders():
            led = folder / "ledger.jsonl"
            for f in self._released(folder):
                if (folder.name, _round_of(f)) not in lifetime_rounds:
                    out.append(f"{f}: an update released in round {_round_of(f)} is in no lifetime ledger (a lifetime ledger lost it)")
            if not led.is_file():
                continue
            try:
                run = Ledger.open(led)
            except LedgerError as exc:
                out.append(f"{led}: {exc}")
                continue
            chash = str(run.header.get("run", {}).get("config_sha256"))
            for c in run.charges:
                if (chash, c.client, c.round) not in lifetime_keys:
                    out.append(f"{led}: the charge of client {c.client} in round {c.round} is in no lifetime ledger "
                               "(a lifetime ledger lost it)")
        return out

    # ------------------------------------------------------------------ one data set
    def _open(self, fp: str) -> _Chain:
        """This data set's chain, created (with both mirrors) if the node never had one."""
        path = self.path(fp)
        if not path.is_file():
            header = {"kind": "header", "format": FORMAT, "node_id": self.node_id, "data_sha256": fp, "created": _now(),
                      "reset": None, "prev": GENESIS}
            header["hash"] = entry_hash(header)
            if _link_new(path, (canonical(header).decode() + "\n").encode()):
                self._write_heads(fp, 0, header["hash"])
        return _Chain(path)

    def _write_heads(self, fp: str, count: int, head: str) -> None:
        from privlora.core.checkpoint import atomic_write

        mirror = {"count": count, "head": head}
        atomic_write(self.head_path(fp), json.dumps(mirror) + "\n")
        heads = {k: v for k, v in self._heads().items() if k != "?"}
        heads[fp] = mirror
        atomic_write(self.node_dir / HEADS_FILE, json.dumps(heads, indent=1, sort_keys=True) + "\n")

    def history(self) -> list[SubsampledGaussian]:
        """Every release this node's data made (this data set's lifetime ledger)."""
        return [_mechanism(r) for r in self._open(self.fingerprint).charges]

    def charged(self, run: dict, client: int, rnd: int) -> dict[str, Any] | None:
        key = (str(run.get("config_sha256")), int(client), int(rnd))
        return next((r for r in self._open(self.fingerprint).charges if _charge_key(r) == key), None)

    def charges_of(self, run: dict) -> list[dict[str, Any]]:
        chash = str(run.get("config_sha256"))
        return [r for r in self._open(self.fingerprint).charges if str(r["run"].get("config_sha256")) == chash]

    def append(self, run: dict, client: int, rnd: int, mechanism: SubsampledGaussian) -> None:
        """Charge one release: on disk (fsynced) with both head mirrors when this returns."""
        fp = self.fingerprint
        chain = self._open(fp)
        if chain.problems:
            raise NodeLedgerError(f"{chain.path}: " + "; ".join(chain.problems))
        entry: dict[str, Any] = {
            "kind": "charge", "seq": len(chain.charges),
            "run": {k: run.get(k) for k in RUN_FIELDS},
            "client": int(client), "round": int(rnd), **mechanism.to_dict(), "time": _now(), "prev": chain.records[-1]["hash"],
        }
        entry["hash"] = entry_hash(entry)
        _fsync_append(chain.path, canonical(entry).decode())
        self._write_heads(fp, entry["seq"] + 1, entry["hash"])

    # ------------------------------------------------------------------ operator
    def reset(self, reason: str) -> dict[str, Any]:
        """Start new lifetime ledgers after a loss: the old files are kept (renamed), each new ledger
        carries every charge still known, and the reset is recorded. Refused when nothing is wrong."""
        reason = (reason or "").strip()
        if not reason:
            raise NodeLedgerError("--reason: say why the ledger is reset (it is recorded with the reset)")
        problems = self.problems()
        if not problems:
            raise NodeLedgerError(f"{self.node_dir}: the node's ledgers are intact; there is nothing to reset")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        # every charge still known, by data set: the verified part of each lifetime ledger ...
        known: dict[str, list[dict[str, Any]]] = {}
        for fp in self.known_fingerprints():
            if self.path(fp).is_file():
                known[fp] = list(_Chain(self.path(fp)).charges)
            else:
                known.setdefault(fp, [])
        # ... and every run's own ledger (a charge found in no lifetime ledger is added to every
        # data set's: its data set is unknown, so it is counted wherever it might belong)
        have = {_charge_key(r) for rs in known.values() for r in rs}
        orphans = []
        rounds = {(_folder_of(r), int(r["round"])) for rs in known.values() for r in rs}
        for folder in self.run_folders():
            info: dict[str, Any] = {"folder": folder.name}
            try:
                run = Ledger.open(folder / "ledger.jsonl")
                info.update(run.header.get("run", {}), accountant=run.header.get("accountant"), folder=folder.name)
                charges = [(c.client, c.round, c.mechanism) for c in run.charges]
            except (LedgerError, OSError):
                charges = []
                try:  # which run it was, from its header line, even if its chain no longer verifies
                    head = json.loads((folder / "ledger.jsonl").read_text(encoding="utf-8").splitlines()[0])
                    info.update(head.get("run", {}), accountant=head.get("accountant"), folder=folder.name)
                except (OSError, ValueError, IndexError, AttributeError):
                    pass
            # an update this node released was charged, whatever its ledgers say now: its own header
            # names the release it made
            for f in self._released(folder):
                try:
                    h = Message.from_bytes(f.read_bytes(), "client_update").header
                    charges.append((int(h["client_id"]), _round_of(f), SubsampledGaussian.from_dict(h["mechanism"])))
                except (MessageError, KeyError, TypeError, ValueError):
                    continue
            for client, rnd, mech in charges:
                key = (str(info.get("config_sha256")), client, rnd)
                if key not in have and (folder.name, rnd) not in rounds:
                    have.add(key)
                    rounds.add((folder.name, rnd))
                    orphans.append({"run": {k: info.get(k) for k in RUN_FIELDS}, "client": client, "round": rnd, **mech.to_dict()})
        record = {"time": _now(), "reason": reason, "problems": problems, "kept": [], "carried": {}}
        # a run's own ledger that no longer verifies is kept aside too (its charges that still read
        # were carried above from the releases; the node rebuilds it from the lifetime ledger)
        for folder in self.run_folders():
            led = folder / "ledger.jsonl"
            if led.is_file():
                try:
                    Ledger.open(led)
                except (LedgerError, OSError):
                    dest = led.with_name(f"{led.name}.reset-{stamp}")
                    os.replace(led, dest)
                    from privlora.core.checkpoint import fsync_dir

                    fsync_dir(folder)
                    record["kept"].append(f"{folder.name}/{dest.name}")
        for fp, charges in known.items():
            kept = []
            for p in (self.path(fp), self.head_path(fp)):
                if p.exists():
                    dest = p.with_name(f"{p.name}.reset-{stamp}")
                    os.replace(p, dest)
                    kept.append(dest.name)
            if kept:
                from privlora.core.checkpoint import fsync_dir

                fsync_dir(self.node_dir / LIFETIME)  # the old files are kept under their new names
            record["kept"] += kept
            carried = [{k: v for k, v in r.items() if k not in ("seq", "prev", "hash", "kind", "time")} for r in charges] + orphans
            record["carried"][fp] = len(carried)
            header = {"kind": "header", "format": FORMAT, "node_id": self.node_id, "data_sha256": fp, "created": _now(),
                      "reset": {"time": record["time"], "reason": reason, "kept": kept, "problems": problems[:20]},
                      "prev": GENESIS}
            header["hash"] = entry_hash(header)
            lines, prev = [canonical(header).decode()], header["hash"]
            for seq, c in enumerate(carried):
                entry = {"kind": "charge", "seq": seq, **c, "time": _now(), "carried": True, "prev": prev}
                entry["hash"] = prev = entry_hash(entry)
                lines.append(canonical(entry).decode())
            if not _link_new(self.path(fp), ("\n".join(lines) + "\n").encode()):
                raise NodeLedgerError(f"{self.path(fp)} appeared during the reset; run it again")
            self._write_heads(fp, len(carried), prev)
        _fsync_append(self.node_dir / RESETS_FILE, json.dumps(record, sort_keys=True))
        return record

    def status(self) -> dict[str, Any]:
        """Identity, data sets, lifetime and per-run spend, integrity (for `privlora node status`)."""
        from privlora.core.accountants import get_accountant

        def eps(mechs: list[SubsampledGaussian], accountant: str | None, delta: float | None) -> float | None:
            if not mechs or not accountant or not delta:
                return 0.0 if not mechs else None
            return float(get_accountant(accountant).epsilon(mechs, delta))

        out: dict[str, Any] = {"node_dir": str(self.node_dir), "node_id": self.node_id, "data": {}, "runs": {}}
        for fp in self.known_fingerprints():
            chain = _Chain(self.path(fp)) if self.path(fp).is_file() else None
            charges = chain.charges if chain else []
            last = charges[-1] if charges else {}
            mechs = [_mechanism(r) for r in charges]
            out["data"][fp] = {"charges": len(charges), "accountant": last.get("run", {}).get("accountant"),
                               "delta": last.get("delta"),
                               "lifetime_epsilon": eps(mechs, last.get("run", {}).get("accountant"), last.get("delta")),
                               "reset": None if chain is None else chain.header.get("reset")}
        for folder in self.run_folders():
            try:
                run = Ledger.open(folder / "ledger.jsonl")
            except (LedgerError, OSError) as exc:
                out["runs"][folder.name] = {"error": str(exc)}
                continue
            out["runs"][folder.name] = {
                "charges": len(run.charges), "rounds": sorted({c.round for c in run.charges}),
                "epsilon": {str(k): eps(v, run.header.get("accountant"), run.delta) for k, v in run.histories().items()},
            }
        out["problems"] = self.problems()
        out["intact"] = not out["problems"]
        return out


__all__ = ["NodeLedger", "NodeLedgerError", "data_fingerprint", "node_identity"]
