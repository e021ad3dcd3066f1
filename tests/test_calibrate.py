"""Calibration against the emulators over their real transports (analog: pyvisa-py over loopback TCP; FPGA:
pyserial over a pty), compared with the physics' hidden per-device parameters (test-only access)."""

from __future__ import annotations

import numpy as np
import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.insitu.calibrate import (
    CalibrationOptions, PulseResponse, calibrate, fit_soft_bounds, per_device_arrays, weight_mapping,
)
from eqprop_hil.insitu.calibration import Calibration
from eqprop_hil.cli import main
from eqprop_hil.mock_instruments.launch import start_emulator

# Stated tolerances: median relative error over devices of the fitted step sizes and bounds. Measured on these
# seeds (quick mode, 8 commands of 127 pulses per run, c2c noise 0.3): about 1 % for both.
STEP_TOL = 0.05
BOUND_TOL = 0.05


@pytest.fixture(params=["analog", "fpga"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def _open(url: str):
    em = start_emulator(url)
    try:
        return em, open_array(em.resource)
    except BaseException:
        em.stop()
        raise


def _rel(est: np.ndarray, true: np.ndarray) -> float:
    return float(np.median(np.abs(est / true - 1)))


def test_recovers_soft_bounds_parameters_and_restores_the_instrument(kind: str) -> None:
    em, array = _open(f"sim://{kind}?sizes=8,16,4&device=soft_bounds&seed=5&up_down=0.05")
    try:
        before = [em.physics.read_weights(e).copy() for e in range(2)]
        result = calibrate(array, CalibrationOptions(quick=True))
        cal = result.calibration
        for e in range(2):
            dev = em.physics._w[e]  # the emulator's hidden per-device parameters
            fit = result.responses[(e, False)][1]
            assert fit.mask.all() and not fit.stuck.any()
            for name, tol in (("dw_up", STEP_TOL), ("dw_down", STEP_TOL), ("w_max", BOUND_TOL), ("w_min", BOUND_TOL)):
                err = _rel(getattr(fit, name), getattr(dev, name))
                assert err < tol, f"edge {e} {name}: median relative error {err:.3f}"
            assert fit.medians["r2"] > 0.99
            assert abs(fit.medians["asymmetry_median"] - 0.05) < 0.02
            ec = cal.edge(e)
            up, down = ec.step_arrays(dev.shape)
            np.testing.assert_allclose(up, ec.scale * ec.per_device["dw_up"], rtol=1e-6)
            assert abs(float(np.median(down)) / (ec.scale * float(np.median(dev.dw_down))) - 1) < STEP_TOL
            # the mapping puts k / sqrt(fan_in) at margin * the device half range
            m = cal.report["matrices"][f"{e}f"]["mapping"]
            assert ec.scale == pytest.approx(CalibrationOptions().k / np.sqrt(dev.shape[1]) / (0.8 * m["device_half_range"]))
            # weights reprogrammed within the write-verify tolerance, scales and gains put back
            assert np.abs(em.physics.read_weights(e) - before[e]).max() <= 0.0101
            assert em.physics.scale(e) == 1.0 and em.physics.gain(e) == 1.0
        assert em.physics.phase == "HOLD"
        g = cal.recommended_gain
        assert g is not None and 0.01 <= g <= 1
        assert result.sweep[g]["median"] < result.sweep[1.0]["median"]
        assert cal.settle_steps >= result.sweep[1.0]["median"]
        conv = cal.converters
        np.testing.assert_allclose(conv["input_gain"], 1.0, atol=2e-3)  # ideal converters in this emulator
        np.testing.assert_allclose(conv["output_gain"], 1.0, atol=2e-3)
    finally:
        array.close()
        em.stop()


def test_block_of_devices_pulses_nothing_else_and_stores_medians_only() -> None:
    em, array = _open("sim://fpga?sizes=8,16,4&seed=6")
    try:
        hidden = [em.physics._w[e].w.copy() for e in range(2)]
        result = calibrate(array, CalibrationOptions(quick=True, devices=20, edges=[0], restore=False,
                                                     gains=(1.0, 0.1)))
        fit = result.responses[(0, False)][1]
        assert fit.mask.sum() >= 20 and not fit.mask.all()
        after = em.physics._w[0].w
        assert np.array_equal(after[~fit.mask], hidden[0][~fit.mask])  # untouched outside the block
        assert not np.allclose(after[fit.mask], hidden[0][fit.mask])
        assert np.array_equal(em.physics._w[1].w, hidden[1])  # edge 1 not pulsed
        cal = result.calibration
        assert cal.edge(0).per_device == {} and cal.edge(1).per_device == {}
        assert _rel(fit.dw_up[fit.mask], em.physics._w[0].dw_up[fit.mask]) < STEP_TOL
        assert cal.edge(1).dw_up == cal.edge(0).dw_up  # pooled medians for the edge not measured
        assert "not measured" in cal.report["matrices"]["1f"]["note"]
    finally:
        array.close()
        em.stop()


def test_untied_feedback_matrix_is_calibrated() -> None:
    em, array = _open("sim://fpga?sizes=6,8,4&feedback=untied&seed=7")
    try:
        result = calibrate(array, CalibrationOptions(quick=True, edges=[1], gains=(1.0, 0.1)))
        fit = result.responses[(1, True)][1]
        dev = em.physics._b[1]
        assert fit.dw_up.shape == dev.shape == (8, 4)
        assert _rel(fit.dw_down, dev.dw_down) < STEP_TOL and _rel(fit.w_max, dev.w_max) < BOUND_TOL
        assert result.calibration.edge(1, True).per_device["dw_up"].shape == (8, 4)
    finally:
        array.close()
        em.stop()


def test_ideal_devices_give_the_exact_step_and_no_bound() -> None:
    em, array = _open("sim://analog?sizes=4,6,3&device=ideal&seed=1")
    try:
        result = calibrate(array, CalibrationOptions(quick=True, gains=(1.0, 0.1)))
        fit = result.responses[(0, False)][1]
        np.testing.assert_allclose(fit.dw_up, 0.001, rtol=1e-3)
        np.testing.assert_allclose(fit.dw_down, 0.001, rtol=1e-3)
        assert np.isinf(fit.w_max).all() and np.isinf(fit.w_min).all()
        assert result.calibration.edge(0).scale == 1.0  # no bounds to map onto: the scale is left at 1
    finally:
        array.close()
        em.stop()


def test_fit_is_exact_on_noise_free_soft_bounds_data() -> None:
    rng = np.random.default_rng(0)
    shape, n = (3, 5), 50
    up, down = rng.uniform(5e-4, 2e-3, shape), rng.uniform(5e-4, 2e-3, shape)
    w_max, w_min = rng.uniform(0.3, 0.9, shape), -rng.uniform(0.3, 0.9, shape)
    signs = np.repeat([-1, 1, -1], 6)
    w = [rng.uniform(-0.2, 0.2, shape)]
    for s in signs:
        x = w[-1].copy()
        for _ in range(n):
            x = x + (up * (1 - x / w_max) if s > 0 else -down * (1 - x / w_min))
        w.append(x)
    fit = fit_soft_bounds(PulseResponse(0, False, n, signs, np.stack(w), np.ones(shape, bool)))
    for name, true in (("dw_up", up), ("dw_down", down), ("w_max", w_max), ("w_min", w_min)):
        np.testing.assert_allclose(getattr(fit, name), true, rtol=1e-6)
    assert (fit.r2 > 0.999999).all()
    arrays = per_device_arrays(fit)
    assert set(arrays) == {"dw_up", "dw_down", "w_max", "w_min"} and arrays["dw_up"].dtype == np.float32
    m = weight_mapping(0.5, 1e-3, 1e-3, fan_in=64, k=4.0, margin=0.8)
    assert m["scale"] == pytest.approx(0.5 / 0.4) and m["quantum_up"] == pytest.approx(1.25e-3)


def test_cli_writes_a_loadable_file_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "cal" / "board.json"
    with pytest.raises(SystemExit):  # the convention: a directory the user names must exist
        main(["calibrate", "--instrument", "sim://fpga?sizes=8,16,4&seed=2", "--out", str(out)])
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()
    out.parent.mkdir()
    rc = main(["calibrate", "--instrument", "sim://fpga?sizes=8,16,4&seed=2", "--out", str(out), "--quick",
               "--gains", "1,0.25,0.05"])
    assert rc == 0
    cal = Calibration.load(out)
    cal.check_topology({"sizes": [8, 16, 4], "edges": [(0, 1), (1, 2)]})
    assert [(c.edge, c.feedback) for c in cal.edges] == [(0, False), (1, False)]
    assert cal.edge(0).per_device["dw_up"].shape == (16, 8)
    assert cal.recommended_gain in (0.25, 0.05) and cal.settle_steps > 0
    assert out.with_suffix(".npz").exists()
    for suffix in ("pulse_response", "step_hist", "settle_gain"):
        png = tmp_path / "cal" / "board_plots" / f"{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "recommended feedback gain" in text and "0f" in text and "1f" in text


def test_cli_rejects_bad_gains(tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["calibrate", "--out", str(tmp_path / "x.json"), "--gains", "2"])
    assert not (tmp_path / "x.json").exists()
