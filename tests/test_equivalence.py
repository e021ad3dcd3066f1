"""The emulator's physics against hil's software engine, written independently (docs/dynamics.md): with ideal
devices and converters the settled states read over the real transports equal the software engine's, for a
network with a skip edge and feedback gains below 1, tied and untied, in the free and in the nudged phase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqprop_hil.drivers import open_array
from eqprop_hil.engine.model import Network, NetworkConfig

RESOURCES = {
    "analog-tcp": "sim://analog?sizes=6,9,7,4&skips=0-2,1-3&activation={act}&feedback={fb}&device=ideal&seed=2",
    "fpga-pty": "sim://fpga?sizes=6,9,7,4&skips=0-2,1-3&activation={act}&feedback={fb}&device=ideal&seed=2&transport=pty",
}
GAINS = [1.0, 0.5, 0.25, 0.8, 0.1]  # per edge: chain (0,1), (1,2), (2,3), then skips (0,2), (1,3)


def program_network(array, net: Network) -> None:
    for e in range(len(net.edges)):
        array.set_feedback_gain(e, net.gamma[e])
        array.set_weight_scale(e, 1.0)
        array.program_weights(e, net.W[e].numpy().astype(np.float32), tolerance=1e-6)
        if net.B[e] is not None:
            array.set_weight_scale(e, 1.0, feedback=True)
            array.program_weights(e, net.B[e].numpy().astype(np.float32), feedback=True, tolerance=1e-6)


@pytest.mark.parametrize("where", sorted(RESOURCES))
@pytest.mark.parametrize("act, fb", [("tanh", "tied"), ("sigmoid4", "untied"), ("hard_sigmoid", "tied")])
def test_settled_states_equal_the_software_engine(where, act, fb) -> None:
    cfg = NetworkConfig(sizes=[6, 9, 7, 4], skips=[(0, 2), (1, 3)], activation=act, feedback=fb,
                        psi_deg=50.0 if fb == "untied" else 0.0, gamma=GAINS, bias=False, init_gain=1.5)
    net = Network(cfg, seed=11)
    # the software engine in float32 from the very weights that travel (float32) to the device
    for w in net.W:
        w.copy_(w.float())
    # inputs on the 2**-12 grid, which the FPGA's Q3.12 input format carries exactly
    x = torch.round(torch.rand(1, 6, generator=torch.Generator().manual_seed(4)) * 4096) / 4096
    y = torch.nn.functional.one_hot(torch.tensor([2]), 4).float()
    beta = 0.3
    with open_array(RESOURCES[where].format(act=act, fb=fb)) as array:
        program_network(array, net)
        array.reset()
        array.set_input(x[0].numpy())
        array.set_phase("FREE")
        array.settle(25)
        free = array.read_state()
        s = net.relax(net.zero_state(x), 25)
        # the FPGA reads states in Q3.12 (2**-12 resolution); the analog board in float32
        tol = 2.0**-12 if where.startswith("fpga") else 2e-6
        for k in range(1, 4):
            np.testing.assert_allclose(free[k], s[k][0].numpy(), atol=tol, rtol=0)
        array.set_nudge_target(y[0].numpy(), beta)
        array.set_phase("NUDGE")
        array.settle(5)
        nudged = array.read_state()
        for _ in range(5):
            s = net.step(s, beta * (y - s[-1]))
        for k in range(1, 4):
            np.testing.assert_allclose(nudged[k], s[k][0].numpy(), atol=tol, rtol=0)
        assert np.max(np.abs(nudged[-1] - free[-1])) > 10 * tol  # the nudge really moved the output
