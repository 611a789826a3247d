"""Privacy accounting for privlora: what each client released, and what it cost.

- `SubsampledGaussian` (mechanism.py): the record of one client's DP-SGD release in one round;
- `Ledger` (ledger.py): the append-only, hash-chained file of those records;
- accountants (accountants.py): PLD (tight, the default), RDP, and a registry for more;
- `Admission` (budget.py): who may take part in the next round without exceeding a budget;
- `calibrate_noise` (calibration.py): the smallest noise multiplier that meets a target;
- `privacy_summary` / `render_privacy_statement` (report.py) and `verify_run` (verify.py).

This package never imports torch or `secagg`.
"""

from .accountants import Accountant, PLDAccountant, RDPAccountant, available_accountants, get_accountant, history_key, register_accountant
from .budget import Admission, Decision, delta_warning
from .calibration import calibrate_noise
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
    "Ledger",
    "LedgerError",
    "PLDAccountant",
    "RDPAccountant",
    "SubsampledGaussian",
    "VerifyResult",
    "available_accountants",
    "calibrate_noise",
    "delta_warning",
    "get_accountant",
    "history_key",
    "plot_epsilon",
    "privacy_summary",
    "register_accountant",
    "render_privacy_statement",
    "verify_client_ledger",
    "verify_run",
]
