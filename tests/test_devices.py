"""Device models of the emulated crossbar, checked against the formulas of REFERENCE.md section 7 and
statistically against the configured variation (10k devices)."""

from __future__ import annotations

import numpy as np
import pytest

from eqprop_hil.mock_instruments.devices import DeviceArray, DeviceConfig
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics
from eqprop_hil.protocols.errors import ValueRangeError


def array(rows: int, cols: int, seed: int = 0, **device) -> ArrayPhysics:
    """A one-edge array (rows x cols devices on edge 0) with power-on weights 0."""
    return ArrayPhysics(ArrayConfig(sizes=[cols, rows], device=DeviceConfig(**device), init_scale=0.0, seed=seed))


def devices(shape, seed=0, initial=0.0, **device) -> DeviceArray:
    return DeviceArray(DeviceConfig(**device), shape, np.full(shape, initial), np.random.SeedSequence(seed))


def test_soft_bounds_noise_free_follows_formula_exactly():
    d = devices((50, 40), model="soft_bounds", dw_min=0.002, dw_min_c2c=0.0, initial=0.1)
    n_up, n_down = 300, 500
    w0 = d.w.copy()  # 0.1, or a device's own bound where d2d put it below 0.1
    for _ in range(n_up):
        d.pulse(np.ones(d.shape, dtype=int))
    expect_up = d.w_max - (d.w_max - w0) * (1 - d.dw_up / d.w_max) ** n_up
    np.testing.assert_allclose(d.w, expect_up, rtol=1e-9)
    for _ in range(n_down):
        d.pulse(-np.ones(d.shape, dtype=int))
    expect_down = d.w_min + (expect_up - d.w_min) * (1 + d.dw_down / d.w_min) ** n_down
    np.testing.assert_allclose(d.w, expect_down, rtol=1e-9, atol=1e-12)


def test_soft_bounds_with_c2c_noise_follows_formula_on_average():
    """Multiplicative c2c noise of mean 1 on a response linear in w: the mean over devices follows the formula."""
    d = devices((100, 50), seed=3, model="soft_bounds", dw_min=0.002)
    n = 200
    up = np.ones(d.shape, dtype=int)
    d.pulse(up * n)  # one command of 200 pulses per device (internal calls allow up to 255)
    expect_up = d.w_max - d.w_max * (1 - d.dw_up / d.w_max) ** n
    err = d.w - expect_up
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(err.size)
    assert err.std() < 0.3 * 0.002 * np.sqrt(n)  # c2c noise accumulates like a random walk, not worse
    start = d.w.copy()
    d.pulse(-up * n)
    expect_down = d.w_min + (start - d.w_min) * (1 + d.dw_down / d.w_min) ** n
    err = d.w - expect_down
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(err.size)
    assert np.abs(d.w - start).mean() > 0.2  # the test moved the weights a long way


def test_soft_bounds_converges_to_symmetry_point():
    d = devices((50, 40), seed=5, model="soft_bounds", dw_min=0.004, dw_min_d2d=0.1, up_down=0.1, up_down_d2d=0.05)
    quiet = devices((50, 40), seed=5, model="soft_bounds", dw_min=0.004, dw_min_d2d=0.1, up_down=0.1,
                    up_down_d2d=0.05, dw_min_c2c=0.0)
    w_star = (d.dw_up - d.dw_down) / (d.dw_up / d.w_max - d.dw_down / d.w_min)
    assert w_star.std() > 0.03  # asymmetry varies per device, so does the symmetry point
    up = np.ones(d.shape, dtype=int)
    tail, quiet_tail = np.zeros(d.shape), np.zeros(d.shape)
    for k in range(1500):
        for sign in (1, -1):
            d.pulse(sign * up)
            quiet.pulse(sign * up)
            if k >= 1300:  # average over both half-steps of the last 200 up/down pairs
                tail += d.w / 400
                quiet_tail += quiet.w / 400
    np.testing.assert_allclose(quiet_tail, w_star, atol=0.002)  # without c2c noise: within O(dw) of w*
    err = tail - w_star  # with c2c noise each device wanders around w* (~0.007 rms here), unbiased
    assert abs(err.mean()) < 0.001
    assert np.sqrt((err**2).mean()) < 0.01


def measure_steps(p: ArrayPhysics, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-device up and down step, in units of dw_min, from +count then -count pulses (constant model)."""
    shape = p.read_weights(0).shape
    w0 = p.read_weights(0).astype(float)
    p.apply_pulses(0, np.full(shape, count, dtype=np.int8))
    w1 = p.read_weights(0).astype(float)
    p.apply_pulses(0, np.full(shape, -count, dtype=np.int8))
    w2 = p.read_weights(0).astype(float)
    return (w1 - w0) / count / 0.001, (w1 - w2) / count / 0.001


def test_d2d_variation_and_asymmetry_match_configuration():
    p = array(100, 100, seed=1, model="constant", dw_min_d2d=0.3, dw_min_c2c=0.0, up_down=0.05,
              up_down_d2d=0.02, w_bounds_d2d=0.0, w_max=1.0, w_min=-1.0)
    up, down = measure_steps(p, 10)
    mean_step = (up + down) / 2
    asym = (up - down) / (up + down)
    assert mean_step.mean() == pytest.approx(1.0, abs=0.01)
    assert mean_step.std() == pytest.approx(0.3, abs=0.01)  # standard error of a std over 10k: ~0.002
    assert asym.mean() == pytest.approx(0.05, abs=0.001)
    assert asym.std() == pytest.approx(0.02, abs=0.001)


def test_c2c_noise_matches_configuration():
    p = array(100, 100, seed=2, model="constant", dw_min_d2d=0.0, dw_min_c2c=0.3, up_down_d2d=0.0)
    steps = p.read_weights(0).astype(float)
    p.apply_pulses(0, np.ones((100, 100), dtype=np.int8))
    steps = (p.read_weights(0) - steps) / 0.001
    assert steps.mean() == pytest.approx(1.0, abs=0.01)
    assert steps.std() == pytest.approx(0.3, abs=0.01)


def test_bounds_d2d_constant_step_saturates_at_device_bounds():
    p = array(100, 100, seed=4, model="constant", dw_min=0.05, dw_min_d2d=0.0, dw_min_c2c=0.0, up_down_d2d=0.0)
    p.apply_pulses(0, np.full((100, 100), 127, dtype=np.int8))  # 6.35 >> any bound
    top = p.read_weights(0) / 0.6
    assert top.mean() == pytest.approx(1.0, abs=0.01)
    assert top.std() == pytest.approx(0.3, abs=0.015)
    assert top.min() > 0  # bounds never cross zero


def test_power_step_single_pulse_formula():
    d = devices((30, 30), seed=6, model="power", dw_min_c2c=0.0, gamma_up=2.0, gamma_down=0.5, initial=0.2)
    w0 = d.w.copy()
    omega = (d.w_max - w0) / (d.w_max - d.w_min)
    d.pulse(np.ones(d.shape, dtype=int))
    np.testing.assert_allclose(d.w - w0, d.dw_up * omega**2.0, rtol=1e-9)
    w = d.w.copy()
    omega = (d.w_max - w) / (d.w_max - d.w_min)
    d.pulse(-np.ones(d.shape, dtype=int))
    np.testing.assert_allclose(w - d.w, d.dw_down * (1 - omega) ** 0.5, rtol=1e-9)


def test_ideal_model_is_exact():
    p = ArrayPhysics(ArrayConfig(sizes=[6, 5], device=DeviceConfig(model="ideal"), seed=3))
    target = np.random.default_rng(0).normal(0, 3.0, (5, 6))  # far outside any physical bound: ideal has none
    assert p.program_weights(0, target) < 1e-12
    counts = np.random.default_rng(1).integers(-127, 128, (5, 6)).astype(np.int8)
    fired = p.apply_pulses(0, counts)
    assert fired == int(np.abs(counts.astype(int)).sum())
    np.testing.assert_array_equal(p.read_weights(0), (target + counts * 0.001).astype(np.float32))
    p.set_scale(0, 2.0)
    np.testing.assert_array_equal(p.read_weights(0), (2.0 * (target + counts * 0.001)).astype(np.float32))


def test_outer_product_expectation_matches_scaled_outer_product():
    p = ArrayPhysics(ArrayConfig(sizes=[6, 5], device=DeviceConfig(model="ideal"), init_scale=0.0, seed=8))
    rows = np.array([0.9, -0.5, 0.0, 0.3, -1.0])
    cols = np.array([0.2, -0.7, 1.0, 0.05, -0.4, 0.6])
    bit_length, repeats = 31, 400
    fired = sum(p.apply_outer(0, rows, cols, bit_length) for _ in range(repeats))
    counts = p.read_weights(0).astype(float) / 0.001
    assert fired == int(round(np.abs(counts).sum()))
    expect = bit_length * repeats * np.outer(rows, cols)
    prob = np.abs(np.outer(rows, cols))
    se = np.sqrt(bit_length * repeats * prob * (1 - prob)) + 1e-9
    assert np.all(np.abs(counts - expect) <= 5 * se + 0.5)
    assert np.all(counts[2] == 0)  # a zero row never fires
    assert np.all(np.sign(counts[prob > 0.05]) == np.sign(expect[prob > 0.05]))


def test_program_weights_soft_bounds_converges():
    # bounds spread 0.1 (not the default 0.3) so that every device can reach +-0.3: with 0.3 about 5% of the
    # devices top out below 0.3 and write-verify reports them in the residual, as real hardware would
    p = ArrayPhysics(ArrayConfig(sizes=[20, 16], device=DeviceConfig(model="soft_bounds", w_bounds_d2d=0.1), seed=9))
    # this seed has a device at the 5% floor of dw_min: the adaptive write-verify must still bring it in
    target = np.random.default_rng(2).uniform(-0.3, 0.3, (16, 20))
    residual = p.program_weights(0, target, tolerance=0.01, max_iterations=40)
    assert residual <= 0.01
    assert np.abs(p.read_weights(0) - target).max() == pytest.approx(residual, abs=1e-6)
    p.set_scale(0, 0.5)
    assert p.program_weights(0, target * 0.5, tolerance=0.005, max_iterations=40) <= 0.005


def test_write_noise_is_seen_on_reads_not_kept_in_hidden_weight():
    p = array(100, 100, seed=5, model="constant", dw_min_d2d=0.0, dw_min_c2c=0.0, up_down_d2d=0.0,
              write_noise=2.0)
    one = np.ones((100, 100), dtype=np.int8)
    p.apply_pulses(0, one)
    first = p.read_weights(0).astype(float) - 0.001
    assert first.std() == pytest.approx(0.002, rel=0.05)
    p.apply_pulses(0, -one)  # hidden weight is exactly back at 0; a fresh write-noise sample is seen
    second = p.read_weights(0).astype(float)
    assert second.std() == pytest.approx(0.002, rel=0.05)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05


def test_drift_and_stuck_devices():
    p = array(50, 40, seed=6, model="constant", dw_min_d2d=0.0, dw_min_c2c=0.0, up_down_d2d=0.0,
              w_bounds_d2d=0.0, drift_nu=0.1, drift_t0_steps=10.0, stuck_fraction=0.25)
    p.apply_pulses(0, np.full((50, 40), 100, dtype=np.int8))
    w = p.read_weights(0)
    stuck = w == 0
    assert stuck.mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_allclose(w[~stuck], 0.1, rtol=1e-6)
    p.step(90)  # HOLD: states do not move, but time passes
    np.testing.assert_allclose(p.read_weights(0)[~stuck], 0.1 * (100 / 10) ** -0.1, rtol=1e-6)
    assert np.all(p.read_weights(0)[stuck] == 0)


def test_device_config_refuses_impossible_devices():
    for bad in ({"model": "memristor"}, {"dw_min": 0.0}, {"w_min": 0.1}, {"up_down": 1.0},
                {"stuck_fraction": 1.5}, {"dw_min_c2c": float("nan")}, {"drift_nu": -0.1}):
        with pytest.raises(ValueRangeError):
            DeviceConfig(**bad)
