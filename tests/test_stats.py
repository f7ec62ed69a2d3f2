"""Unit tests of the estimator: closed-form cases, clamping, smoothing, skipping, bad input."""
import math

import pytest

from scaling_plugins.stats import (BiasCorrectedEMA, GradientSample, GradientStatistics, adascale_gain,
                                   default_smoothing, estimate_moments, noise_scale)


def test_two_orthogonal_gradients_give_four_thirds():
    # Linear(2, 2) with bias, loss = sum, inputs [1,0] and [0,1]: ‖g_i‖² = 4 each, ‖ḡ‖² = 3.
    sigma_sq, mu_sq = estimate_moments(GradientSample(8.0, 3.0, 2), scale=2)
    assert (sigma_sq, mu_sq) == (2.0, 2.0)
    assert adascale_gain(sigma_sq, mu_sq, 2) == pytest.approx(4 / 3)


def test_opposite_gradients_give_full_scale_with_mu_clamped_to_zero():
    sigma_sq, mu_sq = estimate_moments(GradientSample(12.0, 2.0, 2), scale=2)
    assert sigma_sq == 8.0 and mu_sq == 0.0
    assert adascale_gain(sigma_sq, mu_sq, 2) == 2.0


def test_identical_gradients_clamp_variance_and_give_unit_gain():
    sigma_sq, mu_sq = estimate_moments(GradientSample(6.0, 3.0, 2), scale=2)
    assert sigma_sq == pytest.approx(1e-9 * 2 * 3.0)   # ε of the largest σ̂² (T = 0): S·(L/n)/(n − 1)
    assert adascale_gain(sigma_sq, mu_sq, 2) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("factor", [1e-6, 1e-3, 1.0, 1e6])
def test_the_gain_does_not_change_when_the_loss_is_multiplied(factor):
    """σ² = μ² = 1e-7 (late training), S = n = 8: the gain is (σ² + μ²)/(σ²/8 + μ²) = 16/9, and stays 16/9 with
    the loss (so every gradient) multiplied by ``factor`` (squared norms by factor²)."""
    sigma_sq, mu_sq, n = 1e-7, 1e-7, 8
    local, mean = n * (mu_sq + sigma_sq), mu_sq + sigma_sq / n   # L = n·(μ² + σ²·n/S), T = μ² + σ²/S
    stats = GradientStatistics(scale=n, smoothing=0.0)
    stats.update(GradientSample(local * factor ** 2, mean * factor ** 2, n))
    assert stats.gain == pytest.approx(16 / 9, rel=1e-9)
    assert (stats.sigma_sq, stats.mu_sq) == pytest.approx((sigma_sq * factor ** 2, mu_sq * factor ** 2), rel=1e-9)


def test_all_zero_gradients_are_skipped_and_keep_the_estimates():
    stats = GradientStatistics(scale=2, smoothing=0.5)
    stats.update(GradientSample(8.0, 3.0, 2))
    assert not stats.update(GradientSample(0.0, 0.0, 2))
    assert stats.last_update_skipped and stats.gain == pytest.approx(4 / 3)


def test_scale_different_from_count_keeps_units_of_the_base_batch():
    # 4 gradients of a batch 2·B0 each (S = 8): E‖g_i‖² = μ² + σ²/2, E‖ḡ‖² = μ² + σ²/8.
    mu_sq, sigma_sq = 1.5, 4.0
    sample = GradientSample(4 * (mu_sq + sigma_sq / 2), mu_sq + sigma_sq / 8, 4)
    assert estimate_moments(sample, scale=8) == pytest.approx((sigma_sq, mu_sq))


def test_gain_lies_between_one_and_scale():
    for sigma_sq, mu_sq in [(1e-6, 5.0), (3.0, 0.0), (2.0, 7.0)]:
        assert 1.0 <= adascale_gain(sigma_sq, mu_sq, 16) <= 16.0


def test_noise_scale_is_b0_sigma_over_mu():
    assert noise_scale(6.0, 2.0, base_batch=32) == 96.0
    assert noise_scale(6.0, 0.0) == math.inf


def test_bias_corrected_ema_returns_first_value_then_weighted_mean():
    ema = BiasCorrectedEMA(0.5)
    assert ema.value is None
    ema.update(4.0)
    assert ema.value == 4.0
    ema.update(1.0)
    # raw = 0.5·(0.5·4) + 0.5·1 = 1.5, weight = 0.75
    assert ema.value == pytest.approx(2.0)


def test_default_smoothing_follows_the_paper_down_to_a_floor_of_0_9():
    assert default_smoothing(4) == pytest.approx(0.996)
    assert default_smoothing(100) == pytest.approx(0.9)
    assert default_smoothing(256) == default_smoothing(2000) == 0.9


def test_non_finite_sample_is_skipped_and_estimates_stand():
    stats = GradientStatistics(scale=2)
    assert stats.update(GradientSample(8.0, 3.0, 2))
    before = (stats.sigma_sq, stats.mu_sq, stats.gain)
    assert not stats.update(GradientSample(float("nan"), 3.0, 2))
    assert stats.last_update_skipped
    assert (stats.sigma_sq, stats.mu_sq, stats.gain) == before
    assert not stats.update(GradientSample(8.0, float("inf"), 2))
    assert stats.update(GradientSample(8.0, 3.0, 2)) and not stats.last_update_skipped


def test_gain_is_one_before_any_sample():
    assert GradientStatistics(scale=8).gain == 1.0


def test_rescale_keeps_estimates_and_moves_default_smoothing():
    stats = GradientStatistics(scale=2)
    stats.update(GradientSample(8.0, 3.0, 2))
    stats.rescale(4)
    assert stats.scale == 4 and stats.smoothing == pytest.approx(0.996)
    assert stats.sigma_sq == 2.0
    assert stats.gain == pytest.approx(adascale_gain(2.0, 2.0, 4))


def test_state_dict_round_trip_is_exact():
    a = GradientStatistics(scale=4)
    for L, T in [(9.0, 1.0), (7.5, 0.7), (11.0, 1.3)]:
        a.update(GradientSample(L, T, 4))
    b = GradientStatistics(scale=4)
    b.load_state_dict(a.state_dict())
    for L, T in [(8.0, 0.9), (10.0, 1.1)]:
        a.update(GradientSample(L, T, 4))
        b.update(GradientSample(L, T, 4))
        assert a.gain == b.gain and a.sigma_sq == b.sigma_sq


@pytest.mark.parametrize("scale", [0.5, 0, -1, float("nan")])
def test_scale_below_one_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be >= 1"):
        GradientStatistics(scale=scale)


@pytest.mark.parametrize("theta", [1.0, -0.1, 1.5])
def test_smoothing_outside_unit_interval_is_refused(theta):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        GradientStatistics(scale=2, smoothing=theta)


def test_one_gradient_has_no_variance():
    with pytest.raises(ValueError, match="at least 2 gradients"):
        estimate_moments(GradientSample(1.0, 1.0, 1), scale=1)
