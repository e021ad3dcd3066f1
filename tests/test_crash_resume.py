"""Crash and resume (issue 5, item 2): SIGKILL the trainer at many points, resume each time, end where an
uninterrupted run ends.

Two emulated analog boards run as their own processes (``python -m mock_instruments analog``, ideal devices,
same seed): a fresh one for the reference run (``hil train`` straight through) and a persistent one that
outlives every crash of the other run, as a bench instrument outlives its controller. The crashing run is
killed with SIGKILL (nothing of the trainer survives but its files and the instrument's state) at points chosen
by a seeded generator (``EQPROP_CRASH_SEED``), in different phases:

- ``hook``: ``EQPROP_HIL_CRASH_AT="sample:step:edge"`` (hil/insitu/learner.py) dies after a pulse command was sent and
  acknowledged, before the journal marks it done; the step's later commands are journaled but never sent. The
  first such crash comes before the first checkpoint, the others after a checkpoint.
- ``eval``: ``EQPROP_HIL_CRASH_AT="eval:N"`` dies after the N-th test sample of an evaluation.
- ``journal``: the test kills the process once the journal has grown by k records (during training, a resume's
  roll-back, a checkpoint...: wherever it lands, the end result must be the same).
- ``stdout``: the test kills the process as soon as it prints an epoch line (metrics written, the epoch-end
  checkpoint being written or just written).

Targets of the hooks are taken from the reference run's journal (the replay sends the same commands), always
beyond the furthest sample the crashing run has journaled, so every hook is reached and must kill.

Why the end results can be compared exactly: the devices are ideal (every pulse is exactly ``dw_min``), the
rounding draws are counter-based (a replay draws what the first pass drew) and a resume undoes the commands sent
after the checkpoint with negated counts. An undo is ``w + c dw - c dw`` in float64, which can miss ``w`` by one
float64 ulp (1e-16); the weights travel as float32, so a board re-programmed after such a miss differs by at
most float32 rounding of the weights (~6e-8 of |w|): the weight tolerance below is a few float32 ulps of the
largest weight. Metrics must be identical (accuracies, losses, pulse counters; timing fields excepted).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.insitu.journal import PulseJournal, iter_records
from eqprop_hil.runs.rundir import RunDir

SIZES = "64,16,10"
EDGES = 2
SEED = int(os.environ.get("EQPROP_CRASH_SEED", "20240605"))
SMALL_TOML = """\
[model]
sizes = [64, 16, 10]
[rule]
t1 = 15
t2 = 4
lr = [0.0168, 0.0084]
[train]
data_limit = 40
epochs = 2
batch_size = 1
checkpoint_every = 10
lr_final = 1.0  # constant rates: the last samples send pulse commands for the hooks to hit
"""
N_TRAIN, EPOCHS, FIRST_CHECKPOINT = 40, 2, 10
START_TIMEOUT_S = 30.0  # an emulator process prints its resource line within this
RUN_TIMEOUT_S = 120.0  # one trainer process (imports, resume, training) ends or is killed within this
TIMING_KEYS = {"seconds", "samples_per_second"}
# float32 weights: a few ulps of the largest weight (module docstring)
WEIGHT_ULPS = 4


class Process:
    """A child process whose output lines are collected by a reader thread, so waits on them are bounded."""

    def __init__(self, args: list[str], *, env: dict | None = None, cwd: Path | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, cwd=cwd, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, predicate, timeout_s: float) -> str | None:
        """The first line matching ``predicate``; None if the process ended first. TimeoutError if neither."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise TimeoutError(f"{self.args[:6]}: no matching line within {timeout_s} s:\n{self.text()}") from None
            if line is None:
                return None
            if predicate(line):
                return line

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait(RUN_TIMEOUT_S)

    def wait(self, timeout_s: float) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=timeout_s)
        return rc

    def text(self) -> str:
        return "".join(self.output[-40:])


class EmulatorProcess(Process):
    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "mock_instruments", "analog", "--port", "0", "--device", "ideal",
                          "--sizes", SIZES, "--seed", "1"])
        try:
            line = self.next_line(lambda s: s.startswith("TCPIP"), START_TIMEOUT_S)
            if line is None:
                raise RuntimeError(f"the emulator exited before printing its resource:\n{self.text()}")
        except BaseException:
            self.kill()
            raise
        self.resource = line.strip()

    def stop(self) -> int:
        """SIGINT: the emulator stops serving and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.wait(15.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15.0)
            return -999


@pytest.fixture
def emulators():
    """(persistent, fresh) emulator processes; both stopped with SIGINT at the end, even after a failure, and
    both must exit 0."""
    started: list[EmulatorProcess] = []
    try:
        started.append(EmulatorProcess())
        started.append(EmulatorProcess())
        yield started[0], started[1]
    finally:
        codes = [e.stop() for e in started]
    assert codes == [0] * len(started), f"emulators exited with {codes}"


@pytest.fixture
def trainers():
    """Trainer processes the test started; any still running at the end (a failed wait) is killed."""
    started: list[Process] = []
    yield started
    for proc in started:
        proc.kill()


# ------------------------------------------------------------------------------------------ helpers
def hil(started: list[Process], *args: str, cwd: Path, crash_at: str | None = None) -> Process:
    """``hil train ARGS`` as a child process (unbuffered output, so its lines arrive as they are printed)."""
    env = {k: v for k, v in os.environ.items() if k != "EQPROP_HIL_CRASH_AT"}
    env["PYTHONUNBUFFERED"] = "1"
    if crash_at is not None:
        env["EQPROP_HIL_CRASH_AT"] = crash_at
    started.append(Process([sys.executable, "-m", "eqprop_hil", "train", *args, "--no-progress"], env=env, cwd=cwd))
    return started[-1]


def journal_records(path: Path) -> list[dict]:
    """Complete records of a journal, the archive of what checkpoints compacted away included (a torn last line
    is skipped, as the journal itself does)."""
    return iter_records(path)


def furthest_sample(path: Path) -> int:
    return max((r["sample"] for r in journal_records(path) if r["state"] == "pending"), default=-1)


def commands(path: Path) -> list[tuple[int, int, int]]:
    """(sample, step, edge) of every training pulse command of a journal (undo commands excluded)."""
    return [(r["sample"], r["step"], r["edge"]) for r in journal_records(path)
            if r["state"] == "pending" and r["step"] >= 0 and "undo_of" not in r]


def board_figures(resource: str) -> tuple[list[np.ndarray], int]:
    """Weights and executed pulse commands, read from the emulator over the wire (nothing else connected)."""
    board = open_array(resource, timeout_s=5.0)
    try:
        return [board.read_weights(e).copy() for e in range(EDGES)], int(board.pulse_commands_executed)
    finally:
        board.close()


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def wait_journal_growth(proc: Process, path: Path, records: int, last_sample: int) -> None:
    """Bounded wait until the journal holds ``records`` more lines than now, or has journaled a command of sample
    ``last_sample`` (so that the plan's next crash still has samples to land in), or the process ended."""
    target = len(journal_records(path)) + records
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.proc.poll() is None and len(journal_records(path)) < target and furthest_sample(path) < last_sample:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the journal did not grow by {records} records within {RUN_TIMEOUT_S} s")
        time.sleep(0.002)  # polling a condition (the file), not waiting for an outcome


# ------------------------------------------------------------------------------------------ the test
@pytest.mark.timeout(300)
def test_sigkill_at_random_points_then_resume_ends_like_a_straight_run(emulators, trainers, tmp_path) -> None:
    persistent, fresh = emulators
    rng = random.Random(SEED)
    (tmp_path / "small.toml").write_text(SMALL_TOML)
    common = ["--preset", "digits-hw", "--config", str(tmp_path / "small.toml")]

    ref_dir, run_dir = tmp_path / "reference", tmp_path / "crashed"
    ref = hil(trainers, *common, "--instrument", fresh.resource, "--run-dir", str(ref_dir), cwd=tmp_path)
    assert ref.wait(RUN_TIMEOUT_S) == 0, ref.text()
    ref_commands = commands(ref_dir / "journal.jsonl")
    assert len(ref_commands) > 100

    steps = [c[:2] for c in ref_commands]
    not_last = {c for c, nxt in zip(ref_commands, steps[1:]) if nxt == c[:2]}  # the step sends another after it

    def hook_target(lo: int, hi: int, not_last_of_step: bool) -> str:
        """A pulse command of the reference run in samples lo..hi, past what the crashing run journaled; with
        ``not_last_of_step``, one followed by another command of its step (journaled with it, never sent)."""
        lo = max(lo, furthest_sample(run_dir / "journal.jsonl") + 1)
        hi = max(hi, lo)
        wanted = [c for c in ref_commands if not not_last_of_step or c in not_last]
        # compound steps (one command per nudged step) leave no command "followed by another of its step":
        # then any command of the range
        pool = [c for c in wanted if lo <= c[0] <= hi] or [c for c in ref_commands if lo <= c[0] <= hi] \
            or [c for c in ref_commands if c[0] >= lo]
        assert pool, f"no reference pulse command at or after sample {lo}; the crashes so far: {log}"
        return ":".join(map(str, rng.choice(pool)))

    # (kind, parameter) in order; hooks are resolved when their turn comes (they depend on where the run is)
    plan = [
        ("hook", (1, FIRST_CHECKPOINT - 2, True)),  # before any checkpoint
        ("journal", rng.randint(15, 100)),  # lines: a compound step journals one command per nudged step
        ("hook", (FIRST_CHECKPOINT, N_TRAIN - 2, True)),
        ("eval", rng.randint(1, 8)),
        ("stdout", "epoch"),
        ("hook", (N_TRAIN + 1, 2 * N_TRAIN - 12, False)),
        ("journal", rng.randint(5, 75)),
        ("unsent", (N_TRAIN + 1, 2 * N_TRAIN - 2, True)),  # journaled, killed before it was sent
    ]
    log, done = [], False
    for n, (kind, param) in enumerate(plan):
        start = [*common, "--instrument", persistent.resource, "--run-dir", str(run_dir)] if n == 0 else \
            ["--resume", str(run_dir)]
        crash_at = hook_target(*param) if kind == "hook" else f"{hook_target(*param)}:unsent" if kind == "unsent" \
            else f"eval:{param}" if kind == "eval" else None
        proc = hil(trainers, *start, cwd=tmp_path, crash_at=crash_at)
        if kind in ("hook", "unsent", "eval"):
            rc = proc.wait(RUN_TIMEOUT_S)
            assert rc == -signal.SIGKILL, f"{kind} {crash_at} did not kill the trainer (rc {rc}):\n{proc.text()}"
        elif kind == "journal":
            # stop by the middle of the next crash's range: the kill lands a moment after the growth is seen (longer
            # on a loaded machine), and a run already past every remaining reference command would leave that
            # crash nowhere to land
            lo_next, hi_next = plan[n + 1][1][:2]
            wait_journal_growth(proc, run_dir / "journal.jsonl", param, last_sample=(lo_next + hi_next) // 2)
            rc = proc.kill()
        else:
            proc.next_line(lambda s: s.startswith(param), RUN_TIMEOUT_S)
            rc = proc.kill()
        assert rc in (0, -signal.SIGKILL), f"crash {n} ({kind}): the trainer failed (rc {rc}):\n{proc.text()}"
        pending = PulseJournal(run_dir / "journal.jsonl", readonly=True).stats()["pending"]
        log.append(f"{kind} {crash_at or param}: rc {rc}, journal pending {pending}, "
                   f"checkpoints {[p.name for p in RunDir(run_dir).checkpoints()]}")
        if rc == 0:  # the run finished before the kill landed: nothing left to crash
            done = True
            break
    if not done:
        final = hil(trainers, "--resume", str(run_dir), cwd=tmp_path)
        assert final.wait(RUN_TIMEOUT_S) == 0, final.text()
    print("\n".join(log))
    kills = sum(1 for line in log if "rc -9" in line)
    assert kills >= 5, log

    # the same weights: on both boards, in both final checkpoints
    ref_board, ref_executed = board_figures(fresh.resource)
    run_board, run_executed = board_figures(persistent.resource)
    ref_params = RunDir.open(ref_dir).load_checkpoint()["parameters"]
    run_params = RunDir.open(run_dir).load_checkpoint()["parameters"]
    for e in range(EDGES):
        ref_w = ref_params[f"W{e}"].numpy()
        atol = WEIGHT_ULPS * float(np.spacing(np.float32(np.abs(ref_w).max())))
        np.testing.assert_array_equal(ref_board[e], ref_w)  # the checkpoint holds what the board holds
        np.testing.assert_allclose(run_params[f"W{e}"].numpy(), ref_w, rtol=0, atol=atol)
        np.testing.assert_allclose(run_board[e], ref_w, rtol=0, atol=atol)
        assert float(np.abs(ref_w - ref_w.mean()).max()) > 0.01  # the weights are non-trivial
    assert set(run_params) == set(ref_params)

    # the same metrics, epoch by epoch (timing fields aside)
    ref_metrics = metrics(ref_dir)
    assert [m["epoch"] for m in ref_metrics] == list(range(1, EPOCHS + 1))
    assert metrics(run_dir) == ref_metrics

    # every journal entry settled, and the journal accounts for every command each board executed
    for path, executed in ((run_dir / "journal.jsonl", run_executed), (ref_dir / "journal.jsonl", ref_executed)):
        journal = PulseJournal(path, readonly=True)
        assert journal.stats()["pending"] == 0, journal.stats()
        assert journal.applied_count() == executed, (path, journal.stats(), executed)
    # both verdicts were reached: each hooked command ran unacknowledged-in-the-journal, and the "unsent" one
    # (and any journaled after it in its step) never left the host
    verdicts = PulseJournal(run_dir / "journal.jsonl", readonly=True).stats()
    assert verdicts["applied"] >= sum(kind == "hook" for kind, _ in plan) and verdicts["not_applied"] >= 1, verdicts
    assert len(ref_commands) == ref_executed  # the reference: one journaled command per executed one
