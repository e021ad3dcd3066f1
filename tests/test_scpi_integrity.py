"""Integrity mode of the analog board (protocols/analog_board.md section 1.2): the CRC-32 codec, the emulator's
refusal of corrupted requests, and the driver with integrity on and off, through pyvisa-py over TCP on loopback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pyvisa
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import InstrumentError
from eqprop_hil.insitu.recovery import transient
from eqprop_hil.mock_instruments.analog_server import AnalogServer
from eqprop_hil.mock_instruments.faults import FaultConfig
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols.ieee_block import encode_block
from eqprop_hil.protocols.scpi_integrity import (
    INTEGRITY_ERROR, IntegrityError, crc_field, decode_reply, decode_request, encode_reply, encode_request,
    parse_crc_field, supports_integrity,
)

SPEC = (Path(__file__).resolve().parent.parent / "protocols" / "analog_board.md").read_text()
SIZES = [3, 4, 2]
COUNTS = encode_block(np.array([1, -1, 0, 127], np.int8), "b")
INPUT = encode_block(np.float32([0.5, -0.25, 1.0]))


def _hex(line: str) -> bytes:
    return bytes.fromhex(line)


# ------------------------------------------------------------------------------------------------ codec
GOLDEN_REQUESTS = [  # (text, block, integrity form): the spec's examples
    (b"SYST:INT ON", b"", b"SYST:INT ON,#H0C49811C"),
    (b"*OPC?", b"", b"*OPC? #H8FAA9798"),
    (b"EDGE:GAIN 0,0.5", b"", b"EDGE:GAIN 0,0.5,#H769EA3A6"),
    (b"SYST:ERR?", b"", b"SYST:ERR? #H7415D826"),
    (b"PULS:MATR 0,", COUNTS, _hex("50 55 4c 53 3a 4d 41 54 52 20 30 2c 23 48 39 33 46 46 35 36 34 35 2c 23 31 34 01 ff 00 7f")),
    (b"INP ", INPUT, _hex("49 4e 50 20 23 48 36 37 36 39 30 38 45 32 2c 23 32 31 32 00 00 00 3f 00 00 80 be 00 00 80 3f")),
]
GOLDEN_REPLIES = [
    (b"1", b"#H83DCEFB7,1"),
    (b'0,"No error"', b'#HE90BFE54,0,"No error"'),
    (encode_block(np.float32([0.75, 0.125])), _hex("23 48 38 42 36 39 45 42 36 36 2c 23 31 38 00 00 40 3f 00 00 00 3e")),
]


@pytest.mark.parametrize("text, block, wire", GOLDEN_REQUESTS)
def test_golden_requests(text: bytes, block: bytes, wire: bytes) -> None:
    assert encode_request(text, block) == wire
    assert decode_request(wire, required=True) == (text + block, True)
    shown = wire.decode("latin-1") if block == b"" else " ".join(f"{b:02x}" for b in wire)
    assert shown in SPEC, "the spec's example differs from the codec"


@pytest.mark.parametrize("body, wire", GOLDEN_REPLIES)
def test_golden_replies(body: bytes, wire: bytes) -> None:
    assert encode_reply(body) == wire and decode_reply(wire) == body
    assert (wire.decode("latin-1") if body[:1] != b"#" else " ".join(f"{b:02x}" for b in wire)) in SPEC


@pytest.mark.parametrize("bad, match", [
    (b"EDGE:GAIN 0,0.4,#H769EA3A6", "CRC-32 mismatch: field says 769EA3A6, the bytes give 01999330"),
    (b"EDGE:GAIN 0,0.5,#h769EA3A6", "no CRC field"),
    (b"EDGE:GAIN 0,0.5,#H769ea3a6", "upper-case hex"),
    (b"EDGE:GAIN 0,0.5,#H769EA3A", "upper-case hex"),
    (b"EDGE:GAIN #H769EA3A6,0,0.5", "must be the last parameter"),
    (b"EDGE:GAIN 0,0.5, #H769EA3A6", "must be the last parameter"),
    (b"EDGE:GAIN 0,0.5,#H769EA3A6,#H769EA3A6", "more than one CRC field"),
    (b"PULS:MATR 0,#H93FF5645, " + COUNTS, "directly before the block"),
    (b"PULS:MATR #H93FF5645,0," + COUNTS, "directly before the block"),
    (b"PULS:MATR 0,#H93FF5645,#15\x01\xff\x00\x7f", "cannot locate the CRC field"),
    (b"EDGE:GAIN 0,0.5", "no CRC field"),
])
def test_malformed_requests_name_the_problem(bad: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=re.escape(match)):
        decode_request(bad, required=True)


def test_plain_messages_pass_unchanged_when_not_required() -> None:
    for plain in (b"EDGE:GAIN 0,0.5", b"*OPC?", b"PULS:MATR 0," + COUNTS, b"PULS:MATR 0,#15\x01"):
        assert decode_request(plain) == (plain, False)


def test_replies_and_fields_refuse_defects() -> None:
    for bad in (b"1", b"#H83DCEFB7;1", b"#H83DCEFB7,2", b"#h83dcefb7,1", b"#H83DCEFB,71"):
        with pytest.raises(IntegrityError):
            decode_reply(bad)
    assert parse_crc_field(crc_field(0xDEADBEEF)) == 0xDEADBEEF
    with pytest.raises(IntegrityError, match="outside"):
        crc_field(1 << 32)
    with pytest.raises(IntegrityError, match="must end with"):
        encode_request(b"INP", INPUT)
    assert [supports_integrity(v) for v in ("0.2.0", "1.0", "0.10.3", "0.1.0", "x", "")] == [True] * 3 + [False] * 3


_HEADERS = st.sampled_from([b"*OPC?", b"SYST:ERR?", b"EDGE:GAIN", b"PULS:MATR", b"INP", b":stat?", b"LEAR:SAMP?"])
_PARAMS = st.lists(st.one_of(st.integers(-10**6, 10**6).map(lambda i: str(i).encode()),
                             st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
                             st.sampled_from([b"ON", b"NUDG", b'"a,b"'])), max_size=4)
_BLOCKS = st.one_of(st.just(b""), st.binary(max_size=64).map(lambda b: encode_block(np.frombuffer(b, np.uint8), "B")))


@st.composite
def messages(draw) -> tuple[bytes, bytes]:
    params, block = draw(_PARAMS), draw(_BLOCKS)
    text = draw(_HEADERS)
    if params or block:
        text += b" " + b",".join(params) + (b"," if params and block else b"")
    return text, block


@settings(max_examples=150, deadline=None)
@given(messages(), st.data())
def test_round_trip_and_every_single_bit_flip_is_caught(message: tuple[bytes, bytes], data: st.DataObject) -> None:
    text, block = message
    wire = encode_request(text, block)
    assert decode_request(wire, required=True) == (text + block, True)
    index = data.draw(st.integers(0, len(wire) - 1))
    flipped = bytearray(wire)
    flipped[index] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(IntegrityError):
        decode_request(bytes(flipped), required=True)
    reply = encode_reply(text + block)
    assert decode_reply(reply) == text + block
    flipped = bytearray(reply)
    flipped[data.draw(st.integers(0, len(reply) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(IntegrityError):
        decode_reply(bytes(flipped))


# ------------------------------------------------------------------------------------------------ emulator
def make_physics() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=SIZES, device=DeviceConfig(model="ideal"), seed=2))


@pytest.fixture
def server() -> Iterator[AnalogServer]:
    with AnalogServer(make_physics()) as srv:
        yield srv


@pytest.fixture
def visa(server: AnalogServer) -> Iterator[pyvisa.resources.MessageBasedResource]:
    res = pyvisa.ResourceManager("@py").open_resource(server.resource, read_termination="\n",
                                                      write_termination="\n", timeout=3000)
    yield res
    res.close()


def _ask(res, line: bytes) -> bytes:
    res.write_raw(line + b"\n")
    return res.read_raw().rstrip(b"\n")


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _last_digit_changed(wire: bytes) -> bytes:
    return wire[:-1] + (b"0" if wire[-1:] != b"0" else b"1")


def test_corrupted_requests_are_refused_and_change_nothing(server: AnalogServer, visa) -> None:
    visa.write_raw(encode_request(b"SYST:INT ON") + b"\n")
    assert _ask(visa, encode_request(b"SYST:INT?")) == encode_reply(b"1")
    pulses = encode_request(b"PULS:MATR 0,", encode_block(np.full(12, 5, np.int8), "b"))
    corrupted = [pulses.replace(b"\x05", b"\x07", 1), encode_request(b"EDGE:GAIN 0,0.5").replace(b"0.5", b"0.4"),
                 _last_digit_changed(encode_request(b"PHAS FREE")), b"PHAS FREE", b"PULS:MATR 0," + encode_block(np.ones(12, np.int8), "b")]
    for line in corrupted:
        before = server.physics.state_dict()
        visa.write_raw(line + b"\n")
        entry = decode_reply(_ask(visa, encode_request(b"SYST:ERR?")))
        assert entry.startswith(b'120,"Integrity check failed; message not executed;'), (line, entry)
        assert _same(server.physics.state_dict(), before), line
    assert server.counters["pulse_commands"] == 0 and server.counters["integrity_refused"] == len(corrupted)
    visa.write_raw(pulses + b"\n")  # the intact message runs
    assert _ask(visa, encode_request(b"PULS:LAST?")) == encode_reply(b"60")
    visa.write_raw(encode_request(b"*OPC?").replace(b"*OPC?", b"*OPC!") + b"\n")  # a refused query: no reply
    assert _ask(visa, encode_request(b"SYST:ERR:COUN?")) == encode_reply(b"1")


def test_integrity_off_keeps_plain_scpi(server: AnalogServer, visa) -> None:
    assert _ask(visa, b"SYST:INT?") == b"0" and _ask(visa, b"*OPC?") == b"1"
    visa.write_raw(b"EDGE:GAIN 0,0.4\n")  # without a CRC, a flipped digit is a valid wrong value: the old behaviour
    assert _ask(visa, b"EDGE:GAIN? 0") == b"0.4"
    assert _ask(visa, encode_request(b"EDGE:GAIN? 0")) == encode_reply(b"0.4")  # a CRC'd message is checked anyway
    visa.write_raw(encode_request(b"EDGE:GAIN 0,0.5").replace(b"0.5", b"0.6") + b"\n")
    assert _ask(visa, b"SYST:ERR?").startswith(b"120,") and _ask(visa, b"EDGE:GAIN? 0") == b"0.4"
    visa.write_raw(encode_request(b"SYST:INT ON") + b"\n")
    visa.close()  # the mode belongs to the connection: the next controller starts plain
    res = pyvisa.ResourceManager("@py").open_resource(server.resource, read_termination="\n", timeout=3000)
    try:
        assert _ask(res, b"SYST:INT?") == b"0" and _ask(res, b"SYST:ERR?") == b'0,"No error"'
    finally:
        res.close()
    server.firmware.integrity = True
    server.firmware.power_cycle()
    assert server.firmware.integrity is False


# ------------------------------------------------------------------------------------------------ driver
def _exercise(board: AnalogBoard) -> dict:
    board.set_input(np.array([0.5, -0.25, 1.0]))
    board.set_phase("FREE")
    board.settle(20)
    board.apply_pulses(0, np.arange(-6, 6, dtype=np.int8).reshape(4, 3) * 9)
    board.set_nudge_target(np.array([1.0, 0.0]), 0.5)
    return {"state": board.read_state(), "w": board.read_weights(0), "out": board.infer(np.array([0.1, 0.2, 0.3]), 5),
            "sample": board.train_sample(np.array([0.5, -0.25, 1.0]), np.array([1.0, 0.0]), 0.5, 5, 3),
            "describe": {k: v for k, v in board.describe().items() if k != "instance"}, "eta": board.learning_eta(), "executed": board.pulse_commands_executed}


def test_driver_gives_the_same_results_with_and_without_integrity() -> None:
    results = {}
    for integrity in (True, False):
        with AnalogServer(make_physics()) as srv, AnalogBoard(srv.resource, timeout_s=3.0,
                                                              integrity=integrity) as board:
            assert board.integrity is integrity and any(x.integrity for x in srv.sessions) is integrity
            results[integrity] = _exercise(board)
            assert srv.counters["errors"] == 0 and srv.counters["integrity_refused"] == 0
    assert _same(results[True], results[False])


def test_driver_with_a_token_reconnects_into_integrity_mode() -> None:
    with AnalogServer(make_physics(), token="s3cret-token") as srv:
        with AnalogBoard(srv.resource, timeout_s=0.5, token="s3cret-token") as board:
            assert board.integrity and any(x.integrity for x in srv.sessions)
            other = pyvisa.ResourceManager("@py").open_resource(srv.resource, read_termination="\n", timeout=2000)
            other.write('SYST:AUTH "s3cret-token"')  # another controller: its own connection, mode off there
            assert other.query("SYST:INT?") == "0"
            other.close()
            assert srv.drop_connections() >= 1  # the board's network stack restarts: every link is cut
            assert board.read_weights(1).shape == (2, 4)  # reconnect: token first, then SYST:INT ON again
            assert board.stats["reconnects"] == 1 and any(x.integrity for x in srv.sessions)
            assert srv.counters["auth_ok"] == 3 and srv.counters["integrity_refused"] == 0


def test_driver_verifies_replies_and_resends_refused_requests() -> None:
    faults = FaultConfig(seed=4, corrupt_rate=0.05, corrupt_request_rate=0.05)
    with AnalogServer(make_physics(), faults=faults) as srv, AnalogBoard(srv.resource, timeout_s=0.2,
                                                                         retries=8) as board:
        assert board.integrity
        for i in range(20):
            gain = round(0.02 * i, 2)
            board.set_feedback_gain(1, gain)
            assert board.feedback_gain(1) == gain and np.isclose(float(srv.physics.gain(1)), gain)
            np.testing.assert_array_equal(board.read_weights(0), srv.physics.read_weights(0))
        assert board.stats["integrity_mismatches"] > 0  # refused requests: resent with the same id (tag echoed,
        assert board.stats["integrity_refused"] + board.stats["stale_replies"] + board.stats["reconnects"] > 0  # or not)
        assert srv.counters["fault_corrupt"] > 0 and srv.counters["integrity_refused"] > 0


def test_a_crc_refusal_is_transient_for_the_recovery_layer() -> None:
    """A refused pulse command reaches hil/insitu/recovery.py, which resends it only once PULS:COUN? shows it did not run."""
    assert transient(InstrumentError(INTEGRITY_ERROR, "Integrity check failed", "PULS:MATR 0,"))
    assert not transient(InstrumentError(-222, "Data out of range", "EDGE:GAIN 0,2"))
