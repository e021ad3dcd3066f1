"""Hardware-in-the-loop benchmark: how fast `hil train` trains the emulated instruments, and where the time goes.

    python benchmarks/hil.py [--samples 300] [--repeats 3] [--modes matrix,outer,local] [--process own,thread]
                             [--quick] [--out FILE]

For each instrument (the analog board over TCP with pyvisa-py, the FPGA array over a pty with pyserial), each
placement of the emulator (``process=own``: a process of its own; ``thread``: a server thread of this process,
sharing its interpreter lock) and each update mode (matrix, outer, local), one epoch of the digits-hw preset
(64-256-10, C-EP, t1=30, t2=10, batch 1) on a stratified subset of ``--samples`` training digits runs through the real code
path: ``eqprop_hil.insitu.learner.open_insitu`` (which starts the emulator from the preset's ``sim://`` URL and opens the real
driver) and ``eqprop_hil.train.train`` (the real loop, with its journal and run records). The software engine trains the
same network on the same data beside them (``instrument.resource = "software"``), at batch 1 (the preset's, and
the hardware's physical batch: the ratio the issue asks for) and at batch 20 (vectorised, for scale).

Nothing in drivers/ or hil/ is modified: after set-up the learner is attached to a timing proxy of its driver
(``InSituLearner.attach``: the sample loop, its retrying wrapper and the recovery layer all call through it, SCPI
readings such as the boot counter included) and its journal is replaced by a timing proxy (benchmarks/common.py);
the learner handed to the loop times each ``train_batch``. So

- samples/s        training samples per second as the loop reports it (metrics.jsonl: samples / epoch seconds,
                   evaluation excluded);
- link ms          per sample, wall time blocked in driver calls (transport + emulator physics + reply parsing);
- ctrl ms          per sample, ``train_batch`` time minus link ms: the controller's own work (reading states into
                   increments, stochastic rounding to pulses, journal writes); ctrl us/step divides it by t2;
- journal ms       per sample, the part of ctrl ms spent writing the write-ahead pulse journal;
- B sent, B recv, RT   bytes written and read by the driver and round trips, per sample (driver ``stats``);
- pulse cmds, pulses   pulse commands sent and device pulses fired, per sample (learner counters).

Each configuration is run ``--repeats`` times; the table shows medians (byte and round-trip counts are
deterministic). Timings are wall clock: on a shared machine read them as orders of magnitude.
Writes benchmarks/out/hil.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import OUT_DIR, Clock, environment, median, print_table, stats_delta, timed, write_json

PRESET = "digits-hw"
MODES = ("matrix", "outer", "local")
TARGETS = {  # name -> sim:// URL (same physics settings as the preset's resource, without where it runs)
    "analog/tcp": "sim://analog?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed=0",
    "fpga/pty": "sim://fpga?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed=0&transport=pty",
}
PROCESSES = ("own", "thread")  # the emulator in a process of its own, or a server thread of the trainer's
NOT_LINK = ("close", "snapshot")  # driver calls that are not part of a training step


class TimedLearner:
    """Hands every call to ``learner``; ``train_batch`` is timed, switches the clock to the "train" bucket and
    accumulates the driver's stats growth, so that evaluation and checkpoints stay out of the figures."""

    def __init__(self, learner: Any, clock: Clock, array: Any = None) -> None:
        self.learner, self.clock, self.array = learner, clock, array
        self.train_seconds, self.samples = 0.0, 0
        self.wire: dict[str, int] = {}

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        before = dict(self.array.stats) if self.array is not None else None
        self.clock.bucket = "train"
        t0 = time.perf_counter()
        try:
            return self.learner.train_batch(x, y)
        finally:
            self.train_seconds += time.perf_counter() - t0
            self.clock.bucket = "other"
            self.samples += len(x)
            if before is not None:
                for k, v in stats_delta(before, self.array.stats).items():
                    self.wire[k] = self.wire.get(k, 0) + v

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return self.learner.evaluate(x, y)

    def state_dict(self) -> dict:
        return self.learner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.learner.load_state_dict(state)

    def parameters_for_checkpoint(self) -> dict:
        return self.learner.parameters_for_checkpoint()

    def load_parameters_from_checkpoint(self, params: dict) -> None:
        self.learner.load_parameters_from_checkpoint(params)


def config(resource: str, mode: str, samples: int, batch_size: int | None = None) -> Any:
    from eqprop_hil.config import resolve

    overrides: dict = {"train": {"data_limit": samples, "epochs": 1},
                       "instrument": {"resource": resource, "update_mode": mode}}
    if batch_size is not None:
        overrides["train"]["batch_size"] = batch_size
    return resolve(PRESET, None, overrides)


def measure_instrument(url: str, mode: str, samples: int, workdir: Path) -> dict:
    """One epoch of in-situ training on ``samples`` digits; returns the per-sample figures."""
    from eqprop_hil.insitu.learner import open_insitu
    from eqprop_hil.runs.rundir import RunDir
    from eqprop_hil.train import prepare_data, train

    cfg = config(url, mode, samples)
    data = prepare_data(cfg)
    run = RunDir.create(workdir, cfg.to_dict())
    learner = open_insitu(cfg, run)  # starts the emulator, opens the driver, programs the initial weights
    try:
        clock = Clock()
        array = learner.array
        # The proxy goes where every driver call passes: the learner's own calls, its recovery layer's
        # (Guard: pulse commands, counters, boot probes) and the retrying wrapper the sample loop drives.
        learner.attach(timed(array, clock))
        learner.journal = learner.guard.journal = timed(learner.journal, clock, "journal.")
        wrapper = TimedLearner(learner, clock, array)
        counters0 = dict(learner.counters)
        train(cfg, wrapper, data, run, progress=False)
        record = run.read_metrics()[-1]
    finally:
        learner.close()
    n = wrapper.samples
    link = clock.total("train", exclude=[k for k in clock.seconds["train"] if k.startswith("journal.")] + list(NOT_LINK))
    journal = sum(s for k, s in clock.seconds["train"].items() if k.startswith("journal."))
    ctrl = wrapper.train_seconds - link
    return {
        "samples": n, "samples_per_s": record["samples_per_second"], "test_accuracy": record["test_accuracy"],
        "train_ms_per_sample": 1e3 * wrapper.train_seconds / n, "link_ms_per_sample": 1e3 * link / n,
        "controller_ms_per_sample": 1e3 * ctrl / n, "controller_us_per_nudged_step": 1e6 * ctrl / n / cfg.rule.t2,
        "journal_ms_per_sample": 1e3 * journal / n,
        "bytes_sent_per_sample": wrapper.wire.get("bytes_sent", 0) / n,
        "bytes_received_per_sample": wrapper.wire.get("bytes_received", 0) / n,
        "round_trips_per_sample": wrapper.wire.get("round_trips", 0) / n,
        "pulse_commands_per_sample": (learner.counters["pulse_commands"] - counters0["pulse_commands"]) / n,
        "pulses_per_sample": (learner.counters["pulses_sent"] - counters0["pulses_sent"]) / n,
        "driver_calls_per_sample": {k: v / n for k, v in sorted(clock.calls["train"].items())},
    }


def measure_software(samples: int, batch_size: int | None, workdir: Path) -> dict:
    """The software engine (eqprop_hil.engine.learners.build_learner) on the same network and data, through the same loop."""
    from eqprop_hil.engine.learners import build_learner
    from eqprop_hil.runs.rundir import RunDir
    from eqprop_hil.train import prepare_data, train

    cfg = config("software", "matrix", samples, batch_size)
    data = prepare_data(cfg)
    run = RunDir.create(workdir, cfg.to_dict())
    wrapper = TimedLearner(build_learner(cfg), Clock())
    train(cfg, wrapper, data, run, progress=False)
    record = run.read_metrics()[-1]
    n = wrapper.samples
    return {"samples": n, "samples_per_s": record["samples_per_second"], "test_accuracy": record["test_accuracy"],
            "train_ms_per_sample": 1e3 * wrapper.train_seconds / n, "link_ms_per_sample": 0.0,
            "controller_ms_per_sample": 1e3 * wrapper.train_seconds / n,
            "controller_us_per_nudged_step": 1e6 * wrapper.train_seconds / n / cfg.rule.t2,
            "batch_size": cfg.train.batch_size}


def summarise(runs: list[dict]) -> dict:
    """Median of every numeric figure over the repeats (the counts are identical across repeats)."""
    out: dict[str, Any] = {"repeats": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            out[key] = median([r[key] for r in runs])
        else:
            out[key] = value
    out["samples_per_s_all"] = [r["samples_per_s"] for r in runs]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="training digits per measurement (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians shown (default 3)")
    parser.add_argument("--modes", default=",".join(MODES), help="update modes, comma-separated")
    parser.add_argument("--process", default=",".join(PROCESSES),
                        help="where the emulator runs: own (its own process), thread (the trainer's), comma-separated")
    parser.add_argument("--quick", action="store_true", help="smoke test: 10 samples (unless --samples), 1 repeat")
    parser.add_argument("--out", default=str(OUT_DIR / "hil.json"), help="JSON output path")
    args = parser.parse_args(argv)
    if args.samples is None:
        args.samples = 10 if args.quick else 300
    if args.quick:
        args.repeats = 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = sorted(set(modes) - set(MODES))
    processes = [p.strip() for p in args.process.split(",") if p.strip()]
    if bad or set(processes) - set(PROCESSES) or not processes or args.samples < 1 or args.repeats < 1:
        parser.error(f"modes must be among {MODES} (got {bad}), --process among {PROCESSES}, "
                     "--samples and --repeats >= 1")
    logging.getLogger("hil").setLevel(logging.WARNING)
    torch.set_num_threads(1)  # batch-1 tensors: a second thread only adds synchronisation (tests/conftest.py)

    # (key, instrument label, mode label, how to measure it); every repeat runs each configuration once, in this
    # order, so that each round's ratios to the software engine at batch 1 see the same load (shared machines)
    configs: list[tuple[str, str, str, Any]] = [
        ("software b1", "software", "batch 1", lambda d: measure_software(args.samples, 1, d)),
        ("software b20", "software", "batch 20", lambda d: measure_software(args.samples, 20, d)),
    ]
    for target, base_url in TARGETS.items():
        for where in processes:
            for mode in modes:
                url = f"{base_url}&process={where}"
                configs.append((f"{target} ({where}) {mode}", f"{target} ({where})", mode,
                                lambda d, url=url, mode=mode: measure_instrument(url, mode, args.samples, d)))
    runs: dict[str, list[dict]] = {key: [] for key, *_ in configs}
    with tempfile.TemporaryDirectory(prefix="hil-bench-") as tmp:
        k = 0
        for rep in range(args.repeats):
            for key, _, _, measure in configs:
                k += 1
                r = measure(Path(tmp) / f"run{k}")
                runs[key].append(r)  # software b1 comes first in every round
                r["ratio_to_software_b1"] = r["samples_per_s"] / runs["software b1"][rep]["samples_per_s"]
                print(f"  round {rep + 1}: {key}: {r['samples_per_s']:.1f} samples/s "
                      f"({r['ratio_to_software_b1']:.2f}x software b1)", file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    for key, inst, mode, _ in configs:
        extra = {"url": f"{TARGETS[inst.split(' ')[0]]}&process={inst.split('(')[1][:-1]}"} if inst != "software" else {}
        results[key] = {"instrument": inst, "mode": mode, **extra, **summarise(runs[key])}

    columns = ["instrument", "mode", "samples/s", "x sw b1", "link ms", "ctrl ms", "ctrl us/step", "journal ms", "B sent",
               "B recv", "RT", "pulse cmds", "pulses"]
    rows = [[r["instrument"], r["mode"], r["samples_per_s"], r["ratio_to_software_b1"], r["link_ms_per_sample"], r["controller_ms_per_sample"],
             r["controller_us_per_nudged_step"], r.get("journal_ms_per_sample", 0.0),
             r.get("bytes_sent_per_sample", 0.0), r.get("bytes_received_per_sample", 0.0),
             r.get("round_trips_per_sample", 0.0), r.get("pulse_commands_per_sample", 0.0),
             r.get("pulses_per_sample", 0.0)] for r in results.values()]
    print_table(
        f"In-situ C-EP training speed, {PRESET} (64-256-10, t1=30, t2=10), {args.samples} training digits, "
        f"median of {args.repeats} run(s)", columns, rows,
        notes=[
            "samples/s: training samples per second of the real loop (eqprop_hil.train.train), evaluation excluded",
            "x sw b1: samples/s over the software engine's at batch 1 in the same round, median over the rounds",
            "link ms: per sample, wall time blocked in driver calls (transport + emulator physics), milliseconds",
            "ctrl ms: per sample, train_batch time minus link ms: the controller's own work, milliseconds;",
            "  ctrl us/step: the same per nudged step (divided by t2 = 10), microseconds",
            "journal ms: per sample, the part of ctrl ms spent in the write-ahead pulse journal, milliseconds",
            "B sent / B recv / RT: bytes written / read by the driver and round trips, per sample",
            "pulse cmds / pulses: pulse commands sent and device pulses fired, per sample",
            "software batch 20 / batch 1: the software engine vectorised over 20 samples, and at the hardware's",
            "  batch 1 (the preset's: the very rule the instrument runs)",
            "(own): the emulator in a process of its own; (thread): a server thread of this process, sharing its",
            "  interpreter lock; either way link time includes the emulator's physics",
        ],
    )
    payload = {"benchmark": "hil", "preset": PRESET, "samples": args.samples, "repeats": args.repeats,
               "modes": modes, "environment": environment(), "results": results}
    path = write_json(args.out, payload)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
