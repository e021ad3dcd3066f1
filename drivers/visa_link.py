"""The VISA layer of the analog board: locked transactions, tagged request/reply, reconnect-and-resend.

PyVISA's layers (bytes -> terminated text -> typed values -> query) plus what lab users ask of a driver: every
transaction holds the instrument's lock, is logged at DEBUG and counted in ``stats``. Two kinds of exchange:

- untagged, plain SCPI (:meth:`VisaLink.ask`, :meth:`VisaLink.collect_errors`, :meth:`VisaLink.run`): only to
  bootstrap the tag at open (revision, then instance and newest request id: every value the driver keeps is read
  again tagged) and right after a reconnect; a query the instrument refused sends no reply (IEEE 488.2), so
  after a silent query the error queue is asked before the link is blamed;
- tagged (:meth:`VisaLink.transact`, protocols/analog_board.md section 4): every other message, fenced with the
  bound instance and numbered with a request id; its reply carries the tag, so replies to other requests are
  discarded, and after any anomaly the same bytes are resent on a new connection: the board's duplicate cache
  answers a repeat without running it again.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pyvisa
from pyvisa import errors as visa_errors

from eqprop_hil.drivers.errors import AccessDenied, InstanceChanged, InstrumentError, LinkError, ReplyError
from eqprop_hil.drivers.timeouts import visa_ms
from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.auth import AUTH_REFUSED_LINE, TOKEN_ENV, auth_query
from eqprop_hil.protocols.errors import ScpiError
from eqprop_hil.protocols.scpi import parse_error_entry
from eqprop_hil.protocols.scpi_integrity import (
    INTEGRITY_ERROR, REPLY_PREFIX_BYTES, IntegrityError, crc32, decode_reply, encode_request,
)
from eqprop_hil.protocols.scpi_tags import (
    ID_MODULUS, INSTANCE_MISMATCH, REPLY_PREFIX, REQUEST_CONFLICT, REQUEST_STALE, TAG_CHARS, TagError, make_tag,
    parse_tag, tagged,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
LINK_ERRORS = (visa_errors.VisaIOError, OSError, EOFError)
_REFUSED = AUTH_REFUSED_LINE.decode("ascii")
MAX_REPLY_TEXT = 65536  # bytes of reply text (blocks not counted) before a reply without LF is given up
_STATUS_END = re.compile(rb"[,\n]")
_SPECIAL = re.compile(rb'["#\n]')
_TERMCHAR_EN = pyvisa.constants.VI_ATTR_TERMCHAR_EN


class VisaLink:
    """One VISA session to a SCPI instrument: ``stats``, one re-entrant lock, bounded reconnect-and-retry."""

    def __init__(self, resource: str, *, timeout_s: float, retries: int, backend: str,
                 token: str | None = None) -> None:
        self.resource_name = resource
        self.token = token  # sent first on every (re)connection when set (protocols/analog_board.md 1.1)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.lock = threading.RLock()  # one per instrument; re-entrant so a caller can group transactions
        self.stats: dict[str, int] = dict.fromkeys(
            ("bytes_sent", "bytes_received", "round_trips", "pulses_sent", "commands", "reconnects", "retries",
             "instrument_errors", "integrity_refused", "integrity_mismatches"), 0)
        self.crc = False  # CRC-32 on every message and reply (protocols/analog_board.md 1.2): enable_integrity()
        self.instance: str | None = None  # the instance every tagged message is fenced with (spec 4.2)
        self.next_id = 0  # request id of the next tagged message
        self._unsettled: tuple[int, int] | None = None  # (digest, request id) of a message whose fate is unknown
        self.stats.update(dict.fromkeys(("resent_same_id", "stale_replies", "id_resyncs"), 0))
        try:
            self._rm = pyvisa.ResourceManager(backend)
        except (OSError, ValueError) as e:
            raise LinkError(f"cannot load VISA backend {backend!r}: {e}; try backend='@py'") from e
        self.res: Any = None
        self.open()

    def close(self) -> None:
        """Release the VISA session (the resource manager stays: it is shared by every session of the backend)."""
        if self.res is not None:
            try:
                self.res.close()
            finally:
                self.res = None

    def open(self) -> None:
        try:
            self.res = self._rm.open_resource(
                self.resource_name, read_termination="\n", write_termination="\n", timeout=visa_ms(self.timeout_s)
            )
        except LINK_ERRORS as e:
            raise LinkError(f"cannot open {self.resource_name!r}: {e}; is the instrument (or emulator) running?") from e
        if self.resource_name.upper().endswith("::SOCKET"):
            self._no_delay()
        if self.token is not None:
            try:
                self._authenticate()
            except BaseException:
                self.close()
                raise
        if self.crc:  # the mode belongs to the connection: ask again (a refusal shows in the queue drained next)
            self._write_raw(encode_request(b"SYST:INT ON"))

    def enable_integrity(self) -> None:
        """Put a CRC-32 on every message from now on and ask the instrument to require one (``SYST:INT ON``).

        Messages that carry a CRC are checked, and answered with one, whatever the instrument's mode, so a
        power cycle (mode back to OFF) leaves every exchange of this link protected.
        """
        self.crc = True
        self.write("SYST:INT ON")
        self.check("SYST:INT ON")

    def _authenticate(self) -> None:
        """Give the shared token as the first message; the instrument answers 1, or -203 and closes."""
        try:
            self.res.write(auth_query(self.token))
            reply = self.res.read()
        except LINK_ERRORS as e:
            raise LinkError(f"no answer to the authentication on {self.resource_name!r}: {e}") from e
        log.debug("-> SYST:AUTH? <token hidden>  <- %s", reply)
        if reply == _REFUSED:
            raise AccessDenied(f"{self.resource_name} refused the token (from token= or ${TOKEN_ENV}); "
                               "nothing was executed")
        if reply != "1":
            raise ReplyError(f"SYST:AUTH? answered {reply!r}, expected 1")

    def _no_delay(self) -> None:
        """Switch Nagle's algorithm off on a raw-socket session.

        A set is followed at once by ``SYST:ERR?``: two small writes. With Nagle on, the second waits until the
        instrument ACKs the first, which delayed ACK postpones by ~40 ms: 44 ms per set instead of 0.1 ms.
        pyvisa-py 0.8 registers the wrong setter for VI_ATTR_TCPIP_NODELAY (it raises UnknownAttribute), so
        fall back to the option on the backend session's socket when the attribute call fails.
        """
        try:
            self.res.set_visa_attribute(pyvisa.constants.VI_ATTR_TCPIP_NODELAY, True)
            return
        except Exception:  # noqa: BLE001 - any backend's refusal; the fallback below decides
            log.debug("VI_ATTR_TCPIP_NODELAY refused by the backend", exc_info=True)
        session = getattr(self.res.visalib, "sessions", {}).get(self.res.session)
        sock = getattr(session, "interface", None)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            log.warning("cannot disable Nagle on %s: expect ~40 ms per set command", self.resource_name)

    def reconnect(self) -> None:
        self.stats["reconnects"] += 1
        log.warning("reconnecting to %s", self.resource_name)
        for attempt in range(self.retries + 1):
            try:
                self.res.close()
            except LINK_ERRORS:
                log.debug("closing the broken session failed", exc_info=True)
            self.open()
            try:  # drain what the failed transaction left; a reply mangled on the wire here means: open again
                stale = self.collect_errors()
                if self.crc and self.ask("SYST:INT?") != "1":  # SYST:INT ON of open() was lost: a corrupted
                    raise ReplyError("integrity mode is off after reconnecting")  # field must never run as plain
            except (*LINK_ERRORS, ReplyError) as e:
                if attempt == self.retries:
                    raise
                log.warning("draining the error queue after reconnecting failed (%s); reconnecting again", e)
                continue
            if stale:
                log.warning("error queue after reconnect: %s", stale)
            return

    def refused(self, error: Exception, what: str) -> None:
        """After a silent query: a refused query sends no reply, so ask the error queue before blaming the link."""
        if not (isinstance(error, visa_errors.VisaIOError) and error.error_code == pyvisa.constants.VI_ERROR_TMO):
            return
        try:
            entries = self.collect_errors()
        except (*LINK_ERRORS, ReplyError):
            return  # the link is the problem after all
        if entries:
            self.stats["instrument_errors"] += len(entries)
            raise InstrumentError(entries[0][0], entries[0][1], what) from error

    def run(self, operation: Callable[[], T], *, idempotent: bool = True, what: str = "") -> T:
        """One locked transaction with bounded reconnect-and-retry (only if ``idempotent``)."""
        with self.lock:
            if self.res is None:
                raise LinkError(f"{what}: the link to {self.resource_name} is closed")
            for attempt in range(self.retries + 1):
                try:
                    return operation()
                except InstrumentError as e:  # a set's error queue named the refusal
                    if not self._resend(e, idempotent, attempt, what):
                        raise
                except (*LINK_ERRORS, ReplyError) as e:
                    log.warning("%s failed (attempt %d): %s", what or "transaction", attempt + 1, e)
                    try:
                        self.refused(e, what)
                    except InstrumentError as refusal:  # a silent query: the queue says it was refused
                        if not self._resend(refusal, idempotent, attempt, what):
                            raise
                        continue
                    try:
                        self.reconnect()
                    except (*LINK_ERRORS, ReplyError, LinkError) as again:
                        raise LinkError(f"{what}: link lost and reconnect failed: {again}") from e
                    if not idempotent:
                        if isinstance(e, ReplyError):
                            raise
                        raise LinkError(f"{what}: no answer ({e}); not resent because it is not idempotent, "
                                        "read the weights back to learn whether it was applied") from e
                    if attempt == self.retries:
                        if isinstance(e, ReplyError):
                            raise
                        raise LinkError(f"{what}: no answer after {self.retries + 1} attempts: {e}") from e
                    self.stats["retries"] += 1
        raise LinkError(f"{what}: unreachable")  # the loop always returns or raises

    def _resend(self, error: InstrumentError, idempotent: bool, attempt: int, what: str) -> bool:
        """True if ``error`` is a CRC refusal (nothing was executed) of an idempotent transaction with retries
        left; non-idempotent ones are left to the caller (hil/insitu/recovery.py asks PULS:COUN?)."""
        if error.code != INTEGRITY_ERROR:
            return False
        self.stats["integrity_refused"] += 1
        if not idempotent or attempt == self.retries:
            return False
        self.stats["retries"] += 1
        log.warning("%s arrived corrupted (CRC refused, not executed); resending", what or "transaction")
        return True

    # ------------------------------------------------------------------------------------------ primitives
    def write(self, command: str, block: np.ndarray | None = None, datatype: str = "f") -> None:
        self.stats["commands"] += 1
        if self.crc:  # the message with its CRC-32 field, built here so that the CRC covers the block bytes
            data = None if block is None else ieee_block.encode_block(np.ascontiguousarray(block.ravel()), datatype)
            log.debug("-> %s%s (CRC-32)", command, "" if data is None else f"<block of {len(data)} bytes>")
            self._write_raw(encode_request(command.encode("ascii"), data or b""))
        elif block is None:
            log.debug("-> %s", command)
            self.res.write(command)
            self.stats["bytes_sent"] += len(command) + 1
        else:
            payload = block.size * np.dtype(datatype).itemsize
            log.debug("-> %s<block %d x %s, %d bytes>", command, block.size, datatype, payload)
            self.res.write_binary_values(command, np.ascontiguousarray(block.ravel()), datatype=datatype,
                                         is_big_endian=False)
            self.stats["bytes_sent"] += len(command) + 2 + len(str(payload)) + payload + 1

    def _write_raw(self, message: bytes) -> None:
        self.res.write_raw(message + b"\n")
        self.stats["bytes_sent"] += len(message) + 1

    def _verified(self, data: bytes) -> bytes:
        """The reply without its CRC prefix, once the CRC matches; a mismatch is a bad reply (ReplyError)."""
        try:
            return decode_reply(data)
        except IntegrityError as e:
            self.stats["integrity_mismatches"] += 1
            raise ReplyError(f"reply failed its integrity check: {e}") from e

    def read(self) -> str:
        try:
            reply = self.res.read()
        except UnicodeDecodeError as e:  # a corrupted byte in a text reply: a bad reply, retried like one
            raise ReplyError(f"reply is not ASCII text: {e.object[:40]!r}") from e
        if reply == _REFUSED:  # the instrument's access gate, not the firmware: no token was given
            raise AccessDenied(f"{self.resource_name} requires a shared token: pass token= or set ${TOKEN_ENV}; "
                               "nothing was executed")
        self.stats["round_trips"] += 1
        self.stats["bytes_received"] += len(reply) + 1
        log.debug("<- %s", reply)
        if self.crc:
            reply = self._verified(reply.encode("ascii")).decode("ascii")
        return reply

    def ask(self, command: str) -> str:
        self.write(command)
        return self.read()

    def collect_errors(self) -> list[tuple[int, str]]:
        entries: list[tuple[int, str]] = []
        for _ in range(40):  # the queue holds at most 32
            reply = self.ask("SYST:ERR?")
            try:
                code, message = parse_error_entry(reply)
            except ScpiError as e:
                raise ReplyError(str(e)) from e
            if code == 0:
                return entries
            entries.append((code, message))
        raise ReplyError("error queue never reported empty")

    def check(self, command: str) -> None:
        entries = self.collect_errors()
        if entries:
            self.stats["instrument_errors"] += len(entries)
            code, message = entries[0]
            more = f" (+{len(entries) - 1} more: {entries[1:]})" if len(entries) > 1 else ""
            raise InstrumentError(code, message + more, command)

    # ------------------------------------------------------------------------------------------ tagged (protocol 2)
    def transact(self, text: str, block: np.ndarray | bytes | None = None, datatype: str = "f", *,
                 expect: str = "none") -> bytes:
        """One tagged transaction (protocols/analog_board.md section 4): the message with the bound instance and
        a request id, then the reply with the same tag; returns the reply body (after ``0,``).

        Anomalies (timeout, closed link, a reply that fails its CRC or cannot be parsed) reconnect and resend the
        **same bytes**: the board answers a repeat from its duplicate-request cache, so nothing runs twice and no
        stale reply is taken for this one (replies with another tag are discarded). ``expect``: ``"none"`` (a
        set), ``"text"``, ``"block"`` or ``"text,block"`` (``STEP?``). A refusal raises InstrumentError; 130
        raises InstanceChanged; busy (140) and a CRC refusal (120) are resent, bounded (nothing ran).
        """
        if self.instance is None:
            raise LinkError("no instance bound: the driver must read SYST:INST? first")
        payload = b""
        if isinstance(block, (bytes, bytearray)):
            payload = ieee_block.encode_bytes(bytes(block))
        elif block is not None:
            payload = ieee_block.encode_block(np.ascontiguousarray(np.asarray(block).ravel()), datatype)  # type: ignore[arg-type]
        digest = crc32(text.encode("ascii") + payload)
        with self.lock:
            if self.res is None:
                raise LinkError(f"{text.split(' ')[0]}: the link to {self.resource_name} is closed")
            fresh = not (self._unsettled is not None and self._unsettled[0] == digest)
            if not fresh:
                rid = self._unsettled[1]  # type: ignore[index]  # the same command after a failure: same id
                self.stats["resent_same_id"] += 1
            else:
                rid = self._allocate()
            message = tagged(text.encode("ascii"), self.instance, rid)
            wire = encode_request(message, payload) if self.crc else message + payload
            what = text.strip()[:40]
            for attempt in range(self.retries + 1):
                try:
                    self._write_raw(wire)
                    code, body = self._read_tagged(make_tag(self.instance, rid), expect)
                except (*LINK_ERRORS, ReplyError, TagError) as e:
                    self._unsettled = (digest, rid)
                    log.warning("%s failed (attempt %d): %s; reconnecting to resend the same request id",
                                what, attempt + 1, e)
                    try:
                        self.reconnect()
                    except (*LINK_ERRORS, ReplyError, LinkError) as again:
                        raise LinkError(f"{what}: link lost and reconnect failed: {again}") from e
                    if attempt == self.retries:
                        if isinstance(e, ReplyError):
                            raise
                        raise LinkError(f"{what}: no answer after {self.retries + 1} attempts: {e}") from e
                    self.stats["retries"] += 1
                    continue
                if code in (INTEGRITY_ERROR, 140) and attempt < self.retries:  # nothing ran: resend
                    self.stats["retries"] += 1
                    if code == INTEGRITY_ERROR:
                        self.stats["integrity_refused"] += 1
                    continue
                if code in (REQUEST_CONFLICT, REQUEST_STALE) and fresh and attempt < self.retries:
                    # another controller moved the board's id space on; this message never ran anywhere (spec
                    # 4.2), so it may go again with an id after the board's newest
                    self.next_id = (self._last_request_id() + 1) % ID_MODULUS
                    rid = self._allocate()
                    message = tagged(text.encode("ascii"), self.instance, rid)
                    wire = encode_request(message, payload) if self.crc else message + payload
                    self.stats["id_resyncs"] += 1
                    continue
                self._unsettled = None
                if code == 0:
                    return body
                self.stats["instrument_errors"] += 1
                entry = body.decode("ascii", "replace")
                try:
                    _, message_text = parse_error_entry(f"{code},{entry}")
                except ScpiError:
                    message_text = entry
                if code == INTEGRITY_ERROR:
                    self.stats["integrity_refused"] += 1
                if code == INSTANCE_MISMATCH:
                    actual = message_text.rsplit("board is ", 1)[-1].strip()
                    raise InstanceChanged(self.instance, actual, what)
                raise InstrumentError(code, message_text, what)
        raise LinkError(f"{what}: unreachable")  # the loop returns or raises

    def _last_request_id(self) -> int:
        """``SYST:REQ:LAST?`` untagged, right after a tagged reply: copies of that reply (a duplicated reply) are
        skipped by their tag, which no untagged reply starts with; the answer must be an integer."""
        self.write("SYST:REQ:LAST?")
        for _ in range(64):
            reply = self.read()
            if not reply.startswith('"'):
                try:
                    return int(reply)
                except ValueError as e:
                    raise ReplyError(f"SYST:REQ:LAST? must answer an integer, got {reply[:40]!r}") from e
            self.stats["stale_replies"] += 1
        raise ReplyError("64 tagged replies before the answer to SYST:REQ:LAST?: the link is out of step")

    def _allocate(self) -> int:
        rid = self.next_id
        self.next_id = (self.next_id + 1) % ID_MODULUS
        return rid

    def _read_tagged(self, tag: bytes, expect: str) -> tuple[int, bytes]:
        """Read replies until the one carrying ``tag``; others (stale, duplicated) are read whole and dropped."""
        for _ in range(64):
            got, code, body = self._read_one_tagged(expect, tag)
            if got == tag:
                return code, body
            self.stats["stale_replies"] += 1
            log.warning("discarded a reply to another request (%s, expected %s)", got[1:-1], tag[1:-1])
        raise ReplyError("64 replies to other requests in a row: the link is out of step")

    def _read_one_tagged(self, expect: str, tag: bytes) -> tuple[bytes, int, bytes]:
        """One tagged reply: (its tag, status code, body). A reply of another request is read generically.

        Few VISA calls per reply (each costs ~10 us of pyvisa overhead): one bounded read through the first LF,
        which holds the whole reply unless a block's bytes contain 0x0A; then each block's missing bytes in
        ONE exact read (termination character off for it, see :meth:`_read_exact`) and the text after it.
        """
        lead = REPLY_PREFIX_BYTES if self.crc else 0
        buf = bytearray(self._read_text())
        start = lead + REPLY_PREFIX
        got = bytes(buf[lead : lead + TAG_CHARS])
        if len(buf) < start + 2 or buf[lead + TAG_CHARS : start] != b"," or got[:1] != b'"':
            raise ReplyError(f"expected a tagged reply '\"<tag>\",', got {bytes(buf[: start + 2])!r}")
        if got != tag:  # the awaited tag is well-formed by construction; any other is checked
            try:
                parse_tag(got)
            except ScpiError as e:
                raise ReplyError(f"malformed reply tag {got!r}") from e
        match = _STATUS_END.search(buf, start)
        assert match is not None  # buf ends with LF
        sep = match.start()
        status = bytes(buf[start:sep])
        if len(status) > 7:
            raise ReplyError(f"reply status too long: {status[:8]!r}")
        if buf[sep] == 0x2C:  # ','
            mode = expect if (got == tag and status == b"0") else "any"
            end = self._body_end(buf, sep + 1, mode)
            rest = bytes(buf[sep + 1 : end])
        else:
            end, rest = sep, b""
        raw = bytes(buf[:end])
        self.stats["round_trips"] += 1
        self.stats["bytes_received"] += end + 1
        if self.crc:
            try:
                decode_reply(raw)
            except IntegrityError as e:
                self.stats["integrity_mismatches"] += 1
                raise ReplyError(f"reply failed its integrity check: {e}") from e
        try:
            code = int(status)
        except ValueError as e:
            raise ReplyError(f"reply status is not an integer: {status!r}") from e
        if log.isEnabledFor(logging.DEBUG):
            log.debug("<- %s %d %r", got.decode("ascii", "replace"), code, rest[:60])
        return got, code, rest

    def _body_end(self, buf: bytearray, pos: int, expect: str) -> int:
        """Index of the reply's terminating LF in ``buf`` (read on as needed); the body starts at ``pos``.

        ``"none"``/``"text"``: the rest of the line. ``"block"``: one definite-length block then LF (or a text
        line). Otherwise generic: text in which a ``#`` outside quotes at the start or after ``,`` starts a
        block whose bytes (0x0A among them) are skipped by its length (STEP?, or a reply to discard).
        """
        if expect in ("none", "text"):
            return len(buf) - 1
        if expect == "block":
            if buf[pos : pos + 1] != b"#":
                return len(buf) - 1
            end = self._block_end(buf, pos)
            if len(buf) == end:
                buf += self._read_exact(1)
            if buf[end : end + 1] != b"\n" or len(buf) != end + 1:
                raise ReplyError("block reply not terminated by LF")
            return end
        quote, text, body = False, 0, pos
        while True:
            match = _SPECIAL.search(buf, pos)
            if match is None:  # after a block whose bytes held the LF that ended the last read: read on
                text += len(buf) - pos
                pos = len(buf)
                buf += self._read_text()
                continue
            i = match.start()
            text += i - pos
            if text > MAX_REPLY_TEXT:
                raise ReplyError("text reply longer than 64 KiB without LF")
            byte = buf[i]
            if byte == 0x0A:
                return i
            if byte == 0x22:  # '"'
                quote = not quote
            elif not quote and (i == body or buf[i - 1] == 0x2C):  # '#' starting a block
                pos = self._block_end(buf, i)
                continue
            pos = i + 1

    def _block_end(self, buf: bytearray, at: int) -> int:
        """Index just past the definite-length block whose '#' is ``buf[at]``; its missing bytes are read."""
        n = bytes(buf[at + 1 : at + 2])
        if not n.isdigit() or n == b"0":
            raise ReplyError(f"bad block header digit {n!r}")
        digits = bytes(buf[at + 2 : at + 2 + int(n)])
        if len(digits) != int(n) or not digits.isdigit() or int(digits) > ieee_block.MAX_BLOCK_BYTES:
            raise ReplyError(f"block length must be {int(n)} ASCII digits, got {digits!r}")
        end = at + 2 + int(n) + int(digits)
        if len(buf) < end:
            buf += self._read_exact(end - len(buf))
        return end

    def _read_text(self) -> bytes:
        """Bytes through the next LF (included), in one VISA read; at most MAX_REPLY_TEXT + 64 bytes."""
        data = self.res.read_bytes(MAX_REPLY_TEXT + 64, break_on_termchar=True)
        if not data.endswith(b"\n"):
            raise ReplyError(f"reply not terminated by LF within {len(data)} bytes: {bytes(data[-20:])!r}")
        return data

    def _read_exact(self, count: int) -> bytes:
        """Exactly ``count`` bytes (the rest of a block) in one VISA read: the termination character is off
        meanwhile, else the read would stop at every 0x0A byte of the block (one ~10 us call each)."""
        res = self.res
        res.set_visa_attribute(_TERMCHAR_EN, False)
        try:
            return res.read_bytes(count, chunk_size=count)
        finally:
            res.set_visa_attribute(_TERMCHAR_EN, True)
