"""FedIT (Zhang et al. 2024): average A and B separately — the inexact baseline.

The server's global adapter is ``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k``, so the global
update is ``s * (sum_k p_k B_k)(sum_k p_k A_k)``, which is not the average of the clients'
updates ``s * sum_k p_k B_k A_k``: the difference is the cross terms
``sum_{j != k} p_j p_k B_j A_k - sum_k p_k (1 - p_k) B_k A_k``. Ranks must be equal.
"""

from __future__ import annotations

import numpy as np

from privlora.strategies.base import WEIGHT_KEY, State, Strategy, lora_pairs


class FedIT(Strategy):
    name = "fedit"
    exact = False
    heterogeneous_ranks = False

    def broadcast(self, global_state: State, rank: int) -> State:
        self._check_rank(rank)
        return {k: v.copy() for k, v in global_state.items()}

    def clear_sum_metrics(self, contributions: list[State], global_state: State) -> dict[str, float]:
        """``fedit_cross_term_error``: `cross_term_error` of this round's contributions."""
        return {"fedit_cross_term_error": cross_term_error(contributions, global_state)}

    def local_start(self, payload: State, template: State) -> State:
        if set(payload) != set(template):
            raise ValueError("fedit payload does not carry every adapter tensor the client has")
        return {k: payload[k].astype(template[k].dtype) for k in template}

    def contribution(self, local_state: State, num_examples: int, rank: int, client_id: int | None = None) -> State:
        self._check_rank(rank)
        return self._weighted(local_state, num_examples)

    def finish(self, summed: State, global_state: State) -> State:
        total = self._total_weight(summed)
        return {k: (summed[k] / total).astype(global_state[k].dtype) for k in global_state}

    def _check_rank(self, rank: int) -> None:
        if rank != self.max_rank:
            raise ValueError(f"fedit needs one rank for every client; got rank {rank}, global rank {self.max_rank}")


def cross_term_error(contributions: list[State], start: State) -> float:
    """How far FedIT's global update is from the mean of the clients' updates, this round.

    With ``p_k`` the clients' normalised weights and ``B_0 A_0`` the adapter every client started
    from, the ratio ``||B̄ Ā - sum_k p_k B_k A_k||_F / ||sum_k p_k B_k A_k - B_0 A_0||_F`` over
    all LoRA layers (B̄, Ā: the weighted means FedIT sets). 0 when the clients' A agree; it is the
    size of the missing cross terms relative to the update they should have made. Computed from
    the individual contributions, so only a run in the clear can report it.
    """
    if not contributions:
        raise ValueError("cross_term_error needs at least one contribution")
    weights = np.array([float(c[WEIGHT_KEY][0]) for c in contributions])
    p = weights / weights.sum()
    missed = moved = 0.0
    for _, a_key, b_key in lora_pairs(start):
        As = [c[a_key] / w for c, w in zip(contributions, weights)]
        Bs = [c[b_key] / w for c, w in zip(contributions, weights)]
        pB = [pk * b for pk, b in zip(p, Bs)]
        a_mean = sum(pk * a for pk, a in zip(p, As))
        # both differences are products of stacked factors, B̄Ā - sum p_k B_k A_k = [B̄, -p_k B_k][Ā; A_k],
        # so their norms come from (rank x rank) Gram matrices, never from a dense d_out x d_in matrix
        missed += _squared_norm_of_product(np.hstack([sum(pB)] + [-b for b in pB]), np.vstack([a_mean] + As))
        moved += _squared_norm_of_product(np.hstack(pB + [-start[b_key].astype(np.float64)]),
                                          np.vstack(As + [start[a_key].astype(np.float64)]))
    if moved <= 0:
        return 0.0 if missed <= 0 else float("inf")
    return float(np.sqrt(max(missed, 0.0) / moved))


def _squared_norm_of_product(u: np.ndarray, v: np.ndarray) -> float:
    """||u v||_F^2 = trace((u^T u)(v v^T)), in O((d_out + d_in) k^2) for u: d_out x k, v: k x d_in."""
    return float(np.sum((u.T @ u) * (v @ v.T)))
