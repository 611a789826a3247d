"""Client-level distributed noise (privlora/federation/distributed_noise.py), each behaviour against
a value computed here independently: explicit Hadamard matrices, exact normalised pmfs, moments
of the noise laws, accounting's sensitivity bounds, Python-integer modular arithmetic.

Statistical tests use fixed seeds, so each outcome is deterministic; the false-alarm rate stated
with each is the probability that a correct implementation fails it on a random seed."""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.linalg import hadamard
from scipy.special import logsumexp
from scipy.stats import chi2, skellam

import privlora.federation.distributed_noise as dn
from accounting.distributed_dp import (
    DistributedDiscreteGaussian,
    DistributedSkellam,
    rounded_sensitivities,
    rounding_threshold,
)
from privlora.core.errors import UserError
from privlora.federation.distributed_noise import (
    DDG,
    SKELLAM,
    ClientEncoder,
    ConditionalRoundingError,
    DistributedNoiseParams,
    Layout,
    RandomizedHadamard,
    centred,
    choose_scale,
    clip_l2,
    conditional_randomized_round,
    decode_sum,
    encode_contribution,
    flatten,
    k_stddevs_for,
    modular_sum,
    noise_generator,
    sample_discrete_gaussian,
    sample_skellam,
    unflatten,
    wrap_probability,
)

SEED = b"round-7-shared-randomness-32byte"


def next_pow2(d: int) -> int:
    p = 1
    while p < d:
        p *= 2
    return p


def contribution(rng: np.random.Generator, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Two LoRA-like factors and a bias: 7*9 + 33 + 4 = 100 coordinates (padded to 128)."""
    return {
        "layer.lora_B": rng.standard_normal((7, 9)) * scale,
        "layer.lora_A": rng.standard_normal(33) * scale,
        "head.bias": rng.standard_normal(4) * scale,
    }


def params(layout: Layout, /, **kw) -> DistributedNoiseParams:
    base = {"mechanism": DDG, "clip_norm": 1.0, "scale": 40.0, "bits": 16, "layout": layout, "rotation_seed": SEED, "min_inputs": 3, "sigma": 2.0}
    base.update(kw)
    if base["mechanism"] == SKELLAM and "variance" in kw:
        base.pop("sigma", None)
    return DistributedNoiseParams(**base)


def chi_square_statistic(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over bins with expected >= 5 (the rest merged into one bin)."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # fold a too-small merged bin into the smallest kept one
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(np.sum((obs - exp) ** 2 / exp))
    dof = len(exp) - 1
    return stat, dof


# ---------------------------------------------------------------------------------------------
# flatten / unflatten
# ---------------------------------------------------------------------------------------------


def test_flatten_orders_keys_and_unflatten_inverts_it():
    c = {"b": np.arange(6.0).reshape(2, 3), "a": np.array([10.0, 11.0]), "c": np.float64(7.0)}
    vec, layout = flatten(c)
    assert layout.entries == (("a", (2,)), ("b", (2, 3)), ("c", ()))
    np.testing.assert_array_equal(vec, [10, 11, 0, 1, 2, 3, 4, 5, 7])
    back = unflatten(vec, layout)
    assert list(back) == ["a", "b", "c"]
    for k, v in c.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == np.float64
    assert Layout.from_dict(layout.to_dict()) == layout


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"a": np.zeros(2)}, "missing ['b']"),
        ({"a": np.zeros(2), "b": np.zeros(3), "z": np.zeros(1)}, "unexpected ['z']"),
        ({"a": np.zeros(3), "b": np.zeros(3)}, "contribution['a'] must have shape (2,). Found shape (3,)"),
        ({"a": np.array([0.0, np.nan]), "b": np.zeros(3)}, "contribution['a'] must be finite. Found 1 NaN"),
    ],
)
def test_flatten_against_a_layout_names_the_difference(bad, message):
    layout = Layout.of({"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(ValueError) as err:
        flatten(bad, layout)
    assert message in str(err.value)


def test_flatten_refuses_what_is_not_a_dict_of_real_arrays():
    with pytest.raises(TypeError, match="contribution must be a dict"):
        flatten([1.0, 2.0])
    with pytest.raises(TypeError, match=r"contribution\['a'\] must be an array of real numbers"):
        flatten({"a": np.array(["x"])})
    with pytest.raises(TypeError, match="keys must be str"):
        flatten({1: np.zeros(2)})


# ---------------------------------------------------------------------------------------------
# the randomized Hadamard rotation
# ---------------------------------------------------------------------------------------------


def documented_signs(padded_dim: int, seed: bytes) -> np.ndarray:
    """The signs as RandomizedHadamard's docstring specifies them, written out here."""
    stream = hashlib.shake_256(b"privlora/distributed-noise/randomized-hadamard/v1" + padded_dim.to_bytes(8, "big") + seed).digest((padded_dim + 7) // 8)
    bits = [(stream[i // 8] >> (i % 8)) & 1 for i in range(padded_dim)]
    return np.array([1.0 if b == 0 else -1.0 for b in bits])


def test_rotation_of_four_coordinates_by_hand():
    rot = RandomizedHadamard(4, SEED)
    s = documented_signs(4, SEED)
    np.testing.assert_array_equal(rot.signs, s)
    h4 = 0.5 * np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=float)
    x = np.array([1.0, -2.0, 3.5, 0.25])
    expected = h4 @ (s * x)
    np.testing.assert_allclose(rot.rotate(x), expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(rot.unrotate(expected), x, rtol=0, atol=1e-15)


def test_rotation_is_the_orthogonal_matrix_h_times_diag_signs():
    rot = RandomizedHadamard(64, SEED)
    m = rot.rotate(np.eye(64)).T  # column i = rotation of e_i
    explicit = hadamard(64) / 8.0 @ np.diag(documented_signs(64, SEED))
    np.testing.assert_allclose(m, explicit, rtol=0, atol=1e-15)
    np.testing.assert_allclose(m @ m.T, np.eye(64), rtol=0, atol=1e-13)
    np.testing.assert_allclose(m.T @ m, np.eye(64), rtol=0, atol=1e-13)


def test_padded_rotation_has_orthonormal_columns_and_drops_the_padding_on_the_way_back():
    rot = RandomizedHadamard(50, SEED)
    assert rot.padded_dim == 64
    m = rot.rotate(np.eye(50))  # 50 x 64: rows are the images of the basis vectors
    np.testing.assert_allclose(m @ m.T, np.eye(50), rtol=0, atol=1e-13)
    assert rot.unrotate(m[3]).shape == (50,)
    assert rot.unrotate(m[3], keep_padding=True).shape == (64,)
    np.testing.assert_allclose(rot.unrotate(m[3], keep_padding=True)[50:], 0.0, atol=1e-14)


@pytest.mark.parametrize("dim", [1, 2, 3, 5, 100, 1000, 4096, 5000])
def test_rotation_round_trips_and_preserves_norms(dim):
    rng = np.random.default_rng(dim)
    rot = RandomizedHadamard(dim, SEED)
    assert rot.padded_dim == next_pow2(dim)
    for x in (rng.standard_normal(dim), rng.standard_normal(dim) * 1e6, np.full(dim, 0.3)):
        y = rot.rotate(x)
        assert y.shape == (rot.padded_dim,)
        assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-13)
        np.testing.assert_allclose(rot.unrotate(y), x, rtol=0, atol=1e-12 * np.linalg.norm(x))


def test_rotation_batches_rows_and_depends_only_on_the_public_seed():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 20))
    rot = RandomizedHadamard(20, SEED)
    np.testing.assert_array_equal(rot.rotate(x)[1], rot.rotate(x[1]))
    np.testing.assert_array_equal(RandomizedHadamard(20, SEED).signs, rot.signs)  # server == client
    assert not np.array_equal(RandomizedHadamard(20, b"another-round-seed-bytes").signs, rot.signs)


def test_rotation_spreads_a_spike_evenly():
    """Every coordinate of a rotated spike has magnitude ||x|| / sqrt(D): nothing sticks out."""
    rot = RandomizedHadamard(256, SEED)
    y = rot.rotate(np.eye(256)[17] * 8.0)
    np.testing.assert_allclose(np.abs(y), 8.0 / 16.0, rtol=1e-14)


@pytest.mark.parametrize("seed, error, message", [("abc" * 8, TypeError, "rotation seed must be bytes"), (b"short", ValueError, "at least 16 bytes. Found 5")])
def test_rotation_seed_is_checked(seed, error, message):
    with pytest.raises(error, match=message):
        RandomizedHadamard(8, seed)


# ---------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------


def test_clipping_scales_down_to_the_clip_norm_and_keeps_the_direction():
    rng = np.random.default_rng(2)
    for _ in range(200):
        x = rng.standard_normal(37) * rng.uniform(0.1, 100)
        c = float(rng.uniform(0.01, 10))
        out, norm = clip_l2(x, c)
        assert norm == pytest.approx(math.sqrt(sum(v * v for v in x.tolist())), rel=1e-14)
        if norm <= c:
            np.testing.assert_array_equal(out, x)
        else:
            assert np.linalg.norm(out) <= c  # never above, not even by float rounding
            assert np.linalg.norm(out) == pytest.approx(c, rel=1e-14)
            np.testing.assert_allclose(out / np.linalg.norm(out), x / norm, rtol=1e-13)


def test_clipping_refuses_a_bad_clip_norm():
    with pytest.raises(ValueError, match="clip_norm must be > 0.0. Found -1"):
        clip_l2(np.ones(3), -1.0)
    with pytest.raises(ValueError, match="vector must be finite"):
        clip_l2(np.array([1.0, np.inf]), 1.0)


# ---------------------------------------------------------------------------------------------
# conditional randomized rounding
# ---------------------------------------------------------------------------------------------


def test_rounding_never_accepts_a_vector_above_the_threshold_and_resamples_to_meet_it():
    """A threshold at the mean squared norm of unconditional rounding rejects about half the
    tries: every accepted vector is below it, rounds each coordinate to its floor or ceiling,
    and some needed more than one try."""
    rng = np.random.default_rng(3)
    x = np.arange(64) * 0.37 + 0.5
    threshold = float(np.sum(np.floor(x) ** 2 + (2 * np.floor(x) + 1) * (x - np.floor(x))))  # E||R||^2
    tries = []
    for _ in range(500):
        r, t = conditional_randomized_round(x, threshold, rng)
        assert r.dtype == np.int64
        assert int(np.sum(r.astype(object) ** 2)) <= threshold
        assert np.all((r == np.floor(x)) | (r == np.ceil(x)))
        tries.append(t)
    assert max(tries) > 1 and min(tries) == 1


@pytest.mark.parametrize("beta", [0.0, dn.DEFAULT_BETA])
def test_rounding_is_unbiased(beta):
    """Mean over T roundings within 6 standard errors of x in every coordinate (false alarm
    < 64 * 2e-9 with beta = 0, where rounding is exactly unbiased). With beta > 0 conditioning may
    bias a coordinate by at most E[tries] - 1 (see conditional_randomized_round), added to the
    tolerance; at Kairouz et al.'s threshold rejections are rare."""
    rng = np.random.default_rng(4)
    d, trials = 64, 5000
    x = rng.uniform(-3, 3, d) * 4
    threshold = rounding_threshold(float(np.linalg.norm(x)), d, beta)
    total = np.zeros(d)
    tries = 0
    for _ in range(trials):
        r, t = conditional_randomized_round(x, threshold, rng)
        total += r
        tries += t
    mean = total / trials
    f = x - np.floor(x)
    se = np.sqrt(f * (1 - f) / trials)
    bias_bound = tries / trials - 1.0
    assert np.all(np.abs(mean - x) <= 6 * se + bias_bound + 1e-12)
    if beta == 0.0:
        assert tries == trials


def test_rounding_gives_up_with_an_error_that_names_the_threshold_and_the_fix():
    rng = np.random.default_rng(5)
    with pytest.raises(ConditionalRoundingError) as err:
        conditional_randomized_round(np.full(64, 0.5), 0, rng, max_tries=5)
    msg = str(err.value)
    assert "threshold 0.0" in msg and "max_tries=5" in msg and "clipped" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


def test_rounding_refuses_a_bad_threshold_or_generator():
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        conditional_randomized_round(np.ones(3), -1.0, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        conditional_randomized_round(np.ones(3), 10.0, np.random.RandomState(0))


# ---------------------------------------------------------------------------------------------
# the discrete Gaussian sampler
# ---------------------------------------------------------------------------------------------


def discrete_gaussian_pmf(sigma: float, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact normalised pmf of N_Z(0, sigma^2) on -half_width..half_width (the mass beyond is
    below exp(-half_width^2 / (2 sigma^2)), negligible at 40 sigma)."""
    x = np.arange(-half_width, half_width + 1)
    logp = -(x.astype(float) ** 2) / (2 * sigma**2)
    return x, np.exp(logp - logsumexp(logp))


def discrete_gaussian_moments(sigma: float) -> tuple[float, float]:
    x, p = discrete_gaussian_pmf(sigma, int(40 * sigma) + 10)
    return float(np.sum(p * x**2)), float(np.sum(p * x.astype(float) ** 4))


def check_against_pmf(samples: np.ndarray, sigma: float, false_alarm: float) -> None:
    half = int(40 * sigma) + 10
    assert np.all(np.abs(samples) <= half)
    _x, p = discrete_gaussian_pmf(sigma, half)
    counts = np.bincount(samples + half, minlength=2 * half + 1)
    stat, dof = chi_square_statistic(counts.astype(float), p * samples.size)
    assert stat <= chi2.ppf(1 - false_alarm, dof), (stat, dof)


@pytest.mark.parametrize("sigma", [0.5, 1.7, 6.3, 40.0])
def test_discrete_gaussian_matches_the_exact_pmf(sigma):
    """Pearson chi-square against the exact normalised pmf, 100k draws, false alarm 1e-4."""
    samples = sample_discrete_gaussian(sigma, 100_000, noise_generator(11))
    assert samples.dtype == np.int64 and samples.shape == (100_000,)
    check_against_pmf(samples, sigma, 1e-4)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_discrete_gaussian_variance_is_the_exact_one_slightly_below_sigma_squared(sigma):
    """Sample variance within 5 standard errors of the exact variance (false alarm 6e-7), which
    is below sigma^2 (visibly at sigma = 1/2: 0.2150 against 0.25)."""
    n = 200_000
    var, m4 = discrete_gaussian_moments(sigma)
    assert var <= sigma**2 * (1 + 1e-12)  # strictly below, by amounts float64 resolves only for small sigma
    if sigma == 0.5:  # by hand: sum x^2 e^(-2 x^2) / sum e^(-2 x^2), |x| <= 3
        e = [math.exp(-2 * x * x) for x in (1, 2, 3)]
        assert var == pytest.approx(2 * (e[0] + 4 * e[1] + 9 * e[2]) / (1 + 2 * sum(e)), rel=1e-7)
        assert var == pytest.approx(0.21501, abs=1e-5)
    samples = sample_discrete_gaussian(sigma, n, noise_generator(12)).astype(float)
    se = math.sqrt((m4 - var**2) / n)
    assert abs(float(np.mean(samples**2)) - var) <= 5 * se
    assert abs(float(np.mean(samples))) <= 5 * math.sqrt(var / n)


def test_discrete_gaussian_is_exact_on_its_rational_fallback_path(monkeypatch):
    """Force every Bernoulli(exp(-gamma)) draw down the exact rational path (no float decision at
    all): the samples still follow the exact pmf (chi-square, false alarm 1e-4)."""
    calls = []
    original = dn._exact_bernoulli_exp_neg

    def counting(r, k, rng):
        calls.append(r)
        return original(r, k, rng)

    monkeypatch.setattr(dn, "_FORCE_EXACT", 2.0)
    monkeypatch.setattr(dn, "_exact_bernoulli_exp_neg", counting)
    n, sigma = 10_000, 1.3
    samples = sample_discrete_gaussian(sigma, n, noise_generator(13))
    assert len(calls) > n  # every accept/reject went through it
    check_against_pmf(samples, sigma, 1e-4)
    var, m4 = discrete_gaussian_moments(sigma)  # and the variance, within 5 standard errors
    assert abs(float(np.mean(samples.astype(float) ** 2)) - var) <= 5 * math.sqrt((m4 - var**2) / n)


@pytest.mark.parametrize("sigma", [0.5, 1.3, 6.3, 1e5 + 0.1])
def test_the_rejection_exponent_is_cks_algorithm_3s_in_both_precisions(sigma):
    """The exponent the sampler rejects with, exactly as CKS write it, and its float64 twin within
    the 2^-50 (1 + gamma) the fast path's certificate assumes (with a factor 4 to spare)."""
    t = math.floor(sigma) + 1
    s2 = Fraction(sigma) * Fraction(sigma)
    ys = np.array([0, 1, -1, 2, t - 1, t, -t, 3 * t + 1, -(10 * t), 40 * t, 2**20 * t], dtype=np.int64)
    floats = dn._gaussian_exponent(ys, sigma, t)
    for y, f in zip(ys.tolist(), floats.tolist()):
        exact = (Fraction(abs(y)) - s2 / t) ** 2 / (2 * s2)
        assert dn._gaussian_exponent_exact(y, sigma, t) == exact
        assert abs(Fraction(f) - exact) <= Fraction(1, 2**52) * (1 + exact)


class ScriptedUniforms:
    """A stand-in generator whose first 53-bit uniforms are given; later draws are random."""

    def __init__(self, first: np.ndarray) -> None:
        self.first, self.rng = first, np.random.default_rng(0)

    def integers(self, low, high, size=None, dtype=np.int64):
        if self.first is not None:
            out, self.first = self.first, None
            assert high == 2**53 and out.shape == size
            return out
        return self.rng.integers(low, high, size=size, dtype=dtype)


def test_the_float_fast_path_defers_every_draw_within_its_error_margin(monkeypatch):
    """U's first 53 bits placed at, just around and far from exp(-1/3): the draws whose interval
    is within a few dozen ulps of the float exp(-1/3) go to the exact path, the others are decided
    in float, and every decision is the true [U < exp(-1/3)]."""
    calls = []
    original = dn._exact_bernoulli_exp_neg
    monkeypatch.setattr(dn, "_exact_bernoulli_exp_neg", lambda r, k, rng: calls.append(k) or original(r, k, rng))
    lo, hi = dn._exp_neg_bounds(Fraction(1, 3), 60)
    k0 = math.floor(lo * 2**53)  # U in [k0, k0 + 1) 2^-53 contains exp(-1/3)
    assert math.floor(hi * 2**53) == k0
    near = [-40, -3, -1, 0, 1, 3, 40]  # the margin is about 180 ulps of 2^-53 here
    offsets = np.array([-(2**20), -(2**12)] + near + [2**12, 2**20])
    k = k0 + offsets
    out = dn._bernoulli_exp_neg(np.full(k.size, 1 / 3), lambda i: Fraction(1, 3), ScriptedUniforms(k.astype(np.int64)))
    assert sorted(calls) == sorted(k0 + off for off in near)  # near: exact path; far: float
    expected = {off: off < 0 for off in offsets.tolist() if off != 0}
    for off, got in zip(offsets.tolist(), out.tolist()):
        if off in expected:
            assert got is expected[off], off


def test_exact_integer_squared_norm_at_every_magnitude():
    rng = np.random.default_rng(6)
    for m in (1, 1000, 2**30, 2**31 + 5, 2**52):
        v = rng.integers(-m, m + 1, size=3000, dtype=np.int64)
        assert dn._squared_norm(v) == sum(int(a) * int(a) for a in v)


@pytest.mark.parametrize("force_exact", [False, True])
def test_bernoulli_exp_neg_has_the_right_frequencies(monkeypatch, force_exact):
    """Frequencies within 5 standard errors of exp(-gamma) (false alarm < 6e-6 over 5 values)."""
    if force_exact:
        monkeypatch.setattr(dn, "_FORCE_EXACT", 2.0)
    rng = noise_generator(14)
    n = 4000 if force_exact else 400_000
    for g in [Fraction(0), Fraction(1, 10), Fraction(1), Fraction(7, 3), Fraction(10)]:
        out = dn._bernoulli_exp_neg(np.full(n, float(g)), lambda i, g=g: g, rng)
        p = math.exp(-float(g))
        assert abs(out.mean() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, g


def test_the_exact_path_decides_tiny_uniforms_against_huge_exponents_without_huge_fractions():
    """U's first 53 bits all zero against exp(-10^12): decided by drawing more bits of U (U >= 2^-117
    almost surely), never by writing exp(-10^12) out as a fraction."""
    assert dn._exact_bernoulli_exp_neg(Fraction(10**12), 0, noise_generator(7)) is False
    assert dn._exact_bernoulli_exp_neg(Fraction(10**12), 5, noise_generator(7)) is False
    assert dn._exact_bernoulli_exp_neg(Fraction(1, 10**6), 5, noise_generator(7)) is True


def test_exact_exp_bounds_bracket_the_true_value_tightly():
    for r in [Fraction(0), Fraction(1, 3), Fraction(5), Fraction(12345, 7), Fraction(10**6, 3)]:
        lo, hi = dn._exp_neg_bounds(r, 40)
        assert lo <= hi and (hi - lo) <= hi * Fraction(1, 10**30)
        if float(r) < 700:
            assert float(lo) == pytest.approx(math.exp(-float(r)), rel=1e-15)


@pytest.mark.parametrize("sigma, error", [(0.0, ValueError), (-1.0, ValueError), (2.0**41, ValueError), ("1", TypeError), (True, TypeError)])
def test_discrete_gaussian_refuses_bad_sigma(sigma, error):
    with pytest.raises(error, match="sigma must be"):
        sample_discrete_gaussian(sigma, 3, noise_generator(0))


# ---------------------------------------------------------------------------------------------
# the Skellam sampler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.7, 25.0, 1e4])
def test_skellam_has_mean_zero_and_variance_mu(mu):
    """Mean within 5 sqrt(mu/n), variance within 5 standard errors (4th moment mu + 3 mu^2 of the
    symmetric Skellam): false alarm about 1e-6."""
    n = 200_000
    x = sample_skellam(mu, n, noise_generator(15)).astype(float)
    assert abs(x.mean()) <= 5 * math.sqrt(mu / n)
    se = math.sqrt((mu + 2 * mu**2) / n)
    assert abs(float(np.mean(x**2)) - mu) <= 5 * se


def test_skellam_matches_scipys_pmf():
    mu = 25.0
    x = sample_skellam(mu, 100_000, noise_generator(16))
    support = np.arange(-60, 61)
    counts = np.array([np.count_nonzero(x == k) for k in support], dtype=float)
    assert counts.sum() == x.size
    stat, dof = chi_square_statistic(counts, skellam.pmf(support, mu / 2, mu / 2) * x.size)
    assert stat <= chi2.ppf(1 - 1e-4, dof)


# ---------------------------------------------------------------------------------------------
# gamma and the wrap probability
# ---------------------------------------------------------------------------------------------


def test_choose_scale_solves_kairouz_et_als_k_sigma_equation():
    c, d, n, s, bits = 0.5, 1000, 20, 0.01, 18
    k = k_stddevs_for(1e-6, d)
    assert 2 * 1024 * math.exp(-k * k / 2) == pytest.approx(1e-6, rel=1e-12)
    scale = choose_scale(bits=bits, clip_norm=c, dim=d, n=n, local_stddev=s)
    gamma = 1 / scale
    # 2^b = 2 k sqrt(rho/D (c n)^2 + (gamma^2/4 + s^2) n) / gamma, D padded, rho = 1
    rhs = 2 * k * math.sqrt((c * n) ** 2 / 1024 + (gamma**2 / 4 + s**2) * n) / gamma
    assert rhs == pytest.approx(2.0**bits, rel=1e-12)
    assert choose_scale(bits=bits + 1, clip_norm=c, dim=d, n=n, local_stddev=s) > scale


def test_choose_scale_is_capped_where_more_resolution_would_overflow_the_integers():
    scale = choose_scale(bits=64, clip_norm=2.0, dim=10, n=2, local_stddev=1e-9)
    assert scale == 2.0**52 / 2.0
    params(Layout.of({"a": np.zeros(10)}), clip_norm=2.0, scale=scale, bits=64)  # accepted


def test_choose_scale_refuses_too_few_bits_and_names_them():
    with pytest.raises(ValueError, match="bits=3 is too small for n=1000 inputs"):
        choose_scale(bits=3, clip_norm=1.0, dim=8, n=1000, local_stddev=0.1)


def test_wrap_probability_is_the_gaussian_union_bound_for_the_discrete_gaussian():
    bits, c, scale, d, n, sigma = 12, 1.0, 50.0, 100, 4, 30.0
    v = (n * c * scale) ** 2 / 128 + n * sigma**2
    by_hand = 2 * 128 * math.exp(-((2 ** (bits - 1) - n) ** 2) / (2 * v))
    got = wrap_probability(bits=bits, clip_norm=c, scale=scale, dim=d, n=n, mechanism=DDG, sigma=sigma)
    assert by_hand <= got <= by_hand * (1 + 1e-8)
    assert wrap_probability(bits=3, clip_norm=c, scale=scale, dim=d, n=5, mechanism=DDG, sigma=sigma) == 1.0


@pytest.mark.parametrize("mechanism, noise", [(DDG, {"sigma": 6.0}), (SKELLAM, {"variance": 36.0})])
def test_wrap_probability_bounds_the_wraps_of_real_sums(mechanism, noise):
    """Sums of n real encodings of 2-coordinate contributions at 6 bits, where about 1% of sums
    wrap: the fraction of sums with a wrapped coordinate stays below the bound (plus 4 standard
    errors: false alarm 3e-5), and the bound is informative (< 1)."""
    rng = noise_generator(17)
    n, trials = 3, 800
    p = params(Layout.of({"w": np.zeros(2)}), mechanism=mechanism, scale=5.0, bits=6, min_inputs=n, **noise)
    enc = ClientEncoder(p)
    rounded = np.array([[enc.prepare({"w": rng.standard_normal(2)}, rng)[0] for _ in range(n)] for _ in range(trials)])
    shares = sample_discrete_gaussian(6.0, rounded.shape, rng) if mechanism == DDG else sample_skellam(36.0, rounded.shape, rng)
    total = (rounded + shares).sum(axis=1)
    half = 2 ** (p.bits - 1)
    rate = float(np.mean(np.any((total >= half) | (total < -half), axis=1)))
    bound = p.wrap_probability(n)
    assert 0 < rate and bound < 1
    assert rate <= bound + 4 * math.sqrt(bound * (1 - bound) / trials)


# ---------------------------------------------------------------------------------------------
# end to end: n clients encode, sum mod 2^bits, decode
# ---------------------------------------------------------------------------------------------


def run_rounds(mechanism: str, noise: dict, beta: float, trials: int, n: int = 5, scale: float = 30.0, bits: int = 16):
    """Errors (decoded sum - exact sum of clipped contributions), all coordinates of all rounds,
    in model units; each round with its own rotation seed, like real rounds."""
    rng = noise_generator(21)
    layout = Layout.of(contribution(rng))
    errors = []
    for t in range(trials):
        p = params(layout, mechanism=mechanism, scale=scale, bits=bits, beta=beta, min_inputs=n, rotation_seed=t.to_bytes(16, "big"), **noise)
        contribs = [contribution(rng, rng.uniform(0.05, 0.2)) for _ in range(n)]
        encoded = [encode_contribution(c, p, rng)[0] for c in contribs]
        decoded, report = decode_sum(modular_sum(encoded, p.bits), p, num_inputs=n)
        assert report.suspect == 0
        exact = sum(clip_l2(flatten(c)[0], p.clip_norm)[0] for c in contribs)
        errors.append(flatten(decoded, layout)[0] - exact)
    return np.concatenate(errors), p


@pytest.mark.parametrize(
    "mechanism, noise, per_client_var",
    [
        (DDG, {"sigma": 1.5}, discrete_gaussian_moments(1.5)[0]),
        (SKELLAM, {"variance": 2.25}, 2.25),
    ],
)
@pytest.mark.parametrize("beta", [0.0, dn.DEFAULT_BETA])
def test_decoded_sum_is_the_clipped_sum_plus_noise_of_the_charged_variance(mechanism, noise, per_client_var, beta):
    """Per coordinate (model units) the error has mean 0 and variance in
    gamma^2 [n Var(noise), n Var(noise) + n r], r = 1/4 the variance bound of one randomized
    rounding (1/4 / (1 - beta) when conditioned, see the docstring). 60 rounds x 100 coordinates;
    tolerance 5 standard errors on each side (false alarm < 1e-6)."""
    n = 5
    err, p = run_rounds(mechanism, noise, beta, trials=60, n=n)
    gamma2 = p.gamma**2
    m = err.size
    sd = float(np.std(err))
    assert abs(float(np.mean(err))) <= 5 * sd / math.sqrt(m)
    ms = float(np.mean(err**2))
    se = math.sqrt(float(np.mean(err**4)) - ms**2) / math.sqrt(m)
    r = 0.25 / (1 - beta)
    assert gamma2 * n * per_client_var - 5 * se <= ms <= gamma2 * n * (per_client_var + r) + 5 * se


def test_decoding_is_exact_without_noise_up_to_rounding():
    """Each coordinate of one client's rounded vector is within 1 of its scaled rotated input, so
    the decoded (noise-free) vector is within gamma sqrt(D) of the clipped contribution in L2."""
    rng = noise_generator(22)
    c = contribution(rng, 0.05)
    p = params(Layout.of(c), scale=1000.0, bits=24)
    rounded, _ = ClientEncoder(p).prepare(c, rng)
    decoded, _ = decode_sum(modular_sum([dn._reduce_mod(rounded, p.bits)], p.bits), p)
    diff = flatten(decoded)[0] - clip_l2(flatten(c)[0], 1.0)[0]
    assert np.linalg.norm(diff) <= p.gamma * math.sqrt(p.padded_dim)
    assert np.linalg.norm(diff) > 0  # it did round


# ---------------------------------------------------------------------------------------------
# sensitivity: a large contribution is clipped, and its rounded vector stays within accounting's bounds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.05, dn.DEFAULT_BETA])
@pytest.mark.parametrize("scale", [3.0, 40.0, 2000.0])
def test_a_large_contribution_is_clipped_within_the_accounted_sensitivities(beta, scale):
    rng = noise_generator(23)
    big = contribution(rng, 5.0)
    norm = math.sqrt(sum(float(np.sum(v.astype(float) ** 2)) for v in big.values()))
    assert norm > 10
    p = params(Layout.of(big), scale=scale, beta=beta, bits=32)
    l2, l1 = rounded_sensitivities(1.0, scale, next_pow2(100), beta)  # accounting's own bounds
    enc = ClientEncoder(p)
    for _ in range(50):
        rounded, report = enc.prepare(big, rng)
        assert report["clipped"] and report["original_norm"] == pytest.approx(norm, rel=1e-14)
        sq = int(np.sum(rounded.astype(object) ** 2))
        assert math.sqrt(sq) <= l2 and sq <= l2 * l2
        assert int(np.sum(np.abs(rounded))) <= l1
        # its influence on the decoded sum: at most C plus gamma sqrt(D) of rounding
        influence = np.linalg.norm(p.rotation.unrotate(rounded.astype(float) / scale))
        assert influence <= 1.0 + math.sqrt(p.padded_dim) / scale


def test_a_small_contribution_is_not_clipped():
    rng = noise_generator(24)
    c = contribution(rng, 0.01)
    _rounded, report = ClientEncoder(params(Layout.of(c))).prepare(c, rng)
    assert not report["clipped"] and report["original_norm"] < 1.0


def test_release_is_the_accounting_record_with_the_padded_dimension():
    layout = Layout.of(contribution(np.random.default_rng(0)))
    p = params(layout, scale=123.0, min_inputs=7, sigma=3.5, bits=20)
    rec = p.release()
    assert isinstance(rec, DistributedDiscreteGaussian)
    assert (rec.dim, rec.scale, rec.clip_norm, rec.beta, rec.min_inputs, rec.bits, rec.sigma) == (128, 123.0, 1.0, dn.DEFAULT_BETA, 7, 20, 3.5)
    assert (rec.l2_sensitivity, rec.l1_sensitivity) == rounded_sensitivities(1.0, 123.0, 128, dn.DEFAULT_BETA)
    assert Fraction(p.rounding_bound) <= Fraction(rec.l2_sensitivity) ** 2
    sk = params(layout, mechanism=SKELLAM, variance=9.0).release()
    assert isinstance(sk, DistributedSkellam) and sk.variance == 9.0 and sk.dim == 128


# ---------------------------------------------------------------------------------------------
# the modulus: reduction, centring, wraps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 7, 16, 32, 62, 63, 64])
def test_modular_sum_and_centring_match_python_integers(bits):
    rng = np.random.default_rng(bits)
    half = 2 ** (bits - 1)
    vals = [rng.integers(-(2**62), 2**62, size=40) for _ in range(5)]
    encoded = [dn._reduce_mod(v, bits) for v in vals]
    for v, e in zip(vals, encoded):
        assert [int(a) for a in e] == [int(a) % 2**bits for a in v]
    total = modular_sum(encoded, bits)
    exact = [sum(int(v[j]) for v in vals) % 2**bits for j in range(40)]
    assert [int(a) for a in total] == exact
    assert [int(a) for a in centred(total, bits)] == [r - 2**bits if r >= half else r for r in exact]


def test_too_few_bits_make_wraps_that_both_sides_report():
    """bits = 8 for a sum sized for 20: clients see coordinates that do not fit, the server's
    a-priori wrap probability is 1 and it can flag nothing (the sum is ambiguous), and the
    decoded sum is garbage."""
    rng = noise_generator(25)
    n = 4
    contribs = [contribution(rng, 0.2) for _ in range(n)]
    layout = Layout.of(contribs[0])
    scale = choose_scale(bits=20, clip_norm=1.0, dim=layout.size, n=n, local_stddev=0.01)
    good = params(layout, scale=scale, bits=20, min_inputs=n, sigma=0.01 * scale)
    bad = params(layout, scale=scale, bits=8, min_inputs=n, sigma=0.01 * scale)
    exact = sum(clip_l2(flatten(c)[0], 1.0)[0] for c in contribs)
    expected_err = 0.01 * math.sqrt(n * layout.size)  # the summed noise's L2 norm, model units
    for p, wraps in ((good, False), (bad, True)):
        out = [encode_contribution(c, p, rng) for c in contribs]
        decoded, report = decode_sum(modular_sum([e for e, _ in out], p.bits), p, num_inputs=n)
        err = np.linalg.norm(flatten(decoded)[0] - exact)
        if wraps:
            assert all(r.wrapped > 0 for _, r in out)
            assert report.wrap_probability == 1.0 and report.suspect is None
            assert err > 10 * expected_err
        else:
            assert all(r.wrapped == 0 for _, r in out)
            assert report.wrap_probability < 2e-6 and report.suspect == 0
            assert err < 2 * expected_err


def test_the_server_flags_coordinates_pushed_near_the_edge():
    """An input that broke the bounds (here: 0.97 * 2^(bits-1) added to three coordinates) and a
    coordinate that wrapped just past the edge are flagged; the honest sum is not."""
    rng = noise_generator(26)
    n = 4
    contribs = [contribution(rng, 0.2) for _ in range(n)]
    layout = Layout.of(contribs[0])
    scale = choose_scale(bits=20, clip_norm=1.0, dim=layout.size, n=n, local_stddev=0.01)
    p = params(layout, scale=scale, bits=20, min_inputs=n, sigma=0.01 * scale)
    total = modular_sum([encode_contribution(c, p, rng)[0] for c in contribs], p.bits)
    _, honest = decode_sum(total, p, num_inputs=n)
    assert honest.suspect == 0 and honest.edge_level < 2**19
    push = np.zeros(p.padded_dim, dtype=np.int64)
    push[[3, 50, 99]] = int(0.97 * 2**19)
    push[7] = -(2**19) + 5 - int(centred(total, 20)[7])  # the sum's coordinate 7 becomes 2^19 + 5: wrapped
    tampered = modular_sum([total, dn._reduce_mod(push, p.bits)], p.bits)
    assert int(centred(tampered, 20)[7]) == -(2**19) + 5
    _, report = decode_sum(tampered, p, num_inputs=n)
    assert report.suspect == 4


# ---------------------------------------------------------------------------------------------
# errors, parameters, randomness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"mechanism": "gaussian"}, ValueError, "mechanism must be"),
        ({"sigma": None}, ValueError, "sigma (the per-client discrete Gaussian parameter) is required"),
        ({"sigma": 0.4}, ValueError, "sigma must be >= 0.5. Found 0.4"),
        ({"variance": 2.0}, ValueError, "variance is for 'distributed skellam'"),
        ({"bits": 65}, ValueError, "bits must be an int in [1, 64]. Found 65"),
        ({"bits": 16.0}, TypeError, "bits must be an int. Found 16.0 (float)"),
        ({"beta": 1.0}, ValueError, "beta must be < 1.0. Found 1.0"),
        ({"clip_norm": 0.0}, ValueError, "clip_norm must be > 0.0. Found 0.0"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": 2.0**53}, ValueError, "clip_norm * scale must be <= 2^52"),
        ({"min_inputs": 0}, ValueError, "min_inputs must be an int >= 1. Found 0"),
        ({"rotation_seed": "seed"}, TypeError, "rotation seed must be bytes"),
        ({"layout": [("a", (3,))]}, TypeError, "layout must be a Layout"),
        ({"max_rounding_tries": 0}, ValueError, "max_rounding_tries must be an int >= 1"),
    ],
)
def test_parameters_are_checked_and_errors_name_them(change, error, message):
    with pytest.raises(error) as err:
        params(Layout.of({"a": np.zeros(3)}), **change)
    assert message in str(err.value)


def test_skellam_parameters_need_a_variance_and_refuse_a_sigma():
    layout = Layout.of({"a": np.zeros(3)})
    with pytest.raises(ValueError, match="variance .* is required"):
        DistributedNoiseParams(mechanism=SKELLAM, clip_norm=1.0, scale=1.0, bits=8, layout=layout, rotation_seed=SEED, min_inputs=1)
    with pytest.raises(ValueError, match="sigma is for 'distributed discrete gaussian'"):
        DistributedNoiseParams(mechanism=SKELLAM, clip_norm=1.0, scale=1.0, bits=8, layout=layout, rotation_seed=SEED, min_inputs=1, variance=1.0, sigma=1.0)


def test_parameters_round_trip_and_their_digest_binds_every_field():
    layout = Layout.of(contribution(np.random.default_rng(0)))
    p = params(layout)
    assert DistributedNoiseParams.from_dict(p.to_dict()) == p
    assert DistributedNoiseParams.from_dict(p.to_dict()).digest() == p.digest()
    changed = [
        params(layout, sigma=2.5),
        params(layout, scale=41.0),
        params(layout, bits=17),
        params(layout, rotation_seed=SEED[::-1]),
        params(layout, min_inputs=4),
        params(Layout.of({"a": np.zeros(3)})),
        params(layout, beta=0.0),
    ]
    assert len({p.digest()} | {q.digest() for q in changed}) == len(changed) + 1
    with pytest.raises(ValueError, match=r"missing field\(s\) \['bits'\]"):
        DistributedNoiseParams.from_dict({k: v for k, v in p.to_dict().items() if k != "bits"})


def test_decode_refuses_fewer_inputs_than_charged_and_malformed_sums():
    layout = Layout.of({"a": np.zeros(5)})
    p = params(layout, min_inputs=3, bits=16)
    ok = np.zeros(8, dtype=np.uint64)
    with pytest.raises(ValueError, match="num_inputs must be >= min_inputs = 3: a sum of fewer inputs holds less noise than was charged. Found 2"):
        decode_sum(ok, p, num_inputs=2)
    with pytest.raises(ValueError, match="padded_dim = 8 values. Found 5"):
        decode_sum(np.zeros(5, dtype=np.uint64), p)
    with pytest.raises(TypeError, match="summed must be a 1-D integer vector"):
        decode_sum(np.zeros(8), p)
    with pytest.raises(ValueError, match=r"values in \[0, 2\^16\)"):
        decode_sum(np.full(8, 2**16, dtype=np.uint64), p)


def test_encoding_refuses_a_contribution_of_another_layout():
    p = params(Layout.of({"a": np.zeros(5)}))
    with pytest.raises(ValueError, match=r"contribution\['a'\] must have shape \(5,\). Found shape \(4,\)"):
        encode_contribution({"a": np.zeros(4)}, p, noise_generator(0))


def test_encoding_returns_residues_mod_2_to_the_bits_and_a_local_report():
    rng = noise_generator(27)
    c = contribution(rng)
    p = params(Layout.of(c), bits=12)
    enc, report = encode_contribution(c, p, rng)
    assert enc.dtype == np.uint64 and enc.shape == (128,) and int(enc.max()) < 2**12
    assert report.padded_dim == 128 and report.rounding_tries >= 1
    assert report.rounded_sq_norm <= report.rounding_bound
    assert set(report.to_dict()) == {"original_norm", "clipped", "rounding_tries", "rounded_sq_norm", "rounding_bound", "wrapped", "max_abs", "padded_dim"}


def test_real_runs_draw_noise_from_a_fresh_os_seeded_philox_and_seeds_are_for_tests():
    a, b = noise_generator(), noise_generator()
    assert isinstance(a.bit_generator, np.random.Philox)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))
    np.testing.assert_array_equal(noise_generator(5).integers(0, 2**63, 4), noise_generator(5).integers(0, 2**63, 4))
    with pytest.raises(TypeError, match="seed must be an int"):
        noise_generator("5")


def test_noise_and_rotation_randomness_are_separate():
    """The rotation comes from the public seed alone: drawing noise does not move it, and two
    encoders of the same round agree on it whatever their private generators."""
    layout = Layout.of({"a": np.zeros(10)})
    p1, p2 = params(layout), params(layout)
    sample_discrete_gaussian(2.0, 100, noise_generator(1))
    np.testing.assert_array_equal(p1.rotation.signs, p2.rotation.signs)
    np.testing.assert_array_equal(p1.rotation.signs, documented_signs(16, SEED))


def test_no_float_gaussian_leaks_into_the_discrete_gaussian():
    """The sampler's output is integer-valued at any sigma, including a huge one."""
    x = sample_discrete_gaussian(1e9, 1000, noise_generator(28))
    assert x.dtype == np.int64
    assert abs(float(np.std(x)) / 1e9 - 1) < 5 * math.sqrt(0.5 / 1000)
