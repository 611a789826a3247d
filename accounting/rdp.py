"""Renyi DP of the Poisson-subsampled Gaussian at integer orders: a fast, sound upper bound.

For sampling probability q and noise multiplier sigma, one step has RDP at integer order
alpha >= 2 (Mironov, Talwar & Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism", Sec. 3.3, add/remove-one adjacency):

    RDP(alpha) = log A_alpha / (alpha - 1),
    A_alpha    = sum_{k=0..alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)).

RDP composes by addition, so a history is a vector ``sum_j steps_j * RDP_j`` over the orders,
and (epsilon, delta) follows from the conversion of Canonne, Kamath & Steinke (2020, Prop. 12),
as dp_accounting uses it:

    epsilon = min_alpha  RDP(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1).

Integer orders only: the bound is sound but a little looser than accountants that also use
fractional orders; it is used where speed matters (admission pre-checks), never to report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import numpy as np
from scipy.special import gammaln

ORDERS = np.array(list(range(2, 65)) + [72, 80, 96, 112, 128, 160, 192, 256], dtype=np.int64)


_K = np.arange(ORDERS.max() + 1, dtype=np.float64)[None, :]
_A = ORDERS.astype(np.float64)[:, None]
_VALID = _K <= _A
with np.errstate(invalid="ignore"):
    _LOG_BINOM = np.where(_VALID, gammaln(_A + 1) - gammaln(_K + 1) - gammaln(np.maximum(_A - _K, 0) + 1), 0.0)


@functools.lru_cache(maxsize=65536)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    sigma2 = float(noise_multiplier) ** 2
    q = float(sample_rate)
    if q == 1.0:
        out = ORDERS / (2.0 * sigma2)
        out.flags.writeable = False
        return out
    log_q, log_1mq = math.log(q), math.log1p(-q)
    # all orders at once: row i holds the terms k = 0..alpha_i of A_alpha_i (the rest masked out)
    terms = _LOG_BINOM + (_A - _K) * log_1mq + _K * log_q + (_K * _K - _K) / (2.0 * sigma2)
    terms = np.where(_VALID, terms, -np.inf)
    top = terms.max(axis=1, keepdims=True)
    out = (top[:, 0] + np.log(np.exp(terms - top).sum(axis=1))) / (ORDERS - 1)
    out.flags.writeable = False
    return out


def rdp_vector(history: Iterable[tuple[float, float, int]]) -> np.ndarray:
    """RDP at `ORDERS` of composing ``steps`` steps of each (noise_multiplier, sample_rate, steps)."""
    total = np.zeros(len(ORDERS))
    for sigma, q, steps in history:
        if steps:
            total += steps * _rdp_one_step(float(sigma), float(q))
    return total


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """Smallest epsilon at ``delta`` over the orders (Canonne, Kamath & Steinke 2020)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1). Found {delta!r}")
    a = ORDERS.astype(np.float64)
    eps = rdp + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
    return float(max(0.0, np.min(eps)))
