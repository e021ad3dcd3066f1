"""Tagged SCPI messages of the analog board, protocol 2 (``protocols/analog_board.md`` section 4), and the
updates block of the compound step ``STEP?`` (section 3.8).

A tag is the first parameter of a program message, the string ``"<instance>:<request id>"`` (16 + 8 lower-case
hex digits). It fences the message to one power-up of one board (the instance) and names it for the board's
duplicate-request cache (the request id), so a retransmission is answered from the cache and never executed
twice. The reply to a tagged message starts with the same tag and a status code::

    > PHAS "9f2c4e1a07b3d5c8:0000002a",FREE
    < "9f2c4e1a07b3d5c8:0000002a",0

Pure encode/decode pairs, no transport; defects raise :class:`~eqprop_hil.protocols.scpi.ScpiCommandError`
with the code the board answers (-151 for a malformed tag, -161/-222/101 for a malformed updates block).

    >>> split_tag(b'PHAS "9f2c4e1a07b3d5c8:0000002a",FREE')
    (b'"9f2c4e1a07b3d5c8:0000002a"', b'PHAS FREE')
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

import numpy as np

from eqprop_hil.protocols.errors import ScpiError
from eqprop_hil.protocols.scpi import ScpiCommandError, format_error_entry

TAG_CHARS = 27  # with its two double quotes
REPLY_PREFIX = TAG_CHARS + 1  # the tag and its ","
CACHE_DEPTH = 64  # duplicate-request cache entries (spec 4.2)
ID_MODULUS = 1 << 32
INSTANCE_DIGITS = 16
INSTANCE_MISMATCH, REQUEST_CONFLICT, REQUEST_STALE = 130, 131, 132
NOT_CACHED = (120, INSTANCE_MISMATCH, REQUEST_CONFLICT, REQUEST_STALE, 140)  # nothing ran; a resend may cure

_TAG = re.compile(rb'^"([0-9a-f]{16}):([0-9a-f]{8})"$')
_INSTANCE = re.compile(r"^[0-9a-f]{16}$")
KIND_SPARSE, KIND_OUTER = 1, 2
_RECORD = struct.Struct("<BBHI")  # kind, flags, edge, n


class TagError(ScpiError):
    """A tag or tagged reply that is not of the form the spec gives (host side)."""


def check_instance(instance: object) -> str:
    """An instance id: exactly 16 lower-case hex digits."""
    if not isinstance(instance, str) or not _INSTANCE.match(instance):
        raise TagError(f"instance id must be 16 lower-case hex digits, got {instance!r}")
    return instance


def make_tag(instance: str, request_id: int) -> bytes:
    """``b'"9f2c4e1a07b3d5c8:0000002a"'``: the tag a host puts first in a message."""
    check_instance(instance)
    if not 0 <= int(request_id) < ID_MODULUS:
        raise TagError(f"request id {request_id!r} outside 0..{ID_MODULUS - 1}")
    return b'"%s:%08x"' % (instance.encode("ascii"), int(request_id))


def parse_tag(tag: bytes) -> tuple[str, int]:
    """Inverse of :func:`make_tag`: ``(instance, request id)``; -151 if malformed."""
    match = _TAG.match(bytes(tag))
    if match is None:
        raise ScpiCommandError(-151, f"not a request tag '\"<16 hex>:<8 hex>\"': {bytes(tag)[:40]!r}")
    return match.group(1).decode("ascii"), int(match.group(2), 16)


def tagged(text: bytes, instance: str, request_id: int) -> bytes:
    """Insert the tag as first parameter: ``b"PHAS FREE"`` -> ``b'PHAS "<tag>",FREE'``; ``text`` may end with
    ``" "`` or ``","`` before a block the caller appends (``b"PULS:MATR 0,"``)."""
    text = bytes(text).lstrip(b" \t")
    tag = make_tag(instance, request_id)
    split = re.search(rb"[ \t]", text)
    if split is None:
        return text + b" " + tag
    head, rest = text[: split.start()], text[split.end():].lstrip(b" \t")
    return head + b" " + tag + (b"," + rest if rest else b"," if text.endswith(b" ") else b"")


def split_tag(message: bytes) -> tuple[bytes | None, bytes]:
    """``(tag or None, the message without it)``. A first parameter that is a string but not a well-formed tag
    raises -151; anything else comes back unchanged with None."""
    data = bytes(message)
    lead = len(data) - len(data.lstrip(b" \t"))
    split = re.search(rb"[ \t]", data[lead:])
    if split is None:
        return None, data
    head_end = lead + split.start()
    pos = lead + split.end()
    while pos < len(data) and data[pos] in b" \t":
        pos += 1
    if data[pos : pos + 1] != b'"':
        return None, data
    end = data.find(b'"', pos + 1)
    if end < 0:
        raise ScpiCommandError(-151, f"unterminated string in {data[:40]!r}")
    tag = data[pos : end + 1]
    parse_tag(tag)
    rest = end + 1
    while rest < len(data) and data[rest] in b" \t":
        rest += 1
    if rest == len(data):
        return tag, data[:head_end]
    if data[rest : rest + 1] != b",":
        raise ScpiCommandError(-103, f"expected ',' after the tag, got {data[rest:rest + 8]!r}")
    return tag, data[:head_end] + b" " + data[rest + 1 :]


def newer(a: int, b: int) -> bool:
    """32-bit serial arithmetic: ``a`` is newer than ``b`` when ``(a - b) mod 2^32`` is in 1..2^31-1."""
    return 0 < (a - b) % ID_MODULUS < (1 << 31)


def tagged_reply(tag: bytes, code: int, body: bytes | None = None, detail: str = "") -> bytes:
    """The reply to a tagged message, without terminator: ``"<tag>",0[,<body>]`` or ``"<tag>",<code>,"<msg>"``."""
    if code:
        entry = format_error_entry(code, detail)  # '<code>,"<message>"'
        return bytes(tag) + b"," + entry.encode("ascii", "replace")
    return bytes(tag) + b",0" + (b"," + bytes(body) if body else b"")


def split_reply(reply: bytes) -> tuple[bytes, int, bytes]:
    """Host side: ``(tag, status code, rest)`` of a tagged reply (rest: the body, or the quoted message)."""
    data = bytes(reply)
    if len(data) < REPLY_PREFIX + 1 or data[TAG_CHARS : REPLY_PREFIX] != b"," or not _TAG.match(data[:TAG_CHARS]):
        raise TagError(f"reply lacks the '\"<tag>\",' prefix: {data[:40]!r}")
    rest = data[REPLY_PREFIX:]
    comma = rest.find(b",")
    status, body = (rest, b"") if comma < 0 else (rest[:comma], rest[comma + 1 :])
    if not re.fullmatch(rb"[+-]?\d{1,6}", status):
        raise TagError(f"reply status must be an integer code, got {status[:12]!r}")
    return data[:TAG_CHARS], int(status), body


# ---------------------------------------------------------------------------------------------------- STEP?


@dataclass
class StepUpdate:
    """One record of the updates block: sparse pulse counts or outer trains for one matrix."""

    edge: int
    feedback: bool = False
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))  # sparse: flat row-major
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # sparse: nonzero, -127..127
    bit_length: int = 0  # outer: 1..255 (0 = a sparse record)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # outer: rows then cols

    @property
    def outer(self) -> bool:
        return self.bit_length > 0


def sparse_update(edge: int, counts: np.ndarray, feedback: bool = False) -> StepUpdate:
    """The sparse record of a dense int8 count matrix: indices of its nonzero entries and their counts."""
    flat = np.asarray(counts).ravel()
    nz = np.flatnonzero(flat)
    return StepUpdate(int(edge), bool(feedback), nz.astype(np.uint32), flat[nz].astype(np.int8))


def encode_updates(updates: list[StepUpdate]) -> bytes:
    """The payload of the updates block of ``STEP?`` (spec 3.8), little-endian, no padding."""
    out = bytearray()
    for u in updates:
        flags = 1 if u.feedback else 0
        if u.outer:
            vec = np.ascontiguousarray(u.vectors, "<f4")
            out += _RECORD.pack(KIND_OUTER, flags, int(u.edge), vec.size) + struct.pack("<I", int(u.bit_length))
            out += vec.tobytes()
        else:
            idx = np.ascontiguousarray(u.indices, "<u4")
            cnt = np.ascontiguousarray(u.counts, "i1")
            if idx.size != cnt.size:
                raise TagError(f"sparse record of edge {u.edge}: {idx.size} indices but {cnt.size} counts")
            out += _RECORD.pack(KIND_SPARSE, flags, int(u.edge), idx.size) + idx.tobytes() + cnt.tobytes()
    return bytes(out)


def decode_updates(payload: bytes) -> list[StepUpdate]:
    """Inverse of :func:`encode_updates`; the syntax checks of the spec (-161 structure, -222 values). Shapes
    and edges are the board's to check."""
    data = bytes(payload)
    pos, out = 0, []
    while pos < len(data):
        if pos + _RECORD.size > len(data):
            raise ScpiCommandError(-161, f"updates block: record header cut short at byte {pos}")
        kind, flags, edge, n = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if flags & ~1:
            raise ScpiCommandError(-161, f"updates block: unknown flags {flags:#x} in record at byte {pos - 8}")
        if kind == KIND_SPARSE:
            end = pos + 5 * n
            if end > len(data):
                raise ScpiCommandError(-161, f"updates block: sparse record of edge {edge} cut short")
            idx = np.frombuffer(data, "<u4", n, pos).astype(np.uint32)
            cnt = np.frombuffer(data, "i1", n, pos + 4 * n).astype(np.int8)
            if n and (np.any(np.diff(idx.astype(np.int64)) <= 0)):
                raise ScpiCommandError(-222, f"updates block: indices of edge {edge} not strictly increasing")
            if n and (np.any(cnt == 0) or np.any(cnt == -128)):
                raise ScpiCommandError(-222, f"updates block: counts of edge {edge} must be -127..127 and not 0")
            out.append(StepUpdate(edge, bool(flags & 1), idx, cnt))
        elif kind == KIND_OUTER:
            end = pos + 4 + 4 * n
            if end > len(data):
                raise ScpiCommandError(-161, f"updates block: outer record of edge {edge} cut short")
            (bit_length,) = struct.unpack_from("<I", data, pos)
            vec = np.frombuffer(data, "<f4", n, pos + 4).astype(np.float32)
            if not 1 <= bit_length <= 255:
                raise ScpiCommandError(-222, f"updates block: bit length {bit_length} of edge {edge} not in 1..255")
            if not np.all(np.isfinite(vec)):
                raise ScpiCommandError(102, f"updates block: outer vectors of edge {edge} contain NaN or infinity")
            if n and float(np.abs(vec).max()) > 1:
                raise ScpiCommandError(-222, f"updates block: outer values of edge {edge} outside -1..1")
            out.append(StepUpdate(edge, bool(flags & 1), bit_length=bit_length, vectors=vec))
        else:
            raise ScpiCommandError(-161, f"updates block: unknown record kind {kind} at byte {pos - 8}")
        pos = end
    return out
