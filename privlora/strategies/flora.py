"""FLoRA (Wang et al. 2024): stacking heterogeneous-rank adapters, merged into the base each round.

The mathematics. Client k trains a LoRA adapter of rank r_k with peft scaling
``s = lora_alpha_k / r_k``, the same ``s`` on every client (`privlora.tasks.adapters`: one scaling
``s = lora.alpha / lora.r`` for the federation, ``lora_alpha_k = s * r_k``), so its update to a
layer's weight is ``s * B_k A_k`` (B_k: d_out x r_k, A_k: r_k x d_in). With
``p_k = w_k / sum_j w_j`` over the clients that contributed this round (``w_k = n_k`` or 1, see
``federation.weighting``), the round's update is

    Delta W = s * sum_k p_k B_k A_k = s * [B_1 .. B_K] [p_1 A_1; ..; p_K A_K],

the product of the stacked matrices. It is exact for any mix of ranks and any subset of clients.
After each round the server adds ``Delta W`` to the frozen base weight of every adapted layer,
and every client starts the next round from a fresh adapter (A drawn by peft's initialiser,
B = 0), so the global adapter's rank never grows. The classification head (peft's
modules_to_save) is averaged with the same p_k.

Both forms run over a plain sum (`base.sum_states`) and never need sum_j w_j on the client: a
client contributes ``w_k * (its tensors)`` and ``w_k``; `finish` divides by the summed weight.

- ``form="product"``: contribution = ``w_k B_k A_k``, dense (d_out x d_in) per adapted layer.
  The sum is ``sum_k w_k B_k A_k``; finish gives ``s / sum w * sum``. Exact, and the individual
  products are hidden under secure aggregation. Upload per client per layer: d_out * d_in values.
- ``form="slot"``: every client owns a fixed, disjoint slot of rows in the stacked A (and the
  same columns in the stacked B): client k's slot starts at ``r_0 + .. + r_{k-1}`` over the
  whole federation's ranks (``client_ranks``), so both sides derive the layout from the config.
  Contribution = ``w_k A_k`` placed in A's slot, ``B_k`` in B's slot, zeros elsewhere. The sum IS
  the stack ``[w_1 A_1; ..]``, ``[B_1 ..]``; finish computes ``s * B_stack (A_stack / sum w)``.
  Exact and low-rank (a client uploads r_k (d_in + d_out) values per layer: its own slot; the
  zeros of other slots are not sent in a real deployment), but the sum reveals every client's
  block, so secure aggregation would hide nothing: ``secagg_compatible`` is False and
  `check_secure_aggregation` refuses it, pointing at the product form.

The global state. Besides the adapter at the global rank (A as initialised, B = 0, the averaged
head), the global state carries the cumulative merged update of every adapted layer under
``BASE_DELTA_PREFIX + <module>.base_layer.weight`` (dense, d_out x d_in, float32). The server
applies it to its own model's base weights; the broadcast sends it to every client, which adds
it to its copy of the base before training (`Strategy.base_update`). Nothing is shared between
server and clients: a client that skipped rounds (partial participation) still receives the
whole merged model. This is FLoRA's real download cost: d_out * d_in values per adapted layer
every round, on top of the head — in exchange the upload is an adapter (slot form) and the
adapter trained is always fresh. (The FLoRA paper broadcasts the stacked factors instead, which
assumes every client keeps every past round's merge.) Server momentum (`privlora.strategies.fedavgm`)
applied to this state is FedAvgM on the merged weights.
"""

from __future__ import annotations

import numpy as np

from privlora.strategies.base import (
    BASE_DELTA_PREFIX,
    WEIGHT_KEY,
    WIRE_BYTES_PER_VALUE,
    State,
    Strategy,
    base_weight_name,
    client_weight,
    is_base_delta,
    is_lora_a,
    is_lora_b,
    lora_pairs,
)

FORMS = ("product", "slot")
PRODUCT_PREFIX = "flora_product/"
SECAGG_REFUSAL = (
    "federation.flora_form = 'slot' places each client's factors in its own slot of the stacked "
    "matrices, so the sum the server receives contains every client's block: secure aggregation "
    "would hide nothing. Use federation.flora_form = 'product' (exact too, hidden under secure "
    "aggregation, uploads d_out x d_in values per adapted layer), or run without secure aggregation."
)


def delta_key(module: str) -> str:
    """Global-state key of the cumulative merged update of a LoRA module's base weight."""
    return BASE_DELTA_PREFIX + base_weight_name(module)


def slot_offsets(client_ranks: tuple[int, ...] | list[int]) -> tuple[list[int], int]:
    """Start row of every client's slot in the stacked A, and the stack's total rank."""
    offsets, total = [], 0
    for r in client_ranks:
        if r < 1:
            raise ValueError(f"client ranks must be >= 1, found {list(client_ranks)}")
        offsets.append(total)
        total += int(r)
    return offsets, total


class FLoRA(Strategy):
    name = "flora"
    exact = True
    heterogeneous_ranks = True
    merges_into_base = True

    def __init__(
        self,
        max_rank: int,
        scaling: float,
        form: str = "product",
        client_ranks: tuple[int, ...] | list[int] = (),
        weighting: str = "num_examples",
    ):
        """``scaling`` is the federation's ``s = lora.alpha / lora.r``; ``client_ranks`` (every
        client's rank, by client id) fixes the slot layout and is required for the slot form."""
        super().__init__(max_rank, weighting)
        if form not in FORMS:
            raise ValueError(f"federation.flora_form: {form!r} is not one of {', '.join(map(repr, FORMS))}")
        if not (np.isfinite(scaling) and scaling > 0):
            raise ValueError(f"FLoRA needs the LoRA scaling lora.alpha / lora.r > 0, found {scaling}")
        self.form = form
        self.scaling = float(scaling)
        self.client_ranks = tuple(int(r) for r in client_ranks)
        if form == "slot":
            if not self.client_ranks:
                raise ValueError("FLoRA's slot form needs client_ranks (every client's rank) to lay out the slots")
            if max(self.client_ranks) > max_rank:
                raise ValueError(f"client ranks {self.client_ranks} exceed max_rank {max_rank}")
        self.offsets, self.total_rank = slot_offsets(self.client_ranks) if self.client_ranks else ([], 0)
        self.secagg_compatible = form == "product"

    # ------------------------------------------------------------------ global state
    def initial_state(self, template: State) -> State:
        """The template adapter with B = 0, plus a zero cumulative delta for every LoRA module."""
        out = {k: (np.zeros_like(v) if is_lora_b(k) else v.copy()) for k, v in template.items()}
        for module, a_key, b_key in lora_pairs(template):
            out[delta_key(module)] = np.zeros((template[b_key].shape[0], template[a_key].shape[1]), dtype=np.float32)
        return out

    def broadcast(self, global_state: State, rank: int) -> State:
        """The head and the cumulative merged deltas; no factors (every round starts fresh)."""
        return {k: v.copy() for k, v in global_state.items() if not (is_lora_a(k) or is_lora_b(k))}

    def local_start(self, payload: State, template: State) -> State:
        """A fresh adapter: the template's A (peft's random init on the client), B = 0, and the
        global head. The payload's base deltas are applied to the base by the client
        (`base_update`), not loaded here."""
        out = {}
        for k, v in template.items():
            if is_lora_a(k):
                out[k] = v.copy()
            elif is_lora_b(k):
                out[k] = np.zeros_like(v)
            else:
                if k not in payload:
                    raise ValueError(f"flora payload lacks {k}")
                if payload[k].shape != v.shape:
                    raise ValueError(f"flora payload {k}: shape {payload[k].shape}, client expects {v.shape}")
                out[k] = payload[k].astype(v.dtype)
        return out

    # ------------------------------------------------------------------ client half
    def contribution(self, local_state: State, num_examples: int, rank: int, client_id: int | None = None) -> State:
        w = client_weight(num_examples, self.weighting)
        out: State = {}
        pairs = lora_pairs(local_state)
        for module, a_key, b_key in pairs:
            a = local_state[a_key].astype(np.float64)
            b = local_state[b_key].astype(np.float64)
            if a.shape[0] != rank:
                raise ValueError(f"{module}: adapter rank {a.shape[0]} differs from the client's rank {rank}")
            if self.form == "product":
                out[PRODUCT_PREFIX + module] = w * (b @ a)
            else:
                start = self._slot(client_id, rank)
                a_stack = np.zeros((self.total_rank, a.shape[1]))
                b_stack = np.zeros((b.shape[0], self.total_rank))
                a_stack[start : start + rank] = w * a
                b_stack[:, start : start + rank] = b
                out[a_key], out[b_key] = a_stack, b_stack
        paired = {k for _, a_key, b_key in pairs for k in (a_key, b_key)}
        for k, v in local_state.items():
            if k not in paired and not is_base_delta(k):
                out[k] = w * v.astype(np.float64)
        out[WEIGHT_KEY] = np.array([w], dtype=np.float64)
        return out

    def _slot(self, client_id: int | None, rank: int) -> int:
        if client_id is None:
            raise ValueError("FLoRA's slot form needs the client id to find the client's slot")
        if not 0 <= client_id < len(self.client_ranks):
            raise ValueError(f"client {client_id} has no slot: the layout covers clients 0..{len(self.client_ranks) - 1}")
        if rank != self.client_ranks[client_id]:
            raise ValueError(f"client {client_id} trained rank {rank}, but its slot holds rank {self.client_ranks[client_id]}")
        return self.offsets[client_id]

    def upload_bytes(self, contribution: State, rank: int) -> int:
        """Product form: every value. Slot form: only the client's own slot (r_k rows of A,
        r_k columns of B per layer) — the other slots are zeros a real client does not send."""
        if self.form == "product":
            return super().upload_bytes(contribution, rank)
        values = 0
        for k, v in contribution.items():
            if is_lora_a(k):
                values += rank * v.shape[1]
            elif is_lora_b(k):
                values += v.shape[0] * rank
            else:
                values += int(np.size(v))
        return values * WIRE_BYTES_PER_VALUE

    # ------------------------------------------------------------------ server half
    def round_delta(self, summed: State) -> State:
        """This round's merged update ``s * sum_k p_k B_k A_k`` by base parameter name (float64)."""
        total = self._total_weight(summed)
        out = {}
        if self.form == "product":
            for k, v in summed.items():
                if k.startswith(PRODUCT_PREFIX):
                    out[base_weight_name(k[len(PRODUCT_PREFIX) :])] = (self.scaling / total) * v
        else:
            for module, b_stack, a_stack in self.stacked(summed):
                out[base_weight_name(module)] = self.scaling * (b_stack @ a_stack)
        if not out:
            raise ValueError("the summed contributions hold no FLoRA factors or products")
        return out

    def stacked(self, summed: State) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Slot form: ``(module, [B_1 .. B_K], [p_1 A_1; ..; p_K A_K])`` for every LoRA module
        (empty slots of clients that did not contribute are zero)."""
        if self.form != "slot":
            raise ValueError("only the slot form has stacked factors; the product form sums dense products")
        total = self._total_weight(summed)
        return [(m, summed[b], summed[a] / total) for m, a, b in lora_pairs(summed)]

    def finish(self, summed: State, global_state: State) -> State:
        """Fold this round's update into the cumulative base deltas; restart the adapter
        (B = 0, A as it was); average the head."""
        total = self._total_weight(summed)
        delta = self.round_delta(summed)
        out = {}
        for k, v in global_state.items():
            if is_base_delta(k):
                name = k[len(BASE_DELTA_PREFIX) :]
                if name not in delta:
                    raise ValueError(f"no client contributed an update for {name}")
                out[k] = (v.astype(np.float64) + delta[name]).astype(v.dtype)
            elif is_lora_b(k):
                out[k] = np.zeros_like(v)
            elif is_lora_a(k):
                out[k] = v.copy()
            else:
                out[k] = (summed[k] / total).astype(v.dtype)
        return out

    def check_secure_aggregation(self) -> None:
        if not self.secagg_compatible:
            raise ValueError(SECAGG_REFUSAL)


def delta_to_lora(delta: np.ndarray, scaling: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(B, A)`` of ``rank`` with ``scaling * B @ A == delta`` (truncated SVD).

    Exact up to float error when ``rank >= numerical_rank(delta)``; columns beyond the
    delta's rank are zero. Used to save a merged FLoRA model as a peft adapter on the
    original base model.
    """
    u, sv, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    k = min(rank, sv.shape[0])
    b = np.zeros((delta.shape[0], rank))
    a = np.zeros((rank, delta.shape[1]))
    b[:, :k] = u[:, :k] * (sv[:k] / scaling)
    a[:k] = vt[:k]
    return b.astype(np.float32), a.astype(np.float32)


def numerical_rank(delta: np.ndarray) -> int:
    """Rank of ``delta`` at float32 resolution (singular values above max * max(shape) * eps)."""
    sv = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    if sv.size == 0 or sv[0] == 0:
        return 0
    tol = sv[0] * max(delta.shape) * np.finfo(np.float32).eps
    return int((sv > tol).sum())
