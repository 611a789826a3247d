"""`privlora audit`: an empirical lower bound on epsilon beside the accountant's upper bound.

One training run (Steinke, Nasr and Jagielski 2023; the mathematics is in `accounting.audit`):

1. **Canaries.** m canaries are made and dealt round-robin (in a seeded order) to the clients.
   A secret seed draws, for each canary independently with probability 1/2, whether it is put
   into its client's training data. Canaries never enter the held-out evaluation set, and the
   secret is written to ``audit.json`` only after training. Designs (``--design``):

   - ``tokens``: a crafted input: ``[CLS]``, 24 tokens drawn uniformly from the vocabulary
     (special tokens excluded), ``[SEP]``, with a uniformly random label. Unlike anything in
     the data, so its gradient points where little else does.
   - ``mislabelled``: one of the client's own training examples, taken out of its data, with its
     label changed to another class (so "out" canaries really are out).

2. **Training**: the config runs unchanged (`simulation.run_experiment` with a ``prepare``
   hook that inserts the canaries), ledger, noise calibration and all.

3. **Scores** (higher = "looks included"); each canary is scored against what its own
   client released:

   - ``whitebox`` (gradient alignment): for every round t in which client k trained, with
     theta_t the model it started from (public: the broadcast) and Delta_{k,t} its local change
     (a function of its released update and the broadcast), the score of canary j is
     ``sum_t <u_j(theta_t) - mean_{l: y_l = y_j} u_l(theta_t), -Delta_{k,t}> / ||Delta_{k,t}||``
     where u_j is the canary's loss gradient over the trained parameters, normalised to length
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

4. **Guesses and bound**: for each score, "in" for the k highest, "out" for the k lowest, at a
   few guess counts fixed by m alone (`accounting.audit.default_candidates`); every (score,
   count) pair is tested at (1 - confidence) / (number of pairs), so the largest bound holds at
   the stated confidence.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from accounting.audit import (
    default_candidates, epsilon_lower_bound, epsilon_lower_bound_fdp, gdp_epsilon, gdp_lower_bound, guesses_from_scores,
)

from .checkpoint import atomic_write
from .config import ExperimentConfig

AUDIT_FILE = "audit.json"
DESIGNS = ("tokens", "mislabelled")
SCORES = ("whitebox", "blackbox")
CANARY_TOKENS = 24


class AuditError(ValueError):
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


def token_canaries(m: int, tokenizer, max_length: int, num_labels: int, seed: int):
    """m random token sequences: [CLS] + CANARY_TOKENS uniform non-special tokens + [SEP]."""
    import torch

    length = min(CANARY_TOKENS, max_length - 2)
    if length < 1:
        raise AuditError(f"model.max_length = {max_length} leaves no room for a canary's tokens; use at least 8")
    special = set(tokenizer.all_special_ids)
    vocab = np.array([i for i in range(len(tokenizer)) if i not in special])
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # BERT wordpieces: leave out [unusedN]
        names = tokenizer.convert_ids_to_tokens(vocab.tolist())
        vocab = vocab[[not (n.startswith("[") and n.endswith("]")) for n in names]]
    rng = _rng(seed, 3)
    ids = torch.zeros((m, max_length), dtype=torch.long)
    if tokenizer.pad_token_id:
        ids.fill_(tokenizer.pad_token_id)
    mask = torch.zeros((m, max_length), dtype=torch.long)
    body = rng.choice(vocab, size=(m, length))
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    col = 0
    if cls is not None:
        ids[:, 0] = cls
        col = 1
    ids[:, col : col + length] = torch.from_numpy(body)
    end = col + length
    if sep is not None:
        ids[:, end] = sep
        end += 1
    mask[:, :end] = 1
    labels = torch.from_numpy(rng.integers(0, num_labels, size=m)).long()
    return ids, mask, labels


def _trim(ids, mask):
    width = max(1, int(mask.sum(dim=1).max()))
    return ids[:, :width], mask[:, :width]


def _losses(model, ids, mask, labels, batch: int = 64) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch):
            i, mk = _trim(ids[s : s + batch], mask[s : s + batch])
            logits = model(input_ids=i, attention_mask=mk).logits
            out.append(F.cross_entropy(logits, labels[s : s + batch], reduction="none").float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def unit_gradients(model, params, ids, mask, labels):
    """(n, D) matrix: each example's loss gradient over ``params`` (flattened), of norm 1."""
    import torch
    import torch.nn.functional as F

    model.eval()
    rows = []
    for j in range(ids.shape[0]):
        i, mk = _trim(ids[j : j + 1], mask[j : j + 1])
        with torch.enable_grad():
            loss = F.cross_entropy(model(input_ids=i, attention_mask=mk).logits, labels[j : j + 1])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gr is None else gr).flatten() for p, gr in zip(params, grads)])
        rows.append(g / g.norm().clamp_min(1e-12))
    return torch.stack(rows)


class Auditor:
    """Inserts the canaries (as a ``prepare`` hook) and scores them after the run."""

    def __init__(self, m: int, design: str, seed: int):
        if design not in DESIGNS:
            raise AuditError(f"--design: {design!r} is not one of {', '.join(DESIGNS)}")
        if int(m) < 2:
            raise AuditError(f"--canaries: need at least 2 canaries (1000 is a good start), found {m}")
        self.m, self.design, self.seed = int(m), design, int(seed)
        self.canaries: CanarySet | None = None
        self.fed = None
        self.whitebox_rounds = 0

    # ------------------------------------------------------------------ before training
    def prepare(self, fed) -> None:
        import torch
        from torch.utils.data import TensorDataset

        from .models import load_tokenizer

        self.fed = fed
        cfg = fed.cfg
        k = len(fed.clients)
        client, included = deal(self.m, k, self.seed)
        num_labels = len(fed.label_names)
        if self.design == "tokens":
            ids, mask, labels = token_canaries(self.m, load_tokenizer(cfg.model.path), cfg.model.max_length, num_labels, self.seed)
        parts = {}
        rng = _rng(self.seed, 4)
        for c in fed.clients:
            own = np.flatnonzero(client == c.client_id)
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
                shift = torch.from_numpy(rng.integers(1, num_labels, size=len(own))).long()
                parts[c.client_id] = (data[0][take], data[1][take], (data[2][take] + shift) % num_labels)
            else:
                sel = torch.from_numpy(own)
                parts[c.client_id] = (ids[sel], mask[sel], labels[sel])
            inc = torch.from_numpy(included[own])
            cid, cmask, clab = parts[c.client_id]
            c.dataset = TensorDataset(
                torch.cat([data[0][keep], cid[inc]]), torch.cat([data[1][keep], cmask[inc]]), torch.cat([data[2][keep], clab[inc]])
            )
            c.num_examples = len(c.dataset)
            fed.client_sizes[c.client_id] = c.num_examples
            self._observe(c)
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
        self.loss_before = _losses(fed.server.global_model, self.canaries.ids, self.canaries.mask, self.canaries.labels)

    def _observe(self, client) -> None:
        """Wrap this client's ``build_model`` and ``train`` to see where each round started and
        what it released; score its canaries right after it trains."""
        build, train = client.build_model, client.train
        slot: dict[str, Any] = {}

        def build_model(payload, rank):
            model = build(payload, rank)
            slot["model"] = model
            slot["start"] = [(n, p.detach().clone()) for n, p in model.named_parameters() if p.requires_grad]
            return model

        def observed_train(payload, rnd, rank, progress=None):
            result = train(payload, rnd, rank, progress=progress)
            self._score_round(client.client_id, slot.pop("model"), slot.pop("start"))
            return result

        client.build_model = build_model
        client.train = observed_train

    def _score_round(self, client_id: int, model, start) -> None:
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
        u = unit_gradients(model, params, c.ids[sel], c.mask[sel], labels)
        for y in labels.unique():  # centre within each label: removes the direction a label shares
            same = labels == y
            u[same] = u[same] - u[same].mean(dim=0, keepdim=True)
        c.scores["whitebox"][own] += (u @ (-change)).numpy() / norm
        self.whitebox_rounds += 1

    # ------------------------------------------------------------------ after training
    def finish_scores(self) -> dict[str, np.ndarray]:
        c = self.canaries
        after = _losses(self.fed.server.global_model, c.ids, c.mask, c.labels)
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


def claimed_epsilon(out: Path, clients_with_canaries) -> float | None:
    """The largest epsilon the ledger charges any client holding a canary (None without DP)."""
    from .report import read_metrics

    rows = [r for r in read_metrics(out) if "stopped" not in r]
    eps = rows[-1].get("epsilon") or {}
    if not eps:
        return None
    return max(float(eps.get(str(int(k)), 0.0)) for k in clients_with_canaries)


def run_audit(
    cfg: ExperimentConfig,
    out: str | Path,
    canaries: int = 1000,
    confidence: float = 0.95,
    design: str = "tokens",
    seed: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` with canaries, score them, write ``audit.json`` and re-render report.md.

    Returns the audit record; ``record["violation"]`` is True when the lower bound exceeds the
    claimed epsilon. ``seed`` is the secret that draws the canaries and their inclusion
    (fresh from `secrets` when None; written to audit.json after training).
    """
    from .report import write_report
    from .simulation import run_experiment

    if not 0 < confidence < 1:
        raise AuditError(f"--confidence must be in (0, 1), found {confidence}")
    secret = secrets.randbits(63) if seed is None else int(seed)
    auditor = Auditor(canaries, design, secret)
    t0 = time.perf_counter()
    final = run_experiment(cfg, out, progress=progress, overwrite=overwrite, prepare=auditor.prepare)
    out = Path(out)
    scores = auditor.finish_scores()
    c = auditor.canaries
    delta = cfg.privacy.delta
    result = bounds(scores, c.included, delta, confidence)
    claimed = claimed_epsilon(out, np.unique(c.client))
    lower = result["best"]["epsilon_lower"]
    fdp = {
        "method": "f-DP one-run audit (Mahloujifar, Melis and Chaudhuri 2024), same guesses",
        "epsilon_lower": result["best_fdp"]["epsilon_lower_fdp"],
        "best": result["best_fdp"],
        "mu_lower": result["best_gdp"]["mu_lower"],
        "epsilon_of_mu": result["best_gdp"]["epsilon_of_mu"],
        "best_gdp": result["best_gdp"],
    }
    record = {
        "format": "privlora-audit/2",
        "method": "one-run audit (Steinke, Nasr and Jagielski 2023, Theorem 5.2) and its f-DP reading (Mahloujifar, "
                  "Melis and Chaudhuri 2024), Bonferroni over method x score x guess count",
        "design": design,
        "canaries": int(canaries),
        "confidence": confidence,
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
        "secret_seed": str(secret),
        "canary_client": c.client.tolist(),
        "canary_included": c.included.astype(int).tolist(),
        "scores": {k: [round(float(x), 6) for x in v] for k, v in scores.items()},
    }
    atomic_write(out / AUDIT_FILE, json.dumps(record, indent=1, sort_keys=True) + "\n")
    write_report(out)
    return record


def sound_lower(record: dict[str, Any]) -> tuple[float, str]:
    """The largest epsilon lower bound of the record that is a statement about (eps, delta)-DP
    (Theorem 5.2, or the f-DP reading of the (eps, delta) curve), and which one it is."""
    fdp = (record.get("fdp") or {}).get("epsilon_lower")
    if fdp is not None and fdp > record["epsilon_lower"]:
        return fdp, "f-DP analysis"
    return record["epsilon_lower"], "Theorem 5.2"


def verdict(record: dict[str, Any]) -> str:
    """One plain sentence on what this audit shows."""
    claimed, conf = record["epsilon_claimed"], record["confidence"]
    lower, how = sound_lower(record)
    if claimed is None:
        return (f"No differential privacy was claimed for this run; the audit shows its leakage is at least "
                f"ε = {lower:.2f} (at {conf:.0%} confidence, δ = {record['delta']:g}, {how}).")
    if record["violation"]:
        return (f"PRIVACY CLAIM CONTRADICTED: the empirical lower bound ε ≥ {lower:.3f} ({how}) exceeds the claimed "
                f"ε = {claimed:.3f} (at {conf:.0%} confidence, δ = {record['delta']:g}). Training did not do what the "
                "ledger records: look for noise, clipping or sampling that differ from the charged mechanism, or a wrong "
                "accountant.")
    return (f"The empirical lower bound ε ≥ {lower:.3f} ({how}) is below the claimed ε = {claimed:.3f}: no contradiction "
            "found. This does not prove the run private; a stronger attack could give a higher lower bound.")


def render_audit_section(out: Path) -> list[str]:
    """The report.md lines for a run folder's audit.json (none when there is none)."""
    path = Path(out) / AUDIT_FILE
    if not path.is_file():
        return []
    a = json.loads(path.read_text(encoding="utf-8"))
    best = a["best"]
    fdp = a.get("fdp")
    claimed = "none (no DP)" if a["epsilon_claimed"] is None else f"{a['epsilon_claimed']:.3f} (the ledger's largest over clients holding canaries)"
    lines = [
        "## Privacy audit (empirical lower bound)", "",
        f"- Method: {a['method']}; `privlora audit` with {a['canaries']} **{a['design']}** canaries, each in its client's "
        f"training data with probability 1/2 ({a['included_canaries']} were); never in the evaluation set.",
        f"- **Lower bound ε ≥ {a['epsilon_lower']:.3f}** (Theorem 5.2) at {a['confidence']:.0%} confidence, δ = {a['delta']:g}; "
        f"upper bound claimed by the accountant: ε = {claimed}.",
        f"- From the **{best['score']}** score: r = {best['r']} guesses ({best['k_in']} \"in\", {best['k_out']} \"out\"), "
        f"v = {best['v']} correct, m = {a['canaries']}; {a['tests']} (method, score, guess count) tests, each at "
        f"confidence {a['level_per_test']:.4f}, so every bound here holds at {a['confidence']:.0%} together.",
    ]
    if fdp:
        fb, gb = fdp["best"], fdp["best_gdp"]
        eps_mu = "" if fdp["epsilon_of_mu"] is None else f", whose ε at δ = {a['delta']:g} is {fdp['epsilon_of_mu']:.3f}"
        lines += [
            f"- f-DP reading (Mahloujifar, Melis and Chaudhuri 2024), same guesses: **ε ≥ {fdp['epsilon_lower']:.3f}** "
            f"for the (ε, δ)-DP curve ({fb['score']}, r = {fb['r']}, v = {fb['v']}); the mechanism is not μ-GDP for "
            f"μ < **{fdp['mu_lower']:.3f}** ({gb['score']}, r = {gb['r']}, v = {gb['v']}){eps_mu}. That last ε bounds "
            "the mechanism's ε only if its trade-off curve is Gaussian, which DP-SGD's is not exactly: it is read beside "
            "the claim, never against it.",
        ]
    lines += [
        "",
        "| score | r | v | ε lower (Thm 5.2) | ε lower (f-DP) | μ lower (f-DP) |", "|---|---|---|---|---|---|",
    ]
    for name, s in a["per_score"].items():
        b = s["best"]
        cands = s["candidates"]
        f = max((c.get("epsilon_lower_fdp", 0.0) for c in cands), default=0.0)
        mu = max((c.get("mu_lower", 0.0) for c in cands), default=0.0)
        lines.append(f"| {name} | {b['r']} | {b['v']} | {b['epsilon_lower']:.3f} | {f:.3f} | {mu:.3f} |")
    lines += [
        "",
        verdict(a),
        "",
        "What this does and does not show: a lower bound above the claimed ε proves (at the stated confidence) that the "
        "training or its accounting is broken; a lower bound below it proves nothing about privacy, because a weak "
        "attack gives a low bound on a leaking model too. The audit tests record-level DP within each client, the "
        "unit privlora claims. A client's Poisson sample rate depends on its dataset size, and so by at most a rounding "
        "step on how many of its canaries were included; the bound assumes fixed mechanism parameters.",
        "",
    ]
    return lines
