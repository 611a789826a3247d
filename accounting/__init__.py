"""Privacy accounting for privlora: what each client released, and what it cost.

- `SubsampledGaussian` (mechanism.py): the record of one client's DP-SGD release in one round;
- `Ledger` (ledger.py): the append-only, hash-chained file of those records;
- accountants (accountants.py): PLD (tight, the default), RDP, and a registry for more;
- `Admission` (budget.py): who may take part in the next round without exceeding a budget;
- `calibrate_noise` (calibration.py): the smallest noise multiplier that meets a target;
- `DistributedDiscreteGaussian` / `DistributedSkellam` (distributed_dp.py): client-level releases
  noised in the integers before secure aggregation, their Renyi bounds and epsilon;
- `privacy_summary` / `render_privacy_statement` (report.py) and `verify_run` (verify.py).

This package never imports torch or `secagg`.
"""

from .accountants import Accountant, PLDAccountant, RDPAccountant, available_accountants, get_accountant, history_key, register_accountant
from .budget import Admission, Decision, delta_warning
from .calibration import calibrate_noise
from .distributed_dp import DistributedDiscreteGaussian, DistributedSkellam, calibrate_distributed_noise, distributed_epsilon, release_from_dict
from .ledger import Charge, Ledger, LedgerError
from .mechanism import SubsampledGaussian
from .report import plot_epsilon, privacy_summary, render_privacy_statement
from .verify import ClientLedgerResult, VerifyResult, verify_client_ledger, verify_run

__all__ = [
    "Accountant",
    "Admission",
    "Charge",
    "ClientLedgerResult",
    "Decision",
    "DistributedDiscreteGaussian",
    "DistributedSkellam",
    "Ledger",
    "LedgerError",
    "PLDAccountant",
    "RDPAccountant",
    "SubsampledGaussian",
    "VerifyResult",
    "available_accountants",
    "calibrate_distributed_noise",
    "calibrate_noise",
    "delta_warning",
    "distributed_epsilon",
    "get_accountant",
    "history_key",
    "plot_epsilon",
    "privacy_summary",
    "register_accountant",
    "release_from_dict",
    "render_privacy_statement",
    "verify_client_ledger",
    "verify_run",
]
