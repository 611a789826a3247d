"""FedIT (Zhang et al. 2024): average A and B separately — the inexact baseline.

The server's global adapter is ``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k``, so the global
update is ``s * (sum_k p_k B_k)(sum_k p_k A_k)``, which is not the average of the clients'
updates ``s * sum_k p_k B_k A_k``: the difference is the cross terms
``sum_{j != k} p_j p_k B_j A_k - sum_k p_k (1 - p_k) B_k A_k``. Ranks must be equal.
"""

from __future__ import annotations

from .base import State, Strategy


class FedIT(Strategy):
    name = "fedit"
    exact = False
    heterogeneous_ranks = False

    def broadcast(self, global_state: State, rank: int) -> State:
        self._check_rank(rank)
        return {k: v.copy() for k, v in global_state.items()}

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
