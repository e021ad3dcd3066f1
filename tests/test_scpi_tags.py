"""Codecs of protocol 2 (protocols/scpi_tags.py): tags, tagged replies, serial arithmetic of request ids, the
updates block of STEP?; round trips and malformed input with the code the board answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.protocols.scpi import ScpiCommandError
from eqprop_hil.protocols.scpi_tags import (
    StepUpdate, TagError, decode_updates, encode_updates, make_tag, newer, parse_tag, sparse_update, split_reply,
    split_tag, tagged, tagged_reply,
)

INST = "9f2c4e1a07b3d5c8"


def test_tags_round_trip_and_sit_first() -> None:
    assert make_tag(INST, 42) == b'"9f2c4e1a07b3d5c8:0000002a"' and parse_tag(make_tag(INST, 42)) == (INST, 42)
    assert tagged(b"PHAS FREE", INST, 42) == b'PHAS "9f2c4e1a07b3d5c8:0000002a",FREE'
    assert tagged(b"*OPC?", INST, 1) == b'*OPC? "9f2c4e1a07b3d5c8:00000001"'
    assert tagged(b"PULS:MATR 0,", INST, 1) == b'PULS:MATR "9f2c4e1a07b3d5c8:00000001",0,'
    assert tagged(b"INP ", INST, 1) == b'INP "9f2c4e1a07b3d5c8:00000001",'
    for text in (b"PHAS FREE", b"*OPC?", b"EDGE:GAIN 0,0.5", b"  STAT? 1"):
        tag, plain = split_tag(tagged(text, INST, 7))
        assert tag == make_tag(INST, 7) and plain == text.strip()
    assert split_tag(b"PHAS FREE") == (None, b"PHAS FREE")


@pytest.mark.parametrize("bad", [b'PHAS "9F2C4E1A07B3D5C8:0000002a",FREE', b'PHAS "abc:1",FREE', b'PHAS "x",FREE',
                                 b'PHAS "9f2c4e1a07b3d5c8:2a",FREE'])
def test_malformed_tags_are_refused_with_151(bad: bytes) -> None:
    with pytest.raises(ScpiCommandError) as info:
        split_tag(bad)
    assert info.value.code == -151


def test_host_side_checks() -> None:
    with pytest.raises(TagError, match="16 lower-case hex"):
        make_tag("ABC", 1)
    with pytest.raises(TagError, match="request id"):
        make_tag(INST, 1 << 32)
    tag = make_tag(INST, 3)
    assert split_reply(tagged_reply(tag, 0)) == (tag, 0, b"")
    assert split_reply(tagged_reply(tag, 0, b"#14abcd")) == (tag, 0, b"#14abcd")
    assert split_reply(tagged_reply(tag, -222, detail="gain 2 above 1")) == (tag, -222, b'"Data out of range;gain 2 above 1"')
    with pytest.raises(TagError):
        split_reply(b"0,FREE")


def test_serial_arithmetic_of_request_ids() -> None:
    assert newer(1, 0) and not newer(0, 1) and not newer(5, 5)
    assert newer(0, 0xFFFFFFFF) and not newer(0xFFFFFFFF, 0)  # the wrap
    assert newer((1 << 31) - 1, 0) and not newer(1 << 31, 0)  # exactly 2^31 apart: neither is newer


def test_the_spec_step_example() -> None:
    updates = bytes.fromhex("01 00 00 00 02 00 00 00" "01 00 00 00 02 00 00 00" "03 fe"
                            "02 00 01 00 04 00 00 00" "1f 00 00 00" "00 00 00 3f 00 00 80 bf 00 00 80 3e 00 00 00 00")
    records = [sparse_update(0, np.array([[0, 3], [-2, 0]], np.int8)),
               StepUpdate(1, bit_length=31, vectors=np.float32([0.5, -1.0, 0.25, 0.0]))]
    assert encode_updates(records) == updates
    back = decode_updates(updates)
    assert back[0].indices.tolist() == [1, 2] and back[0].counts.tolist() == [3, -2] and not back[0].outer
    assert back[1].bit_length == 31 and back[1].vectors.tolist() == [0.5, -1.0, 0.25, 0.0] and back[1].edge == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(),
                          st.lists(st.integers(-127, 127), min_size=1, max_size=40)), max_size=4))
def test_sparse_records_round_trip(records: list) -> None:
    dense = [(edge, fb, np.array(counts, np.int8)) for edge, fb, counts in records]
    back = decode_updates(encode_updates([sparse_update(e, c, fb) for e, fb, c in dense]))
    for (edge, fb, counts), u in zip(dense, back):
        rebuilt = np.zeros(counts.size, np.int8)
        rebuilt[u.indices] = u.counts
        assert (u.edge, u.feedback) == (edge, fb) and np.array_equal(rebuilt, counts)


@pytest.mark.parametrize("payload,code", [
    (b"\x01\x00\x00\x00\x02\x00\x00\x00\x00", -161),  # cut short
    (b"\x03" + bytes(7), -161),  # unknown kind
    (b"\x01\x02\x00\x00\x00\x00\x00\x00", -161),  # unknown flag
    (bytes.fromhex("01 00 00 00 02 00 00 00 02 00 00 00 01 00 00 00 01 01"), -222),  # indices not increasing
    (bytes.fromhex("01 00 00 00 01 00 00 00 00 00 00 00 00"), -222),  # a count of 0
    (bytes.fromhex("01 00 00 00 01 00 00 00 00 00 00 00 80"), -222),  # -128
    (bytes.fromhex("02 00 00 00 01 00 00 00 00 00 00 00 00 00 00 3f"), -222),  # bit length 0
    (bytes.fromhex("02 00 00 00 01 00 00 00 01 00 00 00 00 00 00 40"), -222),  # 2.0 outside -1..1
    (bytes.fromhex("02 00 00 00 01 00 00 00 01 00 00 00 00 00 c0 7f"), 102),  # NaN
])
def test_malformed_updates_blocks(payload: bytes, code: int) -> None:
    with pytest.raises(ScpiCommandError) as info:
        decode_updates(payload)
    assert info.value.code == code
