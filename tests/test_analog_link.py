"""The analog link from outside (protocols/analog_board.md section 4): a TCP proxy of the test's own between the
driver and the emulator stalls, delays and duplicates whole messages; an emulator process is killed and
restarted on the same port. Nothing is patched: pyvisa-py, real sockets, real processes.

- a duplicated reply is discarded, never taken for the answer to the next query;
- the project's fault proxy duplicating 10% of the replies: 40 openings all read the right identity and topology;
- a reply stalled past the driver's timeout: the driver reconnects, resends the same bytes and the board answers
  from its duplicate cache; the next query gets its own answer;
- a request stalled in the network and delivered late, after the driver resent it: executed once;
- a restarted emulator (new process, same port) refuses the driver's fenced commands: InstanceChanged, nothing
  trained on the blank board, until the host rebinds.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import InstanceChanged
from eqprop_hil.mock_instruments.analog_server import AnalogServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig


class Proxy:
    """A loopback TCP proxy with one-shot faults on whole messages: ``hold_reply(pattern, s)``,
    ``hold_request(pattern, s)`` (the held bytes are delivered late, on the old connection) and
    ``duplicate_reply(pattern)``. Each accepted client gets its own upstream connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resource = f"TCPIP0::127.0.0.1::{self.port}::SOCKET"
        self.faults: list[tuple[str, bytes, float]] = []  # (kind, pattern, seconds)
        self.fired: list[str] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def hold_reply(self, pattern: bytes, seconds: float) -> None:
        self.faults.append(("hold_reply", pattern, seconds))

    def hold_request(self, pattern: bytes, seconds: float) -> None:
        self.faults.append(("hold_request", pattern, seconds))

    def duplicate_reply(self, pattern: bytes) -> None:
        self.faults.append(("duplicate_reply", pattern, 0.0))

    def _take(self, direction: str, chunk: bytes) -> tuple[str, float] | None:
        with self._lock:
            for i, (kind, pattern, seconds) in enumerate(self.faults):
                if kind.endswith(direction) and pattern in chunk:
                    del self.faults[i]
                    self.fired.append(kind)
                    return kind, seconds
        return None

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for src, dst, direction in ((client, server, "request"), (server, client, "reply")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                fault = self._take(direction, chunk)
                if fault is not None and fault[0].startswith("hold"):
                    time.sleep(fault[1])
                dst.sendall(chunk)
                if fault is not None and fault[0] == "duplicate_reply":
                    dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def ideal_physics() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], device=DeviceConfig(model="ideal")))


@pytest.fixture
def proxied() -> Iterator[tuple[AnalogServer, Proxy]]:
    with AnalogServer(ideal_physics()) as server:
        proxy = Proxy((server.host, server.port))
        yield server, proxy
        proxy.close()


def test_a_duplicated_reply_is_not_taken_for_the_next_answer(proxied) -> None:
    server, proxy = proxied
    with AnalogBoard(proxy.resource, timeout_s=1.0) as board:
        board.set_feedback_gain(1, 0.5)
        proxy.duplicate_reply(b",0,0.5")  # the reply to EDGE:GAIN? 1 arrives twice
        assert board.feedback_gain(1) == 0.5
        assert board.pulse_commands_executed == 0  # not '0.5': the copy is discarded by its tag
        assert board.phase == "HOLD" and proxy.fired == ["duplicate_reply"]
        assert board.stats["stale_replies"] == 1 and board.stats["reconnects"] == 0


def test_a_stalled_reply_then_every_answer_is_the_right_one(proxied) -> None:
    server, proxy = proxied
    with AnalogBoard(proxy.resource, timeout_s=0.3, retries=3) as board:
        before = server.physics.read_weights(0).copy()
        proxy.hold_reply(b",0\n", 1.0)  # the acknowledgement of the pulse command stalls past the timeout
        assert board.apply_pulses(0, np.ones((4, 3), np.int8)) == {"pulses": 12}
        assert proxy.fired == ["hold_reply"] and board.stats["reconnects"] >= 1
        assert server.counters["pulse_commands"] == 1 and server.counters["duplicates"] >= 1  # resent, run once
        np.testing.assert_allclose(server.physics.read_weights(0) - before, 0.001 * server.physics.scale(0), rtol=1e-4)
        board.set_feedback_gain(1, 0.25)
        assert board.feedback_gain(1) == 0.25 and board.pulse_commands_executed == 1 and board.phase == "HOLD"


def test_a_late_copy_of_a_stalled_request_runs_once(proxied) -> None:
    server, proxy = proxied
    with AnalogBoard(proxy.resource, timeout_s=0.3, retries=3) as board:
        proxy.hold_request(b"PULS:MATR", 1.0)  # held in the network; the driver resends, then the copy arrives
        assert board.apply_pulses(0, np.ones((4, 3), np.int8)) == {"pulses": 12}
        deadline = time.monotonic() + 5
        while server.counters["duplicates"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.counters["duplicates"] >= 1 and server.counters["pulse_commands"] == 1
        assert board.pulse_commands_executed == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "eqprop_hil.mock_instruments", "analog", "--port", str(port),
                             "--device", "ideal", "--sizes", "3,4,2", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if line.startswith("TCPIP") or time.monotonic() > deadline:
            break
    return proc


@pytest.mark.slow
def test_a_restarted_emulator_process_is_refused_until_the_host_rebinds() -> None:
    port = _free_port()
    first = _emulator(port)
    second = None
    try:
        board = AnalogBoard(f"TCPIP0::127.0.0.1::{port}::SOCKET", timeout_s=1.0, retries=4)
        bound = board.bound_instance
        board.apply_pulses(0, np.ones((4, 3), np.int8))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = _emulator(port)  # same port, a blank board: another instance id
        with pytest.raises(InstanceChanged) as info:
            board.apply_pulses(0, np.ones((4, 3), np.int8))
        assert info.value.expected == bound and info.value.actual != bound
        assert board.pulse_commands_executed == 0  # nothing was trained on the blank board (non-volatile count 0)
        with pytest.raises(InstanceChanged):
            board.set_phase("FREE")  # still refused: the driver never rebinds by itself
        assert board.bound_instance == bound and board.instance_id() == info.value.actual
        assert board.rebind_instance() == info.value.actual  # the host re-programmed: now it may
        assert board.apply_pulses(0, np.ones((4, 3), np.int8)) == {"pulses": 12}
        board.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_duplicated_replies_never_change_what_the_driver_reads_at_open(tmp_path) -> None:
    """The project's fault proxy, a separate process, duplicates 10% of the replies (seeded) between the driver and
    the emulator: every one of 40 openings reads the right identity, instance and topology (the untagged opening
    reads only bootstrap the tag; spec 4.3), and the faults did reach the driver."""
    physics = ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], activation="tanh", device=DeviceConfig(model="ideal")))
    stats = tmp_path / "proxy.json"
    with AnalogServer(physics) as server:
        with AnalogBoard(f"TCPIP0::{server.host}::{server.port}::SOCKET") as direct:
            expected_identity, expected_topology = direct.identity(), direct.topology()
        assert expected_topology["activation"] == "tanh" and expected_topology["feedback"] == "tied"
        proxy = subprocess.Popen(
            [sys.executable, "-m", "eqprop_hil.mock_instruments.fault_proxy", "--target",
             f"{server.host}:{server.port}", "--framing", "scpi", "--duplicate-reply", "0.1", "--seed", "7",
             "--stats", str(stats)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proxy.stdout is not None
            host, port = proxy.stdout.readline().strip().rsplit(":", 1)
            stale = 0
            for _ in range(40):
                with AnalogBoard(f"TCPIP0::{host}::{port}::SOCKET", timeout_s=2.0, retries=3) as board:
                    assert board.identity() == expected_identity
                    assert board.topology() == expected_topology
                    assert board.bound_instance == expected_identity["instance"]
                    stale += board.stats["stale_replies"] + board.stats["reconnects"]
        finally:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        injected = json.loads(stats.read_text())["injected"]
        assert injected["duplicate_reply"] >= 40 and stale > 0  # the duplicates reached the driver and were seen
