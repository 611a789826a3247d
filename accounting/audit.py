"""Empirical privacy auditing in one training run: from guesses to a lower bound on epsilon.

This module holds only the mathematics (numpy and scipy; never torch), so that an auditor can
recompute a reported bound from the four numbers an audit publishes: m, r, v and delta.

The game (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023). Take m canaries. A secret, uniformly random S in {-1, +1}^m decides, for each
canary independently with probability 1/2, whether it is included in the training data
(S_i = +1) or not (S_i = -1). The mechanism M runs once. From its output alone (and the public
canaries) the auditor makes guesses T in {-1, 0, +1}^m: +1 "in", -1 "out", 0 abstain, with
r = ||T||_1 guesses in all (r fixed in advance). The number of correct guesses is
W = sum_i max(0, T_i S_i).

The bound (their Theorem 5.2, with the computation of their Appendix D). If M is (eps, delta)-DP
with respect to adding or removing any one canary, then for every integer v,

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,

where f(k) = P[Binomial(r, q) >= k] and q = e^eps / (1 + e^eps) is the accuracy of eps-DP
randomized response. The right side is the p-value of observing v correct guesses under the
null hypothesis "M is (eps, delta)-DP"; it increases with eps. The audit's lower bound at
confidence c is

    eps_lower = sup { eps >= 0 : p_value(m, r, v, eps, delta) < 1 - c },

(0 when even eps = 0 is not rejected). With probability at least c over S, a mechanism that
really is (eps, delta)-DP gives eps_lower <= eps. So an eps_lower above the accountant's epsilon
proves, at confidence c, that the training did not do what the ledger claims (a bug or a wrong
analysis). A small eps_lower proves nothing about privacy: it only says this attack found
no more.

Choosing r after seeing the scores is not covered by the theorem. `lower_bound_from_scores`
therefore tries a fixed list of r values given before the scores are seen and applies a
Bonferroni correction: each candidate is tested at level (1 - c) / len(candidates), so the
largest bound over the candidates holds at confidence c (a union bound over the candidates).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["AuditBound", "p_value", "epsilon_lower_bound", "guesses_from_scores", "lower_bound_from_scores"]


def _check_counts(m: int, r: int, v: int) -> None:
    for name, val in (("m", m), ("r", r), ("v", v)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{name} must be an int. Found {val!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m (correct guesses <= guesses <= canaries). Found m={m}, r={r}, v={v}")


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of v or more correct guesses out of r, m canaries, if M were (eps, delta)-DP.

    ``f(v) + 2 m delta max_{i=1..v} (f(v-i) - f(v)) / i`` capped at 1, with
    ``f(k) = P[Binomial(r, e^eps/(1+e^eps)) >= k]`` (Steinke, Nasr and Jagielski 2023,
    Theorem 5.2). ``f(v - i) - f(v) = P[v - i <= Binomial < v]`` is a sum of i probability masses.
    """
    from scipy import stats

    _check_counts(m, r, v)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0. Found {eps!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1]. Found {delta!r}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[B >= v]
    if delta == 0 or v == 0:
        return min(1.0, tail)
    # masses P[B = v-1], P[B = v-2], ..., P[B = 0]; their running sums are f(v-i) - f(v)
    masses = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)
    worst = float(np.max(np.cumsum(masses) / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-6) -> float:
    """The largest eps whose p-value stays below ``1 - confidence`` (0 if there is none).

    Found by bisection on eps (the p-value increases with eps), to within ``tol``; the
    returned value is the lower end of the final bracket, so it is never above the exact bound.
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Found {confidence!r}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:  # v = r with a huge r: the bound is beyond any meaningful epsilon
            return lo
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guesses_from_scores(scores: Sequence[float], k_in: int, k_out: int) -> np.ndarray:
    """T in {-1, 0, +1}^m: +1 for the ``k_in`` highest scores, -1 for the ``k_out`` lowest, 0 else.

    Ties are broken by canary index (a fixed rule that does not look at the secret)."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.shape[0]
    if k_in < 0 or k_out < 0 or k_in + k_out > m:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= m = {m}. Found k_in={k_in}, k_out={k_out}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores must be finite; {int(np.sum(~np.isfinite(s)))} of {m} are not")
    order = np.argsort(-s, kind="stable")
    t = np.zeros(m, dtype=np.int64)
    t[order[:k_in]] = 1
    if k_out:
        t[order[m - k_out:]] = -1
    return t


@dataclass(frozen=True)
class AuditBound:
    """The outcome of one audit: enough to recompute ``epsilon_lower`` with `epsilon_lower_bound`
    (at level ``confidence`` divided among ``candidates``)."""

    epsilon_lower: float
    """Lower bound on epsilon at ``confidence`` (delta as below), Bonferroni over the candidates."""
    m: int
    r: int
    v: int
    k_in: int
    k_out: int
    delta: float
    confidence: float
    candidates: int
    """How many (k_in, k_out) choices were tried; each was tested at (1 - confidence) / candidates."""
    per_candidate: tuple[tuple[int, int, int, float], ...] = ()
    """(k_in, k_out, v, eps_lower) for each candidate tried."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_candidate"] = [list(c) for c in self.per_candidate]
        return d


def default_candidates(m: int) -> list[tuple[int, int]]:
    """Guess counts fixed before any score is seen: r in {m/20, m/10, m/4, m/2, m}, half
    "in" and half "out" guesses (r = m means no abstention)."""
    out = []
    for frac in (0.05, 0.1, 0.25, 0.5, 1.0):
        r = max(2, int(round(frac * m)))
        r -= r % 2
        pair = (r // 2, r // 2)
        if r <= m and pair not in out:
            out.append(pair)
    return out


def lower_bound_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    candidates: Sequence[tuple[int, int]] | None = None,
) -> AuditBound:
    """Guess from scores (higher = more likely included), count correct guesses, bound epsilon.

    For each (k_in, k_out) in ``candidates`` (default `default_candidates`): guess "in" for the
    k_in highest and "out" for the k_out lowest scores, count v, and compute the bound at
    confidence ``1 - (1 - confidence) / len(candidates)``. Returns the largest of those bounds,
    which holds at ``confidence`` by the union bound.
    """
    inc = np.asarray(included, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if inc.shape != s.shape or inc.ndim != 1:
        raise ValueError(f"scores and included must be 1-D of the same length. Found {s.shape} and {inc.shape}")
    m = int(inc.shape[0])
    cands = list(candidates) if candidates is not None else default_candidates(m)
    if not cands:
        raise ValueError("candidates is empty; give at least one (k_in, k_out)")
    level = 1.0 - (1.0 - confidence) / len(cands)
    truth = np.where(inc, 1, -1)
    rows = []
    for k_in, k_out in cands:
        t = guesses_from_scores(s, k_in, k_out)
        v = int(np.sum(t * truth == 1))
        rows.append((int(k_in), int(k_out), v, epsilon_lower_bound(m, int(k_in + k_out), v, delta, level)))
    best = max(rows, key=lambda row: row[3])
    return AuditBound(
        epsilon_lower=best[3], m=m, r=best[0] + best[1], v=best[2], k_in=best[0], k_out=best[1],
        delta=float(delta), confidence=float(confidence), candidates=len(cands), per_candidate=tuple(rows),
    )
