"""Safety of `hil train` on an instrument: limits enforced before anything is sent, a pulse budget that stops a
run with the instrument left safe, and Ctrl-C (issue 4 item 3) against an emulator that outlives the run.

The emulator runs in this test process; `hil train` runs as a subprocess (or in-process for the budget) and
talks to it over TCP, so the instrument's state after the run is read from the emulator itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import LimitError
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.drivers.limits import Limits
from eqprop_hil import cli
from eqprop_hil.mock_instruments.launch import start_emulator

ROOT = Path(__file__).resolve().parents[1]
HW = "sizes=64,16,10&activation=sigmoid4&device=ideal&seed=0"


def _config(path: Path, resource: str, *, data_limit: int, batch_size: int, extra: str = "") -> Path:
    path.write_text(f"""name = "safety"
[model]
sizes = [64, 16, 10]
activation = "sigmoid4"
bias = false
[rule]
name = "cep"
t1 = 5
t2 = 3
beta = 0.2
lr = [0.05, 0.025]
[train]
dataset = "digits"
epochs = 1
batch_size = {batch_size}
data_limit = {data_limit}
[instrument]
resource = "{resource}"
update_mode = "matrix"
{extra}""")
    return path


def _assert_safe(emu) -> None:
    fw = emu.server.firmware
    assert emu.physics.phase == "HOLD" and fw.nudge_mode == "OFF"
    assert not np.any(fw.input) and not np.any(fw.currents)


# ---------------------------------------------------------------------------------------------- limits
LIMITS = Limits(max_input_volts=0.5, max_nudge_amperes=2e-5, max_pulses_per_device=3, max_bit_length=31,
                pulse_budget=50)


def _refusals(array, n_in: int, shape: tuple[int, int]) -> list:
    big = np.zeros(shape, np.int8)
    big[0, 0] = 4
    return [
        ("input", lambda: array.set_input(np.full(n_in, 0.6))),
        ("input", lambda: array.set_input(np.array([np.nan] + [0.0] * (n_in - 1)))),
        ("nudge", lambda: array.set_nudge_current(np.full(3, 3e-5))),
        ("pulses", lambda: array.apply_pulses(0, big)),
        ("bit length", lambda: array.apply_outer(0, np.ones(shape[0]), np.ones(shape[1]), 32)),
        ("budget", lambda: array.apply_pulses(0, np.full(shape, 3, np.int8))),  # 3 x 20 = 60 > 50
    ]


@pytest.mark.parametrize("url,driver", [("sim://analog?sizes=4,5,3&device=ideal", AnalogBoard),
                                        ("sim://fpga?sizes=4,5,3&device=ideal&transport=tcp", FpgaArray)])
def test_limits_are_enforced_before_anything_is_sent(url: str, driver: type) -> None:
    with start_emulator(url) as emu, driver(emu.resource, limits=LIMITS, timeout_s=2.0) as array:
        array.set_input(np.full(4, 0.5))  # at the limit: allowed
        sent, device = dict(array.stats), emu.physics.state_dict()
        for what, refused in _refusals(array, 4, (5, 4)):
            with pytest.raises(LimitError, match="nothing was sent|exceeds|outside|NaN"):
                refused()
        assert array.stats["bytes_sent"] == sent["bytes_sent"], "a refused value reached the wire"
        after = emu.physics.state_dict()
        assert after["counters"] == device["counters"] and after["phase"] == device["phase"]
        assert all(np.array_equal(a["w"], b["w"]) for a, b in zip(after["devices"], device["devices"]))
        assert array.apply_pulses(0, np.full((5, 4), 2, np.int8))["pulses"] == 40  # within budget
        with pytest.raises(LimitError, match="budget"):
            array.apply_pulses(0, np.eye(5, 4, dtype=np.int8) * 3)  # 40 + 12 > 50
        assert emu.physics.counters["pulses"] == 40


def test_a_run_that_would_exceed_its_pulse_budget_stops_and_leaves_the_board_safe(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with start_emulator(f"sim://analog?{HW}") as emu:
        cfg = _config(tmp_path / "budget.toml", emu.resource, data_limit=20, batch_size=2,
                      extra="[instrument.limits]\npulse_budget = 400\nmax_pulses_per_device = 3\n")
        code = cli.main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and "pulse budget of 400" in err and "nothing was sent" in err
        assert 0 < emu.physics.counters["pulses"] <= 400
        _assert_safe(emu)


# ---------------------------------------------------------------------------------------------- Ctrl-C
class _Train:
    """`hil train` in a subprocess with its stderr read line by line (events, not sleeps)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "eqprop_hil", *args], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.err: list[str] = []
        self.out: list[str] = []
        self.cond = threading.Condition()
        # one reader per pipe, and nothing else reads them (communicate() would race the readers for lines)
        self.readers = [threading.Thread(target=self._read, args=(pipe, sink), daemon=True)
                        for pipe, sink in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for r in self.readers:
            r.start()

    def _read(self, pipe, sink: list[str]) -> None:
        for line in pipe:
            with self.cond:
                sink.append(line)
                self.cond.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: any(text in e for e in self.err), timeout=timeout_s), "".join(self.err)

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        self.proc.wait(timeout=timeout_s)
        for r in self.readers:  # the pipes close with the process: the readers end right after
            r.join(timeout=timeout_s)
        return self.proc.returncode, "".join(self.out)


def _wait_pulses(emu, timeout_s: float = 60.0) -> None:
    """Bounded wait on the emulator's own counter: a pulse command means training is under way."""
    tick = threading.Event()  # never set: a bounded pause between looks at the counter
    for _ in range(int(timeout_s / 0.05)):
        if emu.physics.counters["pulse_commands"] > 0:
            return
        tick.wait(0.05)
    raise AssertionError("training never sent a pulse")


def test_ctrl_c_finishes_the_step_leaves_the_board_safe_checkpoints_and_resumes(tmp_path: Path) -> None:
    with start_emulator(f"sim://analog?{HW}") as emu:
        cfg = _config(tmp_path / "run.toml", emu.resource, data_limit=120, batch_size=2)
        run_dir = tmp_path / "run"
        train = _Train(["train", "--config", str(cfg), "--run-dir", str(run_dir), "--no-progress"])
        _wait_pulses(emu)
        train.proc.send_signal(signal.SIGINT)
        code, out = train.finish()
        err = "".join(train.err)
        assert code == 130, err
        assert "finishing the current step" in err and f"hil train --resume {run_dir}" in err
        _assert_safe(emu)
        assert list((run_dir / "checkpoint").glob("ckpt-*.pt")), "no checkpoint written on Ctrl-C"
        resumed = _Train(["train", "--resume", str(run_dir), "--no-progress"])
        code, out = resumed.finish()
        assert code == 0, "".join(resumed.err)
        assert "final test accuracy" in out and "after 1 of 1 epochs" in out
        _assert_safe(emu)


def test_a_second_ctrl_c_within_two_seconds_aborts_at_once(tmp_path: Path) -> None:
    with start_emulator(f"sim://analog?{HW}") as emu:
        # One batch of 400 samples: finishing it gracefully would take far longer than the abort.
        cfg = _config(tmp_path / "run.toml", emu.resource, data_limit=400, batch_size=400)
        run_dir = tmp_path / "run"
        train = _Train(["train", "--config", str(cfg), "--run-dir", str(run_dir), "--no-progress"])
        _wait_pulses(emu)
        train.proc.send_signal(signal.SIGINT)
        train.wait_for("finishing the current step")
        train.proc.send_signal(signal.SIGINT)
        code, out = train.finish(timeout_s=60)
        err = "".join(train.err)
        assert code == 130 and "aborted" in err, (code, err)
        assert "final test accuracy" not in out  # the batch in flight was not finished
        assert not list((run_dir / "checkpoint").glob("ckpt-*.pt"))
        _assert_safe(emu)  # the driver's close still ran on the way out
