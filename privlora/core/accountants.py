"""privlora's side of privacy accounting: Opacus's PRV accountant, and short helpers.

The accounting itself (ledger, accountants, admission, calibration, reports) lives in
`accounting`, which never imports torch. Opacus's PRV accountant (Gopi et al. 2021) needs torch
(importing opacus does), so it lives here and is offered to `accounting` under the name ``prv``
through the ``accounting.accountants`` entry point in pyproject.toml: `accounting.get_accountant("prv")`
loads it on first use, whether or not anything from privlora was imported before.
"""

from __future__ import annotations

from collections.abc import Iterable

from accounting import Accountant, SubsampledGaussian, calibrate_noise, get_accountant
from accounting.accountants import HistoryKey


class OpacusPRVAccountant(Accountant):
    """Opacus PRVAccountant: an upper bound on epsilon within ``error`` (its eps_error)."""

    name = "prv"
    library = "opacus"
    error = 0.01
    description = "Opacus's privacy random variable accountant (eps_error 0.01)"

    def _epsilon(self, key: HistoryKey, delta: float) -> float:
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
        acc.history = [(s, q, n) for s, q, n in key]
        return acc.get_epsilon(delta=delta, eps_error=self.error)



def epsilon(history: Iterable[SubsampledGaussian], delta: float, accountant: str = "pld") -> float:
    """Epsilon at ``delta`` of composing every release in ``history`` (0.0 for none)."""
    return get_accountant(accountant).epsilon(list(history), delta)


__all__ = ["OpacusPRVAccountant", "calibrate_noise", "epsilon", "get_accountant"]
