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

The f-DP reading (Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential Privacy in One
Run", arXiv:2410.22235, ICML 2025) uses the same game and the same (m, r, v), and tests a whole
trade-off curve instead of one (eps, delta) pair; see `fdp_rejects` for the exact statement
implemented here and its proof. It gives two readings: `epsilon_lower_bound_fdp` (the curve of
(eps, delta)-DP: a lower bound on epsilon at delta, comparable with the claim like Theorem 5.2's)
and `gdp_lower_bound` (the Gaussian curves mu-GDP: a lower bound on mu, and the epsilon that
mu-GDP has at delta; that epsilon is a lower bound on the mechanism's epsilon only if its
trade-off curve is Gaussian, which DP-SGD's subsampled, composed mechanism is not exactly).

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

__all__ = [
    "AuditBound", "p_value", "epsilon_lower_bound", "guesses_from_scores", "lower_bound_from_scores",
    "fdp_rejects", "eps_delta_blowup_inverse", "gdp_blowup_inverse", "epsilon_lower_bound_fdp", "gdp_lower_bound",
    "gdp_epsilon",
]


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


# ---------------------------------------------------------------------------------------- f-DP
def eps_delta_blowup_inverse(eps: float, delta: float):
    """``b^{-1}`` for the trade-off curve of (eps, delta)-DP.

    The curve is f(x) = max(0, 1 - delta - e^eps x, e^-eps (1 - delta - x)); its blow-up
    b(x) = 1 - f(x) = min(1, delta + e^eps x, 1 - e^-eps (1 - delta - x)) bounds P_1[E] by
    b(P_0[E]) for every event E. The generalised inverse inf{x : b(x) >= y} is
    max(0, (y - delta) e^-eps, 1 - delta - e^eps (1 - y))."""
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0. Found {eps!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1]. Found {delta!r}")
    a, e = math.exp(-eps), math.exp(eps)

    def inverse(y: float) -> float:
        y = min(1.0, y)
        return max(0.0, (y - delta) * a, 1.0 - delta - e * (1.0 - y))

    return inverse


def gdp_blowup_inverse(mu: float):
    """``b^{-1}`` for mu-GDP (Dong, Roth and Su): f(x) = Phi(Phi^-1(1 - x) - mu), so
    b(x) = Phi(Phi^-1(x) + mu) and b^{-1}(y) = Phi(Phi^-1(y) - mu)."""
    from scipy.special import ndtr, ndtri

    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a finite number >= 0. Found {mu!r}")

    def inverse(y: float) -> float:
        y = min(1.0, y)
        if y <= 0.0:
            return 0.0
        return float(ndtr(ndtri(y) - mu))

    return inverse


def fdp_rejects(m: int, r: int, v: int, blowup_inverse, alpha: float) -> bool:
    """True when v or more correct guesses out of r has probability below ``alpha`` under every
    mechanism that is f-DP for the curve whose blow-up has the inverse ``blowup_inverse``.

    Statement (the k = 2 case of Mahloujifar, Melis and Chaudhuri 2024; checked here by our own
    proof). Assumptions: the m canary bits S are i.i.d. fair coins; conditionally on the other
    m - 1 bits, the output with canary i in and with it out are f-indistinguishable in both
    directions (P_in[E] <= b(P_out[E]) and P_out[E] <= b(P_in[E]) for every event E, with
    b = 1 - f concave and nondecreasing: true for every symmetric trade-off curve f); the
    auditor makes exactly r guesses, a function of the output only; C counts the correct ones.

    Write R_i = E[C 1{C >= i}] / m and H_i = E[(r - C) 1{C >= i}] / m (correct and wrong
    guesses, on outcomes with at least i correct), so R_0 + H_0 = r / m. Then:

    1. H_{i-1} >= b^{-1}(R_i) for i = 1..r. Proof: fix canary j and the other bits; for a guess
       value g let E_g = {j is guessed g and the other guesses have >= i - 1 correct}. "j right
       and C >= i" is E_g under S_j = g, "j wrong and C >= i - 1" is E_g under S_j = 1 - g, and
       P_{S_j = g}[E_g] <= b(P_{S_j = 1-g}[E_g]). Average over j, g and the other bits (all
       with equal weight) and use the concavity of b (Jensen): R_i <= b(H_{i-1}).
    2. R_i - R_{i+1} = i P[C = i] / m and H_i - H_{i+1} = (r - i) P[C = i] / m, so
       R_i = R_{i+1} + i / (r - i) (H_i - H_{i+1}).
    3. If P[C >= v] >= alpha, moving all the mass of {C > v} down to v keeps 1 (both sides of
       every constraint only move the right way) and gives R_v = v a / m, H_v = (r - v) a / m
       with a >= alpha. From there, h_v = (r - v) alpha / m, rho_v = v alpha / m and, for
       i = v - 1..0, h_i = max(h_{i+1}, b^{-1}(rho_{i+1})),
       rho_i = rho_{i+1} + i / (r - i) (h_i - h_{i+1}) satisfy H_i >= h_i and
       R_i - rho_i >= i / (r - i) (H_i - h_i) >= 0 (induction on i downwards; the weight
       i / (r - i) grows with i). So rho_0 + h_0 <= R_0 + H_0 = r / m.

    Hence rho_0 + h_0 > r / m proves P[C >= v] < alpha: the curve is rejected at level alpha.
    Conversely, when rho_0 + h_0 <= r / m the sequence is itself a distribution of C (plus
    mass at 0) meeting 1 and 2, so this is the exact largest P[C >= v] that 1 and 2 allow.
    Rejection is monotone: in v (the constraint set is the same and P[C >= v] falls with v),
    in alpha, and in the curve (a smaller b^{-1}, i.e. a weaker claim, rejects less).
    """
    _check_counts(m, r, v)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1]. Found {alpha!r}")
    if v == 0:
        return False
    total = r / m
    rho, h = v * alpha / m, (r - v) * alpha / m
    for i in range(v - 1, -1, -1):
        h_new = max(h, blowup_inverse(rho))
        if h_new == h:  # nothing changes any more: rho_i = rho_{i+1}, h_i = h_{i+1}
            break
        rho += i / (r - i) * (h_new - h)
        h = h_new
        if rho + h > total * (1 + 1e-12):  # rho_i + h_i <= R_i + H_i <= r / m already fails
            return True
    return rho + h > total * (1 + 1e-12)


def _largest_rejected(rejects, hi: float, tol: float) -> float:
    """sup{x >= 0 : rejects(x)} for a predicate true on an interval [0, x*) (0 if rejects(0)
    is false); the lower end of the last bracket, so never above x*. Beyond ``hi`` the search
    stops and returns the last power of two rejected (a bound, just not the largest)."""
    if not rejects(0.0):
        return 0.0
    lo, up = 0.0, 1.0
    while rejects(up):
        lo, up = up, 2.0 * up
        if up > hi:
            return lo
    while up - lo > tol:
        mid = 0.5 * (lo + up)
        if rejects(mid):
            lo = mid
        else:
            up = mid
    return lo


def epsilon_lower_bound_fdp(m: int, r: int, v: int, delta: float, confidence: float = 0.95, tol: float = 1e-6) -> float:
    """The largest eps whose (eps, delta)-DP curve `fdp_rejects` at level 1 - confidence.

    A lower bound on epsilon at delta, at that confidence, under the assumptions of
    `fdp_rejects`; the same kind of statement as `epsilon_lower_bound`, by another analysis."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Found {confidence!r}")
    alpha = 1.0 - confidence
    return _largest_rejected(lambda e: fdp_rejects(m, r, v, eps_delta_blowup_inverse(e, delta), alpha), 1e3, tol)


def gdp_lower_bound(m: int, r: int, v: int, confidence: float = 0.95, tol: float = 1e-6) -> float:
    """The largest mu whose mu-GDP curve `fdp_rejects` at level 1 - confidence: at that
    confidence, the mechanism is not mu-GDP for any mu below it."""
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Found {confidence!r}")
    alpha = 1.0 - confidence
    return _largest_rejected(lambda mu: fdp_rejects(m, r, v, gdp_blowup_inverse(mu), alpha), 50.0, tol)


def gdp_delta(mu: float, eps: float) -> float:
    """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy.special import ndtr

    if mu == 0:
        return 0.0
    return float(ndtr(-eps / mu + mu / 2) - math.exp(eps) * ndtr(-eps / mu - mu / 2))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at delta (0 when mu-GDP is (0, delta)-DP), by bisection on the
    exact delta(eps) above, which falls with eps."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta!r}")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > delta:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        if gdp_delta(mu, mid) > delta:
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
