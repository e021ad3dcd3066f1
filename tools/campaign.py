"""The fault campaign from outside (issue 9): nothing in-process, everything as a lab would fail.

Every trial is one short in-situ training run (``hil train`` as a child process; 64-16-10 network on ideal
devices, C-EP, one epoch of 40 samples, a checkpoint every 10) against an emulator that runs as its own process,
with faults injected from outside:

- ``drop`` ``delay`` ``duplicate`` ``duplicate_reply`` ``flip`` ``reset``: the fault proxy
  (``python -m eqprop_hil.mock_instruments.fault_proxy``) between driver and emulator, per message, seeded;
- ``emulator_kill``: the emulator SIGKILLed and started again on the same address, behind a proxy that keeps the
  driver's connection (``--hold-client``: a gateway that hides the restart);
- ``emulator_stop``: the emulator SIGSTOPped for longer than the driver's timeout, then SIGCONT;
- ``trainer_kill``: the trainer SIGKILLed at random moments, then ``hil train --resume``;
- ``checkpoint_flip``: after a trainer kill, one bit of the latest checkpoint inverted, then resume;
- ``journal_torn``: after a trainer kill, the journal's last line cut in half, then resume.

Both transports (analog board over VISA/TCP, FPGA array over ``socket://``) and all three update modes. A run
that exits non-zero is resumed (``--resume``), as an operator would, up to a bound. At the end the emulator is
read directly (no proxy): its executed-pulse-command counter against the journal (``lost``: the journal says
applied, the board did not execute; ``doubled``: the board executed more), and its weights against the
fault-free run's (``mismatched``: beyond a few float32 ulps; outer mode excluded: its stochastic trains are
drawn by the device's generator, which a replay does not rewind, so weights after a redo differ by design).

    python tools/campaign.py --out benchmarks/out/campaign.json              # the full campaign
    python tools/campaign.py --subset --out /tmp/c.json                      # the CI subset (seeded, small)
    python tools/reliability_table.py --campaign benchmarks/out/campaign.json  # -> docs/reliability.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PY = sys.executable
SIZES = "64,16,10"
EDGES = 2
TIMEOUT_S = 0.5  # the driver's timeout in the trials; delays and stops outlast it
SMALL_TOML = """\
[model]
sizes = [64, 16, 10]
[rule]
t1 = 15
t2 = 4
[train]
data_limit = 40
epochs = 1
batch_size = 1
checkpoint_every = 10
[instrument]
update_mode = "{mode}"
timeout_s = {timeout}
"""
PROXY_KINDS = ("drop", "delay", "duplicate", "duplicate_reply", "flip", "reset")
PROCESS_KINDS = ("emulator_kill", "emulator_stop", "trainer_kill", "checkpoint_flip", "journal_torn")
TRANSPORTS = ("analog", "fpga")
MODES = ("matrix", "outer", "local")
MAX_RESUMES = 12
WEIGHT_ULPS = 4


# ------------------------------------------------------------------------------------------ processes
def _start(args: list[str], first_line: re.Pattern, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout_s
    while True:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{args[:5]} printed no address")
        if first_line.search(line):
            return proc, line.strip()


class Emulator:
    """An emulator process on a fixed port; kill() and start() again on the same address (a power cycle)."""

    def __init__(self, transport: str, port: int = 0) -> None:
        self.transport, self.port = transport, port
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        for _ in range(100):  # the port may linger a moment after a SIGKILL
            try:
                self.proc, line = _start([PY, "-m", "eqprop_hil.mock_instruments", self.transport, "--port",
                                          str(self.port), "--device", "ideal", "--sizes", SIZES, "--seed", "1"],
                                         re.compile(r"(TCPIP|socket://)"))
                break
            except RuntimeError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"cannot restart the {self.transport} emulator on port {self.port}")
        self.port = int(re.findall(r"\d+", line.split("::")[2] if "::" in line else line.rsplit(":", 1)[1])[0])

    @property
    def resource(self) -> str:
        return (f"TCPIP0::127.0.0.1::{self.port}::SOCKET" if self.transport == "analog"
                else f"socket://127.0.0.1:{self.port}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FaultProxy:
    def __init__(self, emulator: Emulator, rates: dict[str, float], seed: int, stats: Path,
                 hold_client: bool = False) -> None:
        framing = "scpi" if emulator.transport == "analog" else "cobs"
        args = [PY, "-m", "eqprop_hil.mock_instruments.fault_proxy", "--target", f"127.0.0.1:{emulator.port}",
                "--framing", framing, "--seed", str(seed), "--stats", str(stats), "--delay-s", str(3 * TIMEOUT_S)]
        args += [a for k, v in rates.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        if hold_client:
            args.append("--hold-client")
        self.proc, addr = _start(args, re.compile(r"^\d+\.\d+\.\d+\.\d+:\d+"))
        self.port = int(addr.rsplit(":", 1)[1])
        self.transport, self.stats = emulator.transport, stats

    @property
    def resource(self) -> str:
        return (f"TCPIP0::127.0.0.1::{self.port}::SOCKET" if self.transport == "analog"
                else f"socket://127.0.0.1:{self.port}")

    def injected(self) -> dict:
        try:
            return json.loads(self.stats.read_text())["injected"]
        except (OSError, ValueError, KeyError):
            return {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def trainer(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "EQPROP_HIL_CRASH_AT"}
    return subprocess.Popen([PY, "-m", "eqprop_hil", "train", *args, "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def board(resource: str) -> tuple[list[np.ndarray], int]:
    """Weights and executed pulse commands, read from the emulator directly (no proxy)."""
    from eqprop_hil.drivers import open_array

    a = open_array(resource, timeout_s=5.0)
    try:
        weights = [np.asarray(a.read_weights(e)).copy() for e in range(EDGES)]
        if hasattr(a, "pulse_commands_executed"):
            executed = int(a.pulse_commands_executed)
        else:
            c = a.counters()
            executed = int(c["physics_pulse_commands"]) + int(c.get("physics_outer_commands", 0))
        return weights, executed
    finally:
        a.close()


def journal_expectation(run: Path) -> tuple[int, int, int]:
    """(what the board's counter should read, journal applied count, pending) from the run's own files: the
    reference taken at the last (re)bind plus what the journal applied since."""
    import torch

    from eqprop_hil.insitu.journal import PulseJournal

    journal = PulseJournal(run / "journal.jsonl", readonly=True)
    rec = run / "reconciliation.json"  # the trainer's reference at its last (re)bind, written at the end
    if rec.exists():
        r = json.loads(rec.read_text())
        board0, journal0 = r["reference_board"], r["reference_journal"]
    else:
        ckpts = sorted((run / "checkpoint").glob("ckpt-*.pt"))
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state"]["learner"]
        board0, journal0 = state.get("reconcile_base", [0, 0])
    applied = journal.applied_count()
    return int(board0) + applied - int(journal0), applied, journal.stats()["pending"]


# ------------------------------------------------------------------------------------------ one trial
@dataclass
class Trial:
    transport: str
    mode: str
    fault: str
    rate: float = 0.0
    events: int = 0  # process faults per trial
    seed: int = 0
    rates: dict | None = None  # "mixed": several proxy kinds at once
    process: str = ""  # "mixed": a process fault kind as well

    @property
    def proxy_rates(self) -> dict:
        return self.rates or ({self.fault: self.rate} if self.fault in PROXY_KINDS else {})

    @property
    def process_kind(self) -> str:
        return self.process or (self.fault if self.fault in PROCESS_KINDS else "")


def _flip_checkpoint(run: Path, rng: random.Random) -> bool:
    ckpts = sorted((run / "checkpoint").glob("ckpt-*.pt"))
    if not ckpts:
        return False
    data = bytearray(ckpts[-1].read_bytes())
    pos = rng.randrange(len(data) * 8)
    data[pos // 8] ^= 1 << (pos % 8)
    ckpts[-1].write_bytes(bytes(data))
    return True


def _tear_journal(run: Path) -> bool:
    path = run / "journal.jsonl"
    if not path.exists():
        return False
    data = path.read_bytes().rstrip(b"\n")
    cut = data.rfind(b"\n") + 1
    if len(data) - cut < 4:
        return False
    with open(path, "r+b") as f:
        f.truncate(cut + (len(data) - cut) // 2)
    return True


def run_trial(t: Trial, work: Path, reference: dict | None, ref_seconds: float) -> dict:
    """One trial; returns its row (injected counts, verdicts, outcome)."""
    rng = random.Random(f"{t.seed}:{t.transport}:{t.mode}:{t.fault}")
    work.mkdir(parents=True, exist_ok=True)
    (work / "small.toml").write_text(SMALL_TOML.format(mode=t.mode, timeout=TIMEOUT_S))
    run = work / "run"
    emu = Emulator(t.transport)
    proxy = None
    injected: dict[str, int] = {}
    attempts, errors, started = 0, [], time.monotonic()
    try:
        kind = t.process_kind
        if t.proxy_rates or kind in ("emulator_kill", "emulator_stop"):
            proxy = FaultProxy(emu, t.proxy_rates, t.seed, work / "proxy.json",
                               hold_client=kind in ("emulator_kill", "emulator_stop"))
        resource = proxy.resource if proxy else emu.resource
        first = ["--preset", "digits-hw", "--config", str(work / "small.toml"), "--instrument", resource,
                 "--run-dir", str(run)]
        # process faults: at random moments within the fault-free run's duration
        moments = sorted(rng.uniform(0.3, max(ref_seconds, 1.0)) for _ in range(t.events))
        rc = None
        while attempts <= MAX_RESUMES:
            # killed before it wrote its run directory: the operator runs the first command again
            proc = trainer(first if not (run / "config.toml").exists() else ["--resume", str(run)], work)
            attempts += 1
            t0 = time.monotonic()
            while proc.poll() is None:
                needs_file = kind in ("checkpoint_flip", "journal_torn")
                ready = not needs_file or any((run / "checkpoint").glob("ckpt-*.pt.sha256"))
                if (run / "reconciliation.json").exists():  # the run ended (reconciled): faults now hit no run
                    moments.clear()
                if moments and ready and time.monotonic() - t0 >= moments[0]:
                    moments.pop(0)
                    _process_fault(t, emu, proc, run, rng, injected)
                    if proc.poll() is not None:
                        break
                    t0 = time.monotonic() - 0.0
                time.sleep(0.01)  # polling the schedule, not waiting for an outcome
                if time.monotonic() - started > 600:
                    proc.kill()
            out = proc.communicate()[0]
            rc = proc.returncode
            if rc == 0:
                break
            if rc != -signal.SIGKILL:
                line = next((x for x in reversed(out.splitlines()) if "error" in x), out.strip()[-200:])
                errors.append(line[-400:])
                if len(errors) >= 3 and errors[-1] == errors[-2] == errors[-3]:
                    break  # the same refusal three times: the run stops, as it should
            if kind in ("checkpoint_flip", "journal_torn") and rc == -signal.SIGKILL:
                done = _flip_checkpoint(run, rng) if kind == "checkpoint_flip" else _tear_journal(run)
                injected[kind] = injected.get(kind, 0) + int(done)
        if proxy:
            for k, v in proxy.injected().items():
                if ":" not in k:
                    injected[k] = injected.get(k, 0) + v
        row = {"transport": t.transport, "mode": t.mode, "fault": t.fault, "rate": t.rate, "seed": t.seed,
               "rates": t.proxy_rates, "process": t.process_kind,
               "injected": sum(v for k, v in injected.items() if k != "upstream_reopened"),
               "injected_by_kind": injected, "trainer_starts": attempts, "exit": rc,
               "errors": errors[-2:], "seconds": round(time.monotonic() - started, 1)}
        emu.signal(signal.SIGCONT)
        weights, executed = board(emu.resource)
        row["executed"] = executed
        try:
            expected, applied, pending = journal_expectation(run)
        except (OSError, IndexError, KeyError, RuntimeError, ValueError) as e:
            expected, applied, pending = None, None, None
            row["errors"].append(f"journal/checkpoint unreadable: {e}")
        row.update(journal_expected=expected, journal_applied=applied, journal_pending=pending,
                   lost=max(0, expected - executed) if expected is not None else None,
                   doubled=max(0, executed - expected) if expected is not None else None)
        if rc != 0:
            row["outcome"] = "stopped with an error" if errors else "did not finish"
            row["mismatched"] = None
        elif reference is None:
            row["outcome"], row["mismatched"] = "reference", 0
        else:
            diffs = [float(np.abs(a - b).max()) for a, b in zip(weights, reference["weights"])]
            tol = [WEIGHT_ULPS * float(np.spacing(np.float32(np.abs(b).max()))) for b in reference["weights"]]
            same = all(np.array_equal(a, b) for a, b in zip(weights, reference["weights"]))
            close = all(d <= e for d, e in zip(diffs, tol))
            row["worst_weight_diff"] = max(diffs)
            if t.mode == "outer":
                row["outcome"] = "identical weights" if same else "counts checked (outer: trains redrawn)"
                row["mismatched"] = None
            else:
                row["outcome"] = ("identical weights" if same else f"within {WEIGHT_ULPS} float32 ulps" if close
                                  else "weights differ")
                row["mismatched"] = 0 if close else 1
        row["weights"] = [w.tolist() for w in weights] if reference is None else None
        return row
    finally:
        if proxy:
            proxy.stop()
        emu.stop()


def _process_fault(t: Trial, emu: Emulator, proc: subprocess.Popen, run: Path, rng: random.Random,
                   injected: dict) -> None:
    kind = t.process_kind
    if kind == "emulator_kill":
        emu.kill()
        time.sleep(rng.uniform(0.05, 0.3))
        emu.start()
    elif kind == "emulator_stop":
        emu.signal(signal.SIGSTOP)
        time.sleep(rng.uniform(2 * TIMEOUT_S, 4 * TIMEOUT_S))
        emu.signal(signal.SIGCONT)
    elif kind in ("trainer_kill", "checkpoint_flip", "journal_torn"):
        proc.kill()
        proc.wait()
        if kind != "trainer_kill":
            return  # the file fault is injected after the kill, and counted there
    injected[kind] = injected.get(kind, 0) + 1


# ------------------------------------------------------------------------------------------ plans
def plan(subset: bool, seed: int) -> list[Trial]:
    rng = random.Random(seed)
    trials = []
    rates = {"drop": 0.01, "delay": 0.002, "duplicate": 0.02, "duplicate_reply": 0.02, "flip": 0.01, "reset": 0.005}
    if subset:  # CI: two references and two trials, every kind of fault represented at least once
        mixed = {"drop": 0.004, "duplicate": 0.01, "duplicate_reply": 0.01, "flip": 0.005, "reset": 0.002}
        trials.append(Trial("fpga", "outer", "mixed", 0.0, 1, rng.randrange(1 << 30), mixed, "checkpoint_flip"))
        trials.append(Trial("analog", "matrix", "mixed", 0.0, 2, rng.randrange(1 << 30),
                            {"duplicate": 0.01, "duplicate_reply": 0.01, "flip": 0.005}, "emulator_kill"))
        return trials
    for fault in (*PROXY_KINDS, *PROCESS_KINDS):
        for mode in MODES:
            for transport in TRANSPORTS:
                proxy = fault in PROXY_KINDS
                trials.append(Trial(transport, mode, fault, rates[fault] if proxy else 0.0, 0 if proxy else 3,
                                    rng.randrange(1 << 30)))
    rng.shuffle(trials)  # a campaign cut short is still a seeded sample of every kind, transport and mode
    return trials


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="campaign JSON (rows, with the command and totals)")
    p.add_argument("--subset", action="store_true", help="the seeded CI subset")
    p.add_argument("--seed", type=int, default=20260605)
    p.add_argument("--repeat", type=int, default=1, help="run the plan this many times (other seeds)")
    p.add_argument("--only", default="", help="comma-separated fault kinds to keep")
    p.add_argument("--transport", choices=TRANSPORTS, help="only trials on this transport")
    p.add_argument("--keep", default="", help="keep the trials' run directories under this directory")
    args = p.parse_args(argv)
    trials = []
    for k in range(args.repeat):
        trials += plan(args.subset, args.seed + k)
    if args.only:
        keep = set(args.only.split(","))
        trials = [t for t in trials if t.fault in keep or t.process_kind in keep]
    if args.transport:
        trials = [t for t in trials if t.transport == args.transport]
    rows, refs = [], {}
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="campaign-", dir=args.keep or None) as tmp:
        if args.keep:
            tmp = tempfile.mkdtemp(prefix="kept-", dir=args.keep)
        for n, t in enumerate(trials):
            key = (t.transport, t.mode)
            if key not in refs:
                t0 = time.monotonic()
                ref = run_trial(Trial(t.transport, t.mode, "none"), Path(tmp) / f"ref-{t.transport}-{t.mode}", None, 0)
                ref["weights"] = [np.asarray(w, dtype=np.float32) for w in ref["weights"]]
                refs[key] = (ref, time.monotonic() - t0)
                rows.append({k: v for k, v in ref.items() if k != "weights"})
                print(json.dumps(rows[-1]), flush=True)
            ref, secs = refs[key]
            row = run_trial(t, Path(tmp) / f"t{n}-{t.transport}-{t.mode}-{t.fault}", ref, secs)
            row.pop("weights", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.out, argv, rows, len(trials))  # after every trial: an interrupted campaign keeps what ran
    doc = write(args.out, argv, rows, len(trials))
    print(json.dumps(doc["totals"]))
    return 0


def write(out: str, argv: list[str] | None, rows: list[dict], planned: int) -> dict:
    doc = {"command": "python tools/campaign.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "planned_trials": planned, "rows": rows, "totals": totals(rows)}
    Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def totals(rows: list[dict]) -> dict:
    """Over the faulty trials. ``lost``/``doubled``/``mismatched`` count finished runs (exit 0): a wrong result
    nobody was told about. A run that stopped with an error said so; its counts are reported apart."""
    faulty = [r for r in rows if r["fault"] != "none"]
    done = [r for r in faulty if r["exit"] == 0]
    stopped = [r for r in faulty if r["exit"] != 0]
    return {"trials": len(faulty), "injected": sum(r["injected"] for r in faulty), "finished": len(done),
            "lost": sum(r["lost"] or 0 for r in done), "doubled": sum(r["doubled"] or 0 for r in done),
            "mismatched": sum(r["mismatched"] or 0 for r in done),
            "counts_equal": sum(r["lost"] == 0 and r["doubled"] == 0 for r in done),
            "stopped_with_error": len(stopped),
            "stopped_count_differences": sum((r["lost"] or 0) + (r["doubled"] or 0) for r in stopped)}


if __name__ == "__main__":
    sys.exit(main())
