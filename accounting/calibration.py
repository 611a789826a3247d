"""Noise calibration: the smallest noise multiplier that keeps a planned run within a target.

A client that plans ``steps`` DP-SGD steps at Poisson sample rate ``q`` (all its rounds times its
local steps: calibration assumes it trains in every round, so taking part in fewer rounds only
spends less) gets the smallest sigma whose epsilon at ``delta``, by the named accountant, is at
most the target. Bisection on sigma, where epsilon decreases; the returned value is always the
upper end of the bracket, which *satisfies* the target for that accountant exactly (not just
within the search tolerance).
"""

from __future__ import annotations

import functools

from .accountants import get_accountant


@functools.lru_cache(maxsize=512)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld", rel_tol: float = 0.002
) -> float:
    """Smallest noise multiplier (to ``rel_tol``) with epsilon(sigma, q, steps) <= target_epsilon."""
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError(
            f"cannot calibrate: need target_epsilon > 0, 0 < delta < 1, 0 < sample_rate <= 1 and steps >= 1; "
            f"found epsilon={target_epsilon}, delta={delta}, q={sample_rate}, steps={steps}"
        )
    acc = get_accountant(accountant)

    def eps(sigma: float) -> float:
        return acc.epsilon(((sigma, float(sample_rate), int(steps)),), delta)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"target epsilon {target_epsilon} is unreachable with a noise multiplier below 1e4")
    lo = hi / 2.0
    while lo > 0.05 and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2.0
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
