"""Budgets and admission: no release ever takes a client past its epsilon budget.

Before each round, every client the server wants is checked against its budget *with the
release it is about to make included*: admitted only if epsilon(history + next) <= budget by the
run's tight accountant. Two sound shortcuts keep this fast for thousands of clients:

1. an integer-order RDP bound (`accounting.rdp`), which upper-bounds every accountant's true
   epsilon: if even RDP says the client fits, it fits (RDP vectors add, so this is a few numpy
   operations per client with the per-mechanism vector cached);
2. the tight accountant only for clients whose RDP bound exceeds the budget. A client that
   repeats one release every round fits iff its round count k <= k_max(release, budget),
   searched once per distinct (release, budget) and cached, so later rounds decide it by a
   comparison; other histories are cached per composition-equivalent history (`history_key`),
   so clients with identical histories cost one computation between them.

A refusal carries its reason (epsilon it would reach, and the budget). Nothing here trains,
releases or charges: the caller charges the ledger for admitted clients before they release.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .accountants import Accountant, history_key
from .mechanism import SubsampledGaussian
from .rdp import ORDERS, epsilon_from_rdp, rdp_vector


@dataclass(frozen=True)
class Decision:
    client: int
    admitted: bool
    epsilon_after: float
    """If admitted, an upper bound on the client's epsilon after this round (the RDP bound when
    that sufficed); if refused, a lower bound on what it would reach."""
    budget: float
    how: str
    """'rdp' (decided by the fast bound) or the tight accountant's name (and the round count)."""

    @property
    def reason(self) -> str:
        if self.admitted:
            return f"client {self.client}: epsilon after this round <= {self.epsilon_after:.4f} ({self.how}), within its budget {self.budget:g}"
        return f"client {self.client}: epsilon after this round would be >= {self.epsilon_after:.4f} ({self.how}), over its budget {self.budget:g}"


def delta_warning(delta: float, num_examples: int) -> str | None:
    """A warning when delta is not well below 1/n (the usual rule: delta << 1/n)."""
    if num_examples > 0 and delta > 1.0 / num_examples:
        return (
            f"delta={delta:g} is above 1/n = {1.0 / num_examples:.3g} for a client with {num_examples} records: "
            "an (epsilon, delta) guarantee then allows leaking a whole record; lower privacy.delta"
        )
    return None


class Admission:
    """Decides who may take part in the next round, given each client's history so far."""

    def __init__(self, accountant: Accountant, delta: float, budgets: Mapping[int, float]):
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1). Found {delta!r}")
        for c, b in budgets.items():
            if not (isinstance(b, (int, float)) and b > 0 and math.isfinite(b)):
                raise ValueError(f"budget of client {c} must be a finite epsilon > 0. Found {b!r}")
        self.accountant = accountant
        self.delta = delta
        self.budgets = dict(budgets)
        self._rdp: dict[int, np.ndarray] = {}
        self._hist: dict[int, list[SubsampledGaussian]] = {}
        self._kmax: dict[tuple[SubsampledGaussian, float], tuple[int, float, float]] = {}

    def record(self, client: int, mechanism: SubsampledGaussian) -> None:
        """Add a charged release to the client's history (call after the ledger append)."""
        self._hist.setdefault(client, []).append(mechanism)
        self._rdp[client] = self._rdp.get(client, np.zeros(len(ORDERS))) + rdp_vector(
            [(mechanism.noise_multiplier, mechanism.sample_rate, mechanism.steps)]
        )

    def load(self, histories: Mapping[int, Sequence[SubsampledGaussian]]) -> None:
        for c, hist in histories.items():
            for m in hist:
                self.record(c, m)

    def spent(self, client: int) -> float:
        """Epsilon spent so far by the tight accountant."""
        return self.accountant.epsilon(self._hist.get(client, []), self.delta)

    def decide(self, client: int, planned: SubsampledGaussian) -> Decision:
        if client not in self.budgets:
            raise KeyError(f"client {client} has no budget")
        budget = self.budgets[client]
        hist = self._hist.get(client, [])
        same = all(m == planned for m in hist)
        if same and (planned, budget) in self._kmax:
            return self._by_count(client, planned, budget, len(hist) + 1)
        rdp = self._rdp.get(client, np.zeros(len(ORDERS))) + rdp_vector(
            [(planned.noise_multiplier, planned.sample_rate, planned.steps)]
        )
        eps_rdp = epsilon_from_rdp(rdp, self.delta)
        if eps_rdp <= budget:
            return Decision(client, True, eps_rdp, budget, "rdp")
        if same:
            return self._by_count(client, planned, budget, len(hist) + 1)
        eps = self.accountant.epsilon(history_key([*hist, planned]), self.delta)
        return Decision(client, eps <= budget, eps, budget, self.accountant.name)

    # A client that makes the same release every round (the usual case: its sigma, q and steps
    # do not change) fits iff its number of rounds k <= k_max(release, budget), the largest k with
    # epsilon(release^k) <= budget. k_max is found once per (release, budget) by a search that
    # starts at the client's own k, with the tight accountant (epsilon grows with k), and cached:
    # later rounds decide such clients by a comparison.
    def _eps_k(self, m: SubsampledGaussian, k: int) -> float:
        return self.accountant.epsilon(((float(m.noise_multiplier), float(m.sample_rate), int(m.steps) * k),), self.delta)

    def _by_count(self, client: int, m: SubsampledGaussian, budget: float, k: int) -> Decision:
        key = (m, budget)
        if key not in self._kmax:
            if self._eps_k(m, k) <= budget:
                lo, step = k, 1  # lo fits; find a hi that does not
                while self._eps_k(m, lo + step) <= budget:
                    lo, step = lo + step, step * 2
                hi = lo + step
            else:
                hi, step = k, 1  # hi does not fit; find a lo that does (0 always does)
                while hi - step > 0 and self._eps_k(m, hi - step) > budget:
                    hi, step = hi - step, step * 2
                lo = max(0, hi - step)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._eps_k(m, mid) <= budget:
                    lo = mid
                else:
                    hi = mid
            self._kmax[key] = (lo, self._eps_k(m, lo) if lo else 0.0, self._eps_k(m, lo + 1))
        kmax, eps_fit, eps_over = self._kmax[key]
        name = self.accountant.name
        if k <= kmax:
            # epsilon(release^k) <= epsilon(release^kmax) <= budget
            return Decision(client, True, self._eps_k(m, k) if k == kmax else eps_fit, budget, f"{name}, {k} of at most {kmax} rounds")
        how = f"{name}, not even one round fits" if kmax == 0 else f"{name}, round {k} of at most {kmax}"
        return Decision(client, False, self._eps_k(m, k) if k == kmax + 1 else eps_over, budget, how)

    def admit(self, planned: Mapping[int, SubsampledGaussian]) -> tuple[list[int], list[Decision]]:
        """(admitted clients sorted, every decision) for the clients and releases in ``planned``."""
        decisions = [self.decide(c, m) for c, m in sorted(planned.items())]
        return [d.client for d in decisions if d.admitted], decisions
