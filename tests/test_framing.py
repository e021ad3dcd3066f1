"""Frames of the FPGA serial protocol: golden vectors from the spec, round trips, every rejection, the stream
reader on split, partial, oversized and garbage input, and property tests on random and mutated bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import FrameError, ValueRangeError
from eqprop_hil.protocols.fpga_messages import Opcode, Status
from eqprop_hil.protocols.fpga_updates import outer_update, pulse_update
from eqprop_hil.protocols.framing import (
    MAX_ENCODED,
    MAX_PAYLOAD,
    Frame,
    FrameDecodeError,
    FrameReader,
    crc16,
    decode_frame,
    encode_frame,
)

SPEC = (Path(__file__).resolve().parents[1] / "protocols" / "fpga_serial.md").read_text()


INSTANCE = 0x0123456789ABCDEF  # the golden frames' instance id (and fence)
RESTARTED = 0xFEDCBA9876543210


def _req(seq: int, op: Opcode, fence: int = INSTANCE, **fields: object) -> bytes:
    return encode_frame(seq, op, m.encode_request(op, fence=fence, **fields))


def _resp(seq: int, op: Opcode, status: Status, boot: int, body: bytes = b"", instance: int = INSTANCE,
          **fields: object) -> bytes:
    if fields:
        body = m.encode_response(op, **fields)
    return encode_frame(seq, op | m.RESPONSE_BIT, m.encode_envelope(status, boot, body, instance))


def _step() -> bytes:
    counts = np.zeros((3, 4), dtype=np.int8)
    counts[0, 3], counts[2, 0] = 3, -2
    updates = [pulse_update(0, False, counts), outer_update(1, False, np.array([0.5, -1.0]), np.array([1.0, 0.25, 0.0]), 8)]
    return _req(0x0108, Opcode.STEP, steps=1, updates=updates)


# (what, frame built by the codecs, hex printed in protocols/fpga_serial.md section 8)
GOLDEN = [
    ("SYNC request", lambda: _req(1, Opcode.SYNC, fence=0), "03 02 01 01 02 08 01 01 01 01 01 01 01 01 03 50 80 00"),
    ("SYNC response", lambda: _resp(1, Opcode.SYNC, Status.OK, 1, max_payload=65535, cache_depth=16),
     "03 02 01 03 80 0e 01 02 01 0e ef cd ab 89 67 45 23 01 ff ff 10 a0 fa 00"),
    ("SET_PHASE FREE", lambda: _req(0x0102, Opcode.SET_PHASE, phase=1),
     "06 02 02 01 05 09 0c ef cd ab 89 67 45 23 01 01 04 9e 00"),
    ("SET_PHASE OK", lambda: _resp(0x0102, Opcode.SET_PHASE, Status.OK, 1),
     "06 02 02 01 85 0b 01 02 01 0b ef cd ab 89 67 45 23 01 52 49 00"),
    ("SET_INPUT", lambda: _req(0x0103, Opcode.SET_INPUT, volts=np.array([0.5, -0.25, 1.0, 0.0])),
     "06 02 03 01 04 12 0a ef cd ab 89 67 45 23 01 04 01 02 08 02 fc 02 10 01 03 5c ca 00"),
    ("APPLY_PULSES", lambda: _req(0x0104, Opcode.APPLY_PULSES, edge=1, feedback=0, row_start=0, n_rows=1,
                                  counts=np.array([3, -2, 0], dtype=np.int8)),
     "06 02 04 01 10 13 0a ef cd ab 89 67 45 23 01 01 01 01 02 01 02 03 03 03 fe 03 32 80 00"),
    ("APPLY_PULSES OK", lambda: _resp(0x0104, Opcode.APPLY_PULSES, Status.OK, 1, pulses=5),
     "06 02 04 01 90 0f 01 02 01 0a ef cd ab 89 67 45 23 01 05 01 01 03 ab 61 00"),
    ("SET_GAIN OUT_OF_RANGE", lambda: _resp(0x0105, Opcode.SET_GAIN, Status.OUT_OF_RANGE, 1, b"edge 7 outside 0..2"),
     "06 02 05 01 89 1e 03 04 01 1e ef cd ab 89 67 45 23 01 65 64 67 65 20 37 20 6f 75 74 73 69 64 65 20 30 2e 2e 32 "
     "a7 66 00"),
    ("NOT_SYNCED", lambda: _resp(0x0106, Opcode.SETTLE, Status.NOT_SYNCED, 2, instance=RESTARTED),
     "06 02 06 01 8d 0b 03 08 02 0b 10 32 54 76 98 ba dc fe 8c 50 00"),
    ("WRONG_INSTANCE", lambda: _resp(0x0106, Opcode.SETTLE, Status.WRONG_INSTANCE, 2, b"fenced", instance=RESTARTED),
     "06 02 06 01 8d 11 03 0b 02 11 10 32 54 76 98 ba dc fe 66 65 6e 63 65 64 fe 97 00"),
    ("READ_STATE", lambda: _req(0x0107, Opcode.READ_STATE, layer=2), "06 02 07 01 0e 09 0c ef cd ab 89 67 45 23 01 02 ac 0e 00"),
    ("READ_STATE OK", lambda: _resp(0x0107, Opcode.READ_STATE, Status.OK, 1, states=np.array([0.5, 1.25, -0.125])),
     "06 02 07 01 8e 13 01 02 01 0a ef cd ab 89 67 45 23 01 03 01 02 08 02 14 04 fe ab b7 00"),
    ("STEP", _step,
     "06 02 08 01 1a 2a 0a ef cd ab 89 67 45 23 01 01 01 01 02 02 01 03 01 02 02 03 02 08 04 03 fe 01 04 03 08 02 01 02 "
     "20 03 c0 03 01 02 40 02 10 01 03 ae 81 00"),
    ("STEP OK", lambda: _resp(0x0108, Opcode.STEP, Status.OK, 1, pulses=9, states=np.array([0.5, 0.25, -0.125])),
     "06 02 08 01 9a 17 01 02 01 0a ef cd ab 89 67 45 23 01 09 01 01 02 03 01 02 08 02 04 04 fe 9e b1 00"),
]  # fmt: skip


def test_crc_is_ccitt_false() -> None:
    assert crc16(b"123456789") == 0x29B1
    assert crc16(b"") == 0xFFFF


@pytest.mark.parametrize("what,build,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_frames_match_the_spec(what: str, build, expected: str) -> None:
    frame = build()
    assert frame.hex(" ") == expected
    assert expected in SPEC, f"golden frame {what} is not printed in fpga_serial.md"
    decoded = decode_frame(frame[:-1])
    assert encode_frame(decoded.seq, decoded.opcode, decoded.payload) == frame


def test_golden_set_input_decodes_to_the_values() -> None:
    frame = decode_frame(bytes.fromhex("06 02 03 01 04 12 0a ef cd ab 89 67 45 23 01 04 01 02 08 02 fc 02 10 01 03 5c ca"))
    assert (frame.version, frame.seq, frame.opcode) == (2, 0x0103, Opcode.SET_INPUT)
    assert m.request_fence(frame.payload) == INSTANCE
    volts = m.decode_request(Opcode.SET_INPUT, frame.payload)["volts"]
    np.testing.assert_array_equal(volts, [0.5, -0.25, 1.0, 0.0])


def test_golden_step_decodes_as_the_spec_describes_it() -> None:
    frame = decode_frame(_step()[:-1])
    raw = frame.payload[8:].hex(" ")
    assert raw.startswith("01 00 00 00 02 00 00 01 02 00 03 00 08 00 03 fe 01 00 03 08 02 00 00 20 00 c0")
    text = SPEC.replace("\n  ", " ")
    for piece in ("01 00 00 00", "00 00 01 | 02 00 | 03 00 08 00 | 03 fe", "01 00 03 | 08 | 02 00 00 20 00 c0"):
        assert piece in text
    step = m.decode_request(Opcode.STEP, frame.payload)
    assert step["steps"] == 1 and [u["form"] for u in step["updates"]] == [1, 3]
    np.testing.assert_array_equal(step["updates"][0]["index"], [3, 8])


def test_longest_frame_needs_259_code_bytes() -> None:
    """65543 raw bytes without a zero: COBS adds 65543 // 254 + 1 = 259 code bytes (spec section 2)."""
    payload = bytes([0x5A]) * MAX_PAYLOAD
    frame = encode_frame(0x0101, 0x11, payload)
    assert len(frame) - 1 == MAX_ENCODED == 65543 + 259 == 65802
    assert "65802 bytes" in SPEC and "259" in SPEC
    reader = FrameReader()
    [decoded] = reader.feed(b"\x00" + frame)
    assert isinstance(decoded, Frame) and decoded.payload == payload
    [too_long] = reader.feed(b"\x01" * (MAX_ENCODED + 1) + b"\x00")
    assert isinstance(too_long, FrameDecodeError) and too_long.fault == "oversized"


@pytest.mark.parametrize("size", [0, 1, 253, 254, 255, 508, 4096, MAX_PAYLOAD])
@pytest.mark.parametrize("seq,opcode", [(0, 0), (0xFFFF, 0x7F), (0x1234, 0x95)])
def test_round_trip_every_size(size: int, seq: int, opcode: int) -> None:
    payload = bytes((np.arange(size) * 7 % 256).astype(np.uint8))  # holds zeros: COBS must remove them
    frame = encode_frame(seq, opcode, payload)
    assert frame.count(0) == 1 and frame.endswith(b"\x00")
    assert len(frame) - 1 <= MAX_ENCODED
    assert decode_frame(frame[:-1]) == Frame(seq, opcode, payload)


def test_encode_refuses_what_the_header_cannot_hold() -> None:
    with pytest.raises(ValueRangeError, match="exceeds the maximum of 65535"):
        encode_frame(1, 1, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ValueRangeError, match="sequence number 65536"):
        encode_frame(0x10000, 1)
    with pytest.raises(ValueRangeError, match="one byte"):
        encode_frame(1, 256)


def _raw(seq: int = 5, opcode: int = 3, payload: bytes = b"\x01\x02", version: int = 2, length: int | None = None) -> bytes:
    body = bytes([version]) + seq.to_bytes(2, "little") + bytes([opcode])
    body += (len(payload) if length is None else length).to_bytes(2, "little") + payload
    return body + crc16(body).to_bytes(2, "big")


@pytest.mark.parametrize(
    "encoded,fault,text",
    [
        (b"\x05\x01\x02", "cobs", "bad COBS"),
        (cobs.encode(b"\x01\x02\x03"), "short", "shorter than header"),
        (cobs.encode(_raw()[:-1] + b"\x00"), "crc", "CRC mismatch"),
        (cobs.encode(_raw(length=9)), "length", "announces 9 payload bytes, frame holds 2"),
        (cobs.encode(_raw(version=1)), "version", "protocol version 1, this side speaks 2"),
        (b"\x01" * (MAX_ENCODED + 1), "oversized", "exceeds"),
    ],
)
def test_each_rejection_is_a_typed_frame_error(encoded: bytes, fault: str, text: str) -> None:
    with pytest.raises(FrameDecodeError, match=text) as info:
        decode_frame(encoded)
    assert info.value.fault == fault
    assert isinstance(info.value, FrameError)


def test_crc_error_keeps_the_unverified_header_for_the_answer() -> None:
    raw = bytearray(_raw(seq=0x0A0B, opcode=0x10))
    raw[-3] ^= 0x40  # payload byte
    with pytest.raises(FrameDecodeError) as info:
        decode_frame(cobs.encode(bytes(raw)))
    assert (info.value.fault, info.value.seq, info.value.opcode) == ("crc", 0x0A0B, 0x10)
    assert "0x" in str(info.value) and "[" in str(info.value)  # quotes the values and the bytes


def test_reader_reassembles_frames_fed_byte_by_byte() -> None:
    frames = [encode_frame(i, 3, bytes(range(i * 40))) for i in range(4)]
    stream = b"".join(b"\x00" + f for f in frames)
    reader = FrameReader()
    out = []
    for byte in stream:
        out += reader.feed(bytes([byte]))
    assert [f.seq for f in out] == [0, 1, 2, 3]
    assert reader.pending == 0


def test_reader_holds_a_partial_frame_and_flushes_it() -> None:
    frame = encode_frame(9, 1, b"abc")
    reader = FrameReader()
    assert reader.feed(frame[:5]) == []
    assert reader.pending == 5
    error = reader.flush_partial()
    assert error is not None and error.fault == "partial" and "5 bytes" in str(error)
    assert reader.pending == 0 and reader.flush_partial() is None
    assert reader.feed(frame) == [Frame(9, 1, b"abc")]


def test_truncated_frame_is_cut_off_by_the_next_leading_delimiter() -> None:
    good = encode_frame(2, 1, b"xyz")
    truncated = encode_frame(1, 1, b"lost tail")[:6]
    out = FrameReader().feed(b"\x00" + truncated + b"\x00" + good)
    assert isinstance(out[0], FrameDecodeError)
    assert out[1] == Frame(2, 1, b"xyz")


def test_oversized_frame_is_discarded_until_the_next_delimiter() -> None:
    reader = FrameReader(max_encoded=64)
    out = reader.feed(b"\x01" * 50)
    out += reader.feed(b"\x01" * 50)  # past the limit: reported once
    out += reader.feed(b"\x02" * 30)  # still inside the oversized frame: dropped silently
    assert len(out) == 1 and out[0].fault == "oversized"
    assert reader.pending == 0
    assert reader.feed(b"\x00" + encode_frame(4, 2, b"ok")) == [Frame(4, 2, b"ok")]


def test_corrupt_frame_does_not_hide_its_neighbours() -> None:
    bad = bytearray(encode_frame(2, 1, b"middle"))
    bad[-4] ^= 0x80  # a payload byte; the flip cannot make a 0x00 (which would split the frame)
    assert bad.count(0) == 1
    stream = encode_frame(1, 1, b"first") + bytes(bad) + encode_frame(3, 1, b"last")
    out = FrameReader().feed(stream)
    assert [type(x).__name__ for x in out] == ["Frame", "FrameDecodeError", "Frame"]
    assert (out[0].seq, out[2].seq) == (1, 3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_reader_never_crashes_on_random_bytes(data: bytes) -> None:
    reader = FrameReader(max_encoded=256)
    for item in reader.feed(data):
        assert isinstance(item, (Frame, FrameDecodeError))
    assert reader.pending <= 256


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFFFF), st.integers(0, 255), st.data())
def test_single_bit_errors_are_always_detected(payload: bytes, seq: int, opcode: int, data: st.DataObject) -> None:
    raw = _raw(seq, opcode, payload)
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FrameDecodeError):
        decode_frame(cobs.encode(bytes(flipped)))  # CRC-16 catches every single-bit error


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_mutated_encoded_frames_decode_or_raise_frame_error(payload: bytes, data: st.DataObject) -> None:
    frame = bytearray(encode_frame(7, 4, payload)[:-1])
    for _ in range(data.draw(st.integers(1, 4))):
        frame[data.draw(st.integers(0, len(frame) - 1))] = data.draw(st.integers(0, 255))
    out = FrameReader().feed(bytes(frame) + b"\x00")
    assert all(isinstance(x, (Frame, FrameDecodeError)) for x in out)
