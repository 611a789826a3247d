"""Masked secure aggregation (Bonawitz et al. 2017; SecAgg+ of Bell et al. 2020).

Not implemented yet: today privlora sums contributions in the clear, and SECURITY.md says so.
This package will never import torch or `accounting`.
"""
