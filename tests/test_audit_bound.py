"""The one-run audit bound (accounting.audit) against values computed here from the formula."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from accounting.audit import default_candidates, epsilon_lower_bound, guesses_from_scores, lower_bound_from_scores, p_value


def reference_p_value(m, r, v, eps, delta):
    """Theorem 5.2 of Steinke, Nasr and Jagielski (2023) written out term by term with
    binomial CDFs: f(k) = P[Bin(r, q) >= k], p = f(v) + 2 m delta max_i (f(v-i) - f(v)) / i."""
    q = math.exp(eps) / (1.0 + math.exp(eps))

    def f(k):
        return 1.0 if k <= 0 else float(stats.binom.sf(k - 1, r, q))

    extra = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, f(v) + 2 * m * delta * extra)


def reference_bound(m, r, v, delta, confidence):
    alpha = 1 - confidence
    g = lambda e: reference_p_value(m, r, v, e, delta) - alpha  # noqa: E731
    if g(0.0) >= 0:
        return 0.0
    return optimize.brentq(g, 0.0, 60.0, xtol=1e-10)


@pytest.mark.parametrize("r", [10, 50, 100, 500, 2000])
def test_all_correct_without_delta_matches_the_closed_form(r):
    # v = r, delta = 0: p = q^r, so the bound solves q = alpha^(1/r), eps = log(q / (1 - q))
    q = 0.05 ** (1.0 / r)
    expected = math.log(q / (1 - q))
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(expected, abs=1e-5)


def test_all_correct_bound_grows_with_r_as_the_formula_says():
    values = [epsilon_lower_bound(2000, r, r, 1e-5, 0.95) for r in (10, 50, 100, 500, 1000, 2000)]
    refs = [reference_bound(2000, r, r, 1e-5, 0.95) for r in (10, 50, 100, 500, 1000, 2000)]
    assert values == pytest.approx(refs, abs=1e-5)
    assert all(b > a for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("m, r, v, delta", [
    (1000, 1000, 800, 1e-5), (1000, 200, 190, 1e-5), (500, 100, 70, 1e-4), (2000, 400, 400, 1e-6),
    (100, 100, 60, 0.0), (1000, 50, 50, 1e-3),
])
def test_p_value_and_bound_match_the_theorem_written_independently(m, r, v, delta):
    for eps in (0.0, 0.3, 1.0, 2.5, 5.0):
        assert p_value(m, r, v, eps, delta) == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)
    assert epsilon_lower_bound(m, r, v, delta, 0.95) == pytest.approx(reference_bound(m, r, v, delta, 0.95), abs=1e-5)


def test_bound_is_zero_when_guessing_is_no_better_than_chance():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-5, 0.95) == 0.0
    assert epsilon_lower_bound(1000, 100, 0, 1e-5, 0.95) == 0.0


def test_delta_term_lowers_the_bound():
    # 2 m delta is the price of approximate DP: with m delta large, the same guesses prove less
    assert epsilon_lower_bound(2000, 200, 200, 1e-3, 0.95) < epsilon_lower_bound(2000, 200, 200, 0.0, 0.95)


def test_bad_counts_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match="v=11"):
        p_value(100, 10, 11, 1.0, 1e-5)
    with pytest.raises(TypeError, match="r must be an int"):
        epsilon_lower_bound(100, 10.0, 5, 1e-5)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(100, 10, 5, 1e-5, confidence=1.0)


def test_guesses_take_the_highest_as_in_and_the_lowest_as_out():
    t = guesses_from_scores([0.1, 5.0, -3.0, 2.0, 0.0], k_in=2, k_out=1)
    assert t.tolist() == [0, 1, -1, 1, 0]


def test_from_scores_counts_correct_guesses_and_applies_bonferroni():
    included = np.array([True, False] * 50)
    scores = np.where(included, 1.0, -1.0)  # perfect separation
    res = lower_bound_from_scores(scores, included, delta=1e-5, confidence=0.95, candidates=[(10, 10), (50, 50)])
    assert res.v == res.r == 100 and res.candidates == 2
    # the best candidate is tested at 1 - 0.05 / 2
    assert res.epsilon_lower == pytest.approx(reference_bound(100, 100, 100, 1e-5, 0.975), abs=1e-5)
    assert res.per_candidate[0][2] == 20


def test_default_candidates_are_fixed_by_m_alone():
    assert default_candidates(1000) == [(25, 25), (50, 50), (125, 125), (250, 250), (500, 500)]


def test_randomized_response_at_epsilon_is_never_caught_above_it_too_often():
    """Soundness: an exactly eps-DP mechanism (randomized response on each canary's bit) gives a
    bound above eps in at most 1 - confidence of the runs, here 5% of 400 (binomial slack)."""
    rng = np.random.default_rng(7)
    eps, m, trials = 1.0, 400, 400
    q = math.exp(eps) / (1 + math.exp(eps))
    above = 0
    for _ in range(trials):
        s = rng.random(m) < 0.5
        out = np.where(rng.random(m) < q, s, ~s)  # eps-DP randomized response of each bit
        scores = np.where(out, 1.0, -1.0) + 1e-9 * rng.standard_normal(m)
        above += lower_bound_from_scores(scores, s, delta=0.0, confidence=0.95, candidates=[(200, 200)]).epsilon_lower > eps
    assert above <= stats.binom.ppf(0.999, trials, 0.05)
    # and the attack has power: a strongly leaking mechanism (eps 4) is caught above 1
    q4 = math.exp(4) / (1 + math.exp(4))
    s = rng.random(m) < 0.5
    out = np.where(rng.random(m) < q4, s, ~s)
    assert lower_bound_from_scores(np.where(out, 1.0, -1.0), s, 0.0, 0.95, [(200, 200)]).epsilon_lower > 2.0


def test_audit_math_does_not_import_torch():
    code = "import sys, accounting.audit; print(sorted(m for m in ('torch', 'secagg', 'privlora') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the f-DP reading
def lp_largest_tail(m, r, v, eps, delta):
    """The largest P[C >= v] over distributions of C in {0..r} meeting R_i <= b(H_{i-1}),
    i = 1..r, for the (eps, delta)-DP blow-up b(x) = min(1, delta + e^eps x, 1 - e^-eps (1 -
    delta - x)): a linear program, solved by scipy's HiGHS (not by the recursion under test)."""
    from scipy.optimize import linprog

    j = np.arange(r + 1)
    rows, rhs = [], []
    for i in range(1, r + 1):
        R = np.where(j >= i, j, 0) / m                 # R_i as a linear function of p
        H = np.where(j >= i - 1, r - j, 0) / m         # H_{i-1}
        rows.append(R - math.exp(eps) * H); rhs.append(delta)
        rows.append(R - math.exp(-eps) * H); rhs.append(1 - math.exp(-eps) * (1 - delta))
    res = linprog(-(j >= v).astype(float), A_ub=np.array(rows), b_ub=np.array(rhs), A_eq=np.ones((1, r + 1)), b_eq=[1.0],
                  bounds=[(0, None)] * (r + 1), method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (10, 10, 8, 0.5, 1e-3), (10, 6, 6, 1.0, 0.0), (20, 12, 10, 0.8, 1e-2), (30, 30, 21, 0.3, 1e-4), (8, 8, 8, 2.0, 0.05),
])
def test_fdp_rejects_exactly_the_levels_the_linear_program_excludes(m, r, v, eps, delta):
    from accounting.audit import eps_delta_blowup_inverse, fdp_rejects

    top = lp_largest_tail(m, r, v, eps, delta)
    assert 0 < top < 1
    inv = eps_delta_blowup_inverse(eps, delta)
    assert fdp_rejects(m, r, v, inv, top * (1 + 1e-5) + 1e-9)
    assert not fdp_rejects(m, r, v, inv, top * (1 - 1e-5))


@pytest.mark.parametrize("m, mu", [(6, 0.5), (10, 1.0), (25, 2.0), (40, 0.3)])
def test_a_gaussian_mechanism_is_never_rejected_at_its_own_exact_tail(m, mu):
    """Canary i's output is mu S_i + N(0, 1) (exactly mu-GDP in each canary); guessing "in"
    above mu / 2 makes C ~ Binomial(m, Phi(mu / 2)) exactly. Soundness: at alpha = P[C >= c]
    (enumerated from the binomial) the mu-GDP curve is never rejected. Not vacuous either: no
    mu-GDP mechanism gets all m right with probability 1/2 here (the largest allowed, found by
    bisection when this test was written, is 0.09, 0.12, 0.28 and 9e-7 of the four cases)."""
    from accounting.audit import fdp_rejects, gdp_blowup_inverse

    p = stats.norm.cdf(mu / 2)
    for c in range(1, m + 1):
        tail = float(sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(c, m + 1)))
        assert not fdp_rejects(m, m, c, gdp_blowup_inverse(mu), tail)
    assert fdp_rejects(m, m, m, gdp_blowup_inverse(mu), 0.5)


def test_at_delta_zero_the_fdp_bound_is_never_above_theorem_5_2():
    """At delta = 0 Theorem 5.2's p-value is P[Bin(r, q) >= v], the exact tail of eps-DP
    randomized response, an (eps, 0)-DP mechanism: a sound f-DP test cannot reject it there, so
    its epsilon bound cannot be higher."""
    from accounting.audit import epsilon_lower_bound_fdp

    for m, r, v in [(100, 100, 70), (500, 100, 90), (200, 40, 40), (1000, 1000, 560)]:
        assert epsilon_lower_bound_fdp(m, r, v, 0.0) <= epsilon_lower_bound(m, r, v, 0.0) + 1e-6


def test_fdp_bounds_grow_with_v_and_vanish_at_chance():
    from accounting.audit import epsilon_lower_bound_fdp, gdp_lower_bound

    eps = [epsilon_lower_bound_fdp(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    mus = [gdp_lower_bound(1000, 200, v) for v in range(100, 201, 10)]
    assert eps[0] == 0.0 and mus[0] == 0.0
    assert all(b >= a for a, b in zip(eps, eps[1:])) and eps[-1] > eps[len(eps) // 2] > 0
    assert all(b >= a for a, b in zip(mus, mus[1:])) and mus[-1] > 0


def test_fdp_epsilon_bound_beats_theorem_5_2_where_m_delta_is_large():
    # 2 m delta = 2 makes Theorem 5.2 vacuous at m = 1000, delta = 1e-3; the f-DP analysis of the
    # same (eps, delta) curve is not: it pays delta once per guess chain, not 2 m times
    from accounting.audit import epsilon_lower_bound_fdp

    assert epsilon_lower_bound(1000, 50, 50, 1e-3) == 0.0
    assert epsilon_lower_bound_fdp(1000, 50, 50, 1e-3) > 2.0


def test_gdp_epsilon_matches_the_gaussian_mechanism_profile():
    # mu-GDP at eps has delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su)
    from accounting.audit import gdp_epsilon

    for mu, delta in [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-3)]:
        e = gdp_epsilon(mu, delta)
        ref = stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)
        assert ref == pytest.approx(delta, rel=1e-6)
    # and against dp_accounting's Gaussian mechanism (sensitivity 1, sigma = 1 / mu)
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier=1.0))
    assert gdp_epsilon(1.0, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
