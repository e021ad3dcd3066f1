"""Emulator physics per call, in process: what the board itself costs behind any transport.

    python benchmarks/physics.py [--sizes 64,256,10] [--repeats 7] [--calls 50] [--out FILE.json] [--quick]

For a soft-bounds board (the default device statistics) and an ideal board, both seed 0, sigmoid4, inputs uniform
in [0, 1):

- ``train_sample``: one on-device C-EP sample (reset, clamp, t1 = 30 free steps, read, t2 = 10 nudged steps with
  the local rule), what a local-mode ``TRAIN?`` / TRAIN_SAMPLE runs, at local eta = [1e-4, 5e-5] (small steps:
  ~20 pulses per sample on the soft-bounds board);
- ``train_sample (preset eta)``: the same at the digits-hw preset's eta = [0.01, 0.005] (lr at batch 1; beta 0.2),
  which ``benchmarks/hil.py`` runs in local mode: ~8000 pulses per sample on the soft-bounds board;
- ``infer``: reset, clamp, 30 free steps, read the output;
- ``step free`` / ``step nudged+learn``: one dynamics step (the second with the local rule's update);
- ``read_state``: every layer through the ADC;
- ``apply_pulses``: a dense int8 matrix of the first edge with ~128 non-zero counts (+-1..3), as matrix mode sends;
- ``apply_outer``: a rank-1 stochastic pulse-train update of the first edge, bit length 31, as outer mode sends.

Each figure is the median over ``--repeats`` of the mean of ``--calls`` calls, in milliseconds. Wall clock on a
possibly shared machine: compare figures taken in one run. Uses only methods the board had before this benchmark
existed, so running it with an older checkout's interpreter gives the "before" column.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, median, print_table, write_json
from eqprop_hil.mock_instruments.devices import DeviceConfig
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics

ETA = [1e-4, 5e-5]  # per edge of a 3-layer chain; longer chains repeat the last
ETA_PRESET = [0.01, 0.005]  # digits-hw: lr per edge at batch size 1
BETA, T1, T2 = 0.2, 30, 10


def board(sizes: list[int], model: str, eta: list[float] = ETA) -> ArrayPhysics:
    p = ArrayPhysics(ArrayConfig(sizes=sizes, device=DeviceConfig(model=model), seed=0))
    n_edges = len(p.topology()["edges"])
    p.set_local_learning(False, (eta + [eta[-1]] * n_edges)[:n_edges], None)
    return p


def per_call_ms(fn: Callable[[int], Any], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean wall time of ``calls`` calls ``fn(k)``, in ms (one untimed warm-up)."""
    fn(0)
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(calls):
            fn(k)
        means.append((time.perf_counter() - t0) / calls * 1e3)
    return median(means)


def measure(sizes: list[int], model: str, calls: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    X = rng.random((64, sizes[0]))
    Y = np.eye(sizes[-1])[rng.integers(0, sizes[-1], 64)]
    p = board(sizes, model)
    out: dict[str, float] = {}
    out["train_sample"] = per_call_ms(lambda k: p.train_sample(X[k % 64], Y[k % 64], BETA, T1, T2), calls, repeats)
    q = board(sizes, model, ETA_PRESET)
    out["train_sample (preset eta)"] = per_call_ms(lambda k: q.train_sample(X[k % 64], Y[k % 64], BETA, T1, T2),
                                                   calls, repeats)
    out["infer"] = per_call_ms(lambda k: p.infer(X[k % 64], T1), calls, repeats)

    p.reset()
    p.set_input(X[0])
    p.set_phase("FREE")
    out["step free"] = per_call_ms(lambda k: p.step(1), calls, repeats)
    learning = p.local_learning
    p.set_local_learning(True, None, BETA)
    p.set_nudge_target(Y[0], BETA)
    p.set_phase("NUDGE")
    out["step nudged+learn"] = per_call_ms(lambda k: p.step(1), calls, repeats)
    p.set_local_learning(False, learning[1], None)
    p.set_phase("HOLD")
    out["read_state"] = per_call_ms(lambda k: p.read_state(), calls, repeats)

    shape = (sizes[1], sizes[0])
    patterns = []
    for _ in range(16):
        c = np.zeros(shape, np.int8)
        where = rng.choice(c.size, 128, replace=False)
        c.ravel()[where] = rng.integers(1, 4, 128) * rng.choice(np.array([-1, 1]), 128)
        patterns.append(c)
    out["apply_pulses (128 nz)"] = per_call_ms(lambda k: p.apply_pulses(0, patterns[k % 16]), calls, repeats)
    rows = rng.uniform(-0.3, 0.3, (16, sizes[1]))
    cols = rng.uniform(0.0, 0.3, (16, sizes[0]))
    out["apply_outer (bl 31)"] = per_call_ms(lambda k: p.apply_outer(0, rows[k % 16], cols[k % 16], 31), calls, repeats)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,10")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny run (smoke test): 2 repeats of 3 calls")
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    calls, repeats = (3, 2) if args.quick else (args.calls, args.repeats)
    results = {model: measure(sizes, model, calls, repeats) for model in ("soft_bounds", "ideal")}
    names = list(results["soft_bounds"])
    print_table(
        f"Emulator physics per call, {'-'.join(map(str, sizes))}, in process (ms, median of {repeats} x {calls} calls)",
        ["call", "soft_bounds ms", "ideal ms"],
        [[n, results["soft_bounds"][n], results["ideal"][n]] for n in names],
        [f"train_sample: t1 {T1}, t2 {T2}, beta {BETA}, local eta {ETA} (preset eta: {ETA_PRESET}); infer: t1 {T1}",
         "wall clock on a possibly shared machine: compare figures of one run"],
    )
    payload = {"sizes": sizes, "calls": calls, "repeats": repeats, "ms_per_call": results, "environment": environment()}
    if args.out:
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
