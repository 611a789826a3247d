"""Privacy accounting for privlora: what each client released, and what it cost.

This package never imports torch or `secagg`. Today it holds the record of one DP release
(`SubsampledGaussian`); the hash-chained ledger, budgets and audit reports build on it.
"""

from .mechanism import SubsampledGaussian

__all__ = ["SubsampledGaussian"]
