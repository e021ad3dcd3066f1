"""Build an emulator with the device physics and link faults you want to test against, and watch the driver cope.

What a lab user learns: ``start_emulator`` takes the same ``sim://`` URL as ``open_array`` but hands you the
running emulator, so several drivers (or your own code) can connect to ``emulator.resource``. Query keys set the
device model (here a power-step device with asymmetric exponents and 20 % stuck devices) and the link faults
(corrupted replies, busy refusals), which the driver absorbs by retransmission. Bad values raise typed errors,
from the host's limits (nothing is sent) or from the instrument (it refuses), and leave the device unchanged.

    python examples/06_custom_emulator.py
"""

import numpy as np

from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.errors import InstrumentError, LimitError
from eqprop_hil.mock_instruments.launch import start_emulator

URL = ("sim://fpga?transport=pty&sizes=8,6,3&device=power&gamma_up=3&gamma_down=0.5&dw_min=0.01"
       "&stuck_fraction=0.2&fault_corrupt=0.1&fault_busy=0.1&seed=4")

with start_emulator(URL) as emulator, open_array(emulator.resource) as array:
    print(f"emulator {emulator.kind} on {emulator.resource}: {array.describe()['device']['model']} devices")
    array.set_weight_scale(0, 1.0)  # read weights in device units
    trace = [array.read_weights(0)]  # (6, 8)
    for _ in range(8):
        array.apply_pulses(0, np.full(trace[0].shape, 40, dtype=np.int8))  # 40 potentiating pulses per device
        trace.append(array.read_weights(0))
    steps = np.abs(np.diff(np.stack(trace), axis=0))  # (8 commands, 6, 8)
    stuck = steps.sum(0) == 0
    print(f"stuck devices: {stuck.mean():.0%} (configured 20 %)")
    print("mean step per command as the weights rise:", np.round(steps[:, ~stuck].mean(1), 4))
    s = array.stats
    print(f"link faults absorbed: {s['retransmissions']} retransmissions, {s['corrupt_frames']} corrupt frames, "
          f"{s['busy']} busy replies, in {s['round_trips']} round trips")

    before_w, before_c = array.read_weights(0), array.counters()
    try:
        array.set_input(np.full(8, 5.0))  # the host's Limits refuse it: nothing leaves the host
    except LimitError as e:
        print(f"LimitError: {e}")
    try:
        array.set_weight_scale(0, -1.0)  # the instrument refuses it and says why
    except InstrumentError as e:
        print(f"{type(e).__name__} (an InstrumentError): code {e.code}, message {e.message!r}, command {e.command!r}")
    after_c = array.counters()
    same = np.array_equal(before_w, array.read_weights(0)) and array.weight_scale(0) == 1.0
    moved = {k: after_c[k] - before_c[k] for k in after_c if k.startswith("physics_") and after_c[k] != before_c[k]}
    print(f"weights and scale unchanged: {same}; physics counters changed: {moved or 'none'}")
