"""The strategy interface: every aggregation is a sum.

A strategy has a client half and a server half, and the transport between them only ever adds
(in the clear here; under secure aggregation in `secagg`):

- ``broadcast(global_state, rank)``: what the server sends a client of that rank;
- ``local_start(payload, template)``: on the client, the adapter state it trains from, built
  from the payload and its own freshly initialised adapter (``template``, right shapes);
- ``contribution(local_state, num_examples, rank, client_id)``: what this client adds to the sum.
  Weights come from sums too: a client adds ``w_k * tensors`` and ``w_k`` itself under
  ``WEIGHT_KEY``, so the server divides by the summed weight and never sees a single client's
  weight alone once the sum is taken under secure aggregation;
- ``finish(summed, global_state)``: on the server, the new global state.

Optional hooks, with defaults that do nothing, for the methods that need them:

- ``penalty(rank)``: a parameter-only regulariser for local training (HetLoRA's tail penalty);
- ``prune(local_state, rank)``: after local training, the state and rank to report (HetLoRA's
  rank self-pruning; the client's rank can only shrink);
- ``base_update(payload)``: dense deltas the client adds to its frozen base weights before
  training (FLoRA merges every round's update into the base).

All states are ``dict[str, np.ndarray]`` under peft's saved names (see `privlora.tasks.adapters`). A
global state may also carry dense deltas to frozen base weights under
``BASE_DELTA_PREFIX + <peft parameter name>`` (FLoRA); `privlora.federation.server` and `privlora.federation.client`
apply them to the model instead of loading them into the adapter. Strategies are pure numpy —
testable without a model, a network or torch — except ``penalty``, which returns torch code.

Communication. ``upload_bytes`` and ``download_bytes`` give the bytes of tensor values a real
deployment sends (float32, 4 bytes a value), without message framing or headers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

WEIGHT_KEY = "__weight__"
BASE_DELTA_PREFIX = "base_delta/"
WIRE_BYTES_PER_VALUE = 4  # float32 on the wire
State = dict[str, np.ndarray]


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def is_base_delta(key: str) -> bool:
    """True for a dense delta to a frozen base weight (``BASE_DELTA_PREFIX + parameter name``)."""
    return key.startswith(BASE_DELTA_PREFIX)


def lora_pairs(state: State) -> list[tuple[str, str, str]]:
    """``(module, a_key, b_key)`` for every LoRA module in ``state``, in key order.

    ``module`` is the peft module path (``base_model.model.bert.encoder.layer.0.attention.self
    .query``); raises ValueError when an A has no matching B or the shapes do not pair up.
    """
    out = []
    for a_key in sorted(k for k in state if is_lora_a(k)):
        module = a_key[: a_key.index(".lora_A.")]
        b_key = a_key.replace(".lora_A.", ".lora_B.", 1)
        if b_key not in state:
            raise ValueError(f"{a_key} has no matching {b_key}")
        if state[a_key].shape[0] != state[b_key].shape[1]:
            raise ValueError(f"{module}: A is {state[a_key].shape}, B is {state[b_key].shape}; their ranks differ")
        out.append((module, a_key, b_key))
    return out


def base_weight_name(module: str) -> str:
    """The peft parameter name of the frozen weight under a LoRA module."""
    return f"{module}.base_layer.weight"


def wire_bytes(tensors: State) -> int:
    """Bytes of the values in ``tensors`` sent as float32."""
    return int(sum(int(np.size(v)) for v in tensors.values())) * WIRE_BYTES_PER_VALUE


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
    secagg_compatible: bool = True
    """False when the sum reveals each client's contribution anyway (FLoRA's slot form)."""
    merges_into_base: bool = False
    """True when the global state carries dense deltas to the base weights (FLoRA)."""

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
    def contribution(self, local_state: State, num_examples: int, rank: int, client_id: int | None = None) -> State: ...

    @abstractmethod
    def finish(self, summed: State, global_state: State) -> State: ...

    # optional hooks ------------------------------------------------------------------
    def penalty(self, rank: int):
        """A callable ``model -> torch scalar`` added to the local objective, or None.

        It must depend on the adapter parameters only (never on data): the client adds its
        gradient after Opacus has clipped and noised the data gradient, so it costs no privacy
        and is not clipped (see `privlora.federation.client`)."""
        return None

    def prune(self, local_state: State, rank: int) -> tuple[State, int]:
        """After local training: the state to contribute and the client's rank from now on."""
        return local_state, rank

    def incoming(self, template: State, rank: int) -> dict[str, tuple[int, ...]]:
        """The fields a client of ``rank`` accepts in a broadcast, name -> shape, given its fresh
        adapter ``template`` at that rank: exactly what `broadcast` sends a client of that rank
        (so dense base-weight deltas only for a strategy that merges, FLoRA). A client refuses an
        instruction carrying any other field (`privlora.federation.guard`)."""
        return {k: tuple(v.shape) for k, v in self.broadcast(self.initial_state(template), rank).items()}

    def base_update(self, payload: State) -> State:
        """Dense deltas (by peft parameter name) the client adds to its frozen base weights."""
        return {k[len(BASE_DELTA_PREFIX) :]: v for k, v in payload.items() if is_base_delta(k)}

    def upload_bytes(self, contribution: State, rank: int) -> int:
        """Bytes of tensor values one client uploads for this contribution (float32), at the
        shape the sum transport needs (padded to the global rank: secure aggregation masks
        fixed-length vectors). FLoRA's slot form, never run under secure aggregation, counts
        only the client's own slot."""
        return wire_bytes(contribution)

    def download_bytes(self, payload: State) -> int:
        """Bytes of tensor values one client downloads for this broadcast payload (float32)."""
        return wire_bytes(payload)

    def clear_sum_metrics(self, contributions: list[State], global_state: State) -> dict[str, float]:
        """Metrics only a sum in the clear can give, from the individual ``contributions`` of a
        round and the ``global_state`` the clients started from (names -> values, for the round's
        metrics line). None by default; under secure aggregation it is never called."""
        return {}

    def check_secure_aggregation(self) -> None:
        """Raise ValueError, saying why and what to use instead, if the sum this strategy
        computes would reveal individual contributions, so secure aggregation would hide nothing."""
        if not self.secagg_compatible:
            raise ValueError(f"strategy {self.name!r} cannot be used under secure aggregation")

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
