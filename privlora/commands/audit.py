"""`privlora audit`: an empirical lower bound on epsilon beside the accountant's upper bound.

One training run (Steinke, Nasr and Jagielski 2023; the mathematics is in `accounting.audit`):

1. **Canaries.** m canaries are made by the run's task and dealt round-robin (in a seeded
   order) to the clients. A secret seed draws, for each canary independently with probability
   1/2, whether it is put into its client's training data. Canaries never enter the held-out
   evaluation set, and the secret is written to ``audit.json`` only after training. Designs
   (``--design``), as the classification task makes them (`privlora.tasks.classification`):

   - ``tokens`` (`Task.crafted_canaries`): a crafted input: ``[CLS]``, 24 tokens drawn
     uniformly from the vocabulary (special tokens excluded), ``[SEP]``, with a uniformly random
     label. Unlike anything in the data, so its gradient points where little else does.
   - ``mislabelled`` (`Task.mislabel`): one of the client's own training examples, taken out of
     its data, with its label changed to another class (so "out" canaries really are out).

   A task without canaries (the causal-LM task) refuses before anything runs (`Task.check_canaries`).

2. **Training**: the config runs unchanged (`privlora.transports.inprocess.run_experiment` with a
   ``prepare`` hook that inserts the canaries), ledger, noise calibration and all; the auditor
   watches each client's local training as one of its ``observers`` (`Client.observers`).

3. **Scores** (higher = "looks included"); each canary is scored against what its own
   client released:

   - ``whitebox`` (gradient alignment): for every round t in which client k trained, with
     theta_t the model it started from (public: the broadcast) and Delta_{k,t} its local change
     (a function of its released update and the broadcast), the score of canary j is
     ``sum_t <u_j(theta_t) - mean_{l: y_l = y_j} u_l(theta_t), -Delta_{k,t}> / ||Delta_{k,t}||``
     where u_j is the canary's loss gradient (`Task.example_losses`) over the trained parameters, normalised to length
     1, and the mean is over the client's canaries with the same label (in and out alike:
     public). Centring matters: measured on MiniLM at the start of training, 64% of the
     variance of canary gradients lies along one direction whose sign is the label (80% with
     the head), shared by every example of that label, data included; within a label the
     gradients spread over many directions. SGD moves against included canaries' gradients,
     so included canaries score high. Scores are standardised within each client before
     ranking. The auditor reads each client's own local change, which is what the client's
     DP guarantee covers; under secure aggregation the server would see only the sum, so this
     is a stronger observer than the server (as a white-box audit should be).
   - ``blackbox`` (loss): the canary's loss under the initial global model minus its loss under
     the final one (the public starting point calibrates each canary's difficulty).

4. **Guesses and bounds**: for each score, "in" for the k highest, "out" for the k lowest, at a
   few guess counts fixed by m alone (`accounting.audit.default_candidates`); every (method,
   score, count) is tested at (1 - confidence) / (number of tests), so every bound holds at the
   stated confidence together. Methods: Theorem 5.2 of Steinke et al., and the f-DP analysis of
   Mahloujifar et al. for the (eps, delta)-DP curve and for the mu-GDP curves (`bounds`).

5. **Resume**: the secret, the options and the white-box increments of every finished
   client-round wait in an auditor-only folder beside the run (`AuditorState`) until audit.json
   is written; ``privlora audit --resume DIR`` continues from the run's checkpoint and gives the
   audit.json of an uninterrupted run.

What the bound means. It compares with the largest epsilon the accountant charged to any client
that holds a canary (every canary then has that guarantee, at the ledger's delta). A lower
bound above that claim proves, at the stated confidence, that training did not do what the
ledger says (a bug in clipping, noise or accounting). A lower bound below it proves nothing
about privacy: a weak attack gives a low bound on a leaking model too.

Caveats, stated in the report: a client's Poisson sample rate is 1 / ceil(n_k / batch) and so
depends, by at most a rounding step, on how many of its canaries were included (the theorem
assumes fixed mechanism parameters; the ledger records what ran). The audit is of record-level
DP, which is what privlora claims; there is no client-level claim to audit (no noise is added
across clients), so a client-level canary would only show what is already stated.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accounting.audit import (
    default_candidates,
    epsilon_lower_bound,
    epsilon_lower_bound_fdp,
    gdp_epsilon,
    gdp_lower_bound,
    guesses_from_scores,
)
from privlora.core.checkpoint import atomic_write
from privlora.core.config import ExperimentConfig
from privlora.core.errors import UserError
from privlora.reporting.audit_section import AUDIT_FILE, render_audit_section, sound_lower, verdict  # noqa: F401
from privlora.tasks import CanaryError, task_for

DESIGNS = ("tokens", "mislabelled")
# the command's defaults: the design and m that gave the highest bound on a non-private run of
# the embedded default config (benchmarks/results/audit.md: 0.515 against 0.077 for tokens)
DEFAULT_DESIGN = "mislabelled"
DEFAULT_CANARIES = 2000
SCORES = ("whitebox", "blackbox")


class AuditError(UserError):
    """The audit cannot run as asked (too many canaries for the data, a bad option)."""


@dataclass
class CanarySet:
    """The canaries of one audit: inputs (ids, mask, labels padded to max_length), the client
    each belongs to, and the secret inclusion bits."""

    ids: Any
    mask: Any
    labels: Any
    client: np.ndarray
    included: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0xA0D17, purpose]))


def deal(m: int, num_clients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(client of each canary, inclusion bit of each canary): clients round-robin in a seeded
    order, bits i.i.d. fair coins from the secret seed."""
    if m < 2:
        raise AuditError(f"--canaries: need at least 2 canaries, found {m}")
    client = _rng(seed, 1).permutation(np.arange(m) % num_clients)
    included = _rng(seed, 2).random(m) < 0.5
    return client, included


def _losses(task, model, ids, mask, labels, batch: int = 64) -> np.ndarray:
    """Each canary's loss under ``model`` (the task's per-example loss), in batches."""
    import torch

    from privlora.tasks.data import trim_batch

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch):
            rows = trim_batch(ids[s : s + batch], mask[s : s + batch], labels[s : s + batch])
            out.append(task.example_losses(model, rows).float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def unit_gradients(task, model, params, ids, mask, labels):
    """(n, D) matrix: each example's loss gradient (the task's per-example loss) over ``params``
    (flattened), of norm 1."""
    import torch

    from privlora.tasks.data import trim_batch

    model.eval()
    rows = []
    for j in range(ids.shape[0]):
        one = trim_batch(ids[j : j + 1], mask[j : j + 1], labels[j : j + 1])
        with torch.enable_grad():
            loss = task.example_losses(model, one).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for p, gr in zip(params, grads)])
        rows.append(g / g.norm().clamp_min(1e-12))
    return torch.stack(rows)


STATE_FILE = "audit-state.json"
STATE_FORMAT = "privlora-audit-state/1"


def default_auditor_dir(out: Path) -> Path:
    """Where an audit keeps its secret while training runs: beside the run folder, not in it."""
    out = Path(out)
    return out.with_name(out.name + ".auditor")


class AuditorState:
    """What an interrupted audit needs to go on, kept in the auditor's own folder (mode 0700, the
    file 0600), never in the run folder: the secret seed (it decides which canaries are in, so it
    must not reach the server-side party before training ends), the options, and the white-box
    score increments of every client-round scored so far (a function of each client's own local
    change, which under secure aggregation the server never sees). Rewritten atomically after
    every client-round, before the engine checkpoints that round; on resume the increments of
    rounds after the checkpoint are dropped (those rounds run again). Deleted once audit.json,
    which publishes the secret and the scores, is written."""

    def __init__(self, folder: Path, run_dir: Path, options: dict[str, Any], contributions=None):
        self.folder, self.run_dir, self.options = Path(folder), Path(run_dir), dict(options)
        self.contributions: dict[tuple[int, int], np.ndarray] = dict(contributions or {})

    @property
    def path(self) -> Path:
        return self.folder / STATE_FILE

    def save(self, contributions: dict[tuple[int, int], np.ndarray] | None = None) -> None:
        import os

        if contributions is not None:
            self.contributions = dict(contributions)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        record = {
            "format": STATE_FORMAT, "run": str(self.run_dir.resolve()), **self.options,
            "whitebox": [[r, c, [float(x) for x in inc]] for (r, c), inc in sorted(self.contributions.items())],
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, folder: Path, run_dir: Path, last_round: int) -> "AuditorState":
        path = Path(folder) / STATE_FILE
        if not path.is_file():
            raise AuditError(
                f"--resume: {path} is missing, and with it the canaries' secret; the audit cannot continue. Start a new "
                f"audit in a new folder (`privlora audit {Path(run_dir) / 'config.toml'} --out NEW_DIR`), which trains "
                "and spends the clients' budgets again; give --auditor-dir if the audit was started with one"
            )
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise AuditError(f"--resume: {path} is not valid JSON ({exc}); it was edited or damaged") from exc
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT:
            raise AuditError(f"--resume: {path} is not a privlora audit state (format {STATE_FORMAT})")
        if raw.get("run") != str(Path(run_dir).resolve()):
            raise AuditError(f"--resume: {path} belongs to the audit of {raw.get('run')}, not of {Path(run_dir).resolve()}")
        options = {k: raw[k] for k in ("secret_seed", "canaries", "design", "confidence")}
        contributions = {(int(r), int(c)): np.asarray(inc, dtype=np.float64) for r, c, inc in raw["whitebox"] if int(r) <= last_round}
        return cls(folder, run_dir, options, contributions)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


class Auditor:
    """Inserts the canaries (as a ``prepare`` hook) and scores them after the run."""

    def __init__(self, m: int, design: str, seed: int, state: AuditorState | None = None):
        if design not in DESIGNS:
            raise AuditError(f"--design: {design!r} is not one of {', '.join(DESIGNS)}")
        if int(m) < 2:
            raise AuditError(f"--canaries: need at least 2 canaries (2000, the default, is a good start), found {m}")
        self.m, self.design, self.seed = int(m), design, int(seed)
        self.canaries: CanarySet | None = None
        self.fed = None
        self.state = state
        # white-box increments per (round, client), in the client's canary order; summed in
        # sorted order at the end, so a resumed audit adds them exactly as an uninterrupted one
        self.contributions: dict[tuple[int, int], np.ndarray] = {} if state is None else dict(state.contributions)
        self._start: dict[int, list] = {}
        """Per client training now: its trainable parameters as the round started."""

    @property
    def whitebox_rounds(self) -> int:
        return len(self.contributions)

    # ------------------------------------------------------------------ before training
    def prepare(self, fed) -> None:
        """Make the canaries (the run's task makes them), put the included ones into their
        clients' data, and watch every client's training (`Client.observers`)."""
        import torch

        self.fed = fed
        self.task = task_for(fed.cfg)
        client, included = deal(self.m, len(fed.clients), self.seed)
        num_labels = len(fed.label_names)
        try:
            self.task.check_canaries(self.design)
            crafted = self.task.crafted_canaries(self.m, num_labels, _rng(self.seed, 3)) if self.design == "tokens" else None
            parts = {}
            rng = _rng(self.seed, 4)
            for c in fed.clients:
                own = np.flatnonzero(client == c.client_id)
                parts[c.client_id] = self._insert(c, own, included[own], num_labels, rng, crafted)
                fed.client_sizes[c.client_id] = c.num_examples
                c.observers.append(self)
        except CanaryError as exc:
            raise AuditError(str(exc)) from exc
        # canaries in one order: client by client (the order of `parts`), then by index
        order = np.concatenate([np.flatnonzero(client == c.client_id) for c in fed.clients])
        self.order = order
        self.canaries = CanarySet(
            ids=torch.cat([parts[c.client_id][0] for c in fed.clients]),
            mask=torch.cat([parts[c.client_id][1] for c in fed.clients]),
            labels=torch.cat([parts[c.client_id][2] for c in fed.clients]),
            client=client[order],
            included=included[order],
        )
        self.canaries.scores["whitebox"] = np.zeros(self.m)
        self.loss_before = _losses(self.task, fed.server.global_model, self.canaries.ids, self.canaries.mask, self.canaries.labels)

    def _insert(self, c, own: np.ndarray, included: np.ndarray, num_labels: int, rng: np.random.Generator, crafted) -> tuple:
        """Client ``c``'s canaries (rows ``own`` of the deal) as ``(inputs, mask, targets)``; the
        ``included`` ones join its dataset, and a mislabelled canary's original leaves it."""
        import torch
        from torch.utils.data import TensorDataset

        data = c.dataset.tensors
        keep = torch.ones(len(c.dataset), dtype=torch.bool)
        if self.design == "mislabelled":
            if len(own) >= len(c.dataset):
                raise AuditError(
                    f"--canaries {self.m}: client {c.client_id} holds only {len(c.dataset)} examples, too few for its "
                    f"{len(own)} mislabelled canaries; use fewer canaries or more data (then pass --overwrite to reuse the --out folder)"
                )
            take = torch.from_numpy(rng.choice(len(c.dataset), size=len(own), replace=False))
            keep[take] = False
            part = self.task.mislabel((data[0][take], data[1][take], data[2][take]), num_labels, rng)
        else:
            sel = torch.from_numpy(own)
            part = tuple(x[sel] for x in crafted)
        inc = torch.from_numpy(included)
        c.dataset = TensorDataset(*(torch.cat([d[keep], x[inc]]) for d, x in zip(data, part)))
        c.num_examples = len(c.dataset)
        return part

    # ------------------------------------------------------------------ while training (a client observer)
    def training_started(self, client_id: int, rnd: int, model) -> None:
        """Remember where this client's round starts (the trainable parameters)."""
        self._start[client_id] = [(n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]

    def training_finished(self, client_id: int, rnd: int, model) -> None:
        """Score the client's canaries against the change its round made."""
        self._score_round(client_id, model, self._start.pop(client_id), int(rnd))

    def _score_round(self, client_id: int, model, start, rnd: int) -> None:
        import torch

        c = self.canaries
        own = np.flatnonzero(c.client == client_id)
        if len(own) == 0:
            return
        live = dict(model.named_parameters())
        params = [live[n] for n, _ in start]
        change = torch.cat([(live[n].detach() - s).flatten() for n, s in start])
        norm = float(change.norm())
        if norm == 0.0:
            return
        sel = torch.from_numpy(own)
        labels = c.labels[sel]
        with torch.no_grad():  # back to where the round started
            for n, s in start:
                live[n].copy_(s)
        u = unit_gradients(self.task, model, params, c.ids[sel], c.mask[sel], labels)
        for y in labels.unique():  # centre within each label: removes the direction a label shares
            same = labels == y
            u[same] = u[same] - u[same].mean(dim=0, keepdim=True)
        self.contributions[(rnd, int(client_id))] = np.asarray((u @ (-change)).numpy() / norm, dtype=np.float64)
        if self.state is not None:  # before the engine checkpoints this round
            self.state.save(self.contributions)

    # ------------------------------------------------------------------ after training
    def finish_scores(self) -> dict[str, np.ndarray]:
        c = self.canaries
        c.scores["whitebox"] = np.zeros(self.m)
        for (_, client_id), inc in sorted(self.contributions.items()):
            c.scores["whitebox"][np.flatnonzero(c.client == client_id)] += inc
        after = _losses(self.task, self.fed.server.global_model, c.ids, c.mask, c.labels)
        c.scores["blackbox"] = self.loss_before - after
        out = {}
        for name in SCORES:
            s = np.asarray(c.scores[name], dtype=np.float64).copy()
            for k in np.unique(c.client):  # standardise within each client
                idx = c.client == k
                sd = s[idx].std()
                s[idx] = 0.0 if sd == 0 else (s[idx] - s[idx].mean()) / sd
            out[name] = s
        return out


METHODS = 3  # Theorem 5.2, the f-DP (eps, delta) curve, the f-DP Gaussian curves: one Bonferroni family


def bounds(scores: dict[str, np.ndarray], included: np.ndarray, delta: float, confidence: float) -> dict[str, Any]:
    """Every (score, guess count) pair read three ways, each test at the Bonferroni-corrected
    level (1 - confidence) / (3 x pairs), so that every bound reported holds at ``confidence``
    simultaneously: Theorem 5.2 of Steinke et al. (``epsilon_lower``), the f-DP analysis of the
    (eps, delta)-DP curve (``epsilon_lower_fdp``) and of the mu-GDP curves (``mu_lower``, with
    ``epsilon_of_mu``, the epsilon of mu-GDP at delta), both Mahloujifar et al. 2024."""
    m = len(included)
    cands = default_candidates(m)
    pairs = len(cands) * len(scores)
    tests = METHODS * pairs
    level = 1.0 - (1.0 - confidence) / tests
    truth = np.where(included, 1, -1)
    per: dict[str, Any] = {}
    rows_all = []
    for name, s in scores.items():
        rows = []
        for k_in, k_out in cands:
            v = int(np.sum(guesses_from_scores(s, k_in, k_out) * truth == 1))
            r = k_in + k_out
            mu = gdp_lower_bound(m, r, v, level)
            row = {"score": name, "k_in": k_in, "k_out": k_out, "r": r, "v": v,
                   "epsilon_lower": epsilon_lower_bound(m, r, v, delta, level),
                   "epsilon_lower_fdp": epsilon_lower_bound_fdp(m, r, v, delta, level),
                   "mu_lower": mu, "epsilon_of_mu": gdp_epsilon(mu, delta) if 0 < delta < 1 else None}
            rows.append(row)
        rows_all += rows
        per[name] = {"best": max(rows, key=lambda r: r["epsilon_lower"]), "candidates": rows}
    return {
        "best": max(rows_all, key=lambda r: r["epsilon_lower"]),
        "best_fdp": max(rows_all, key=lambda r: r["epsilon_lower_fdp"]),
        "best_gdp": max(rows_all, key=lambda r: r["mu_lower"]),
        "per_score": per, "tests": tests, "level_per_test": level,
    }


SCORES = ("whitebox", "blackbox")
"""The scores every audit reads (`Auditor`): each is one family of `bounds`' tests."""


def best_possible_bound(m: int, delta: float, confidence: float) -> float:
    """The largest epsilon lower bound ``m`` canaries can give, whatever training does: every
    guess right (scores that separate included from left-out canaries perfectly), read with the
    same tests and Bonferroni level as a real audit (`bounds`)."""
    included = np.arange(m) % 2 == 0
    perfect = included.astype(np.float64)
    b = bounds({name: perfect for name in SCORES}, included, delta, confidence)
    return max(b["best"]["epsilon_lower"], b["best_fdp"]["epsilon_lower_fdp"])


def fewest_useful_canaries(delta: float, confidence: float, limit: int = 4096) -> int:
    """The fewest canaries (even, from 2) whose `best_possible_bound` is above 0."""
    m = 2
    while m < limit and best_possible_bound(m, delta, confidence) <= 0:
        m += 2
    return m


def canary_warning(m: int, delta: float, confidence: float, target: float | None) -> str | None:
    """A warning when ``m`` canaries are too few for the audit to say much: none can give a bound
    above 0, or even a perfect score's bound stays below the epsilon the run targets."""
    if m >= DEFAULT_CANARIES:
        return None
    ceiling = best_possible_bound(m, delta, confidence)
    if ceiling <= 0:
        need = fewest_useful_canaries(delta, confidence)
        return (f"--canaries {m}: even if every guess were right, {m} canaries cannot give a lower bound on epsilon above 0 "
                f"at confidence {confidence:g} (it takes at least {need}); the audit will report 0 whatever training "
                f"did. Use --canaries {DEFAULT_CANARIES} (the default)")
    if target is not None and ceiling < target:
        return (f"--canaries {m}: even if every guess were right, {m} canaries give a lower bound of at most "
                f"ε = {ceiling:.2f} at confidence {confidence:g}, below the ε = {target:g} the run targets, so this audit "
                f"cannot detect a violation of that claim; use more canaries (the default is {DEFAULT_CANARIES})")
    return None


def claimed_epsilon(out: Path, clients_with_canaries) -> float | None:
    """The largest epsilon the ledger charges any client holding a canary (None without DP)."""
    from privlora.reporting.report import read_metrics

    rows = [r for r in read_metrics(out) if "stopped" not in r]
    eps = rows[-1].get("epsilon") or {}
    if not eps:
        return None
    return max(float(eps.get(str(int(k)), 0.0)) for k in clients_with_canaries)


def refuse_without_canaries(cfg: ExperimentConfig, design: str | None = None) -> None:
    """AuditError, before anything runs, when the run's task has no canaries (of ``design``)."""
    try:
        task_for(cfg).check_canaries(design)
    except CanaryError as exc:
        raise AuditError(str(exc)) from exc


def resumed_state(out: Path, folder: Path) -> tuple[AuditorState, ExperimentConfig]:
    """The interrupted audit of the run in ``out``: its auditor state (secret, options and the
    white-box scores of the rounds its checkpoint holds) and the run's config."""
    from privlora.core.checkpoint import CheckpointError
    from privlora.core.config import load_config
    from privlora.federation import preflight

    if (out / AUDIT_FILE).is_file():
        raise AuditError(f"--resume: {out / AUDIT_FILE} exists: this audit already finished; nothing to resume")
    preflight.check_resume_folder(out)
    ckpt = out / "checkpoint" / "state.json"
    try:
        last_round = int(json.loads(ckpt.read_text(encoding="utf-8"))["round"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt} is damaged ({exc}); the audit cannot continue from it") from exc
    return AuditorState.load(folder, out, last_round), load_config(out / "config.toml")


def audit_record(auditor: Auditor, options: dict[str, Any], delta: float, claimed: float | None, final: dict[str, Any],
                 t0: float) -> dict[str, Any]:
    """audit.json (format privlora-audit/2): the bounds of every method, the claim they are held
    against, and (after training) the secret, the deal and the scores, so anyone can recount."""
    scores = auditor.finish_scores()
    c = auditor.canaries
    result = bounds(scores, c.included, delta, options["confidence"])
    lower = result["best"]["epsilon_lower"]
    fdp = {
        "method": "f-DP one-run audit (Mahloujifar, Melis and Chaudhuri 2024), same guesses",
        "epsilon_lower": result["best_fdp"]["epsilon_lower_fdp"],
        "best": result["best_fdp"],
        "mu_lower": result["best_gdp"]["mu_lower"],
        "epsilon_of_mu": result["best_gdp"]["epsilon_of_mu"],
        "best_gdp": result["best_gdp"],
    }
    return {
        "format": "privlora-audit/2",
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023, Theorem 5.2) and its f-DP reading (Mahloujifar, "
                  "Melis and Chaudhuri 2024), Bonferroni over method x score x guess count",
        "design": options["design"],
        "canaries": int(options["canaries"]),
        "confidence": options["confidence"],
        "delta": delta,
        "epsilon_lower": lower,
        "epsilon_claimed": claimed,
        "violation": claimed is not None and max(lower, fdp["epsilon_lower"]) > claimed,
        "best": result["best"],
        "fdp": fdp,
        "per_score": result["per_score"],
        "tests": result["tests"],
        "level_per_test": result["level_per_test"],
        "included_canaries": int(c.included.sum()),
        "whitebox_client_rounds": auditor.whitebox_rounds,
        "test_accuracy": final["test_accuracy"],
        "seconds": time.perf_counter() - t0,
        # the secret, revealed after training so that anyone can recount v from the scores
        "secret_seed": str(auditor.seed),
        "canary_client": c.client.tolist(),
        "canary_included": c.included.astype(int).tolist(),
        "scores": {k: [round(float(x), 6) for x in v] for k, v in scores.items()},
    }


def run_audit(
    cfg: ExperimentConfig | None,
    out: str | Path,
    canaries: int = DEFAULT_CANARIES,
    confidence: float = 0.95,
    design: str = DEFAULT_DESIGN,
    seed: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    auditor_dir: str | Path | None = None,
    stop_after: int | None = None,
) -> dict[str, Any] | None:
    """Run ``cfg`` with canaries, score them, write ``audit.json`` and re-render report.md.

    Returns the audit record; ``record["violation"]`` is True when the lower bound exceeds the
    claimed epsilon. ``seed`` is the secret that draws the canaries and their inclusion
    (fresh from `secrets` when None; written to audit.json after training). Until then it is
    kept, with the white-box scores so far, in ``auditor_dir`` (default: the run folder's name
    + ``.auditor``, beside it; see `AuditorState`). ``resume`` continues an interrupted audit of
    the run in ``out`` from its checkpoint (``cfg`` and every option then come from the run
    folder and the auditor's state). ``stop_after`` ends after that many rounds as if the process
    had been killed (for tests); it returns None then. A task without canaries is refused first.
    """
    from privlora.reporting.report import write_report
    from privlora.transports.inprocess import run_experiment

    out = Path(out)
    if cfg is not None:
        refuse_without_canaries(cfg)
    folder = Path(auditor_dir) if auditor_dir is not None else default_auditor_dir(out)
    if resume:
        state, cfg_used = resumed_state(out, folder)
    else:
        if not 0 < confidence < 1:
            raise AuditError(f"--confidence must be in (0, 1), found {confidence}")
        secret = secrets.randbits(63) if seed is None else int(seed)
        if int(canaries) >= 2 and cfg is not None and cfg.privacy.enabled:
            p = cfg.privacy
            target = p.budget_epsilon or (p.target_epsilon if p.noise_multiplier == 0 else None)
            if warning := canary_warning(int(canaries), cfg.privacy.delta, float(confidence), target):
                print(f"privlora: warning: {warning}", file=sys.stderr)
        state = AuditorState(folder, out, {"secret_seed": str(secret), "canaries": int(canaries), "design": design,
                                           "confidence": float(confidence)})
        cfg_used = cfg
    options = {"canaries": int(state.options["canaries"]), "design": str(state.options["design"]),
               "confidence": float(state.options["confidence"])}
    auditor = Auditor(options["canaries"], options["design"], int(state.options["secret_seed"]), state=state)

    def prepare(fed):
        auditor.prepare(fed)
        if not resume:  # the secret is on disk, outside the run folder, before anything trains
            state.save()

    t0 = time.perf_counter()
    final = run_experiment(None if resume else cfg, out, progress=progress, overwrite=overwrite, resume=resume,
                           stop_after=stop_after, prepare=prepare)
    if stop_after is not None and not final.get("total_seconds"):
        return None
    claimed = claimed_epsilon(out, np.unique(auditor.canaries.client))
    record = audit_record(auditor, options, cfg_used.privacy.delta, claimed, final, t0)
    atomic_write(out / AUDIT_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    state.remove()  # audit.json now publishes the secret and the scores
    write_report(out)
    return record
