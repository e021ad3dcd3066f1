"""Bytes and round trips of ONE nudged step on the FPGA array: separate commands versus the STEP opcode.

    python benchmarks/fpga_step.py [--sizes 64,256,10] [--seed 0]

Through the real driver over a pty against the emulator (ideal devices). For pulse-count densities from 1 % to
100 % (share of devices with a non-zero count in -3..3) it sends the same updates twice: as apply_pulses per
edge + settle(1) + read_state() (4 round trips; apply_pulses already picks APPLY_SPARSE when that is smaller),
and as one STEP (protocols/fpga_serial.md 5.2). Bytes are sent + received on the wire (COBS and delimiters
included) and exact; nothing here is timed.
"""

from __future__ import annotations

import argparse

import numpy as np

from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.mock_instruments.fpga_server import FpgaServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,256,10", help="layer sizes, input first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    physics = ArrayPhysics(ArrayConfig(sizes=sizes, device=DeviceConfig(model="ideal"), seed=args.seed))
    with FpgaServer(physics) as server, FpgaArray(server.resource) as array:
        array.set_phase("NUDGE")
        print(f"one nudged step on {'-'.join(map(str, sizes))}: bytes (sent + received) and round trips")
        for density in (0.01, 0.05, 0.2, 1.0):
            counts = [((rng.random((sizes[e + 1], sizes[e])) < density) * rng.integers(-3, 4, (sizes[e + 1], sizes[e])))
                      .astype(np.int8) for e in range(len(sizes) - 1)]  # fmt: skip
            before = dict(array.stats)
            for e, c in enumerate(counts):
                array.apply_pulses(e, c)
            array.settle(1)
            array.read_state()
            middle = dict(array.stats)
            array.step([{"edge": e, "counts": c} for e, c in enumerate(counts)], steps=1)
            after = dict(array.stats)

            def cost(a: dict, b: dict) -> tuple[int, int]:
                return (b["bytes_sent"] - a["bytes_sent"] + b["bytes_received"] - a["bytes_received"],
                        b["round_trips"] - a["round_trips"])  # fmt: skip

            (sep_b, sep_t), (step_b, step_t) = cost(before, middle), cost(middle, after)
            print(f"  density {density:4.0%}: separate {sep_b:7d} B in {sep_t} round trips; STEP {step_b:7d} B in {step_t}")


if __name__ == "__main__":
    main()
