"""IEEE 488.2 definite-length blocks: golden vectors of the spec, round trips, malformed input."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.errors import BlockError

SPEC = (Path(__file__).resolve().parents[1] / "protocols" / "analog_board.md").read_text()

# The spec's worked examples (section "Worked byte examples"): the test and the document must agree.
GOLDEN_INPUT = bytes.fromhex("23 32 31 32 00 00 00 3f 00 00 80 be 00 00 80 3f")  # [0.5, -0.25, 1.0] float32 LE
GOLDEN_COUNTS = bytes.fromhex("23 31 34 01 ff 00 7f")  # [[1, -1], [0, 127]] int8


def _hex(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


def test_golden_float32_input_block() -> None:
    assert ieee_block.encode_block([0.5, -0.25, 1.0]) == GOLDEN_INPUT
    assert ieee_block.decode_block(GOLDEN_INPUT).tolist() == [0.5, -0.25, 1.0]
    assert _hex(GOLDEN_INPUT) in SPEC


def test_golden_int8_count_block() -> None:
    assert ieee_block.encode_block(np.array([[1, -1], [0, 127]]), "b") == GOLDEN_COUNTS
    assert ieee_block.decode_block(GOLDEN_COUNTS, "b").tolist() == [1, -1, 0, 127]
    assert _hex(GOLDEN_COUNTS) in SPEC


def test_empty_block_and_header_digits() -> None:
    assert ieee_block.encode_block([]) == b"#10"
    assert ieee_block.block_header(123456) == b"#6123456"
    assert ieee_block.decode_block(b"#10").size == 0


@pytest.mark.parametrize(
    "datatype,big_endian", list(itertools.product(["f", "d", "b", "B", "h", "i"], [False, True]))
)
def test_round_trip_every_datatype_and_byte_order(datatype: str, big_endian: bool) -> None:
    rng = np.random.default_rng(0)
    if datatype in "fd":
        values = rng.normal(size=37).astype(np.float32 if datatype == "f" else np.float64)
    else:
        info = np.iinfo(ieee_block._dtype(datatype, False))
        values = rng.integers(info.min, info.max, size=37, endpoint=True)
    data = ieee_block.encode_block(values, datatype, big_endian=big_endian)  # type: ignore[arg-type]
    back = ieee_block.decode_block(data, datatype, big_endian=big_endian, count=37)  # type: ignore[arg-type]
    np.testing.assert_array_equal(back, values)


def test_big_endian_differs_from_little_endian() -> None:
    assert ieee_block.encode_block([1.0], big_endian=True) == b"#14\x3f\x80\x00\x00"


@pytest.mark.parametrize(
    "data,message,quoted",
    [
        (b"", "no bytes", ""),
        (b"212\x00", "must start with '#'", "212"),
        (b"#", "cut short", "#"),
        (b"#0\x00\x00\n", "indefinite-length", "#0"),
        (b"#A12", "digit count", "#A1"),
        (b"#3 12abc", "ASCII digits", "#3 12"),
        (b"#41", "cut short", "#41"),
        (b"#18\x00\x00\x00\x00", "truncated", "#18"),
        (b"#15\x00\x00\x00\x00\x00", "whole number", "x00"),
        (b"#14\x00\x00\x80\x3fXY", "unexpected bytes after the block", "XY"),
        (b"#9999999999", "more than", "#9999999999"),
    ],
)
def test_malformed_blocks_quote_the_bytes(data: bytes, message: str, quoted: str) -> None:
    with pytest.raises(BlockError, match=message) as info:
        ieee_block.decode_block(data)
    assert quoted in str(info.value)


def test_count_mismatch_and_termination() -> None:
    block = ieee_block.encode_block([1.0, 2.0])
    assert ieee_block.decode_block(block + b"\n", termination=b"\n").tolist() == [1.0, 2.0]
    with pytest.raises(BlockError, match="expected 3"):
        ieee_block.decode_block(block, count=3)


def test_integer_overflow_is_refused_not_wrapped() -> None:
    with pytest.raises(BlockError, match="do not fit"):
        ieee_block.encode_block([128], "b")
    with pytest.raises(BlockError, match="unknown block datatype"):
        ieee_block.encode_block([1], "q")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_or_raise_block_error(data: bytes) -> None:
    try:
        values = ieee_block.decode_block(data)
    except BlockError as e:
        assert str(e)
    else:
        assert values.dtype == np.float32


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), max_size=16), st.data())
def test_mutated_blocks_never_crash(values: list[float], data: st.DataObject) -> None:
    block = bytearray(ieee_block.encode_block(values))
    position = data.draw(st.integers(0, len(block) - 1))
    block[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(block)))
    try:
        ieee_block.decode_block(bytes(block[:cut]) if cut < len(block) else bytes(block))
    except BlockError as e:
        assert "block" in str(e).lower()
