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
from eqprop_hil.drivers.errors import InstanceChanged, InstrumentError, ProtocolVersionError, ReplyError
from eqprop_hil.protocols.ieee_block import encode_block
from eqprop_hil.protocols.scpi import MessageScanner
from eqprop_hil.protocols.scpi_tags import make_tag, tagged, tagged_reply

NOERR = b'0,"No error"'
Script = list[tuple[bytes, bytes | None]]
INST = "0123456789abcdef"  # the scripted board's instance id


def T(rid: int, text: bytes, block: bytes = b"") -> bytes:
    """A tagged request as the driver sends it (spec 4.2): the tag first, then the parameters and block."""
    return tagged(text, INST, rid) + block


def R(rid: int, body: bytes = b"", code: int = 0) -> bytes:
    """A tagged reply: the tag, the status, then the body (or the quoted message of an error)."""
    return tagged_reply(make_tag(INST, rid), code, body if not code else None, body.decode() if code else "")


def init_script(sizes: bytes = b"2,2,2", edges: bytes = b"0,1,1,2", last: int = (1 - 8 - 1) % (1 << 32)) -> Script:
    """Opening (spec 4.3): untagged, only what the tag needs (revision and identity, instance, newest request id);
    then, tagged from id last+1, the protocol, identity, instance, topology and compliance the driver keeps. The
    default ``last`` makes the first id after the opening 1, and the opening's ids wrap past ffffffff."""
    ids = [(last + 1 + k) % (1 << 32) for k in range(8)]
    idn, inst = b"EQPROP-HIL,ANALOG-EP-1,T0001,0.3.0", b'"%s"' % INST.encode()
    kept = [(b"SYST:PROT?", b"2"), (b"*IDN?", idn), (b"SYST:INST?", inst), (b"TOP:SIZ?", sizes),
            (b"TOP:EDG?", edges), (b"TOP:FEED?", b"TIED"), (b"TOP:ACT?", b"TANH"), (b"NUDG:COMP?", b"0.0001")]
    return [(b"SYST:PROT?", b"2"), (b"*IDN?", idn), (b"SYST:INST?", inst), (b"SYST:REQ:LAST?", str(last).encode())] + [
        (T(rid, text), R(rid, body)) for rid, (text, body) in zip(ids, kept)]


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
                try:
                    data = conn.recv(65536)
                except OSError:  # reset by a driver that closed with a reply unread
                    data = b""
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
        board = AnalogBoard(responder.resource, **{"timeout_s": 2.0, "integrity": False, **kwargs})  # type: ignore
        yield board
        responder.check()
    finally:
        if board is not None and board._link.res is not None:
            board._link.close()
        responder.close()


GOLDEN_INPUT = bytes.fromhex("23 32 31 32 00 00 00 3f 00 00 80 be 00 00 80 3f")


def test_set_input_sends_the_spec_golden_bytes() -> None:
    script = init_script(b"3,4,2") + [(b'INP "0123456789abcdef:00000001",' + GOLDEN_INPUT,
                                       b'"0123456789abcdef:00000001",0')]
    with scripted(script) as board:
        board.set_input(np.array([0.5, -0.25, 1.0]))
        identity = board.identity()
        assert identity["serial"] == "T0001" and board.topology()["activation"] == "tanh"
        assert identity["protocol"] == 2 and identity["instance"] == INST == board.bound_instance


def test_pulse_commands_send_the_spec_golden_bytes() -> None:
    outer = bytes.fromhex("23 32 31 36 00 00 00 3f 00 00 80 bf 00 00 80 3e 00 00 00 00")
    script = init_script() + [
        (T(1, b"PULS:MATR 0,", b"#14\x01\xff\x00\x7f"), R(1)), (T(2, b"PULS:LAST?"), R(2, b"129")),
        (T(3, b"PULS:OUT 1,31,", outer), R(3)), (T(4, b"PULS:LAST?"), R(4, b"7")),
    ]
    with scripted(script) as board:
        assert board.apply_pulses(0, np.array([[1, -1], [0, 127]], np.int8)) == {"pulses": 129}
        assert board.apply_outer(1, np.array([0.5, -1.0]), np.array([0.25, 0.0]), 31) == {"pulses": 7}
        assert board.stats["pulses_sent"] == 136


def test_train_sample_is_one_round_trip() -> None:
    request = bytes.fromhex("4c 45 41 52 3a 53 41 4d 50 3f 20") + b'"0123456789abcdef:00000001",' + bytes.fromhex(
        "30 2e 35 2c 32 30 2c 31 30 2c 23 32 32 30 00 00 00 3f 00 00 80 be 00 00 80 3f 00 00 80 3f 00 00 00 00")
    reply = R(1, bytes.fromhex("23 31 38 00 00 40 3f 00 00 00 3e"))
    with scripted(init_script(b"3,4,2") + [(request, reply)]) as board:
        trips = board.stats["round_trips"]
        out = board.train_sample(np.array([0.5, -0.25, 1.0]), np.array([1.0, 0.0]), 0.5, 20, 10)
        assert out.tolist() == [0.75, 0.125] and board.stats["round_trips"] == trips + 1


def test_compound_step_is_one_round_trip_with_sparse_counts() -> None:
    """Spec 3.8: matrix counts [[0, 3], [-2, 0]] on edge 0 travel as two (index, count) pairs; an outer record."""
    updates = bytes.fromhex("01 00 00 00 02 00 00 00" "01 00 00 00 02 00 00 00" "03 fe"  # sparse, edge 0
                            "02 00 01 00 04 00 00 00" "1f 00 00 00"  # outer, edge 1, n 4, bit length 31
                            "00 00 00 3f 00 00 80 bf 00 00 80 3e 00 00 00 00")
    states = encode_block(np.float32([0.5, -0.25, 0.75, 0.125, 0.25, 1.0]))
    script = init_script() + [(T(1, b"STEP? 1,", b"#246" + updates), R(1, b"9," + states))]
    with scripted(script) as board:
        trips = board.stats["round_trips"]
        result, layers = board.step([{"edge": 0, "counts": np.array([[0, 3], [-2, 0]], np.int8)},
                                     {"edge": 1, "rows": np.array([0.5, -1.0]), "cols": np.array([0.25, 0.0]),
                                      "bit_length": 31}], steps=1)
        assert result == {"pulses": 9} and board.stats["round_trips"] == trips + 1
        assert [x.tolist() for x in layers] == [[0.5, -0.25], [0.75, 0.125], [0.25, 1.0]]


def test_settle_is_one_round_trip_and_properties_round_trip() -> None:
    script = init_script() + [
        (T(1, b"SETT 40"), R(1)),  # the tagged reply comes once the steps ran: no *OPC?, no SYST:ERR?
        (T(2, b"NUDG:COMP 5e-05"), R(2)), (T(3, b"NUDG:COMP?"), R(3, b"5e-05")),
        (T(4, b"LEAR ON"), R(4)), (T(5, b"PHAS?"), R(5, b"NUDGE")),
    ]
    with scripted(script) as board:
        board.settle(40)
        board.compliance_amperes = 5e-5
        assert board.compliance_amperes == 5e-5 and board._compliance == 5e-5
        board.learning_enabled = True
        assert board.phase == "NUDGE"


def test_tagged_errors_become_typed_errors() -> None:
    script = init_script() + [(T(1, b"EDGE:GAIN 1,0.5"), R(1, b"Data out of range;edge 1", code=-222)),
                              (T(2, b"EDGE:GAIN? 1"), R(2, b"Data out of range;edge 1", code=-222))]
    with scripted(script) as board:
        with pytest.raises(InstrumentError) as info:
            board.set_feedback_gain(1, 0.5)
        assert info.value.code == -222 and info.value.command == "EDGE:GAIN 1,0.5"
        with pytest.raises(InstrumentError, match="-222"):
            board.feedback_gain(1)  # a refused query is answered too: no timeout
        assert board.stats["reconnects"] == 0


def test_another_instance_refuses_and_the_driver_raises_instance_changed() -> None:
    other = "fedcba9876543210"
    script = init_script() + [
        (T(1, b"PHAS FREE"), R(1, b"Instance mismatch; not executed;board is " + other.encode(), code=130)),
        (T(2, b"SYST:INST?"), R(2, b'"' + other.encode() + b'"')),
    ]
    with scripted(script) as board:
        with pytest.raises(InstanceChanged) as info:
            board.set_phase("FREE")
        assert (info.value.expected, info.value.actual) == (INST, other) and board.bound_instance == INST
        assert board.instance_id() == other and board.bound_instance == INST  # never rebound by itself


def test_a_stray_reply_is_discarded_not_taken_for_the_next() -> None:
    """Spec 4.3: a duplicated reply to request 1 arrives before the reply to request 2; the driver reads on."""
    script = init_script() + [(T(1, b"PHAS?"), R(1, b"FREE")),
                              (T(2, b"PULS:COUN?"), R(1, b"FREE") + b"\n" + R(2, b"17"))]
    with scripted(script) as board:
        assert board.phase == "FREE" and board.pulse_commands_executed == 17
        assert board.stats["stale_replies"] == 1


@pytest.mark.parametrize(
    "reply,message",
    [
        (encode_block(np.float32([0.5, np.nan])), "NaN"),
        (encode_block(np.float32([0.5, 0.1, 0.2])), "expected 2"),
    ],
)
def test_garbage_blocks_raise_reply_error(reply: bytes, message: str) -> None:
    script = init_script() + [(T(1, b"STAT? 2"), R(1, reply))]
    with scripted(script, retries=0, timeout_s=0.3) as board:
        with pytest.raises(ReplyError, match=message):
            board.read_state(2)


def test_a_malformed_block_reconnects_and_raises_after_the_retries() -> None:
    script = init_script() + [(T(1, b"STAT? 2"), R(1, b"#2x1" + bytes(4))), (b"SYST:ERR?", NOERR)]
    with scripted(script, retries=0, timeout_s=0.3) as board:
        with pytest.raises(ReplyError, match="block"):
            board.read_state(2)


def test_garbage_identity_raises_reply_error() -> None:
    with pytest.raises(ReplyError, match="4 comma-separated"):
        with scripted([(b"SYST:PROT?", b"2"), (b"*IDN?", b"HELLO"), (b"SYST:ERR?", NOERR)], retries=0):
            ...  # opening is the test


@pytest.mark.parametrize("first", [None, b"3"])
def test_another_protocol_revision_is_refused_before_anything_changes(first: bytes | None) -> None:
    idn = b"EQPROP-HIL,ANALOG-EP-1,T0001,0.2.0"
    script: Script = [(b"SYST:PROT?", first), (b"*IDN?", idn)]
    if first is None:  # revision 1: SYST:PROT? is unknown there (silent, -113 queued), *IDN? answers first
        script += [(b"SYST:ERR?", b'-113,"Undefined header"'), (b"SYST:ERR?", NOERR)]
    with pytest.raises(ProtocolVersionError, match=f"revision {1 if first is None else 3}"):
        with scripted(script, retries=0):
            ...  # the script is the proof: nothing but queries was sent


def test_timeout_reconnects_and_resends_the_same_bytes() -> None:
    script = init_script() + [
        (T(1, b"PHAS?"), None),  # silence
        (b"SYST:ERR?", NOERR), (T(1, b"PHAS?"), R(1, b"FREE")),  # new connection: drain, then the same bytes
    ]
    with scripted(script, timeout_s=0.3, retries=1) as board:
        assert board.phase == "FREE"
        assert board.stats["reconnects"] == 1 and board.stats["retries"] == 1


def test_a_pulse_is_resent_with_the_same_request_id_after_a_timeout() -> None:
    """At most once (spec 4.2): the resend carries the same id, so a board that ran it answers from its cache."""
    pulse = T(1, b"PULS:MATR 0,", b"#14\x01\x01\x01\x01")
    script = init_script() + [(pulse, None), (b"SYST:ERR?", NOERR), (pulse, R(1)), (T(2, b"PULS:LAST?"), R(2, b"4"))]
    with scripted(script, timeout_s=0.3, retries=3) as board:
        assert board.apply_pulses(0, np.ones((2, 2), np.int8)) == {"pulses": 4}
        assert board.stats["pulses_sent"] == 4 and board.stats["reconnects"] == 1


def test_close_leaves_hold_nudge_off_input_zero() -> None:
    script = init_script() + [
        (T(1, b"PHAS HOLD"), R(1)), (T(2, b"NUDG:OFF"), R(2)),
        (T(3, b"INP ", encode_block(np.zeros(2, np.float32))), R(3)),
    ]
    with scripted(script) as board:
        board.close()
        assert board._link.res is None


def test_a_pair_left_unused_fails() -> None:
    responder = ScriptedInstrument(init_script() + [(T(1, b"PHAS?"), R(1, b"HOLD"))])
    board = AnalogBoard(responder.resource, timeout_s=2.0, integrity=False)
    try:
        with pytest.raises(AssertionError, match="left unused"):
            responder.check(wait_s=0.1)
    finally:
        board._link.close()
        responder.close()
