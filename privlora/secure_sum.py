"""The transport of one round's contributions: a plain sum, or a secure sum through `secagg`.

Every strategy's contribution is a dict of arrays whose key-wise sum is all the server needs
(`strategies.base`). Under secure aggregation each client's dict is flattened in sorted key
order into one float64 vector and fed to the masked protocol (`secagg.aggregate_in_process`:
the real client and server state machines exchanging bytes, in this process); the server gets
back only the decoded sum, which is unflattened into the same dict layout.

Fixed point needs public ranges: the contribution's weight (``__weight__``) lies in
[0, secagg.max_weight] and every other coordinate in +-(secagg.value_bound * max_weight).
Values outside are clipped; the count of clipped coordinates is returned and written to
metrics.jsonl (never silent).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .config import ExperimentConfig
from .strategies import WEIGHT_KEY

State = dict[str, np.ndarray]


@dataclass
class SecureSumReport:
    survivors: list[int]
    clipped: int
    bytes_up: dict[int, int]
    bytes_down: dict[int, int]
    seconds: float
    values: int

    def to_dict(self) -> dict:
        n = max(1, len(self.bytes_up))
        return {
            "survivors": self.survivors,
            "clipped": self.clipped,
            "values": self.values,
            "bytes_up_per_client": sum(self.bytes_up.values()) / n,
            "bytes_down_per_client": sum(self.bytes_down.values()) / n,
            "seconds": self.seconds,
        }


def layout(state: State) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(state[k].shape)) for k in sorted(state)]


def flatten(state: State, spec: list[tuple[str, tuple[int, ...]]]) -> np.ndarray:
    if [k for k, _ in spec] != sorted(state) or any(tuple(state[k].shape) != s for k, s in spec):
        raise ValueError("contributions of one round must have the same keys and shapes to be summed securely")
    return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k, _ in spec])


def unflatten(vec: np.ndarray, spec: list[tuple[str, tuple[int, ...]]]) -> State:
    out, at = {}, 0
    for k, shape in spec:
        n = int(np.prod(shape))
        out[k] = vec[at : at + n].reshape(shape).astype(np.float32)
        at += n
    return out


def clip_segments(cfg: ExperimentConfig, spec: list[tuple[str, tuple[int, ...]]]) -> list[tuple[int, float]]:
    s = cfg.secagg
    return [(int(np.prod(shape)), s.max_weight if k == WEIGHT_KEY else s.value_bound * s.max_weight) for k, shape in spec]


def secure_sum(cfg: ExperimentConfig, contributions: dict[int, State], rnd: int) -> tuple[State, SecureSumReport]:
    """The key-wise sum of ``contributions`` (client id -> state) computed under `secagg`."""
    from secagg import SecAggParams, aggregate_in_process

    s = cfg.secagg
    spec = layout(next(iter(contributions.values())))
    inputs = {int(c): flatten(st, spec) for c, st in contributions.items()}
    params = SecAggParams(bits=s.bits, threshold=s.threshold or None, neighbours=s.neighbours or None)
    t = time.perf_counter()
    res = aggregate_in_process(inputs, clip_segments(cfg, spec), params, round_id=rnd)
    seconds = time.perf_counter() - t
    report = SecureSumReport(
        survivors=list(res.survivors),
        clipped=int(res.clipped),
        bytes_up=dict(res.bytes_up),
        bytes_down=dict(res.bytes_down),
        seconds=seconds,
        values=int(sum(n for n, _ in clip_segments(cfg, spec))),
    )
    return unflatten(np.asarray(res.sum), spec), report
