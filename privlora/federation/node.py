"""A client node: one client's side of every message the round engine sends, bytes in, bytes out.

`ClientNode.handle(blob) -> blob` is what every transport delivers to: the in-process simulation
calls it directly, the Flower ClientApp (`privlora.transports.flower.client_app`) calls it on each message.

Messages it answers (`privlora.federation.messages`):

- ``describe`` -> ``client_description``: the release one round of local DP-SGD makes (sigma,
  q, steps, clip, delta), the noise source, and, in the clear only, the number of examples.
- ``round_instruction`` -> ``client_update`` (or ``refusal``): train (`Client.handle`). The node
  first checks the instruction (`privlora.federation.guard`: its own strategy and rank, only the
  fields its strategy uses, every value finite and within ``federation.broadcast_bound``) and,
  under secure aggregation, that this round's release has not already entered a secure sum
  (`privlora.federation.session_rules`). With a `ClientGuard` it then checks the instruction
  against its own ledger and budget, and charges its own ledger (fsynced) before anything
  leaves. An update holding a non-finite value is never released (a refusal says why). Under
  secure aggregation the reply is the update's header only (with the contribution's layout);
  the contribution stays here for the masked sum.
- ``secagg_request`` -> ``secagg_reply``: one stage of `secagg`'s client state machine over the
  contribution kept from this round's training, in a session the node sizes from its own config
  (`session_rules.session_plan`); an invitation or a second session its rules forbid raises
  `session_rules.SessionRefused` (the server sees a dropout).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from accounting import Admission, Ledger, LedgerError, SubsampledGaussian
from privlora.core.errors import ledger_file
from privlora.federation.client import Client
from privlora.federation.messages import Message, MessageError, bytes_tensor, tensor_bytes

ANSWERS = ("describe", "round_instruction", "secagg_request")


class ClientGuard:
    """A client's own privacy ledger and budget: it charges before releasing and refuses what
    would take it past its budget, whatever the server says.

    ``folder`` holds ``ledger.jsonl`` (this run's charges, the `accounting.ledger` format) and
    ``released/`` (the update bytes released for each charged round). A release is idempotent:
    asked again for a round it already charged (the server crashed and resumed), the node sends
    back the very bytes it released before rather than a fresh, differently noised output.

    ``lifetime`` (a deployment's node: `privlora.federation.node_ledger.NodeLedger`) is the node's
    ledger of every release its data ever made, across runs: admission is checked against the
    lifetime spend too, each charge goes there first, and a lifetime record found truncated,
    deleted or altered makes the node refuse to train until its operator resets it
    (``privlora node reset-ledger``).
    """

    def __init__(self, folder: str | Path, client_id: int, budget: float, delta: float, accountant: str, run: dict,
                 lifetime=None):
        from privlora.core.accountants import get_accountant

        self.folder = Path(folder)
        self.client_id = int(client_id)
        self.lifetime = lifetime
        self.run = {**run, "accountant": accountant, "folder": self.folder.name}
        path = self.folder / "ledger.jsonl"
        with ledger_file(path):
            if path.exists():
                self.ledger = Ledger.open(path)
                have = self.ledger.budgets.get(self.client_id)
                if have is not None and abs(have - budget) > 1e-12:
                    raise LedgerError(f"it was opened with budget {have} for client {client_id}, now {budget}; a budget never changes mid-run")
            else:
                from privlora.core.checkpoint import fsync_dir

                header_run = {**run, "party": f"client {client_id}"}
                if lifetime is not None:
                    header_run["node_id"] = lifetime.node_id
                new_folder = not self.folder.is_dir()
                self.ledger = Ledger.create(path, delta, accountant, {self.client_id: budget}, run=header_run)
                if new_folder:
                    fsync_dir(self.folder.parent)
        self.budget = float(budget)
        self.delta, self.accountant = float(delta), accountant
        self.admission = Admission(get_accountant(accountant), delta, {self.client_id: budget})
        self.admission.load({self.client_id: self.ledger.history(self.client_id)})
        released = self.folder / "released"
        if not released.is_dir():
            from privlora.core.checkpoint import fsync_dir

            released.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.folder)

    def _lifetime_refusal(self) -> str | None:
        """None if the lifetime record is intact (this run's ledger then completed from it), else why not."""
        problems = self.lifetime.problems()
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            return (f"client {self.client_id}: this node's lifetime privacy ledger is not intact: {'; '.join(problems[:3])}{more}. "
                    f"It trains no more until its operator checks `privlora node status --node-dir {self.lifetime.node_dir}` and "
                    f"runs `privlora node reset-ledger --node-dir {self.lifetime.node_dir} --reason TEXT`")
        # a crash between the lifetime charge and this run's: complete this run's ledger (never un-spends)
        for rec in self.lifetime.charges_of(self.run):
            cid, rnd = int(rec["client"]), int(rec["round"])
            if cid == self.client_id and self.ledger.charge_for(cid, rnd) is None:
                from privlora.federation.node_ledger import _mechanism

                with ledger_file(self.ledger.path):
                    self.ledger.append(cid, rnd, _mechanism(rec))
                self.admission.record(cid, _mechanism(rec))
        return None

    def _lifetime_admission(self) -> Admission:
        from privlora.core.accountants import get_accountant

        adm = Admission(get_accountant(self.accountant), self.delta, {self.client_id: self.budget})
        adm.load({self.client_id: self.lifetime.history()})
        return adm

    def check(self, rnd: int, asked: SubsampledGaussian | None, own: SubsampledGaussian) -> str | None:
        """None if the node may train round ``rnd``, else the reason it refuses."""
        if asked != own:
            return (f"client {self.client_id}: the server charged {asked} for round {rnd} but this client would release "
                    f"{own}; refusing an instruction whose mechanism differs from its own")
        if self.lifetime is not None:
            reason = self._lifetime_refusal()
            if reason is not None:
                return reason
        charged = self.ledger.charge_for(self.client_id, rnd)
        if charged is not None:
            return None if charged.mechanism == own else f"client {self.client_id}: round {rnd} was charged for another mechanism"
        decision = self.admission.decide(self.client_id, own)
        if not decision.admitted:
            return f"refused by the client's own ledger: {decision.reason}"
        if self.lifetime is not None:
            decision = self._lifetime_admission().decide(self.client_id, own)
            if not decision.admitted:
                return f"refused by the node's lifetime ledger (every run on this data): {decision.reason}"
        return None

    def charge(self, rnd: int, mechanism: SubsampledGaussian) -> None:
        """On disk before this returns (the lifetime ledger first); a round is charged once."""
        if self.lifetime is not None and self.lifetime.charged(self.run, self.client_id, rnd) is None:
            self.lifetime.append(self.run, self.client_id, rnd, mechanism)
        if self.ledger.charge_for(self.client_id, rnd) is None:
            self.ledger.append(self.client_id, rnd, mechanism)
            self.admission.record(self.client_id, mechanism)

    def released(self, rnd: int) -> bytes | None:
        p = self.folder / "released" / f"round-{rnd:05d}.bin"
        return p.read_bytes() if p.is_file() else None

    def keep_release(self, rnd: int, blob: bytes) -> None:
        from privlora.core.checkpoint import atomic_write

        atomic_write(self.folder / "released" / f"round-{rnd:05d}.bin", blob)  # the folder fsynced too

    def spent(self) -> dict:
        """What a run reports from this node: ``{"run": epsilon this run spent, "lifetime": epsilon
        the node's data spent over every run}`` (lifetime None without a lifetime ledger, or while
        it is not intact)."""
        lifetime = None
        if self.lifetime is not None and not self.lifetime.problems():
            lifetime = self._lifetime_admission().spent(self.client_id)
        return {"run": self.admission.spent(self.client_id), "lifetime": lifetime}


@dataclass
class _Pending:
    """This round's contribution, kept for secure aggregation."""

    round: int
    layout: list[tuple[str, tuple[int, ...]]]
    vector: np.ndarray


class ClientNode:
    """One client behind the bytes interface. ``noise`` is "seeded" or "secure" (`privlora.federation.noise`);
    ``signing_key`` is this client's pinned Ed25519 private key (secure aggregation with a key
    registry); ``guard`` its own ledger (deployments).

    ``folder``: where the node records which secure-sum session each round's release entered
    (`session_rules.SessionRecord`; a deployed node's own folder, a folder per client under the
    run in the in-process simulation). None = the guard's folder if there is a guard, else in
    memory (carried by `export_state`).

    ``client`` is a `Client`, or a zero-argument callable that builds one (a Flower node starts a
    new process for every message: the secure-aggregation stages then never load the model);
    give ``cfg`` and ``client_id`` with a callable. `export_state`/`import_state` carry what a
    node must remember between messages (this round's contribution, the secagg session)."""

    def __init__(self, client, guard: ClientGuard | None = None, signing_key=None, noise: str = "seeded",
                 label_names: list[str] | None = None, config_sha256: str | None = None, *, cfg=None, client_id: int | None = None,
                 data_facts=None, folder=None):
        from privlora.federation.noise import NOISE_SOURCES

        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, found {noise!r}")
        if isinstance(client, Client):
            self._client, self._load = client, None
            self.cfg, self.client_id = client.cfg, client.client_id
        else:
            if cfg is None or client_id is None:
                raise ValueError("a ClientNode built from a loader needs cfg and client_id")
            self._client, self._load = None, client
            self.cfg, self.client_id = cfg, int(client_id)
        self.guard = guard
        self.signing_key = signing_key
        self.noise = noise
        self.label_names = label_names
        """This node's label names, checked against the server's (None: not checked)."""
        self.config_sha256 = config_sha256
        """The hash of this node's own resolved config, checked against the server's (None: not checked)."""
        self._pending: _Pending | None = None
        self._session = None  # (round, SecAggClient)
        self._data_facts = data_facts
        """Optional zero-argument callable -> (number of examples, label names), cheaper than
        building the client (no model): what ``describe`` needs."""
        from privlora.core.config import resolved_sha256
        from privlora.federation.session_rules import SessionRecord

        if folder is None and guard is not None:
            folder = getattr(guard, "folder", None)
        self.sums = SessionRecord(folder, resolved_sha256(self.cfg)[:12])
        """Which secure-sum session each round's release entered (`session_rules.SessionRecord`)."""

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = self._load()
            if self._client.client_id != self.client_id:
                raise ValueError(f"the loader built client {self._client.client_id}, not {self.client_id}")
        return self._client

    def export_state(self) -> dict:
        """What must survive until the next message of this run (no model, no data)."""
        state = {"pending": self._pending, "session": self._session}
        if self.sums.path is None:  # an in-memory record travels with the state
            state["secure_sums"] = self.sums.state()
        return state

    def import_state(self, state: dict) -> None:
        self._pending, self._session = state.get("pending"), state.get("session")
        self.sums.load(state.get("secure_sums"))

    # ------------------------------------------------------------------ dispatch
    def handle(self, blob: bytes, progress=None) -> bytes:
        msg = Message.from_bytes(blob, ANSWERS)
        cid = msg.header.get("client_id")
        if cid != self.client_id:
            raise MessageError(f"a {msg.kind} message for client {cid} was delivered to client {self.client_id}")
        if msg.kind == "describe":
            return self._describe(msg.header)
        if msg.kind == "round_instruction":
            return self._train(msg, blob, progress)
        return self._secagg(msg)

    def _describe(self, asked: dict) -> bytes:
        theirs = asked.get("config_sha256")
        if self.config_sha256 is not None and theirs is not None and theirs != self.config_sha256:
            raise MessageError(f"client {self.client_id}: the server runs a config (sha256 {str(theirs)[:12]}…) other than "
                               f"this node's ({self.config_sha256[:12]}…); both must hold the same federation TOML")
        from privlora.federation.client import planned_mechanism

        labels = asked.get("labels")
        if self._client is None and self._data_facts is not None:
            n, mine = self._data_facts()
        else:
            n, mine = self.client.num_examples, getattr(self.client, "label_names", None)
        mine = self.label_names if self.label_names is not None else mine
        if mine is not None and labels is not None and list(labels) != list(mine):
            raise MessageError(f"client {self.client_id}: this node's data has labels {list(mine)} but the federation's "
                               f"are {list(labels)}; give the node data with exactly those labels")
        planned = planned_mechanism(self.cfg, n) if self.cfg.privacy.enabled else None
        if planned is not None and self._client is not None and planned != self._client.planned_mechanism():
            raise RuntimeError(f"client {self.client_id}: its planned release differs from its client's")  # a bug, never a release
        header = {
            "client_id": self.client_id,
            "mechanism": None if planned is None else planned.to_dict(),
            "noise": self.noise,
            # in the clear the size travels with every update anyway; under secagg it never leaves
            "num_examples": None if self.cfg.secagg.enabled or self.cfg.privacy.unit == "client" else n,
            "spent": None if self.guard is None else self.guard.spent(),
        }
        return Message("client_description", header).to_bytes()

    def _refuse(self, rnd: int, reason: str, code: str | None = None) -> bytes:
        print(f"privlora: client {self.client_id}: round {rnd}: {reason}", file=sys.stderr)
        header = {"client_id": self.client_id, "round": rnd, "reason": reason}
        if code is not None:
            header["code"] = code
        return Message("refusal", header).to_bytes()

    # ------------------------------------------------------------------ training
    def _train(self, msg: Message, blob: bytes, progress) -> bytes:
        from privlora.federation.guard import check_header, check_instruction, check_release
        from privlora.federation.noise import noise_source
        from privlora.federation.session_rules import ENTERED_SECURE_SUM

        reason = check_header(self.cfg, self.client_id, msg.header)
        if reason is not None:
            return self._refuse(msg.header.get("round") if isinstance(msg.header.get("round"), int) else -1, reason)
        rnd = int(msg.header["round"])
        if self.cfg.secagg.enabled:
            entered = self.sums.entered(rnd)
            if entered is not None:
                return self._refuse(rnd, f"this client's release of round {rnd} already entered a secure sum (session "
                                         f"{entered[:12]}…); a release enters at most one", code=ENTERED_SECURE_SUM)
        # before any charge or training: crafted weights never reach the model
        try:
            fields = self.client.incoming_fields(int(msg.header["rank"]))
        except ValueError as exc:  # a rank the strategy cannot train (e.g. FedIT below the max rank)
            return self._refuse(rnd, f"refusing the instruction: {exc}")
        reason = check_instruction(self.cfg, self.client_id, msg, fields)
        if reason is not None:
            return self._refuse(rnd, f"refusing the instruction: {reason}")
        dp = self.cfg.privacy.enabled
        if self.guard is not None and dp:
            asked = msg.header.get("mechanism")
            asked = None if asked is None else SubsampledGaussian.from_dict(asked)
            own = self.client.planned_mechanism()
            reason = self.guard.check(rnd, asked, own)
            if reason is not None:
                return self._refuse(rnd, reason)
            update = self.guard.released(rnd)
            if update is None:
                self.guard.charge(rnd, own)  # fsynced before training, long before anything leaves
                with noise_source(self.noise):
                    update = self.client.handle(blob, progress=progress)
                why = check_release(update)
                if why is not None:  # kept as the round's answer: never retrained under the same charge
                    update = self._refuse(rnd, why)
                self._charge_client_level(rnd, update)  # before the release is kept, let alone sent
                self.guard.keep_release(rnd, update)
            if Message.from_bytes(update, ("client_update", "refusal")).kind == "refusal":
                return update
        else:
            with noise_source(self.noise):
                update = self.client.handle(blob, progress=progress)
            why = check_release(update)
            if why is not None:
                return self._refuse(rnd, why)
            self._charge_client_level(rnd, update)
        if not self.cfg.secagg.enabled:
            return update
        return self._keep_for_secure_sum(rnd, update)

    def _charge_client_level(self, rnd: int, update: bytes) -> None:
        """Under client-level DP, a node with a folder records the round's client-level release
        in its own ``client_level-<run>.jsonl`` (`accounting.client_level`) before its update
        leaves it: the release its own config decides, whatever the server records."""
        if self.cfg.privacy.unit != "client" or self.sums.path is None:
            return
        if Message.from_bytes(update, ("client_update", "refusal")).kind == "refusal":
            return
        from accounting.client_level import ClientLevelLedger
        from privlora.core.config import resolved_sha256

        path = self.sums.path.parent / f"client_level-{resolved_sha256(self.cfg)[:12]}.jsonl"
        ledger = ClientLevelLedger.open(path) if path.is_file() else ClientLevelLedger.create(
            path, self.cfg.privacy.delta, self.cfg.privacy.client_noise, "as the server samples", run=run_identity(self.cfg))
        entry = ledger.entry_for(rnd)
        made = self.client.client_level_release
        if made is None or made[0] != rnd:
            raise RuntimeError(f"client {self.client_id}: no client-level release of round {rnd} to charge")  # a bug
        if entry is None:
            ledger.append(rnd, [self.client_id], made[1])
        elif entry.release != made[1]:
            raise LedgerError(f"client {self.client_id}: round {rnd} is recorded with another client-level release")

    def _keep_for_secure_sum(self, rnd: int, update: bytes) -> bytes:
        from privlora.federation.secure_sum import flatten, layout

        msg = Message.from_bytes(update, "client_update")
        from privlora.federation.client_level import DISTRIBUTED_KEY, is_distributed

        spec = layout(msg.tensors)
        if is_distributed(self.cfg):  # integers mod 2^client_bits: carried as they are, never as floats
            if list(msg.tensors) != [DISTRIBUTED_KEY] or msg.tensors[DISTRIBUTED_KEY].dtype != np.uint64:
                raise MessageError(f"client {self.client_id}: a distributed-noise update must be one uint64 vector {DISTRIBUTED_KEY!r}")
            vector = msg.tensors[DISTRIBUTED_KEY].ravel().copy()
        else:
            vector = flatten(msg.tensors, spec)
        self._pending = _Pending(rnd, spec, vector)
        self._session = None
        header = dict(msg.header, layout=[[k, list(s)] for k, s in spec])
        return Message("client_update", header).to_bytes()

    # ------------------------------------------------------------------ secure aggregation
    def _secagg(self, msg: Message) -> bytes:
        from privlora.federation.secure_sum import session_plan
        from privlora.federation.session_rules import SessionRefused, check_invitation

        h = msg.header
        rnd, stage = int(h["round"]), str(h["stage"])
        entered = self.sums.entered(rnd)
        if stage == "advertise_keys" and entered is not None:
            raise SessionRefused(f"client {self.client_id}: round {rnd}: this client's release already entered secure-sum "
                                 f"session {entered[:12]}…; refusing a second session (a release enters at most one sum)")
        if self._pending is None or self._pending.round != rnd:
            raise MessageError(f"client {self.client_id}: secure aggregation for round {rnd}, but it holds no contribution of that round")
        if stage == "advertise_keys":
            from secagg import SecAggClient

            check_invitation(self.cfg, self.client_id, rnd, h.get("invited") or [])
            # the session's size, threshold and least live inputs come from this node's config,
            # never from the invitation
            plan, spec = session_plan(self.cfg, self._pending.layout)
            try:
                nonce = bytes.fromhex(h["session_nonce"])
            except (KeyError, TypeError, ValueError):
                raise MessageError(f"client {self.client_id}: the key advertisement request of round {rnd} carries no valid session nonce") from None
            client = SecAggClient(self.client_id, plan, spec, rnd, self.signing_key, session_nonce=nonce)
            client.set_input(self._pending.vector)
            self._session = (rnd, client)
            out = client.advertise()
        else:
            if self._session is None or self._session[0] != rnd:
                raise MessageError(f"client {self.client_id}: stage {stage!r} of round {rnd} before its key advertisement")
            client = self._session[1]
            nonce = (client.session_nonce or b"").hex()
            if entered is not None and entered != nonce:
                raise SessionRefused(f"client {self.client_id}: round {rnd}: this client's release already entered secure-sum "
                                     f"session {entered[:12]}…; refusing to continue another")
            out = client.handle(tensor_bytes(msg))
            if stage == "masked_input":
                # on disk before the masked input leaves: this release never enters another sum
                self.sums.enter(rnd, nonce)
            if stage == "unmasking":
                self._session, self._pending = None, None
        header = {"client_id": self.client_id, "round": rnd, "stage": stage}
        return Message("secagg_reply", header, {"blob": bytes_tensor(out)}).to_bytes()


def run_identity(cfg) -> dict:
    """What a client ledger's header records about the run it belongs to."""
    from privlora.core.config import resolved_sha256

    return {"name": cfg.name, "config_sha256": resolved_sha256(cfg), "seed": cfg.seed}


def ledger_folder(root: str | Path, cfg) -> Path:
    """A client's ledger folder for one run: ``root/NAME-CONFIGHASH`` (a new run never reopens
    another run's ledger, a resumed run reopens its own)."""
    from privlora.core.config import resolved_sha256

    return Path(root) / f"{cfg.name}-{resolved_sha256(cfg)[:12]}"


__all__ = ["ClientGuard", "ClientNode", "ledger_folder", "run_identity"]
