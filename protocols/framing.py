"""Frames of the FPGA serial protocol: header, CRC-16/CCITT-FALSE and COBS with a 0x00 delimiter.

A serial line delivers bytes, not messages. COBS (Consistent Overhead Byte Stuffing) removes every 0x00 from a
frame so that a single 0x00 can delimit frames: a receiver that lost bytes resynchronises at the next 0x00.
The layout (see ``protocols/fpga_serial.md`` section 2)::

    raw   = header (6 bytes) + payload (0..65535 bytes) + crc (2 bytes, big-endian)
    header= version u8 | seq u16 LE | opcode u8 | payload length u16 LE
    crc   = binascii.crc_hqx(header + payload, 0xFFFF)          # CRC-16/CCITT-FALSE
    frame = cobs(raw) + b"\\x00"

Senders put one extra 0x00 before every frame so that a truncated frame before it is terminated and rejected
instead of swallowing the good frame that follows. Empty frames (two 0x00 in a row) are ignored.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from typing import Literal

from cobs import cobs

from eqprop_hil.protocols.errors import FrameError, ValueRangeError

PROTOCOL_VERSION = 2  # fpga_serial.md section 2.1: a device answers another version with BAD_VERSION
HEADER = struct.Struct("<BHBH")  # version, seq, opcode, payload length
HEADER_BYTES = HEADER.size  # 6
CRC_BYTES = 2
MAX_PAYLOAD = 0xFFFF  # the length field is u16
MAX_SEQ = 0xFFFF
DELIMITER = b"\x00"
# COBS adds at most one code byte per 254 data bytes plus one: the longest raw frame (65543 bytes) needs
# 65543 // 254 + 1 = 259 code bytes, so the longest valid encoded frame is 65802 bytes (without the delimiter).
MAX_RAW = HEADER_BYTES + MAX_PAYLOAD + CRC_BYTES  # 65543
MAX_ENCODED = MAX_RAW + MAX_RAW // 254 + 1  # 65802

FrameFault = Literal["cobs", "short", "length", "crc", "version", "oversized", "partial"]


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its header fields and payload (the CRC has been checked)."""

    seq: int  # 0..65535, echoed by the response
    opcode: int  # request opcode, or request opcode | 0x80 in a response
    payload: bytes
    version: int = PROTOCOL_VERSION


class FrameDecodeError(FrameError):
    """A frame that failed to decode; ``fault`` says how, ``seq``/``opcode`` are the unverified header
    fields when at least a header was recovered (a device echoes them in its CRC_ERROR answer)."""

    def __init__(self, message: str, fault: FrameFault, seq: int | None = None, opcode: int | None = None,
                 version: int | None = None) -> None:
        super().__init__(message)
        self.fault: FrameFault = fault
        self.seq = seq
        self.opcode = opcode
        self.version = version  # the frame's version byte, when a header was recovered


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no xorout); ``crc16(b"123456789") == 0x29B1``."""
    return binascii.crc_hqx(data, 0xFFFF)


def encode_frame(seq: int, opcode: int, payload: bytes = b"", version: int = PROTOCOL_VERSION) -> bytes:
    """Encode one frame: COBS of header + payload + CRC, followed by the 0x00 delimiter."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueRangeError(f"sequence number {seq} outside 0..{MAX_SEQ}")
    if not 0 <= opcode <= 0xFF or not 0 <= version <= 0xFF:
        raise ValueRangeError(f"opcode {opcode} / version {version} must fit one byte")
    if len(payload) > MAX_PAYLOAD:
        raise ValueRangeError(
            f"payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}; split it into row chunks"
        )
    body = HEADER.pack(version, seq, opcode, len(payload)) + bytes(payload)
    return cobs.encode(body + crc16(body).to_bytes(2, "big")) + DELIMITER


def decode_frame(encoded: bytes) -> Frame:
    """Decode one frame given without its delimiter; raises :class:`FrameDecodeError` naming the fault."""
    if len(encoded) > MAX_ENCODED:
        raise FrameDecodeError(f"frame of {len(encoded)} encoded bytes exceeds {MAX_ENCODED}", "oversized")
    try:
        raw = cobs.decode(encoded)
    except cobs.DecodeError as e:
        raise FrameDecodeError(f"bad COBS encoding in {_hex(encoded)}: {e}", "cobs") from e
    if len(raw) < HEADER_BYTES + CRC_BYTES:
        raise FrameDecodeError(
            f"frame of {len(raw)} bytes is shorter than header + CRC ({HEADER_BYTES + CRC_BYTES}): {_hex(raw)}",
            "short",
        )
    version, seq, opcode, length = HEADER.unpack_from(raw)
    got = len(raw) - HEADER_BYTES - CRC_BYTES
    body, crc_bytes = raw[:-CRC_BYTES], raw[-CRC_BYTES:]
    expected, received = crc16(body), int.from_bytes(crc_bytes, "big")
    if expected != received:
        raise FrameDecodeError(
            f"CRC mismatch: computed 0x{expected:04X}, frame carries 0x{received:04X} in {_hex(raw)}", "crc", seq, opcode,
            version,
        )
    if length != got:
        raise FrameDecodeError(f"header announces {length} payload bytes, frame holds {got}", "length", seq, opcode,
                               version)
    if version != PROTOCOL_VERSION:
        raise FrameDecodeError(
            f"protocol version {version}, this side speaks {PROTOCOL_VERSION}", "version", seq, opcode, version
        )
    return Frame(seq=seq, opcode=opcode, payload=raw[HEADER_BYTES:-CRC_BYTES], version=version)


class FrameReader:
    """Split a byte stream into frames, as bytes arrive (a serial read returns whatever came in time).

    ``feed`` returns the decoded frames and, in stream order, a :class:`FrameDecodeError` for each frame that
    failed (so one bad frame never hides the good ones after it). Bytes after the last delimiter stay buffered
    (``pending``); a frame that grows past ``max_encoded`` bytes is discarded up to the next delimiter and
    reported once as ``oversized``.
    """

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        if max_encoded < 1:
            raise ValueRangeError(f"max_encoded must be >= 1, got {max_encoded}")
        self.max_encoded = max_encoded
        self._buffer = bytearray()
        self._skipping = False  # inside an oversized frame: drop bytes until the next delimiter

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held back (0 when the stream ended on a delimiter)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame | FrameDecodeError]:
        """Decode every frame completed by ``data``; errors are returned in place, not raised."""
        out: list[Frame | FrameDecodeError] = []
        for item in self.feed_raw(data):
            if isinstance(item, FrameDecodeError):
                out.append(item)
                continue
            try:
                out.append(decode_frame(item))
            except FrameDecodeError as e:
                out.append(e)
        return out

    def feed_raw(self, data: bytes) -> list[bytes | FrameDecodeError]:
        """Like :meth:`feed` but return each completed frame still COBS-encoded (without its delimiter), for a
        receiver that inspects or corrupts the bytes before decoding them (fault injection)."""
        out: list[bytes | FrameDecodeError] = []
        pieces = bytes(data).split(DELIMITER)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._skipping:
                if not last:
                    self._skipping = False  # the delimiter ends the oversized frame
                continue
            self._buffer += piece
            if len(self._buffer) > self.max_encoded:
                out.append(
                    FrameDecodeError(
                        f"frame exceeds {self.max_encoded} encoded bytes without a delimiter; discarded", "oversized"
                    )
                )
                self._buffer.clear()
                self._skipping = last
                continue
            if last:
                break
            encoded = bytes(self._buffer)
            self._buffer.clear()
            if encoded:  # an empty frame is the leading delimiter of a frame, or an idle line
                out.append(encoded)
        return out

    def flush_partial(self) -> FrameDecodeError | None:
        """Discard an unfinished frame (after a read timeout) and describe it, or None if nothing was pending."""
        if not self._buffer and not self._skipping:
            return None
        held = bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return FrameDecodeError(f"partial frame never terminated: {_hex(held)}", "partial")


def _hex(data: bytes, limit: int = 48) -> str:
    """Quote bytes as hex for error messages, shortened past ``limit`` bytes."""
    text = data[:limit].hex(" ")
    return f"[{text}{' ...' if len(data) > limit else ''}] ({len(data)} bytes)"
