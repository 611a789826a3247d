"""Aggregation strategies, one file per method: `fedit`, `ffa`, `flora`, `hetlora`.

``strategy_from_config(cfg)`` builds the strategy a run's config asks for; server and every
client each build their own object from the same config (nothing is shared between them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from privlora.strategies.base import BASE_DELTA_PREFIX, WEIGHT_KEY, State, Strategy, sum_states, wire_bytes
from privlora.strategies.fedit import FedIT, cross_term_error
from privlora.strategies.ffa import FFALoRA, shared_lora_a
from privlora.strategies.flora import FLoRA
from privlora.strategies.hetlora import HetLoRA

if TYPE_CHECKING:  # pragma: no cover
    from privlora.core.config import ExperimentConfig

NAMES = ("fedit", "ffa", "flora", "hetlora")


def make_strategy(name: str, max_rank: int, seed: int, weighting: str = "num_examples", **options: Any) -> Strategy:
    """A strategy by name. ``options`` go to the method's constructor: FLoRA needs
    ``scaling`` (lora.alpha / lora.r) and takes ``form`` and ``client_ranks``; HetLoRA takes
    ``prune``, ``penalty``, ``decay``, ``threshold``, ``norm_scope``."""
    if name == "fedit":
        return FedIT(max_rank, weighting, **options)
    if name == "ffa":
        return FFALoRA(max_rank, seed, weighting, **options)
    if name == "flora":
        if "scaling" not in options:
            raise ValueError("strategy 'flora' needs scaling=lora.alpha/lora.r to merge updates; build it with strategy_from_config(cfg)")
        return FLoRA(max_rank, weighting=weighting, **options)
    if name == "hetlora":
        return HetLoRA(max_rank, weighting=weighting, **options)
    raise ValueError(f"federation.strategy: {name!r} is not one of {', '.join(map(repr, NAMES))}")


def strategy_from_config(cfg: "ExperimentConfig") -> Strategy:
    """The strategy ``cfg.federation.strategy`` with every option the config sets."""
    f = cfg.federation
    options: dict[str, Any] = {}
    if f.strategy == "flora":
        options = {"scaling": cfg.lora.alpha / cfg.lora.r, "form": f.flora_form, "client_ranks": cfg.client_ranks()}
    elif f.strategy == "hetlora":
        options = {
            "prune": f.hetlora_prune,
            "penalty": f.hetlora_penalty,
            "decay": f.hetlora_decay,
            "threshold": f.hetlora_threshold,
            "norm_scope": f.hetlora_norm_scope,
        }
    return make_strategy(f.strategy, cfg.max_rank, cfg.seed, f.weighting, **options)


__all__ = [
    "BASE_DELTA_PREFIX",
    "WEIGHT_KEY",
    "FFALoRA",
    "FLoRA",
    "FedIT",
    "HetLoRA",
    "State",
    "Strategy",
    "cross_term_error",
    "make_strategy",
    "shared_lora_a",
    "strategy_from_config",
    "sum_states",
    "wire_bytes",
]
