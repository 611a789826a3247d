"""The record of one client's DP-SGD release in one round.

A `SubsampledGaussian` says: ``steps`` compositions of the Gaussian mechanism with noise
standard deviation ``noise_multiplier * clip_norm`` on the sum of per-example gradients each
clipped to L2 norm ``clip_norm``, over a batch drawn by ``sampling`` ("poisson": each example
independently with probability ``sample_rate``). Epsilon is computed at ``delta`` for
add/remove-one-record adjacency within this client's data. The meaning of these fields must
never change; new mechanisms get new record types.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SubsampledGaussian:
    noise_multiplier: float
    sample_rate: float
    steps: int
    clip_norm: float
    delta: float
    sampling: str = "poisson"
    mechanism: str = "subsampled gaussian"

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0. Found {self.noise_multiplier!r}")
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1]. Found {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0. Found {self.steps!r}")
        if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0. Found {self.clip_norm!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1). Found {self.delta!r}")
        if self.sampling != "poisson":
            raise ValueError(f"sampling must be 'poisson' (the only scheme whose amplification we claim). Found {self.sampling!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_dp_event(self):
        """The same release as a dp_accounting ``DpEvent``, for any accountant that takes one:
        ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)``."""
        from dp_accounting import dp_event

        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(self.sample_rate, dp_event.GaussianDpEvent(self.noise_multiplier)), self.steps
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SubsampledGaussian":
        known = {"noise_multiplier", "sample_rate", "steps", "clip_norm", "delta", "sampling", "mechanism"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown mechanism fields {sorted(unknown)}; expected {sorted(known)}")
        if d.get("mechanism", "subsampled gaussian") != "subsampled gaussian":
            raise ValueError(f"mechanism must be 'subsampled gaussian'. Found {d.get('mechanism')!r}")
        return cls(**d)
