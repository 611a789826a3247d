"""HetLoRA (Cho et al. 2024): heterogeneous ranks by zero-padding, norm-weighted aggregation,
truncation on broadcast, and local rank self-pruning.

Distribution. The global adapter has the largest rank r_max. A client of rank r_k receives its
truncation: the first r_k rows of every A and the first r_k columns of every B.

Aggregation (the paper's sparsity-weighted aggregation). Client k's update to a layer is
``Delta W_k = B_k A_k``; its weight is ``S_k = ||B_k A_k||_F`` and the global factors are

    A = sum_k S_k pad(A_k) / sum_k S_k,     B = sum_k S_k pad(B_k) / sum_k S_k,

with pad() zero-padding to r_max (rows of A, columns of B). As a plain sum: the contribution is
``(S_k pad(A_k), S_k pad(B_k), S_k)`` and `finish` divides by the summed S. The paper defines
S_k on one LoRA module; with many adapted layers privlora computes it **per layer** by default
(``norm_scope="layer"``: each layer's factors are weighted by that layer's ||B_k A_k||_F), or
over the whole adapter (``norm_scope="global"``: ``S_k = sqrt(sum_layers ||B_k A_k||_F^2)``, one
weight per client). A layer whose summed S is zero (no client moved it) keeps its previous
global factors. The peft scaling s is the same for every client (`privlora.tasks.adapters`), so it
cancels in the weights. The classification head (modules_to_save) is averaged with the usual
``p_k = w_k / sum w`` (``federation.weighting``). Like FedIT, averaging factors is not exact:
the product of the averaged factors is not the average of the products.

Local rank self-pruning (optional, ``prune=True``). During local training the client adds the
paper's tail regulariser ``penalty * sum_layers ||B[:, t:] A[t:, :]||_F`` with the tail starting
at ``t = max(1, floor(decay * r_k))``: the last ``r_k - t`` ranks are pushed towards zero. After
training, the client measures each rank's norm over the whole adapter,
``norm_i = sqrt(sum_layers ||B[:, i]||^2 ||A[i, :]||^2)`` (the Frobenius norm of rank i's part
of the update), and drops trailing ranks of the tail whose norm is below ``threshold`` times the
largest rank norm (a relative threshold: it does not depend on the model's scale). The client's
rank shrinks to the rank it keeps, for good: it contributes the truncated (then zero-padded)
factors, reports the new rank beside its update, and is sent that rank from then on. The paper
prunes the whole tail (to ``floor(decay * r_k)``) when the tail's norm has shrunk; privlora's
per-rank threshold within the same tail is the variant this toolkit documents and tests.

Privacy. The penalty depends only on the adapter parameters, never on data. `privlora.federation.client`
adds its gradient after Opacus has clipped and noised the data gradient (were it part of the
loss, Opacus would overwrite it: the noisy gradient is built from per-sample gradients only), so
it is not clipped and costs no privacy; the pruning decision and S_k are post-processing of the
DP-trained adapter. The reported rank is visible to the server, also under secure aggregation.
"""

from __future__ import annotations

import math

import numpy as np

from privlora.strategies.base import (
    WEIGHT_KEY,
    State,
    Strategy,
    client_weight,
    is_lora_a,
    is_lora_b,
    lora_pairs,
    pad_rank,
    truncate_rank,
)

NORM_PREFIX = "hetlora_norm/"
GLOBAL_NORM_KEY = "hetlora_norm"
NORM_SCOPES = ("layer", "global")


def rank_norms(state: State) -> np.ndarray:
    """``norm_i = sqrt(sum_layers ||B[:, i]||^2 ||A[i, :]||^2)`` for every rank i (float64)."""
    pairs = lora_pairs(state)
    if not pairs:
        raise ValueError("the adapter state has no LoRA factors")
    ranks = {state[a].shape[0] for _, a, _ in pairs}
    if len(ranks) != 1:
        raise ValueError(f"LoRA modules have different ranks {sorted(ranks)}")
    sq = np.zeros(ranks.pop())
    for _, a_key, b_key in pairs:
        a = state[a_key].astype(np.float64)
        b = state[b_key].astype(np.float64)
        sq += (b**2).sum(axis=0) * (a**2).sum(axis=1)
    return np.sqrt(sq)


def tail_start(rank: int, decay: float) -> int:
    """First penalised (and prunable) rank index: ``max(1, floor(decay * rank))``."""
    return max(1, math.floor(decay * rank))


def tail_penalty(model, start: int, strength: float):
    """``strength * sum_layers ||B[:, start:] A[start:, :]||_F`` over the model's trainable LoRA
    factors, as a differentiable torch scalar (zero when the tail is empty).

    Uses ``||B A||_F^2 = sum((B^T B) * (A A^T))`` (r x r matrices, never d_out x d_in); the
    square root's argument is clamped away from 0, where the gradient is then 0 (a subgradient).
    """
    import torch

    params = dict(model.named_parameters())
    terms = []
    for name, a in params.items():
        if ".lora_A." not in name or not a.requires_grad:
            continue
        b = params[name.replace(".lora_A.", ".lora_B.", 1)]
        a_t, b_t = a[start:], b[:, start:]
        if a_t.shape[0] == 0:
            continue
        sq = ((b_t.T @ b_t) * (a_t @ a_t.T)).sum()
        terms.append(torch.sqrt(torch.clamp(sq, min=1e-30)))
    if not terms:
        return torch.zeros(())
    return strength * torch.stack(terms).sum()


class HetLoRA(Strategy):
    name = "hetlora"
    exact = False
    heterogeneous_ranks = True

    def __init__(
        self,
        max_rank: int,
        weighting: str = "num_examples",
        prune: bool = False,
        penalty: float = 0.0,
        decay: float = 0.9,
        threshold: float = 0.0,
        norm_scope: str = "layer",
    ):
        """``prune``: rank self-pruning on; ``penalty``: strength of the tail regulariser;
        ``decay``: the tail starts at ``floor(decay * r_k)``; ``threshold``: a tail rank whose
        norm is below ``threshold * largest rank norm`` is dropped; ``norm_scope``: S_k per
        layer or over the whole adapter."""
        super().__init__(max_rank, weighting)
        if penalty < 0 or not math.isfinite(penalty):
            raise ValueError(f"federation.hetlora_penalty must be >= 0, found {penalty}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"federation.hetlora_decay must be in (0, 1), found {decay}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"federation.hetlora_threshold must be in [0, 1), found {threshold}")
        if norm_scope not in NORM_SCOPES:
            raise ValueError(f"federation.hetlora_norm_scope: {norm_scope!r} is not one of {', '.join(map(repr, NORM_SCOPES))}")
        self.prune_ranks = bool(prune)
        self.penalty_strength = float(penalty)
        self.decay = float(decay)
        self.threshold = float(threshold)
        self.norm_scope = norm_scope

    # ------------------------------------------------------------------ distribution
    def broadcast(self, global_state: State, rank: int) -> State:
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"hetlora: rank {rank} is outside [1, max_rank={self.max_rank}]")
        return {k: truncate_rank(k, v, rank) for k, v in global_state.items()}

    def local_start(self, payload: State, template: State) -> State:
        out = {}
        for k, v in template.items():
            if k not in payload:
                raise ValueError(f"hetlora payload lacks {k}")
            if payload[k].shape != v.shape:
                raise ValueError(f"hetlora payload {k}: shape {payload[k].shape}, client expects {v.shape}")
            out[k] = payload[k].astype(v.dtype)
        return out

    # ------------------------------------------------------------------ local training
    def penalty(self, rank: int):
        start = tail_start(rank, self.decay)
        if not self.prune_ranks or self.penalty_strength == 0 or start >= rank:
            return None
        strength = self.penalty_strength
        return lambda model: tail_penalty(model, start, strength)

    def prune(self, local_state: State, rank: int) -> tuple[State, int]:
        """Drop trailing tail ranks whose norm is below ``threshold * max norm``."""
        if not self.prune_ranks:
            return local_state, rank
        norms = rank_norms(local_state)
        if norms.shape[0] != rank:
            raise ValueError(f"adapter rank {norms.shape[0]} differs from the client's rank {rank}")
        cutoff = self.threshold * norms.max()
        keep = rank
        while keep > tail_start(rank, self.decay) and norms[keep - 1] < cutoff:
            keep -= 1
        if keep == rank:
            return local_state, rank
        return {k: truncate_rank(k, v, keep) for k, v in local_state.items()}, keep

    # ------------------------------------------------------------------ aggregation
    def contribution(self, local_state: State, num_examples: int, rank: int, client_id: int | None = None) -> State:
        pairs = lora_pairs(local_state)
        if rank > self.max_rank:
            raise ValueError(f"hetlora: rank {rank} exceeds max_rank {self.max_rank}")
        norms = {}
        for module, a_key, b_key in pairs:
            if local_state[a_key].shape[0] != rank:
                raise ValueError(f"{module}: adapter rank {local_state[a_key].shape[0]} differs from the client's rank {rank}")
            norms[module] = float(np.linalg.norm(local_state[b_key].astype(np.float64) @ local_state[a_key].astype(np.float64)))
        out: State = {}
        if self.norm_scope == "global":
            s_global = float(np.sqrt(sum(v**2 for v in norms.values())))
            norms = {m: s_global for m in norms}
            out[GLOBAL_NORM_KEY] = np.array([s_global])
        for module, a_key, b_key in pairs:
            s = norms[module]
            out[a_key] = s * pad_rank(a_key, local_state[a_key].astype(np.float64), self.max_rank)
            out[b_key] = s * pad_rank(b_key, local_state[b_key].astype(np.float64), self.max_rank)
            if self.norm_scope == "layer":
                out[NORM_PREFIX + module] = np.array([s])
        w = client_weight(num_examples, self.weighting)
        paired = {k for _, a_key, b_key in pairs for k in (a_key, b_key)}
        for k, v in local_state.items():
            if k not in paired:
                out[k] = w * v.astype(np.float64)
        out[WEIGHT_KEY] = np.array([w], dtype=np.float64)
        return out

    def finish(self, summed: State, global_state: State) -> State:
        total_w = self._total_weight(summed)
        out = {}
        for module, a_key, b_key in lora_pairs(global_state):
            key = GLOBAL_NORM_KEY if self.norm_scope == "global" else NORM_PREFIX + module
            if key not in summed:
                raise ValueError(f"summed contribution lacks {key!r}; was it produced by HetLoRA.contribution()?")
            total_s = float(summed[key][0])
            for k in (a_key, b_key):
                v = global_state[k]
                out[k] = v.copy() if total_s <= 0 else (summed[k] / total_s).astype(v.dtype)
        for k, v in global_state.items():
            if not (is_lora_a(k) or is_lora_b(k)):
                out[k] = (summed[k] / total_w).astype(v.dtype)
        return out
