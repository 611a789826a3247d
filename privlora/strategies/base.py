"""The strategy interface: every aggregation is a sum.

A strategy has a client half and a server half, and the transport between them only ever adds
(in the clear here; under secure aggregation in `secagg`):

- ``broadcast(global_state, rank)``: what the server sends a client of that rank;
- ``local_start(payload, template)``: on the client, the adapter state it trains from, built
  from the payload and its own freshly initialised adapter (``template``, right shapes);
- ``contribution(local_state, num_examples, rank)``: what this client adds to the sum. Weights
  come from sums too: a client adds ``w_k * tensors`` and ``w_k`` itself under ``WEIGHT_KEY``,
  so the server divides by the summed weight and never sees a single client's weight alone
  once the sum is taken under secure aggregation;
- ``finish(summed, global_state)``: on the server, the new global state.

All states are ``dict[str, np.ndarray]`` under peft's saved names (see `privlora.adapters`).
Strategies are pure numpy: testable without a model, a network, or torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

WEIGHT_KEY = "__weight__"
State = dict[str, np.ndarray]


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def pad_rank(key: str, value: np.ndarray, rank: int) -> np.ndarray:
    """Zero-pad a LoRA factor to ``rank``: rows of A (r x d_in), columns of B (d_out x r)."""
    if is_lora_a(key):
        out = np.zeros((rank, value.shape[1]), dtype=value.dtype)
        out[: value.shape[0]] = value
        return out
    if is_lora_b(key):
        out = np.zeros((value.shape[0], rank), dtype=value.dtype)
        out[:, : value.shape[1]] = value
        return out
    return value


def truncate_rank(key: str, value: np.ndarray, rank: int) -> np.ndarray:
    """Keep the first ``rank`` rows of A or columns of B; other tensors pass through."""
    if is_lora_a(key):
        return np.ascontiguousarray(value[:rank])
    if is_lora_b(key):
        return np.ascontiguousarray(value[:, :rank])
    return value


def client_weight(num_examples: int, weighting: str) -> float:
    """p_k before normalisation: n_k for 'num_examples', 1 for 'uniform'."""
    if weighting == "num_examples":
        return float(num_examples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"federation.weighting: {weighting!r} is not one of 'num_examples', 'uniform'")


class Strategy(ABC):
    """Base class; see the module docstring for the contract."""

    name: str = "abstract"
    exact: bool = False
    heterogeneous_ranks: bool = False

    def __init__(self, max_rank: int, weighting: str = "num_examples"):
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, found {max_rank}")
        self.max_rank = max_rank
        self.weighting = weighting
        client_weight(1, weighting)  # validate early

    def frozen(self, key: str) -> bool:
        """True for adapter tensors the client must not train."""
        return False

    def initial_state(self, template: State) -> State:
        """The round-0 global state, built from a freshly initialised adapter at max rank."""
        return {k: v.copy() for k, v in template.items()}

    @abstractmethod
    def broadcast(self, global_state: State, rank: int) -> State: ...

    @abstractmethod
    def local_start(self, payload: State, template: State) -> State: ...

    @abstractmethod
    def contribution(self, local_state: State, num_examples: int, rank: int) -> State: ...

    @abstractmethod
    def finish(self, summed: State, global_state: State) -> State: ...

    # shared helpers ----------------------------------------------------------------
    def _weighted(self, tensors: State, num_examples: int) -> State:
        w = client_weight(num_examples, self.weighting)
        out = {k: (w * v).astype(np.float64) for k, v in tensors.items()}
        out[WEIGHT_KEY] = np.array([w], dtype=np.float64)
        return out

    @staticmethod
    def _total_weight(summed: State) -> float:
        if WEIGHT_KEY not in summed:
            raise ValueError(f"summed contribution lacks {WEIGHT_KEY!r}; was it produced by contribution()?")
        total = float(summed[WEIGHT_KEY][0])
        if not total > 0:
            raise ValueError(f"summed weight is {total}; no client contributed this round")
        return total


def sum_states(states: list[State]) -> State:
    """The plain (in-the-clear) transport: the key-wise sum of contributions."""
    if not states:
        raise ValueError("no contributions to sum")
    keys = set(states[0])
    out = {k: np.zeros_like(v, dtype=np.float64) for k, v in states[0].items()}
    for s in states:
        if set(s) != keys:
            raise ValueError("contributions have different keys; every client must contribute the same tensors")
        for k, v in s.items():
            if v.shape != out[k].shape:
                raise ValueError(f"contribution {k}: shape {v.shape} differs from {out[k].shape}")
            out[k] += v
    return out
