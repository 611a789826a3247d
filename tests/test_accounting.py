"""Accountants, RDP bound, admission and calibration, each against dp_accounting computed here."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from accounting import Admission, SubsampledGaussian, calibrate_noise, get_accountant, history_key
from accounting.rdp import ORDERS, epsilon_from_rdp, rdp_vector

DELTA = 1e-5


def event(sigma, q, steps):
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def reference_pld(entries, delta=DELTA, interval=1e-4):
    """dp_accounting's PLDAccountant, composing entry by entry (no grouping)."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in entries:
        acc.compose(event(sigma, q, steps))
    return acc.get_epsilon(delta)


GRID = [(q, sigma, steps) for (q, sigma), steps in zip(itertools.product((0.001, 0.01, 0.1), (0.6, 1.0, 2.0)), itertools.cycle((10, 1000, 10000)))]


@pytest.mark.parametrize("q, sigma, steps", GRID)
def test_pld_epsilon_within_one_percent_of_the_fine_reference_and_never_below(q, sigma, steps):
    acc = get_accountant("pld")
    ours = acc.epsilon([SubsampledGaussian(sigma, q, steps, 1.0, DELTA)], DELTA)
    # the reference discretises 4x finer than ours, so it is the tighter of the two upper bounds
    ref = reference_pld([(sigma, q, steps)], interval=acc.interval(((sigma, q, steps),), DELTA) / 4)
    assert ours >= ref * (1 - 1e-4)  # never below the reference (beyond float noise)
    assert ours <= ref * 1.01


@pytest.mark.parametrize("q, sigma, steps", GRID)
def test_fast_rdp_bound_matches_dp_accounting_and_is_never_below_pld(q, sigma, steps):
    ours = epsilon_from_rdp(rdp_vector([(sigma, q, steps)]), DELTA)
    acc = rdp_privacy_accountant.RdpAccountant(orders=[float(a) for a in ORDERS])
    acc.compose(event(sigma, q, steps))
    assert ours == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    # admission trusts RDP when it says "fits": so RDP must upper-bound the reported (PLD) epsilon
    assert ours >= get_accountant("pld").epsilon([SubsampledGaussian(sigma, q, steps, 1.0, DELTA)], DELTA)


def test_heterogeneous_history_matches_direct_composition():
    hist = [
        SubsampledGaussian(0.9, 0.2, 10, 1.0, DELTA),
        SubsampledGaussian(1.3, 0.05, 100, 1.0, DELTA),
        SubsampledGaussian(0.9, 0.2, 7, 2.0, DELTA),  # same sigma and q: grouped with the first
        SubsampledGaussian(2.0, 0.01, 400, 1.0, DELTA),
    ]
    assert history_key(hist) == ((0.9, 0.2, 17), (1.3, 0.05, 100), (2.0, 0.01, 400))
    ours = get_accountant("pld").epsilon(hist, DELTA)
    ref = reference_pld([(m.noise_multiplier, m.sample_rate, m.steps) for m in hist])
    assert ref - 1e-9 <= ours <= ref * 1.01
    # RDP: a direct composition in dp_accounting of the four separate events
    acc = rdp_privacy_accountant.RdpAccountant()
    for m in hist:
        acc.compose(m.to_dp_event())
    assert get_accountant("rdp").epsilon(hist, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)


def test_no_history_costs_nothing_and_zero_steps_are_free():
    assert get_accountant("pld").epsilon([], DELTA) == 0.0
    assert get_accountant("pld").epsilon([SubsampledGaussian(1.0, 0.1, 0, 1.0, DELTA)], DELTA) == 0.0


def test_calibrated_noise_meets_the_target_and_is_the_smallest_to_tolerance():
    sigma = calibrate_noise(3.0, DELTA, 0.05, 300)
    assert reference_pld([(sigma, 0.05, 300)]) <= 3.0
    assert reference_pld([(sigma * 0.99, 0.05, 300)]) > 3.0
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise(3.0, DELTA, 0.05, 0)


def tight(entries, budget_hist=()):
    return get_accountant("pld").epsilon([SubsampledGaussian(s, q, n, 1.0, DELTA) for s, q, n in entries], DELTA)


def test_admission_admits_exactly_the_clients_that_stay_within_budget():
    rng = np.random.default_rng(0)
    planned = SubsampledGaussian(1.0, 0.05, 20, 1.0, DELTA)
    budgets, hist = {}, {}
    for c in range(12):
        rounds = int(rng.integers(0, 8))
        hist[c] = [planned] * rounds
        after = tight([(1.0, 0.05, 20 * (rounds + 1))])
        # budgets straddle the epsilon after one more round: just above, just below, or far
        budgets[c] = after * [1.001, 0.999, 3.0, 0.5][c % 4]
    adm = Admission(get_accountant("pld"), DELTA, budgets)
    adm.load(hist)
    admitted, decisions = adm.admit({c: planned for c in range(12)})
    expected = [c for c in range(12) if tight([(1.0, 0.05, 20 * (len(hist[c]) + 1))]) <= budgets[c]]
    assert admitted == expected
    assert {c % 4 for c in admitted} == {0, 2}
    for d in decisions:
        assert ("within" in d.reason) == d.admitted


def test_admission_of_many_heterogeneous_clients_agrees_with_the_tight_accountant():
    rng = np.random.default_rng(1)
    sizes = rng.integers(100, 3000, size=120)
    planned = {c: SubsampledGaussian(0.9, 1 / int(np.ceil(n / 64)), 10, 1.0, DELTA) for c, n in enumerate(sizes)}
    hist = {c: [m] * int(rng.integers(0, 6)) for c, m in planned.items()}
    adm = Admission(get_accountant("pld"), DELTA, {c: 4.0 for c in planned})
    adm.load(hist)
    admitted, decisions = adm.admit(planned)
    assert 0 < len(admitted) < 120  # the budget binds for some clients and not others
    for c in rng.choice(120, size=15, replace=False):
        m = planned[c]
        eps = tight([(m.noise_multiplier, m.sample_rate, m.steps * (len(hist[c]) + 1))])
        assert (c in admitted) == (eps <= 4.0)


def test_accounting_never_imports_torch_or_secagg():
    code = "import sys, accounting, accounting.report, accounting.verify; print(sorted(m for m in ('torch', 'secagg', 'privlora') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_admission_of_mixed_histories_uses_the_tight_accountant_on_the_whole_history():
    first, planned = SubsampledGaussian(0.8, 0.1, 10, 1.0, DELTA), SubsampledGaussian(1.2, 0.05, 30, 1.0, DELTA)
    after = tight([(0.8, 0.1, 10), (1.2, 0.05, 30)])
    adm = Admission(get_accountant("pld"), DELTA, {0: after * 1.001, 1: after * 0.999})
    adm.load({0: [first], 1: [first]})
    admitted, decisions = adm.admit({0: planned, 1: planned})
    assert admitted == [0]
    assert decisions[1].epsilon_after == pytest.approx(after) and "over its budget" in decisions[1].reason


def test_a_client_repeating_one_release_is_decided_by_its_round_count_once_k_max_is_known():
    m = SubsampledGaussian(1.0, 0.05, 20, 1.0, DELTA)
    budget = (tight([(1.0, 0.05, 20 * 6)]) + tight([(1.0, 0.05, 20 * 7)])) / 2  # 6 rounds fit, 7 do not
    adm = Admission(get_accountant("pld"), DELTA, {0: budget})
    verdicts = []
    for _ in range(8):
        admitted, (d,) = adm.admit({0: m})
        verdicts.append(d.admitted)
        if d.admitted:
            adm.record(0, m)
    assert verdicts == [True] * 6 + [False, False]
    assert adm.spent(0) <= budget < tight([(1.0, 0.05, 20 * 7)])
