"""The FPGA emulator's TCP service (protocols/fpga_serial.md 7.2) with a token (7.1), through pyserial's socket://
and raw sockets: strangers who connect and say nothing, or never read, do not lock the token holder out; they
lose their own connection after the handshake or send timeout, and the limits are refused when invalid."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest

from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.mock_instruments.fpga_server import FpgaServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.framing import encode_frame

TOKEN = "lab-bench-7"


def _physics() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=[4, 5, 3], device=DeviceConfig(model="ideal"), seed=1))


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send until the peer closes (the device drops a client that does not read)."""
    with contextlib.suppress(OSError):
        sock.sendall(data)


def _address(resource: str) -> tuple[str, int]:
    host, port = resource.removeprefix("socket://").rsplit(":", 1)
    return host, int(port)


@pytest.mark.slow
def test_strangers_do_not_lock_the_token_holder_out() -> None:
    with FpgaServer(_physics(), transport="tcp", token=TOKEN, handshake_timeout_s=1.0, send_timeout_s=1.0) as server:
        address = _address(server.resource)
        silent = [socket.create_connection(address, timeout=10) for _ in range(3)]  # connect, say nothing
        hog = socket.create_connection(address, timeout=10)  # authenticates, then floods and never reads
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sendall(b"\x00" + encode_frame(1, m.Opcode.AUTH, m.encode_request(m.Opcode.AUTH, token=TOKEN)))
        flood = (b"\x00" + encode_frame(2, m.Opcode.DESCRIBE, m.encode_request(m.Opcode.DESCRIBE))) * 20000
        threading.Thread(target=_send_quietly, args=(hog, flood), daemon=True).start()  # megabytes of answers
        try:
            with FpgaArray(server.resource, token=TOKEN, timeout_s=2.0) as array:
                array.set_input(np.array([0.5, 0.25, 0.0, -0.5]))
                array.set_phase("FREE")
                array.settle(5)
                assert array.read_state(0)[0].tolist() == [0.5, 0.25, 0.0, -0.5]
            for sock in silent:  # closed by the device after the handshake timeout, without an answer
                assert sock.recv(1) == b""
            deadline = time.monotonic() + 30
            while server.counters["send_timeouts"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # polling the emulator's counter, not waiting for an outcome
            assert server.counters["idle_closed"] >= 3 and server.counters["send_timeouts"] == 1
        finally:
            for sock in (*silent, hog):
                sock.close()


def test_tcp_limits_are_checked() -> None:
    for bad in ({"max_clients": 0}, {"handshake_timeout_s": float("nan")}, {"send_timeout_s": 0.0}):
        with pytest.raises(ValueRangeError):
            FpgaServer(_physics(), transport="tcp", **bad)
