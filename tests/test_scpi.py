"""SCPI parsing and formatting of the analog board: every command parses, every defect has its code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.protocols import scpi
from eqprop_hil.protocols.errors import ScpiError
from eqprop_hil.protocols.ieee_block import encode_block
from eqprop_hil.protocols.scpi import ERROR_MESSAGES, MessageScanner, ScpiCommandError, parse_command
from eqprop_hil.protocols.scpi_commands import BY_KEY, COMMANDS, CommandSpec, Param

SPEC_TEXT = (Path(__file__).resolve().parents[1] / "protocols" / "analog_board.md").read_text()


def _value(param: Param) -> bytes:
    """A valid token for one parameter (inside its static range)."""
    if param.kind == "block" and param.datatype == "B":
        return b"#10"  # an empty bytes block (STEP? with no updates)
    if param.kind == "block":
        lo = param.lo if param.lo is not None else -0.5
        return encode_block([lo, 0], param.datatype)  # type: ignore[arg-type]
    if param.kind == "int":
        return str(int(param.lo if param.lo is not None else 0)).encode()
    if param.kind in ("float", "floats"):
        lo, hi = param.lo if param.lo is not None else 0.0, param.hi if param.hi is not None else 1.0
        return repr((lo + hi) / 2 if hi > lo else lo).encode()
    if param.kind == "bool":
        return b"ON"
    return param.choices[0].encode()


def example(spec: CommandSpec, header: str | None = None) -> bytes:
    head = (header or spec.key).encode()
    params = [p for p in spec.params if not p.optional]
    return head + (b" " + b",".join(_value(p) for p in params) if params else b"")


@pytest.mark.parametrize("spec", COMMANDS, ids=[c.key for c in COMMANDS])
def test_every_command_parses_in_short_long_and_lower_case(spec: CommandSpec) -> None:
    long_header = ":".join(spec.variants[-1]) + ("?" if spec.query else "")
    for header in (spec.key, long_header, long_header.lower(), ":" + spec.key):
        if header.startswith(":*"):
            continue
        command = parse_command(example(spec, header))
        assert command.spec is spec
        assert len(command.args) == len(spec.params)


@pytest.mark.parametrize("spec", COMMANDS, ids=[c.key for c in COMMANDS])
def test_every_command_is_in_the_spec_document(spec: CommandSpec) -> None:
    assert f"`{spec.header}`" in SPEC_TEXT


def test_every_error_code_is_documented() -> None:
    for code in ERROR_MESSAGES:
        if code:
            assert f"| {code} |" in SPEC_TEXT, code


def test_typed_arguments() -> None:
    cmd = parse_command(b"PULS:OUT 2,31," + encode_block([0.5, -1.0, 0.25, 0.0]))
    assert cmd.key == "PULS:OUT" and cmd.args[:2] == (2, 31)
    np.testing.assert_array_equal(cmd.args[2], np.float32([0.5, -1.0, 0.25, 0.0]))
    assert parse_command(b"phas nudg").args == ("NUDGE",)
    assert parse_command(b"LEARN OFF").args == (False,)
    assert parse_command(b"LEAR:ETA 0.1, 0.02 ,1e-3").args == ((0.1, 0.02, 0.001),)
    assert parse_command(b"STAT?").args == (None,) and parse_command(b"STAT? 2").args == (2,)
    assert parse_command(b"SYST:ERR:NEXT?").key == parse_command(b"syst:err?").key == "SYST:ERR?"
    counts = parse_command(b"PULS:MATR 0," + encode_block(np.array([1, -1, 0, 127]), "b")).args[1]
    assert counts.dtype == np.int8 and counts.tolist() == [1, -1, 0, 127]


@pytest.mark.parametrize(
    "line,code",
    [
        (b"", -102),
        (b"PHAS FREE;*RST", -102),
        (b"\xffIDN?", -101),
        (b"FOO:BAR", -113),
        (b"PHAS? FREE", -108),
        (b"PHAS", -109),
        (b"PHAS RUN", -141),
        (b"EDGE:GAIN 0;1", -102),
        (b"EDGE:GAIN 0 1", -103),
        (b"EDGE:GAIN 0,,1", -109),
        (b"EDGE:GAIN 0,", -109),
        (b"EDGE:GAIN 0,1,2", -108),
        (b"EDGE:GAIN ON,1", -104),
        (b"EDGE:GAIN 0.5,1", -120),
        (b"EDGE:GAIN 0,nan", -120), (b"EDGE:GAIN 0,NaN", -120), (b"EDGE:GAIN 0,-INF", -120),
        (b"SETT Infinity", -120), (b"EDGE:GAIN 0,0.5V", -138), (b"SETT 10ms", -138), (b"SETT:TIME 1e-3s", -138),
        (b"EDGE:GAIN 0,1e999", -120),
        (b"EDGE:GAIN 0,1.5", -222),
        (b"EDGE:GAIN -1,0.5", -222),
        (b'EDGE:GAIN 0,"0.5"', -104),
        (b'EDGE:GAIN 0,"0.5', -151),
        (b"EDGE:GAIN 0,#14\x00\x00\x00\x00", -168),
        (b"INP 0.5", -104),
        (b"INP #14\x00\x00", -160),
        (b"INP #0\x00\x00", -160),
        (b"INP #13\x00\x00\x00", -161),
        (b"INP #14\x00\x00\xc0\x7f", 102),
        (b"INP #9999999999", -223),
        (b"PULS:MATR 0,#11\x80", -222),
        (b"PULS:OUT 0,0," + encode_block([0.1]), -222),
        (b"PULS:OUT 0,3," + encode_block([1.5]), -222),
        (b"SETT 0", -222),
        (b"SETT 1000001", -222),
        (b"LEAR:ETA", -109),
        (b"LEAR:ETA 0.1,2", -222),
        (b"LEAR MAYBE", -141),
        (b"NUDG:COMP 0", -222),
    ],
)
def test_each_defect_has_its_code(line: bytes, code: int) -> None:
    with pytest.raises(ScpiCommandError) as info:
        parse_command(line)
    assert info.value.code == code
    assert info.value.entry.startswith(f'{code},"{ERROR_MESSAGES[code]}')


def test_error_entries_round_trip_and_stay_quotable() -> None:
    entry = scpi.format_error_entry(-222, 'gain "2" above 1\n')
    assert entry == "-222,\"Data out of range;gain '2' above 1 \""
    assert scpi.parse_error_entry(entry) == (-222, "Data out of range;gain '2' above 1 ")
    assert scpi.parse_error_entry('0,"No error"') == (0, "No error")
    assert scpi.format_error_entry(0) == '0,"No error"'
    assert len(scpi.format_error_entry(-222, "x" * 1000)) < 270
    with pytest.raises(ScpiError, match="not an error-queue entry"):
        scpi.parse_error_entry("1.5V")


def test_number_formatting() -> None:
    assert scpi.format_number(True) == "1" and scpi.format_number(np.int64(12)) == "12"
    assert scpi.format_number(0.5) == "0.5" and scpi.format_number(1e-5) == "1e-05"
    assert scpi.format_numbers([64, 256, 10]) == "64,256,10"
    with pytest.raises(ScpiError, match="non-finite"):
        scpi.format_number(float("nan"))


def test_scanner_cuts_blocks_by_length_not_by_lf() -> None:
    block = encode_block(np.array([10, 34, 35, 59], dtype=np.int8), "b")  # LF, '"', '#', ';' inside the block
    stream = b"PULS:MATR 0," + block + b"\r\n*IDN?\n"
    whole = MessageScanner().feed(stream)
    assert whole == [b"PULS:MATR 0," + block, b"*IDN?"]
    scanner = MessageScanner()
    pieces: list[object] = []
    for i in range(len(stream)):
        pieces += scanner.feed(stream[i : i + 1])
    assert pieces == whole


def test_scanner_overrun_discards_to_next_lf() -> None:
    scanner = MessageScanner()
    out = scanner.feed(b"X" * (scpi.MAX_LINE_BYTES + 10))
    assert len(out) == 1 and isinstance(out[0], ScpiCommandError) and out[0].code == -363
    assert scanner.feed(b"tail\n*OPC?\n") == [b"*OPC?"]


_KNOWN = set(ERROR_MESSAGES)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_parse_or_raise_a_known_code(data: bytes) -> None:
    try:
        command = parse_command(data)
    except ScpiCommandError as e:
        assert e.code in _KNOWN and e.entry.startswith(str(e.code))
    else:
        assert command.spec in COMMANDS


_VALID = [example(spec) for spec in COMMANDS]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=3), st.data())
def test_mutated_commands_parse_or_raise_a_known_code(line: bytes, flips: list, data: st.DataObject) -> None:
    mutated = bytearray(line)
    for position, value in flips:
        if mutated:
            mutated[position % len(mutated)] = value
    cut = data.draw(st.integers(0, len(mutated)))
    try:
        parse_command(bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated))
    except ScpiCommandError as e:
        assert e.code in _KNOWN


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_VALID), min_size=1, max_size=6), st.lists(st.integers(1, 40), max_size=20))
def test_scanner_is_independent_of_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    scanner, got, pos = MessageScanner(), [], 0
    for size in cuts + [len(stream)]:
        got += scanner.feed(stream[pos : pos + size])
        pos += size
    assert got == lines
    assert all(BY_KEY[parse_command(m).key] for m in got)  # type: ignore[arg-type]
