"""Serve the emulated FPGA array over a pty pair (a real serial device path) or over TCP (``socket://``).

The transport half of the emulator: it reads bytes, splits them into frames, lets the fault injector spoil
requests and responses, hands frames to :class:`FpgaDevice` and writes the answers back, paced to an optional
link rate. The link rate is what a UART at a given baud rate allows (115200 baud 8N1 = 11520 bytes/s): both
directions are paced, so a large transfer takes as long as it would on the real wire, and ``link_log`` records
when each burst left so tests can check the pacing by counting bytes, not by timing the test.

    with FpgaServer(ArrayPhysics(ArrayConfig([4, 6, 3]))) as server:   # prints nothing; server.resource
        array = FpgaArray(server.resource)                             # "/dev/pts/7" or "socket://127.0.0.1:PORT"

With ``token`` set (``protocols/fpga_serial.md`` section 7.1) every connection must first send AUTH with the
token: any other frame, or a wrong token, is answered UNAUTHORIZED and the connection is closed (on a pty,
which cannot be closed, the frame is only refused), and nothing reaches the device. AUTH is always answered
here, never by the device: without a token any AUTH is accepted.

Over TCP (``fpga_serial.md`` section 7.2) up to ``max_clients`` connections are served at once, each by its own
thread, so none can stall another: a connection must deliver its first valid frame (AUTH when a token is
required) within ``handshake_timeout_s`` or it is closed; a response that the client does not take within
``send_timeout_s`` closes that connection; commands of all connections reach the one device one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
import tty
from typing import Any, Callable

from eqprop_hil.mock_instruments.faults import FaultConfig, FaultInjector
from eqprop_hil.mock_instruments.fpga_device import FpgaDevice
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.auth import check_token, tokens_match
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError
from eqprop_hil.protocols.framing import DELIMITER, Frame, FrameDecodeError, FrameReader, decode_frame, encode_frame

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the serving thread checks for stop()
_PACE_SLICE_S = 0.005  # a paced write releases at most this much link time of bytes at once
MAX_CLIENTS = 8  # TCP connections served at once (fpga_serial.md 7.2)
HANDSHAKE_TIMEOUT_S = 5.0  # a connection's first valid frame (AUTH when a token is required) must come within this
SEND_TIMEOUT_S = 10.0  # a response the client does not take within this closes its connection


class _Session:
    """One connection (or the pty): whether it has given the token, whether it has sent a valid frame yet, and
    its own emulated wire (the link rate paces each connection's bytes)."""

    def __init__(self, authenticated: bool) -> None:
        self.authenticated = authenticated
        self.handshaken = False
        self.rx_free_at = 0.0  # when the emulated wire has delivered the last received byte
        self.tx_free_at = 0.0


class FpgaServer:
    """An emulated FPGA array on a pty or TCP; see the module docstring. Context manager."""

    def __init__(
        self,
        physics: Any,
        transport: str = "pty",
        host: str = "127.0.0.1",
        port: int = 0,
        link_rate_bytes_per_s: float | None = None,
        faults: FaultConfig | None = None,
        cache_depth: int = 16,
        serial: str = "FPGA0001",
        token: str | None = None,
        max_clients: int = MAX_CLIENTS,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        if transport not in ("pty", "tcp"):
            raise ValueRangeError(f"transport {transport!r}: use 'pty' or 'tcp'")
        if link_rate_bytes_per_s is not None and not (
            math.isfinite(link_rate_bytes_per_s) and link_rate_bytes_per_s > 0
        ):
            raise ValueRangeError(f"link rate {link_rate_bytes_per_s!r} bytes/s must be finite and > 0 (or None)")
        if not 1 <= int(max_clients) <= 1024:
            raise ValueRangeError(f"max_clients {max_clients!r} must be in 1..1024")
        for name, value in (("handshake_timeout_s", handshake_timeout_s), ("send_timeout_s", send_timeout_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueRangeError(f"{name} {value!r} must be finite and > 0 seconds")
        self.max_clients = int(max_clients)
        self.handshake_timeout_s = float(handshake_timeout_s)
        self.send_timeout_s = float(send_timeout_s)
        self.token = None if token is None else check_token(token)
        self.physics = physics
        self.transport = transport
        self.host, self.port = host, port
        self.link_rate = link_rate_bytes_per_s
        self.faults = FaultInjector(faults) if faults is not None and faults.enabled else None
        self.device = FpgaDevice(physics, self.faults, cache_depth=cache_depth, serial=serial)
        self.link: dict[str, int] = {"rx_bytes": 0, "tx_bytes": 0, "connections": 0, "closed_by_fault": 0,
                                     "auth_ok": 0, "auth_refused": 0}
        for key in ("refused_full", "idle_closed", "send_timeouts"):  # reported by COUNTERS as link_*
            self.device.counters[key] = 0
        self.link_log: list[tuple[float, int]] = []  # (monotonic seconds, bytes) per paced burst sent
        self.resource = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fds: list[int] = []
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()  # one command at a time through the fault injector and the device
        self._clients: set[threading.Thread] = set()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Open the pty or the listening socket and serve in a daemon thread; returns the resource string."""
        if self._thread is not None:
            return self.resource
        if self.transport == "pty":
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no line discipline: bytes pass unchanged
            os.set_blocking(master, False)
            self._fds = [master, slave]  # the slave stays open here so the master never sees EIO between clients
            self.resource = os.ttyname(slave)
            target: Callable[[], None] = self._serve_pty
        else:
            sock = socket.create_server((self.host, self.port))
            sock.settimeout(_POLL_S)
            self._sock = sock
            self.port = sock.getsockname()[1]
            self.resource = f"socket://{self.host}:{self.port}"
            target = self._serve_tcp
        self._thread = threading.Thread(target=target, name=f"fpga-server {self.resource}", daemon=True)
        self._thread.start()
        log.info("FPGA emulator serving on %s", self.resource)
        return self.resource

    def stop(self) -> None:
        """Stop serving and release the pty or socket. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        for client in list(self._clients):
            client.join(timeout=5.0)
        for fd in self._fds:
            with contextlib.suppress(OSError):  # already closed by the peer side
                os.close(fd)
        self._fds = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "FpgaServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def power_cycle(self) -> None:
        """Power-cycle the device now (as a lab user pulling the plug): states lost, boot counter + 1."""
        self.device.power_cycle()

    @property
    def counters(self) -> dict[str, int]:
        """Device counters (frames, executed, replayed, ...), link byte counts and the boot counter."""
        out = dict(self.device.counters)
        out.update(self.link)
        out["boot"] = self.device.boot
        return out

    # ------------------------------------------------------------------------------------------ transports
    def _serve_pty(self) -> None:
        master = self._fds[0]
        reader = FrameReader()
        session = _Session(self.token is None)  # a pty has no connections: authenticated once, for good
        while not self._stop.is_set():
            ready, _, _ = select.select([master], [], [], _POLL_S)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except BlockingIOError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            self._receive(data, reader, lambda chunk: self._write_fd(master, chunk), close=None, session=session)

    def _write_fd(self, fd: int, data: bytes) -> bool:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:  # write first: a reply nearly always fits the pty's buffer; wait only when it is full
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # full: wait (bounded, to see a stop) until the pty takes more
                select.select([], [fd], [], _POLL_S)
        return not view

    def _serve_tcp(self) -> None:
        sock = self._sock
        while sock is not None and not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self._clients = {t for t in self._clients if t.is_alive()}
            if len(self._clients) >= self.max_clients:  # full: closed at once, without an answer
                self.device.counters["refused_full"] += 1
                conn.close()
                continue
            self.link["connections"] += 1
            thread = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True,
                                      name=f"fpga-client {self.resource}")  # fmt: skip
            self._clients.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        """One client, in its own thread: its stalls (not reading, not writing) are its own."""
        reader = FrameReader()
        closed = threading.Event()
        session = _Session(self.token is None)
        accepted = time.monotonic()

        def send(chunk: bytes) -> bool:
            view = memoryview(chunk)
            deadline = time.monotonic() + self.send_timeout_s
            while view:
                if self._stop.is_set() or closed.is_set():
                    return False
                if time.monotonic() > deadline:  # the client does not read: it loses its connection, nobody else
                    self.device.counters["send_timeouts"] += 1
                    log.warning("FPGA emulator closed a client that did not read a response for %g s",
                                self.send_timeout_s)
                    closed.set()
                    return False
                try:
                    _, ready, _ = select.select([], [conn], [], _POLL_S)
                    if ready:
                        view = view[conn.send(view) :]
                except (BlockingIOError, TimeoutError, socket.timeout):
                    continue
                except OSError:
                    closed.set()
                    return False
            return True

        with conn:
            conn.settimeout(_POLL_S)
            while not self._stop.is_set() and not closed.is_set():
                if not session.handshaken and time.monotonic() - accepted > self.handshake_timeout_s:
                    self.device.counters["idle_closed"] += 1
                    log.warning("FPGA emulator closed a connection that sent no valid frame within %g s",
                                self.handshake_timeout_s)
                    return
                try:
                    data = conn.recv(65536)
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                if not data:
                    return
                self._receive(data, reader, send, close=closed.set, session=session)

    # ------------------------------------------------------------------------------------------ processing
    def _receive(
        self, data: bytes, reader: FrameReader, send: Callable[[bytes], bool], close: Callable[[], None] | None,
        session: "_Session | None" = None,
    ) -> None:
        session = session if session is not None else _Session(True)
        self.link["rx_bytes"] += len(data)
        self._pace_rx(len(data), session)
        for item in reader.feed_raw(data):
            frame: Frame | None = None
            if not isinstance(item, FrameDecodeError):
                with contextlib.suppress(FrameDecodeError):  # a bad frame leaves the connection a stranger
                    frame = decode_frame(item)  # decoded once here, for the gate and the device
                    session.handshaken = True  # a valid frame: the connection is a host, not a stray socket
            gate = self._gate(item, session, frame)
            if gate is not None:  # answered here: an AUTH, or a refusal
                reply, refused = gate
                if reply is not None:
                    self._send(DELIMITER + reply, send, session)
                if refused and close is not None:
                    close()
                    return
                continue
            with self._lock:
                if isinstance(item, FrameDecodeError):
                    reply = self.device.reject(item)
                else:
                    raw = self.faults.on_request(item) if self.faults is not None else item
                    reply = self._dispatch(raw, frame if raw is item else None)
                plan = self.faults.on_response(DELIMITER + reply) if reply is not None and self.faults else None
            if reply is None:
                continue
            wire = DELIMITER + reply
            if plan is None:
                self._send(wire, send, session)
                continue
            if plan.delay_s > 0:
                self._stop.wait(plan.delay_s)
            if plan.close:
                self.link["closed_by_fault"] += 1
                if close is not None:
                    close()
                    return
                continue  # a pty cannot be closed by the device: the response is lost instead
            if plan.data:
                self._send(plan.data, send, session)

    def _gate(self, item: bytes | FrameDecodeError, session: "_Session",
              frame: Frame | None = None) -> tuple[bytes | None, bool] | None:
        """Access control before the device: None lets ``item`` through; else (response or None, refused).
        ``frame``: ``item`` decoded (None if it is not a valid frame)."""
        if frame is not None and frame.opcode == m.Opcode.AUTH:
            try:
                token = m.decode_request(m.Opcode.AUTH, frame.payload)["token"]
            except ProtocolError:
                token = None
            if self.token is None or (token is not None and tokens_match(token, self.token)):
                session.authenticated = True
                self.link["auth_ok"] += 1
                return self._auth_frame(frame.seq, frame.opcode, m.Status.OK, b""), False
            return self._refuse(frame, "wrong or malformed token")
        if session.authenticated:
            return None
        return self._refuse(frame, f"opcode 0x{frame.opcode:02X} before AUTH" if frame else "garbage before AUTH")

    def _refuse(self, frame: Any, why: str) -> tuple[bytes | None, bool]:
        """UNAUTHORIZED (echoing the request's seq and opcode; garbage gets no answer), then close."""
        self.link["auth_refused"] += 1
        log.warning("FPGA emulator refused a client: %s", why)  # never logs a token
        if frame is None:
            return None, True
        body = b"UNAUTHORIZED: send AUTH with the shared token first"
        return self._auth_frame(frame.seq, frame.opcode, m.Status.UNAUTHORIZED, body), True

    def _auth_frame(self, seq: int, opcode: int, status: m.Status, body: bytes) -> bytes:
        payload = m.encode_envelope(status, self.device.boot, body, self.device.instance)
        return encode_frame(seq, (int(opcode) & 0x7F) | m.RESPONSE_BIT, payload)

    def _dispatch(self, raw: bytes, frame: Frame | None = None) -> bytes | None:
        """The device's answer(s) to ``raw``; ``frame``: ``raw`` already decoded (the common case, no fault)."""
        if frame is not None:
            action = self.faults.before_command() if self.faults is not None else "run"
            return self.device.handle(frame, action)
        # A corrupted request may now hold a 0x00: the device's receiver would see two frames.
        replies = []
        for piece in raw.split(DELIMITER):
            if not piece:
                continue
            try:
                frame = decode_frame(piece)
            except FrameDecodeError as e:
                replies.append(self.device.reject(e))
                continue
            action = self.faults.before_command() if self.faults is not None else "run"
            replies.append(self.device.handle(frame, action))
        answered = [r for r in replies if r is not None]
        return DELIMITER.join(answered) if answered else None

    # ------------------------------------------------------------------------------------------ link rate
    def _pace_rx(self, n: int, session: _Session) -> None:
        """Hold processing until ``n`` received bytes would have crossed a wire of the configured rate."""
        if self.link_rate is None:
            return
        now = time.monotonic()
        session.rx_free_at = max(session.rx_free_at, now) + n / self.link_rate
        self._wait_until(session.rx_free_at)

    def _send(self, wire: bytes, send: Callable[[bytes], bool], session: _Session) -> None:
        if self.link_rate is None:
            if send(wire):
                self.link["tx_bytes"] += len(wire)
            return
        slice_bytes = max(1, int(self.link_rate * _PACE_SLICE_S))
        for start in range(0, len(wire), slice_bytes):
            chunk = wire[start : start + slice_bytes]
            # A chunk leaves once the wire has had time to carry it: its bytes arrive at the emulated baud rate.
            session.tx_free_at = max(session.tx_free_at, time.monotonic()) + len(chunk) / self.link_rate
            self._wait_until(session.tx_free_at)
            if not send(chunk):
                return
            self.link["tx_bytes"] += len(chunk)
            self.link_log.append((time.monotonic(), len(chunk)))

    def _wait_until(self, deadline: float) -> None:
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(left)
