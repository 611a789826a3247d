"""Accountants: epsilon at a delta from a client's history of `SubsampledGaussian` releases.

Every accountant here reads the same records and returns an *upper bound* on epsilon for
add/remove-one-record adjacency, composing the history in any order (composition is
commutative, so a history is grouped by (noise_multiplier, sample_rate) with summed steps
before it is composed; grouping is exact, not an approximation).

- ``pld``: dp_accounting's privacy loss distributions (Koskela et al.; Doroshenko et al. 2022)
  with pessimistic discretisation whose width adapts to epsilon: the tight, sound accountant
  used to admit clients and to report. Its discretisation only ever over-estimates.
- ``rdp``: dp_accounting's Renyi DP accountant (Mironov 2017; Mironov, Talwar & Zhang 2019):
  sound but looser; shown beside ``pld`` as an independent cross-check.
- ``prv`` (registered by `privlora`, which may import torch): Opacus's PRV accountant
  (Gopi et al. 2021), an upper bound within its stated ``error``.

New accountants register with `register_accountant`; each states its name, the library version
it uses, and an absolute ``error``: the most its epsilon may fall below the true upper bound.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata

from .mechanism import SubsampledGaussian

HistoryKey = tuple[tuple[float, float, int], ...]


def history_key(history: Iterable[SubsampledGaussian]) -> HistoryKey:
    """The composition-relevant content of a history: sorted (sigma, q, total steps) groups."""
    groups: dict[tuple[float, float], int] = {}
    for m in history:
        if m.steps:
            k = (float(m.noise_multiplier), float(m.sample_rate))
            groups[k] = groups.get(k, 0) + int(m.steps)
    return tuple(sorted((s, q, n) for (s, q), n in groups.items()))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class Accountant(ABC):
    """Epsilon at ``delta`` of a grouped history; results are cached per (history, delta)."""

    name: str = "abstract"
    library: str = ""
    error: float = 0.0
    description: str = ""

    def __init__(self) -> None:
        self._cache: dict[tuple[HistoryKey, float], float] = {}

    @property
    def version(self) -> str:
        return f"{self.library} {_version(self.library)}" if self.library else "privlora"

    def epsilon(self, history: Iterable[SubsampledGaussian] | HistoryKey, delta: float) -> float:
        key = history if isinstance(history, tuple) else history_key(history)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1). Found {delta!r}")
        if not key:
            return 0.0
        if (key, delta) not in self._cache:
            self._cache[(key, delta)] = float(self._epsilon(key, delta))
        return self._cache[(key, delta)]

    @abstractmethod
    def _epsilon(self, key: HistoryKey, delta: float) -> float: ...


def _events(key: HistoryKey):
    from dp_accounting import dp_event

    return [
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n) for s, q, n in key
    ]


class PLDAccountant(Accountant):
    """dp_accounting privacy loss distributions, pessimistic (an upper bound on epsilon).

    The discretisation interval adapts to the answer: ``rel_interval`` times a quick upper
    estimate of epsilon (the RDP bound), at most ``max_interval``. A fixed 1e-3 over-estimates
    small epsilons over many steps by up to 30% (0.22 for a true 0.17 at q=0.001, sigma=2,
    10^4 steps); relative to epsilon, the over-estimate stays well under 1% and the cost stays
    near 0.1 s per history.
    """

    name = "pld"
    library = "dp-accounting"
    description = "dp_accounting's privacy loss distribution accountant (pessimistic discretisation)"

    def __init__(self, rel_interval: float = 5e-4, max_interval: float = 1e-3, min_interval: float = 1e-6) -> None:
        super().__init__()
        self.rel_interval, self.max_interval, self.min_interval = rel_interval, max_interval, min_interval
        self._steps: dict[tuple[float, float, float], object] = {}

    def interval(self, key: HistoryKey, delta: float) -> float:
        from .rdp import epsilon_from_rdp, rdp_vector

        rough = epsilon_from_rdp(rdp_vector(key), delta)
        return float(min(self.max_interval, max(self.min_interval, self.rel_interval * rough)))

    def _one_step(self, sigma: float, q: float, width: float):
        """The PLD of one step, cached: building it costs as much as composing it."""
        from dp_accounting.pld import privacy_loss_distribution as pld_lib

        k = (sigma, q, width)
        if k not in self._steps:
            if len(self._steps) > 512:
                self._steps.clear()
            self._steps[k] = pld_lib.from_gaussian_mechanism(
                sigma, sampling_prob=q, value_discretization_interval=width, pessimistic_estimate=True
            )
        return self._steps[k]

    def _epsilon(self, key: HistoryKey, delta: float) -> float:
        width = self.interval(key, delta)
        total = None
        for sigma, q, steps in key:
            pld = self._one_step(sigma, q, width).self_compose(steps)
            total = pld if total is None else total.compose(pld)
        return total.get_epsilon_for_delta(delta)


class RDPAccountant(Accountant):
    name = "rdp"
    library = "dp-accounting"
    description = "dp_accounting's Renyi DP accountant (its default orders)"

    def _epsilon(self, key: HistoryKey, delta: float) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant

        acc = rdp_privacy_accountant.RdpAccountant()
        # dp_accounting logs a warning for each order its series fails on and drops that
        # order, which can only make the bound looser (never unsound)
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            for ev in _events(key):
                acc.compose(ev)
            return acc.get_epsilon(delta)
        finally:
            absl.setLevel(level)


_REGISTRY: dict[str, Callable[[], Accountant]] = {"pld": PLDAccountant, "rdp": RDPAccountant}
_INSTANCES: dict[str, Accountant] = {}


def register_accountant(name: str, factory: Callable[[], Accountant]) -> None:
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


ENTRY_POINT_GROUP = "accounting.accountants"
"""Installed packages offer accountants under this entry-point group (name = accountant name,
value = ``module:factory``); `get_accountant` loads one the first time it is asked for, so no
import has to happen first for its side effect."""


def _plugin(name: str) -> Callable[[], Accountant] | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    return None


def available_plugins() -> list[str]:
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def get_accountant(name: str) -> Accountant:
    """A shared (caching) instance of the accountant called ``name``: a built-in one, one given to
    `register_accountant`, or one an installed package offers under `ENTRY_POINT_GROUP`."""
    if name not in _REGISTRY and (factory := _plugin(name)) is not None:
        _REGISTRY[name] = factory
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(available_plugins()))
        raise ValueError(f"accountant {name!r} is not one of {known}")
    if name not in _INSTANCES:
        _INSTANCES[name] = _REGISTRY[name]()
    return _INSTANCES[name]


def available_accountants() -> Sequence[str]:
    return sorted(set(_REGISTRY) | set(available_plugins()))
