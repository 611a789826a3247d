"""FFA-LoRA (Sun et al., ICLR 2024): A random and frozen, only the zero-initialised B trains.

A is never transmitted: every client derives it from the shared seed and the layer's name
(`shared_lora_a`), identically. Because A is common, averaging B is exact:
``sum_k p_k B_k A = (sum_k p_k B_k) A``. DP noise added to B's gradient stays linear in the
update (no noise x noise term, as there would be when A and B both carry noise).

Heterogeneous ranks: client k uses the first r_k rows of the shared A and a B_k with r_k
columns; its contribution is B_k zero-padded to the global rank, so the aggregate
``sum_k p_k pad(B_k) A_max = sum_k p_k B_k A[:r_k]`` is still exact. On broadcast a client of
rank r_k receives the first r_k columns of the global B (the rest of the global update is out
of its reach: that is the approximation heterogeneous ranks make, on the client side only).
"""

from __future__ import annotations

import hashlib

import numpy as np

from privlora.strategies.base import State, Strategy, is_lora_a, is_lora_b, pad_rank, truncate_rank


def shared_lora_a(seed: int, key: str, rank: int, in_features: int) -> np.ndarray:
    """The frozen A (rank x in_features) every party derives from ``seed`` and the tensor name.

    Entries are U(-1/sqrt(in_features), 1/sqrt(in_features)) — peft's default LoRA-A scale —
    drawn row by row from PCG64 seeded by (seed, SHA-256 of the name), so the first r rows
    do not depend on the rank asked for and are identical on every platform.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


class FFALoRA(Strategy):
    name = "ffa"
    exact = True
    heterogeneous_ranks = True

    def __init__(self, max_rank: int, seed: int, weighting: str = "num_examples"):
        super().__init__(max_rank, weighting)
        self.seed = seed

    def frozen(self, key: str) -> bool:
        return is_lora_a(key)

    def initial_state(self, template: State) -> State:
        """Global state at the max rank: shared A, zero B, the template's head."""
        out = {}
        for k, v in template.items():
            if is_lora_a(k):
                out[k] = shared_lora_a(self.seed, k, self.max_rank, v.shape[1])
            elif is_lora_b(k):
                out[k] = np.zeros((v.shape[0], self.max_rank), dtype=v.dtype)
            else:
                out[k] = v.copy()
        return out

    def broadcast(self, global_state: State, rank: int) -> State:
        return {k: truncate_rank(k, v, rank) for k, v in global_state.items() if not is_lora_a(k)}

    def local_start(self, payload: State, template: State) -> State:
        out = {}
        for k, v in template.items():
            if is_lora_a(k):
                out[k] = shared_lora_a(self.seed, k, v.shape[0], v.shape[1])
            else:
                if k not in payload:
                    raise ValueError(f"ffa payload lacks {k}")
                if payload[k].shape != v.shape:
                    raise ValueError(f"ffa payload {k}: shape {payload[k].shape}, client expects {v.shape}")
                out[k] = payload[k].astype(v.dtype)
        return out

    def contribution(self, local_state: State, num_examples: int, rank: int, client_id: int | None = None) -> State:
        sent = {k: pad_rank(k, v, self.max_rank) for k, v in local_state.items() if not is_lora_a(k)}
        return self._weighted(sent, num_examples)

    def finish(self, summed: State, global_state: State) -> State:
        total = self._total_weight(summed)
        out = {}
        for k, v in global_state.items():
            out[k] = v.copy() if is_lora_a(k) else (summed[k] / total).astype(v.dtype)
        return out
