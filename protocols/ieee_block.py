"""IEEE 488.2 definite-length arbitrary blocks: ``#<n><length><bytes>``.

Pure encode/decode pairs (as in PyVISA's ``to_ieee_block`` / ``from_ieee_block``), used by the analog board's
server to parse what arrives and by tests to build golden byte vectors. The analog board's numbers travel as
little-endian float32 (``"f"``) by default and pulse counts as int8 (``"b"``); ``"B"`` carries raw bytes (JSON).

Example (the spec's worked example, checked by ``tests/test_ieee_block.py``)::

    >>> encode_block([0.5, -0.25, 1.0])
    b'#212\\x00\\x00\\x00?\\x00\\x00\\x80\\xbe\\x00\\x00\\x80?'

Every error is a :class:`eqprop_hil.protocols.errors.BlockError` that quotes the offending bytes and says what to fix.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from eqprop_hil.protocols.errors import BlockError

Datatype = Literal["f", "d", "b", "B", "h", "i"]

# numpy type (without byte order) of each datatype letter; same letters as struct and pyvisa
_NUMPY_TYPES: dict[str, str] = {"f": "f4", "d": "f8", "b": "i1", "B": "u1", "h": "i2", "i": "i4"}

MAX_BLOCK_BYTES = 16 * 1024 * 1024  # larger declared lengths are refused (no instrument needs more)


def quote_bytes(data: bytes | bytearray | memoryview, limit: int = 32) -> str:
    """Printable excerpt of raw bytes for error messages: ``b'#2x...'`` plus how many more bytes followed."""
    data = bytes(data)
    more = f" (+{len(data) - limit} more bytes)" if len(data) > limit else ""
    return f"{data[:limit]!r}{more}"


def _dtype(datatype: str, big_endian: bool) -> np.dtype:
    if datatype not in _NUMPY_TYPES:
        raise BlockError(f"unknown block datatype {datatype!r}; use one of {sorted(_NUMPY_TYPES)}")
    return np.dtype((">" if big_endian else "<") + _NUMPY_TYPES[datatype])


def block_header(length: int) -> bytes:
    """The ``#<n><length>`` prefix of a block of ``length`` payload bytes (``#10`` for an empty block)."""
    if length < 0 or length > MAX_BLOCK_BYTES:
        raise BlockError(f"block length {length} outside 0..{MAX_BLOCK_BYTES} bytes")
    digits = str(length).encode("ascii")
    return b"#" + str(len(digits)).encode("ascii") + digits


def encode_bytes(payload: bytes) -> bytes:
    """Wrap raw bytes (e.g. UTF-8 JSON) in a definite-length block."""
    return block_header(len(payload)) + bytes(payload)


def encode_block(values: object, datatype: Datatype = "f", *, big_endian: bool = False) -> bytes:
    """Encode numbers as a definite-length block; float32 little-endian unless told otherwise.

    Integer datatypes refuse values that do not fit (rather than wrapping, which would turn +128 pulses into
    -128): ``encode_block([200], "b")`` raises.
    """
    dtype = _dtype(datatype, big_endian)
    arr = np.asarray(values)
    if dtype.kind in "iu":
        if arr.size and arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise BlockError(f"cannot encode NaN or infinity as integer datatype {datatype!r}")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise BlockError(
                f"values {arr.min()}..{arr.max()} do not fit datatype {datatype!r} ({info.min}..{info.max})"
            )
    payload = np.ascontiguousarray(arr.ravel(), dtype=dtype).tobytes()
    return block_header(len(payload)) + payload


def parse_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """Read the ``#<n><length>`` header at ``offset``; returns (payload start, payload length).

    Raises :class:`BlockError` for a missing ``#``, an indefinite-length ``#0`` block, a digit count that is
    not 1..9, non-digit length characters, a header cut short, or a declared length above MAX_BLOCK_BYTES.
    """
    data = bytes(data[offset : offset + 11])
    if not data:
        raise BlockError("expected an IEEE 488.2 block '#<n><length>...', got no bytes")
    if data[:1] != b"#":
        raise BlockError(f"block must start with '#', got {quote_bytes(data)}")
    if len(data) < 2:
        raise BlockError(f"block header cut short: {quote_bytes(data)}")
    n_char = data[1:2]
    if n_char == b"0":
        raise BlockError(
            f"indefinite-length block '#0' is not supported, send a definite-length block: {quote_bytes(data)}"
        )
    if not n_char.isdigit():
        raise BlockError(f"block header digit count must be 1..9, got {quote_bytes(data[:3])}")
    n = int(n_char)
    digits = data[2 : 2 + n]
    if len(digits) < n:
        raise BlockError(f"block header cut short, expected {n} length digits: {quote_bytes(data)}")
    if not digits.isdigit():
        raise BlockError(f"block length must be {n} ASCII digits, got {quote_bytes(data[: 2 + n])}")
    length = int(digits)
    if length > MAX_BLOCK_BYTES:
        raise BlockError(f"block declares {length} bytes, more than the {MAX_BLOCK_BYTES} allowed: {quote_bytes(data)}")
    return offset + 2 + n, length


def split_block(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[bytes, int]:
    """Cut one block out of ``data`` at ``offset``; returns (payload bytes, offset just past the block)."""
    start, length = parse_header(data, offset)
    end = start + length
    if len(data) < end:
        raise BlockError(
            f"block truncated: header promises {length} bytes, only {len(data) - start} arrived: "
            f"{quote_bytes(data[offset:])}"
        )
    return bytes(data[start:end]), end


def decode_payload(payload: bytes, datatype: Datatype = "f", *, big_endian: bool = False) -> np.ndarray:
    """Payload bytes (no header) -> a 1-D array; the length must be a multiple of the element size."""
    dtype = _dtype(datatype, big_endian)
    if len(payload) % dtype.itemsize:
        raise BlockError(
            f"block payload of {len(payload)} bytes is not a whole number of {dtype.itemsize}-byte "
            f"{datatype!r} elements: {quote_bytes(payload)}"
        )
    return np.frombuffer(payload, dtype=dtype).astype(dtype.newbyteorder("="))


def decode_block(
    data: bytes | bytearray | memoryview,
    datatype: Datatype = "f",
    *,
    big_endian: bool = False,
    count: int | None = None,
    termination: bytes = b"",
) -> np.ndarray:
    """Decode exactly one block (plus an optional ``termination``) into a 1-D array.

    The inverse of :func:`encode_block`. ``count`` checks the number of elements; trailing bytes other than
    the termination are an error (they usually mean a wrong length header).
    """
    payload, end = split_block(data, 0)
    rest = bytes(data[end:])
    if rest != termination and not (termination and rest == b""):
        raise BlockError(f"unexpected bytes after the block: {quote_bytes(rest)}; check the length header")
    values = decode_payload(payload, datatype, big_endian=big_endian)
    if count is not None and values.size != count:
        raise BlockError(f"block holds {values.size} {datatype!r} elements, expected {count}")
    return values
