"""On-device learning on an FPGA array: one serial round trip per training sample.

What a lab user learns: an instrument that implements ``SampleRunner`` runs the whole C-EP sample itself
(reset, free phase, nudged phase towards the target, its own local weight updates at every nudged step), so the
host only streams inputs and targets: ``train_sample`` and ``infer`` are one frame out and one frame back each.
The script teaches a small array (sim://fpga over a pty, the real serial driver) four noisy input patterns and
prints the accuracy before and after, plus the bytes and round trips each sample cost on the link.

    python examples/04_fpga_local_learning.py
"""

import numpy as np

from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.interface import SampleRunner

URL = "sim://fpga?transport=pty&sizes=16,32,4&device=soft_bounds&seed=2"
T1, T2, BETA = 30, 10, 0.5  # free steps, nudged steps, nudge strength
rng = np.random.default_rng(0)
prototypes = rng.uniform(0.0, 0.9, size=(4, 16))  # one input pattern per class, volts
targets = np.eye(4)  # (4 classes, 4 output neurons)


def accuracy(array: SampleRunner, n: int = 40) -> float:
    labels = rng.integers(0, 4, n)
    x = np.clip(prototypes[labels] + rng.normal(0, 0.05, (n, 16)), -1, 1)
    outputs = np.stack([array.infer(v, T1) for v in x])  # (n, 4) volts, free phase only
    return float((outputs.argmax(1) == labels).mean())


with open_array(URL) as array:
    assert isinstance(array, SampleRunner), "this instrument cannot run a sample by itself"
    array.set_local_learning(True, eta=[0.05, 0.05], beta=BETA)  # learning rate per edge
    print(f"accuracy before training: {accuracy(array):.2f}")
    before = dict(array.stats)
    n_samples = 200
    for k in range(n_samples):
        c = k % 4
        x = np.clip(prototypes[c] + rng.normal(0, 0.05, 16), -1, 1)
        array.train_sample(x, targets[c], BETA, T1, T2)  # returns the free-phase output, volts
    used = {key: array.stats[key] - before[key] for key in ("round_trips", "bytes_sent", "bytes_received")}
    print(f"accuracy after {n_samples} samples: {accuracy(array):.2f}")
    print(f"per training sample: {used['round_trips'] / n_samples:.1f} round trips, "
          f"{used['bytes_sent'] / n_samples:.0f} bytes sent, {used['bytes_received'] / n_samples:.0f} bytes received")
    counters = array.counters()  # the device's own count of what it did
    print(f"device: {counters['physics_local_updates']} local update steps, {counters['physics_steps']} dynamics steps, "
          f"{counters['link_frames']} frames received, {counters['link_crc_errors']} CRC errors")
