"""Client-level DP with distributed noise: a client's contribution in, integers mod 2^bits out.

The pipeline of Kairouz, Liu & Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation", Algorithms 1-2 and Sec. 4) and Agarwal, Kairouz
& Liu (NeurIPS 2021, "The Skellam Mechanism for Differentially Private Federated Learning",
Algorithm 1). On each client, before masking (`ClientEncoder`, `encode_contribution`):

    contribution (dict name -> float array)
      -> `flatten` (sorted keys; every party uses the same `Layout`)
      -> `clip_l2` to L2 norm ``clip_norm`` = C
      -> `RandomizedHadamard`: zero-pad to a power of two D, random signs, normalised
         Walsh-Hadamard transform (signs from the round's PUBLIC shared seed)
      -> multiply by ``scale`` = 1/gamma
      -> `conditional_randomized_round` until ||x~||^2 <= the accounted bound
      -> add this client's noise share: `sample_discrete_gaussian` N_Z(0, sigma^2) or
         `sample_skellam` (variance ``variance``) in each of the D coordinates
      -> reduce mod 2^bits (uint64).

The secure sum adds the clients' vectors mod 2^bits (`modular_sum` is the plain reference of
that sum). The server (`decode_sum`) maps the sum to the centred representatives
[-2^(bits-1), 2^(bits-1)), multiplies by gamma, inverts the rotation, drops the padding and
unflattens. It never sees an un-noised sum: every input carries its own noise share.

Privacy invariants this module keeps (each guarded by a test in tests/test_distributed_noise.py):

- Sensitivity by construction. A rounded vector is accepted only if its squared L2 norm, computed
  exactly in integers, is at most ``min(rounding_threshold(C*scale, D, beta), l2^2)`` with
  ``l2`` from `accounting.distributed_dp.rounded_sensitivities`; so every vector that enters a
  sum has ||v||_2 <= l2 and ||v||_1 <= min(sqrt(D) l2, l2^2) = l1: the sensitivities the
  `DistributedDiscreteGaussian` / `DistributedSkellam` record of `DistributedNoiseParams.release`
  charges. Float error in clipping or rotation can cost a resample, never a larger vector.
- ``dim`` of the accounting record is the PADDED dimension D: rounding and noise act on all D.
- Noise is drawn from the client's private generator (`noise_generator`: numpy Philox keyed
  with 128 bits from ``secrets``; an explicit seed only for tests and simulation); rotation signs
  come from public shared randomness through SHAKE-256 and never from that generator.
- What is reported locally (`EncodeReport`: the original norm, whether it was clipped, ...)
  depends on the data: it is for the client's own log and must never be sent.

Units: ``clip_norm`` and decoded values are in the model's units; ``sigma``, ``variance``, the
rounded vector and everything mod 2^bits are in integer units (model units times ``scale``).

Choosing gamma (`choose_scale`) follows Kairouz et al. (Sec. 4.2/4.4, as TensorFlow Federated's
``_heuristic_scale_factor`` implemented it): k standard deviations of a summed coordinate must
fit in 2^bits. `wrap_probability` is a rigorous Chernoff/union bound on a wrap of the sum for a
given configuration (see its docstring for the model).

Integration (issue 30: `privlora.federation.client_level`, `secure_sum.session_plan` with
`secagg.EncodingSpec.integers`, the round engine): the secure sum must accept ``padded_dim`` uint64 values per
client already in Z_(2^bits), add them mod 2^bits with no fixed-point encoding or clipping of its
own, refuse sums of fewer than ``min_inputs`` inputs, and bind `DistributedNoiseParams.digest`
into its session; the ledger charges `DistributedNoiseParams.release` (whose ``dim`` is the
padded dimension) for every client whose input entered the sum, before the input leaves it.

numpy only; never imports torch or ``secagg``.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import json
import math
import numbers
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from accounting.distributed_dp import (
    DDG,
    SKELLAM,
    DistributedDiscreteGaussian,
    DistributedRelease,
    DistributedSkellam,
    rounded_sensitivities,
    rounding_threshold,
)
from privlora.core.errors import UserError

__all__ = [
    "DDG",
    "DEFAULT_BETA",
    "SKELLAM",
    "ClientEncoder",
    "ConditionalRoundingError",
    "DecodeReport",
    "DistributedNoiseParams",
    "EncodeReport",
    "Layout",
    "RandomizedHadamard",
    "centred",
    "choose_scale",
    "clip_l2",
    "conditional_randomized_round",
    "decode_sum",
    "encode_contribution",
    "flatten",
    "k_stddevs_for",
    "modular_sum",
    "noise_generator",
    "sample_discrete_gaussian",
    "sample_skellam",
    "sum_tail_level",
    "unflatten",
    "wrap_probability",
]

#: Kairouz, Liu & Steinke's recommended conditional-rounding bias (TFF's "exp(-0.5)").
DEFAULT_BETA = math.exp(-0.5)

#: Rounding resamples at most this many times by default. With a vector of norm <= C*scale the
#: failure probability of one try is <= beta (Hoeffding), so giving up means <= beta^1000.
DEFAULT_MAX_TRIES = 1000

#: Largest C*scale accepted: the scaled coordinates stay exact integers-plus-fraction in float64
#: and every encoded value fits int64 with room for the noise.
MAX_SCALED_NORM = float(2**52)

#: Largest per-client sigma / variance accepted (noise then fits int64 with a vast margin).
MAX_SIGMA = float(2**40)
MAX_VARIANCE = float(2**60)

_ROTATION_TAG = b"privlora/distributed-noise/randomized-hadamard/v1"


# --------------------------------------------------------------------------------------------
# validation: one precise error per misuse, naming the parameter, what was found, what is expected
# --------------------------------------------------------------------------------------------


def _found(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _real(name: str, value: Any, *, low: float | None = None, low_open: bool = True, high: float | None = None, high_open: bool = True) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number. Found {_found(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite. Found {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}. Found {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}. Found {value!r}")
    return v


def _integer(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int. Found {_found(value)}")
    if value < low or (high is not None and value > high):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}. Found {value!r}")
    return int(value)


def _generator(rng: Any) -> np.random.Generator:
    if rng is None:
        return noise_generator()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (see noise_generator). Found {_found(rng)}")
    return rng


def _real_vector(name: str, x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be an array of real numbers. Found dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector. Found shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise ValueError(f"{name} must be finite. Found {bad} NaN or infinite value(s)")
    return a


# --------------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------------


def noise_generator(seed: int | None = None) -> np.random.Generator:
    """The generator a client draws its rounding and noise from.

    ``seed=None`` (real runs): ``numpy.random.Philox`` keyed with 128 bits and started at a
    256-bit counter, both from ``secrets`` (the operating system's CSPRNG). Philox4x64-10
    (Salmon et al., SC 2011) is a counter-based generator built from a reduced-round block
    cipher; it has no published attack, but it is not a vetted cryptographic PRG. The noise must
    be unpredictable to the server, and a fresh 128-bit key per client and round makes
    predicting it infeasible by every known means; a deployment that needs a proven CSPRNG can
    pass any ``numpy.random.Generator`` it trusts.

    ``seed=int`` (tests and simulation only): a reproducible Philox generator. Anyone who knows
    the seed knows the noise: never use it where privacy matters.
    """
    if seed is None:
        bitgen = np.random.Philox(
            key=int.from_bytes(secrets.token_bytes(16), "little"),
            counter=int.from_bytes(secrets.token_bytes(32), "little"),
        )
        return np.random.Generator(bitgen)
    seed = _integer("seed", seed, low=0)
    return np.random.Generator(np.random.Philox(seed))


# --------------------------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a contribution dict maps to one flat vector: ``entries`` = ((name, shape), ...) in
    sorted name order, each array raveled in C order. Every client and the server must use the
    same layout (it is part of `DistributedNoiseParams` and of its digest)."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple) or not self.entries:
            raise ValueError(f"layout entries must be a non-empty tuple of (name, shape). Found {_found(self.entries)}")
        names = []
        for entry in self.entries:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], tuple)):
                raise TypeError(f"a layout entry must be (name: str, shape: tuple of ints). Found {_found(entry)}")
            name, shape = entry
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise ValueError(f"layout shape of {name!r} must be a tuple of ints >= 0. Found {shape!r}")
            names.append(name)
        if names != sorted(names) or len(set(names)) != len(names):
            raise ValueError(f"layout names must be unique and sorted. Found {names!r}")
        if self.size < 1:
            raise ValueError("layout must hold at least one coordinate. Found 0")

    @property
    def size(self) -> int:
        """Number of coordinates of the flat vector (before padding)."""
        return sum(math.prod(shape) for _, shape in self.entries)

    @classmethod
    def of(cls, contribution: Mapping[str, Any]) -> Layout:
        """The layout of ``contribution``: its keys sorted, with their shapes."""
        if not isinstance(contribution, Mapping):
            raise TypeError(f"contribution must be a dict of name -> array. Found {_found(contribution)}")
        if not contribution:
            raise ValueError("contribution must hold at least one array. Found an empty dict")
        bad = [k for k in contribution if not isinstance(k, str)]
        if bad:
            raise TypeError(f"contribution keys must be str. Found {bad[0]!r} ({type(bad[0]).__name__})")
        return cls(tuple((k, tuple(int(s) for s in np.shape(contribution[k]))) for k in sorted(contribution)))

    def to_dict(self) -> list[list[Any]]:
        return [[name, list(shape)] for name, shape in self.entries]

    @classmethod
    def from_dict(cls, d: Any) -> Layout:
        if not isinstance(d, list):
            raise TypeError(f"a layout must be a list of [name, shape]. Found {_found(d)}")
        try:
            return cls(tuple((str(name), tuple(int(s) for s in shape)) for name, shape in d))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a layout must be a list of [name, shape]: {exc}") from exc


def flatten(contribution: Mapping[str, Any], layout: Layout | None = None) -> tuple[np.ndarray, Layout]:
    """(float64 vector, layout): the arrays of ``contribution`` raveled and concatenated in
    sorted key order. With ``layout`` given, the contribution must have exactly its keys and
    shapes (an error names the first difference). Values must be finite reals."""
    found = Layout.of(contribution)
    if layout is not None:
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a Layout. Found {_found(layout)}")
        if found != layout:
            want, got = dict(layout.entries), dict(found.entries)
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            if missing or extra:
                raise ValueError(f"contribution keys must be those of the layout: missing {missing}, unexpected {extra}")
            name = next(k for k in want if want[k] != got[k])
            raise ValueError(f"contribution[{name!r}] must have shape {want[name]}. Found shape {got[name]}")
        found = layout
    parts = []
    for name, _ in found.entries:
        a = np.asarray(contribution[name])
        if a.dtype == object or a.dtype.kind not in "fiu":
            raise TypeError(f"contribution[{name!r}] must be an array of real numbers. Found dtype {a.dtype}")
        a = a.astype(np.float64).ravel()
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise ValueError(f"contribution[{name!r}] must be finite. Found {bad} NaN or infinite value(s)")
        parts.append(a)
    return np.concatenate(parts), found


def unflatten(vector: Any, layout: Layout) -> dict[str, np.ndarray]:
    """The dict of float64 arrays that `flatten` made ``vector`` from (inverse of `flatten`)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be a Layout. Found {_found(layout)}")
    v = _real_vector("vector", vector)
    if v.size != layout.size:
        raise ValueError(f"vector must have the layout's {layout.size} coordinates. Found {v.size}")
    out, at = {}, 0
    for name, shape in layout.entries:
        n = math.prod(shape)
        out[name] = v[at : at + n].reshape(shape).copy()
        at += n
    return out


# --------------------------------------------------------------------------------------------
# rotation
# --------------------------------------------------------------------------------------------


def _fwht_(y: np.ndarray) -> np.ndarray:
    """The normalised Walsh-Hadamard transform of the last axis of ``y`` (float64, length a
    power of two), in place: log2(D) butterfly passes, O(D log D), one half-size scratch buffer.
    The normalised matrix H = H_D / sqrt(D) (Sylvester order) is symmetric and orthogonal, so it
    is its own inverse."""
    if not y.flags.c_contiguous:
        raise ValueError("the Walsh-Hadamard transform works in place on a C-contiguous array")
    d = y.shape[-1]
    lead = y.shape[:-1]
    scratch = np.empty(lead + (d // 2,), dtype=np.float64) if d > 1 else None
    h = 1
    while h < d:
        v = y.reshape(lead + (d // (2 * h), 2, h))
        a, b = v[..., 0, :], v[..., 1, :]
        tmp = scratch.reshape(a.shape)
        np.subtract(a, b, out=tmp)
        np.add(a, b, out=a)
        b[...] = tmp
        h *= 2
    y *= 1.0 / math.sqrt(d)
    return y


class RandomizedHadamard:
    """The random rotation x -> H S pad(x) of Kairouz, Liu & Steinke (ICML 2021, Sec. 4;
    Suresh et al. ICML 2017 for the randomized Hadamard transform): pad(x) appends zeros up to
    ``padded_dim`` = the next power of two >= ``dim``, S = diag(signs) with independent uniform
    signs, H the normalised Walsh-Hadamard matrix. H S is orthogonal: norms are preserved, and
    each rotated coordinate of a fixed vector z is a Rademacher sum with variance proxy
    ||z||^2 / padded_dim (Hoeffding), which is what flattens it before rounding and mod 2^bits.

    The signs are PUBLIC shared randomness, the same for every client and the server of a round:
    bit i (least significant first within each byte) of
    ``SHAKE-256(b"privlora/distributed-noise/randomized-hadamard/v1" || padded_dim as 8 bytes
    big-endian || seed)`` gives sign_i = +1 for bit 0 and -1 for bit 1. This is fixed across
    numpy versions and machines. ``seed`` is bytes (at least 16) from the round's shared
    randomness; it must not depend on any client's data, and it is not a secret.
    """

    def __init__(self, dim: int, seed: bytes) -> None:
        self.dim = _integer("dim", dim, low=1, high=2**40)
        if not isinstance(seed, (bytes, bytearray)):
            raise TypeError(f"rotation seed must be bytes (the round's shared randomness). Found {_found(seed)}")
        if len(seed) < 16:
            raise ValueError(f"rotation seed must be at least 16 bytes. Found {len(seed)} bytes")
        self.seed = bytes(seed)
        self.padded_dim = 1 << (self.dim - 1).bit_length()
        digest = hashlib.shake_256(_ROTATION_TAG + self.padded_dim.to_bytes(8, "big") + self.seed).digest((self.padded_dim + 7) // 8)
        bits = np.unpackbits(np.frombuffer(digest, dtype=np.uint8), bitorder="little")[: self.padded_dim]
        self.signs = 1.0 - 2.0 * bits.astype(np.float64)
        self.signs.flags.writeable = False

    def rotate(self, x: Any) -> np.ndarray:
        """H S pad(x): ``x`` has ``dim`` coordinates in its last axis (leading axes are a batch);
        returns float64 with ``padded_dim`` coordinates."""
        a = np.asarray(x, dtype=np.float64)
        if a.ndim < 1 or a.shape[-1] != self.dim:
            raise ValueError(f"rotate expects {self.dim} coordinates in the last axis. Found shape {a.shape}")
        y = np.zeros(a.shape[:-1] + (self.padded_dim,), dtype=np.float64)
        np.multiply(a, self.signs[: self.dim], out=y[..., : self.dim])
        return _fwht_(y)

    def unrotate(self, y: Any, keep_padding: bool = False) -> np.ndarray:
        """S H y, the inverse of `rotate`: ``y`` has ``padded_dim`` coordinates in its last axis;
        returns the first ``dim`` of them (all ``padded_dim`` with ``keep_padding``)."""
        a = np.array(y, dtype=np.float64)  # a copy: transformed in place
        if a.ndim < 1 or a.shape[-1] != self.padded_dim:
            raise ValueError(f"unrotate expects {self.padded_dim} coordinates in the last axis. Found shape {a.shape}")
        _fwht_(a)
        a *= self.signs
        return a if keep_padding else np.ascontiguousarray(a[..., : self.dim])


# --------------------------------------------------------------------------------------------
# clipping and conditional randomized rounding
# --------------------------------------------------------------------------------------------


def clip_l2(vector: Any, clip_norm: float) -> tuple[np.ndarray, float]:
    """(clipped, original L2 norm): ``vector`` scaled by min(1, clip_norm / ||vector||_2), the
    factor nudged down if float rounding would leave the result a hair above ``clip_norm`` (so
    ||clipped||_2 <= clip_norm as computed in float64). The original norm is data-dependent:
    keep it local."""
    x = _real_vector("vector", vector)
    c = _real("clip_norm", clip_norm, low=0.0)
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm):
        raise ValueError("vector is too large: its L2 norm overflows float64")
    if norm <= c:
        return x.copy(), norm
    factor = c / norm
    out = x * factor
    while float(np.linalg.norm(out)) > c:
        factor = math.nextafter(factor, 0.0)
        out = x * factor
    return out, norm


def _squared_norm(v: np.ndarray) -> int:
    """sum(v_i^2) of an int64 vector, exactly, as a Python int."""
    if v.size == 0:
        return 0
    m = int(np.max(np.abs(v)))
    if m < 2**31 and v.size < 2**31:
        sq = (v * v).view(np.uint64)  # < 2^62 each: exact
        lo = int(np.sum(sq & np.uint64(0xFFFFFFFF), dtype=np.uint64))  # < 2^31 * 2^32: exact
        hi = int(np.sum(sq >> np.uint64(32), dtype=np.uint64))
        return (hi << 32) + lo
    return sum(a * a for a in v.tolist())


class ConditionalRoundingError(UserError):
    """Conditional randomized rounding found no rounding within its bound in the tries allowed."""


def conditional_randomized_round(x: Any, threshold: float | Fraction, rng: np.random.Generator, max_tries: int = DEFAULT_MAX_TRIES) -> tuple[np.ndarray, int]:
    """(int64 vector, tries): randomized rounding of ``x`` repeated until the rounded vector's
    squared L2 norm is <= ``threshold`` (Kairouz, Liu & Steinke, ICML 2021, Sec. 4, conditional
    randomized rounding).

    One try rounds each coordinate independently: floor(x_i) + [u_i < x_i - floor(x_i)], u_i
    uniform on [0, 1), so each try is unbiased and moves each coordinate by less than 1. The
    norm check is exact (integer sum of squares against ``threshold``, compared exactly whether
    it is an int, a float or a Fraction). For ||x||_2 <= r and ``threshold`` =
    `accounting.distributed_dp.rounding_threshold` (r, d, beta) a try fails with probability at
    most beta, so tries ~ Geometric, mean <= 1/(1 - beta). The accepted vector is biased by the
    conditioning: per coordinate by at most P(reject)/P(accept) < 1 (in integer units), which
    is E[tries] - 1; in practice Hoeffding's bound is loose and rejections are rare.

    Raises `ConditionalRoundingError` after ``max_tries`` failed tries (naming the threshold, the
    smallest squared norm seen and the fix).
    """
    v = _real_vector("x", x)
    if np.any(np.abs(v) > MAX_SCALED_NORM):
        raise ValueError(f"x must have coordinates of magnitude <= 2^52 to be rounded exactly. Found {float(np.max(np.abs(v)))!r}")
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number (a squared L2 norm). Found {_found(threshold)}")
    if not (threshold >= 0):
        raise ValueError(f"threshold must be >= 0 (a squared L2 norm). Found {threshold!r}")
    if not isinstance(threshold, Fraction):  # Python int / float compare exactly with an int
        threshold = int(threshold) if isinstance(threshold, numbers.Integral) else float(threshold)
    rng = _generator(rng)
    max_tries = _integer("max_tries", max_tries, low=1)
    floor = np.floor(v)
    frac = v - floor  # exact in float64
    base = floor.astype(np.int64)
    best = None
    for tries in range(1, max_tries + 1):
        r = base + (rng.random(v.size) < frac)
        sq = _squared_norm(r)
        if sq <= threshold:
            return r, tries
        best = sq if best is None else min(best, sq)
    raise ConditionalRoundingError(
        f"conditional randomized rounding: no rounding of the {v.size}-coordinate vector had squared L2 norm <= "
        f"threshold {float(threshold)!r} in max_tries={max_tries} tries (smallest found: {best}; the vector's own squared "
        f"norm is {float(np.dot(v, v))!r}); the vector must be clipped to the norm the threshold was computed for, or use a "
        "larger beta or max_tries"
    )


# --------------------------------------------------------------------------------------------
# exact Bernoulli(exp(-gamma)): a float fast path whose decisions are certified, and an exact
# path in rational arithmetic for the rare draws the fast path cannot decide
# --------------------------------------------------------------------------------------------

_TWO53 = float(2**53)
_INV_TWO53 = 2.0**-53
#: the float fast path's relative error budget on gamma (see `_bernoulli_exp_neg`);
#: `_FORCE_EXACT` is for tests only: raised above 1 it sends every draw down the exact path
_GAMMA_REL_SLACK = 2.0**-48
_FORCE_EXACT = 0.0


@functools.lru_cache(maxsize=4096)
def _exp_neg_bounds(r: Fraction, digits: int) -> tuple[Fraction, Fraction]:
    """Rational lo <= exp(-r) <= hi for rational r >= 0, from Python's decimal module at
    ``digits`` significant digits (its divide and exp are correctly rounded, so each has relative
    error <= 0.5 * 10^(1-digits) < eps = 10^(1-digits)):

        g = r rounded,  |g - r| <= eps r <= a := eps (r + 1)
        e = exp(-g) rounded,  e (1 - eps) <= exp(-g) <= e (1 + eps)
        exp(-r) = exp(-g) exp(g - r),  1 - a <= exp(g - r) <= 1 + 2a  (a <= 1)
    """
    ctx = decimal.Context(prec=digits, rounding=decimal.ROUND_HALF_EVEN, Emin=decimal.MIN_EMIN, Emax=decimal.MAX_EMAX, traps=[])
    g = ctx.divide(decimal.Decimal(r.numerator), decimal.Decimal(r.denominator))
    e = Fraction(ctx.exp(ctx.minus(g)))
    eps = Fraction(1, 10 ** (digits - 1))
    a = eps * (r + 1)
    return e * (1 - eps) * (1 - a), e * (1 + eps) * (1 + 2 * a)


def _exact_bernoulli_exp_neg(r: Fraction, k: int, rng: np.random.Generator) -> bool:
    """[U < exp(-r)] for U uniform on [0, 1) whose first 53 bits are ``k`` (U in
    [k, k+1) / 2^53): further bits are drawn 64 at a time and exp(-r) is bounded ever more
    tightly until the interval of U lies on one side. Terminates with probability 1."""
    try:
        r_float = float(r)
    except OverflowError:
        r_float = math.inf
    int_digits = len(str(r.numerator // r.denominator))
    num, nbits = k, 53
    while True:
        if r_float > 0.6932 * nbits:
            # exp(-r) < 2^-nbits (0.6932 > ln 2, with room for float(r)'s rounding): U >= 2^-nbits
            # decides it; U < 2^-nbits (num = 0) needs more bits, not a bound on exp(-r) (whose
            # exact value would be a huge fraction)
            if num >= 1:
                return False
        else:
            lo, hi = _exp_neg_bounds(r, 12 + (nbits * 302) // 1000 + int_digits)
            if (num + 1) * lo.denominator <= lo.numerator << nbits:  # U < (num + 1) 2^-nbits <= lo
                return True
            if num * hi.denominator >= hi.numerator << nbits:  # U >= num 2^-nbits >= hi
                return False
        num = (num << 64) | int(rng.integers(0, 2**64, dtype=np.uint64))
        nbits += 64


def _bernoulli_exp_neg(gamma: Any, exact: Callable[[int], Fraction], rng: np.random.Generator, size: int | None = None, p: np.ndarray | None = None) -> np.ndarray:
    """Independent Bernoulli(exp(-gamma_i)) draws, exact: each outcome is [U_i < exp(-r_i)] for
    a uniform real U_i and the exact rational r_i = ``exact(i)``, of which ``gamma`` holds a
    float64 approximation with |gamma_i - r_i| <= 2^-50 (1 + r_i) (the callers' float formulas
    meet this with a factor >= 4 to spare). ``gamma`` may be a scalar with ``size`` draws;
    ``p`` = exp(-gamma) computed elsewhere (a table) to save the exponentials.

    Fast path: U_i's first 53 bits k_i, U_i in [k_i, k_i + 1) 2^-53, and p_i = exp(-gamma_i) in
    float64. With eta = min(1, 2^-48 (1 + gamma_i)), |p_i - exp(-r_i)| <= p_i (e eta + 2^-49)
    (numpy's exp is within a few ulps), so with slack = p_i (3 eta + 2^-46) + 2^-1060 the draw is
    decided when (k_i + 1) 2^-53 <= p_i - slack (true) or k_i 2^-53 >= p_i + slack (false).
    Otherwise (probability about p_i 2^-44 + 2^-53 per draw) `_exact_bernoulli_exp_neg` decides it in
    rational arithmetic with more bits of U. The result is exactly Bernoulli(exp(-r_i)) given
    uniform bits: no floating-point error reaches the distribution.
    """
    gamma = np.asarray(gamma, dtype=np.float64)
    shape = gamma.shape if size is None else (size,)
    k = rng.integers(0, 2**53, size=shape, dtype=np.int64)
    u = k.astype(np.float64)
    u *= _INV_TWO53  # exact
    if p is None:
        p = np.exp(-gamma)
    eta = np.minimum(1.0, _GAMMA_REL_SLACK * (1.0 + gamma))
    slack = p * (3.0 * eta + 2.0**-46) + (2.0**-1060 + _FORCE_EXACT)
    out = (u + _INV_TWO53) <= (p - slack)
    undecided = ~out & (u < p + slack)
    for i in np.flatnonzero(undecided):
        out[i] = _exact_bernoulli_exp_neg(exact(int(i)), int(k[i]), rng)
    return out


# --------------------------------------------------------------------------------------------
# noise samplers
# --------------------------------------------------------------------------------------------


def _size(size: Any) -> tuple[int, tuple[int, ...]]:
    if isinstance(size, numbers.Integral) and not isinstance(size, (bool, np.bool_)):
        shape = (int(size),)
    elif isinstance(size, tuple) and all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)) for s in size):
        shape = tuple(int(s) for s in size)
    else:
        raise TypeError(f"size must be an int or a tuple of ints. Found {_found(size)}")
    if any(s < 0 for s in shape):
        raise ValueError(f"size must be >= 0. Found {size!r}")
    return math.prod(shape), shape


def _sample_discrete_laplace(t: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """About m / 1.6 draws (a variable number, each exact) of the discrete Laplace
    P(y) proportional to exp(-|y| / t), integer t >= 1: Canonne, Kamath & Steinke (NeurIPS 2020),
    Algorithm 2 with s = 1, vectorised."""
    u = rng.integers(0, t, size=m, dtype=np.int64)
    table = np.exp(-np.arange(t) / t) if t <= 1 << 16 else None
    keep = _bernoulli_exp_neg(u / t, lambda i: Fraction(int(u[i]), t), rng, p=None if table is None else table[u])
    u = u[keep]
    # V ~ Geometric: the number of Bernoulli(exp(-1)) successes before the first failure
    v = np.zeros(u.size, dtype=np.int64)
    active = np.arange(u.size)
    one = Fraction(1)
    while active.size:
        again = _bernoulli_exp_neg(1.0, lambda i: one, rng, size=active.size)
        active = active[again]
        v[active] += 1
    x = u + t * v
    negative = rng.integers(0, 2, size=x.size, dtype=np.int64).astype(bool)
    keep = ~(negative & (x == 0))  # 0 would come twice: reject its negative copy
    return np.where(negative, -x, x)[keep]


def _gaussian_exponent(y: np.ndarray, sigma: float, t: int) -> np.ndarray:
    """(|y| - sigma^2/t)^2 / (2 sigma^2) in float64: CKS Algorithm 3's rejection exponent, within
    2^-50 (1 + exact value) of `_gaussian_exponent_exact` (see `_bernoulli_exp_neg`)."""
    s2 = sigma * sigma
    return (np.abs(y) - s2 / t) ** 2 / (2.0 * s2)


def _gaussian_exponent_exact(y: int, sigma: float, t: int) -> Fraction:
    """(|y| - sigma^2/t)^2 / (2 sigma^2) exactly, sigma^2 the square of the float ``sigma``."""
    s2 = Fraction(sigma) ** 2
    return (abs(y) - s2 / t) ** 2 / (2 * s2)


def sample_discrete_gaussian(sigma: float, size: int | tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 draws of the discrete Gaussian N_Z(0, sigma^2): P(x) = exp(-x^2 / (2 sigma^2)) / Z
    over all integers x, with sigma^2 the exact square of the float ``sigma`` (0 < sigma <= 2^40).

    Canonne, Kamath & Steinke (NeurIPS 2020, "The Discrete Gaussian for Differential Privacy"),
    Algorithm 3, vectorised: with t = floor(sigma) + 1, draw Y from the discrete Laplace of
    scale t (their Algorithm 2: U uniform on {0..t-1} kept with probability exp(-U/t), plus t
    times a Geometric(1 - exp(-1)) count, a random sign, the negative zero rejected) and keep it
    with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). Every Bernoulli(exp(-gamma)) is
    exact in the sense of CKS Algorithm 1: `_bernoulli_exp_neg` decides it in float64 only when
    the float result is certified and in rational arithmetic otherwise, so the output
    distribution is exactly N_Z(0, sigma^2) given uniform random bits: no truncation of the
    tails, no floating-point pmf (Mironov 2012's attack on floating-point noise does not apply).
    Its variance is slightly below sigma^2 (CKS, Cor. 9 / Prop. 19).
    """
    sigma = _real("sigma", sigma, low=0.0, high=MAX_SIGMA, high_open=False)
    n, shape = _size(size)
    rng = _generator(rng)
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        y = _sample_discrete_laplace(t, max(64, int(need * 2.5)), rng)
        gamma = _gaussian_exponent(y, sigma, t)
        accepted = y[_bernoulli_exp_neg(gamma, lambda i, y=y: _gaussian_exponent_exact(int(y[i]), sigma, t), rng)]
        take = min(need, accepted.size)
        out[filled : filled + take] = accepted[:take]
        filled += take
    return out.reshape(shape)


def sample_skellam(variance: float, size: int | tuple[int, ...], rng: np.random.Generator | None = None) -> np.ndarray:
    """int64 draws of the symmetric Skellam distribution of variance ``variance`` = mu: the
    difference of two independent Poisson(mu / 2) (Agarwal, Kairouz & Liu, NeurIPS 2021); mean 0,
    variance mu, and the sum of n clients' shares is Skellam of variance n mu.

    The Poisson draws are numpy's (Hormann's PTRS transformed rejection for mean >= 10,
    multiplication of uniforms below), which are exact in real arithmetic but computed in
    float64: unlike `sample_discrete_gaussian` this sampler is not certified exact.
    """
    mu = _real("variance", variance, low=0.0, high=MAX_VARIANCE, high_open=False)
    n, shape = _size(size)
    rng = _generator(rng)
    return (rng.poisson(mu / 2.0, n).astype(np.int64) - rng.poisson(mu / 2.0, n).astype(np.int64)).reshape(shape)


# --------------------------------------------------------------------------------------------
# wrap probability and the choice of gamma
# --------------------------------------------------------------------------------------------


def _mechanism_noise(mechanism: str, sigma: float | None, variance: float | None) -> tuple[float, float]:
    """(subgaussian variance proxy, Skellam variance) of ONE client's noise share."""
    if mechanism == DDG:
        if variance is not None:
            raise ValueError(f"variance is for {SKELLAM!r}; {DDG!r} takes sigma. Found variance={variance!r}")
        if sigma is None:
            raise ValueError(f"sigma (the per-client discrete Gaussian parameter) is required for {DDG!r}. Found None")
        return _real("sigma", sigma, low=0.0) ** 2, 0.0
    if mechanism == SKELLAM:
        if sigma is not None:
            raise ValueError(f"sigma is for {DDG!r}; {SKELLAM!r} takes variance. Found sigma={sigma!r}")
        if variance is None:
            raise ValueError(f"variance (the per-client Skellam variance) is required for {SKELLAM!r}. Found None")
        return 0.0, _real("variance", variance, low=0.0)
    raise ValueError(f"mechanism must be {DDG!r} or {SKELLAM!r}. Found {mechanism!r}")


def _log_tail(a: float, v: float, mu: float) -> float:
    """log of a Chernoff bound on P(X >= a), a > 0, for X with log-MGF
    psi(lam) <= lam^2 v / 2 + mu (cosh(lam) - 1): inf over lam > 0 of psi(lam) - lam a, at a lam
    found by bisection on psi'(lam) = a (any lam gives a valid bound)."""
    if v == 0.0 and mu == 0.0:
        return -math.inf
    if mu == 0.0:
        return -a * a / (2.0 * v)  # the Gaussian optimum, lam = a / v
    lo, hi = 0.0, math.asinh(a / mu)  # psi'(hi) >= a: sinh(lam) <= a / mu keeps cosh finite
    if v > 0:
        hi = min(hi, a / v)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid * v + mu * math.sinh(mid) < a:
            lo = mid
        else:
            hi = mid
    lam = lo
    return lam * lam * v / 2.0 + mu * (math.cosh(lam) - 1.0) - lam * a


def _sum_tail_model(*, clip_norm: float, scale: float, dim: int, n: int, mechanism: str, sigma: float | None, variance: float | None) -> tuple[float, float, int]:
    c = _real("clip_norm", clip_norm, low=0.0)
    s = _real("scale", scale, low=0.0)
    d = _integer("dim", dim, low=1)
    n = _integer("n", n, low=1)
    one_v, one_mu = _mechanism_noise(mechanism, sigma, variance)
    padded = 1 << (d - 1).bit_length()
    v = (n * c * s) ** 2 / padded + n * one_v
    return v, n * one_mu, padded


def wrap_probability(*, bits: int, clip_norm: float, scale: float, dim: int, n: int, mechanism: str, sigma: float | None = None, variance: float | None = None) -> float:
    """An upper bound on the probability that the sum of ``n`` honest encodings wraps mod
    2^``bits`` in any coordinate (a coordinate of the true sum outside [-2^(bits-1), 2^(bits-1))).

    Model, rigorous given that the rotation signs are independent of the data: a coordinate of
    the sum is S = X + R + N with X the rotated, scaled sum of the clipped contributions, a
    Rademacher sum with variance proxy (n C scale)^2 / D (`RandomizedHadamard`; D = padded
    ``dim``), R the summed rounding errors, |R| < n (each client moves a coordinate by < 1), and N
    the summed noise: n sigma^2-subgaussian for the discrete Gaussian (CKS 2020), Skellam of
    variance n mu (log-MGF n mu (cosh lam - 1)). Then

        P(wrap) <= D * 2 * exp( inf_lam [psi(lam) - lam (2^(bits-1) - n)] ),

    the Chernoff bound of each tail, union over the D coordinates. Computed in float64 and
    rounded up (x (1 + 1e-9)); 1.0 when 2^(bits-1) <= n. ``n`` must be the LARGEST number of
    inputs the sum may have.
    """
    b = _integer("bits", bits, low=1, high=64)
    v, mu, padded = _sum_tail_model(clip_norm=clip_norm, scale=scale, dim=dim, n=n, mechanism=mechanism, sigma=sigma, variance=variance)
    a = 2.0 ** (b - 1) - n
    if a <= 0:
        return 1.0
    log_p = math.log(2.0 * padded) + _log_tail(a, v, mu)
    return min(1.0, math.exp(log_p) * (1.0 + 1e-9)) if log_p < 1.0 else 1.0


def sum_tail_level(*, false_alarm: float, clip_norm: float, scale: float, dim: int, n: int, mechanism: str, sigma: float | None = None, variance: float | None = None) -> float:
    """The level L (integer units) that no coordinate of an honest sum of ``n`` encodings
    exceeds in magnitude except with probability <= ``false_alarm``, by the model of
    `wrap_probability`: the smallest L found (to 1e-9 relative) with
    D * 2 * exp(inf_lam [psi(lam) - lam (L - n)]) <= false_alarm."""
    fa = _real("false_alarm", false_alarm, low=0.0, high=1.0)
    v, mu, padded = _sum_tail_model(clip_norm=clip_norm, scale=scale, dim=dim, n=n, mechanism=mechanism, sigma=sigma, variance=variance)
    target = math.log(fa / (2.0 * padded))
    if v == 0.0 and mu == 0.0:
        return float(n)
    lo, hi = 0.0, 1.0
    while _log_tail(hi, v, mu) > target:
        hi *= 2.0
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if _log_tail(mid, v, mu) > target:
            lo = mid
        else:
            hi = mid
    return n + hi


def k_stddevs_for(wrap_probability: float, dim: int) -> float:
    """k with D * 2 * exp(-k^2 / 2) = ``wrap_probability`` (D = padded ``dim``): a union bound
    over the coordinates of a k-sigma Gaussian tail, for `choose_scale`."""
    p = _real("wrap_probability", wrap_probability, low=0.0, high=1.0)
    d = _integer("dim", dim, low=1)
    padded = 1 << (d - 1).bit_length()
    return math.sqrt(2.0 * math.log(2.0 * padded / p))


def choose_scale(*, bits: int, clip_norm: float, dim: int, n: int, local_stddev: float, k_stddevs: float | None = None, target_wrap_probability: float = 1e-6) -> float:
    """scale = 1/gamma such that k standard deviations of a summed coordinate fit in 2^bits
    (Kairouz, Liu & Steinke, ICML 2021, Sec. 4.2 and 4.4; TensorFlow Federated's
    ``_heuristic_scale_factor``, rho = 1 for the randomized Hadamard transform): solve

        2^bits = 2 k sqrt( (C n)^2 / D + (gamma^2 / 4 + s^2) n ) / gamma

    for gamma, with C = ``clip_norm``, D = padded ``dim``, n = the LARGEST number of inputs,
    s = ``local_stddev`` the per-client noise standard deviation in MODEL units (the integer
    sigma is then s * scale; for Skellam the variance is (s * scale)^2). The three terms are the
    rotated signal's variance proxy, randomized rounding's (<= 1/4 per client) and the noise's,
    all in units of gamma. The solution is

        scale = sqrt(2^(2 bits) - n k^2) / (2 k sqrt((C n)^2 / D + n s^2)).

    ``k_stddevs`` defaults to `k_stddevs_for` (``target_wrap_probability``, dim): a union bound
    over all D coordinates (TFF used k for one coordinate). Check the choice with
    `wrap_probability`, which is rigorous where this is a Gaussian heuristic. The result is capped
    at 2^52 / C (`DistributedNoiseParams` refuses a larger C * scale; TFF capped at 1e6): more
    resolution than that buys nothing.
    """
    b = _integer("bits", bits, low=1, high=64)
    c = _real("clip_norm", clip_norm, low=0.0)
    d = _integer("dim", dim, low=1)
    n = _integer("n", n, low=1)
    s = _real("local_stddev", local_stddev, low=0.0, low_open=False)
    k = k_stddevs_for(target_wrap_probability, d) if k_stddevs is None else _real("k_stddevs", k_stddevs, low=0.0)
    padded = 1 << (d - 1).bit_length()
    room = 2.0 ** (2 * b) - n * k * k
    if room <= 0:
        raise ValueError(
            f"bits={b} is too small for n={n} inputs at k={k:.3g} standard deviations: 2^(2 bits) must exceed n k^2 = {n * k * k:.4g}. "
            "Use more bits, fewer inputs per sum, or a larger target_wrap_probability"
        )
    return min(math.sqrt(room) / (2.0 * k * math.sqrt((c * n) ** 2 / padded + n * s * s)), MAX_SCALED_NORM / c)


# --------------------------------------------------------------------------------------------
# parameters of one round
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedNoiseParams:
    """What every client and the server of one round must agree on (bind `digest` into the
    secure sum's session).

    - ``mechanism``: ``DDG`` ("distributed discrete gaussian", give ``sigma``) or ``SKELLAM``
      ("distributed skellam", give ``variance``), the names of `accounting.distributed_dp`;
    - ``clip_norm`` C (model units) and ``scale`` = 1/gamma (integer units per model unit);
    - ``bits``: the secure sum works mod 2^bits, 1 <= bits <= 64;
    - ``sigma`` / ``variance``: ONE client's noise share per coordinate, integer units, sized so
      that ``min_inputs`` shares give the charged noise (the record of `release`);
    - ``min_inputs``: the fewest inputs the secure sum accepts (`decode_sum` refuses fewer);
    - ``layout``: the contribution's keys and shapes; ``dim`` = its size, ``padded_dim`` the
      next power of two (the accounting dimension);
    - ``rotation_seed``: public shared randomness of the round (bytes, >= 16);
    - ``beta``: conditional-rounding parameter (0 = unconditional rounding);
    - ``max_rounding_tries``.
    """

    mechanism: str
    clip_norm: float
    scale: float
    bits: int
    layout: Layout
    rotation_seed: bytes
    min_inputs: int
    sigma: float | None = None
    variance: float | None = None
    beta: float = DEFAULT_BETA
    max_rounding_tries: int = DEFAULT_MAX_TRIES
    _rotation: RandomizedHadamard | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _mechanism_noise(self.mechanism, self.sigma, self.variance)
        checked: dict[str, Any] = {
            "clip_norm": _real("clip_norm", self.clip_norm, low=0.0),
            "scale": _real("scale", self.scale, low=0.0),
            "bits": _integer("bits", self.bits, low=1, high=64),
            "min_inputs": _integer("min_inputs", self.min_inputs, low=1),
            "beta": _real("beta", self.beta, low=0.0, low_open=False, high=1.0),
            "max_rounding_tries": _integer("max_rounding_tries", self.max_rounding_tries, low=1),
        }
        if self.mechanism == DDG:
            # Theorem 1 of Kairouz et al. (and the accounting record) needs sigma >= 1/2
            checked["sigma"] = _real("sigma", self.sigma, low=0.5, low_open=False, high=MAX_SIGMA, high_open=False)
        else:
            checked["variance"] = _real("variance", self.variance, low=0.0, high=MAX_VARIANCE, high_open=False)
        if not isinstance(self.layout, Layout):
            raise TypeError(f"layout must be a Layout (Layout.of(contribution)). Found {_found(self.layout)}")
        if checked["clip_norm"] * checked["scale"] > MAX_SCALED_NORM:
            raise ValueError(
                f"clip_norm * scale must be <= 2^52 (the scaled vector's norm, in integer units). Found "
                f"{checked['clip_norm'] * checked['scale']!r}: use a smaller scale"
            )
        rotation = RandomizedHadamard(self.layout.size, self.rotation_seed)  # checks the seed
        checked["rotation_seed"] = rotation.seed
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_rotation", rotation)

    # ---- derived ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Coordinates of the flattened contribution."""
        return self.layout.size

    @property
    def padded_dim(self) -> int:
        """D: the next power of two >= dim; rounding and noise act on all D coordinates."""
        return self.rotation.padded_dim

    @property
    def gamma(self) -> float:
        """The rounding granularity in model units, 1/scale."""
        return 1.0 / self.scale

    @property
    def rotation(self) -> RandomizedHadamard:
        assert self._rotation is not None
        return self._rotation

    @property
    def sensitivities(self) -> tuple[float, float]:
        """(L2, L1) bounds of one client's rounded vector, integer units:
        `accounting.distributed_dp.rounded_sensitivities` (C, scale, D, beta)."""
        return rounded_sensitivities(self.clip_norm, self.scale, self.padded_dim, self.beta)

    @property
    def rounding_bound(self) -> float | Fraction:
        """The bound on the rounded vector's squared L2 norm that the encoder enforces exactly:
        min(rounding_threshold(C scale, D, beta), l2^2) with l2 the recorded L2 sensitivity
        (squared exactly, so an accepted vector has ||v||_2 <= l2 with no float slack)."""
        l2 = self.sensitivities[0]
        threshold = rounding_threshold(self.clip_norm * self.scale, self.padded_dim, self.beta)
        exact_l2_sq = Fraction(l2) ** 2
        return exact_l2_sq if math.isinf(threshold) or exact_l2_sq <= Fraction(threshold) else threshold

    def release(self) -> DistributedRelease:
        """The accounting record of one round of this release (dim = ``padded_dim``), for the
        ledger: `DistributedDiscreteGaussian` or `DistributedSkellam` built with the same
        sensitivities the encoder enforces."""
        common = {"clip_norm": self.clip_norm, "scale": self.scale, "dim": self.padded_dim, "beta": self.beta, "min_inputs": self.min_inputs, "bits": self.bits}
        if self.mechanism == DDG:
            return DistributedDiscreteGaussian.build(**common, sigma=self.sigma)
        return DistributedSkellam.build(**common, variance=self.variance)

    def wrap_probability(self, n: int) -> float:
        """`wrap_probability` of a sum of ``n`` inputs under these parameters."""
        return wrap_probability(bits=self.bits, clip_norm=self.clip_norm, scale=self.scale, dim=self.padded_dim, n=n, mechanism=self.mechanism, sigma=self.sigma, variance=self.variance)

    # ---- serialisation ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "clip_norm": self.clip_norm,
            "scale": self.scale,
            "bits": self.bits,
            "layout": self.layout.to_dict(),
            "rotation_seed": self.rotation_seed.hex(),
            "min_inputs": self.min_inputs,
            "sigma": self.sigma,
            "variance": self.variance,
            "beta": self.beta,
            "max_rounding_tries": self.max_rounding_tries,
        }

    @classmethod
    def from_dict(cls, d: Any) -> DistributedNoiseParams:
        if not isinstance(d, dict):
            raise TypeError(f"distributed noise parameters must be a dict. Found {_found(d)}")
        expected = set(cls(**_example_kwargs()).to_dict())
        missing, unknown = sorted(expected - set(d)), sorted(set(d) - expected)
        if missing or unknown:
            raise ValueError(f"distributed noise parameters: missing field(s) {missing}, unknown field(s) {unknown}; expected exactly {sorted(expected)}")
        seed = d["rotation_seed"]
        if not isinstance(seed, str):
            raise TypeError(f"rotation_seed must be a hex string. Found {_found(seed)}")
        try:
            seed_bytes = bytes.fromhex(seed)
        except ValueError as exc:
            raise ValueError(f"rotation_seed must be a hex string. Found {seed!r}") from exc
        return cls(**{**d, "layout": Layout.from_dict(d["layout"]), "rotation_seed": seed_bytes})

    def digest(self) -> bytes:
        """SHA-256 of the canonical JSON of `to_dict`: equal digests mean the same encoding."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(b"privlora/distributed-noise/params/v1\x00" + text.encode()).digest()


def _example_kwargs() -> dict[str, Any]:
    return {"mechanism": DDG, "clip_norm": 1.0, "scale": 1.0, "bits": 8, "layout": Layout((("x", (1,)),)), "rotation_seed": bytes(16), "min_inputs": 1, "sigma": 1.0}


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeReport:
    """What one encoding did, for the CLIENT'S OWN log: every field depends on the data, so none
    may be sent to the server or enter a shared file (that would be a release without noise).

    - ``original_norm``: L2 norm of the flattened contribution before clipping (model units);
    - ``clipped``: whether it exceeded ``clip_norm``;
    - ``rounding_tries``: randomized roundings drawn until one met the bound (>= 1);
    - ``rounded_sq_norm`` / ``rounding_bound``: the accepted vector's squared L2 norm (integer
      units) and the bound it met;
    - ``wrapped``: coordinates of this client's noised integer vector with |value| >=
      2^(bits-1), i.e. that do not fit the centred range on their own before the mod (conservative
      by the one value -2^(bits-1)); what matters for the result is whether the SUM wraps, which
      no single client can see;
    - ``max_abs``: the largest |value| of that vector.
    """

    original_norm: float
    clipped: bool
    rounding_tries: int
    rounded_sq_norm: int
    rounding_bound: float
    wrapped: int
    max_abs: int
    padded_dim: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _reduce_mod(v: np.ndarray, bits: int) -> np.ndarray:
    """v mod 2^bits as uint64 (two's complement: the int64 bit pattern, masked)."""
    out = v.astype(np.int64, copy=False).view(np.uint64).copy()
    if bits < 64:
        out &= np.uint64((1 << bits) - 1)
    return out


class ClientEncoder:
    """One client's encoder for one round: `prepare` (flatten, clip, rotate, scale, round) and
    `noise_and_reduce` (add the noise share, reduce mod 2^bits); `encode` does both."""

    def __init__(self, params: DistributedNoiseParams) -> None:
        if not isinstance(params, DistributedNoiseParams):
            raise TypeError(f"params must be DistributedNoiseParams. Found {_found(params)}")
        self.params = params

    def prepare(self, contribution: Mapping[str, Any], rng: np.random.Generator | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """(rounded int64 vector of ``padded_dim`` coordinates, partial report): the vector
        whose L2 and L1 norms are bounded by the release's sensitivities (before any noise)."""
        p = self.params
        rng = _generator(rng)
        x, _ = flatten(contribution, p.layout)
        clipped, norm = clip_l2(x, p.clip_norm)
        y = p.rotation.rotate(clipped)
        y *= p.scale
        bound = p.rounding_bound
        rounded, tries = conditional_randomized_round(y, bound, rng, p.max_rounding_tries)
        report = {"original_norm": norm, "clipped": norm > p.clip_norm, "rounding_tries": tries, "rounded_sq_norm": _squared_norm(rounded), "rounding_bound": float(bound)}
        return rounded, report

    def noise(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """This client's noise share: ``padded_dim`` int64 draws."""
        p = self.params
        rng = _generator(rng)
        if p.mechanism == DDG:
            return sample_discrete_gaussian(p.sigma, p.padded_dim, rng)
        return sample_skellam(p.variance, p.padded_dim, rng)

    def encode(self, contribution: Mapping[str, Any], rng: np.random.Generator | None = None) -> tuple[np.ndarray, EncodeReport]:
        """(uint64 vector of ``padded_dim`` values in [0, 2^bits), `EncodeReport`)."""
        rng = _generator(rng)
        rounded, partial = self.prepare(contribution, rng)
        v = rounded + self.noise(rng)
        half = 2 ** (self.params.bits - 1)
        mag = np.abs(v)
        report = EncodeReport(
            **partial,
            wrapped=int(np.count_nonzero(mag >= half)),
            max_abs=int(mag.max()),
            padded_dim=self.params.padded_dim,
        )
        return _reduce_mod(v, self.params.bits), report


def encode_contribution(contribution: Mapping[str, Any], params: DistributedNoiseParams, rng: np.random.Generator | None = None) -> tuple[np.ndarray, EncodeReport]:
    """`ClientEncoder` (params).encode(contribution, rng). ``rng=None`` draws a fresh
    `noise_generator` from the operating system (what a real client does)."""
    return ClientEncoder(params).encode(contribution, rng)


# --------------------------------------------------------------------------------------------
# the sum and the server side
# --------------------------------------------------------------------------------------------


def modular_sum(encoded: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """The sum mod 2^bits of encoded vectors (uint64): what the secure sum must output. Plain
    numpy (uint64 addition wraps mod 2^64, and 2^bits divides 2^64), for simulation and tests."""
    b = _integer("bits", bits, low=1, high=64)
    total = None
    for i, e in enumerate(encoded):
        a = np.asarray(e)
        if a.dtype != np.uint64 or a.ndim != 1:
            raise TypeError(f"encoded[{i}] must be a 1-D uint64 vector. Found dtype {a.dtype}, shape {a.shape}")
        if total is None:
            total = a.copy()
        elif a.shape != total.shape:
            raise ValueError(f"encoded[{i}] must have {total.size} values like encoded[0]. Found {a.size}")
        else:
            total += a
    if total is None:
        raise ValueError("encoded must hold at least one vector. Found none")
    return _reduce_mod(total.view(np.int64), b)


def centred(residues: np.ndarray, bits: int) -> np.ndarray:
    """The centred representatives in [-2^(bits-1), 2^(bits-1)) (int64) of uint64 residues mod
    2^bits: r if r < 2^(bits-1), else r - 2^bits (by sign extension of the low ``bits`` bits)."""
    b = _integer("bits", bits, low=1, high=64)
    r = np.asarray(residues)
    if r.dtype != np.uint64:
        raise TypeError(f"residues must be uint64. Found dtype {r.dtype}")
    shift = 64 - b
    return (r << np.uint64(shift)).view(np.int64) >> np.int64(shift)


@dataclass(frozen=True)
class DecodeReport:
    """What the server can tell about a decoded sum (it is computed from the noised sum only,
    so it may be logged and shared).

    - ``num_inputs``: how many encodings the sum holds (None if not given);
    - ``max_abs``: the largest |centred value| of the sum, integer units;
    - ``wrap_probability``: `wrap_probability` of an honest sum of ``num_inputs`` inputs;
    - ``edge_level``: the level L of `sum_tail_level` at ``false_alarm``: an honest sum exceeds
      it in any coordinate with probability <= false_alarm;
    - ``suspect``: coordinates with |centred value| > L, i.e. near +-2^(bits-1): a wrap, an input
      that broke the encoding's bounds, or (with probability <= false_alarm) chance. None when
      L >= 2^(bits-1) (nothing is distinguishable) or num_inputs was not given.

    The level exists below the edge only when ``false_alarm`` exceeds ``wrap_probability``
    (the tail at the edge IS the wrap probability); the default 1e-3 flags the outer part of the
    range of a configuration chosen for a wrap probability of 1e-6.

    What CAN be detected: a coordinate whose true sum left [-2^(bits-1), 2^(bits-1)) by less than
    2^(bits-1) - L lands, after the wrap, beyond L on the other side, and is counted; so is any
    coordinate an out-of-bounds input pushed beyond L. What CANNOT: a wrap that lands within
    [-L, L] (a far wrap, e.g. by a malicious input of arbitrary size, lands there with
    probability about L / 2^(bits-1) per coordinate) looks like an honest value; and when the
    bits are too few for the configuration (L >= 2^(bits-1), ``wrap_probability`` near 1) the
    sum is ambiguous and nothing can be flagged: choose the bits with `choose_scale` /
    `wrap_probability` instead.
    """

    num_inputs: int | None
    max_abs: int
    wrap_probability: float | None
    edge_level: float | None
    suspect: int | None
    false_alarm: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def decode_sum(summed: Any, params: DistributedNoiseParams, num_inputs: int | None = None, *, false_alarm: float = 1e-3) -> tuple[dict[str, np.ndarray], DecodeReport]:
    """(dict of float64 arrays in the layout, `DecodeReport`) from the sum mod 2^bits of
    ``num_inputs`` encodings: centred representatives s in [-2^(bits-1), 2^(bits-1)),
    times gamma, inverse rotation, padding dropped, unflattened. The result is the sum of the
    clipped contributions plus gamma times (rounding errors + summed noise), rotated back.

    ``num_inputs`` (recommended) enables wrap detection and is checked against
    ``params.min_inputs``: a sum of fewer inputs holds less noise than was charged and is refused.
    """
    if not isinstance(params, DistributedNoiseParams):
        raise TypeError(f"params must be DistributedNoiseParams. Found {_found(params)}")
    a = np.asarray(summed)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise TypeError(f"summed must be a 1-D integer vector (uint64 from the secure sum). Found dtype {a.dtype}, shape {a.shape}")
    if a.size != params.padded_dim:
        raise ValueError(f"summed must have padded_dim = {params.padded_dim} values. Found {a.size}")
    if a.dtype.kind == "i" and a.size and int(a.min()) < 0:
        raise ValueError(f"summed must hold values in [0, 2^{params.bits}). Found {int(a.min())}")
    r = a.astype(np.uint64)
    if params.bits < 64 and a.size and int(r.max()) >= 1 << params.bits:
        raise ValueError(f"summed must hold values in [0, 2^{params.bits}) (reduced mod 2^bits). Found {int(r.max())}")
    if num_inputs is not None:
        num_inputs = _integer("num_inputs", num_inputs, low=1)
        if num_inputs < params.min_inputs:
            raise ValueError(
                f"num_inputs must be >= min_inputs = {params.min_inputs}: a sum of fewer inputs holds less noise than was charged. Found {num_inputs}"
            )
    fa = _real("false_alarm", false_alarm, low=0.0, high=1.0)
    s = centred(r, params.bits)
    mag = np.abs(s.astype(np.float64))
    wrap_p = level = suspect = None
    if num_inputs is not None:
        wrap_p = params.wrap_probability(num_inputs)
        level = sum_tail_level(false_alarm=fa, clip_norm=params.clip_norm, scale=params.scale, dim=params.padded_dim, n=num_inputs, mechanism=params.mechanism, sigma=params.sigma, variance=params.variance)
        if level < 2.0 ** (params.bits - 1):
            suspect = int(np.count_nonzero(mag > level))
    y = s.astype(np.float64) * params.gamma
    x = params.rotation.unrotate(y)
    report = DecodeReport(num_inputs=num_inputs, max_abs=int(mag.max()) if mag.size else 0, wrap_probability=wrap_p, edge_level=level, suspect=suspect, false_alarm=fa)
    return unflatten(x, params.layout), report
