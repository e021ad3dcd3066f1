"""Conformance of an analog board to ``protocols/analog_board.md`` (protocol 2), walked section by section.

By default the suite starts the emulator on loopback. Pointed at a board, it runs the same checks over VISA:

    EQPROP_HIL_CONFORMANCE_ANALOG="TCPIP0::192.168.1.20::5025::SOCKET" pytest tests/conformance -k analog

(``EQPROP_HIL_TOKEN`` when the board needs a token). Everything goes through the wire: pyvisa with pyvisa-py,
and plain TCP sockets for the checks about connections (skipped unless the resource is a ``::SOCKET`` one).
Checks that need to power-cycle the board run only against the emulator. The suite changes weights and
settings: run it on a board whose weights may be lost. Every check is counted under its spec section
(``tests/conformance/conftest.py`` prints the counts).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import pyvisa

from eqprop_hil.mock_instruments.analog_server import AnalogServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics
from eqprop_hil.protocols.auth import auth_query, token_or_env
from eqprop_hil.protocols.ieee_block import encode_block, encode_bytes
from eqprop_hil.protocols.scpi_commands import BY_KEY
from eqprop_hil.protocols.scpi_integrity import encode_request
from eqprop_hil.protocols.scpi_tags import StepUpdate, encode_updates, sparse_update, tagged
from tests.conformance.conftest import Checks

ENV = "EQPROP_HIL_CONFORMANCE_ANALOG"
HARDWARE = os.environ.get(ENV) or None
MESSAGE_TIMEOUT_S = 2.0  # spec 1.3
AUTH_TIMEOUT_S = 5.0  # spec 1.4
check = Checks("analog")
emulator_only = pytest.mark.skipif(HARDWARE is not None, reason="needs to power-cycle the board (emulator only)")


@dataclass
class Target:
    resource: str
    server: AnalogServer | None  # None against hardware
    token: str | None

    @property
    def address(self) -> tuple[str, int] | None:
        match = re.match(r"^TCPIP\d*::([^:]+)::(\d+)::SOCKET$", self.resource, re.I)
        return (match.group(1), int(match.group(2))) if match else None


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if HARDWARE:
        yield Target(HARDWARE, None, token_or_env(None))
        return
    physics = ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], skips=[(0, 2)], feedback="untied"))
    with AnalogServer(physics) as server:
        yield Target(server.resource, server, None)


class Wire:
    """One VISA connection that sends raw program messages and reads replies byte-exactly."""

    def __init__(self, target: Target) -> None:
        self.res = pyvisa.ResourceManager("@py").open_resource(
            target.resource, read_termination="\n", write_termination="\n", timeout=4000)
        if target.token:
            assert self.ask(auth_query(target.token).encode()) == b"1"

    def send(self, line: bytes, end: bytes = b"\n") -> None:
        self.res.write_raw(line + end)

    def line(self) -> bytes:
        return bytes(self.res.read_raw()).rstrip(b"\n")

    def ask(self, line: bytes) -> bytes:
        self.send(line)
        return self.line()

    def block(self) -> bytes:
        """A reply that is one definite-length block: its payload (the LF after it consumed)."""
        head = bytes(self.res.read_bytes(2))
        assert head[:1] == b"#", head
        digits = bytes(self.res.read_bytes(int(head[1:2])))
        payload = bytes(self.res.read_bytes(int(digits) + 1))
        assert payload[-1:] == b"\n"
        return payload[:-1]

    def ask_floats(self, line: bytes) -> np.ndarray:
        self.send(line)
        return np.frombuffer(self.block(), "<f4").copy()

    def error(self) -> tuple[int, str]:
        code, message = self.ask(b"SYST:ERR?").decode().split(",", 1)
        return int(code), message

    def tagged_reply(self, tag: bytes) -> tuple[int, bytes]:
        """The reply to a tagged message: (status, body); the body's block is read by its length."""
        head = bytes(self.res.read_bytes(len(tag) + 1))
        assert head == tag + b",", (head, tag)
        out = bytearray()
        while True:
            byte = bytes(self.res.read_bytes(1))
            if byte == b"\n":
                break
            if byte == b"#" and out.endswith(b","):
                n = bytes(self.res.read_bytes(1))
                digits = bytes(self.res.read_bytes(int(n)))
                out += b"#" + n + digits + bytes(self.res.read_bytes(int(digits)))
                continue
            out += byte
        status, _, body = bytes(out).partition(b",")
        return int(status), body

    def close(self) -> None:
        self.res.close()


@pytest.fixture
def wire(target: Target) -> Iterator[Wire]:
    w = Wire(target)
    w.send(b"*CLS")
    yield w
    w.close()


@dataclass
class Board:
    sizes: list[int]
    edges: list[tuple[int, int]]
    untied: bool
    dac: tuple[float, float]
    adc: tuple[float, float]

    def shape(self, edge: int, feedback: bool = False) -> tuple[int, int]:
        src, dst = self.edges[edge]
        return (self.sizes[src], self.sizes[dst]) if feedback else (self.sizes[dst], self.sizes[src])

    @property
    def feedback_edge(self) -> int | None:
        return next((e for e, (src, _) in enumerate(self.edges) if src > 0), None) if self.untied else None


@pytest.fixture(scope="module")
def board(target: Target) -> Board:
    w = Wire(target)
    try:
        sizes = [int(v) for v in w.ask(b"TOP:SIZ?").split(b",")]
        flat = [int(v) for v in w.ask(b"TOP:EDG?").split(b",")]
        untied = w.ask(b"TOP:FEED?") == b"UNTIED"
        dac = tuple(float(v) for v in w.ask(b"CONV:DAC?").split(b",")[1:])
        adc = tuple(float(v) for v in w.ask(b"CONV:ADC?").split(b",")[1:])
    finally:
        w.close()
    return Board(sizes, list(zip(flat[::2], flat[1::2])), untied, dac, adc)  # type: ignore[arg-type]


def f32(*values: float) -> bytes:
    return encode_block(np.array(values, np.float32))


def new_tag(w: Wire, *, instance: str | None = None) -> tuple[str, int]:
    """The board's instance and the next request id (spec 4.2: newest accepted + 1)."""
    inst = w.ask(b"SYST:INST?").decode().strip('"')
    return instance or inst, (int(w.ask(b"SYST:REQ:LAST?")) + 1) % (1 << 32)


def raw_socket(target: Target) -> socket.socket:
    if target.address is None:
        pytest.skip("needs a TCPIP ::SOCKET resource for raw connections")
    sock = socket.create_connection(target.address, timeout=4.0)
    if target.token:
        sock.sendall(auth_query(target.token).encode() + b"\n")
        assert sock.recv(8) == b"1\n"
    return sock


_PENDING: dict[int, bytes] = {}  # bytes received past the last line, per socket


def recv_line(sock: socket.socket) -> bytes:
    """One reply line from a raw socket (replies without blocks), keeping what follows for the next call."""
    data = _PENDING.pop(sock.fileno(), b"")
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
    line, _, rest = data.partition(b"\n")
    if rest:
        _PENDING[sock.fileno()] = rest
    return line


# ------------------------------------------------------------------------------------------------ section 1
def test_1_transport_and_syntax(wire: Wire, board: Board) -> None:
    check("1", wire.ask(b"*OPC?") == b"1", "a query is answered with its reply and LF")
    wire.send(b"*OPC?", end=b"\r\n")
    check("1", wire.line() == b"1", "a CR before the LF is ignored")
    wire.send(b"*OPC?;*IDN?")
    check("1", wire.error()[0] == -102, "compound messages are refused with -102")
    for header in (b"SYST:ERR:COUN?", b"system:error:count?", b":SYSTem:ERRor:COUNt?", b"syst:err:coun?"):
        check("1", wire.ask(header) == b"0", f"header form {header!r} accepted")
    volts = np.zeros(board.sizes[0], np.float32)
    volts[0] = np.frombuffer(b"\x0a\x00\x00\x00", "<f4")[0]  # a value whose bytes hold 0x0A
    wire.send(b"INP " + encode_block(volts))
    check("1", wire.ask_floats(b"INP?").tobytes() == volts.tobytes(), "a block is cut by its length, not by LF")
    check("1", wire.error()[0] == 0, "no error after the block holding LF")
    wire.send(b"INP #0" + volts.tobytes())
    check("1", wire.error()[0] == -160, "an indefinite block (#0) is refused with -160")


def test_1_1_a_board_without_a_token_answers_any_authentication(target: Target, wire: Wire) -> None:
    if target.token:
        pytest.skip("the board has a token")
    for line in (b'SYST:AUTH? "anything"', b"SYST:AUTH? garbage", b"SYSTem:AUTHenticate?"):
        check("1.1", wire.ask(line) == b"1", f"{line!r} answered 1 by a board without a token")
    check("1.1", wire.error()[0] == 0, "no error queued by authentication")


def test_1_1_strangers_are_refused_on_a_board_with_a_token(target: Target) -> None:
    if HARDWARE and not target.token:
        pytest.skip("the board has no token")
    if HARDWARE:
        tgt = target
    else:
        server = AnalogServer(ArrayPhysics(ArrayConfig(sizes=[3, 4, 2])), token="s3cret-token").__enter__()
        tgt = Target(server.resource, server, "s3cret-token")
    try:
        sock = socket.create_connection(tgt.address, timeout=4.0)  # type: ignore[arg-type]
        sock.sendall(b"*IDN?\n")
        check("1.1", recv_line(sock).startswith(b"-203,"), "anything before the token is refused with -203")
        check("1.1", sock.recv(16) == b"", "and the connection is closed")
        sock.close()
        sock = socket.create_connection(tgt.address, timeout=4.0)  # type: ignore[arg-type]
        sock.sendall(b'SYST:AUTH? "wrong-token"\n')
        check("1.1", recv_line(sock).startswith(b"-203,"), "a wrong token is refused")
        sock.close()
        sock = raw_socket(tgt)  # authenticates
        sock.sendall(b"*OPC?\n")
        check("1.1", recv_line(sock) == b"1", "after the token the board is served")
        sock.close()
    finally:
        if not HARDWARE:
            server.__exit__(None, None, None)


def test_1_2_integrity(wire: Wire) -> None:
    check("1.2", wire.ask(b"SYST:INT?") == b"0", "integrity is off on a new connection")
    wire.send(encode_request(b"*OPC?"))
    check("1.2", wire.line() == b"#H83DCEFB7,1", "golden vector: *OPC? #H8FAA9798 -> #H83DCEFB7,1")
    before = wire.ask(b"EDGE:GAIN? 0")
    wire.send(b"EDGE:GAIN 0,0.4,#H769EA3A6")  # the CRC of "EDGE:GAIN 0,0.5"
    check("1.2", wire.error()[0] == 120, "a wrong CRC is refused with 120")
    check("1.2", wire.ask(b"EDGE:GAIN? 0") == before, "and nothing ran")


def test_1_3_numbers_whitespace_and_suffixes(wire: Wire) -> None:
    for text, value in ((b"0.5", b"0.5"), (b"5E-1", b"0.5"), (b".25", b"0.25"), (b"+1", b"1.0"), (b"1e0", b"1.0"),
                        (b"0.000125", b"0.000125"), (b"3.", b"1.0")):
        if text == b"3.":  # NR2 with a trailing point: 3 is out of range, so check acceptance on SETT:TIME
            wire.send(b"SETT:TIME 3.E-6")
            check("1.3", wire.error()[0] == 0, "NR2/NR3 with a trailing point accepted")
            continue
        wire.send(b"EDGE:GAIN 0," + text)
        check("1.3", wire.ask(b"EDGE:GAIN? 0") == value, f"{text!r} accepted and printed as {value!r}")
    wire.send(b"SETT 2.0")
    check("1.3", wire.error()[0] == -120, "an integer parameter refuses NR2 with -120")
    for bad in (b"NaN", b"nan", b"INF", b"-Inf", b"infinity", b"1e999"):
        wire.send(b"EDGE:GAIN 0," + bad)
        check("1.3", wire.error()[0] == -120, f"{bad!r} is refused with -120")
    wire.send(b"SETT inf")
    check("1.3", wire.error()[0] == -120, "INF where an integer is expected: -120")
    for bad in (b"EDGE:GAIN 0,0.5V", b"SETT 10ms", b"SETT:TIME 1e-3s"):
        wire.send(bad)
        check("1.3", wire.error()[0] == -138, f"unit suffix refused with -138: {bad!r}")
    wire.send(b" \t EDGE:GAIN \t 0 , \t0.75 \t")
    check("1.3", wire.error()[0] == 0 and wire.ask(b"EDGE:GAIN? 0") == b"0.75", "whitespace rules")
    wire.send(b'EDGE:GAIN 0,"0.5"')
    check("1.3", wire.error()[0] == -104, "a string where none is allowed: -104")
    period = wire.ask(b"SETT:PER?")
    check("1.3", period == repr(float(period)).encode(), "floats printed as the shortest round-trip decimal")
    wire.send(b"NUDG:COMP 5e-5")
    check("1.3", wire.ask(b"NUDG:COMP?") == b"5e-05", "exponent form with a sign and two digits")
    wire.send(b"EDGE:GAIN 0,1")


def test_1_3_refused_block_bytes_are_never_executed(wire: Wire, board: Board) -> None:
    wire.send(b"EDGE:GAIN 0,0.5")
    count = wire.ask(b"PULS:COUN?")
    n = board.shape(0)[0] * board.shape(0)[1]
    payload = b"\nEDGE:GAIN 0,0.25\nPULS:MATR 0," + encode_block(np.ones(n, np.int8), "b") + b"\n*RST\n"
    wire.send(b"PULS:MATR 0,#820000000" + payload, end=b"")  # declares 20 MB: refused, its bytes discarded
    time.sleep(MESSAGE_TIMEOUT_S + 0.6)  # the rest never comes: the message timeout ends the discard
    check("1.3", wire.error()[0] == -223, "a block over 16 MiB is refused with -223")
    check("1.3", wire.ask(b"EDGE:GAIN? 0") == b"0.5", "a command inside the refused block did not run")
    check("1.3", wire.ask(b"PULS:COUN?") == count, "a pulse matrix inside the refused block did not run")
    wire.send(b"EDGE:GAIN 0,1")


def test_1_3_message_timeout(target: Target, board: Board) -> None:
    """Three connections, one wait: a truncated block, a block without LF (PyMeasure's default), a text line
    without LF; each abandoned with its error after the message timeout, none executed."""
    wires = [Wire(target) for _ in range(3)]
    try:
        before = wires[0].ask_floats(b"INP?")
        gain = wires[0].ask(b"EDGE:GAIN? 0")
        volts = encode_block(np.full(board.sizes[0], 0.125, np.float32))
        wires[0].send(b"INP " + volts[:-2], end=b"")
        wires[1].send(b"INP " + volts, end=b"")
        wires[2].send(b"EDGE:GAIN 0,0.625", end=b"")
        time.sleep(MESSAGE_TIMEOUT_S + 0.6)
        code, message = wires[0].error()
        check("1.3", code == -160 and "truncated" in message, f"truncated block: {code} {message}")
        code, message = wires[1].error()
        check("1.3", code == -160 and "LF" in message, f"block without LF: {code} {message}")
        check("1.3", wires[2].error()[0] == -102, "text without LF: -102")
        check("1.3", wires[0].ask_floats(b"INP?").tobytes() == before.tobytes(), "no incomplete INP ran")
        check("1.3", wires[2].ask(b"EDGE:GAIN? 0") == gain, "the unterminated gain did not run")
        check("1.3", wires[1].ask(b"*OPC?") == b"1", "the next message is served normally")
    finally:
        for w in wires:
            w.close()


def test_1_3_input_buffer_overrun(wire: Wire) -> None:
    wire.send(b"EDGE:GAIN 0," + b"1" * 70000)
    check("1.3", wire.error()[0] == -363, "more than 65536 bytes of text: -363")
    check("1.3", wire.ask(b"*OPC?") == b"1", "discarded to the next LF")


def test_1_4_error_queues_are_per_connection(target: Target) -> None:
    a, b = Wire(target), Wire(target)
    try:
        a.send(b"PHAS RUN")
        check("1.4", b.error()[0] == 0, "another connection does not see this one's errors")
        check("1.4", a.error()[0] == -141, "the connection that erred sees its error")
        c = Wire(target)
        check("1.4", c.ask(b"SYST:ERR:COUN?") == b"0" and c.ask(b"SYST:INT?") == b"0", "a new connection starts empty")
        c.close()
    finally:
        a.close()
        b.close()


def test_1_4_eight_connections_then_the_idlest_is_closed(target: Target) -> None:
    socks = []
    try:
        for _ in range(8):
            socks.append(raw_socket(target))
            socks[-1].sendall(b"*OPC?\n")
            assert recv_line(socks[-1]) == b"1"
            time.sleep(0.01)
        for s in socks[1:]:  # activity: the first stays the idlest
            s.sendall(b"*OPC?\n")
            assert recv_line(s) == b"1"
        ninth = raw_socket(target)
        socks.append(ninth)
        ninth.sendall(b"*OPC?\n")
        check("1.4", recv_line(ninth) == b"1", "a 9th connection is served")
        socks[0].settimeout(3.0)
        try:
            closed = socks[0].recv(16) == b""
        except OSError:
            closed = True
        check("1.4", closed, "the connection idle longest was closed")
        socks[1].sendall(b"*OPC?\n")
        check("1.4", recv_line(socks[1]) == b"1", "the others are still served")
    finally:
        for s in socks:
            s.close()


def test_1_4_a_client_that_never_reads_does_not_stall_others(target: Target) -> None:
    greedy = raw_socket(target)
    other = raw_socket(target)
    try:
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood = b"SYST:DESC?\n" * 400
        deadline = time.monotonic() + 20
        answers, worst = [], 0.0
        greedy.settimeout(0.5)
        while time.monotonic() < deadline and len(answers) < 60:
            try:
                greedy.sendall(flood)
            except OSError:
                break  # the board closed it
            other.sendall(b"*OPC?\n")
            started = time.monotonic()
            answers.append(recv_line(other))
            worst = max(worst, time.monotonic() - started)
        check("1.4", answers and set(answers) == {b"1"}, f"the other client is answered ({len(answers)} queries)")
        check("1.4", worst < 3.0, f"within the other's timeout (slowest {worst:.2f} s)")
        greedy.settimeout(3.0)
        try:
            while greedy.recv(1 << 20):
                pass
            closed = True
        except OSError:
            closed = True
        check("1.4", closed, "the client with over 1 MiB of unread replies was closed")
    finally:
        greedy.close()
        other.close()


@pytest.mark.slow
def test_1_4_unauthenticated_idle_timeout(target: Target) -> None:
    if HARDWARE and not target.token:
        pytest.skip("the board has no token")
    server = None
    if not HARDWARE:
        server = AnalogServer(ArrayPhysics(ArrayConfig(sizes=[3, 4, 2])), token="s3cret-token").__enter__()
        address = ("127.0.0.1", server.port)
    else:
        address = target.address  # type: ignore[assignment]
    try:
        sock = socket.create_connection(address, timeout=AUTH_TIMEOUT_S + 3)
        started = time.monotonic()
        try:
            data = sock.recv(16)
        except OSError:
            data = b""
        waited = time.monotonic() - started
        check("1.4", data == b"" and AUTH_TIMEOUT_S - 0.5 <= waited <= AUTH_TIMEOUT_S + 2.5,
              f"a silent unauthenticated connection is closed after {AUTH_TIMEOUT_S} s (took {waited:.1f} s)")
        sock.close()
    finally:
        if server is not None:
            server.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------ section 2
def test_2_error_queue(wire: Wire) -> None:
    wire.send(b"PHAS RUN")
    wire.send(b"FOO")
    check("2", wire.ask(b"SYST:ERR:COUN?") == b"2", "two entries queued")
    check("2", wire.ask(b"*STB?") == b"4", "STB bit 2: queue not empty")
    check("2", wire.error()[0] == -141 and wire.error()[0] == -113, "FIFO order")
    check("2", wire.ask(b"SYST:ERR?") == b'0,"No error"', "0,\"No error\" when empty")
    for _ in range(40):
        wire.send(b"FOO")
    entries = [wire.ask(b"SYST:ERR?") for _ in range(32)]
    check("2", entries[-1] == b'-350,"Queue overflow"' and entries[0].startswith(b"-113,"), "32 entries, -350 last")
    check("2", int(wire.ask(b"*ESR?")) & 0x20 != 0, "command errors set ESR bit 5")
    wire.send(b"EDGE:GAIN? 99")  # a failing query: no reply
    check("2", wire.error()[0] == -222, "a failing query answers nothing and queues its error")
    gain = wire.ask(b"EDGE:GAIN? 0")
    wire.send(b"EDGE:GAIN 0,2")
    code, message = wire.error()
    check("2", code == -222 and message.startswith('"Data out of range;'), "standard text ; detail")
    check("2", wire.ask(b"EDGE:GAIN? 0") == gain, "a refused command changes nothing")


# ------------------------------------------------------------------------------------------------ section 3
def test_3_every_command_on_the_wire(wire: Wire, board: Board) -> None:
    n0, nout = board.sizes[0], board.sizes[-1]
    rows, cols = board.shape(0)
    x = f32(*[board.dac[1] / 2] * n0)
    comp = float(wire.ask(b"NUDG:COMP?"))
    e = len(board.edges)
    fb = board.feedback_edge
    sets = [b"*CLS", b"*ESE 0", b"*OPC", b"*RST", b"SYST:INT OFF", b"INP " + x, b"PHAS FREE",
            b"NUDG:COMP " + repr(comp).encode(), b"NUDG:CURR " + f32(*[comp / 4] * nout),
            b"NUDG:TARG 0.25," + f32(*[board.adc[1] / 2] * nout), b"NUDG:OFF", b"EDGE:GAIN 0,1", b"EDGE:SCAL 0,1",
            b"SETT 3", b"SETT:TIME 2e-6", b"PULS:MATR 0," + encode_block(np.zeros(rows * cols, np.int8), "b"),
            b"PULS:OUT 0,1," + f32(*[0.0] * (rows + cols)), b"LEAR:ETA " + b",".join([b"0"] * e),
            b"LEAR:BETA 0.5", b"LEAR OFF"]
    queries = [b"*IDN?", b"*OPC?", b"*ESR?", b"*ESE?", b"*STB?", b"SYST:ERR?", b"SYST:ERR:COUN?", b"SYST:VERS?",
               b"SYST:PROT?", b"SYST:INST?", b"SYST:REQ:LAST?", b"SYST:BOOT?", b"SYST:INT?", b"TOP:SIZ?",
               b"TOP:EDG?", b"TOP:FEED?", b"TOP:ACT?", b"DEV:MOD?", b"CONV:DAC?", b"CONV:ADC?", b"PHAS?",
               b"NUDG:COMP?", b"NUDG:BETA?", b"NUDG:MODE?", b"EDGE:GAIN? 0", b"EDGE:SCAL? 0", b"SETT:PER?",
               b"SETT:COUN?", b"PULS:LAST?", b"PULS:TOT?", b"PULS:COUN?", b"LEAR?", b"LEAR:ETA?", b"LEAR:BETA?",
               b"WEIG:RES?"]
    blocks = [b"INP?", b"NUDG:CURR?", b"NUDG:TARG?", b"STAT?", b"STAT? 1", b"WEIG? 0", b"SYST:DESC?",
              b"INF? 3," + x, b"LEAR:SAMP? 0.5,3,2," + f32(*[board.dac[1] / 2] * n0, *[board.adc[1] / 2] * nout)]
    if fb is not None:
        s, d = board.shape(fb, True)
        sets += [b"EDGE:SCAL:FEED %d,1" % fb, b"PULS:MATR:FEED %d," % fb + encode_block(np.zeros(s * d, np.int8), "b"),
                 b"PULS:OUT:FEED %d,1," % fb + f32(*[0.0] * (s + d))]
        queries += [b"EDGE:SCAL:FEED? %d" % fb]
        blocks += [b"WEIG:FEED? %d" % fb]
    weights = wire.ask_floats(b"WEIG? 0") / 2  # half of what it holds: inside any device's programmable range
    sets += [b"WEIG:PROG 0,0.01,5," + f32(*weights)]
    if fb is not None:
        sets += [b"WEIG:PROG:FEED %d,0.01,5," % fb + f32(*wire.ask_floats(b"WEIG:FEED? %d" % fb) / 2)]
    seen = set()
    for line in sets:
        wire.send(line)
        code, message = wire.error()
        check("3", code == 0, f"{line[:30]!r} runs without error ({code} {message})")
        seen.add(line.split(b" ")[0].upper())
    for line in queries:
        reply = wire.ask(line)
        check("3", reply != b"" and not reply.startswith(b"#"), f"{line!r} answers text: {reply!r}")
        seen.add(line.split(b" ")[0].upper())
    for line in blocks:
        wire.send(line)
        check("3", len(wire.block()) > 0, f"{line[:30]!r} answers a block")
        seen.add(line.split(b" ")[0].upper())
    wire.send(b"STEP? 1,#10")
    pulses, _, rest = wire.res.read_raw().rstrip(b"\n").partition(b",")
    check("3", pulses == b"0" and rest.startswith(b"#"), "STEP? with no updates answers 0 and the states")
    seen.add(b"STEP?")
    keys = {k for k in BY_KEY if not k.endswith(":FEED") and not k.endswith(":FEED?")} if fb is None else set(BY_KEY)
    check("3", len(seen) >= len(keys), f"every command of the table was sent ({len(seen)} of {len(keys)})")
    check("3", wire.error()[0] == 0, "nothing left in the queue")


def test_3_3_nudge_beta_is_zero_outside_target_mode(wire: Wire, board: Board) -> None:
    nout = board.sizes[-1]
    wire.send(b"NUDG:TARG 0.25," + f32(*[0.0] * nout))
    check("3.3", wire.ask(b"NUDG:BETA?") == b"0.25", "target mode reports its beta")
    wire.send(b"NUDG:CURR " + f32(*[0.0] * nout))
    check("3.3", wire.ask(b"NUDG:MODE?") == b"CURRENT" and wire.ask(b"NUDG:BETA?") == b"0.0",
          "after switching to current mode NUDG:BETA? is 0")
    wire.send(b"NUDG:TARG 0.5," + f32(*[0.0] * nout))
    wire.send(b"NUDG:OFF")
    check("3.3", wire.ask(b"NUDG:BETA?") == b"0.0", "and 0 when off")


def test_3_5_pulse_commands_are_counted(wire: Wire, board: Board) -> None:
    rows, cols = board.shape(0)
    count, total = int(wire.ask(b"PULS:COUN?")), int(wire.ask(b"PULS:TOT?"))
    wire.send(b"PULS:MATR 0," + encode_block(np.ones(rows * cols, np.int8), "b"))
    check("3.5", int(wire.ask(b"PULS:COUN?")) == count + 1, "PULS:MATR adds 1 to PULS:COUN?")
    check("3.5", int(wire.ask(b"PULS:LAST?")) == rows * cols, "PULS:LAST? is its pulses")
    check("3.5", int(wire.ask(b"PULS:TOT?")) == total + rows * cols, "PULS:TOT? grows by them")
    wire.send(b"PULS:MATR 0," + encode_block(-np.ones(rows * cols, np.int8), "b"))


def test_3_6_a_local_learning_sample_is_a_pulse_command(wire: Wire, board: Board) -> None:
    n0, nout = board.sizes[0], board.sizes[-1]
    wire.send(b"LEAR:ETA " + b",".join([b"0.05"] * len(board.edges)))
    count, total = int(wire.ask(b"PULS:COUN?")), int(wire.ask(b"PULS:TOT?"))
    data = f32(*[board.dac[1] / 2] * n0, *[board.adc[1] / 2] * nout)
    wire.send(b"LEAR:SAMP? 0.5,10,5," + data)
    check("3.6", len(wire.block()) == 4 * nout, "LEAR:SAMP? answers the free-phase output")
    check("3.6", int(wire.ask(b"PULS:COUN?")) == count + 1, "LEAR:SAMP? adds 1 to PULS:COUN?")
    check("3.6", int(wire.ask(b"PULS:TOT?")) > total, "and its rule's pulses to PULS:TOT?")
    check("3.6", int(wire.ask(b"PULS:LAST?")) == int(wire.ask(b"PULS:TOT?")) - total, "PULS:LAST? is its pulses")
    wire.send(b"LEAR:ETA " + b",".join([b"0"] * len(board.edges)))


def test_3_8_compound_step(wire: Wire, board: Board) -> None:
    rows, cols = board.shape(0)
    counts = np.zeros((rows, cols), np.int8)
    counts[0, 0], counts[-1, -1] = 2, -1
    r1, c1 = board.shape(1)
    outer = StepUpdate(1, bit_length=4, vectors=np.full(r1 + c1, 0.5, np.float32))
    count, weights = int(wire.ask(b"PULS:COUN?")), wire.ask_floats(b"WEIG? 0")
    wire.send(b"PHAS HOLD")
    wire.send(b"STEP? 2," + encode_bytes(encode_updates([sparse_update(0, counts), outer])))
    pulses, _, block = wire.res.read_raw().rstrip(b"\n").partition(b",")
    check("3.8", int(pulses) >= 3 and block.startswith(b"#"), "STEP? answers its pulses and a block")
    check("3.8", int(wire.ask(b"PULS:COUN?")) == count + 1, "STEP? is one pulse command")
    check("3.8", int(wire.ask(b"PULS:LAST?")) == int(pulses), "PULS:LAST? is the step's pulses")
    moved = wire.ask_floats(b"WEIG? 0") - weights
    check("3.8", moved[0] > 0 and moved[-1] < 0 and np.all(moved[1:-1] == 0), "only the sparse entries moved")
    before = wire.ask_floats(b"WEIG? 0")
    bad = encode_updates([sparse_update(0, counts), StepUpdate(99, indices=np.array([0], np.uint32),
                                                                counts=np.array([1], np.int8))])
    wire.send(b"STEP? 1," + encode_bytes(bad))
    check("3.8", wire.error()[0] == -222, "an edge out of range refuses the whole step with -222")
    check("3.8", np.array_equal(wire.ask_floats(b"WEIG? 0"), before), "all or none: the good record did not run")
    check("3.8", int(wire.ask(b"PULS:COUN?")) == count + 1, "a refused step is not counted")
    for payload, code in ((b"\x01\x00\x00\x00\x02\x00\x00\x00\x00", -161), (b"\x09" + bytes(7), -161),
                          (encode_updates([sparse_update(0, counts), sparse_update(0, counts)]), -222),
                          (encode_updates([StepUpdate(1, bit_length=4, vectors=np.zeros(3, np.float32))]), 101)):
        wire.send(b"STEP? 1," + encode_bytes(payload))
        check("3.8", wire.error()[0] == code, f"malformed updates block refused with {code}")
    wire.send(b"PULS:MATR 0," + encode_block(-counts.ravel(), "b"))


# ------------------------------------------------------------------------------------------------ section 4
def test_4_1_version_and_identity(target: Target, wire: Wire) -> None:
    check("4.1", wire.ask(b"SYST:PROT?") == b"2", "protocol revision 2")
    instance = wire.ask(b"SYST:INST?")
    check("4.1", re.fullmatch(rb'"[0-9a-f]{16}"', instance) is not None, "instance: 16 lower-case hex digits")
    check("4.1", wire.ask(b"SYST:INST?") == instance, "stable while powered")
    wire.send(b"SYST:PROT?")
    wire.send(b"*IDN?")
    check("4.1", wire.line() == b"2" and wire.line().count(b",") == 3, "SYST:PROT? then *IDN?: two answers")
    wire.send(b"SYST:DESC?")
    check("4.1", instance.strip(b'"').decode() in wire.block().decode(), "SYST:DESC? repeats the instance")


@emulator_only
def test_4_1_a_power_cycle_draws_a_new_instance(target: Target, wire: Wire) -> None:
    assert target.server is not None
    seen = {wire.ask(b"SYST:INST?")}
    for _ in range(3):
        target.server.firmware.power_cycle()
        seen.add(wire.ask(b"SYST:INST?"))
    check("4.1", len(seen) == 4, "every power-up draws another instance id")
    check("4.1", wire.ask(b"SYST:REQ:LAST?") == b"-1", "and empties the duplicate cache")


def test_4_2_tagged_messages_and_replies(wire: Wire, board: Board) -> None:
    inst, rid = new_tag(wire)
    msg = tagged(b"PHAS FREE", inst, rid)
    wire.send(msg)
    check("4.2", wire.tagged_reply(msg[5:32]) == (0, b""), "a tagged set is answered with its tag and 0")
    msg = tagged(b"PHAS?", inst, rid + 1)
    wire.send(msg)
    check("4.2", wire.tagged_reply(msg[6:33]) == (0, b"FREE"), "a tagged query: tag, 0, reply")
    msg = tagged(b"EDGE:GAIN 0,2", inst, rid + 2)
    wire.send(msg)
    code, body = wire.tagged_reply(msg[10:37])
    check("4.2", code == -222 and body.startswith(b'"Data out of range'), "a tagged error is in the reply")
    check("4.2", wire.error()[0] == 0, "and is not queued")
    msg = tagged(b"STAT?", inst, rid + 3)
    wire.send(msg)
    code, body = wire.tagged_reply(msg[6:33])
    check("4.2", code == 0 and len(body) > 4 * sum(board.sizes), "a tagged block reply")
    check("4.2", wire.ask(b"SYST:REQ:LAST?") == str(rid + 3).encode(), "SYST:REQ:LAST? is the newest id")
    wire.send(b'PHAS "not-a-tag",FREE')
    check("4.2", wire.error()[0] == -151, "a malformed tag is refused with -151")


def test_4_2_fencing(wire: Wire, board: Board) -> None:
    inst, rid = new_tag(wire)
    other = "%016x" % (int(inst, 16) ^ 1)
    gain = wire.ask(b"EDGE:GAIN? 0")
    msg = tagged(b"EDGE:GAIN 0,0.125", other, rid)
    wire.send(msg)
    code, body = wire.tagged_reply(msg[10:37])
    check("4.2", code == 130 and body.rstrip(b'"').endswith(inst.encode()), "another instance: 130, names the board")
    check("4.2", wire.ask(b"EDGE:GAIN? 0") == gain, "a fenced command did not run")
    msg = tagged(b"EDGE:GAIN? 0", other, rid + 1)
    wire.send(msg)
    check("4.2", wire.tagged_reply(msg[11:38]) == (0, gain), "a query that changes nothing is not fenced")
    rows, cols = board.shape(0)
    count = wire.ask(b"PULS:COUN?")
    msg = tagged(b"STEP? 1,", other, rid + 2)
    wire.send(msg + encode_bytes(encode_updates([sparse_update(0, np.ones((rows, cols), np.int8))])))
    check("4.2", wire.tagged_reply(msg[6:33])[0] == 130 and wire.ask(b"PULS:COUN?") == count, "STEP? is fenced")


def test_4_2_the_same_bytes_twice_run_once(target: Target, board: Board) -> None:
    """At most once, over plain TCP: a duplicated pulse command, weight write and learning sample."""
    sock = raw_socket(target)
    w = Wire(target)
    try:
        inst, rid = new_tag(w)
        rows, cols = board.shape(0)
        count, weights, total = int(w.ask(b"PULS:COUN?")), w.ask_floats(b"WEIG? 0"), int(w.ask(b"PULS:TOT?"))
        pulse = tagged(b"PULS:MATR 0,", inst, rid) + encode_block(np.ones(rows * cols, np.int8), "b") + b"\n"
        sock.sendall(pulse + pulse)  # the same raw bytes twice, as a duplicating network delivers them
        first, second = recv_line(sock), recv_line(sock)
        check("4.2", first == second == pulse[10:37] + b",0", "both copies answered with the same reply")
        check("4.2", int(w.ask(b"PULS:COUN?")) == count + 1, "PULS:COUN? counts one execution")
        check("4.2", int(w.ask(b"PULS:TOT?")) == total + rows * cols, "PULS:TOT? grew by one matrix of pulses")
        check("4.2", not np.array_equal(w.ask_floats(b"WEIG? 0"), weights), "the weights moved")
        one = w.ask_floats(b"WEIG? 0")
        sock.sendall(pulse)  # a late copy, on another connection than the one that will read the counter
        check("4.2", recv_line(sock) == first, "a repeat later is answered from the cache")
        check("4.2", np.array_equal(w.ask_floats(b"WEIG? 0"), one), "and does not run")
        program = tagged(b"WEIG:PROG 0,0.01,5,", inst, rid + 1) + f32(*weights / 2) + b"\n"
        sock.sendall(program)
        recv_line(sock)
        programmed = w.ask_floats(b"WEIG? 0")
        w.send(b"PULS:MATR 0," + encode_block(np.ones(rows * cols, np.int8), "b"))
        sock.sendall(program)
        check("4.2", recv_line(sock).endswith(b",0"), "a repeated weight write is acknowledged")
        check("4.2", not np.array_equal(w.ask_floats(b"WEIG? 0"), programmed), "but not executed again")
        n0, nout = board.sizes[0], board.sizes[-1]
        data = f32(*[board.dac[1] / 2] * n0, *[board.adc[1] / 2] * nout)
        sample = tagged(b"LEAR:SAMP? 0.5,3,2,", inst, rid + 2) + data + b"\n"
        count = int(w.ask(b"PULS:COUN?"))
        sock.sendall(sample + sample)
        check("4.2", sock.recv(200) != b"", "a learning sample is answered")
        time.sleep(0.2)
        check("4.2", int(w.ask(b"PULS:COUN?")) == count + 1, "a duplicated learning sample runs once")
        conflict = tagged(b"PHAS HOLD", inst, rid + 2)
        w.send(conflict)
        check("4.2", w.tagged_reply(conflict[5:32])[0] == 131, "same id, other message: 131")
        newest = rid + 2
        for k in range(1, 66):  # push the first ids out of the 64-entry cache
            msg = tagged(b"*OPC?", inst, newest + k)
            w.send(msg)
            w.tagged_reply(msg[6:33])
        w.send(pulse.rstrip(b"\n"))
        check("4.2", w.tagged_reply(pulse[10:37])[0] == 132, "an evicted (old) id: 132, not executed")
    finally:
        sock.close()
        w.close()


def test_4_2_request_ids_wrap(wire: Wire) -> None:
    inst, _ = new_tag(wire)
    newest = int(wire.ask(b"SYST:REQ:LAST?")) % (1 << 32)
    top = (1 << 32) - 1

    def send(rid: int) -> int:
        msg = tagged(b"*OPC?", inst, rid)
        wire.send(msg)
        return wire.tagged_reply(msg[6:33])[0]

    start = top - 64
    while (start - newest) % (1 << 32) >= 1 << 31:  # walk up in steps of 2^30 (each newer by serial arithmetic)
        newest = (newest + (1 << 30)) % (1 << 32)
        check("4.2", send(newest) == 0, f"id {newest:08x}, 2^30 ahead, accepted as new")
    replies = [send(rid) for rid in range(start, top + 1)]  # 65 ids up to ffffffff: the cache holds only these
    check("4.2", replies == [0] * 65, "ids up to ffffffff accepted")
    check("4.2", send(0) == 0, "after ffffffff comes 00000000 (newer)")
    check("4.2", send(1 << 31) == 132, "exactly 2^31 away is stale: 132")
    check("4.2", send(top - 100) == 132, "an id behind the newest and not cached: 132")


# ------------------------------------------------------------------------------------------------ section 5
def test_5_worked_byte_examples(wire: Wire, board: Board) -> None:
    if board.sizes[0] != 3 or board.sizes[-1] != 2:
        pytest.skip("the worked examples are for a board with 3 inputs and 2 outputs")
    golden_input = bytes.fromhex("23 32 31 32 00 00 00 3f 00 00 80 be 00 00 80 3f")
    wire.send(b"INP " + golden_input)
    wire.send(b"INP?")
    check("5", wire.block() == golden_input[4:], "INP golden bytes: [0.5, -0.25, 1.0] V")
    sample = bytes.fromhex("4c 45 41 52 3a 53 41 4d 50 3f 20 30 2e 35 2c 32 30 2c 31 30 2c 23 32 32 30 00 00 00 3f"
                           "00 00 80 be 00 00 80 3f 00 00 80 3f 00 00 00 00")
    wire.send(sample)
    check("5", len(wire.block()) == 8, "LEAR:SAMP? golden request answers two float32 outputs")
    wire.send(b"EDGE:GAIN 0,2")
    check("5", wire.ask(b"SYST:ERR?") == b'-222,"Data out of range;gain 2 above 1"', "the refused-command example")
    check("5", wire.ask(b"SYST:ERR?") == b'0,"No error"', "then the empty queue")
    wire.send(b"SYST:INT ON,#H0C49811C")
    wire.send(b"EDGE:GAIN 0,0.5,#H769EA3A6")
    wire.send(b"SYST:ERR? #H7415D826")
    check("5", wire.line() == b'#HE90BFE54,0,"No error"', "integrity golden vectors (section 1.2)")
    wire.send(b"EDGE:GAIN 0,0.4,#H769EA3A6")
    wire.send(b"SYST:ERR? #H7415D826")
    check("5", wire.line().split(b",", 2)[1] == b"120", "a flipped bit is refused")
    wire.send(b"SYST:INT OFF,#H" + b"%08X" % __import__("zlib").crc32(b"SYST:INT OFF"))
    wire.send(b"EDGE:GAIN 0,1")
    inst, rid = new_tag(wire)
    pulse = tagged(b"PULS:MATR 0,", inst, rid) + encode_block(np.zeros(board.shape(0), np.int8), "b")
    count = wire.ask(b"PULS:COUN?")
    for _ in range(2):
        wire.send(pulse)
        check("5", wire.tagged_reply(pulse[10:37]) == (0, b""), "the tagged set and its repeat: same reply")
    check("5", int(wire.ask(b"PULS:COUN?")) == int(count) + 1, "PULS:COUN? unchanged by the repeat")


def test_5_compound_step_golden_bytes(wire: Wire, board: Board) -> None:
    updates = bytes.fromhex("01 00 00 00 02 00 00 00" "01 00 00 00 02 00 00 00" "03 fe"
                            "02 00 01 00 04 00 00 00" "1f 00 00 00" "00 00 00 3f 00 00 80 bf 00 00 80 3e 00 00 00 00")
    check("5", encode_updates([sparse_update(0, np.array([[0, 3], [-2, 0]], np.int8)),
                               StepUpdate(1, bit_length=31, vectors=np.float32([0.5, -1.0, 0.25, 0.0]))]) == updates,
          "the STEP? updates example of section 5 is what the codec writes")
    if board.sizes != [2, 2, 2]:
        pytest.skip("the STEP? example is for a 2-2-2 board")
    inst, rid = new_tag(wire)
    msg = tagged(b"STEP? 1,", inst, rid)
    wire.send(msg + b"#246" + updates)
    code, body = wire.tagged_reply(msg[6:33])
    check("5", code == 0 and body.split(b",")[1].startswith(b"#224"), "STEP? golden request on a 2-2-2 board")
