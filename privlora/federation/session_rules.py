"""The rules a client node applies to every secure sum, decided from its own config alone.

A malicious server follows privlora's message flow but not its intentions. What it could ask of
a node, and what the node does instead (SECURITY.md, issue 29):

- **Size a sum around a victim** (invite the victim and one colluder: threshold 2, and the
  colluder subtracts its own input). The node never sizes a session from the server's invitation:
  `session_plan` resolves the plan from the config (`privlora.core.config.secure_sum_size`): at
  most ``federation.clients_per_round`` clients, the node's own threshold t, and never fewer than
  max(3, t) live inputs in the key list or the survivor list (``min_clients`` of the `secagg`
  plan, which every client checks and which is bound into the session's config digest, so a
  server using another plan is refused at the key list). `check_invitation` refuses an
  invitation that is shorter than that minimum, longer than the config allows, or does not name
  the node, before any key is advertised.
- **End an honest sum with two clients** (3 per round, one dropout during masked input): the
  survivor list then names 2 < 3 clients, and every node refuses to sign it or to unmask
  (`secagg` raises TooFewClients); the server's own copy of the plan aborts first.
- **Put one release into two sums** (run {0,1,2,3}, then {1,2,3}, and subtract): a node's
  contribution for a round enters at most one session. `SessionRecord` writes the session's nonce
  to disk (atomically, file and folder fsynced) before the node's masked input leaves; a later
  session for that round is refused (`SessionRefused`, which the server counts as a dropout), and
  a later instruction for that round gets a refusal (``code = ENTERED_SECURE_SUM``). The round
  engine then runs the round with the clients whose release never entered a sum, or, if too few
  are left, skips it (its charges stay spent, the model is unchanged): a resumed round never
  re-sends a release into a second sum.

Where the record lives: a node's folder when it has one (a deployed node: the folder of its
ledger; in the in-process simulation a folder per client under the run, ``nodes/client-K``, so
that a resumed simulation behaves as a deployment would); without one, in memory, carried by
`ClientNode.export_state` between messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from privlora.core.config import ExperimentConfig, SecureSumSize, secure_sum_size
from privlora.federation.messages import MessageError

ENTERED_SECURE_SUM = "entered_secure_sum"
"""The ``code`` of a node's refusal of a round whose release already entered a secure sum."""


class SessionRefused(MessageError):
    """A node refuses a secure-aggregation request that its own rules forbid (an invitation of
    the wrong size, a second session for a round). The transport counts the node as a dropout."""


def session_size(cfg: ExperimentConfig) -> SecureSumSize:
    """Size, threshold and least live inputs of this config's secure sums (`secure_sum_size`)."""
    return secure_sum_size(cfg)


def check_invitation(cfg: ExperimentConfig, client_id: int, rnd: int, invited) -> list[int]:
    """The invited client ids, or `SessionRefused` if this node's own rules forbid the session."""
    z = session_size(cfg)
    try:
        ids = [int(c) for c in invited]
    except (TypeError, ValueError):
        raise SessionRefused(f"client {client_id}: round {rnd}: the invitation's client list is not a list of ids") from None
    where = f"client {client_id}: round {rnd}: refusing a secure sum"
    if len(set(ids)) != len(ids):
        raise SessionRefused(f"{where} whose invitation names a client twice")
    if client_id not in ids:
        raise SessionRefused(f"{where} whose invitation does not name this client")
    if len(ids) < z.least:
        raise SessionRefused(
            f"{where} of {len(ids)} clients: this node's config needs at least {z.least} live inputs "
            f"(max(3, threshold t = {z.threshold})); a smaller sum would expose its input to too few others")
    if len(ids) > z.size:
        raise SessionRefused(f"{where} of {len(ids)} clients: this node's config allows at most "
                             f"federation.clients_per_round = {z.size}")
    return sorted(ids)


class SessionRecord:
    """Which secure-aggregation session (its nonce, hex) each round's release entered.

    ``folder`` None keeps the record in memory (`state`/`load` carry it between messages);
    otherwise ``folder/secure-sums-<run>.json``, rewritten atomically (temporary file, fsync,
    rename, fsync of the folder) before the release leaves. ``run`` names the run (the first 12
    hex digits of the resolved config's sha256): round numbers start again in every run."""

    def __init__(self, folder: str | Path | None, run: str):
        self.path = None if folder is None else Path(folder) / f"secure-sums-{run}.json"
        self._rounds: dict[int, str] = {}
        if self.path is not None and self.path.is_file():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                self._rounds = {int(k): str(v) for k, v in raw["rounds"].items()}
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise MessageError(f"{self.path} is not a secure-sum record ({exc}); this node cannot tell which releases "
                                   "already entered a secure sum. Restore the file; never delete it") from exc

    def entered(self, rnd: int) -> str | None:
        """The nonce of the session round ``rnd``'s release entered, or None."""
        return self._rounds.get(int(rnd))

    def enter(self, rnd: int, nonce: str) -> None:
        """Record that round ``rnd``'s release enters session ``nonce``: on disk before this returns."""
        have = self._rounds.get(int(rnd))
        if have is not None and have != nonce:
            raise SessionRefused(f"round {rnd}: this node's release already entered secure-sum session {have[:12]}…")
        self._rounds[int(rnd)] = nonce
        if self.path is not None:
            durable_write(self.path, json.dumps({"rounds": {str(k): v for k, v in sorted(self._rounds.items())}}, indent=1) + "\n")

    def state(self) -> dict[str, str]:
        return {str(k): v for k, v in self._rounds.items()}

    def load(self, state: dict | None) -> None:
        """Merge a record carried in a node's exported state (in-memory records only)."""
        for k, v in (state or {}).items():
            self._rounds.setdefault(int(k), str(v))


def durable_write(path: Path, text: str) -> None:
    """`core.checkpoint.atomic_write` (temporary file fsynced, renamed, folder fsynced), creating
    the folder first (and fsyncing its parent, so the new folder's name survives a power loss)."""
    from privlora.core.checkpoint import atomic_write, fsync_dir

    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(path.parent.parent)
    atomic_write(path, text)


__all__ = ["ENTERED_SECURE_SUM", "SessionRecord", "SessionRefused", "check_invitation", "durable_write", "session_size"]
