"""Link benchmark: command latency, bytes on the wire per C-EP step, and how much of a serial link training uses.

    python benchmarks/link.py [--repetitions 200] [--max-seconds 6] [--quick] [--out FILE]
    python benchmarks/link.py --round-trips-only [--round-trip-calls 300]     # (d) alone, ~1 minute

Everything goes through the real transports and drivers against the emulators (``eqprop_hil.drivers.open_array`` on
``sim://`` URLs): the analog board over TCP with pyvisa-py, the FPGA array over a pty and over ``socket://``.

(a) Round-trip latency per command on a 64-256-10 array: median and 90th percentile over ``--repetitions`` calls
    (milliseconds, wall clock, after 3 warm-up calls), with the bytes and round trips one call costs.
(b) Bytes on the wire for ONE C-EP nudged step of a 784-512-10 network (the C-EP paper's 1-hidden-layer MNIST
    net, t1=40, t2=15) in each update mode, for both instruments, as hil/insitu/learner.py issues them:
    matrix = nudge current, settle(1), read all states, one int8 pulse matrix per edge (every row carrying pulses:
    the FPGA skips all-zero rows, so this is its upper bound; the analog board always sends the whole matrix);
    outer = nudge current, settle(1), read all states, two rank-1 pulse-train commands per edge (bit length 31);
    local = the one-round-trip sample command (LEARn:SAMPle? / TRAIN_SAMPLE) divided by t2.
    Per sample = free phase (reset, input, FREE, settle(t1), read) + t2 nudged steps + leaving (nudge off, HOLD).
(c) Share of an emulated serial link a streaming training loop would use: bytes per sample (sent + received:
    request and response alternate, so the two directions do not overlap) times the samples per second the loop
    achieves without a link limit, over the link's capacity in bytes/s (UART 8N1: 10 bits per byte, so 115200
    baud = 11520 B/s, 921600 baud = 92160 B/s, 12 Mbit/s = 1.2 MB/s). Above 1 (100 %) the link is the
    bottleneck. For the small network (digits-hw, 64-256-10 on the FPGA over a pty) the loop is then run with the
    FpgaServer's link-rate limit and the measured samples/s set beside the prediction
    1 / (1 / unlimited + bytes / capacity) (transfer and compute do not overlap in a request/response loop);
    runs that would take longer than ``--max-seconds`` are not measured (shown as "-").

(d) Fixed cost of one round trip (emulator in its own process): per-call microseconds of a trivial query,
    read_state, step([], 1) and a compound step with 140 sparse pulse counts, on analog/tcp, fpga/pty, fpga/socket.

Timings are wall clock on a possibly shared machine: read them as orders of magnitude; bytes are exact.
Writes benchmarks/out/link.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import (
    OUT_DIR, environment, median, p90, print_table, repeat_times, stats_delta, write_json,
)

SMALL = "sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed=0"
LATENCY_TARGETS = {
    "analog/tcp": f"sim://analog?{SMALL}",
    "fpga/pty": f"sim://fpga?{SMALL}&transport=pty",
    "fpga/tcp": f"sim://fpga?{SMALL}&transport=tcp",
}
BIG_SIZES = [784, 512, 10]
BIG = "sizes=784,512,10&activation=sigmoid4&device=soft_bounds&seed=0"
BIG_TARGETS = {"analog/tcp": f"sim://analog?{BIG}", "fpga/pty": f"sim://fpga?{BIG}&transport=pty"}
BIG_T1, BIG_T2, BIT_LENGTH = 40, 15, 31  # cep-1h preset; the in-situ default bit length
LINKS = {"115200 baud": 11520.0, "921600 baud": 92160.0, "12 Mbit/s": 1.2e6}  # bytes per second (8N1)
MODES = ("matrix", "outer", "local")


def counted(array: Any, fn: Callable[[], Any]) -> dict[str, int]:
    """Run ``fn`` once and return what the driver's stats grew by (bytes_sent, bytes_received, round_trips)."""
    before = dict(array.stats)
    fn()
    return stats_delta(before, array.stats)


# ---------------------------------------------------------------------------------------------- (a) latency
def latency(repetitions: int) -> list[dict]:
    from eqprop_hil.drivers import open_array

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, 64)
    pulses = rng.choice(np.array([-1, 1], np.int8), size=(256, 64))
    rows, cols = rng.uniform(-0.3, 0.3, 256), rng.uniform(-0.3, 0.3, 64)
    target = np.eye(10)[3]
    rows_out = []
    for name, url in LATENCY_TARGETS.items():
        with open_array(url) as a:
            a.reset()
            a.set_input(x)
            a.set_phase("FREE")
            sign = [1]

            def pulse() -> None:  # alternate the sign so the weights stay put
                sign[0] = -sign[0]
                a.apply_pulses(0, (sign[0] * pulses).astype(np.int8))

            commands: list[tuple[str, Callable[[], Any]]] = [
                ("query feedback_gain(0)", lambda: a.feedback_gain(0)),
                ("set_input (64 V)", lambda: a.set_input(x)),
                ("settle(1)", lambda: a.settle(1)),
                ("read_state (330)", lambda: a.read_state()),
                ("apply_pulses 256x64 int8", pulse),
                ("apply_outer 256+64, BL 31", lambda: a.apply_outer(0, rows, cols, BIT_LENGTH)),
                ("read_weights 256x64", lambda: a.read_weights(0)),
                ("train_sample t1=30 t2=10", lambda: a.train_sample(x, target, 0.2, 30, 10)),
            ]
            a.set_local_learning(False)
            for label, fn in commands:
                wire = counted(a, fn)
                times = repeat_times(fn, repetitions)
                rows_out.append({"link": name, "command": label, "median_ms": 1e3 * median(times),
                                 "p90_ms": 1e3 * p90(times), "bytes_sent": wire.get("bytes_sent", 0),
                                 "bytes_received": wire.get("bytes_received", 0),
                                 "round_trips": wire.get("round_trips", 0), "repetitions": repetitions})
    return rows_out


# ---------------------------------------------------------------------------------------------- (b) bytes per step
def step_bytes() -> list[dict]:
    from eqprop_hil.drivers import open_array

    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, BIG_SIZES[0])
    y = np.eye(BIG_SIZES[-1])[7]
    out = []
    for name, url in BIG_TARGETS.items():
        with open_array(url) as a:
            topo = a.topology()
            shapes = [(topo["sizes"][j], topo["sizes"][i]) for i, j in topo["edges"]]
            counts = [rng.choice(np.array([-1, 1], np.int8), size=s) for s in shapes]
            transimpedance = float(a.describe().get("transimpedance_ohms", 1e4))
            nudge = 0.2 * (y - 0.5) / transimpedance  # amperes, as hil/insitu/learner.py computes it

            def free() -> None:
                a.reset()
                a.set_input(x)
                a.set_phase("FREE")
                a.settle(BIG_T1)
                a.read_state()
                a.set_phase("NUDGE")

            def leave() -> None:
                a.nudge_off()
                a.set_phase("HOLD")

            def common() -> None:
                a.set_nudge_current(nudge)
                a.settle(1)
                a.read_state()

            def matrix() -> None:
                common()
                for e, c in enumerate(counts):
                    a.apply_pulses(e, c)

            def outer() -> None:
                common()
                for e, (n_dst, n_src) in enumerate(shapes):
                    for sgn in (1.0, -1.0):
                        a.apply_outer(e, sgn * rng.uniform(0, 0.2, n_dst), rng.uniform(0, 0.2, n_src), BIT_LENGTH)

            overhead = {k: v for k, v in counted(a, free).items()}
            for k, v in counted(a, leave).items():
                overhead[k] = overhead.get(k, 0) + v
            for mode in MODES:
                if mode == "matrix":
                    step = counted(a, matrix)
                    sample = {k: overhead.get(k, 0) + BIG_T2 * step.get(k, 0) for k in step}
                elif mode == "outer":
                    step = counted(a, outer)
                    sample = {k: overhead.get(k, 0) + BIG_T2 * step.get(k, 0) for k in step}
                else:
                    sample = counted(a, lambda: a.train_sample(x, y, 0.2, BIG_T1, BIG_T2))
                    step = {k: v / BIG_T2 for k, v in sample.items()}
                out.append({
                    "instrument": name, "mode": mode, "sizes": BIG_SIZES, "t1": BIG_T1, "t2": BIG_T2,
                    "step_bytes_sent": step.get("bytes_sent", 0), "step_bytes_received": step.get("bytes_received", 0),
                    "step_round_trips": step.get("round_trips", 0),
                    "sample_bytes": sample.get("bytes_sent", 0) + sample.get("bytes_received", 0),
                    "sample_round_trips": sample.get("round_trips", 0),
                })
    return out


# ---------------------------------------------------------------------------------------------- (c) link share
def stream(url: str, mode: str, n: int, sizes: list[int] | None = None, workdir: Path | None = None) -> dict:
    """Train ``n`` samples with the real in-situ learner (digits-hw preset, or random data on ``sizes``) and
    return samples/s and bytes per sample (sent + received) of the training alone (set-up excluded)."""
    from eqprop_hil.config import resolve
    from eqprop_hil.insitu.learner import open_insitu
    from eqprop_hil.runs.rundir import RunDir
    from eqprop_hil.train import prepare_data

    overrides: dict = {"train": {"epochs": 1}, "instrument": {"resource": url, "update_mode": mode}}
    if sizes is None:
        cfg = resolve("digits-hw", None, overrides)
        data = prepare_data(cfg)
        x, labels = data.x_train[:n], data.y_train[:n]
    else:
        overrides["model"] = {"sizes": sizes}
        overrides["rule"] = {"t1": BIG_T1, "t2": BIG_T2, "lr": [0.0056, 0.0028]}
        cfg = resolve("digits-hw", None, overrides)
        gen = torch.Generator().manual_seed(0)
        x, labels = torch.rand(n, sizes[0], generator=gen), torch.randint(sizes[-1], (n,), generator=gen)
    y = torch.nn.functional.one_hot(labels, cfg.model.sizes[-1]).to(x.dtype)
    with tempfile.TemporaryDirectory(prefix="link-bench-") as tmp:
        run = RunDir.create(Path(workdir or tmp) / "run", cfg.to_dict(), exist_ok=True)
        learner = open_insitu(cfg, run)
        try:
            before = dict(learner.array.stats)
            t0 = time.perf_counter()
            learner.train_batch(x, y)
            seconds = time.perf_counter() - t0
            wire = stats_delta(before, learner.array.stats)
        finally:
            learner.close()
    return {"samples": n, "samples_per_s": n / seconds,
            "bytes_per_sample": (wire.get("bytes_sent", 0) + wire.get("bytes_received", 0)) / n}


def link_share(quick: bool, max_seconds: float) -> dict:
    fpga_small = LATENCY_TARGETS["fpga/pty"]
    n_free = 3 if quick else 30
    n_big = 3
    small, big, rows = {}, {}, []
    for mode in MODES:
        small[mode] = median_run(lambda: stream(fpga_small, mode, n_free), 1 if quick else 3)
        nets = [("64-256-10", small[mode])]
        if not quick:  # the big learner programs 400k weights first: seconds, too slow for a smoke test
            big[mode] = median_run(lambda: stream(BIG_TARGETS["fpga/pty"], mode, n_big, BIG_SIZES), 3)
            nets.append(("784-512-10", big[mode]))
        for net, ref in nets:
            for link, capacity in LINKS.items():
                share = ref["bytes_per_sample"] * ref["samples_per_s"] / capacity
                predicted = 1.0 / (1.0 / ref["samples_per_s"] + ref["bytes_per_sample"] / capacity)
                measured, n = float("nan"), 0
                if net == "64-256-10" and not quick:  # quick: predictions only
                    n = int(min(30, max_seconds * predicted))
                    if n >= 1:
                        url = f"{fpga_small}&link_rate={capacity:.0f}"  # no "e+": "+" is a space in a query
                        measured = median_run(lambda: stream(url, mode, n), 1)["samples_per_s"]
                rows.append({"network": net, "mode": mode, "link": link, "capacity_bytes_per_s": capacity,
                             "bytes_per_sample": ref["bytes_per_sample"], "unlimited_samples_per_s": ref["samples_per_s"],
                             "share": share, "bottleneck": "link" if share > 1 else "compute",
                             "predicted_samples_per_s": predicted, "measured_samples_per_s": measured,
                             "measured_samples": n})
    return {"rows": rows, "unlimited_small": small, "unlimited_big": big}


def median_run(fn: Callable[[], dict], repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    out = dict(runs[0])
    out["samples_per_s"] = median([r["samples_per_s"] for r in runs])
    out["samples_per_s_all"] = [r["samples_per_s"] for r in runs]
    return out


# ---------------------------------------------------------------------------------------------- (d) round trips
ROUND_TRIP_TARGETS = {
    "analog/tcp": f"sim://analog?{SMALL}&process=own",
    "fpga/pty": f"sim://fpga?{SMALL}&transport=pty&process=own",
    "fpga/socket": f"sim://fpga?{SMALL}&transport=tcp&process=own",
}
SPARSE_PULSES = (120, 20)  # nonzero pulse counts in the 256x64 and 10x256 matrices of the compound step


def _sparse_counts(rng: np.random.Generator, shape: tuple[int, int], k: int) -> np.ndarray:
    counts = np.zeros(shape, np.int8)
    counts.flat[rng.choice(counts.size, k, replace=False)] = rng.choice(np.array([-1, 1], np.int8), k)
    return counts


def round_trips(calls: int, runs: int = 3) -> list[dict]:
    """Fixed cost of one driver round trip, emulator in a process of its own (as hardware would be): per-call
    microseconds (median over ``runs`` runs of ``calls`` calls, after 10 warm-up calls) of a trivial query
    (analog ``SYST:BOOT?``; FPGA: the feedback gain of edge 0, its smallest query), read_state, step([], 1) and
    a compound step carrying 140 sparse pulse counts (120 on edge 0, 20 on edge 1; signs alternate per call so
    the weights stay put). The compound step includes the emulator's pulse physics."""
    from eqprop_hil.drivers import open_array

    rng = np.random.default_rng(0)
    c0, c1 = _sparse_counts(rng, (256, 64), SPARSE_PULSES[0]), _sparse_counts(rng, (10, 256), SPARSE_PULSES[1])
    out = []
    for name, url in ROUND_TRIP_TARGETS.items():
        with open_array(url) as a:
            a.set_phase("FREE")
            sign = [1]

            def compound() -> None:
                sign[0] = -sign[0]
                a.step([{"edge": 0, "counts": (sign[0] * c0).astype(np.int8)},
                        {"edge": 1, "counts": (sign[0] * c1).astype(np.int8)}], 1)

            query = (lambda: a.boot_count) if hasattr(a, "boot_count") else (lambda: a.feedback_gain(0))
            commands: list[tuple[str, Callable[[], Any]]] = [
                ("trivial query", query), ("read_state", a.read_state), ("step([], 1)", lambda: a.step([], 1)),
                (f"step, {sum(SPARSE_PULSES)} sparse counts", compound)]
            for label, fn in commands:
                wire = counted(a, fn)
                for _ in range(10):
                    fn()
                per_call = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    per_call.append((time.perf_counter() - t0) / calls * 1e6)
                out.append({"link": name, "command": label, "us_per_call": median(per_call),
                            "us_per_call_runs": per_call, "calls": calls, "bytes_sent": wire.get("bytes_sent", 0),
                            "bytes_received": wire.get("bytes_received", 0),
                            "round_trips": wire.get("round_trips", 0)})
    return out


def print_round_trips(rows: list[dict], calls: int) -> None:
    print_table(
        f"(d) Fixed cost of one round trip, 64-256-10 emulator in its own process, {calls} calls x 3 runs",
        ["link", "command", "us/call", "runs us", "B sent", "B recv", "RT"],
        [[r["link"], r["command"], r["us_per_call"], " ".join(f"{x:.0f}" for x in r["us_per_call_runs"]),
          r["bytes_sent"], r["bytes_received"], r["round_trips"]] for r in rows],
        notes=["us/call: wall time of one driver call, median of 3 runs (microseconds); runs us: each run's mean",
               "trivial query: analog SYST:BOOT? (boot_count); FPGA feedback_gain(0)",
               "the compound step includes the emulator's pulse physics; the others are link + dispatch cost"])


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=200, help="calls per command in (a) (default 200)")
    parser.add_argument("--max-seconds", type=float, default=6.0,
                        help="(c): skip a link-limited run predicted to take longer than this (default 6 s)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 5 repetitions, 3 samples, (c) on the small network and unmeasured")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default benchmarks/out/link.json; link_round_trips.json for "
                             "--round-trips-only)")
    parser.add_argument("--round-trip-calls", type=int, default=300,
                        help="(d): calls per run of the round-trip micro-benchmark (default 300)")
    parser.add_argument("--round-trips-only", action="store_true",
                        help="run (d) only, the per-call round-trip micro-benchmark (writes link_round_trips.json "
                             "unless --out is given)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.max_seconds, args.round_trip_calls = 5, 0.5, 5
    if args.round_trip_calls < 1:
        parser.error("--round-trip-calls must be >= 1")
    if args.round_trips_only:
        logging.getLogger("hil").setLevel(logging.ERROR)
        rt = round_trips(args.round_trip_calls)
        print_round_trips(rt, args.round_trip_calls)
        path = write_json(args.out or OUT_DIR / "link_round_trips.json", {"benchmark": "link_round_trips", "environment": environment(), "round_trips": rt})
        print(f"\nwrote {path}")
        return {"round_trips": rt}
    if args.repetitions < 1 or not args.max_seconds > 0:
        parser.error("--repetitions must be >= 1 and --max-seconds > 0")
    logging.getLogger("hil").setLevel(logging.ERROR)  # write-verify residual warnings are not what we measure
    torch.set_num_threads(1)

    lat = latency(args.repetitions)
    print_table(
        f"(a) Round-trip latency per command, 64-256-10 emulator, {args.repetitions} calls each",
        ["link", "command", "median ms", "p90 ms", "B sent", "B recv", "RT"],
        [[r["link"], r["command"], r["median_ms"], r["p90_ms"], r["bytes_sent"], r["bytes_received"],
          r["round_trips"]] for r in lat],
        notes=["median ms / p90 ms: wall time of one driver call (median, 90th percentile), milliseconds",
               "B sent / B recv / RT: bytes written, bytes read and round trips of one call (driver stats)",
               "analog/tcp: pyvisa-py over TCP (SCPI; a set is followed by an error-queue check, settle by *OPC?)",
               "fpga/pty, fpga/tcp: pyserial over a pty / socket:// (COBS frames, CRC-16, Q1.15 states)",
               "emulators run in this process (a server thread): latency includes their physics"])

    steps = step_bytes()
    print_table(
        f"(b) Bytes on the wire per C-EP nudged step, {'-'.join(map(str, BIG_SIZES))}, t1={BIG_T1}, t2={BIG_T2}",
        ["instrument", "mode", "step B sent", "step B recv", "step RT", "sample B", "sample RT"],
        [[r["instrument"], r["mode"], r["step_bytes_sent"], r["step_bytes_received"], r["step_round_trips"],
          r["sample_bytes"], r["sample_round_trips"]] for r in steps],
        notes=["step B sent / recv / RT: bytes written, read and round trips for one nudged step",
               "  (local: the one-round-trip sample command divided by t2)",
               "sample B / RT: bytes (sent + received) and round trips per training sample: free phase, t2 steps, HOLD",
               "matrix: every row carries pulses (FPGA upper bound: it skips all-zero rows); outer: bit length 31"])

    share = link_share(args.quick, args.max_seconds)
    print_table(
        "(c) Share of a serial link's capacity a streaming in-situ C-EP loop uses (FPGA array, pty)",
        ["network", "mode", "link", "B/sample", "unlimited/s", "share %", "bottleneck", "predicted/s", "measured/s"],
        [[r["network"], r["mode"], r["link"], r["bytes_per_sample"], r["unlimited_samples_per_s"], 100 * r["share"],
          r["bottleneck"], r["predicted_samples_per_s"], r["measured_samples_per_s"]] for r in share["rows"]],
        notes=["B/sample: bytes sent + received per training sample (measured with the real learner)",
               "unlimited/s: samples per second without a link limit (median of runs; compute + emulator bound)",
               "share %: B/sample x unlimited/s / capacity x 100; above 100 % the link is the bottleneck",
               "predicted/s: 1 / (1/unlimited + B/capacity); measured/s: the loop with the FpgaServer link_rate",
               "  (64-256-10 only; '-' = not run: longer than --max-seconds). 784-512-10: random input, t1=40 t2=15",
               "capacity (8N1, 10 bits per byte): 115200 baud = 11,520 B/s, 921600 baud = 92,160 B/s, "
               "12 Mbit/s = 1,200,000 B/s"])

    rt = round_trips(args.round_trip_calls)
    print_round_trips(rt, args.round_trip_calls)

    payload = {"benchmark": "link", "repetitions": args.repetitions, "environment": environment(),
               "latency": lat, "step_bytes": steps, "link_share": share, "round_trips": rt}
    path = write_json(args.out or OUT_DIR / "link.json", payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
