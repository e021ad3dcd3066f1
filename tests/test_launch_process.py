"""``sim://...&process=own``: the emulator in a process of its own, reached through the real transports, stopped
with the array, and gone when the process that started it dies (no orphan keeps a port or a pty)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.mock_instruments.launch import ChildEmulator, open_sim, split_process, start_child
from eqprop_hil.protocols.errors import ValueRangeError

SMALL = "sizes=4,6,3&device=ideal&seed=3"
TOKEN = "lab-5e1d0c7b"


def gone(pid: int, within_s: float = 20.0) -> bool:
    """True once ``pid`` no longer runs (reaped, or a zombie of a parent that is gone itself)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def states(array) -> list[np.ndarray]:
    array.reset()
    array.set_input(np.array([0.5, 0.25, 1.0, 0.0]))
    array.set_phase("FREE")
    array.settle(20)
    return array.read_state()


@pytest.mark.parametrize("kind, extra", [("analog", ""), ("fpga", "&transport=pty"), ("fpga", "&transport=tcp")])
def test_own_process_serves_the_same_physics_and_stops_with_the_array(kind, extra) -> None:
    with open_array(f"sim://{kind}?{SMALL}{extra}") as inline:
        expected = states(inline)
    emulator = open_sim(f"sim://{kind}?{SMALL}{extra}&process=own", token=TOKEN)
    assert isinstance(emulator, ChildEmulator) and emulator.running and emulator.proc.pid != os.getpid()
    try:
        with open_array(emulator.resource, token=TOKEN) as array:
            got = states(array)
        for a, b in zip(expected, got, strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        emulator.stop()
    assert not emulator.running and emulator.proc.returncode == 0
    emulator.stop()  # idempotent


def test_closing_an_array_opened_from_the_url_ends_the_child() -> None:
    before = children()
    with open_array(f"sim://analog?{SMALL}&process=own") as array:
        started = children() - before
        assert len(started) == 1 and array.identity()["model"]
    assert all(gone(pid) for pid in started)


def test_the_child_ends_when_its_parent_is_killed() -> None:
    code = ("import os, sys; from eqprop_hil.mock_instruments.launch import start_child;"
            f"e = start_child('sim://analog?{SMALL}'); print(e.proc.pid, flush=True); sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not gone(child, within_s=0.2)
        parent.send_signal(signal.SIGKILL)  # no clean-up runs: only the pipe's end tells the child
        parent.wait(timeout=10)
        assert gone(child), "the emulator outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("url, needle", [
    (f"sim://analog?{SMALL}&process=fork", "process='fork'"),
    (f"sim://analog?{SMALL}&process=own&process=own", "given twice"),
    ("sim://analog?sizes=4,x&process=own", "sizes"),
])
def test_bad_process_settings_fail_before_anything_starts(url, needle) -> None:
    before = children()
    with pytest.raises(ValueRangeError, match=needle):
        open_sim(url)
    assert children() == before


def test_a_child_that_cannot_start_says_why() -> None:
    """The child's own refusal (here: an unusable token) comes back as the parent's typed error."""
    before = children()
    with pytest.raises(ValueRangeError, match="its own process: ValueRangeError: token must be"):
        start_child(f"sim://analog?{SMALL}", token="bad token with spaces")
    assert children() == before


def test_split_process_keeps_the_rest_of_the_url() -> None:
    url, where = split_process(f"sim://fpga?{SMALL}&process=own&transport=pty")
    assert where == "own" and "process" not in url and "transport=pty" in url and url.startswith("sim://fpga?")
    assert split_process(f"sim://analog?{SMALL}")[1] == "thread"


def children() -> set[int]:
    """Process ids of this process's children that are emulator launchers."""
    out = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().split(")")[-1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"mock_instruments.launch" in cmd and fields[0] != "Z":
            out.add(int(pid))
    return out
