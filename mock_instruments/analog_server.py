"""The emulated analog board on a TCP socket, as pyvisa-py reaches a LAN instrument (``TCPIP0::host::port::SOCKET``).

One client at a time (as a raw-socket instrument serves one controller); a new connection replaces the old one,
so a driver that reconnects after a timeout is served at once even if its old socket is half dead. Messages end
with LF; definite-length blocks are cut by their length header (see :class:`eqprop_hil.protocols.scpi.MessageScanner`).
Commands run on :class:`~eqprop_hil.mock_instruments.analog_firmware.AnalogFirmware`; an optional FaultInjector corrupts,
drops, delays or truncates replies, closes the link, answers busy or power-cycles the device.

With ``token`` set (``protocols/analog_board.md`` section 1.1), a new connection is served only once its first
message is ``SYST:AUTH? "<token>"`` (or the set form): anything else, or a wrong token, is answered with
``-203,"Command protected..."`` and the connection is closed, and nothing reaches the firmware. An
unauthenticated connection waits beside the current controller instead of replacing it, so a stranger cannot
knock the controller off the link.

    >>> with AnalogServer(ArrayPhysics(ArrayConfig(sizes=[4, 6, 3]))) as server:
    ...     rm.open_resource(server.resource, read_termination="\\n")
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Any

from eqprop_hil.mock_instruments.analog_firmware import AnalogFirmware
from eqprop_hil.protocols.auth import AUTH_REFUSED_LINE, check_token, is_auth_header, parse_auth_message, tokens_match
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.scpi import MessageScanner, ScpiCommandError

if TYPE_CHECKING:
    from eqprop_hil.mock_instruments.faults import FaultConfig
    from eqprop_hil.mock_instruments.physics import ArrayPhysics

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the serving thread looks at the stop flag
_MAX_PENDING = 8  # unauthenticated connections waiting for their first message; the oldest is dropped beyond


class _Pending:
    """A connection that has not given the token yet: its message scanner and the bytes it has sent."""

    def __init__(self) -> None:
        self.scanner = MessageScanner()
        self.received = 0


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
        token: str | None = None,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueRangeError(f"port {port} outside 0..65535")
        if not step_period_s > 0:
            raise ValueRangeError(f"step_period_s must be > 0 seconds, got {step_period_s!r}")
        self.token = None if token is None else check_token(token)
        self.physics = physics
        self.host = host
        self.port = int(port)
        self.firmware = AnalogFirmware(physics, serial=serial, step_period_s=step_period_s)
        self._injector: Any = None
        if faults is not None and faults.enabled:
            from eqprop_hil.mock_instruments.faults import FaultInjector

            self._injector = FaultInjector(faults)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards firmware execution against counters readers
        self._net: dict[str, int] = {"connections": 0, "bytes_in": 0, "bytes_out": 0, "busy": 0, "power_cycles": 0,
                                     "auth_ok": 0, "auth_refused": 0}

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
        pending: dict[socket.socket, _Pending] = {}  # accepted, not yet authenticated (token set)

        def drop(sock: socket.socket) -> None:
            sel.unregister(sock)
            sock.close()

        try:
            while not self._stop.is_set():
                for key, _ in sel.select(_POLL_S):
                    if key.data == "listen":
                        try:
                            new, peer = self._listener.accept()
                        except OSError:
                            continue
                        new.setblocking(True)
                        new.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        self._net["connections"] += 1
                        if self.token is not None:  # served once it has given the token
                            if len(pending) >= _MAX_PENDING:
                                oldest = next(iter(pending))
                                del pending[oldest]
                                drop(oldest)
                            pending[new] = _Pending()
                            sel.register(new, selectors.EVENT_READ, "pending")
                            continue
                        if conn is not None:  # the newest controller wins (reconnect after a timeout)
                            log.debug("replacing connection with %s", peer)
                            drop(conn)
                        conn, scanner = new, MessageScanner()
                        self._new_controller()
                        sel.register(conn, selectors.EVENT_READ, "conn")
                    elif key.data == "pending":
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        rest = self._authenticate(sock, pending[sock])
                        if rest == "pending":
                            continue
                        del pending[sock]
                        if rest is None:
                            drop(sock)
                            continue
                        if conn is not None:
                            drop(conn)
                        sel.modify(sock, selectors.EVENT_READ, "conn")
                        conn, scanner = sock, rest[0]
                        self._new_controller()
                        if not self._answer(conn, rest[1]):
                            drop(conn)
                            conn = None
                    elif conn is not None:
                        if not self._receive(conn, scanner):
                            drop(conn)
                            conn = None
        finally:
            for sock in [*pending, *([conn] if conn is not None else [])]:
                sock.close()
            sel.close()

    def _new_controller(self) -> None:
        """A new controller starts in plain SCPI: the integrity mode (spec section 1.2) belongs to a connection,
        so a plain client is never locked out by the mode its predecessor left on."""
        with self._lock:
            self.firmware.integrity = False

    def _authenticate(self, conn: socket.socket, state: "_Pending") -> Any:
        """Read a pending connection's first message: (scanner, messages after it) if it is the right token,
        None (after sending the -203 refusal) if it is anything else, "pending" while it is incomplete."""
        try:
            data = conn.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        self._net["bytes_in"] += len(data)
        state.received += len(data)
        scanner = state.scanner
        items = scanner.feed(data)
        if not items:  # the first message has not fully arrived yet (an AUTH line is short: refuse a long one)
            if state.received > 1024:
                self._refuse(conn, b"<over 1 KiB without an end of message>")
                return None
            return "pending"
        first, rest = items[0], list(items[1:])
        parsed = None if isinstance(first, ScpiCommandError) else parse_auth_message(first)
        assert self.token is not None
        if parsed is None or not tokens_match(parsed[1], self.token):
            self._refuse(conn, first)
            return None
        self._net["auth_ok"] += 1
        log.info("connection authenticated")
        if parsed[0] and not self._send(conn, b"1\n"):
            return None
        return scanner, rest

    def _refuse(self, conn: socket.socket, first: object) -> None:
        self._net["auth_refused"] += 1
        if isinstance(first, bytes) and is_auth_header(first):
            log.warning("refused a connection that gave a wrong or malformed token")  # never log a guessed token
        else:
            log.warning("refused a connection that sent %r before authenticating",
                        first[:40] if isinstance(first, bytes) else first)
        self._send(conn, AUTH_REFUSED_LINE + b"\n")
        with contextlib.suppress(OSError):  # the refused peer may already be gone
            conn.shutdown(socket.SHUT_WR)

    def _send(self, conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
        except OSError:
            return False
        self._net["bytes_out"] += len(data)
        return True

    def _receive(self, conn: socket.socket, scanner: MessageScanner) -> bool:
        """Read what arrived and answer every complete message; False once the connection is gone."""
        try:
            data = conn.recv(65536)
        except OSError:
            return False
        if not data:
            return False
        self._net["bytes_in"] += len(data)
        return self._answer(conn, scanner.feed(data))

    def _answer(self, conn: socket.socket, items: list) -> bool:
        """Answer complete messages in order; False if the connection must be closed."""
        for item in items:
            if isinstance(item, ScpiCommandError):
                with self._lock:
                    self.firmware.push_error(item.code, item.detail)
                continue
            if is_auth_header(item):  # the server's, not the firmware's: answered with or without a token
                parsed = parse_auth_message(item)
                if parsed is None or (self.token is not None and not tokens_match(parsed[1], self.token)):
                    self._refuse(conn, item)
                    return False
                if parsed[0] and not self._send(conn, b"1\n"):
                    return False
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
