"""Per-client epsilon and calibration, checked against Google's dp_accounting (PLD and RDP)."""

from __future__ import annotations

import pytest

from accounting import SubsampledGaussian
from privlora.core.accountants import calibrate_noise, epsilon

dp_accounting = pytest.importorskip("dp_accounting")


def pld_epsilon(history, delta):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for h in history:
        acc.compose(dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(h.sample_rate, dp_event.GaussianDpEvent(h.noise_multiplier)), h.steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps", [(0.8, 0.25, 15), (1.0, 0.1, 40), (1.5, 0.01, 1000), (0.7, 1 / 9, 30)])
def test_prv_epsilon_is_within_one_percent_of_pld_and_not_below_it(sigma, q, steps):
    h = [SubsampledGaussian(sigma, q, steps, 1.0, 1e-5)]
    ours, ref = epsilon(h, 1e-5, "prv"), pld_epsilon(h, 1e-5)
    # PRV's stated error is eps_error = 0.01 (absolute); beyond that, 1% relative
    assert abs(ours - ref) <= max(0.01 * ref, 0.0101)
    assert ours >= ref - 0.0101


def test_heterogeneous_history_composes_like_pld():
    h = [SubsampledGaussian(0.9, 0.2, 10, 1.0, 1e-5), SubsampledGaussian(1.3, 0.05, 100, 1.0, 1e-5)]
    assert epsilon(h, 1e-5, "prv") == pytest.approx(pld_epsilon(h, 1e-5), rel=0.01)


def test_rdp_is_looser_than_prv():
    h = [SubsampledGaussian(1.0, 0.1, 40, 1.0, 1e-5)]
    assert epsilon(h, 1e-5, "rdp") > epsilon(h, 1e-5, "prv")


def test_calibrated_noise_meets_the_target_by_pld_too():
    sigma = calibrate_noise(8.0, 1e-5, 0.2, 15)
    h = [SubsampledGaussian(sigma, 0.2, 15, 1.0, 1e-5)]
    assert epsilon(h, 1e-5) <= 8.0
    assert pld_epsilon(h, 1e-5) <= 8.0 + 0.01
    assert pld_epsilon([SubsampledGaussian(sigma * 0.97, 0.2, 15, 1.0, 1e-5)], 1e-5) > 8.0
