"""Transcript tests of the AnalogBoard driver: exact bytes out, scripted replies in (PyMeasure style).

A tiny scripted TCP responder replays (command, reply) pairs in order over a real socket reached by pyvisa-py;
a command that differs from the script, or a pair left unused, fails the test. Replies may be garbage, silence
(``None``: the driver times out) or whatever a broken instrument would send.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import InstrumentError, LinkError, ReplyError
from eqprop_hil.protocols.ieee_block import encode_block
from eqprop_hil.protocols.scpi import MessageScanner

NOERR = b'0,"No error"'
Script = list[tuple[bytes, bytes | None]]


def init_script(sizes: bytes = b"2,2,2", edges: bytes = b"0,1,1,2") -> Script:
    return [(b"*IDN?", b"EQPROP-HIL,ANALOG-EP-1,T0001,0.1.0"), (b"TOP:SIZ?", sizes), (b"TOP:EDG?", edges),
            (b"TOP:FEED?", b"TIED"), (b"TOP:ACT?", b"TANH"), (b"NUDG:COMP?", b"0.0001"), (b"SYST:ERR?", NOERR)]


class ScriptedInstrument:
    """Replays a script over TCP on loopback; a new connection replaces the old one (as the emulator does)."""

    def __init__(self, script: Script) -> None:
        self.script = list(script)
        self.used = 0
        self.mismatches: list[tuple[bytes, bytes]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.resource = f"TCPIP0::127.0.0.1::{self._listener.getsockname()[1]}::SOCKET"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        conn: socket.socket | None = None
        scanner = MessageScanner()
        while not self._stop.is_set():
            for key, _ in sel.select(0.02):
                if key.data is None:
                    if conn is not None:
                        sel.unregister(conn)
                        conn.close()
                    conn, _ = self._listener.accept()
                    scanner = MessageScanner()
                    sel.register(conn, selectors.EVENT_READ, "conn")
                    continue
                assert conn is not None
                data = conn.recv(65536)
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    conn = None
                    continue
                for message in scanner.feed(data):
                    self._answer(conn, message)  # type: ignore[arg-type]
        if conn is not None:
            conn.close()
        sel.close()

    def _answer(self, conn: socket.socket, message: bytes) -> None:
        with self._cond:
            if self.used >= len(self.script):
                self.mismatches.append((b"<end of script>", message))
                self._cond.notify_all()
                return
            expected, reply = self.script[self.used]
            self.used += 1
            if message != expected:
                self.mismatches.append((expected, message))
            elif reply is not None:
                conn.sendall(reply + b"\n")
            self._cond.notify_all()

    def check(self, wait_s: float = 3.0) -> None:
        """Every pair used, in order, nothing unexpected (bounded wait for the last messages to arrive)."""
        with self._cond:
            self._cond.wait_for(lambda: self.used >= len(self.script) or self.mismatches, timeout=wait_s)
        assert not self.mismatches, f"sent differs from script (expected, got): {self.mismatches}"
        assert self.used == len(self.script), f"pairs left unused: {self.script[self.used:]}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3.0)
        self._listener.close()


@contextmanager
def scripted(script: Script, **kwargs: object) -> Iterator[AnalogBoard]:
    responder = ScriptedInstrument(script)
    board = None
    try:
        board = AnalogBoard(responder.resource, **{"timeout_s": 2.0, **kwargs})  # type: ignore[arg-type]
        yield board
        responder.check()
    finally:
        if board is not None and board._link.res is not None:
            board._link.close()
        responder.close()


GOLDEN_INPUT = bytes.fromhex("23 32 31 32 00 00 00 3f 00 00 80 be 00 00 80 3f")


def test_set_input_sends_the_spec_golden_bytes() -> None:
    script = init_script(b"3,4,2") + [(b"INP " + GOLDEN_INPUT, None), (b"SYST:ERR?", NOERR)]
    with scripted(script) as board:
        board.set_input(np.array([0.5, -0.25, 1.0]))
        assert board.identity()["serial"] == "T0001" and board.topology()["activation"] == "tanh"


def test_pulse_commands_send_the_spec_golden_bytes() -> None:
    outer = bytes.fromhex("23 32 31 36 00 00 00 3f 00 00 80 bf 00 00 80 3e 00 00 00 00")
    script = init_script() + [
        (b"PULS:MATR 0,#14\x01\xff\x00\x7f", None), (b"SYST:ERR?", NOERR), (b"PULS:LAST?", b"129"),
        (b"PULS:OUT 1,31," + outer, None), (b"SYST:ERR?", NOERR), (b"PULS:LAST?", b"7"),
    ]
    with scripted(script) as board:
        assert board.apply_pulses(0, np.array([[1, -1], [0, 127]], np.int8)) == {"pulses": 129}
        assert board.apply_outer(1, np.array([0.5, -1.0]), np.array([0.25, 0.0]), 31) == {"pulses": 7}
        assert board.stats["pulses_sent"] == 136


def test_train_sample_is_one_round_trip() -> None:
    request = bytes.fromhex("4c 45 41 52 3a 53 41 4d 50 3f 20 30 2e 35 2c 32 30 2c 31 30 2c 23 32 32 30"
                            "00 00 00 3f 00 00 80 be 00 00 80 3f 00 00 80 3f 00 00 00 00")
    reply = bytes.fromhex("23 31 38 00 00 40 3f 00 00 00 3e")
    with scripted(init_script(b"3,4,2") + [(request, reply)]) as board:
        trips = board.stats["round_trips"]
        out = board.train_sample(np.array([0.5, -0.25, 1.0]), np.array([1.0, 0.0]), 0.5, 20, 10)
        assert out.tolist() == [0.75, 0.125] and board.stats["round_trips"] == trips + 1


def test_settle_waits_on_opc_and_properties_round_trip() -> None:
    script = init_script() + [
        (b"SETT 40", None), (b"*OPC?", b"1"), (b"SYST:ERR?", NOERR),
        (b"NUDG:COMP 5e-05", None), (b"SYST:ERR?", NOERR), (b"NUDG:COMP?", b"5e-05"),
        (b"LEAR ON", None), (b"SYST:ERR?", NOERR), (b"PHAS?", b"NUDGE"),
    ]
    with scripted(script) as board:
        board.settle(40)
        board.compliance_amperes = 5e-5
        assert board.compliance_amperes == 5e-5 and board._compliance == 5e-5
        board.learning_enabled = True
        assert board.phase == "NUDGE"


def test_error_queue_entries_become_typed_errors() -> None:
    script = init_script() + [
        (b"EDGE:GAIN 1,0.5", None), (b"SYST:ERR?", b'-222,"Data out of range;edge 1"'),
        (b"SYST:ERR?", b'-221,"Settings conflict"'), (b"SYST:ERR?", NOERR),
    ]
    with scripted(script) as board:
        with pytest.raises(InstrumentError) as info:
            board.set_feedback_gain(1, 0.5)
        assert info.value.code == -222 and "+1 more" in info.value.message
        assert info.value.command == "EDGE:GAIN 1,0.5"


def test_a_silent_refused_query_is_read_from_the_error_queue() -> None:
    script = init_script() + [(b"EDGE:GAIN? 1", None), (b"SYST:ERR?", b'-222,"Data out of range"'),
                              (b"SYST:ERR?", NOERR)]
    with scripted(script, timeout_s=0.3) as board:
        with pytest.raises(InstrumentError, match="-222"):
            board.feedback_gain(1)
        assert board.stats["reconnects"] == 0


@pytest.mark.parametrize(
    "reply,message",
    [
        (encode_block(np.float32([0.5, np.nan])), "NaN"),
        (encode_block(np.float32([0.5, 0.1, 0.2])), "expected 2"),
        (b"#2x1" + bytes(4), "malformed"),
    ],
)
def test_garbage_blocks_raise_reply_error(reply: bytes, message: str) -> None:
    script = init_script() + [(b"STAT? 2", reply), (b"SYST:ERR?", NOERR)]  # reconnect drains the queue
    with scripted(script, retries=0, timeout_s=0.3) as board:
        with pytest.raises(ReplyError, match=message):
            board.read_state(2)


def test_garbage_identity_raises_reply_error() -> None:
    with pytest.raises(ReplyError, match="4 comma-separated"):
        with scripted([(b"*IDN?", b"HELLO"), (b"SYST:ERR?", NOERR)], retries=0):
            ...  # opening is the test: *IDN? is the first query


def test_timeout_reconnects_and_retries_an_idempotent_query() -> None:
    script = init_script() + [
        (b"PHAS?", None), (b"SYST:ERR?", None),  # silence, and the queue check is silent too: a link problem
        (b"SYST:ERR?", NOERR), (b"PHAS?", b"FREE"),  # new connection: drain, then the retry
    ]
    with scripted(script, timeout_s=0.3, retries=1) as board:
        assert board.phase == "FREE"
        assert board.stats["reconnects"] == 1 and board.stats["retries"] == 1


def test_pulse_is_not_resent_after_a_timeout() -> None:
    script = init_script() + [
        (b"PULS:MATR 0,#14\x01\x01\x01\x01", None), (b"SYST:ERR?", None), (b"SYST:ERR?", None),
        (b"SYST:ERR?", NOERR),  # after the reconnect; the pulse command is not sent again
    ]
    with scripted(script, timeout_s=0.3, retries=3) as board:
        with pytest.raises(LinkError, match="not resent"):
            board.apply_pulses(0, np.ones((2, 2), np.int8))
        assert board.stats["pulses_sent"] == 0


def test_close_leaves_hold_nudge_off_input_zero() -> None:
    script = init_script() + [
        (b"PHAS HOLD", None), (b"SYST:ERR?", NOERR), (b"NUDG:OFF", None), (b"SYST:ERR?", NOERR),
        (b"INP " + encode_block(np.zeros(2, np.float32)), None), (b"SYST:ERR?", NOERR),
    ]
    with scripted(script) as board:
        board.close()
        assert board._link.res is None


def test_a_pair_left_unused_fails() -> None:
    responder = ScriptedInstrument(init_script() + [(b"PHAS?", b"HOLD")])
    board = AnalogBoard(responder.resource, timeout_s=2.0)
    try:
        with pytest.raises(AssertionError, match="left unused"):
            responder.check(wait_s=0.1)
    finally:
        board._link.close()
        responder.close()
