"""Calibration measurements and fits: small steps a lab script can call, each taking a :class:`NeuronArray`.

Everything is vectorised over devices and neurons: a whole matrix is pulsed with one ``apply_pulses`` command and
read back with one ``read_weights``; the only loops are over commands, time steps, inputs and edges.
Weights are measured in *device units*: each matrix's weight scale is set to 1 while it is measured (so that
``read_weights`` returns ``w_device``) and put back afterwards, with the original weights reprogrammed.

- :func:`measure_pulse_response` / :func:`fit_soft_bounds`: per-device step sizes and bounds of the soft-bounds
  model ``w += dw_up (1 - w / w_max)`` (up), ``w -= dw_down (1 - w / w_min)`` (down), see REFERENCE.md 7.
- :func:`weight_mapping`: the scale that maps ``k / sqrt(fan_in)`` software weights inside the device range.
- :func:`settle_trace` / :func:`measure_settling` / :func:`gain_sweep`: settle steps and contraction (spectral
  radius) versus FRE feedback gain, and the gain to recommend (REFERENCE.md 6).
- :func:`measure_converters`: DAC/ADC gain and offset per neuron, read noise.
- :func:`calibrate`: all of it, into a :class:`eqprop_hil.insitu.calibration.Calibration` (what ``hil calibrate`` runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from eqprop_hil.drivers.interface import NeuronArray
from eqprop_hil.insitu.calibration import Calibration, CalibrationError, EdgeCalibration


class Progress(Protocol):
    """What the measurements report progress to (a ``tqdm`` bar fits)."""

    def update(self, n: int = 1) -> Any: ...


def _tick(progress: Progress | None, n: int = 1) -> None:
    if progress is not None:
        progress.update(n)


def describe(array: NeuronArray) -> dict:
    """The instrument's own physics description (``describe()``); falls back to ``snapshot()["describe"]``
    for drivers that only publish it inside the snapshot."""
    if hasattr(array, "describe"):
        return dict(array.describe())
    return dict(array.snapshot().get("describe", {}))


# ------------------------------------------------------------------------------------------ pulse response
@dataclass
class PulseResponse:
    """Raw weights of one matrix during a pulse-response run, device units.

    ``weights`` is ``(n_commands + 1, n_rows, n_cols)`` read back before and after each command, ``signs`` is
    ``(n_commands,)`` +1 (potentiate) / -1 (depress), every command firing ``pulses`` pulses on the devices of
    ``mask`` (the others get none and are not fitted).
    """

    edge: int
    feedback: bool
    pulses: int
    signs: np.ndarray
    weights: np.ndarray
    mask: np.ndarray


def block_mask(shape: tuple[int, int], devices: int | None) -> np.ndarray:
    """Boolean mask of the devices to measure: all, or a top-left block of at least ``devices`` devices."""
    rows, cols = shape
    mask = np.zeros(shape, dtype=bool)
    if devices is None or devices >= rows * cols:
        mask[:] = True
        return mask
    n_cols = min(cols, max(1, math.ceil(math.sqrt(devices))))
    n_rows = min(rows, max(1, math.ceil(devices / n_cols)))
    mask[:n_rows, :n_cols] = True
    return mask


def measure_pulse_response(
    array: NeuronArray, edge: int, *, feedback: bool = False, pulses: int = 127, commands: int = 16,
    mask: np.ndarray | None = None, progress: Progress | None = None,
) -> PulseResponse:
    """Drive the devices of ``mask`` down, up across the range, then down again, ``commands`` commands per run
    of ``pulses`` pulses each, reading the whole matrix back after every command.

    Starts from whatever weight each device holds; the first down run only adds data for the down fit. The
    weight scale must be 1 (see :func:`calibrate_matrix`) for the reads to be in device units.
    """
    first = np.asarray(array.read_weights(edge, feedback=feedback), dtype=np.float64)
    mask = np.ones(first.shape, dtype=bool) if mask is None else mask
    signs = np.concatenate([-np.ones(commands), np.ones(commands), -np.ones(commands)]).astype(np.int64)
    trace = [first]
    for sign in signs:
        counts = (sign * pulses * mask).astype(np.int8)
        array.apply_pulses(edge, counts, feedback=feedback)
        trace.append(np.asarray(array.read_weights(edge, feedback=feedback), dtype=np.float64))
        _tick(progress)
    return PulseResponse(edge, feedback, pulses, signs, np.stack(trace), mask)


@dataclass
class SoftBoundsFit:
    """Per-device fit of one matrix, device units; ``up``/``down`` arrays have the matrix's shape.

    ``dw_down`` is positive; a bound that the data cannot resolve (no curvature) is ``inf`` / ``-inf``.
    ``r2`` is the goodness of fit of the predicted weight change per command (both directions pooled).
    """

    dw_up: np.ndarray
    dw_down: np.ndarray
    w_max: np.ndarray
    w_min: np.ndarray
    r2: np.ndarray
    stuck: np.ndarray
    c2c: float  # pooled cycle-to-cycle noise estimate (relative std of one pulse's step)
    mask: np.ndarray  # the devices that were pulsed and fitted
    medians: dict[str, float] = field(default_factory=dict)


def _regress(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-device least squares y = A x + B over axis 0 (transitions); x, y ``(K, rows, cols)``."""
    mx, my = x.mean(0), y.mean(0)
    vx = ((x - mx) ** 2).mean(0)
    slope = np.where(vx > 0, ((x - mx) * (y - my)).mean(0) / np.where(vx > 0, vx, 1.0), 1.0)
    return slope, my - slope * mx


def _direction(x: np.ndarray, y: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``n`` pulses of one direction. One pulse maps w -> a w + b (soft bounds are linear in w), so ``n``
    pulses map w -> A w + B with A = a^n, B = b (1 - a^n) / (1 - a): unbiased under zero-mean c2c noise.
    Returns the signed step per pulse b, the bound b / (1 - a) and the predicted change per command."""
    A, B = _regress(x, y)
    a = np.clip(A, 1e-9, None) ** (1.0 / n)
    curved = (1 - a) > 1e-6  # otherwise the data show no bound: constant steps B / n
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(curved, B * (1 - a) / (1 - A), B / n)
        bound = np.where(curved, b / (1 - a), np.sign(b) * np.inf)
    return b, bound, A * x + B - x


def fit_soft_bounds(resp: PulseResponse) -> SoftBoundsFit:
    """Fit the soft-bounds model per device from a :class:`PulseResponse` (device units)."""
    w, s, n = resp.weights, resp.signs, resp.pulses
    x, y = w[:-1], w[1:]
    up, down = s > 0, s < 0
    b_up, w_max, pred_up = _direction(x[up], y[up], n)
    b_dn, w_min, pred_dn = _direction(x[down], y[down], n)
    step = np.concatenate([y[up] - x[up], y[down] - x[down]])
    pred = np.concatenate([pred_up, pred_dn])
    resid = step - pred
    ss_tot = ((step - step.mean(0)) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1 - (resid**2).sum(0) / ss_tot, np.nan)
    moved = np.abs(w[-1] - w[0]) + np.abs(np.diff(w, axis=0)).sum(0)
    stuck = resp.mask & (moved < 0.05 * np.median(moved[resp.mask]))
    # c2c: a command of n pulses sums n independent relative errors of std c2c on steps of about pred / n
    big = np.abs(pred) > 0.2 * np.median(np.abs(pred[:, resp.mask]))
    big &= resp.mask & ~stuck
    c2c = float(np.std(resid[big] / (np.abs(pred[big]) / math.sqrt(n)))) if big.any() else float("nan")
    fit = SoftBoundsFit(b_up, -b_dn, w_max, w_min, r2, stuck, c2c, resp.mask)
    good = resp.mask & ~stuck
    fit.medians = {k: float(np.median(getattr(fit, k)[good])) if good.any() else float("nan")
                   for k in ("dw_up", "dw_down", "w_max", "w_min", "r2")}
    asym = (fit.dw_up[good] - fit.dw_down[good]) / (fit.dw_up[good] + fit.dw_down[good])
    fit.medians |= {"asymmetry_median": float(np.median(asym)), "asymmetry_std": float(np.std(asym)),
                    "asymmetry_mean": float(np.mean(asym)), "devices": int(resp.mask.sum()),
                    "stuck": int(stuck.sum()), "c2c": c2c}
    return fit


def per_device_arrays(fit: SoftBoundsFit) -> dict[str, np.ndarray]:
    """Arrays for :class:`EdgeCalibration.per_device`: stuck or unresolved devices get the median (so that no
    step is 0 or infinite); empty when only a block was measured (then training uses the medians)."""
    if not fit.mask.all():
        return {}
    out = {}
    bad = fit.stuck
    for k in ("dw_up", "dw_down", "w_max", "w_min"):
        arr = getattr(fit, k).copy()
        arr[bad | ~np.isfinite(arr) | ((arr <= 0) if k != "w_min" else (arr >= 0))] = fit.medians[k]
        out[k] = arr.astype(np.float32)
    return out


def half_range(fit: SoftBoundsFit) -> float:
    """Median over the fitted devices of ``min(w_max, -w_min)``, device units (NaN if no bound was resolved)."""
    good = fit.mask & ~fit.stuck & np.isfinite(fit.w_max) & np.isfinite(fit.w_min)
    return float(np.median(np.minimum(fit.w_max, -fit.w_min)[good])) if good.any() else float("nan")


def weight_mapping(half: float, up: float, down: float, fan_in: int, *, k: float = 16.0,
                   margin: float = 0.8) -> dict[str, float]:
    """Scale of one matrix: ``k / sqrt(fan_in)`` (k initial bounds) maps to ``margin`` of the device half range
    ``half``; ``up``/``down`` are the median steps (device units), giving the effective pulse quantum.

    Too tight a mapping turns many small updates of noisy sign into weight decay under soft bounds
    (REFERENCE.md 9), hence ``k`` > 1 by default. Without resolved bounds the scale stays 1.
    """
    software = k / math.sqrt(fan_in)
    scale = software / (margin * half) if math.isfinite(half) and half > 0 else 1.0
    return {"scale": scale, "software_range": software, "device_half_range": half, "k": k, "margin": margin,
            "quantum_up": scale * up, "quantum_down": scale * down,
            "pulses_per_software_range": software / (scale * 0.5 * (up + down))}


# ------------------------------------------------------------------------------------------ settling
def _flat(states: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.float64) for s in states[1:]])


def settle_trace(array: NeuronArray, volts: np.ndarray, *, max_steps: int = 200, tol: float = 1e-4,
                 extra: int = 3) -> np.ndarray:
    """Free phase from reset with input ``volts``; after each ``settle(1)`` the change of the non-input layers,
    ``(steps, 2)``: column 0 ``max |s_{t+1} - s_t|`` (volts), column 1 its Euclidean norm. Stops once column 0
    has stayed below ``tol`` for ``extra`` more steps, or at ``max_steps``. Ends in HOLD."""
    array.reset()
    array.set_input(volts)
    array.set_phase("FREE")
    prev, diffs, below = _flat(array.read_state()), [], 0
    try:
        for _ in range(max_steps):
            array.settle(1)
            cur = _flat(array.read_state())
            diffs.append((float(np.abs(cur - prev).max()), float(np.linalg.norm(cur - prev))))
            prev = cur
            below = below + 1 if diffs[-1][0] < tol else 0
            if below > extra:
                break
    finally:
        array.set_phase("HOLD")
    return np.asarray(diffs).reshape(-1, 2)


def steps_to_settle(trace: np.ndarray, tol: float) -> int:
    """Steps until ``max |s_{t+1} - s_t| < tol`` (1-based); ``len(trace) + 1`` when it never got there."""
    hit = np.flatnonzero(trace[:, 0] < tol)
    return int(hit[0]) + 1 if hit.size else len(trace) + 1


def contraction(trace: np.ndarray, tol: float, skip: int) -> float:
    """Spectral-radius estimate: the geometric decay rate of ``||s_{t+1} - s_t||`` near the fixed point, a
    log-linear fit over the steps after the ``skip`` a signal needs to cross the layers while the change is
    still above the tolerance (below it, read noise and quantisation dominate). NaN with fewer than 2 points."""
    t = np.arange(len(trace))
    use = (t >= skip) & (trace[:, 0] >= tol) & (trace[:, 1] > 0)
    if use.sum() < 2:
        return float("nan")
    slope = np.polyfit(t[use], np.log(trace[use, 1]), 1)[0]
    return float(np.exp(slope))


def measure_settling(array: NeuronArray, inputs: np.ndarray, *, tol: float = 1e-4, max_steps: int = 200,
                     progress: Progress | None = None) -> dict[str, Any]:
    """Settle steps (median, 90th percentile, worst) and contraction over ``inputs`` ``(n, n_0)`` volts."""
    layers = len(array.topology()["sizes"])
    steps, rho = [], []
    for x in inputs:
        trace = settle_trace(array, x, max_steps=max_steps, tol=tol)
        steps.append(steps_to_settle(trace, tol))
        rho.append(contraction(trace, tol, skip=layers - 1))
        _tick(progress)
    steps_arr = np.asarray(steps)
    finite = np.asarray([r for r in rho if math.isfinite(r)])
    return {"median": float(np.median(steps_arr)), "p90": float(np.percentile(steps_arr, 90)),
            "max": int(steps_arr.max()), "unsettled": int((steps_arr > max_steps).sum()), "steps": steps,
            "spectral_radius": float(np.median(finite)) if finite.size else float("nan")}


def gain_sweep(array: NeuronArray, gains: list[float], inputs: np.ndarray, *, tol: float = 1e-4,
               max_steps: int = 200, progress: Progress | None = None) -> dict[float, dict[str, Any]]:
    """Settling versus the FRE feedback gain (the same gain on every edge); leaves every gain at 1."""
    n_edges = len(array.topology()["edges"])
    out = {}
    try:
        for g in gains:
            for e in range(n_edges):
                array.set_feedback_gain(e, float(g))
            out[float(g)] = measure_settling(array, inputs, tol=tol, max_steps=max_steps, progress=progress)
    finally:
        for e in range(n_edges):
            array.set_feedback_gain(e, 1.0)
    return out


def recommend_gain(sweep: dict[float, dict[str, Any]], n_hidden: int, budget: int) -> tuple[float, str]:
    """The largest swept gain that settles within ``budget`` steps (90th percentile) and lies in REFERENCE.md
    6's range (at most 0.1 below 4 hidden layers, 0.25 deeper); else the fastest-settling gain."""
    cap = 0.1 if n_hidden < 4 else 0.25
    ok = [g for g, r in sweep.items() if g <= cap and r["p90"] <= budget and r["unsettled"] == 0]
    if ok:
        return max(ok), f"largest gain <= {cap} (REFERENCE 6, {n_hidden} hidden) settling within {budget} steps"
    best = min(sweep, key=lambda g: (sweep[g]["median"], -g))
    return best, f"no gain <= {cap} settles within {budget} steps: the fastest-settling gain"


# ------------------------------------------------------------------------------------------ converters
def _line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column fit y = g x + o over axis 0 and the rms residual; x ``(K,)``, y ``(K, n)``."""
    g, o = _regress(np.broadcast_to(x[:, None], y.shape), y)
    rms = np.sqrt(((y - (g * x[:, None] + o)) ** 2).mean(0))
    return g, o, rms


CONVERTER_METHOD = (
    "input neurons: set_input levels read back by read_state(0), per-neuron line fit (DAC and ADC together); "
    "all neurons: offset and read noise from reads of the zero state after reset; output neurons: feedback gains 0, "
    "a nudge current I shifts the settled output by R I, the slope of the read shift against nominal R I is the gain; "
    "hidden neurons: offset and noise only (no way to drive them to a known voltage)"
)


def measure_converters(array: NeuronArray, *, levels: int = 7, reads: int = 8, settle_steps: int = 200,
                       progress: Progress | None = None) -> dict[str, Any]:
    """Converter gain and offset per neuron, as far as the interface lets them be driven.

    - Input neurons: known voltages through ``set_input`` read back with ``read_state(0)``: gain and offset of
      the DAC -> ADC chain per input neuron (they cannot be separated from the host).
    - Every neuron: the ADC offset and read noise, from ``reads`` reads of the all-zero state after ``reset``.
    - Output neurons: with every feedback gain 0 the output cannot act on the layers below, so a nudge current
      ``I`` shifts the settled output by exactly ``R I`` (nudge outside the activation); the slope of the read
      shift against ``R I`` (nominal transimpedance R) is the output stage's gain, per neuron.
    Hidden neurons cannot be driven to a known voltage: only their offset and noise are measured.
    """
    desc = describe(array)
    topo = array.topology()
    sizes, n_edges = topo["sizes"], len(topo["edges"])
    dac_lo, dac_hi = desc.get("dac", {}).get("range_volts", [-1.0, 1.0])
    v = 0.9 * min(-dac_lo, dac_hi) * np.linspace(-1, 1, levels)
    array.reset()
    back = []
    for level in v:
        array.set_input(np.full(sizes[0], level))
        back.append(np.mean([array.read_state(0)[0] for _ in range(reads)], axis=0))
        _tick(progress)
    g_in, o_in, rms_in = _line(v, np.asarray(back, dtype=np.float64))
    array.reset()
    zero = np.asarray([np.concatenate(array.read_state()) for _ in range(reads)], dtype=np.float64)
    out = {"method": CONVERTER_METHOD,
           "input_levels_volts": v.tolist(), "input_gain": g_in.tolist(), "input_offset_volts": o_in.tolist(),
           "input_rms_residual_volts": rms_in.tolist(),
           "zero_offset_volts": np.split(zero.mean(0), np.cumsum(sizes)[:-1])[1:],
           "read_noise_volts": float(zero.std(0).mean())}
    out["zero_offset_volts"] = [a.tolist() for a in out["zero_offset_volts"]]
    if desc.get("nudge_placement", "outside") != "outside":
        out["output_gain"] = None
        out["output_gain_note"] = "nudge inside the activation: output gain not measurable through the nudge"
        return out
    r_ohms = float(desc.get("transimpedance_ohms", 1e4))
    i_max = 0.4 * float(desc.get("compliance_amperes", 1e-4))
    currents = i_max * np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    shifts = []
    try:
        for e in range(n_edges):
            array.set_feedback_gain(e, 0.0)
        array.reset()
        array.set_input(np.full(sizes[0], 0.5 * v[-1]))
        for amps in currents:
            array.set_phase("NUDGE")
            array.set_nudge_current(np.full(sizes[-1], amps))
            array.settle(settle_steps)
            shifts.append(np.mean([array.read_state(len(sizes) - 1)[0] for _ in range(reads)], axis=0))
            _tick(progress)
    finally:
        array.nudge_off()
        array.set_phase("HOLD")
        for e in range(n_edges):
            array.set_feedback_gain(e, 1.0)
        array.reset()
    g_out, _, rms_out = _line(r_ohms * currents, np.asarray(shifts, dtype=np.float64))
    out |= {"output_gain": g_out.tolist(), "output_rms_residual_volts": rms_out.tolist(),
            "transimpedance_ohms_nominal": r_ohms, "nudge_amperes": currents.tolist()}
    return out


# ------------------------------------------------------------------------------------------ everything
@dataclass
class CalibrationOptions:
    """What :func:`calibrate` measures and how hard; ``quick`` halves the pulse runs and the inputs."""

    edges: list[int] | None = None  # edges to pulse (all by default); the others get the pooled medians
    devices: int | None = None  # measure only a top-left block of this many devices per matrix
    quick: bool = False
    pulses: int = 127  # pulses per command (capped by the driver's limits)
    commands: int | None = None  # commands per run (down, up, down): 16, quick 8
    k: float = 16.0  # software weight range in initial bounds 1/sqrt(fan_in); 16: see InstrumentConfig.weight_range
    margin: float = 0.8  # fraction of the device half range the software range maps onto
    tolerance: float = 1e-4  # settle tolerance, volts: max |s_{t+1} - s_t|
    gains: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1, 0.05)
    inputs: int | None = None  # random inputs per settle measurement: 8, quick 3
    max_steps: int = 200
    budget: int | None = None  # settle-step budget for the gain recommendation: 10 per hidden layer
    seed: int = 0
    restore: bool = True  # put scales and weights back after pulsing

    def resolved(self) -> "CalibrationOptions":
        c = CalibrationOptions(**self.__dict__)
        c.commands = c.commands or (8 if c.quick else 16)
        c.inputs = c.inputs or (3 if c.quick else 8)
        return c


@dataclass
class CalibrationResult:
    """The calibration file's content plus the raw data behind it (for plots)."""

    calibration: Calibration
    responses: dict[tuple[int, bool], tuple[PulseResponse, SoftBoundsFit]]
    sweep: dict[float, dict[str, Any]]


def matrices(topo: dict) -> list[tuple[int, bool, tuple[int, int]]]:
    """(edge, feedback, shape) of every matrix: forward ``(n_dst, n_src)``, untied feedback ``(n_src, n_dst)``."""
    out = []
    for e, (i, j) in enumerate(topo["edges"]):
        out.append((e, False, (topo["sizes"][j], topo["sizes"][i])))
        if topo["feedback"] == "untied" and i >= 1:
            out.append((e, True, (topo["sizes"][i], topo["sizes"][j])))
    return out


def progress_total(array: NeuronArray, opts: CalibrationOptions) -> int:
    """Progress units :func:`calibrate` will report (commands, settle runs, converter levels)."""
    o = opts.resolved()
    picked = [m for m in matrices(array.topology()) if o.edges is None or m[0] in o.edges]
    return len(picked) * 3 * o.commands + len(o.gains) * o.inputs + 7 + 5


def _scales(array: NeuronArray) -> list[float]:
    scales = array.snapshot().get("scales")
    return [float(s) for s in scales] if isinstance(scales, list) else []


def _set_scale(array: NeuronArray, edge: int, scale: float, feedback: bool) -> None:
    if feedback:
        array.set_weight_scale(edge, scale, feedback=True)
    else:
        array.set_weight_scale(edge, scale)


def calibrate_matrix(
    array: NeuronArray, edge: int, feedback: bool, opts: CalibrationOptions, progress: Progress | None = None,
    scale: float = 1.0,
) -> tuple[PulseResponse, SoftBoundsFit, float]:
    """Pulse-response run and fit of one matrix at weight scale 1; then scale ``scale`` and the original
    weights are put back (write-verify). Returns the residual of that reprogramming (NaN if not restored)."""
    o = opts.resolved()
    original = np.asarray(array.read_weights(edge, feedback=feedback), dtype=np.float64)
    _set_scale(array, edge, 1.0, feedback)
    try:
        resp = measure_pulse_response(array, edge, feedback=feedback, pulses=o.pulses, commands=o.commands,
                                      mask=block_mask(original.shape, o.devices), progress=progress)
    finally:
        _set_scale(array, edge, scale, feedback)
    residual = float("nan")
    if o.restore:
        residual = array.program_weights(edge, original, feedback=feedback, tolerance=0.01)
    return resp, fit_soft_bounds(resp), residual


def calibrate(array: NeuronArray, opts: CalibrationOptions | None = None,
              progress: Progress | None = None) -> CalibrationResult:
    """Measure pulse response, weight mapping, converters, settling and the feedback-gain sweep."""
    o = (opts or CalibrationOptions()).resolved()
    topo, desc = array.topology(), describe(array)
    limit = getattr(getattr(array, "limits", None), "max_pulses_per_device", 127)
    o.pulses = max(1, min(o.pulses, int(limit)))
    scales = _scales(array)
    responses, report = {}, {"units": "device units: read_weights with the matrix's weight scale set to 1",
                             "options": {k: v for k, v in o.__dict__.items()}, "matrices": {}}
    for e, fb, shape in matrices(topo):
        if o.edges is None or e in o.edges:
            s0 = 1.0 if fb or e >= len(scales) else scales[e]
            resp, fit, res = calibrate_matrix(array, e, fb, o, progress, scale=s0)
            responses[(e, fb)] = (resp, fit)
            report["matrices"][f"{e}{'b' if fb else 'f'}"] = {**fit.medians, "restore_residual": res}
    if not responses:
        raise CalibrationError(f"no matrix measured: edges {o.edges} not among {list(range(len(topo['edges'])))}")
    fits = [f for _, f in responses.values()]
    pooled = {k: float(np.median([f.medians[k] for f in fits])) for k in ("dw_up", "dw_down", "w_max", "w_min")}
    pooled_half = float(np.median([half_range(f) for f in fits]))
    edges = []
    for e, fb, shape in matrices(topo):
        tag = f"{e}{'b' if fb else 'f'}"
        if (e, fb) in responses:
            fit = responses[(e, fb)][1]
            med, half, per, r2 = fit.medians, half_range(fit), per_device_arrays(fit), fit.medians["r2"]
            note = "per-device arrays stored" if per else f"only {int(fit.mask.sum())} devices measured: medians only"
        else:
            med, half, per, r2 = pooled, pooled_half, {}, float("nan")
            note = "not measured: pooled medians of the measured matrices"
        mapping = weight_mapping(half, med["dw_up"], med["dw_down"], shape[1], k=o.k, margin=o.margin)
        report["matrices"].setdefault(tag, {}).update(mapping=mapping, note=note)
        edges.append(EdgeCalibration(edge=e, feedback=fb, scale=mapping["scale"], dw_up=med["dw_up"],
                                     dw_down=med["dw_down"], w_max=med["w_max"], w_min=med["w_min"], fit_r2=r2,
                                     per_device=per))
    converters = measure_converters(array, progress=progress)
    tol = max(o.tolerance, 4 * converters["read_noise_volts"])
    rng = np.random.default_rng(o.seed)
    lo, hi = desc.get("dac", {}).get("range_volts", [-1.0, 1.0])
    inputs = 0.9 * rng.uniform(lo, hi, size=(o.inputs, topo["sizes"][0]))
    sweep = gain_sweep(array, list(o.gains), inputs, tol=tol, max_steps=o.max_steps, progress=progress)
    n_hidden = len(topo["sizes"]) - 2
    budget = o.budget or 10 * max(n_hidden, 1)
    gain, why = recommend_gain(sweep, n_hidden, budget)
    at_one = sweep.get(1.0) or measure_settling(array, inputs, tol=tol, max_steps=o.max_steps)
    report |= {"settle": {"tolerance_requested": o.tolerance, "tolerance_used": tol, "gain": 1.0, **at_one},
               "gain_sweep": {str(g): r for g, r in sweep.items()}, "gain_recommendation": why, "budget": budget,
               "describe": desc, "source": "hil calibrate"}
    cal = Calibration(instrument=dict(array.identity()), topology={**topo, "edges": [list(p) for p in topo["edges"]]},
                      edges=edges, settle_steps=int(math.ceil(at_one["p90"])), settle_tolerance=tol,
                      recommended_gain=gain, converters=converters, report=report)
    return CalibrationResult(cal, responses, sweep)
