"""The emulated analog board on a TCP socket, as pyvisa-py reaches a LAN instrument (``TCPIP0::host::port::SOCKET``).

Several clients at once (``protocols/analog_board.md`` section 1.4): at most ``MAX_CONNECTIONS``, the one idle
longest closed for a newcomer, so a driver that reconnects after a timeout is served even while its old socket
is half dead. Every socket is non-blocking; replies wait in a per-client output buffer, and a client whose
unsent replies exceed ``MAX_OUTPUT_BYTES`` (it sends queries and never reads) is closed, so no client can stall
another. A message not finished ``MESSAGE_TIMEOUT_S`` after its last byte is abandoned with an error (truncated
block, missing LF). Each connection has its own error queue, status registers and integrity mode
(:class:`~eqprop_hil.mock_instruments.analog_session.Session`); the board's state, instance id and duplicate
cache are shared. Commands run on :class:`~eqprop_hil.mock_instruments.analog_firmware.AnalogFirmware`; an
optional FaultInjector corrupts, drops, delays or truncates replies, closes the link, answers busy or
power-cycles the device.

With ``token`` set (section 1.1), a new connection is served only once its first message is
``SYST:AUTH? "<token>"`` (or the set form): anything else, or a wrong token, is answered with
``-203,"Command protected..."`` and the connection is closed, and nothing reaches the firmware; a connection
that stays silent for ``AUTH_TIMEOUT_S`` is closed. Unauthenticated connections never displace authenticated ones.

    >>> with AnalogServer(ArrayPhysics(ArrayConfig(sizes=[4, 6, 3]))) as server:
    ...     rm.open_resource(server.resource, read_termination="\\n")
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from eqprop_hil.mock_instruments.analog_firmware import AnalogFirmware
from eqprop_hil.mock_instruments.analog_session import Session
from eqprop_hil.protocols.auth import AUTH_REFUSED_LINE, check_token, is_auth_header, parse_auth_message, tokens_match
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.scpi import MessageScanner, ScpiCommandError

if TYPE_CHECKING:
    from eqprop_hil.mock_instruments.faults import FaultConfig
    from eqprop_hil.mock_instruments.physics import ArrayPhysics

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the serving thread looks at the stop flag and the timeouts
MAX_CONNECTIONS = 8  # authenticated (or all, without a token) connections served at once (spec 1.4)
MAX_PENDING = 8  # connections waiting to authenticate; the oldest is dropped beyond
AUTH_TIMEOUT_S = 5.0  # an unauthenticated connection is closed this long after it opened
MESSAGE_TIMEOUT_S = 2.0  # an incomplete message is abandoned this long after its last byte (spec 1.3)
MAX_OUTPUT_BYTES = 1 << 20  # unsent replies per connection before it is closed
_TURN = 16  # messages of one client executed before the next client gets its turn (no client stalls another)
_FIRST_MESSAGE_LIMIT = 1024  # bytes an unauthenticated connection may send before its first LF
_AUTH_QUERY = re.compile(rb"^\s*:?SYST(?:EM)?:AUTH(?:ENTICATE)?\?", re.IGNORECASE)


class _Client:
    """One connection: socket, message scanner, session, unsent output, timestamps."""

    def __init__(self, sock: socket.socket, authenticated: bool) -> None:
        self.sock = sock
        self.scanner = MessageScanner()
        self.session = Session()
        self.out = bytearray()
        self.authenticated = authenticated
        self.opened = self.last_rx = self.last_active = time.monotonic()
        self.received = 0
        self.close_after_send = False
        self.writing = False  # registered for EVENT_WRITE too (unsent output waits)
        self.items: deque = deque()  # complete messages (or scanner errors) waiting for their turn


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
        message_timeout_s: float = MESSAGE_TIMEOUT_S,
        auth_timeout_s: float = AUTH_TIMEOUT_S,
    ) -> None:
        if not 0 <= int(port) <= 65535:
            raise ValueRangeError(f"port {port} outside 0..65535")
        if not step_period_s > 0:
            raise ValueRangeError(f"step_period_s must be > 0 seconds, got {step_period_s!r}")
        if not message_timeout_s > 0 or not auth_timeout_s > 0:
            raise ValueRangeError("message_timeout_s and auth_timeout_s must be > 0 seconds")
        self.token = None if token is None else check_token(token)
        self.physics = physics
        self.host = host
        self.port = int(port)
        self.message_timeout_s = float(message_timeout_s)
        self.auth_timeout_s = float(auth_timeout_s)
        self.firmware = AnalogFirmware(physics, serial=serial, step_period_s=step_period_s)
        self._injector: Any = None
        if faults is not None and faults.enabled:
            from eqprop_hil.mock_instruments.faults import FaultInjector

            self._injector = FaultInjector(faults)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards firmware execution against counters readers
        self._clients: dict[socket.socket, _Client] = {}
        self._drop_all = threading.Event()
        self._dropped_last = 0
        self._net: dict[str, int] = {"connections": 0, "bytes_in": 0, "bytes_out": 0, "busy": 0, "power_cycles": 0,
                                     "auth_ok": 0, "auth_refused": 0, "dropped_slow": 0, "dropped_idle": 0,
                                     "dropped_full": 0, "message_timeouts": 0}

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
        out["clients"] = len(self._clients)
        if self._injector is not None:
            out.update({f"fault_{k}": int(v) for k, v in self._injector.counts.items()})
        return out

    @property
    def sessions(self) -> list[Session]:
        """The sessions (error queue, status registers, integrity mode) of the connections served now."""
        return [c.session for c in list(self._clients.values()) if c.authenticated]

    def drop_connections(self) -> int:
        """Close every connection, as a board whose network stack restarted would (the board keeps its state);
        returns how many were closed. Thread-safe: the serving thread closes them on its next turn."""
        self._drop_all.set()
        deadline = time.monotonic() + 2.0
        while self._drop_all.is_set() and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.005)
        return self._dropped_last

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
        listener.listen(16)
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
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                busy = any(c.items for c in self._clients.values())
                for key, events in self._sel.select(0 if busy else _POLL_S):
                    if key.data is None:
                        self._accept()
                        continue
                    client: _Client = key.data
                    if client.sock not in self._clients:
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._flush(client)
                    if events & selectors.EVENT_READ and client.sock in self._clients and not client.items:
                        self._receive(client)  # a client with messages still waiting is not read: back-pressure
                for client in [c for c in self._clients.values() if c.items]:  # round robin, _TURN each
                    batch = [client.items.popleft() for _ in range(min(_TURN, len(client.items)))]
                    self._answer(client, batch)
                self._timeouts()
                if self._drop_all.is_set():
                    self._dropped_last = len(self._clients)
                    for client in list(self._clients.values()):
                        self._drop(client, "dropped on request")
                    self._drop_all.clear()
        finally:
            for sock in list(self._clients):
                self._drop(self._clients[sock], "server stopped")
            self._sel.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, peer = self._listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._net["connections"] += 1
        client = _Client(sock, authenticated=self.token is None)
        if client.authenticated:
            self._make_room()
        else:
            pending = [c for c in self._clients.values() if not c.authenticated]
            if len(pending) >= MAX_PENDING:
                self._drop(min(pending, key=lambda c: c.opened), "too many unauthenticated connections")
        self._clients[sock] = client
        self._sel.register(sock, selectors.EVENT_READ, client)
        log.debug("connection from %s (%d open)", peer, len(self._clients))

    def _make_room(self) -> None:
        """Before one more authenticated connection: close the one idle longest if the board is full."""
        served = [c for c in self._clients.values() if c.authenticated]
        if len(served) >= MAX_CONNECTIONS:
            self._net["dropped_full"] += 1
            self._drop(min(served, key=lambda c: c.last_active), "connection limit reached; idle longest")

    def _drop(self, client: _Client, why: str) -> None:
        if self._clients.pop(client.sock, None) is None:
            return
        log.debug("closing a connection: %s", why)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(client.sock)
        client.sock.close()

    def _timeouts(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if not client.authenticated and now - client.opened > self.auth_timeout_s:
                self._net["dropped_idle"] += 1
                self._drop(client, "did not authenticate in time")
            elif client.items:
                client.last_rx = now  # not read while its messages wait: their silence is the board's doing
            elif client.scanner.pending and now - client.last_rx > self.message_timeout_s:
                self._net["message_timeouts"] += 1
                error = client.scanner.expire()
                if error is not None and client.authenticated:
                    client.items.append(error)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client, "receive failed")
            return
        if not data:
            self._drop(client, "peer closed")
            return
        self._net["bytes_in"] += len(data)
        client.last_rx = client.last_active = time.monotonic()
        client.received += len(data)
        items = client.scanner.feed(data)
        if not client.authenticated:
            items = self._authenticate(client, items)
            if items is None:
                return
        client.items.extend(items)

    def _authenticate(self, client: _Client, items: list) -> list | None:
        """The first message of a connection to a board with a token: the messages after it once the token is
        right; None while incomplete or once refused (the connection is then closing)."""
        if not items:
            if client.received > _FIRST_MESSAGE_LIMIT:  # an AUTH line is short: refuse a long one
                self._refuse(client, b"<over 1 KiB without an end of message>")
            return None
        first, rest = items[0], list(items[1:])
        parsed = None if isinstance(first, ScpiCommandError) else parse_auth_message(first)
        assert self.token is not None
        if parsed is None or not tokens_match(parsed[1], self.token):
            self._refuse(client, first)
            return None
        self._net["auth_ok"] += 1
        log.info("connection authenticated")
        self._make_room()
        client.authenticated = True
        if parsed[0]:
            self._queue(client, b"1\n")
        return rest

    def _refuse(self, client: _Client, first: object) -> None:
        self._net["auth_refused"] += 1
        if isinstance(first, bytes) and is_auth_header(first):
            log.warning("refused a connection that gave a wrong or malformed token")  # never log a guessed token
        else:
            log.warning("refused a connection that sent %r before authenticating",
                        first[:40] if isinstance(first, bytes) else first)
        with contextlib.suppress(OSError):  # the refused peer may already be gone
            client.sock.send(AUTH_REFUSED_LINE + b"\n")
            client.sock.shutdown(socket.SHUT_WR)
        self._drop(client, "refused")

    # ------------------------------------------------------------------------------------------ output
    def _queue(self, client: _Client, data: bytes) -> bool:
        """Append a reply to the client's output and send what the socket takes now; False once it is dropped."""
        client.out += data
        self._flush(client)
        if client.sock not in self._clients:
            return False
        if len(client.out) > MAX_OUTPUT_BYTES:
            self._net["dropped_slow"] += 1
            self._drop(client, f"more than {MAX_OUTPUT_BYTES} bytes of replies unread")
            return False
        return True

    def _flush(self, client: _Client) -> None:
        while client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client, "send failed")
                return
            self._net["bytes_out"] += sent
            del client.out[:sent]
        if client.out:
            if not client.writing:
                self._sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
                client.writing = True
        else:
            if client.close_after_send:
                self._drop(client, "closed by a fault")
                return
            if client.writing:  # only on a change: an epoll_ctl per reply costs a system call for nothing
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.modify(client.sock, selectors.EVENT_READ, client)
                client.writing = False

    # ------------------------------------------------------------------------------------------ messages
    def _answer(self, client: _Client, items: list) -> None:
        """Answer complete messages in order (stops once the client is dropped)."""
        for item in items:
            if client.sock not in self._clients:
                return
            if isinstance(item, ScpiCommandError):
                with self._lock:
                    reply = self.firmware.refuse(item.prefix, item.code, item.detail, client.session)
                if reply:
                    self._queue(client, reply)
                continue
            if is_auth_header(item):  # the server's, not the firmware's: answered with or without a token
                if self.token is None:  # spec 1.1: a board without a token answers any SYST:AUTH? with 1
                    if _AUTH_QUERY.match(item):
                        self._queue(client, b"1\n")
                    continue
                parsed = parse_auth_message(item)
                if parsed is None or not tokens_match(parsed[1], self.token):
                    self._refuse(client, item)
                    return
                if parsed[0]:
                    self._queue(client, b"1\n")
                continue
            self._handle(client, item)

    def _handle(self, client: _Client, message: bytes) -> None:
        """Run one message with faults applied."""
        injector = self._injector
        if injector is not None:
            message = injector.on_request(message)
            decision = injector.before_command()
            if decision == "busy":
                self._net["busy"] += 1
                with self._lock:
                    reply = self.firmware.refuse(message, 140, f"{message[:32]!r}", client.session)
                if reply:
                    self._queue(client, reply)
                return
            if decision == "power_cycle":
                self._net["power_cycles"] += 1
                with self._lock:
                    self.firmware.power_cycle()
        log.debug("<- %r", message[:200])
        with self._lock:
            reply = self.firmware.execute(message, client.session)
        if reply is None:
            return
        log.debug("-> %r", reply[:200])
        if injector is not None:
            plan = injector.on_response(reply)
            if plan.delay_s > 0 and self._stop.wait(plan.delay_s):
                return
            reply = plan.data
            client.close_after_send = client.close_after_send or plan.close
            if plan.close and not reply:
                self._drop(client, "closed by a fault")
                return
        if reply:
            self._queue(client, reply)

