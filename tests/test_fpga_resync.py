"""Link resynchronisation (protocols/fpga_serial.md section 6, issue 9 item 6): after a timeout, a stall, a
duplicated reply or a late reply, the driver never takes a stale response as the answer to the next request.

Over TCP a proxy of the test's own sits between driver and emulator and duplicates every response, or holds
some back past the driver's timeout (the driver retransmits; the late original and the cached answer then both
arrive). Over a pty the emulator's own delay fault does the holding back. Each query asks something whose
answer differs from the previous query's, so a reply paired with the wrong request would show."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.mock_instruments.faults import FaultConfig
from eqprop_hil.mock_instruments.fpga_server import FpgaServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols.framing import DELIMITER, FrameReader

TIMEOUT_S = 0.2
GAINS = [0.125, 0.5, 0.875]


class ReplyProxy:
    """TCP proxy that passes requests through and, per response frame, sends it twice (``duplicate``) or
    sends every ``hold_every``-th response ``hold_s`` late (after the driver gave up on it)."""

    def __init__(self, upstream: str, *, duplicate: bool = False, hold_every: int = 0, hold_s: float = 0.0) -> None:
        host, port = upstream.removeprefix("socket://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.duplicate, self.hold_every, self.hold_s = duplicate, hold_every, hold_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"socket://127.0.0.1:{self.listener.getsockname()[1]}"
        self.responses = self.duplicated = self.held = 0
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        up = socket.create_connection(self.upstream)
        reader = FrameReader()
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(up, selectors.EVENT_READ)
        with client, up:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client:
                        up.sendall(data)
                        continue
                    for frame in reader.feed_raw(data):
                        if isinstance(frame, Exception):
                            continue
                        self._forward(client, DELIMITER + frame + DELIMITER)

    def _forward(self, client: socket.socket, wire: bytes) -> None:
        self.responses += 1
        if self.hold_every and self.responses % self.hold_every == 0:
            self.held += 1
            threading.Timer(self.hold_s, self._send, (client, wire)).start()
            return
        self._send(client, wire)
        if self.duplicate:
            self.duplicated += 1
            self._send(client, wire)

    def _send(self, client: socket.socket, wire: bytes) -> None:
        with self._send_lock:
            with contextlib.suppress(OSError):  # the driver closed the connection
                client.sendall(wire)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=5)


def _physics() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=[4, 6, 3], skips=[(0, 2)], device=DeviceConfig(model="ideal"), seed=5))


def _queries_stay_in_step(array: FpgaArray, server: FpgaServer, rounds: int = 30) -> None:
    """Alternate queries whose answers differ, and pulse commands; every answer must be its own request's."""
    for e, g in enumerate(GAINS):
        array.set_feedback_gain(e, g)
    commands = server.physics.counters["pulse_commands"]
    counts = np.ones((3, 6), dtype=np.int8)
    for k in range(rounds):
        e = k % 3
        assert array.feedback_gain(e) == pytest.approx(GAINS[e])
        assert array.status()["phase"] == "HOLD"
        assert array.read_state(2)[0].shape == (3,)  # a state reply (3 values), not a gain or a status
        assert array.apply_pulses(1, counts)["pulses"] == 18
    assert server.physics.counters["pulse_commands"] - commands == rounds  # each exactly once


@pytest.fixture
def tcp_server() -> Iterator[FpgaServer]:
    with FpgaServer(_physics(), transport="tcp") as server:
        yield server


def test_duplicated_replies_are_dropped_as_stale(tcp_server: FpgaServer) -> None:
    proxy = ReplyProxy(tcp_server.resource, duplicate=True)
    try:
        with FpgaArray(proxy.resource, timeout_s=TIMEOUT_S, retries=3) as array:
            _queries_stay_in_step(array, tcp_server)
            assert proxy.duplicated > 100 and array.stats["stale_frames"] >= proxy.duplicated - 2
            assert array.stats["retransmissions"] == 0
    finally:
        proxy.close()


def test_late_replies_after_a_timeout_are_dropped_as_stale(tcp_server: FpgaServer) -> None:
    proxy = ReplyProxy(tcp_server.resource, hold_every=7, hold_s=TIMEOUT_S * 3)
    try:
        with FpgaArray(proxy.resource, timeout_s=TIMEOUT_S, retries=5) as array:
            _queries_stay_in_step(array, tcp_server)
            # (a loaded machine can fire a timeout late, after the held reply came: not every hold is a timeout)
            assert proxy.held > 5 and array.stats["timeouts"] >= 1 and array.stats["retransmissions"] >= 1
            assert array.stats["stale_frames"] >= 1
            assert tcp_server.counters["replayed"] >= 1  # a retransmitted pulse command answered from the cache
    finally:
        proxy.close()


def test_stalled_replies_over_a_pty_stay_in_step() -> None:
    faults = FaultConfig(seed=3, delay_rate=0.15, delay_s=TIMEOUT_S * 1.5)
    with FpgaServer(_physics(), faults=faults) as server:
        array = FpgaArray(server.resource, timeout_s=TIMEOUT_S, retries=6)
        try:
            _queries_stay_in_step(array, server, rounds=20)
            assert server.faults.counts["delay"] > 3 and array.stats["timeouts"] >= 1
        finally:
            server.device.faults = server.faults = None
            array.close()
