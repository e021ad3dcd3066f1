"""Measure how the synapses of an FPGA array respond to pulses, and fit the soft-bounds device model.

What a lab user learns: the calibration steps of ``eqprop_hil.insitu.calibrate`` are plain functions on any NeuronArray.
Here a 4x4 block of devices of edge 0 is driven down, up and down again with bursts of pulses (sim://fpga over
a pty, i.e. the real serial driver), then ``fit_soft_bounds`` estimates per device the step of one pulse up and
down and the two bounds. The fit is compared with the parameters the instrument declares, and a PNG of the
traces is written.

    python examples/02_pulse_response.py [OUT_DIR]      (default runs/examples)
"""

import sys
from pathlib import Path

import numpy as np

from eqprop_hil.drivers import open_array
from eqprop_hil.insitu.calibrate import block_mask, fit_soft_bounds, measure_pulse_response
from eqprop_hil.runs.plots import new_figure, save_figure

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples")
URL = "sim://fpga?transport=pty&sizes=16,32,4&device=soft_bounds&dw_min=0.002&seed=3"

with open_array(URL) as array:
    declared = array.describe()["device"]
    original = array.read_weights(0)  # (32, 16): (n_dst, n_src)
    scale = array.weight_scale(0)
    array.set_weight_scale(0, 1.0)  # read_weights now returns device units
    mask = block_mask(original.shape, 16)  # a 4x4 block; the other devices get no pulses
    resp = measure_pulse_response(array, edge=0, pulses=100, commands=12, mask=mask)
    fit = fit_soft_bounds(resp)
    array.set_weight_scale(0, scale)  # put the mapping and the weights back
    residual = array.program_weights(0, original)
    print(f"{array.stats['round_trips']} round trips, {array.stats['pulses_sent']} pulses sent")

m = fit.medians
print(f"devices fitted {m['devices']} (stuck {m['stuck']}), median R^2 {m['r2']:.3f}")
print(f"step up   {m['dw_up']:.5f}  step down {m['dw_down']:.5f}  (declared dw_min {declared['dw_min']})")
print(f"w_max     {m['w_max']:+.3f}  w_min     {m['w_min']:+.3f}  "
      f"(declared {declared['w_max']:+.3f} / {declared['w_min']:+.3f})")
print(f"asymmetry {m['asymmetry_mean']:+.3f}, cycle-to-cycle noise {m['c2c']:.2f}; weights restored to {residual:.4f}")

fig, (ax_trace, ax_steps) = new_figure(2)
rows, cols = np.nonzero(resp.mask)
ax_trace.plot(resp.weights[:, rows, cols])
ax_trace.set(xlabel="command (100 pulses each)", ylabel="device weight", title="pulse response, 16 devices")
ax_steps.scatter(fit.dw_up[resp.mask], fit.dw_down[resp.mask])
ax_steps.set(xlabel="step up per pulse", ylabel="step down per pulse", title="per-device steps")
print("plot:", save_figure(fig, out_dir / "pulse_response.png"))
