"""First contact with a neuron array: open it, ask who it is, run one free phase and read the neurons.

What a lab user learns: ``open_array`` takes the string you would name the instrument by (a VISA resource, a
serial port, or ``sim://...`` for an emulator that runs on loopback behind the real transport and driver);
every call is in physical units (volts in, volts out); the ``with`` block leaves the board safe (HOLD, nudge
off, inputs at 0) and stops the emulator when it ends. Replace URL by your board's resource string, e.g.
``TCPIP0::192.168.1.20::5025::SOCKET``, and the rest runs unchanged.

    python examples/01_first_contact.py
"""

import numpy as np

from eqprop_hil.drivers import open_array

URL = "sim://analog?sizes=16,32,4&device=soft_bounds&adc_bits=12&read_noise=0.001&seed=1"

with open_array(URL) as array:
    print("identity:", array.identity())  # {"vendor", "model", "serial", "firmware"}
    topo = array.topology()
    print(f"topology: sizes {topo['sizes']}, edges {topo['edges']}, {topo['feedback']} feedback, {topo['activation']}")
    snap = array.snapshot()  # every setting, for your lab notebook or run records
    dev = snap["describe"]["device"]
    print(f"snapshot: phase {snap['phase']}, gains {snap['gains']}, scales {[round(s, 3) for s in snap['scales']]}")
    print(f"          device {dev['model']} dw_min {dev['dw_min']} bounds [{dev['w_min']}, {dev['w_max']}], "
          f"compliance {snap['compliance_amperes']} A")

    array.reset()  # states 0, phase HOLD, nudge off; weights are kept
    x = np.linspace(-0.8, 0.8, topo["sizes"][0])  # (16,) volts, within the +-1 V input limit
    array.set_input(x)
    array.set_phase("FREE")
    array.settle(30)  # 30 steps of the dynamics, returns when done
    states = array.read_state()  # one array per layer, input first, volts
    array.set_phase("HOLD")
    for k, s in enumerate(states):
        print(f"layer {k} ({s.size:2d} neurons): mean {s.mean():+.3f} V, min {s.min():+.3f} V, max {s.max():+.3f} V")
    print("output layer (V):", np.round(array.read_state(layer=2)[0], 4))
    w = array.read_weights(0)  # effective weights of edge 0, shape (n_dst, n_src) = (32, 16)
    print(f"edge 0 weights: shape {w.shape}, |W| max {np.abs(w).max():.3f}")
    print(f"link: {array.stats['round_trips']} round trips, {array.stats['bytes_sent']} bytes sent, "
          f"{array.stats['bytes_received']} bytes received")
print("closed: the board was left in HOLD with the inputs at 0 V, and the emulator stopped")
