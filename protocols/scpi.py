"""SCPI lines of the EP analog board: parsing, formatting, and error-queue entries.

The command vocabulary itself (headers, parameters, units, static ranges, error codes) lives in
:mod:`eqprop_hil.protocols.scpi_commands`, one table that both the spec document and the emulator follow; this module turns
the bytes of one program message into a :class:`Command` (or a :class:`ScpiCommandError` carrying the SCPI error
code the instrument pushes), and formats replies. It knows no transport and no physics.

Layers, as in PyVISA: raw bytes -> :class:`MessageScanner` (messages end at LF, except inside a definite-length
block, which is skipped by its length header because its bytes may contain 0x0A) -> :func:`parse_command`
(header and typed parameters) -> the instrument.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.errors import BlockError, ScpiError
from eqprop_hil.protocols.scpi_commands import COMMANDS, CommandSpec, Param

# Standard SCPI / IEEE 488.2 error messages (negative) and the board's device-specific ones (positive).
ERROR_MESSAGES: dict[int, str] = {
    0: "No error",
    -101: "Invalid character",
    -102: "Syntax error",
    -103: "Invalid separator",
    -104: "Data type error",
    -108: "Parameter not allowed",
    -109: "Missing parameter",
    -113: "Undefined header",
    -120: "Numeric data error",
    -138: "Suffix not allowed",
    -141: "Invalid character data",
    -151: "Invalid string data",
    -160: "Block data error",
    -161: "Invalid block data",
    -168: "Block data not allowed",
    -200: "Execution error",
    -221: "Settings conflict",
    -222: "Data out of range",
    -223: "Too much data",
    -224: "Illegal parameter value",
    -350: "Queue overflow",
    -363: "Input buffer overrun",
    101: "Block length does not match the topology",
    102: "Non-finite value in block",
    110: "Nudge current exceeds compliance",
    120: "Integrity check failed; message not executed",
    130: "Instance mismatch; not executed",
    131: "Request id conflict; not executed",
    132: "Request id stale; not executed",
    140: "Device busy; command not executed",
}

MAX_LINE_BYTES = 65536  # text (outside blocks) of one message; longer input is discarded with -363
MAX_ERROR_MESSAGE = 255  # characters of one error-queue message, as IEEE 488.2 allows


class ScpiCommandError(ScpiError):
    """A command the instrument refuses, with the SCPI error code it pushes onto its error queue.

    ``detail`` quotes the offending text or value; ``entry`` is the queue entry ``<code>,"<message>"``.
    """

    def __init__(self, code: int, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        self.prefix = b""  # scanner errors: the message bytes before the defect
        self.entry = format_error_entry(code, detail)
        super().__init__(self.entry)


@dataclass(frozen=True)
class Command:
    """One parsed program message: which command, its typed arguments (numbers, bools, choices, arrays)."""

    spec: CommandSpec
    args: tuple
    raw: bytes

    @property
    def key(self) -> str:
        """Short canonical header, e.g. ``"PULS:MATR"`` or ``"SYST:ERR?"``: what the instrument dispatches on."""
        return self.spec.key


# ---------------------------------------------------------------------------------------------------- errors


def format_error_entry(code: int, detail: str = "") -> str:
    """``-222,"Data out of range;edge 5 not in 0..2"``: the standard message, then ``;`` and the detail."""
    message = ERROR_MESSAGES.get(code, "Device-specific error")
    if detail:
        message = f"{message};{detail}"
    message = message.replace("\n", " ").replace('"', "'")[:MAX_ERROR_MESSAGE]
    return f'{code},"{message}"'


_ENTRY = re.compile(r'^\s*([+-]?\d+)\s*,\s*"(.*)"\s*$', re.S)


def parse_error_entry(reply: str) -> tuple[int, str]:
    """Inverse of :func:`format_error_entry`: ``'-222,"Data out of range"'`` -> ``(-222, "Data out of range")``."""
    match = _ENTRY.match(reply)
    if not match:
        raise ScpiError(f"not an error-queue entry '<code>,\"<message>\"': {reply!r}")
    return int(match.group(1)), match.group(2).replace('""', '"')


# ---------------------------------------------------------------------------------------------------- replies


def format_number(value: float | int | bool) -> str:
    """NR1 for integers and booleans (``1``/``0``), shortest round-trip NR3 for floats (``0.5``, ``1e-05``)."""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not math.isfinite(value):
        raise ScpiError(f"cannot format non-finite number {value!r} as SCPI numeric data")
    return repr(value)


def format_numbers(values: object) -> str:
    """Comma-separated numbers, e.g. topology sizes ``64,256,10``."""
    return ",".join(format_number(v) for v in values)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------- scanning


_SCAN_SPECIAL = re.compile(rb'[\n#" \t]')  # the bytes MessageScanner.feed looks at one by one
_SCAN_STOPS = frozenset(b'\n#" \t')


class MessageScanner:
    """Splits an incoming byte stream into program messages.

    A message ends at LF (a CR before it is dropped), except that a definite-length block ``#<n><len>`` in the
    parameter part is skipped by its length, so block bytes equal to 0x0A or ``"`` never end or confuse a
    message. A malformed block header is left for the parser to report. Text beyond MAX_LINE_BYTES without LF
    yields a ``ScpiCommandError(-363)`` and is discarded up to the next LF. A block header declaring more than
    ``MAX_BLOCK_BYTES`` yields -223 at once, and the declared number of bytes, then everything up to the next
    LF, is discarded (spec 1.3): no byte of a refused block is ever parsed as a command. Errors carry
    ``prefix``, the message bytes before the defect (a tag there lets the board answer the error tagged).

    :meth:`expire` abandons an incomplete message (the board calls it after the message timeout of spec 1.3).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # where scanning resumes
        self._params = False  # past the header (a block may start)
        self._quote = False
        self._text = 0  # bytes of text (outside blocks) in the current message
        self._discard = False  # overrun or refused block: dropping bytes up to the next LF
        self._skip = 0  # bytes of a refused block still to drop before the discard to LF
        self._in_block = False  # waiting for the rest of a block
        self._block_end = -1  # buffer index just past the last complete block of this message

    @property
    def pending(self) -> bool:
        """True while part of a message (or a discard) is waiting for more bytes."""
        return bool(self._buf) or self._discard or self._skip > 0

    def expire(self) -> ScpiCommandError | None:
        """Abandon the incomplete message (message timeout): the error the board queues, or None when only a
        discard was under way (its error was reported when it began)."""
        error: ScpiCommandError | None
        if self._discard or self._skip:
            error = None
        elif self._in_block:
            error = ScpiCommandError(-160, "truncated block: its declared length did not arrive in time")
        elif self._block_end >= 0 and not bytes(self._buf[self._block_end :]).strip(b" \t\r"):
            error = ScpiCommandError(-160, "no LF after the block: end every message with LF")
        elif self._buf:
            error = ScpiCommandError(-102, f"message not terminated by LF: {bytes(self._buf[:24])!r}")
        else:
            error = None
        if error is not None:
            error.prefix = bytes(self._buf[:64])
        del self._buf[:]
        self._reset()
        self._skip = 0
        return error

    def feed(self, data: bytes) -> list[bytes | ScpiCommandError]:
        """Add received bytes; return every message completed by them (without the terminator)."""
        self._buf += data
        out: list[bytes | ScpiCommandError] = []
        buf = self._buf
        while self._pos < len(buf):
            if self._skip:
                take = min(self._skip, len(buf) - self._pos)
                del buf[self._pos : self._pos + take]
                self._skip -= take
                continue
            byte = buf[self._pos]
            if byte not in _SCAN_STOPS and not self._discard:  # a run of plain text: jump to its end at once
                match = _SCAN_SPECIAL.search(buf, self._pos)
                end = len(buf) if match is None else match.start()
                self._text += end - self._pos
                self._pos = end
                if self._text > MAX_LINE_BYTES:
                    error = ScpiCommandError(-363, f"more than {MAX_LINE_BYTES} bytes of text without LF")
                    error.prefix = bytes(buf[:64])
                    out.append(error)
                    self._discard = True
                continue
            if self._discard:
                nl = buf.find(b"\n", self._pos)
                if nl < 0:
                    del buf[:]
                    self._pos = 0
                    break
                del buf[: nl + 1]
                self._reset()
                continue
            if byte == 0x0A:
                message = bytes(buf[: self._pos])
                del buf[: self._pos + 1]
                self._reset()
                out.append(message[:-1] if message.endswith(b"\r") else message)
                continue
            if byte == 0x23 and self._params and not self._quote:  # '#'
                skip = self._block_length()
                if skip is None:
                    self._in_block = True
                    break  # header not complete yet
                if skip < 0:  # declared more than MAX_BLOCK_BYTES: refuse, drop its declared bytes, then to LF
                    declared = -skip
                    error = ScpiCommandError(-223, f"block declares {declared} bytes, more than the "
                                                   f"{ieee_block.MAX_BLOCK_BYTES} allowed; its bytes are discarded")
                    error.prefix = bytes(buf[: self._pos])
                    out.append(error)
                    del buf[: self._pos]
                    self._pos = 0
                    self._skip = declared
                    self._discard = True
                    continue
                if skip > 0:
                    if self._pos + skip > len(buf):
                        self._in_block = True
                        break  # wait for the rest of the block
                    self._in_block = False
                    self._pos += skip
                    self._block_end = self._pos
                    continue
            elif byte == 0x22:  # '"'
                self._quote = not self._quote
            elif byte in (0x20, 0x09) and not self._quote:
                self._params = True
            self._pos += 1
            self._text += 1
            if self._text > MAX_LINE_BYTES:
                error = ScpiCommandError(-363, f"more than {MAX_LINE_BYTES} bytes of text without LF")
                error.prefix = bytes(buf[:64])
                out.append(error)
                self._discard = True
        return out

    def _block_length(self) -> int | None:
        """Total bytes of the block starting at the cursor; 0 if it is not a valid header; None if incomplete;
        minus (header + declared length) if it declares more than MAX_BLOCK_BYTES."""
        head = bytes(self._buf[self._pos : self._pos + 11])
        if len(head) < 2:
            return None
        if not head[1:2].isdigit() or head[1:2] == b"0":
            return 0
        n = int(head[1:2])
        if len(head) < 2 + n:
            return None
        digits = head[2 : 2 + n]
        if not digits.isdigit():
            return 0
        if int(digits) > ieee_block.MAX_BLOCK_BYTES:
            return -(2 + n + int(digits))
        return 2 + n + int(digits)

    def _reset(self) -> None:
        self._pos = 0
        self._params = False
        self._quote = False
        self._text = 0
        self._discard = False
        self._in_block = False
        self._block_end = -1


# ---------------------------------------------------------------------------------------------------- parsing

_NR1 = re.compile(rb"^[+-]?\d+$")
_NRF = re.compile(rb"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NONFINITE = re.compile(rb"^[+-]?(nan|inf|infinity)$", re.I)
_SUFFIXED = re.compile(rb"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?[A-Za-z]+$")
_HEADER_CHARS = re.compile(rb"^[*:]?[A-Za-z][A-Za-z0-9:]*\??$")


def _node_matches(token: str, mnemonic: str) -> bool:
    """SCPI mnemonic rule: the short form (upper-case letters and digits) or the whole word, any case."""
    short = "".join(c for c in mnemonic if c.isupper() or c.isdigit())
    return token.upper() in (short, mnemonic.upper())


def _node_forms(mnemonic: str) -> tuple[str, ...]:
    """The upper-cased spellings :func:`_node_matches` accepts for one node: short form and whole word."""
    short = "".join(c for c in mnemonic if c.isupper() or c.isdigit())
    return tuple(dict.fromkeys((short, mnemonic.upper())))


def _header_table() -> dict[tuple[bool, str], CommandSpec]:
    """Every header spelling the board accepts, upper-cased without leading ':' or trailing '?', keyed with
    whether it is a query -> the first command (in table order) that accepts it: the same answer as matching
    node by node with :func:`_node_matches`, in one dict lookup per message."""
    table: dict[tuple[bool, str], CommandSpec] = {}
    for spec in COMMANDS:
        for variant in spec.variants:
            spellings = [""]
            for i, mnemonic in enumerate(variant):
                sep = ":" if i else ""
                spellings = [f"{done}{sep}{form}" for done in spellings for form in _node_forms(mnemonic)]
            for spelling in spellings:
                table.setdefault((spec.query, spelling), spec)
    return table


_HEADERS = _header_table()


def match_header(header: str) -> CommandSpec:
    """Find the command a header names (``phas``, ``:SYST:ERR:NEXT?``, ``*idn?``); -113 if none does."""
    spec = _HEADERS.get((header.endswith("?"), header.rstrip("?").lstrip(":").upper()))
    if spec is None:
        raise ScpiCommandError(-113, f"{header!r}")
    return spec


def _tokens(data: bytes) -> list[bytes]:
    """Split the parameter part at commas, keeping blocks and quoted strings whole."""
    tokens: list[bytes] = []
    pos = 0
    n = len(data)
    while True:
        while pos < n and data[pos] in b" \t":
            pos += 1
        if pos >= n:
            if tokens:
                raise ScpiCommandError(-109, f"parameter missing after the last comma in {_excerpt(data)}")
            return tokens
        if data[pos : pos + 1] == b"#":
            try:
                _, end = ieee_block.split_block(data, pos)
            except BlockError as e:
                code = -223 if "more than" in str(e) else -160
                raise ScpiCommandError(code, str(e)) from e
            tokens.append(data[pos:end])
            pos = end
        elif data[pos : pos + 1] == b'"':
            end = pos + 1
            while True:
                end = data.find(b'"', end)
                if end < 0:
                    raise ScpiCommandError(-151, f"unterminated string in {_excerpt(data)}")
                if data[end + 1 : end + 2] == b'"':
                    end += 2
                    continue
                break
            tokens.append(data[pos : end + 1])
            pos = end + 1
        else:
            end = data.find(b",", pos)
            end = n if end < 0 else end
            token = data[pos:end].rstrip(b" \t")
            if not token:
                raise ScpiCommandError(-109, f"empty parameter in {_excerpt(data)}")
            if b";" in token:
                raise ScpiCommandError(-102, f"compound messages (';') are not supported: {_excerpt(token)}")
            if b'"' in token or b"#" in token or b" " in token or b"\t" in token:
                raise ScpiCommandError(-103, f"unexpected character in parameter {_excerpt(token)}")
            tokens.append(token)
            pos = end
        while pos < n and data[pos] in b" \t":
            pos += 1
        if pos >= n:
            return tokens
        if data[pos : pos + 1] != b",":
            raise ScpiCommandError(-103, f"expected ',' between parameters, got {_excerpt(data[pos:])}")
        pos += 1


def _excerpt(data: bytes) -> str:
    return ieee_block.quote_bytes(data, 24)


def _convert(param: Param, token: bytes) -> object:
    """One token -> its typed value, checking the static range of the parameter."""
    is_block = token.startswith(b"#")
    if param.kind == "block":
        if not is_block:
            raise ScpiCommandError(-104, f"{param.name} must be a definite-length block, got {_excerpt(token)}")
        payload, _ = ieee_block.split_block(token)
        try:
            values = ieee_block.decode_payload(payload, param.datatype)  # type: ignore[arg-type]
        except BlockError as e:
            raise ScpiCommandError(-161, f"{param.name}: {e}") from e
        if values.dtype.kind == "f" and not np.all(np.isfinite(values)):
            raise ScpiCommandError(102, f"{param.name} contains NaN or infinity")
        _check_range(param, values)
        return values
    if is_block:
        raise ScpiCommandError(-168, f"{param.name} takes no block, got {_excerpt(token)}")
    if token.startswith(b'"'):
        raise ScpiCommandError(-104, f"{param.name} takes no string, got {_excerpt(token)}")
    if param.kind in ("int", "float") and not (_NR1.match(token) or _NRF.match(token)):
        if _NONFINITE.match(token):
            raise ScpiCommandError(-120, f"{param.name} must be a finite number, got {_excerpt(token)}")
        if _SUFFIXED.match(token):
            raise ScpiCommandError(-138, f"{param.name} takes no unit suffix (base SI units), got {_excerpt(token)}")
    if param.kind == "int":
        if not _NR1.match(token):
            code = -120 if token[:1] in b"+-.0123456789" else -104
            raise ScpiCommandError(code, f"{param.name} must be an integer, got {_excerpt(token)}")
        value: object = int(token)
    elif param.kind == "float":
        if not _NRF.match(token):
            code = -120 if token[:1] in b"+-.0123456789" else -104
            raise ScpiCommandError(code, f"{param.name} must be a decimal number, got {_excerpt(token)}")
        value = float(token)
        if not math.isfinite(value):
            raise ScpiCommandError(-120, f"{param.name} overflows, got {_excerpt(token)}")
    elif param.kind == "bool":
        text = token.upper()
        if text not in (b"ON", b"OFF", b"1", b"0"):
            raise ScpiCommandError(-141, f"{param.name} must be ON, OFF, 1 or 0, got {_excerpt(token)}")
        return text in (b"ON", b"1")
    else:  # choice
        text = token.decode("ascii", "replace")
        for choice in param.choices:
            if _node_matches(text, choice):
                return choice.upper()
        raise ScpiCommandError(-141, f"{param.name} must be one of {'|'.join(param.choices)}, got {_excerpt(token)}")
    _check_range(param, value)
    return value


def _check_range(param: Param, value: object) -> None:
    arr = np.asarray(value)
    if arr.size == 0:
        return
    if param.lo is not None and arr.min() < param.lo:
        raise ScpiCommandError(-222, f"{param.name} {float(arr.min()):g} below {param.lo:g} {param.unit}".rstrip())
    if param.hi is not None and arr.max() > param.hi:
        raise ScpiCommandError(-222, f"{param.name} {float(arr.max()):g} above {param.hi:g} {param.unit}".rstrip())


def parse_command(message: bytes) -> Command:
    """Parse one program message (no terminator) into a :class:`Command`.

    Raises :class:`ScpiCommandError` with the SCPI code for every defect: unknown header (-113), missing or
    extra parameters (-109/-108), malformed numbers (-120), wrong data types (-104, -168), bad blocks
    (-160/-161/-223, 102 for NaN), static ranges (-222). Compound messages (``;``) are not supported (-102).
    """
    text = message.lstrip(b" \t")  # not rstrip: a block's last bytes may be 0x20 or 0x09 (pulse counts 32, 9)
    if not text.rstrip(b" \t"):
        raise ScpiCommandError(-102, "empty message")
    split = re.search(rb"[ \t]", text)
    head, rest = (text[: split.start()], text[split.end() :]) if split else (text, b"")
    if b";" in head:
        raise ScpiCommandError(-102, f"compound messages (';') are not supported: {_excerpt(head)}")
    if not _HEADER_CHARS.match(head):
        code = -101 if any(b > 0x7E or b < 0x20 for b in head) else -102
        raise ScpiCommandError(code, f"malformed header {_excerpt(head)}")
    spec = match_header(head.decode("ascii"))
    tokens = _tokens(rest)
    params = spec.params
    args: list[object] = []
    if params and params[-1].kind == "floats":
        fixed = params[:-1]
        if len(tokens) < len(fixed) + 1:
            raise ScpiCommandError(-109, f"{spec.key} needs at least {len(fixed) + 1} parameters")
        for param, token in zip(fixed, tokens):
            args.append(_convert(param, token))
        scalar = Param(params[-1].name, "float", params[-1].unit, params[-1].lo, params[-1].hi)
        args.append(tuple(_convert(scalar, t) for t in tokens[len(fixed) :]))
        return Command(spec, tuple(args), message)
    required = sum(1 for p in params if not p.optional)
    if len(tokens) < required:
        raise ScpiCommandError(-109, f"{spec.key} needs {required} parameter(s), got {len(tokens)}")
    if len(tokens) > len(params):
        raise ScpiCommandError(-108, f"{spec.key} takes {len(params)} parameter(s), got {len(tokens)}")
    for param, token in zip(params, tokens):
        args.append(_convert(param, token))
    args.extend(None for _ in params[len(tokens) :])
    return Command(spec, tuple(args), message)
