"""The round engine: every round of every run, whatever carries the messages.

`RoundEngine(cfg, server, transport, out, ...)` runs a federation and writes its output folder
(``metrics.jsonl``, ``ledger.jsonl``, ``checkpoint/``, ``adapter/``, reports; see
`privlora.transports.inprocess` for the folder's contract). It talks to clients only through a
`privlora.federation.transport.Transport`: the in-process simulation and Flower run this same code.

Once per run (and on resume) it asks every client to ``describe`` itself: the release one round
of its local DP-SGD makes (sigma, q, steps, clip, delta), computed by the client from its own
data; the server never sees the data, and under secure aggregation not its size either. Then
each round:

1. **sample** ``clients_per_round`` clients (the server's seeded RNG);
2. **admit** (DP) those whose next release fits their budget by the run's tight accountant
   (`accounting.Admission`); fewer than ``min_clients`` (3 under secure aggregation) and the run
   stops cleanly;
3. **charge** the server's ledger for every admitted client *before* any instruction leaves
   (a crash from here on never un-spends budget; on resume the charge is reused, not repeated);
4. **instruct and collect** (``train``): each admitted client gets the global state, its rank
   and the release it was charged for; a client that does not answer is a dropout (its charge
   stays spent), a guarded client may answer with a refusal;
5. **sum**: in the clear, the contributions in client order; under secure aggregation,
   `secure_sum.secure_sum_over` runs the masked protocol through the transport, one exchange
   per stage, with dropout recovery; below the threshold the round aborts and the run stops
   (``--resume`` continues once enough clients are back). Every session is sized from the
   config, as each node sizes it (`session_rules`): at most ``clients_per_round`` clients, at
   least max(3, t) live inputs. A node whose release of the round already entered a secure sum
   refuses the round (a release enters at most one sum): on resume the round runs with the
   clients whose releases never entered one, or, if fewer than that minimum are left, it is
   skipped (``skipped`` in its metrics line; its charges stay spent, the model is unchanged);
6. **finish** (`Strategy.finish`, server momentum), **evaluate**, append the round's metrics
   line (fsynced), **checkpoint**.

Client-level DP (``privacy.unit = "client"``, `privlora.federation.client_level`): after step 2 the
round's client-level release is recorded for every admitted client in ``client_level.jsonl``
(`accounting.client_level`) before any instruction leaves; step 5 sums the clients' clipped
deltas, adds the central noise or decodes the distributed one, and finishes with the mean
clipped update (divided by ``clients_per_round``); each metrics line carries ``client_level``.

Privacy invariants kept here: nobody trains uncharged; what a client reports it ran must equal
what it was charged for; no client's spent epsilon exceeds its budget (checked every round).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from accounting import Admission, Ledger, SubsampledGaussian
from accounting.verify import LEDGER_FILE
from privlora.core.checkpoint import CheckpointError, atomic_write, load_checkpoint, save_checkpoint
from privlora.core.config import ExperimentConfig
from privlora.core.errors import ledger_file
from privlora.federation.messages import Message, MessageError
from privlora.federation.server import ClientReport, Server
from privlora.federation.transport import STAGE_DESCRIBE, STAGE_TRAIN, Transport


class RoundAborted(RuntimeError):
    """A round could not complete (too few clients answered, or secure aggregation aborted)."""


@dataclass
class Description:
    """What a client said about itself in reply to ``describe``."""

    mechanism: SubsampledGaussian | None
    noise: str
    num_examples: int | None


SAMPLES = "samples.json"


def log(message: str) -> None:
    print(f"privlora: {message}", file=sys.stderr, flush=True)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def config_sha256(out: Path) -> str:
    return hashlib.sha256((out / "config.toml").read_bytes()).hexdigest()


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep the metrics of rounds <= last_round; set later lines (an unfinished round) aside."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep, extra = [], []
    for line in lines:
        try:
            rnd = json.loads(line)["round"]
        except (ValueError, KeyError, TypeError):
            extra.append(line)
            continue
        (keep if rnd <= last_round else extra).append(line)
    if extra:
        aside = path.with_name(f"metrics.jsonl.unfinished-{int(time.time())}")
        aside.write_text("".join(extra), encoding="utf-8")
        atomic_write(path, "".join(keep))


def last_record(path: Path) -> dict[str, Any]:
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.is_file() else []
    if not lines:
        raise CheckpointError(f"{path} is empty or missing; the run cannot be resumed — start it again with --overwrite")
    return json.loads(lines[-1])


def _bar(total: int, desc: str, position: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=position == 0, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


class RoundEngine:
    """Runs the rounds of one federation through ``transport``; writes into ``out``."""

    def __init__(self, cfg: ExperimentConfig, server: Server, transport: Transport, out: str | Path, *,
                 majority_baseline: float | None, label_names: list[str] | None = None, progress: bool = True):
        self.cfg = cfg
        self.server = server
        self.transport = transport
        self.out = Path(out)
        self.metrics_path = self.out / "metrics.jsonl"
        self.majority_baseline = None if majority_baseline is None else float(majority_baseline)
        self.label_names = label_names
        self.progress = progress
        self.dp = cfg.privacy.enabled
        self.ids = list(range(cfg.data.num_clients))
        self.ledger: Ledger | None = None
        self.admission: Admission | None = None
        self.described: dict[int, Description] = {}
        self.chash = config_sha256(self.out)
        self.client_level = cfg.privacy.unit == "client"
        self.cl_ledger = None
        """The client-level ledger (`accounting.client_level`), under privacy.unit = 'client'."""
        self.cl_round: dict[str, Any] = {}

    # ------------------------------------------------------------------ start
    def describe(self) -> None:
        """Ask every client for its planned release; unreachable clients are never admitted."""
        from privlora.core.config import resolved_sha256

        asked = {"config_sha256": resolved_sha256(self.cfg), "labels": self.label_names}
        msgs = {c: Message("describe", {"client_id": c, **asked}).to_bytes() for c in self.ids}
        replies = self.transport.exchange(STAGE_DESCRIBE, msgs, self.cfg.federation.train_timeout or None)
        for c, blob in replies.items():
            h = Message.from_bytes(blob, "client_description").header
            if h.get("client_id") != c:
                raise MessageError(f"client {c} described itself as client {h.get('client_id')}")
            mech = h.get("mechanism")
            if self.dp and mech is None:
                raise MessageError(f"client {c} plans no DP release but privacy is enabled")
            n = h.get("num_examples")
            self.described[c] = Description(None if mech is None else SubsampledGaussian.from_dict(mech),
                                            str(h.get("noise", "seeded")), None if n is None else int(n))
        missing = [c for c in self.ids if c not in self.described]
        if missing:
            log(f"clients {missing} did not answer; they are never admitted in this run")

    def planned(self, c: int) -> SubsampledGaussian:
        return self.described[c].mechanism

    def _open_privacy(self, resume: bool, first_round: int, anchor: dict) -> None:
        from privlora.core.accountants import get_accountant

        budgets = {k: self.cfg.client_budget(k) for k in self.ids}
        self.admission = Admission(get_accountant(self.cfg.privacy.accountant), self.cfg.privacy.delta, budgets)
        path = self.out / LEDGER_FILE
        if not resume:
            with ledger_file(path):
                self.ledger = Ledger.create(path, self.cfg.privacy.delta, self.cfg.privacy.accountant, budgets,
                                            run={"name": self.cfg.name, "config_sha256": self.chash, "seed": self.cfg.seed})
            return
        with ledger_file(path):
            self.ledger = Ledger.open(path)
        n = int(anchor.get("entries", -1))
        chain = [self.ledger.header["hash"]] + [c.hash for c in self.ledger.charges]
        if not (0 <= n < len(chain) and chain[n] == anchor.get("head")):
            raise CheckpointError(f"checkpoint: the ledger does not extend the one the checkpoint saw ({path} was altered)")
        # charges of the unfinished round stay spent; they are reused below, not repeated
        self.admission.load({c: [ch.mechanism for ch in self.ledger.charges if ch.client == c and ch.round < first_round]
                             for c in self.ids})

    def _round_zero(self, t_start: float) -> None:
        ev = self.server.evaluate()
        sizes = [self.described[c].num_examples if c in self.described else None for c in self.ids]
        record: dict[str, Any] = {
            "round": 0,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            **self.server.task.metrics_record(ev),
            "majority_baseline": self.majority_baseline,
            "clients": [],
            "epsilon": {str(k): 0.0 for k in self.ids} if self.dp else {},
            "epsilon_max": 0.0 if self.dp else None,
            "noise_multiplier": {str(k): (self.planned(k).noise_multiplier if self.dp and k in self.described else 0.0)
                                 for k in self.ids},
            "noise_source": {str(k): self.described[k].noise for k in self.described},
            "client_sizes": sizes if all(n is not None for n in sizes) else None,
            "client_ranks": list(self.cfg.client_ranks()),
            "transport": self.transport.name,
            "seconds": time.perf_counter() - t_start,
        }
        if self.client_level:
            record["client_level"] = self.client_level_record()
        self._anchor(record)
        append_jsonl(self.metrics_path, record)
        self.write_samples("untrained")
        self.checkpoint(0)

    # ------------------------------------------------------------------ client level
    def _open_client_level(self, resume: bool) -> None:
        from accounting.client_level import CLIENT_LEVEL_FILE, ClientLevelLedger

        path = self.out / CLIENT_LEVEL_FILE
        if resume and path.is_file():
            self.cl_ledger = ClientLevelLedger.open(path)
            return
        self.cl_ledger = ClientLevelLedger.create(
            path, self.cfg.privacy.delta, self.cfg.privacy.client_noise,
            "fixed-size, uniformly without replacement (no amplification claimed)",
            run={"name": self.cfg.name, "config_sha256": self.chash, "seed": self.cfg.seed})

    def _client_level_template(self) -> dict[str, np.ndarray]:
        from privlora.tasks.adapters import adapter_state

        return adapter_state(self.server.global_model)

    def _client_level_layout(self):
        """The layout of a client's delta, as the server computes it from the strategy alone."""
        from privlora.federation.distributed_noise import Layout
        from privlora.strategies import WEIGHT_KEY

        strategy = self.server.strategy
        start = strategy.local_start(strategy.broadcast(self.server.global_state, strategy.max_rank), self._client_level_template())
        ref = strategy.contribution(start, 1, strategy.max_rank, client_id=None)
        return Layout.of({k: v for k, v in ref.items() if k != WEIGHT_KEY})

    def client_level_release(self, rnd: int):
        """The release of round ``rnd``'s sum, as the ledger records it."""
        from privlora.federation import client_level as cl

        if cl.is_distributed(self.cfg):
            return cl.distributed_params(self.cfg, self._client_level_layout(), rnd).release()
        return cl.central_release(self.cfg)

    def charge_client_level(self, rnd: int, admitted: list[int]) -> None:
        """Record the round's client-level release for every admitted client before any
        instruction leaves (a dropout stays charged: conservative)."""
        entry = self.cl_ledger.entry_for(rnd)
        release = self.client_level_release(rnd)
        if entry is None:
            self.cl_ledger.append(rnd, admitted, release)
        elif entry.release != release or not set(admitted) <= set(entry.clients):
            raise CheckpointError(f"client-level ledger: round {rnd}'s record differs from what the round would release now")

    def client_level_epsilons(self) -> dict[str, Any]:
        from accounting.client_level import client_epsilons

        eps = client_epsilons(self.cl_ledger.entries, self.cfg.privacy.delta) if self.cl_ledger.entries else {"server": {}, "model_only": {}}
        return {
            "epsilon_server": {str(k): v for k, v in eps["server"].items()},
            "epsilon_server_max": max(eps["server"].values(), default=0.0),
            "epsilon_model_only_max": max(eps["model_only"].values(), default=0.0),
        }

    def client_level_record(self) -> dict[str, Any]:
        """What the round's metrics line says about the client-level guarantee."""
        from privlora.federation import client_level as cl

        p = self.cfg.privacy
        distributed = cl.is_distributed(self.cfg)
        out: dict[str, Any] = {
            "unit": "client",
            "noise": p.client_noise,
            "trusted": cl.TRUST["distributed" if distributed else "central"],
            "clip_norm": p.client_clip,
            "expected_clients": cl.expected_clients(self.cfg),
            "sampling": "fixed-size without replacement: no amplification claimed (epsilon against the model alone = against the server)",
            "record_level_dp": bool(self.dp),
            **self.client_level_epsilons(),
            "ledger": {"entries": len(self.cl_ledger), "head": self.cl_ledger.head},
        }
        if not distributed:
            out["noise_multiplier"] = cl.central_noise_multiplier(self.cfg)
        out.update(self.cl_round)
        return out

    def aggregate_client_level(self, rnd: int, reports: list[ClientReport], contributions: list[dict], layouts: dict):
        """Sum the clipped deltas (in the clear, or securely), noise (central) or decode
        (distributed), and finish; returns the secure-sum report or None."""
        from privlora.federation import client_level as cl
        from privlora.federation.secure_sum import secure_sum_over
        from privlora.strategies import sum_states
        from secagg import SecAggError

        if len(reports) < self.fewest():
            raise RoundAborted(f"only {len(reports)} clients returned an update, fewer than {self.fewest()}")
        secure = None
        if self.cfg.secagg.enabled:
            specs = {json.dumps(v) for v in layouts.values()}
            if len(specs) != 1 or not next(iter(layouts.values())):
                raise MessageError(f"round {rnd}: clients reported different or empty contribution layouts; they cannot be summed")
            try:
                summed, secure = secure_sum_over(self.transport, self.cfg, rnd, sorted(layouts), next(iter(layouts.values())))
            except SecAggError as exc:
                raise RoundAborted(f"secure aggregation aborted: {type(exc).__name__}: {exc}") from exc
            for r in reports:
                r.upload_bytes = int(secure.bytes_up.get(r.client_id, 0))
        else:
            summed = sum_states(contributions)
        if cl.is_distributed(self.cfg):
            from privlora.federation.distributed_noise import decode_sum

            params = cl.distributed_params(self.cfg, self._client_level_layout(), rnd)
            n = len(secure.survivors)
            summed, rep = decode_sum(np.asarray(summed[cl.DISTRIBUTED_KEY], dtype=np.uint64), params, num_inputs=n)
            rel = params.release()
            self.cl_round = {
                "bits": params.bits, "scale": params.scale, "padded_dim": params.padded_dim, "min_inputs": params.min_inputs,
                "inputs": n, "colluders": self.cfg.privacy.colluders,
                "sigma" if params.sigma is not None else "variance": params.sigma if params.sigma is not None else params.variance,
                "l2_sensitivity": rel.l2_sensitivity, "l1_sensitivity": rel.l1_sensitivity,
                "wrap_probability": rep.wrap_probability, "wraps_seen": rep.suspect, "wrap_level": rep.edge_level,
                "max_abs": rep.max_abs,
                "bytes_per_client": params.padded_dim * self.cfg.secagg.bits // 8,
            }
            if rep.suspect:
                log(f"round {rnd}: the decoded sum has {rep.suspect} coordinate(s) near +-2^(bits-1): likely modular wraps; "
                    "raise privacy.client_bits")
        else:
            # seeded (reproducible) only in the in-process simulation; any networked server draws secure noise
            summed = cl.central_noise(self.cfg, summed, rnd, secure=self.transport.name != "in-process")
            self.cl_round = {}
        finished = cl.finish_client_level(self.server.strategy, self.server.global_state, self._client_level_template(), summed, self.cfg)
        self.server.aggregate_sum(finished)
        return secure, {}

    # ------------------------------------------------------------------ checkpoint
    def _server_tensors(self) -> dict[str, np.ndarray]:
        tensors = {f"global/{k}": v for k, v in self.server.global_state.items()}
        if self.server.velocity is not None:
            tensors.update({f"velocity/{k}": v for k, v in self.server.velocity.items()})
        return tensors

    def _restore_server(self, state: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        server = self.server
        glob = {k[len("global/"):]: v for k, v in tensors.items() if k.startswith("global/")}
        vel = {k[len("velocity/"):]: v for k, v in tensors.items() if k.startswith("velocity/")}
        if set(glob) != set(server.global_state):
            raise CheckpointError("checkpoint: the saved adapter does not match this config's adapter layout")
        server.global_state = glob
        server.velocity = vel or None
        server.load_global_state(glob)
        server.client_ranks = {int(k): int(v) for k, v in state["client_ranks"].items()}
        server.rng.bit_generator.state = state["server_rng"]

    def checkpoint(self, rnd: int, **extra: Any) -> None:
        meta: dict[str, Any] = {
            "server_rng": self.server.rng.bit_generator.state,
            "config_sha256": self.chash,
            "client_ranks": {str(k): v for k, v in self.server.client_ranks.items()},
            **extra,
        }
        if self.ledger is not None:
            meta["ledger"] = {"entries": len(self.ledger), "head": self.ledger.head}
        save_checkpoint(self.out, rnd, self._server_tensors(), meta)

    def _anchor(self, record: dict[str, Any]) -> None:
        if self.ledger is not None:
            record["ledger"] = {"entries": len(self.ledger), "head": self.ledger.head}

    # ------------------------------------------------------------------ one round
    def admit(self, rnd: int, chosen: list[int]) -> tuple[list[int], dict[str, str], str | None]:
        """(admitted, refused {client: reason}, stop reason or None); charges the admitted."""
        reachable = [c for c in chosen if c in self.described]
        refused = {str(c): f"client {c}: did not describe itself; not admitted" for c in chosen if c not in self.described}
        admitted = reachable
        if self.dp:
            planned = {c: self.planned(c) for c in reachable}
            pending = {c: self.ledger.charge_for(c, rnd) for c in reachable}
            fresh, decisions = self.admission.admit({c: m for c, m in planned.items() if pending[c] is None})
            refused.update({str(d.client): d.reason for d in decisions if not d.admitted})
            admitted = sorted(fresh + [c for c in reachable if pending[c] is not None])
            for reason in refused.values():
                log(f"round {rnd}: not admitted: {reason}")
        fewest = self.fewest()
        if len(admitted) < fewest:
            unreachable = len(chosen) - len(reachable)
            why = "fit their privacy budget" if not unreachable else f"were reachable and fit their privacy budget ({unreachable} never described themselves)"
            return admitted, refused, (
                f"round {rnd}: only {len(admitted)} of the {len(chosen)} sampled clients {why}, "
                f"fewer than {fewest} (federation.min_clients = {self.cfg.federation.min_clients}"
                f"{f', and secure aggregation needs {fewest}' if self.cfg.secagg.enabled else ''}); the run stops here"
            )
        if self.dp:
            # charge before any update leaves a client; a crash from here on never un-spends it
            for c in admitted:
                if pending[c] is None:
                    self.ledger.append(c, rnd, planned[c])
                elif pending[c].mechanism != planned[c]:
                    raise CheckpointError(f"ledger: client {c}'s charge for round {rnd} differs from what it would run now")
                self.admission.record(c, planned[c])
        return admitted, refused, None

    def fewest(self) -> int:
        # a secure sum of two lets each client subtract its own input: never fewer than three,
        # nor fewer than the threshold (the nodes size every session from the same config)
        if not self.cfg.secagg.enabled:
            return self.cfg.federation.min_clients
        from privlora.federation.session_rules import session_size

        return max(self.cfg.federation.min_clients, session_size(self.cfg).least)

    def collect(self, rnd: int, admitted: list[int]) -> tuple[list[ClientReport], list[dict], dict, list[int], dict[str, str]]:
        """Instruct the admitted clients and read their updates: (reports, clear contributions,
        layouts under secagg, dropouts, refusals by the clients themselves)."""
        server = self.server
        instructions = {c: server.instruction(rnd, c, self.planned(c) if self.dp else None) for c in admitted}
        replies = self.transport.exchange(STAGE_TRAIN, instructions, self.cfg.federation.train_timeout or None)
        reports, contributions, layouts, dropped, refused = [], [], {}, [], {}
        self.entered_sum: list[int] = []
        """Clients that refused because their release of this round already entered a secure sum."""
        from privlora.federation.session_rules import ENTERED_SECURE_SUM

        for cid in admitted:
            blob = replies.get(cid)
            if blob is None:
                dropped.append(cid)
                continue
            msg = Message.from_bytes(blob, ("client_update", "refusal"))
            if msg.kind == "refusal":
                if msg.header.get("code") == ENTERED_SECURE_SUM:
                    self.entered_sum.append(cid)
                refused[str(cid)] = str(msg.header.get("reason"))
                log(f"round {rnd}: client {cid} refused: {refused[str(cid)]}")
                continue
            report, tensors = server.read_update(blob, rnd, set(admitted))
            if report.client_id != cid:  # one client's update counted twice, another's not at all
                raise MessageError(f"round {rnd}: the reply to client {cid} carries client {report.client_id}'s update; "
                                   "refusing the round (a transport or node that mixes up replies is broken)")
            if self.dp and report.mechanism != self.ledger.charge_for(cid, rnd).mechanism:
                raise RuntimeError(
                    f"client {cid} ran {report.mechanism} in round {rnd} but was charged for "
                    f"{self.ledger.charge_for(cid, rnd).mechanism}; refusing its update"
                )
            if self.cfg.secagg.enabled:
                layouts[cid] = [(str(k), tuple(int(x) for x in s)) for k, s in msg.header.get("layout") or []]
            contributions.append(tensors)
            reports.append(report)
        if dropped:
            log(f"round {rnd}: clients {dropped} did not answer (dropouts; their charges stay spent)")
        return reports, contributions, layouts, dropped, refused

    def aggregate(self, rnd: int, reports: list[ClientReport], contributions: list[dict], layouts: dict):
        """Sum and finish; returns (secure-sum report or None, the strategy's metrics of a sum in the clear)."""
        from privlora.federation.secure_sum import secure_sum_over
        from secagg import SecAggError

        if len(reports) < self.fewest():
            raise RoundAborted(f"only {len(reports)} clients returned an update, fewer than {self.fewest()}")
        if not self.cfg.secagg.enabled:  # only the clear path sees single contributions
            clear = self.server.strategy.clear_sum_metrics(contributions, self.server.global_state)
            self.server.aggregate(contributions)
            return None, clear
        specs = {json.dumps(v) for v in layouts.values()}
        if len(specs) != 1 or not next(iter(layouts.values())):
            raise MessageError(f"round {rnd}: clients reported different or empty contribution layouts; they cannot be summed")
        try:
            summed, secure = secure_sum_over(self.transport, self.cfg, rnd, sorted(layouts), next(iter(layouts.values())))
        except SecAggError as exc:
            raise RoundAborted(f"secure aggregation aborted: {type(exc).__name__}: {exc}") from exc
        if secure.clipped:
            log(f"round {rnd}: secure aggregation clipped {secure.clipped} of {secure.values} values "
                "to secagg.value_bound x secagg.max_weight; raise the bounds")
        self.server.aggregate_sum(summed)
        for r in reports:  # what each client really sent: every message of the protocol
            r.upload_bytes = int(secure.bytes_up.get(r.client_id, 0))
        return secure, {}

    def run_round(self, rnd: int, rounds_bar) -> tuple[dict[str, Any], str | None]:
        """One round; returns (its metrics record, stop reason or None)."""
        t_round = time.perf_counter()
        chosen = self.server.sample_clients()
        admitted, refused, stop = self.admit(rnd, chosen)
        if stop:
            return {"chosen": chosen, "refused": refused}, stop
        if self.client_level:
            self.charge_client_level(rnd, admitted)
        bytes_down0 = dict(self.transport.stats.bytes_down)
        reports, contributions, layouts, dropped, refused_by_clients = self.collect(rnd, admitted)
        bytes_down = sum(self.transport.stats.bytes_down.get(c, 0) - bytes_down0.get(c, 0) for c in admitted)
        if self.cfg.secagg.enabled and self.entered_sum and len(reports) < self.fewest():
            return self._skip_round(rnd, chosen, {**refused, **refused_by_clients}, bytes_down, t_round), None
        try:
            if self.client_level:
                secure, clear_metrics = self.aggregate_client_level(rnd, reports, contributions, layouts)
            else:
                secure, clear_metrics = self.aggregate(rnd, reports, contributions, layouts)
        except RoundAborted as exc:
            return {"chosen": chosen, "refused": refused, "aborted": True}, (
                f"round {rnd}: {exc}; the round's charges stay spent and the global model is unchanged. "
                f"Continue with `privlora run --resume {self.out}` once enough clients are back")
        ev = self.server.evaluate()
        eps = {str(k): self.admission.spent(k) for k in self.ids} if self.dp else {}
        if self.dp:
            over = {k: e for k, e in eps.items() if e > self.cfg.client_budget(int(k)) + 1e-9}
            if over:
                raise RuntimeError(f"privacy invariant broken: clients {over} exceed their budgets; the ledger holds the evidence")
        record = {
            "round": rnd,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            **self.server.task.metrics_record(ev),
            "majority_baseline": self.majority_baseline,
            "clients": [r.client_id for r in reports],
            "sampled": chosen,
            "refused": {**refused, **refused_by_clients},
            # only non-private runs report a training loss (a DP client keeps its own)
            "train_loss": None if any(r.train_loss is None for r in reports) else float(np.nanmean([r.train_loss for r in reports])),
            "epsilon": eps,
            "epsilon_max": max(eps.values()) if eps else None,
            "per_client": [self.server.client_record(r) for r in reports],
            "client_ranks": [self.server.client_ranks[k] for k in self.ids],
            "secagg": None if secure is None else secure.to_dict(),
            "bytes_up": int(sum(r.bytes_up for r in reports)),
            "bytes_down": int(bytes_down),
            "seconds": time.perf_counter() - t_round,
        }
        if dropped:
            record["dropped"] = dropped
        if self.client_level:
            record["client_level"] = self.client_level_record()
        # e.g. FedIT's ||its update - the mean of the clients' updates|| / ||the mean update||
        record.update({k: (float(v) if np.isfinite(v) else None) for k, v in clear_metrics.items()})
        self._anchor(record)
        append_jsonl(self.metrics_path, record)
        self.checkpoint(rnd)
        return record, None

    def _skip_round(self, rnd: int, chosen: list[int], refused: dict, bytes_down: int, t_round: float) -> dict[str, Any]:
        """A round whose clients' releases already entered a secure sum (a resumed round) and too
        few others are left: it is skipped, never summed again. Its charges stay spent, the global
        model is unchanged; its metrics line says so (``skipped``) and the run goes on."""
        why = (f"round {rnd}: clients {self.entered_sum} refused because their releases of this round already entered a "
               f"secure sum (a release enters at most one), and the {len(chosen) - len(self.entered_sum)} other sampled "
               f"clients are fewer than the {self.fewest()} a secure sum needs; the round is skipped: its charges stay spent "
               "and the global model is unchanged")
        log(why)
        ev = self.server.evaluate()
        eps = {str(k): self.admission.spent(k) for k in self.ids} if self.dp else {}
        record = {
            "round": rnd,
            "test_accuracy": ev["accuracy"],
            "test_loss": ev["loss"],
            **self.server.task.metrics_record(ev),
            "majority_baseline": self.majority_baseline,
            "clients": [],
            "sampled": chosen,
            "refused": refused,
            "train_loss": None,
            "epsilon": eps,
            "epsilon_max": max(eps.values()) if eps else None,
            "per_client": [],
            "client_ranks": [self.server.client_ranks[k] for k in self.ids],
            "secagg": None,
            "bytes_up": 0,
            "bytes_down": int(bytes_down),
            "seconds": time.perf_counter() - t_round,
            "skipped": why,
        }
        self._anchor(record)
        append_jsonl(self.metrics_path, record)
        self.checkpoint(rnd)
        return record

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
        """Every round from the first unfinished one; writes adapter and report at the end.
        ``stop_after`` returns after that round as if the process had been killed."""
        t_start = time.perf_counter()
        cfg = self.cfg
        first_round, state, tensors = 1, {}, {}
        if resume:
            state, tensors = load_checkpoint(self.out, self.chash)
            self._restore_server(state, tensors)
            first_round = int(state["round"]) + 1
        self.describe()
        if self.dp:
            self._open_privacy(resume, first_round, state.get("ledger", {}))
        if self.client_level:
            self._open_client_level(resume)
        if resume:
            truncate_metrics(self.metrics_path, first_round - 1)
            if first_round > cfg.federation.rounds or state.get("stopped"):
                log(f"{self.out} is already complete; nothing to resume")
        else:
            self._round_zero(t_start)
        record = last_record(self.metrics_path)
        stopped, aborted = None, False
        rounds_bar = _bar(cfg.federation.rounds, "rounds", 0, self.progress)
        rounds_bar.update(first_round - 1)
        rnd = first_round
        while rnd <= cfg.federation.rounds:
            result, stopped = self.run_round(rnd, rounds_bar)
            if stopped:
                aborted = bool(result.get("aborted"))
                log(stopped)
                self._stop_line(rnd, stopped, result["refused"], record, aborted)
                break
            record = result
            shown = {"acc": record["test_accuracy"]} if record["test_accuracy"] is not None else {"loss": record["test_loss"]}
            rounds_bar.set_postfix(**{k: f"{v:.3f}" for k, v in shown.items()}, eps=f"{record['epsilon_max'] or 0:.2f}")
            rounds_bar.update(1)
            if stop_after is not None and rnd >= stop_after:
                rounds_bar.close()
                return record
            rnd += 1
        rounds_bar.close()
        if stopped:
            record = dict(record, stopped=stopped, aborted=aborted)
        self.finish()
        record["total_seconds"] = time.perf_counter() - t_start
        return record

    def _stop_line(self, rnd: int, stopped: str, refused: dict, last: dict[str, Any], aborted: bool) -> None:
        stop = {"round": rnd, "stopped": stopped, "clients": [], "refused": refused,
                "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
                "majority_baseline": self.majority_baseline, "epsilon": last.get("epsilon", {}),
                "epsilon_max": last.get("epsilon_max"), "seconds": 0.0}
        if aborted:
            stop["aborted"] = True
            if self.dp:  # the aborted round's charges are spent: show them
                stop["epsilon"] = {str(k): self.admission.spent(k) for k in self.ids}
                stop["epsilon_max"] = max(stop["epsilon"].values())
        self._anchor(stop)
        append_jsonl(self.metrics_path, stop)
        if not aborted:  # a budget stop is final; an aborted round is retried on --resume
            self.checkpoint(rnd - 1, stopped=stopped)

    def finish(self) -> None:
        """Write the adapter (atomically) and the reports."""
        from privlora.reporting.report import write_report
        from privlora.tasks.adapters import atomic_save_adapter

        model = self.server.export_model()
        atomic_save_adapter(model, self.out / "adapter")
        self.write_samples("final", model)
        write_report(self.out)

    def write_samples(self, stage: str, model=None) -> None:
        """When the task shows samples (the causal-LM task's greedy generations): the outputs of
        the global model (``model``, else the server's) for the fixed held-out prompts, kept in
        ``samples.json`` under ``stage`` ("untrained" at round 0, "final" at the end) for report.md."""
        if self.server.sample_prompts is None:
            return
        path = self.out / SAMPLES
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"prompts": self.server.sample_prompts}
        record[stage] = self.server.generate_samples(model)
        atomic_write(path, json.dumps(record, indent=1) + "\n")
