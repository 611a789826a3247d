"""Aggregation strategies, one file per method: `fedit`, `ffa`."""

from __future__ import annotations

from .base import WEIGHT_KEY, State, Strategy, sum_states
from .fedit import FedIT
from .ffa import FFALoRA, shared_lora_a


def make_strategy(name: str, max_rank: int, seed: int, weighting: str = "num_examples") -> Strategy:
    if name == "fedit":
        return FedIT(max_rank, weighting)
    if name == "ffa":
        return FFALoRA(max_rank, seed, weighting)
    raise ValueError(f"federation.strategy: {name!r} is not one of 'fedit', 'ffa'")


__all__ = ["WEIGHT_KEY", "FFALoRA", "FedIT", "State", "Strategy", "make_strategy", "shared_lora_a", "sum_states"]
