"""Distributed DP bounds (accounting/distributed_dp.py), each against a value computed here
independently: exact Renyi divergences of the noise distributions, a rounding implementation
of the test's own, and dp_accounting for the continuous-Gaussian limit."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import logsumexp
from scipy.stats import poisson, skellam

from accounting.distributed_dp import (
    DEFAULT_ORDERS,
    DistributedDiscreteGaussian,
    DistributedSkellam,
    calibrate_distributed_noise,
    ddg_concentrated_epsilon,
    ddg_rdp,
    ddg_tau,
    distributed_epsilon,
    distributed_rdp,
    epsilon_from_rdp_curve,
    release_from_dict,
    rounded_sensitivities,
    rounding_threshold,
    skellam_rdp,
)

DELTA = 1e-5

# ---------------------------------------------------------------------------------------------
# exact Renyi divergences, in the log domain (the divergence at large orders lives far in the
# tails, where linear-domain pmfs underflow)
# ---------------------------------------------------------------------------------------------


def log_convolve(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """log of the convolution of two pmfs given as logs (supports centred, odd lengths)."""
    na = len(la)
    padded = np.concatenate([np.full(na - 1, -np.inf), lb, np.full(na - 1, -np.inf)])
    return logsumexp(la[::-1][None, :] + sliding_window_view(padded, na), axis=1)


def log_sum_of_discrete_gaussians(sigma: float, n: int, half_width: int) -> np.ndarray:
    """log pmf of the sum of n independent N_Z(0, sigma^2) on -n*half_width..n*half_width."""
    x = np.arange(-half_width, half_width + 1)
    one = -(x**2) / (2.0 * sigma**2)
    one -= logsumexp(one)
    out = one
    for _ in range(n - 1):
        out = log_convolve(out, one)
    return out


def log_skellam(variance: float, half_width: int) -> np.ndarray:
    """log pmf of Poisson(variance/2) - Poisson(variance/2) on -half_width..half_width."""
    lam = variance / 2.0
    k = np.arange(-half_width, half_width + 1)[:, None]
    j = np.arange(0, half_width + int(20 * math.sqrt(lam + 1)) + 50)[None, :]
    return logsumexp(poisson.logpmf(j + k, lam) + poisson.logpmf(j, lam), axis=1)


def renyi_of_shift(logp: np.ndarray, shift: int, alpha: float) -> float:
    """D_alpha(P || P + shift) for a pmf P given as logs on a centred integer support."""
    logq = np.full_like(logp, -np.inf)
    logq[shift:] = logp[:-shift]
    both = np.isfinite(logp) & np.isfinite(logq)
    return float(logsumexp(alpha * logp[both] + (1.0 - alpha) * logq[both]) / (alpha - 1.0))


def exact_ddg(sigma: float, n: int, shift: int, alpha: float) -> float:
    half = int((alpha - 1.0) * shift + 12 * sigma + 10)  # covers where the divergence's mass sits
    return renyi_of_shift(log_sum_of_discrete_gaussians(sigma, n, half), shift, alpha)


def tolerance(x: float) -> float:
    return 1e-9 * max(1.0, abs(x))


# ---------------------------------------------------------------------------------------------
# distributed discrete Gaussian (Kairouz, Liu & Steinke 2021, Theorem 1)
# ---------------------------------------------------------------------------------------------

DDG_GRID = [(s, n, shift) for s in (0.5, 0.7, 1.0) for n in (1, 2, 3, 5) for shift in (1, 2)]
ALPHAS = (1.5, 2.0, 5.0, 16.0)


@pytest.mark.parametrize("sigma, n, shift", DDG_GRID)
def test_ddg_bound_is_above_the_exact_divergence_of_the_sum_of_discrete_gaussians(sigma, n, shift):
    for alpha in ALPHAS:
        exact = exact_ddg(sigma, n, shift, alpha)
        bound = ddg_rdp(alpha, l2_sensitivity=shift, l1_sensitivity=shift, sigma=sigma, n=n, dim=1)
        assert bound >= exact - tolerance(exact), (alpha, exact, bound)
        eps = ddg_concentrated_epsilon(l2_sensitivity=shift, l1_sensitivity=shift, sigma=sigma, n=n, dim=1)
        assert alpha * eps**2 / 2.0 >= exact - tolerance(exact), (alpha, exact, eps)


def test_the_tau_term_is_needed_the_sum_of_discrete_gaussians_is_not_a_discrete_gaussian():
    # what makes the test above able to fail: without tau the bound would be below the truth
    sigma, n, shift, alpha = 0.5, 5, 1, 1.5
    gaussian = alpha * shift**2 / (2 * n * sigma**2)
    exact = exact_ddg(sigma, n, shift, alpha)
    assert exact > gaussian * 1.05
    assert ddg_rdp(alpha, l2_sensitivity=shift, l1_sensitivity=shift, sigma=sigma, n=n, dim=1) >= exact


def test_ddg_bound_in_several_dimensions_is_above_the_exact_product_divergence():
    # Delta = (1, 1, 0) in d = 3: independent coordinates, so the exact divergence is the sum
    sigma, n = 0.6, 3
    for alpha in ALPHAS:
        exact = 2 * exact_ddg(sigma, n, 1, alpha)
        bound = ddg_rdp(alpha, l2_sensitivity=math.sqrt(2), l1_sensitivity=2, sigma=sigma, n=n, dim=3)
        assert bound >= exact - tolerance(exact)


def test_ddg_tau_is_the_theorems_sum():
    sigma, n = 0.8, 4
    expected = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
    assert ddg_tau(sigma, n) == pytest.approx(expected, rel=1e-12)
    assert ddg_tau(sigma, 1) == 0.0


def test_ddg_bound_is_the_least_of_the_theorems_three_forms_written_out_by_hand():
    # Delta = (1, 1, 1, 1) in d = 10^4: Delta_2 = 2, Delta_1 = 4; the L1 form (c) is the least
    sigma, n, d, alpha, l2, l1 = 1.0, 3, 10_000, 2.0, 2.0, 4.0
    tau = 10 * (math.exp(-2 * math.pi**2 * 1 / 2) + math.exp(-2 * math.pi**2 * 2 / 3))
    s2 = n * sigma**2
    a = alpha * l2**2 / (2 * s2) + tau * d
    b = alpha / 2 * (l2 / math.sqrt(s2) + tau * math.sqrt(d)) ** 2
    c = alpha / 2 * (l2**2 / s2 + 2 * tau * l1 / math.sqrt(s2) + tau**2 * d)
    assert c < b < a
    assert ddg_rdp(alpha, l2_sensitivity=l2, l1_sensitivity=l1, sigma=sigma, n=n, dim=d) == pytest.approx(c, rel=1e-12)
    # with Delta_1 at its largest, sqrt(d) Delta_2, form (c) is form (b)
    assert ddg_rdp(alpha, l2_sensitivity=l2, l1_sensitivity=math.sqrt(d) * l2, sigma=sigma, n=n, dim=d) == pytest.approx(b, rel=1e-12)
    # and the bound stays above the exact divergence (coordinates independent: 4 shifts of 1)
    assert c >= 4 * exact_ddg(sigma, n, 1, alpha)


def test_ddg_bound_tends_to_the_continuous_gaussian_as_sigma_grows():
    n, shift, alpha = 4, 2, 3.0
    gaps = []
    for sigma in (0.5, 1.0, 2.0, 4.0):
        gaussian = alpha * shift**2 / (2 * n * sigma**2)
        bound = ddg_rdp(alpha, l2_sensitivity=shift, l1_sensitivity=shift, sigma=sigma, n=n, dim=8)
        exact = exact_ddg(sigma, n, shift, alpha)
        assert bound >= gaussian  # tau >= 0
        gaps.append((bound - gaussian) / gaussian)
        assert exact == pytest.approx(gaussian, rel=max(gaps[-1], 1e-9))
    assert all(a > b for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-12


def test_ddg_refuses_sigma_below_one_half_where_theorem_1_stops():
    with pytest.raises(ValueError, match="sigma must be >= 0.5"):
        ddg_rdp(2.0, l2_sensitivity=1, l1_sensitivity=1, sigma=0.4, n=3, dim=1)
    with pytest.raises(ValueError, match="orders must be finite and > 1"):
        ddg_rdp(1.0, l2_sensitivity=1, l1_sensitivity=1, sigma=1, n=3, dim=1)


# ---------------------------------------------------------------------------------------------
# Skellam (Agarwal, Kairouz & Liu 2021)
# ---------------------------------------------------------------------------------------------


def test_log_domain_skellam_pmf_agrees_with_scipy():
    k = np.arange(-60, 61)
    for variance in (0.5, 3.0, 40.0):
        ref = skellam.pmf(k, variance / 2, variance / 2)
        ours = np.exp(log_skellam(variance, 60))
        assert np.allclose(ours[ref > 1e-200], ref[ref > 1e-200], rtol=1e-8, atol=0)


@pytest.mark.parametrize("variance", [0.5, 1.0, 2.0, 5.0, 20.0, 100.0])
def test_skellam_bound_is_above_the_exact_divergence(variance):
    logp = log_skellam(variance, 220)
    for shift in (1, 2, 3):
        for alpha in (1.5, 2.0, 3.0, 8.0, 32.0):
            exact = renyi_of_shift(logp, shift, alpha)
            bound = skellam_rdp(alpha, l2_sensitivity=shift, l1_sensitivity=shift, variance=variance)
            assert bound >= exact - tolerance(exact), (shift, alpha, exact, bound)


def test_skellam_bound_tends_to_the_gaussian_and_is_read_with_variance_not_poisson_mean():
    shift, alpha = 2, 4.0
    gaps = []
    for variance in (10.0, 100.0, 1000.0, 10000.0):
        gaussian = alpha * shift**2 / (2 * variance)
        bound = skellam_rdp(alpha, l2_sensitivity=shift, l1_sensitivity=shift, variance=variance)
        gaps.append((bound - gaussian) / gaussian)
    assert all(a > b > 0 for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-3
    # and the exact divergence at a large variance is the Gaussian one, so a bound written for
    # the other parametrization (variance 2 mu) would be half the truth and fail above
    exact = renyi_of_shift(log_skellam(400.0, 300), shift, alpha)
    assert exact == pytest.approx(alpha * shift**2 / (2 * 400.0), rel=0.02)


def test_skellam_bound_is_the_papers_statement_written_out_by_hand():
    # alpha Delta_2^2/(2 mu) + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1)/(4 mu^2), 3 Delta_1/(2 mu))
    # alpha=3, Delta_2=2, Delta_1=3, mu=10: 12/20 + min(38/400, 9/20) = 0.6 + 0.095
    assert skellam_rdp(3, l2_sensitivity=2, l1_sensitivity=3, variance=10.0) == pytest.approx(0.695, rel=1e-12)
    # alpha=2, Delta_2=Delta_1=1, mu=0.5: 2/1 + min(9/1, 3/1) = 5 (the other branch of the min)
    assert skellam_rdp(2, l2_sensitivity=1, l1_sensitivity=1, variance=0.5) == pytest.approx(5.0, rel=1e-12)


def test_skellam_non_integer_orders_take_the_next_integer():
    kw = {"l2_sensitivity": 3, "l1_sensitivity": 5, "variance": 7.0}
    assert skellam_rdp(2.3, **kw) == skellam_rdp(3.0, **kw)
    assert np.allclose(skellam_rdp(np.array([1.1, 2.0, 2.5]), **kw), [skellam_rdp(2, **kw), skellam_rdp(2, **kw), skellam_rdp(3, **kw)])


# ---------------------------------------------------------------------------------------------
# conditional randomized rounding (Kairouz, Liu & Steinke 2021, Sec. 4)
# ---------------------------------------------------------------------------------------------


def randomized_round(x: np.ndarray, rng: np.random.Generator, samples: int) -> np.ndarray:
    """``samples`` independent randomized roundings of x: each coordinate up w.p. its fraction."""
    f = np.floor(x)
    return f + (rng.random((samples, x.size)) < (x - f))


def adversarial_vectors(norm: float, dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    signs = rng.choice([-1.0, 1.0], size=dim)
    g = rng.standard_normal(dim)
    return {
        "axis": np.eye(dim)[0] * norm,
        "all equal": np.full(dim, norm / math.sqrt(dim)),
        "all equal, random signs": signs * norm / math.sqrt(dim),
        "random direction": g / np.linalg.norm(g) * norm,
        "half the clip": np.full(dim, 0.5 * norm / math.sqrt(dim)),
        "zero": np.zeros(dim),
    }


# norms chosen so that coordinates land on fractions of one half (the largest rounding variance)
@pytest.mark.parametrize("norm, dim", [(4.0, 64), (20.0, 64), (40.5, 16), (3.0, 4)])
@pytest.mark.parametrize("beta", [0.0, 0.05, math.exp(-0.5)])
def test_rounded_vectors_stay_within_the_rounding_bounds(norm, dim, beta):
    rng = np.random.default_rng(17)
    samples = 4000
    l2, l1 = rounded_sensitivities(clip_norm=norm, scale=1.0, dim=dim, beta=beta)
    threshold = rounding_threshold(norm, dim, beta)
    for name, x in adversarial_vectors(norm, dim, rng).items():
        rounded = randomized_round(x, rng, samples)
        sq = np.sum(rounded**2, axis=1)
        # any rounding moves each coordinate by less than 1
        assert np.all(np.sqrt(sq) <= norm + math.sqrt(dim) + 1e-9), name
        # unconditional rounding exceeds the conditional threshold with probability <= beta
        rate = float(np.mean(sq > threshold))
        assert rate <= beta + 4 * math.sqrt(beta * (1 - beta) / samples) + 1e-12, (name, rate)
        # what conditional rounding keeps (it resamples the rest) is within both bounds
        kept = rounded[sq <= threshold]
        assert len(kept) > 0
        assert np.all(np.linalg.norm(kept, axis=1) <= l2 * (1 + 1e-12)), name
        assert np.all(np.abs(kept).sum(axis=1) <= l1 * (1 + 1e-12)), name


def test_rounding_bound_is_the_papers_min_and_scale_multiplies_the_clip():
    c, scale, d, beta = 0.1, 300.0, 1000, math.exp(-0.5)
    x = c * scale
    conditional = x**2 + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (x + math.sqrt(d) / 2)
    l2, l1 = rounded_sensitivities(c, scale, d, beta)
    assert l2**2 == pytest.approx(min(conditional, (x + math.sqrt(d)) ** 2), rel=1e-12)
    assert l1 == pytest.approx(min(math.sqrt(d) * l2, l2**2), rel=1e-12)
    assert rounded_sensitivities(c, scale, d, 0.0)[0] == pytest.approx(x + math.sqrt(d), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# composition over rounds and conversion to (epsilon, delta)
# ---------------------------------------------------------------------------------------------


def gaussian_limit_release(z: float = 1.2, n: int = 10) -> DistributedDiscreteGaussian:
    """A release whose tau is negligible: sigma is tens of integer units per client."""
    l2, _ = rounded_sensitivities(1.0, 100.0, 16, 0.0)
    return DistributedDiscreteGaussian.build(clip_norm=1.0, scale=100.0, dim=16, beta=0.0, min_inputs=n, bits=24, sigma=z * l2 / math.sqrt(n))


def test_conversion_matches_dp_accounting_on_the_same_curve():
    from dp_accounting.rdp import rdp_privacy_accountant

    orders = np.array(DEFAULT_ORDERS)
    for rdp in (0.01 * orders, skellam_rdp(orders, l2_sensitivity=30, l1_sensitivity=200, variance=900.0) * 40):
        ours, order = epsilon_from_rdp_curve(orders, rdp, DELTA)
        ref, ref_order = rdp_privacy_accountant.compute_epsilon(orders, rdp, DELTA)
        assert ours == pytest.approx(ref, rel=1e-12)
        assert order == ref_order


def test_rounds_compose_by_adding_rdp_and_epsilon_grows_with_rounds():
    r = gaussian_limit_release()
    orders = np.array(DEFAULT_ORDERS)
    assert np.allclose(distributed_rdp([r] * 7, orders), 7 * r.rdp(orders), rtol=1e-12)
    eps = [r.epsilon(DELTA, rounds=t) for t in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]
    assert distributed_epsilon([r] * 10, DELTA) == pytest.approx(eps[1], rel=1e-12)
    assert distributed_epsilon([], DELTA) == 0.0


@pytest.mark.parametrize("rounds", [1, 50])
def test_gaussian_limit_epsilon_is_above_pld_and_close_to_dp_accountings_rdp(rounds):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    r = gaussian_limit_release(z=3.0, n=10)
    z = r.effective_noise_multiplier  # sqrt(n) sigma / Delta_2: the continuous Gaussian's multiplier
    assert r.tau < 1e-30
    ours = r.epsilon(DELTA, rounds=rounds)
    # the PLD reference takes T Gaussians of multiplier z as the one Gaussian of multiplier
    # z / sqrt(T) they are (exactly), which keeps its cost independent of T
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_event.GaussianDpEvent(z / math.sqrt(rounds)))
    rdp = rdp_privacy_accountant.RdpAccountant(orders=list(DEFAULT_ORDERS))
    rdp.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds))
    assert ours >= pld.get_epsilon(DELTA)
    assert ours == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)


def test_skellam_gaussian_limit_is_close_to_dp_accountings_rdp_at_integer_orders():
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    l2, _ = rounded_sensitivities(1.0, 300.0, 16, 0.0)
    n, z, rounds = 10, 1.5, 30
    r = DistributedSkellam.build(clip_norm=1.0, scale=300.0, dim=16, beta=0.0, min_inputs=n, bits=24, variance=(z * l2) ** 2 / n)
    integer_orders = [float(a) for a in range(2, 257)]
    rdp = rdp_privacy_accountant.RdpAccountant(orders=integer_orders)
    rdp.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(z), rounds))
    ours = r.epsilon(DELTA, rounds=rounds, orders=integer_orders)
    ref = rdp.get_epsilon(DELTA)
    assert ref <= ours <= ref * 1.001


def test_more_noise_shares_or_more_noise_never_cost_more():
    kw = {"clip_norm": 0.5, "scale": 40.0, "dim": 256, "beta": math.exp(-0.5), "bits": 20}
    eps = [DistributedDiscreteGaussian.build(min_inputs=n, sigma=2.0, **kw).epsilon(DELTA, rounds=5) for n in (3, 10, 100)]
    assert eps[0] > eps[1] > eps[2]
    eps = [DistributedSkellam.build(min_inputs=5, variance=v, **kw).epsilon(DELTA, rounds=5) for v in (10.0, 100.0, 1000.0)]
    assert eps[0] > eps[1] > eps[2]


@pytest.mark.parametrize("mechanism", ["distributed discrete gaussian", "distributed skellam"])
def test_calibration_returns_the_smallest_noise_that_meets_the_target(mechanism):
    target, rel_tol = 4.0, 1e-3
    kw = {"min_inputs": 8, "rounds": 20, "clip_norm": 1.0, "dim": 512, "scale": 30.0, "beta": math.exp(-0.5), "bits": 20}
    r = calibrate_distributed_noise(mechanism, target, DELTA, rel_tol=rel_tol, **kw)
    assert r.min_inputs == 8 and r.epsilon(DELTA, rounds=20) <= target
    field = "sigma" if mechanism.endswith("gaussian") else "variance"
    smaller = type(r).from_dict({**r.to_dict(), field: getattr(r, field) * (1 - 2 * rel_tol)})
    assert smaller.epsilon(DELTA, rounds=20) > target


# ---------------------------------------------------------------------------------------------
# the records
# ---------------------------------------------------------------------------------------------


def ddg_record() -> DistributedDiscreteGaussian:
    return DistributedDiscreteGaussian.build(clip_norm=1.0, scale=50.0, dim=1024, beta=math.exp(-0.5), min_inputs=5, bits=20, sigma=12.0)


def skellam_record() -> DistributedSkellam:
    return DistributedSkellam.build(clip_norm=1.0, scale=50.0, dim=1024, beta=math.exp(-0.5), min_inputs=5, bits=20, variance=144.0)


@pytest.mark.parametrize("make", [ddg_record, skellam_record])
def test_records_round_trip_through_json_and_recompute_the_same_epsilon(make):
    r = make()
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mechanism"] == r.MECHANISM
    back = release_from_dict(d)
    assert back == r and type(back) is type(r)
    assert back.epsilon(DELTA, rounds=3) == r.epsilon(DELTA, rounds=3)
    assert r.rdp(4.0) == pytest.approx(float(r.rdp(np.array([4.0]))[0]), rel=1e-15)


@pytest.mark.parametrize("make", [ddg_record, skellam_record])
@pytest.mark.parametrize("field", ["clip_norm", "scale", "dim", "beta", "l2_sensitivity", "l1_sensitivity", "min_inputs", "bits", "mechanism"])
def test_from_dict_refuses_a_missing_field_and_names_it(make, field):
    d = make().to_dict()
    del d[field]
    with pytest.raises(ValueError, match=f"missing field.*'{field}'"):
        type(make()).from_dict(d)


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("l2_sensitivity", 40.0, ValueError, "l2_sensitivity must be at least the rounding bound"),
        ("l1_sensitivity", 1.0, ValueError, "l1_sensitivity must be at least the rounding bound"),
        ("clip_norm", 2.0, ValueError, "l2_sensitivity must be at least the rounding bound"),
        ("dim", 4096, ValueError, "must be at least the rounding bound"),
        ("sigma", "12", TypeError, "sigma must be a real number. Found '12' \\(str\\)"),
        ("sigma", 0.25, ValueError, "sigma must be >= 0.5"),
        ("min_inputs", 5.0, TypeError, "min_inputs must be an int. Found 5.0 \\(float\\)"),
        ("min_inputs", 0, ValueError, "min_inputs must be an int >= 1"),
        ("bits", True, TypeError, "bits must be an int"),
        ("beta", 1.0, ValueError, "beta must be < 1.0"),
        ("scale", float("nan"), ValueError, "scale must be finite"),
        ("mechanism", "distributed skellam", ValueError, "mechanism must be 'distributed discrete gaussian'"),
        ("noise_multiplier", 1.0, ValueError, "unknown field.*noise_multiplier"),
    ],
)
def test_from_dict_refuses_an_edited_field_and_says_what_it_expected(field, value, error, message):
    d = {**ddg_record().to_dict(), field: value}
    with pytest.raises(error, match=message):
        DistributedDiscreteGaussian.from_dict(d)


def test_from_dict_refuses_what_is_not_a_record():
    with pytest.raises(TypeError, match="must be a dict"):
        DistributedSkellam.from_dict([("variance", 1.0)])
    with pytest.raises(ValueError, match="mechanism must be one of"):
        release_from_dict({**skellam_record().to_dict(), "mechanism": "gaussian"})
    with pytest.raises(ValueError, match="variance must be > 0.0"):
        DistributedSkellam.from_dict({**skellam_record().to_dict(), "variance": 0.0})


def test_records_are_frozen():
    r = ddg_record()
    with pytest.raises(AttributeError):
        r.sigma = 100.0  # type: ignore[misc]

