"""Server momentum (FedAvgM, Hsu et al. 2019) applied to any strategy's aggregate.

With the previous global state ``g``, the strategy's new aggregate ``a`` and velocity ``v``
(zero at the start): ``v <- beta * v + (a - g)`` and ``g <- g + server_lr * v``. With beta = 0
and server_lr = 1 this is the plain aggregate. It only post-processes what the clients released,
so it changes no privacy guarantee; it averages the (DP-noisy) aggregates across rounds and
speeds up progress along directions they agree on. Tensors that a strategy keeps fixed (FFA's
shared A) have ``a == g`` and stay exactly where they are.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]


def server_momentum_step(old: State, aggregate: State, velocity: State | None, beta: float, server_lr: float) -> tuple[State, State]:
    """Return (new global state, new velocity)."""
    if not (0.0 <= beta < 1.0) or not server_lr > 0:
        raise ValueError(f"server momentum needs 0 <= beta < 1 and server_lr > 0; found {beta}, {server_lr}")
    if set(old) != set(aggregate):
        raise ValueError("the aggregate does not have the global state's tensors")
    if velocity is None:
        velocity = {k: np.zeros_like(v, dtype=np.float64) for k, v in old.items()}
    new_velocity = {k: beta * velocity[k] + (aggregate[k].astype(np.float64) - old[k]) for k in old}
    new_state = {k: (old[k] + server_lr * new_velocity[k]).astype(old[k].dtype) for k in old}
    return new_state, new_velocity
