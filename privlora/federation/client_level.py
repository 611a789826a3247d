"""Client-level DP (``privacy.unit = "client"``): clip each client's whole contribution, noise the sum.

Client side (`client_delta`, `clip_delta`, `distributed_encode`): a client's contribution is its
change to what it would have added had it not trained: ``delta = contribution(trained) -
contribution(start)`` with weight 1 (``federation.weighting = 'uniform'``), every tensor the
strategy adds to the sum (LoRA factors or products and the head), flattened in sorted key order
and clipped to L2 norm C = ``privacy.client_clip``. Under distributed noise the client then
rotates, scales, rounds, adds its noise share and reduces mod 2^``privacy.client_bits``
(`privlora.federation.distributed_noise`), so only integers mod 2^b leave it, into the secure sum.

Server side (`finish_client_level`): with S the (noised) sum of deltas and E =
``federation.clients_per_round`` (the expected number of clients, fixed whatever dropped out), the
strategy finishes as if every client had contributed ``contribution(start) + S / E``: the global
state moves by the mean clipped update. Central noise (`central_noise`) is N(0, (z C)^2) per
coordinate of S, added by the server (z = `central_noise_multiplier`).

The noise of one round (`noise_plan`) is decided from the config alone, by the server and every
client alike: z calibrated by PLD so that a client in every one of ``federation.rounds`` rounds
spends at most ``privacy.client_target_epsilon`` (q = 1: no amplification), or the explicit
``privacy.client_noise_multiplier``. For distributed noise: the shares are sized for
``min_inputs`` = (fewest inputs a secure sum accepts) - ``privacy.colluders``; the scale 1/gamma
by `distributed_noise.choose_scale` for the largest sum (clients_per_round) with the local std
z C / sqrt(min_inputs); then the integer noise is calibrated at that scale
(`accounting.distributed_dp.calibrate_distributed_noise`, which includes the rounding-inflated
sensitivity), or, with an explicit z, sigma = z C scale / sqrt(min_inputs).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from accounting.client_level import CentralGaussian
from privlora.core.config import ExperimentConfig, secure_sum_size
from privlora.strategies import WEIGHT_KEY, Strategy

State = dict[str, np.ndarray]

DISTRIBUTED_KEY = "__distributed__"
"""The one tensor a client's update carries under distributed noise: uint64 residues mod 2^b."""

MECHANISMS = {"discrete_gaussian": "distributed discrete gaussian", "skellam": "distributed skellam"}

TRUST = {
    "central": "the server: it adds the noise and sees the un-noised sum (under secure aggregation too); "
               "whoever sees only the released model gets the stated epsilon if the server is honest",
    "distributed": "no single party: the server only decodes a sum that already holds every client's noise share; "
                   "the stated epsilon holds against the server as long as at most privacy.colluders of a sum's "
                   "clients collude with it and the secure aggregation holds",
}


def is_client_level(cfg: ExperimentConfig) -> bool:
    return cfg.privacy.unit == "client"


def is_distributed(cfg: ExperimentConfig) -> bool:
    return is_client_level(cfg) and cfg.privacy.client_noise in MECHANISMS


def client_delta(strategy: Strategy, trained: State, start: State, rank: int, client_id: int | None) -> State:
    """What a client adds to the sum under client-level DP: its contribution minus the
    contribution of the state it started from, both at weight 1 (``WEIGHT_KEY`` dropped)."""
    after = strategy.contribution(trained, 1, rank, client_id=client_id)
    before = strategy.contribution(start, 1, rank, client_id=client_id)
    return {k: np.asarray(after[k], dtype=np.float64) - np.asarray(before[k], dtype=np.float64) for k in after if k != WEIGHT_KEY}


def global_norm(state: State) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in state.values())))


def clip_delta(delta: State, clip_norm: float) -> tuple[State, float]:
    """(delta scaled to L2 norm at most ``clip_norm`` over all tensors together, its norm before)."""
    norm = global_norm(delta)
    # 1e-9 below C: however the norm is summed in float64 (order, BLAS), it never comes out above C
    factor = min(1.0, clip_norm * (1.0 - 1e-9) / norm) if norm > 0 else 1.0
    clipped = {k: np.asarray(v, dtype=np.float64) * factor for k, v in delta.items()}
    return clipped, norm


def expected_clients(cfg: ExperimentConfig) -> int:
    return int(cfg.federation.clients_per_round)


def min_inputs(cfg: ExperimentConfig) -> int:
    """Noise shares counted in every sum: the fewest inputs a secure sum accepts minus colluders."""
    return secure_sum_size(cfg).least - int(cfg.privacy.colluders)


@functools.lru_cache(maxsize=64)
def _central_z(target: float, delta: float, rounds: int) -> float:
    from accounting import calibrate_noise

    return float(calibrate_noise(target, delta, 1.0, rounds, "pld"))


def central_noise_multiplier(cfg: ExperimentConfig) -> float:
    """z: the explicit ``privacy.client_noise_multiplier``, or the smallest (to 0.2%) whose PLD
    epsilon over every round at q = 1 is at most ``privacy.client_target_epsilon``."""
    p = cfg.privacy
    if p.client_noise_multiplier > 0:
        return float(p.client_noise_multiplier)
    return _central_z(float(p.client_target_epsilon), float(p.delta), int(cfg.federation.rounds))


def central_release(cfg: ExperimentConfig) -> CentralGaussian:
    return CentralGaussian(central_noise_multiplier(cfg), float(cfg.privacy.client_clip))


def central_noise(cfg: ExperimentConfig, summed: State, rnd: int, secure: bool = True) -> State:
    """``summed`` plus N(0, (z C)^2) in every coordinate. ``secure`` (any networked transport):
    standard normals from ChaCha20 keyed by the operating system (`noise.SecureGaussian`, the
    source of the nodes' secure DP-SGD noise). Otherwise (the in-process simulation) a generator
    seeded from (run seed, round), like DP-SGD's seeded noise: reproducible, not for deployment."""
    std = central_noise_multiplier(cfg) * float(cfg.privacy.client_clip)
    out = {}
    if secure:
        from privlora.federation.noise import SecureGaussian

        source = SecureGaussian()
        for k, v in sorted(summed.items()):
            out[k] = np.asarray(v, dtype=np.float64) + std * source.standard_normal(int(np.size(v))).reshape(np.shape(v))
        return out
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), int(rnd), 0xC11E]))
    return {k: np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, size=np.shape(v)) for k, v in sorted(summed.items())}


def rotation_seed(cfg: ExperimentConfig, rnd: int) -> bytes:
    """The round's public shared randomness for the rotation (every party derives it alike)."""
    return hashlib.sha256(f"privlora/client-level/rotation/v1|{cfg.seed}|{rnd}".encode()).digest()[:16]


@functools.lru_cache(maxsize=64)
def _distributed_noise(mechanism: str, padded_dim: int, bits: int, clip: float, n_max: int, n_min: int,
                       z_explicit: float, target: float, delta: float, rounds: int, beta: float) -> tuple[float, float]:
    """(scale, sigma or variance per client) for one configuration (cached: bisection is slow)."""
    from accounting.distributed_dp import calibrate_distributed_noise
    from privlora.federation.distributed_noise import choose_scale

    z = z_explicit if z_explicit > 0 else _central_z(target, delta, rounds)
    local_std = z * clip / math.sqrt(n_min)
    scale = choose_scale(bits=bits, clip_norm=clip, dim=padded_dim, n=n_max, local_stddev=local_std)
    if z_explicit > 0:
        s = z_explicit * clip * scale / math.sqrt(n_min)
        return scale, (max(0.5, s) if mechanism == "distributed discrete gaussian" else s * s)
    rel = calibrate_distributed_noise(mechanism, target, delta, min_inputs=n_min, rounds=rounds, clip_norm=clip, dim=padded_dim,
                                      scale=scale, beta=beta, bits=bits)
    return scale, float(rel.sigma if mechanism == "distributed discrete gaussian" else rel.variance)


def distributed_params(cfg: ExperimentConfig, layout, rnd: int):
    """The round's `DistributedNoiseParams`, from the config and the contribution's layout alone."""
    from privlora.federation.distributed_noise import DEFAULT_BETA, DistributedNoiseParams, RandomizedHadamard

    p = cfg.privacy
    mechanism = MECHANISMS[p.client_noise]
    padded = RandomizedHadamard(layout.size, bytes(16)).padded_dim
    scale, noise = _distributed_noise(mechanism, padded, int(p.client_bits), float(p.client_clip), expected_clients(cfg),
                                      min_inputs(cfg), float(p.client_noise_multiplier), float(p.client_target_epsilon),
                                      float(p.delta), int(cfg.federation.rounds), float(DEFAULT_BETA))
    kind = {"sigma": noise} if mechanism == "distributed discrete gaussian" else {"variance": noise}
    return DistributedNoiseParams(mechanism=mechanism, clip_norm=float(p.client_clip), scale=scale, bits=int(p.client_bits),
                                  layout=layout, rotation_seed=rotation_seed(cfg, rnd), min_inputs=min_inputs(cfg),
                                  beta=float(DEFAULT_BETA), **kind)


def finish_client_level(strategy: Strategy, global_state: State, template: State, summed: State, cfg: ExperimentConfig) -> State:
    """The summed input `Strategy.finish` expects: contribution(start) + S / E at weight 1, where
    start is what a client of the global rank starts from and S the (noised) sum of deltas."""
    rank = strategy.max_rank
    start = strategy.local_start(strategy.broadcast(global_state, rank), template)
    ref = strategy.contribution(start, 1, rank, client_id=None)
    e = float(expected_clients(cfg))
    missing = sorted(set(ref) - {WEIGHT_KEY} - set(summed))
    if missing:
        raise ValueError(f"the client-level sum lacks {missing[:3]}")
    out = {k: np.asarray(v, dtype=np.float64) + (np.asarray(summed[k], dtype=np.float64) / e if k in summed else 0.0)
           for k, v in ref.items() if k != WEIGHT_KEY}
    out[WEIGHT_KEY] = np.array([1.0])
    return out


__all__ = ["DISTRIBUTED_KEY", "TRUST", "central_noise", "central_noise_multiplier", "central_release", "client_delta",
           "clip_delta", "distributed_params", "expected_clients", "finish_client_level", "is_client_level",
           "is_distributed", "min_inputs", "rotation_seed"]
