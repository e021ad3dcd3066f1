"""One C-EP nudged step on the analog board: separate commands against the compound ``STEP?`` (protocol 2).

    python benchmarks/analog_step.py [--sizes 64,256,10] [--repetitions 100] [--density 0.01]

Both through the real transport (pyvisa-py over loopback TCP, integrity mode on, tagged messages) against one
emulated board (ideal devices). Per nudged step, as the in-situ learner's matrix mode issues it:

- separate: ``settle(1)``, ``read_state()``, then ``apply_pulses`` per edge (a dense int8 matrix and
  ``PULS:LAST?`` each);
- compound: one ``step(updates, 1)`` with the same counts sent sparse (index, count pairs).

The two are interleaved (A, B, A, B, ...) so a busy machine slows both alike; prints the median and 90th
percentile in milliseconds, round trips and bytes on the wire per step. Timings are wall clock: on a shared
machine read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.mock_instruments.analog_server import AnalogServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,10")
    parser.add_argument("--repetitions", type=int, default=100)
    parser.add_argument("--density", type=float, default=0.01, help="fraction of devices with a pulse per step")
    args = parser.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    physics = ArrayPhysics(ArrayConfig(sizes=sizes, device=DeviceConfig(model="ideal")))
    with AnalogServer(physics) as server, AnalogBoard(server.resource, timeout_s=5.0) as board:
        board.set_phase("NUDGE")
        shapes = [(sizes[d], sizes[s]) for s, d in board.topology()["edges"]]

        def counts() -> list[np.ndarray]:
            out = []
            for shape in shapes:
                c = np.zeros(shape, np.int8)
                mask = rng.random(shape) < args.density
                c[mask] = rng.choice(np.array([-1, 1], np.int8), int(mask.sum()))
                out.append(c)
            return out

        def separate(cs: list[np.ndarray]) -> None:
            board.settle(1)
            board.read_state()
            for edge, c in enumerate(cs):
                board.apply_pulses(edge, c)

        def compound(cs: list[np.ndarray]) -> None:
            board.step([{"edge": e, "counts": c} for e, c in enumerate(cs)], 1)

        results: dict[str, dict[str, list[float]]] = {}
        for _ in range(3):  # warm-up
            separate(counts())
            compound(counts())
        for _ in range(args.repetitions):
            for name, run in (("separate", separate), ("compound", compound)):
                cs = counts()
                before = dict(board.stats)
                started = time.perf_counter()
                run(cs)
                elapsed = time.perf_counter() - started
                r = results.setdefault(name, {"ms": [], "trips": [], "bytes": []})
                r["ms"].append(1e3 * elapsed)
                r["trips"].append(board.stats["round_trips"] - before["round_trips"])
                r["bytes"].append(board.stats["bytes_sent"] - before["bytes_sent"]
                                  + board.stats["bytes_received"] - before["bytes_received"])
    print(f"one nudged step, {args.sizes}, {args.density:.1%} of devices pulsed, {args.repetitions} interleaved reps")
    for name, r in results.items():
        ms = np.array(r["ms"])
        print(f"  {name:9s} median {np.median(ms):6.2f} ms  p90 {np.percentile(ms, 90):6.2f} ms  "
              f"round trips {np.median(r['trips']):.0f}  bytes {np.median(r['bytes']):.0f}")
    ratio = np.median(results["separate"]["ms"]) / np.median(results["compound"]["ms"])
    print(f"  compound is {ratio:.1f}x faster per step")


if __name__ == "__main__":
    main()
