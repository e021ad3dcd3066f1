"""CRC-32 integrity of SCPI messages on the analog board (``protocols/analog_board.md`` section 1.2).

SCPI has no checksum: a flipped bit inside a block or a number is a valid, wrong value (a wrong pulse count
applied, a wrong state read). In integrity mode every program message carries a CRC-32 (``zlib.crc32``) of
the bytes it would have had without one, as an IEEE 488.2 hexadecimal numeric field ``#H`` + 8 upper-case hex
digits; every reply to such a message starts with the CRC-32 of its own bytes. Where the field goes:

- a message ending in a definite-length block: just before the block, followed by ``,``
  (``PULS:MATR 0,#H5AD9D19A,#14...``), so pyvisa's ``write_binary_values(text + field + ",", values)`` sends it;
- any other message with parameters: after the last one, after ``,`` (``EDGE:GAIN 0,0.5,#H...``);
- a message without parameters: after one space (``*OPC? #H...``).

Replies: ``#H<crc of the reply bytes>,`` then the reply as without integrity (text or block), then LF.

Pure encode/decode pairs; every defect raises :class:`IntegrityError` quoting the offending bytes.

    >>> encode_request(b"*OPC?")
    b'*OPC? #H8FAA9798'
    >>> decode_reply(encode_reply(b"1"))
    b'1'
"""

from __future__ import annotations

import re
import zlib

from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.errors import BlockError, ScpiError

INTEGRITY_ERROR = 120  # device-specific error code: CRC missing, malformed or wrong; the message was not executed
INTEGRITY_SINCE_FIRMWARE = (0, 2)  # ANALOG-EP-1 firmware that implements SYSTem:INTegrity (*IDN? 4th field)
FIELD_BYTES = 10  # b"#H" + 8 hex digits
REPLY_PREFIX_BYTES = FIELD_BYTES + 1  # the field and its ","

_FIELD = re.compile(rb"^#H[0-9A-F]{8}$")
_VERSION = re.compile(r"^\s*(\d+)\.(\d+)")


class IntegrityError(ScpiError):
    """A message or reply whose CRC-32 field is missing, malformed, misplaced or does not match its bytes."""


def crc32(data: bytes) -> int:
    """CRC-32 of ``data`` as zlib computes it (the IEEE 802.3 polynomial), as an unsigned 32-bit integer."""
    return zlib.crc32(bytes(data)) & 0xFFFFFFFF


def crc_field(crc: int) -> bytes:
    """``#H`` + 8 upper-case hex digits: IEEE 488.2 hexadecimal numeric data, fixed width."""
    if not 0 <= crc <= 0xFFFFFFFF:
        raise IntegrityError(f"CRC-32 {crc!r} outside 0..0xFFFFFFFF")
    return b"#H%08X" % crc


def parse_crc_field(field: bytes) -> int:
    """Inverse of :func:`crc_field`; exactly ``#H`` and 8 upper-case hex digits, nothing else."""
    if not _FIELD.match(bytes(field)):
        raise IntegrityError(f"CRC field must be '#H' and 8 upper-case hex digits, got {ieee_block.quote_bytes(field)}")
    return int(field[2:], 16)


def supports_integrity(firmware: str) -> bool:
    """True for board firmware (the 4th field of ``*IDN?``) that implements ``SYSTem:INTegrity``."""
    match = _VERSION.match(str(firmware))
    return match is not None and (int(match.group(1)), int(match.group(2))) >= INTEGRITY_SINCE_FIRMWARE


# ---------------------------------------------------------------------------------------------------- requests


def encode_request(text: bytes, block: bytes = b"") -> bytes:
    """The integrity form of the program message ``text + block`` (no terminator).

    ``text`` is the header and the parameters before the block (it must end with ``" "`` or ``","`` when a
    block follows, as in ``b"PULS:MATR 0,"``); ``block`` the complete definite-length block, or empty.
    """
    text, block = bytes(text), bytes(block)
    if not text.strip(b" \t"):
        raise IntegrityError("cannot protect an empty message")
    field = crc_field(crc32(text + block))
    if block:
        if not text.endswith((b" ", b",")):
            raise IntegrityError(f"text before a block must end with ' ' or ',': {ieee_block.quote_bytes(text)}")
        return text + field + b"," + block
    has_params = re.search(rb"[ \t]+[^ \t]", text.lstrip(b" \t")) is not None
    return text + (b"," if has_params else b" ") + field


class _Unparsable(Exception):
    """The parameter part cannot be cut into fields (the SCPI parser will say why, or the CRC is required)."""


def _fields(data: bytes) -> tuple[int, list[tuple[int, int, str]]]:
    """(index just past the header, [(start, end, kind)]) of the parameter fields; kind text|block|string."""
    n = len(data)
    lead = n - len(data.lstrip(b" \t"))
    split = re.search(rb"[ \t]", data[lead:])
    if split is None:
        return n, []
    head_end = lead + split.start()
    pos = lead + split.end()
    fields: list[tuple[int, int, str]] = []
    while True:
        while pos < n and data[pos] in b" \t":
            pos += 1
        if pos >= n:
            if fields:
                raise _Unparsable("a comma ends the message")
            return head_end, fields
        if data[pos : pos + 1] == b"#" and data[pos + 1 : pos + 2] in b"123456789" and pos + 1 < n:
            try:
                _, end = ieee_block.split_block(data, pos)
            except BlockError as e:
                raise _Unparsable(str(e)) from e
            fields.append((pos, end, "block"))
        elif data[pos : pos + 1] == b'"':
            end = pos + 1
            while True:
                end = data.find(b'"', end)
                if end < 0:
                    raise _Unparsable("unterminated string")
                if data[end + 1 : end + 2] != b'"':
                    break
                end += 2
            end += 1
            fields.append((pos, end, "string"))
        else:
            comma = data.find(b",", pos)
            comma = n if comma < 0 else comma
            end = pos + len(data[pos:comma].rstrip(b" \t"))
            fields.append((pos, end, "text"))
            pos = end
        pos = fields[-1][1]
        while pos < n and data[pos] in b" \t":
            pos += 1
        if pos >= n:
            return head_end, fields
        if data[pos : pos + 1] != b",":
            raise _Unparsable(f"expected ',' at byte {pos}")
        pos += 1


def decode_request(message: bytes, *, required: bool = False) -> tuple[bytes, bool]:
    """``(plain message, carried a CRC)``: the message with its CRC field (and that field's separator) removed,
    after checking that the CRC-32 of those remaining bytes is the one the field declares.

    A message without a CRC field comes back unchanged with False, unless ``required`` (integrity mode), which
    raises. A malformed, misplaced or duplicated field, or a mismatch, raises :class:`IntegrityError`.
    """
    data = bytes(message)
    try:
        head_end, fields = _fields(data)
    except _Unparsable as e:
        if required:
            raise IntegrityError(f"cannot locate the CRC field ({e}) in {ieee_block.quote_bytes(data)}") from e
        return data, False
    crcs = [i for i, (s, e, kind) in enumerate(fields) if kind == "text" and data[s : s + 2] == b"#H"]
    if not crcs:
        if required:
            raise IntegrityError(f"integrity mode: message carries no CRC field: {ieee_block.quote_bytes(data)}")
        return data, False
    if len(crcs) > 1:
        raise IntegrityError(f"more than one CRC field in {ieee_block.quote_bytes(data)}")
    i = crcs[0]
    start, end, _ = fields[i]
    declared = parse_crc_field(data[start:end])
    last = len(fields) - 1
    if fields[last][2] == "block":
        if i != last - 1 or data[end : fields[last][0]] != b",":
            raise IntegrityError(f"CRC field must come directly before the block, followed by ',': "
                                 f"{ieee_block.quote_bytes(data)}")
        plain = data[:start] + data[fields[last][0] :]
    else:
        separator = b" " if i == 0 else b","
        if i != last or end != len(data) or data[start - 1 : start] != separator or (i == 0 and start - 1 != head_end):
            raise IntegrityError(f"CRC field must be the last parameter, after {separator.decode()!r} and nothing "
                                 f"after it: {ieee_block.quote_bytes(data)}")
        plain = data[: start - 1]
    actual = crc32(plain)
    if actual != declared:
        raise IntegrityError(f"CRC-32 mismatch: field says {declared:08X}, the bytes give {actual:08X}: "
                             f"{ieee_block.quote_bytes(data)}")
    return plain, True


# ---------------------------------------------------------------------------------------------------- replies


def encode_reply(body: bytes) -> bytes:
    """``#H<crc of body>,`` + body: the reply to a message that carried a CRC (terminator not included)."""
    body = bytes(body)
    return crc_field(crc32(body)) + b"," + body


def decode_reply(data: bytes) -> bytes:
    """Inverse of :func:`encode_reply`: the reply bytes after checking their CRC-32."""
    data = bytes(data)
    if len(data) < REPLY_PREFIX_BYTES or data[FIELD_BYTES : REPLY_PREFIX_BYTES] != b",":
        raise IntegrityError(f"reply lacks the '#H<8 hex digits>,' CRC prefix: {ieee_block.quote_bytes(data)}")
    declared = parse_crc_field(data[:FIELD_BYTES])
    body = data[REPLY_PREFIX_BYTES:]
    actual = crc32(body)
    if actual != declared:
        raise IntegrityError(f"reply CRC-32 mismatch: prefix says {declared:08X}, the bytes give {actual:08X}: "
                             f"{ieee_block.quote_bytes(data)}")
    return body
