"""Instance fencing (protocols/fpga_serial.md 4.1) from outside: the emulator runs as a separate process
(``python -m eqprop_hil.mock_instruments fpga --port P``), is killed with SIGKILL and started again on the same
port. The driver must refuse to continue (InstanceChanged) and the new process must have executed nothing,
both when the driver sees its connection drop and when a TCP bridge in between hides the restart (the board's
fence check, not the driver's reconnect logic, is what stops it). Also: the driver refuses another protocol
revision (ProtocolVersionError) before anything state-changing is sent."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from eqprop_hil.drivers.errors import InstanceChanged, LinkError, ProtocolVersionError
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.framing import FrameReader, encode_frame

LINE_TIMEOUT_S = 60.0
ARGS = ["--sizes", "4,6,3", "--device", "ideal", "--seed", "3"]


class EmulatorProcess:
    """``python -m eqprop_hil.mock_instruments fpga --port P`` as a child process; SIGKILL and restart it."""

    def __init__(self, port: int = 0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "eqprop_hil.mock_instruments", "fpga", "--port", str(port),
                                      *ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(LINE_TIMEOUT_S):
                self.proc.kill()
                raise AssertionError(f"no resource line; stderr: {self.proc.communicate()[1]}")
        self.resource = self.proc.stdout.readline().strip()
        assert self.resource.startswith("socket://127.0.0.1:"), self.resource
        self.port = int(self.resource.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def counters_of(resource: str) -> dict[str, int]:
    """COUNTERS over a fresh connection (read-only: needs no binding and changes nothing)."""
    sock = socket.create_connection(_address(resource), timeout=10)
    with sock:
        sock.sendall(b"\x00" + encode_frame(7, m.Opcode.COUNTERS, m.encode_request(m.Opcode.COUNTERS)))
        reader = FrameReader()
        while True:
            data = sock.recv(65536)
            assert data, "connection closed before COUNTERS was answered"
            for frame in reader.feed(data):
                if not isinstance(frame, Exception) and frame.seq == 7:
                    return m.decode_response(m.Opcode.COUNTERS, m.split_envelope(frame.payload).body)["counters"]


def _address(resource: str) -> tuple[str, int]:
    host, port = resource.removeprefix("socket://").rsplit(":", 1)
    return host, int(port)


class Bridge:
    """A LAN-serial bridge: one client connection that stays open while the bridge reconnects upstream as often
    as the upstream goes away, so the client never learns of a restart behind it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        while not self._stop.is_set():
            try:
                return socket.create_connection(self.upstream, timeout=1.0)
            except OSError:
                self._stop.wait(0.05)  # the instrument is restarting: wait for it, as a terminal server does
        raise OSError("bridge stopped")

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        up = self._connect()
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(up, selectors.EVENT_READ)
        with client:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    try:
                        data = key.fileobj.recv(65536)
                    except OSError:
                        data = b""
                    if key.fileobj is client:
                        if not data:
                            return
                        try:
                            up.sendall(data)
                        except OSError:
                            pass  # lost with the upstream; the host retransmits
                    elif data:
                        client.sendall(data)
                    else:  # the instrument went away: reconnect behind the client's back
                        sel.unregister(up)
                        up.close()
                        up = self._connect()
                        self.reconnects += 1
                        sel.register(up, selectors.EVENT_READ)
        up.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    proc = EmulatorProcess()
    yield proc
    proc.stop()


def _train_a_little(array: FpgaArray) -> None:
    array.set_input(np.array([0.5, -0.5, 0.25, 1.0]))
    array.set_phase("FREE")
    array.settle(5)
    array.apply_pulses(1, np.full((3, 6), 2, dtype=np.int8))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["direct", "bridge"])
def test_a_restarted_emulator_process_refuses_the_run(emulator: EmulatorProcess, path: str) -> None:
    bridge = Bridge(_address(emulator.resource)) if path == "bridge" else None
    array = FpgaArray(bridge.resource if bridge else emulator.resource, timeout_s=1.0, retries=3)
    restarted = None
    try:
        bound = array.bound_instance
        _train_a_little(array)
        emulator.kill()
        restarted = EmulatorProcess(port=emulator.port)  # same port, fresh power-up
        with pytest.raises(InstanceChanged) as info:
            # The "redo" of a sample after a restart fell on a settle: exactly what used to train a blank board.
            for _ in range(3):
                try:
                    array.set_phase("NUDGE")
                    array.settle(5)
                    array.apply_pulses(1, np.full((3, 6), 2, dtype=np.int8))
                except LinkError:
                    continue  # the connection was lost with the old process: the driver reconnects on the next call
        assert info.value.expected == bound and info.value.actual != bound
        assert info.value.actual == array.instance_id()
        counters = counters_of(restarted.resource)
        physics = {k: v for k, v in counters.items() if k.startswith("physics_")}
        assert physics and not any(physics.values()), physics  # nothing executed: no step, pulse, reset, ...
        assert counters["link_wrong_instance"] >= 1 and counters["boot"] == 1
        with pytest.raises(InstanceChanged):
            array.settle(1)  # and it stays refused: the driver never rebinds by itself
        if bridge is not None:
            assert bridge.reconnects >= 1 and array.stats["reconnects"] == 0  # the driver never saw the restart
    finally:
        array.link.close()  # not close(): leaving HOLD would need a rebind
        if bridge is not None:
            bridge.close()
        if restarted is not None:
            restarted.stop()


class _OldFirmware:
    """A device of protocol version 1 on loopback: answers every frame in a version-1 frame, counts requests."""

    def __init__(self, answer_version: int = 1, status: m.Status = m.Status.OK) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        self.opcodes: list[int] = []
        self.answer_version, self.status = answer_version, status
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with self.listener.accept()[0] as conn:
            reader = FrameReader()
            while data := conn.recv(65536):
                for item in reader.feed(data):
                    self.opcodes.append(item.opcode)
                    envelope = m.ENVELOPE.pack(int(self.status), 1, 0)
                    if self.answer_version == 1:  # a version-1 device: status and boot only, and an empty SYNC body
                        payload = envelope[:3] + bytes([0xFF, 0xFF, 16])
                    else:  # a device of some revision that speaks version-2 frames but refuses our requests
                        payload = envelope + b"protocol version 2 not supported; this device speaks 3"
                    conn.sendall(b"\x00" + encode_frame(item.seq, item.opcode | 0x80, payload, version=self.answer_version))


@pytest.mark.parametrize("answer_version,status", [(1, m.Status.OK), (2, m.Status.BAD_VERSION)])
def test_another_protocol_revision_is_refused_before_anything_changes(answer_version: int, status: m.Status) -> None:
    old = _OldFirmware(answer_version, status)
    with pytest.raises(ProtocolVersionError, match="update the driver or the firmware"):
        FpgaArray(old.resource, timeout_s=1.0, retries=3)
    assert old.opcodes == [m.Opcode.SYNC]  # one read-only SYNC, not retransmitted; nothing state-changing
    old.listener.close()
