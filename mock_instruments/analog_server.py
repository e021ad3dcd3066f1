"""The emulated analog board on a TCP socket, as pyvisa-py reaches a LAN instrument (``TCPIP0::host::port::SOCKET``).

One client at a time (as a raw-socket instrument serves one controller); a new connection replaces the old one,
so a driver that reconnects after a timeout is served at once even if its old socket is half dead. Messages end
with LF; definite-length blocks are cut by their length header (see :class:`protocols.scpi.MessageScanner`).
Commands run on :class:`~mock_instruments.analog_firmware.AnalogFirmware`; an optional FaultInjector corrupts,
drops, delays or truncates replies, closes the link, answers busy or power-cycles the device.

    >>> with AnalogServer(ArrayPhysics(ArrayConfig(sizes=[4, 6, 3]))) as server:
    ...     rm.open_resource(server.resource, read_termination="\\n")
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Any

from mock_instruments.analog_firmware import AnalogFirmware
from protocols.errors import ValueRangeError
from protocols.scpi import MessageScanner, ScpiCommandError

if TYPE_CHECKING:
    from mock_instruments.faults import FaultConfig
    from mock_instruments.physics import ArrayPhysics

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the serving thread looks at the stop flag


class AnalogServer:
    """SCPI server of one emulated board. ``start()`` returns the VISA resource string; ``stop()`` ends it."""

    def __init__(
        self,
        physics: "ArrayPhysics",
        host: str = "127.0.0.1",
        port: int = 0,
        faults: "FaultConfig | None" = None,
        serial: str = "SIM0001",
        step_period_s: float = 1e-6,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueRangeError(f"port {port} outside 0..65535")
        if not step_period_s > 0:
            raise ValueRangeError(f"step_period_s must be > 0 seconds, got {step_period_s!r}")
        self.physics = physics
        self.host = host
        self.port = int(port)
        self.firmware = AnalogFirmware(physics, serial=serial, step_period_s=step_period_s)
        self._injector: Any = None
        if faults is not None and faults.enabled:
            from mock_instruments.faults import FaultInjector

            self._injector = FaultInjector(faults)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards firmware execution against counters readers
        self._net: dict[str, int] = {"connections": 0, "bytes_in": 0, "bytes_out": 0, "busy": 0, "power_cycles": 0}

    # ------------------------------------------------------------------------------------------ lifecycle
    @property
    def resource(self) -> str:
        """The VISA resource string a client opens, e.g. ``TCPIP0::127.0.0.1::5025::SOCKET``."""
        if self._listener is None:
            raise ValueRangeError("server not started: call start() first")
        return f"TCPIP0::{self.host}::{self.port}::SOCKET"

    @property
    def counters(self) -> dict[str, int]:
        """Commands, queries, errors, pulse commands and pulses executed; connections and bytes on the wire."""
        with self._lock:
            out = dict(self.firmware.counters)
        out.update(self._net)
        if self._injector is not None:
            out.update({f"fault_{k}": int(v) for k, v in self._injector.counts.items()})
        return out

    def start(self) -> str:
        """Bind (port 0 picks a free port), serve in a daemon thread, return the resource string."""
        if self._listener is not None:
            return self.resource
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
        except OSError as e:
            listener.close()
            raise ValueRangeError(f"cannot listen on {self.host}:{self.port}: {e}") from e
        listener.listen(4)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=f"analog-server-{self.port}", daemon=True)
        self._thread.start()
        log.info("analog board emulator listening: %s", self.resource)
        return self.resource

    def stop(self) -> None:
        """Stop serving and close every socket; waits for the serving thread (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> "AnalogServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ serving
    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        conn: socket.socket | None = None
        scanner = MessageScanner()
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(_POLL_S):
                    if key.data == "listen":
                        try:
                            new, peer = self._listener.accept()
                        except OSError:
                            continue
                        if conn is not None:  # the newest controller wins (reconnect after a timeout)
                            log.debug("replacing connection with %s", peer)
                            sel.unregister(conn)
                            conn.close()
                        new.setblocking(True)
                        new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        conn, scanner = new, MessageScanner()
                        sel.register(conn, selectors.EVENT_READ, "conn")
                        self._net["connections"] += 1
                    elif conn is not None:
                        if not self._receive(conn, scanner):
                            sel.unregister(conn)
                            conn.close()
                            conn = None
        finally:
            if conn is not None:
                conn.close()
            sel.close()

    def _receive(self, conn: socket.socket, scanner: MessageScanner) -> bool:
        """Read what arrived and answer every complete message; False once the connection is gone."""
        try:
            data = conn.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        self._net["bytes_in"] += len(data)
        for item in scanner.feed(data):
            if isinstance(item, ScpiCommandError):
                with self._lock:
                    self.firmware.push_error(item.code, item.detail)
                continue
            if not self._handle(conn, item):
                return False
        return True

    def _handle(self, conn: socket.socket, message: bytes) -> bool:
        """Run one message with faults applied; False if the connection must be closed."""
        injector = self._injector
        if injector is not None:
            message = injector.on_request(message)
            decision = injector.before_command()
            if decision == "busy":
                self._net["busy"] += 1
                with self._lock:
                    self.firmware.push_error(140, f"{message[:32]!r}")
                return True
            if decision == "power_cycle":
                self._net["power_cycles"] += 1
                with self._lock:
                    self.firmware.power_cycle()
        log.debug("<- %r", message[:200])
        with self._lock:
            reply = self.firmware.execute(message)
        if reply is None:
            return True
        log.debug("-> %r", reply[:200])
        close = False
        if injector is not None:
            plan = injector.on_response(reply)
            if plan.delay_s > 0 and self._stop.wait(plan.delay_s):
                return False
            reply, close = plan.data, plan.close
        if reply:
            try:
                conn.sendall(reply)
            except OSError:
                return False
            self._net["bytes_out"] += len(reply)
        return not close
