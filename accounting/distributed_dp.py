"""Distributed DP in the integers: each client adds its own noise share before secure aggregation.

The release this module accounts for (Kairouz, Liu & Steinke, ICML 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", Algorithms 1-2
and Sec. 4; Agarwal, Kairouz & Liu, NeurIPS 2021, "The Skellam Mechanism for Differentially
Private Federated Learning", Algorithm 1): a client clips its update to L2 norm ``clip_norm``,
rotates it (a norm-preserving randomized Hadamard/Fourier transform, padded to ``dim``
coordinates), multiplies it by ``scale`` (= 1/gamma, gamma being the rounding granularity),
rounds it to the integers by conditional randomized rounding with bias parameter ``beta``,
adds its own noise share (a discrete Gaussian N_Z(0, sigma^2) or a symmetric Skellam of
variance ``variance`` in every coordinate) and enters the secure sum mod 2^bits. The server
only ever sees the sum of at least ``min_inputs`` such vectors.

Contract (the meaning of these records and their fields must never change; a new mechanism
gets a new record type):

- Units. Sensitivities and noise are in the integer domain, after scaling and rounding:
  ``l2_sensitivity`` and ``l1_sensitivity`` bound the L2 and L1 norms of one client's rounded
  vector, ``sigma`` / ``variance`` are one client's noise share. ``clip_norm`` is in the units
  of the model update, before scaling.
- Adjacency: zero-out, client level. Two neighbouring releases differ in one client's
  contribution (its rounded vector replaced by zero; its noise share still added), so the two
  sums differ by one integer vector whose norms are bounded by the sensitivities above. For
  replace-one adjacency, record twice each sensitivity.
- ``min_inputs`` counts the noise shares the adversary does not know: the fewest inputs the
  secure sum accepts (dropouts never leave less noise than was charged). A sum of more inputs
  only adds independent noise, which is post-processing, so the bound at ``min_inputs`` holds
  for any larger sum. Shares known to the adversary (clients colluding with the server) must
  not be counted.
- ``bits``: the sum mod 2^bits is a function of the noisy sum (post-processing), so the
  modulus never enters epsilon; it is recorded so that a release can be recomputed in full.
- Epsilon is against the server and everything it sees, with NO amplification by client
  sampling: the server knows who took part, so every round in which a client's update entered
  a sum is charged in full. Rounds compose by adding Renyi DP at each order, and (epsilon,
  delta) follows from the conversion of Canonne, Kamath & Steinke (2020, Prop. 12), the one
  dp_accounting's ``RdpAccountant`` uses.

Every epsilon here is an upper bound: each formula is the cited theorem's statement, and
where a bound is only proved at integer orders it is evaluated at the next integer order
(Renyi divergence is non-decreasing in its order).

This module never imports torch or ``secagg``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

#: Renyi orders used for conversion to (epsilon, delta): the shape of dp_accounting's default
#: grid (fine steps near 1 for large epsilons, integers for small ones, a few large orders).
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1.0 + k / 10.0 for k in range(1, 100)) + tuple(float(a) for a in range(11, 64)) + (128.0, 256.0, 512.0, 1024.0)
)

DDG = "distributed discrete gaussian"
SKELLAM = "distributed skellam"


# --------------------------------------------------------------------------------------------
# validation helpers: one precise error per misuse, naming the field, what was found, what is
# expected
# --------------------------------------------------------------------------------------------


def _found(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _real(name: str, value: Any, *, low: float | None = None, low_open: bool = True, high: float | None = None, high_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Found {_found(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite. Found {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}. Found {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}. Found {value!r}")
    return v


def _integer(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int. Found {_found(value)}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}. Found {value!r}")
    return int(value)


def _orders(alpha: Any) -> np.ndarray:
    a = np.asarray(alpha, dtype=np.float64)
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 1.0):
        raise ValueError(f"Renyi orders must be finite and > 1. Found {alpha!r}")
    return a


def _out(alpha: Any, values: np.ndarray) -> float | np.ndarray:
    return float(values) if np.ndim(alpha) == 0 else values


# --------------------------------------------------------------------------------------------
# the bounds
# --------------------------------------------------------------------------------------------


def ddg_tau(sigma: float, n: int) -> float:
    """The inflation term of the distributed discrete Gaussian.

    Kairouz, Liu & Steinke (ICML 2021), Theorem 1:

        tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1)),

    which measures how far the sum of ``n`` independent N_Z(0, sigma^2) is from the discrete
    Gaussian N_Z(0, n sigma^2). ``tau = 0`` for one share.
    """
    sigma = _real("sigma", sigma, low=0.0)
    n = _integer("n", n, low=1)
    if n == 1:
        return 0.0
    k = np.arange(1, n, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0))))


def ddg_rdp(alpha: Any, *, l2_sensitivity: float, l1_sensitivity: float, sigma: float, n: int, dim: int) -> float | np.ndarray:
    """Renyi DP at order(s) ``alpha`` > 1 of the sum of ``n`` independent discrete Gaussian
    shares N_Z(0, sigma^2) in each of ``dim`` coordinates, for one integer shift Delta with
    ||Delta||_2 <= ``l2_sensitivity`` and ||Delta||_1 <= ``l1_sensitivity``.

    Kairouz, Liu & Steinke (ICML 2021), Theorem 1 (sigma >= 1/2, all alpha >= 1): with
    s^2 = n sigma^2 and tau = `ddg_tau` (sigma, n),

        D_alpha(Z || Z + Delta) <= alpha ||Delta||_2^2 / (2 s^2) + tau d                    (a)
        D_alpha(Z || Z + Delta) <= alpha/2 (||Delta||_2 / s + tau sqrt(d))^2               (b)

    and the per-coordinate form of (b) (their Prop. 14 / Eq. 17 of the arXiv version, as the
    authors' accounting code applies it): (b) at d = 1 in each coordinate, summed over the
    independent coordinates,

        D_alpha(Z || Z + Delta) <= alpha/2 (||Delta||_2^2 / s^2 + 2 tau ||Delta||_1 / s + tau^2 d)   (c)

    which is never above (b) since ||Delta||_1 <= sqrt(d) ||Delta||_2. Returns min(a, b, c).
    As sigma grows, tau -> 0 and the bound tends to the continuous Gaussian's
    alpha Delta_2^2 / (2 n sigma^2).
    """
    a = _orders(alpha)
    l2 = _real("l2_sensitivity", l2_sensitivity, low=0.0, low_open=False)
    l1 = _real("l1_sensitivity", l1_sensitivity, low=0.0, low_open=False)
    sigma = _real("sigma", sigma, low=0.5, low_open=False)
    n = _integer("n", n, low=1)
    d = _integer("dim", dim, low=1)
    tau = ddg_tau(sigma, n)
    s = math.sqrt(n) * sigma
    term_a = a * l2**2 / (2.0 * s**2) + tau * d
    term_b = a / 2.0 * (l2 / s + tau * math.sqrt(d)) ** 2
    term_c = a / 2.0 * (l2**2 / s**2 + 2.0 * tau * l1 / s + tau**2 * d)
    return _out(alpha, np.minimum(term_a, np.minimum(term_b, term_c)))


def ddg_concentrated_epsilon(*, l2_sensitivity: float, l1_sensitivity: float, sigma: float, n: int, dim: int) -> float:
    """The epsilon of the distributed discrete Gaussian's concentrated DP: the release is
    (1/2 epsilon^2)-concentrated DP, i.e. D_alpha <= alpha epsilon^2 / 2 for all alpha >= 1
    (rho-zCDP with rho = epsilon^2 / 2), with

        epsilon = min( sqrt(Delta_2^2 / s^2 + 2 tau d),
                       Delta_2 / s + tau sqrt(d),
                       sqrt(Delta_2^2 / s^2 + 2 tau Delta_1 / s + tau^2 d) ),   s^2 = n sigma^2.

    The first two are the concentrated-DP statement of Kairouz, Liu & Steinke (ICML 2021),
    Theorem 1 (bound (a) of `ddg_rdp` uses alpha >= 1 to fold tau d into alpha tau d); the third
    is bound (c) of `ddg_rdp` read the same way.
    """
    l2 = _real("l2_sensitivity", l2_sensitivity, low=0.0, low_open=False)
    l1 = _real("l1_sensitivity", l1_sensitivity, low=0.0, low_open=False)
    sigma = _real("sigma", sigma, low=0.5, low_open=False)
    n = _integer("n", n, low=1)
    d = _integer("dim", dim, low=1)
    tau = ddg_tau(sigma, n)
    s = math.sqrt(n) * sigma
    return min(
        math.sqrt(l2**2 / s**2 + 2.0 * tau * d),
        l2 / s + tau * math.sqrt(d),
        math.sqrt(l2**2 / s**2 + 2.0 * tau * l1 / s + tau**2 * d),
    )


def skellam_rdp(alpha: Any, *, l2_sensitivity: float, l1_sensitivity: float, variance: float) -> float | np.ndarray:
    """Renyi DP at order(s) ``alpha`` > 1 of the multidimensional symmetric Skellam mechanism:
    independent noise of variance ``variance`` = mu in each coordinate (the difference of two
    Poisson(mu/2); the sum of n clients' shares of variance v is Skellam of variance n v), for
    an integer shift with ||Delta||_2 <= ``l2_sensitivity``, ||Delta||_1 <= ``l1_sensitivity``.

    Agarwal, Kairouz & Liu (NeurIPS 2021), Sec. 3, the RDP theorem of the multidimensional
    Skellam mechanism (Theorem 3.5 of arXiv:2110.04995), written with mu the noise variance:

        epsilon(alpha) <= alpha Delta_2^2 / (2 mu)
                          + min( ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),  3 Delta_1 / (2 mu) ).

    (The paper parametrizes the symmetric Skellam by each Poisson's mean, mu/2 here, which turns
    the constants into 4, 16 and 4.) The bound is evaluated at integer orders only, as the
    authors' accounting does: a non-integer alpha gets the bound at ceil(alpha), which is sound
    because D_alpha is non-decreasing in alpha. As mu grows the min term is O(1/mu^2) next to
    the Gaussian term alpha Delta_2^2 / (2 mu).
    """
    a = np.ceil(_orders(alpha))
    l2 = _real("l2_sensitivity", l2_sensitivity, low=0.0, low_open=False)
    l1 = _real("l1_sensitivity", l1_sensitivity, low=0.0, low_open=False)
    mu = _real("variance", variance, low=0.0)
    extra = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * mu**2), 3.0 * l1 / (2.0 * mu))
    return _out(alpha, a * l2**2 / (2.0 * mu) + extra)


def rounding_threshold(norm: float, dim: int, beta: float) -> float:
    """The squared L2 norm that conditional randomized rounding accepts, for a real vector of
    L2 norm at most ``norm`` in ``dim`` coordinates (Kairouz, Liu & Steinke, ICML 2021, Sec. 4,
    conditional randomized rounding):

        ||x~||_2^2 <= norm^2 + d/4 + sqrt(2 log(1/beta)) (norm + sqrt(d)/2).

    Unconditional randomized rounding (each coordinate rounded up with probability its
    fractional part) meets it with probability at least 1 - beta (Hoeffding); conditional
    rounding resamples until it does, which costs 1/(1 - beta) tries on average and biases the
    result by at most a beta-dependent amount. ``beta`` = 0 means no condition: returns inf.
    """
    norm = _real("norm", norm, low=0.0, low_open=False)
    d = _integer("dim", dim, low=1)
    beta = _real("beta", beta, low=0.0, low_open=False, high=1.0)
    if beta == 0.0:
        return math.inf
    return norm**2 + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + math.sqrt(d) / 2.0)


def rounded_sensitivities(clip_norm: float, scale: float, dim: int, beta: float) -> tuple[float, float]:
    """(L2, L1) bounds of one client's scaled and rounded vector, in the integer domain.

    Kairouz, Liu & Steinke (ICML 2021), Sec. 4 (conditional randomized rounding; the authors'
    code cites Proposition 22 of arXiv:2102.06387 for beta), with c = ``clip_norm`` and
    1/gamma = ``scale``:

        Delta_2^2 = min( c^2 / gamma^2 + d/4 + sqrt(2 log(1/beta)) (c / gamma + sqrt(d)/2),
                         (c / gamma + sqrt(d))^2 ),
        Delta_1   = min( sqrt(d) Delta_2, Delta_2^2 ).

    The second L2 term holds for any rounding (each coordinate moves by less than 1), the
    first is the acceptance condition of `rounding_threshold` (absent when beta = 0). The L1
    bound is Cauchy-Schwarz and, the vector being an integer one, |v_j| <= v_j^2.
    """
    c = _real("clip_norm", clip_norm, low=0.0)
    s = _real("scale", scale, low=0.0)
    d = _integer("dim", dim, low=1)
    beta = _real("beta", beta, low=0.0, low_open=False, high=1.0)
    norm = c * s
    l2 = min(math.sqrt(rounding_threshold(norm, d, beta)), norm + math.sqrt(d))
    return l2, min(math.sqrt(d) * l2, l2**2)


# --------------------------------------------------------------------------------------------
# composition and conversion
# --------------------------------------------------------------------------------------------


def epsilon_from_rdp_curve(orders: Any, rdp: Any, delta: float) -> tuple[float, float]:
    """(epsilon, order): the smallest epsilon at ``delta`` over the orders, from the Renyi DP
    curve ``rdp`` (same length as ``orders``, each order > 1).

    Canonne, Kamath & Steinke (NeurIPS 2020, "The Discrete Gaussian for Differential
    Privacy", Prop. 12), as dp_accounting's ``RdpAccountant`` uses it:

        epsilon = min_alpha  rdp(alpha) + log(1 - 1/alpha) - (log delta + log alpha) / (alpha - 1),

    clipped at 0. Orders at or below 1.01 are skipped (the expression is unstable there and
    never the minimum), as dp_accounting does.
    """
    a = _orders(orders).ravel()
    r = np.asarray(rdp, dtype=np.float64).ravel()
    delta = _real("delta", delta, low=0.0, high=1.0)
    if r.shape != a.shape:
        raise ValueError(f"rdp must have one value per order: {a.size} orders, found {r.size} values")
    if np.any(np.isnan(r)) or np.any(r < 0):
        raise ValueError(f"rdp must be >= 0 at every order (not NaN). Found {r!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    eps = np.where(a > 1.01, eps, np.inf)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def distributed_rdp(releases: Iterable[DistributedRelease], orders: Any = DEFAULT_ORDERS) -> np.ndarray:
    """Renyi DP of a client's releases composed: the sum over releases (one per round in which
    its update entered a secure sum) of each release's RDP, at every order. No amplification by
    client sampling is applied: the server knows which clients took part in each round."""
    a = _orders(orders)
    total = np.zeros_like(a)
    for r in releases:
        if not isinstance(r, DistributedRelease):
            raise TypeError(f"releases must be DistributedDiscreteGaussian or DistributedSkellam records. Found {_found(r)}")
        total = total + r.rdp(a)
    return total


def distributed_epsilon(releases: Iterable[DistributedRelease], delta: float, orders: Any = DEFAULT_ORDERS) -> float:
    """Epsilon at ``delta`` against the server of a client's composed releases (one record per
    round its update entered a sum; no sampling amplification): `distributed_rdp` converted by
    `epsilon_from_rdp_curve`. Zero for an empty history."""
    releases = list(releases)
    if not releases:
        _real("delta", delta, low=0.0, high=1.0)
        return 0.0
    return epsilon_from_rdp_curve(orders, distributed_rdp(releases, orders), delta)[0]


# --------------------------------------------------------------------------------------------
# the records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedRelease:
    """Fields shared by the distributed mechanisms (see the module docstring for their units
    and the adjacency). Use `DistributedDiscreteGaussian` or `DistributedSkellam`."""

    clip_norm: float
    scale: float
    dim: int
    beta: float
    l2_sensitivity: float
    l1_sensitivity: float
    min_inputs: int
    bits: int

    MECHANISM: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if type(self) is DistributedRelease:
            raise TypeError("DistributedRelease is abstract: use DistributedDiscreteGaussian or DistributedSkellam")
        checked = {
            "clip_norm": _real("clip_norm", self.clip_norm, low=0.0),
            "scale": _real("scale", self.scale, low=0.0),
            "dim": _integer("dim", self.dim, low=1),
            "beta": _real("beta", self.beta, low=0.0, low_open=False, high=1.0),
            "l2_sensitivity": _real("l2_sensitivity", self.l2_sensitivity, low=0.0),
            "l1_sensitivity": _real("l1_sensitivity", self.l1_sensitivity, low=0.0),
            "min_inputs": _integer("min_inputs", self.min_inputs, low=1),
            "bits": _integer("bits", self.bits, low=1),
            **self._checked_noise(),
        }
        for name, value in checked.items():  # frozen: store the checked, plain Python values once
            object.__setattr__(self, name, value)
        # a recorded sensitivity may be larger than the bound (e.g. replace-one adjacency) but
        # never smaller: that would understate epsilon
        l2, l1 = rounded_sensitivities(self.clip_norm, self.scale, self.dim, self.beta)
        for name, bound in (("l2_sensitivity", l2), ("l1_sensitivity", l1)):
            if getattr(self, name) < bound * (1.0 - 1e-12):
                raise ValueError(
                    f"{name} must be at least the rounding bound of Kairouz, Liu & Steinke (2021) for "
                    f"clip_norm={self.clip_norm!r}, scale={self.scale!r}, dim={self.dim!r}, beta={self.beta!r}: "
                    f"{bound!r}. Found {getattr(self, name)!r}"
                )

    def _checked_noise(self) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def build(cls, *, clip_norm: float, scale: float, dim: int, beta: float, min_inputs: int, bits: int, **noise: float) -> DistributedRelease:
        """The record with its sensitivities computed by `rounded_sensitivities`."""
        l2, l1 = rounded_sensitivities(clip_norm, scale, dim, beta)
        return cls(clip_norm=clip_norm, scale=scale, dim=dim, beta=beta, l2_sensitivity=l2, l1_sensitivity=l1, min_inputs=min_inputs, bits=bits, **noise)

    @property
    def total_variance(self) -> float:
        raise NotImplementedError

    @property
    def effective_noise_multiplier(self) -> float:
        """sqrt(total noise variance) / l2_sensitivity: the noise multiplier of the continuous
        Gaussian this release approaches as its noise grows (for reading, not for accounting)."""
        return math.sqrt(self.total_variance) / self.l2_sensitivity

    def rdp(self, alpha: Any) -> float | np.ndarray:
        raise NotImplementedError

    def epsilon(self, delta: float, rounds: int = 1, orders: Any = DEFAULT_ORDERS) -> float:
        """Epsilon at ``delta`` of ``rounds`` such releases, against the server (no amplification)."""
        rounds = _integer("rounds", rounds, low=0)
        if rounds == 0:
            return 0.0
        return epsilon_from_rdp_curve(orders, rounds * np.asarray(self.rdp(_orders(orders))), delta)[0]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mechanism": self.MECHANISM}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        return out

    @classmethod
    def from_dict(cls, d: Any) -> DistributedRelease:
        """The record from `to_dict`'s form; every field is required and checked (a dict from
        another mechanism, a missing, unknown or mistyped field raises, naming it)."""
        if not isinstance(d, dict):
            raise TypeError(f"a {cls.__name__} record must be a dict. Found {_found(d)}")
        if cls is DistributedRelease:
            mech = d.get("mechanism")
            if mech not in _BY_MECHANISM:
                raise ValueError(f"mechanism must be one of {sorted(_BY_MECHANISM)}. Found {mech!r}")
            return _BY_MECHANISM[mech].from_dict(d)
        expected = ["mechanism"] + [f.name for f in fields(cls)]
        missing = [k for k in expected if k not in d]
        unknown = sorted(set(d) - set(expected))
        if missing:
            raise ValueError(f"{cls.__name__} record is missing field(s) {missing}; expected exactly {expected}")
        if unknown:
            raise ValueError(f"{cls.__name__} record has unknown field(s) {unknown}; expected exactly {expected}")
        if d["mechanism"] != cls.MECHANISM:
            raise ValueError(f"mechanism must be {cls.MECHANISM!r} for a {cls.__name__}. Found {d['mechanism']!r}")
        return cls(**{k: v for k, v in d.items() if k != "mechanism"})


@dataclass(frozen=True)
class DistributedDiscreteGaussian(DistributedRelease):
    """One round's release of the distributed discrete Gaussian (Kairouz, Liu & Steinke, ICML
    2021): each of at least ``min_inputs`` clients adds N_Z(0, sigma^2) noise to each of the
    ``dim`` coordinates of its scaled and conditionally rounded vector (``clip_norm``,
    ``scale`` = 1/gamma, ``beta``), and the sum is taken mod 2^``bits``. ``sigma`` is the
    discrete Gaussian's parameter in integer units (its variance is slightly below sigma^2);
    Theorem 1 is stated for sigma >= 1/2, and smaller values are refused. RDP: `ddg_rdp` with n = ``min_inputs``.
    """

    sigma: float

    MECHANISM: ClassVar[str] = DDG

    def _checked_noise(self) -> dict[str, float]:
        return {"sigma": _real("sigma", self.sigma, low=0.5, low_open=False)}

    @property
    def total_variance(self) -> float:
        return self.min_inputs * self.sigma**2

    @property
    def tau(self) -> float:
        return ddg_tau(self.sigma, self.min_inputs)

    def rdp(self, alpha: Any) -> float | np.ndarray:
        """`ddg_rdp` of this release at order(s) ``alpha`` > 1."""
        return ddg_rdp(alpha, l2_sensitivity=self.l2_sensitivity, l1_sensitivity=self.l1_sensitivity, sigma=self.sigma, n=self.min_inputs, dim=self.dim)

    def concentrated_epsilon(self) -> float:
        """`ddg_concentrated_epsilon`: this release is (epsilon^2 / 2)-zCDP."""
        return ddg_concentrated_epsilon(l2_sensitivity=self.l2_sensitivity, l1_sensitivity=self.l1_sensitivity, sigma=self.sigma, n=self.min_inputs, dim=self.dim)


@dataclass(frozen=True)
class DistributedSkellam(DistributedRelease):
    """One round's release of the distributed Skellam mechanism (Agarwal, Kairouz & Liu,
    NeurIPS 2021): each of at least ``min_inputs`` clients adds symmetric Skellam noise of
    variance ``variance`` (Poisson(variance/2) - Poisson(variance/2), integer units) to each of
    the ``dim`` coordinates of its scaled and conditionally rounded vector, and the sum is taken
    mod 2^``bits``. The noise in the sum is Skellam of variance ``min_inputs * variance``
    (Skellam is closed under summation). RDP: `skellam_rdp` of that variance.
    """

    variance: float

    MECHANISM: ClassVar[str] = SKELLAM

    def _checked_noise(self) -> dict[str, float]:
        return {"variance": _real("variance", self.variance, low=0.0)}

    @property
    def total_variance(self) -> float:
        return self.min_inputs * self.variance

    def rdp(self, alpha: Any) -> float | np.ndarray:
        """`skellam_rdp` of this release at order(s) ``alpha`` > 1."""
        return skellam_rdp(alpha, l2_sensitivity=self.l2_sensitivity, l1_sensitivity=self.l1_sensitivity, variance=self.total_variance)


_BY_MECHANISM: dict[str, type[DistributedRelease]] = {DDG: DistributedDiscreteGaussian, SKELLAM: DistributedSkellam}


def release_from_dict(d: Any) -> DistributedRelease:
    """A `DistributedDiscreteGaussian` or `DistributedSkellam` from its ``to_dict`` form,
    chosen by its ``mechanism`` field."""
    return DistributedRelease.from_dict(d)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def calibrate_distributed_noise(
    mechanism: str,
    target_epsilon: float,
    delta: float,
    *,
    min_inputs: int,
    rounds: int,
    clip_norm: float,
    dim: int,
    scale: float,
    beta: float,
    bits: int,
    orders: Any = DEFAULT_ORDERS,
    rel_tol: float = 1e-3,
) -> DistributedRelease:
    """The release with the smallest per-client noise (to ``rel_tol``) whose epsilon at
    ``delta`` after ``rounds`` rounds, against the server and without sampling amplification,
    is at most ``target_epsilon``: ``sigma`` for ``"distributed discrete gaussian"`` (never
    below 1/2, where Theorem 1 stops), ``variance`` per client for ``"distributed skellam"``.

    Bisection on the noise, where both bounds decrease; the returned release is the upper end
    of the bracket, so it *meets* the target exactly (not just within the tolerance).
    """
    if mechanism not in _BY_MECHANISM:
        raise ValueError(f"mechanism must be one of {sorted(_BY_MECHANISM)}. Found {mechanism!r}")
    target = _real("target_epsilon", target_epsilon, low=0.0)
    _real("delta", delta, low=0.0, high=1.0)
    rounds = _integer("rounds", rounds, low=1)
    rel_tol = _real("rel_tol", rel_tol, low=0.0, high=1.0)
    cls = _BY_MECHANISM[mechanism]
    noise_field, floor = ("sigma", 0.5) if cls is DistributedDiscreteGaussian else ("variance", 1e-9)
    base = cls.build(clip_norm=clip_norm, scale=scale, dim=dim, beta=beta, min_inputs=min_inputs, bits=bits, **{noise_field: 1.0})
    a = _orders(orders)

    def release(x: float) -> DistributedRelease:
        return cls(**{**{f.name: getattr(base, f.name) for f in fields(base)}, noise_field: x})

    def fits(x: float) -> bool:
        return release(x).epsilon(delta, rounds, a) <= target

    if fits(floor):
        return release(floor)
    hi = 1.0
    while not fits(hi):
        hi *= 2.0
        if hi > 1e18:
            raise ValueError(f"target epsilon {target} is unreachable: {noise_field} above 1e18 does not meet it")
    lo = max(floor, hi / 2.0)
    while lo > floor and fits(lo):
        hi, lo = lo, max(floor, lo / 2.0)
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return release(hi)
