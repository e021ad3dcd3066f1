"""`hil calibrate`: measure an instrument before training and write the calibration file `hil train` reads.

Writes ``FILE.json`` (+ ``FILE.npz`` with the per-device arrays; the directory must exist) and, in the
directory ``FILE_plots/`` next to it (created), three PNGs: ``pulse_response.png`` (measured weights of a few
devices with the fitted soft-bounds model), ``step_hist.png`` (step sizes and bounds over devices, as fractions
of the devices) and ``settle_gain.png`` (settle steps and contraction versus the feedback gain). The measurements themselves live in :mod:`eqprop_hil.insitu.calibrate`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from eqprop_hil.cli import output_file
from eqprop_hil.insitu.calibrate import CalibrationOptions, CalibrationResult, PulseResponse, SoftBoundsFit


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values or any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"gains must be in [0, 1], got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated edge indices, got {text!r}") from e


def _positive(kind: type) -> object:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from e
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    d = CalibrationOptions()
    parser.add_argument("--instrument", default="sim://analog", metavar="RESOURCE",
                        help="VISA resource, serial port or sim:// URL (default %(default)s)")
    parser.add_argument("--out", required=True, type=output_file, metavar="FILE.json",
                        help="calibration file to write (its directory must exist); plots go to FILE_plots/")
    parser.add_argument("--edges", type=_ints, help="edges to pulse, e.g. 0,1 (default all; others get pooled medians)")
    parser.add_argument("--devices", type=_positive(int), metavar="N",
                        help="measure only a block of N devices per matrix (per-device arrays are then omitted)")
    parser.add_argument("--quick", action="store_true", help="half the pulse runs and 3 settle inputs")
    parser.add_argument("--k", type=_positive(float), default=d.k,
                        help="software weight range in initial bounds 1/sqrt(fan_in) (default %(default)s)")
    parser.add_argument("--margin", type=_positive(float), default=d.margin,
                        help="fraction of the device range that range maps onto (default %(default)s)")
    parser.add_argument("--tolerance", type=_positive(float), default=d.tolerance,
                        help="settle tolerance, volts (default %(default)s)")
    parser.add_argument("--gains", type=_floats, default=d.gains,
                        help="feedback gains to sweep (default 1,0.5,0.25,0.1,0.05)")
    parser.add_argument("--inputs", type=_positive(int),
                        help="random inputs per settle measurement (default 8, quick 3)")
    parser.add_argument("--max-steps", type=_positive(int), default=d.max_steps, help="settle steps before giving up")
    parser.add_argument("--budget", type=_positive(int),
                        help="settle-step budget of the gain recommendation (default 10 per hidden layer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random settle inputs")
    parser.add_argument("--no-restore", action="store_true",
                        help="leave the pulsed weights instead of reprogramming them")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from eqprop_hil.cli import progress_wanted
    from eqprop_hil.drivers import open_array
    from eqprop_hil.insitu.calibrate import calibrate, progress_total

    opts = CalibrationOptions(edges=args.edges, devices=args.devices, quick=args.quick, k=args.k, margin=args.margin,
                              tolerance=args.tolerance, gains=tuple(args.gains), inputs=args.inputs,
                              max_steps=args.max_steps, budget=args.budget, seed=args.seed, restore=not args.no_restore)
    with open_array(args.instrument) as array:
        with tqdm(total=progress_total(array, opts), desc="calibrate", unit="op",
                  disable=not progress_wanted(quiet=args.quiet)) as bar:
            result = calibrate(array, opts, progress=bar)
    result.calibration.report["resource"] = args.instrument
    path = result.calibration.save(args.out)
    print(report_table(result))
    sidecar = any(c.per_device for c in result.calibration.edges)
    print(f"wrote {path}" + (f" and {path.with_suffix('.npz').name}" if sidecar else ""))
    if not args.no_plots:
        for png in write_plots(result, path):
            print(f"wrote {png}")
    return 0


def report_table(result: CalibrationResult) -> str:
    """The printed summary: one row per matrix, then settling, the gain sweep and the converters."""
    cal = result.calibration
    measured = {f"{e}{'b' if f else 'f'}" for e, f in result.responses}
    rows = [f"{'matrix':>7} {'devices':>7} {'dw_up':>9} {'dw_down':>9} {'w_max':>7} {'w_min':>7} {'asym':>7} "
            f"{'R2':>6} {'scale':>7} {'quantum':>9}  (device units; quantum = scale * median dw_up)"]
    for c in cal.edges:
        tag = f"{c.edge}{'b' if c.feedback else 'f'}"
        m = cal.report["matrices"].get(tag, {})
        rows.append(f"{tag:>7} {m.get('devices', 0):>7} {c.dw_up:>9.3g} {c.dw_down:>9.3g} {c.w_max:>7.3f} "
                    f"{c.w_min:>7.3f} {m.get('asymmetry_median', math.nan):>7.3f} {c.fit_r2:>6.3f} {c.scale:>7.3f} "
                    f"{c.scale * c.dw_up:>9.3g}" + ("" if tag in measured else "  (pooled, not measured)"))
    s = cal.report["settle"]
    rows.append(f"settle (gain 1, tol {s['tolerance_used']:g} V): median {s['median']:g} steps, 90th pct {s['p90']:g}, "
                f"max {s['max']}, unsettled {s['unsettled']}")
    rows.append(f"{'gain':>7} {'median':>7} {'p90':>7} {'rho':>7}")
    for g, r in result.sweep.items():
        rows.append(f"{g:>7g} {r['median']:>7g} {r['p90']:>7g} {r['spectral_radius']:>7.3f}")
    rows.append(f"recommended feedback gain {cal.recommended_gain:g}: {cal.report['gain_recommendation']}")
    conv = cal.converters
    rows.append(f"input chain gain {np.mean(conv['input_gain']):.4f} (min {np.min(conv['input_gain']):.4f}, "
                f"max {np.max(conv['input_gain']):.4f}); read noise {conv['read_noise_volts']:.3g} V"
                + (f"; output gain {np.mean(conv['output_gain']):.4f}" if conv.get("output_gain") else ""))
    return "\n".join(rows)


def write_plots(result: CalibrationResult, json_path: Path) -> list[Path]:
    """The three figures in ``<stem>_plots/`` next to the JSON file (created); returns their paths."""
    from eqprop_hil.runs.plots import new_figure, save_figure

    out_dir = json_path.with_name(json_path.stem + "_plots")
    out_dir.mkdir(exist_ok=True)
    ident = result.calibration.instrument or {}
    where = " ".join(str(ident[k]) for k in ("model", "serial") if k in ident) or "instrument"
    resource = result.calibration.report.get("resource", "")
    sizes = "-".join(map(str, (result.calibration.topology or {}).get("sizes", [])))
    what = f"{where} {sizes} ({resource})" if resource else f"{where} {sizes}"
    paths = []
    items = list(result.responses.items())
    fig, axes = new_figure(ncols=len(items))
    for ax, ((e, fb), (resp, fit)) in zip(np.atleast_1d(axes), items):
        _plot_response(ax, resp, fit)
        ax.set_title(f"edge {e}{' feedback' if fb else ''}: pulse response")
    fig.suptitle(f"Pulse response and soft-bounds fit: {what}", fontsize=9)
    paths.append(save_figure(fig, out_dir / "pulse_response.png"))
    fig, axes = new_figure(ncols=2)

    def hist(ax: object, values: np.ndarray, label: str) -> None:
        """Each series as fractions of its own devices, so a small edge is as visible as a large one."""
        if values.size:
            ax.hist(values, bins=30, alpha=0.5, weights=np.full(values.size, 1.0 / values.size),
                    label=f"{label} ({values.size} devices)")

    for (e, fb), (_, fit) in items:
        good = fit.mask & ~fit.stuck
        label = f"edge {e}{'b' if fb else ''}"
        hist(axes[0], fit.dw_up[good], f"{label} up")
        hist(axes[0], fit.dw_down[good], f"{label} down")
        hist(axes[1], fit.w_max[good & np.isfinite(fit.w_max)], f"{label} w_max")
        hist(axes[1], fit.w_min[good & np.isfinite(fit.w_min)], f"{label} w_min")
    axes[0].set_xlabel("step per pulse (device units)")
    axes[0].set_title("step sizes over devices")
    axes[1].set_xlabel("bound (device units)")
    axes[1].set_title("soft bounds over devices")
    for ax in axes:
        ax.set_ylabel("fraction of the edge's devices")
        ax.legend(fontsize=7)
    fig.suptitle(f"Device variation: {what}", fontsize=9)
    paths.append(save_figure(fig, out_dir / "step_hist.png"))
    fig, axes = new_figure(ncols=2)
    gains = sorted(result.sweep)
    axes[0].plot(gains, [result.sweep[g]["median"] for g in gains], "o-", label="median")
    axes[0].plot(gains, [result.sweep[g]["p90"] for g in gains], "s--", label="90th percentile")
    axes[0].set_ylabel("settle steps")
    axes[1].plot(gains, [result.sweep[g]["spectral_radius"] for g in gains], "o-")
    axes[1].set_ylabel("spectral radius estimate")
    rec = result.calibration.recommended_gain
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("feedback gain")
        if rec is not None:
            ax.axvline(rec, color="grey", ls=":", label=f"recommended {rec:g}")
    axes[0].legend(fontsize=7)
    axes[0].set_title("settle steps vs feedback gain")
    axes[1].set_title("contraction vs feedback gain")
    fig.suptitle(f"Settling: {what}", fontsize=9)
    paths.append(save_figure(fig, out_dir / "settle_gain.png"))
    return paths


def _plot_response(ax: object, resp: PulseResponse, fit: SoftBoundsFit, n_show: int = 5) -> None:
    """Measured weights of a few devices against cumulative pulses, and the fitted model run from the same start."""
    idx = np.flatnonzero(fit.mask & ~fit.stuck)[:n_show]
    pulses = np.concatenate([[0], np.arange(1, len(resp.signs) + 1) * resp.pulses])
    measured = resp.weights.reshape(len(pulses), -1)[:, idx]  # (commands + 1, n_show)
    up, down = fit.dw_up.ravel()[idx], fit.dw_down.ravel()[idx]
    w_max, w_min = fit.w_max.ravel()[idx], fit.w_min.ravel()[idx]
    model = [measured[0]]
    for sign in resp.signs:  # iterate the noise-free model pulse by pulse (vectorised over the shown devices)
        w = model[-1].copy()
        for _ in range(resp.pulses):
            w = w + (up * (1 - w / w_max) if sign > 0 else -down * (1 - w / w_min))
        model.append(w)
    model_arr = np.asarray(model)
    for k in range(len(idx)):
        line = ax.plot(pulses, measured[:, k], "o", ms=3)[0]
        ax.plot(pulses, model_arr[:, k], "-", color=line.get_color(), lw=1)
    ax.set_xlabel("pulses (down, up, down runs)")
    ax.set_ylabel("weight (device units)")
