"""Per-client DP parameters: noise calibration and epsilon from a client's own history.

Both use Opacus's accountants (PRV by default: Gopi et al. 2021, which returns an upper bound
of epsilon within ``eps_error``; RDP as the alternative). A client's history is the list of
(noise_multiplier, sample_rate, steps) of every round it trained in; client sampling by the
server is *not* used to amplify privacy, so a client that sits out a round is simply not charged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from accounting import SubsampledGaussian


def epsilon(history: Iterable[SubsampledGaussian], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of composing every release in ``history`` (0.0 for none)."""
    from opacus.accountants import create_accountant

    entries = [(h.noise_multiplier, h.sample_rate, h.steps) for h in history if h.steps > 0]
    if not entries:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = entries
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv", rel_tol: float = 0.002
) -> float:
    """Smallest noise multiplier (to ``rel_tol``) whose epsilon after ``steps`` is <= target.

    Bisection on the accountant's epsilon, which decreases in sigma. The bracket's upper end
    always satisfies the target, and that end is returned, so the promise holds exactly for the
    accountant used (not just within a search tolerance).
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError(f"cannot calibrate: epsilon={target_epsilon}, delta={delta}, q={sample_rate}, steps={steps}")

    def eps(sigma: float) -> float:
        return epsilon([SubsampledGaussian(sigma, sample_rate, steps, 1.0, delta)], delta, accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > 1e4:
            raise ValueError(f"privacy.target_epsilon: {target_epsilon} is unreachable with noise below 1e4")
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


class PrivacyTracker:
    """Each client's releases so far, and its epsilon from them alone.

    ``charge`` is called for a client's release before its update reaches aggregation; the
    full hash-chained ledger (`accounting`) will take this place. Epsilons are cached per client
    until its next charge.
    """

    def __init__(self, delta: float, accountant: str = "prv"):
        self.delta = delta
        self.accountant = accountant
        self.history: dict[int, list[tuple[int, SubsampledGaussian]]] = {}
        self._cache: dict[int, float] = {}

    def charge(self, client: int, rnd: int, mechanism: SubsampledGaussian) -> None:
        self.history.setdefault(client, []).append((rnd, mechanism))
        self._cache.pop(client, None)

    def epsilon(self, client: int) -> float:
        if client not in self._cache:
            self._cache[client] = epsilon([m for _, m in self.history.get(client, [])], self.delta, self.accountant)
        return self._cache[client]
