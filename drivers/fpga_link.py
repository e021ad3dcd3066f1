"""The host end of the FPGA serial link: frames, sequence numbers, retransmission, boot counter, statistics.

One :meth:`FpgaLink.transact` is one command: encode the request, write it, read until the response with the
same sequence number arrives, and return its body. A timeout, a partial or corrupt response, a CRC_ERROR or
BUSY answer, or a dropped connection lead to a bounded number of retransmissions with the SAME sequence number;
the device keeps the responses of its last sequence numbers, so a command whose response was lost is answered
again and never executed twice. A changed boot counter (or NOT_SYNCED) means the device rebooted and lost that
cache: :class:`DeviceRestarted` is raised and the next command starts with a SYNC handshake.

Protocol version 2 (``fpga_serial.md`` sections 2.1 and 4.1): every request carries a fence, the instance id
this link is bound to (:attr:`FpgaLink.fence`, 0 until bound), and every response the instance id of the board's
current power-up. A response from another instance, or a WRONG_INSTANCE refusal, raises :class:`InstanceChanged`
(the board refused the fenced command and executed nothing); the link never rebinds by itself. A response in
another protocol version, or BAD_VERSION, raises :class:`ProtocolVersionError`.

Resynchronisation: a response is taken only when its sequence number AND opcode are those of the request in
flight; anything else in the byte stream (a late reply to an earlier attempt, a duplicated reply, noise) is
counted in ``stats["stale_frames"]`` and ignored, so no answer is ever paired with the wrong request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Any

import serial

from eqprop_hil.drivers.errors import (
    AccessDenied,
    DeviceRestarted,
    InstanceChanged,
    InstrumentError,
    LinkError,
    ProtocolVersionError,
    ReplyError,
)
from eqprop_hil.drivers.timeouts import serial_s
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.auth import TOKEN_ENV
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError
from eqprop_hil.protocols.fpga_messages import Opcode, Status
from eqprop_hil.protocols.framing import PROTOCOL_VERSION, DELIMITER, FrameDecodeError, FrameReader, encode_frame

log = logging.getLogger(__name__)

_LOG_BYTES = 128  # frames longer than this are logged shortened (a weight chunk is 64 KiB)


class FpgaStatusError(InstrumentError):
    """The device answered a status other than OK; ``code`` is the status byte, ``name`` its name."""

    def __init__(self, code: int, message: str, command: str = "") -> None:
        self.name = Status(code).name if code in Status._value2member_map_ else f"0x{code:02X}"
        super().__init__(code, f"{self.name}: {message}", command)


class UnknownOpcodeError(FpgaStatusError):
    """UNKNOWN_OPCODE: the firmware does not implement the command (older firmware?)."""


class BadLengthError(FpgaStatusError, ReplyError):
    """BAD_LENGTH: the payload does not match the opcode's layout or the board's topology."""


class OutOfRangeError(FpgaStatusError, ValueRangeError):
    """OUT_OF_RANGE: a value outside what the device accepts; nothing was changed."""


class BadStateError(FpgaStatusError):
    """BAD_STATE: not allowed in the device's current state (e.g. feedback matrix on a tied board)."""


class BadVersionError(FpgaStatusError):
    """BAD_VERSION: the device speaks another protocol version."""


class DeviceFailure(FpgaStatusError):
    """DEVICE_ERROR: the device failed internally while executing the command."""


STATUS_ERRORS: dict[Status, type[FpgaStatusError]] = {
    Status.UNKNOWN_OPCODE: UnknownOpcodeError,
    Status.BAD_LENGTH: BadLengthError,
    Status.OUT_OF_RANGE: OutOfRangeError,
    Status.BAD_STATE: BadStateError,
    Status.BAD_VERSION: BadVersionError,
    Status.DEVICE_ERROR: DeviceFailure,
}
STAT_KEYS = ("bytes_sent", "bytes_received", "round_trips", "pulses_sent", "frames_sent", "retransmissions",
             "timeouts", "partial_frames", "corrupt_frames", "stale_frames", "crc_rejected", "busy", "reconnects",
             "restarts", "instance_refusals")  # fmt: skip


class FpgaLink:
    """Framed request/response over one pyserial port (device path or URL). Thread safe: one lock."""

    def __init__(self, port: str, *, timeout_s: float = 1.0, retries: int = 3, baudrate: int = 115200,
                 token: str | None = None) -> None:
        if not (timeout_s > 0) or retries < 0:
            raise ValueRangeError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s!r}, {retries!r}")
        self.port = port
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.baudrate = int(baudrate)
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self.boot: int | None = None
        self.instance: int | None = None  # the instance id of the last response (the board's current power-up)
        self.fence = 0  # the instance id every request carries; 0 until bound (fpga_serial.md 4.1)
        self.protocol = PROTOCOL_VERSION
        self.max_payload = m.MAX_PAYLOAD
        self._need_sync = True
        self._seq = int.from_bytes(os.urandom(2), "little")  # a fresh session never collides with cached seqs
        self._lock = threading.RLock()
        self._reader = FrameReader()
        # in_waiting is an exact byte count for OS ports and the loop:// / rfc2217:// handlers, not for socket://
        self._exact_in_waiting = not port.lower().startswith(("socket://", "spy://"))
        self.token = token  # sent in AUTH on every (re)connection when set (fpga_serial.md 7.1)
        self._in_auth = False
        self._serial = self._open()
        try:
            self._authenticate()
        except BaseException:
            self._serial.close()
            raise

    def _open(self) -> serial.SerialBase:
        try:
            return serial.serial_for_url(self.port, baudrate=self.baudrate, timeout=serial_s(self.timeout_s),
                                         write_timeout=serial_s(max(self.timeout_s, 5.0)))  # fmt: skip
        except (serial.SerialException, ValueError, OSError) as e:
            raise LinkError(f"cannot open serial port {self.port!r}: {e}; check the path or socket:// URL") from e

    def close(self) -> None:
        with self._lock:
            if self._serial is not None and self._serial.is_open:
                self._serial.close()

    def _authenticate(self) -> None:
        """AUTH with the shared token, first on a fresh connection; no retransmission (it is not the device's)."""
        if self.token is None:
            return
        seq = self._next_seq()
        wire = DELIMITER + encode_frame(seq, Opcode.AUTH, m.encode_request(Opcode.AUTH, fence=self.fence,
                                                                          token=self.token))
        self._in_auth = True
        try:
            log.debug("-> AUTH seq=%d <token hidden>", seq)
            try:
                self._serial.write(wire)
                self._serial.flush()
            except (serial.SerialException, OSError) as e:
                raise LinkError(f"cannot send AUTH on {self.port}: {e}") from e
            self.stats["bytes_sent"] += len(wire)
            self.stats["frames_sent"] += 1
            frame, problem = self._await(seq, _Named(Opcode.AUTH))
        finally:
            self._in_auth = False
        if frame is None:
            raise LinkError(f"no answer to AUTH on {self.port}: {problem}")
        try:
            status, _, body = m.decode_envelope(frame.payload)
        except ProtocolError as e:
            raise ReplyError(f"AUTH seq {seq}: {e}") from e
        if status == Status.BAD_VERSION:
            raise ProtocolVersionError(f"{self.port} refused AUTH: {body[:120].decode(errors='replace')}")
        if status == Status.UNAUTHORIZED:
            raise AccessDenied(f"{self.port} refused the token (from token= or ${TOKEN_ENV}); nothing was executed")
        if status != Status.OK:
            raise LinkError(f"AUTH on {self.port} answered {status.name}: {body[:120].decode(errors='replace')}")

    def sync(self) -> dict[str, Any]:
        """SYNC handshake: the device clears its sequence cache and accepts commands of this boot. Not checked
        against the bound instance (it reports the board's instance in :attr:`instance`; binding is separate)."""
        with self._lock:
            body = self._transact(Opcode.SYNC, m.encode_request(Opcode.SYNC, fence=self.fence), check_instance=False)
            reply = m.decode_response(Opcode.SYNC, body)
            self.max_payload = int(reply["max_payload"])
            self._need_sync = False
            return reply

    def bind(self) -> int:
        """SYNC, then fence every further request with the board's current instance id; returns it. The only
        place the fence changes: callers decide (at open, or after re-programming a restarted board)."""
        with self._lock:
            self.sync()
            assert self.instance is not None  # set by the SYNC response
            if self.fence and self.fence != self.instance:
                log.warning("%s: rebinding from instance %016x to %016x", self.port, self.fence, self.instance)
            self.fence = self.instance
            return self.fence

    def call(self, opcode: Opcode, *, check_instance: bool = True, **fields: Any) -> dict[str, Any]:
        """Encode ``fields`` with this link's fence, send, and decode the OK response's fields."""
        body = self.transact(opcode, m.encode_request(opcode, fence=self.fence, **fields), check_instance=check_instance)
        return m.decode_response(opcode, body)

    def transact(self, opcode: Opcode | int, payload: bytes = b"", *, check_instance: bool = True) -> bytes:
        """Send one command (``payload`` is the whole request payload, fence included) and return the OK
        response's body; raises typed errors for the rest.

        ``opcode`` may be a plain int (an opcode of newer firmware, or a conformance test of UNKNOWN_OPCODE).
        ``check_instance=False`` (IDENTIFY for :meth:`FpgaArray.instance_id`) accepts an answer from another
        instance than the bound one; the answer's instance is in :attr:`instance` either way."""
        with self._lock:
            if self._need_sync:
                self.sync()
            return self._transact(opcode, payload, check_instance=check_instance)

    # ------------------------------------------------------------------------------------------ internals
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def _transact(self, opcode: Opcode | int, payload: bytes, check_instance: bool = True) -> bytes:
        opcode = _Named(opcode)
        seq = self._next_seq()
        wire = DELIMITER + encode_frame(seq, opcode, payload)
        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retransmissions"] += 1
                log.debug("retransmit %s seq=%d (attempt %d): %s", opcode.name, seq, attempt + 1, problem)
            if not self._write(wire, opcode, seq):
                problem = "connection lost while writing"
                continue
            frame, problem = self._await(seq, opcode)
            if frame is None:
                continue
            try:
                status, boot, instance, body = m.split_envelope(frame.payload)
            except ProtocolError as e:
                raise ReplyError(f"{opcode.name} seq {seq}: {e}") from e
            if status in (Status.CRC_ERROR, Status.BUSY):
                self.stats["crc_rejected" if status == Status.CRC_ERROR else "busy"] += 1
                problem = f"device answered {status.name}: {body[:120].decode(errors='replace')}"
                if status == Status.BUSY:
                    time.sleep(min(0.005 * 2**attempt, self.timeout_s))  # back off before asking a busy device again
                continue
            self.stats["round_trips"] += 1
            if status == Status.UNAUTHORIZED:  # the access gate, before the device: nothing ran; link closed
                raise AccessDenied(f"{self.port} requires a shared token for {opcode.name}: pass token= or set "
                                   f"${TOKEN_ENV}; nothing was executed")
            if status == Status.BAD_VERSION:
                raise ProtocolVersionError(f"{self.port} does not speak protocol {PROTOCOL_VERSION}: "
                                           f"{body[:160].decode(errors='replace')}; update the driver or the firmware")
            self.instance = instance
            if status == Status.WRONG_INSTANCE and not self.fence:
                raise InstrumentError(int(status), f"{opcode.name} changes state and this link is not bound to an "
                                      f"instance: call bind() (FpgaArray does at open); nothing was executed",
                                      opcode.name)  # fmt: skip
            if status == Status.WRONG_INSTANCE or (check_instance and self.fence and instance != self.fence):
                # Another power-up answers: a fenced command was refused (nothing ran), or a query was answered
                # by a board that no longer holds the run's state. Never rebind here: the caller decides.
                self.stats["instance_refusals"] += 1
                self.boot = boot
                self._need_sync = True  # the new instance accepts nothing before a SYNC
                raise InstanceChanged(m.instance_hex(self.fence), m.instance_hex(instance), opcode.name)
            if not check_instance:  # SYNC / IDENTIFY report whoever answers now; binding is the caller's decision
                self.boot = boot
            elif (self.boot is not None and boot != self.boot) or status == Status.NOT_SYNCED:
                old, self.boot, self._need_sync = self.boot, boot, True
                self.stats["restarts"] += 1
                raise DeviceRestarted(
                    f"device restarted (boot counter {old} -> {boot}) before {opcode.name} seq {seq}: neuron states "
                    f"and settings are lost and the command may not have run; re-read weights before retrying"
                )
            self.boot = boot
            if status != Status.OK:
                message = body.decode("utf-8", errors="replace")
                raise STATUS_ERRORS.get(status, FpgaStatusError)(int(status), message, opcode.name)
            return body
        raise LinkError(
            f"no valid response to {opcode.name} (seq {seq}) on {self.port} after {self.retries + 1} attempts: "
            f"{problem}; check the cable, the baud rate and that the device is powered"
        )

    def _write(self, wire: bytes, opcode: Opcode, seq: int) -> bool:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("-> %s seq=%d %s", opcode.name, seq, _hex(wire))
        try:
            if self._serial is None or not self._serial.is_open:
                self._reconnect()
            self._serial.write(wire)
            self._serial.flush()
        except (serial.SerialException, OSError) as e:
            log.warning("write to %s failed (%s); reconnecting", self.port, e)
            self._reconnect()
            return False
        self.stats["bytes_sent"] += len(wire)
        self.stats["frames_sent"] += 1
        return True

    def _reconnect(self) -> None:
        if self._serial is not None:
            with contextlib.suppress(serial.SerialException, OSError):  # a dead port may fail to close
                self._serial.close()
        self._reader = FrameReader()
        self.stats["reconnects"] += 1
        self._serial = self._open()
        if not self._in_auth:  # a failure inside AUTH itself is reported by _authenticate
            self._authenticate()

    def _read_available(self, left: float) -> bytes:
        """Block (up to ``left`` seconds) for the first byte, then take whatever else has arrived, without waiting.

        A port of the operating system (a device path, a pty) or of a URL handler whose ``in_waiting`` is an
        exact count: its timeout stays the link's (``timeout_s``, set at open) and the rest is read by count,
        because every change of a posix port's timeout re-applies its termios settings (flock, tcgetattr,
        tcsetattr: tens of microseconds, twice per round trip). ``socket://``: its ``in_waiting`` only says 0
        or 1 (byte-wise reads of a 64 KiB reply cost seconds), so the rest is read with timeout 0, which that
        handler sets for free.
        """
        port = self._serial
        if self._exact_in_waiting:
            wait_s = serial_s(self.timeout_s)
            if port.timeout != wait_s:  # timeout_s changed since the port was opened
                port.timeout = wait_s
            data = port.read(1)
            if data:
                waiting = port.in_waiting
                if waiting:
                    data += port.read(waiting)
            return data
        port.timeout = serial_s(left)
        data = port.read(1)
        if data:
            port.timeout = 0
            data += port.read(1 << 16)
        return data

    def _await(self, seq: int, opcode: Opcode) -> tuple[Any, str]:
        """Read until the response to ``seq`` arrives (frame, "") or a reason to retransmit (None, why)."""
        want = int(opcode) | m.RESPONSE_BIT
        deadline = time.monotonic() + self.timeout_s  # pushed back while bytes keep arriving (slow links)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stats["timeouts"] += 1
                partial = self._reader.flush_partial()
                if partial is not None:
                    self.stats["partial_frames"] += 1
                    return None, f"timeout after a partial response: {partial}"
                return None, f"no response within {self.timeout_s:g} s"
            try:
                data = self._read_available(left)
            except (serial.SerialException, OSError) as e:
                log.warning("read from %s failed (%s); reconnecting", self.port, e)
                self._reconnect()
                return None, f"connection lost: {e}"
            if not data:
                continue
            self.stats["bytes_received"] += len(data)
            deadline = time.monotonic() + self.timeout_s
            corrupt = None
            items = self._reader.feed(data)
            for index, item in enumerate(items):
                if isinstance(item, FrameDecodeError) and item.fault == "version" and item.seq == seq:
                    raise ProtocolVersionError(
                        f"{self.port} answered {opcode.name} in protocol version {item.version}; this driver speaks "
                        f"{PROTOCOL_VERSION}: update the driver or the firmware (nothing state-changing was sent)"
                    )
                if isinstance(item, FrameDecodeError):
                    self.stats["corrupt_frames"] += 1
                    log.debug("<- corrupt frame: %s", item)
                    corrupt = item
                elif item.seq == seq and item.opcode == want:
                    if log.isEnabledFor(logging.DEBUG):
                        log.debug("<- %s seq=%d %s", opcode.name, seq, item.payload[:_LOG_BYTES].hex(" "))
                    # Frames that came after it in the same read cannot answer this request nor the next one
                    # (not sent yet): stale duplicates, dropped here.
                    self.stats["stale_frames"] += sum(not isinstance(x, FrameDecodeError) for x in items[index + 1 :])
                    return item, ""
                else:
                    self.stats["stale_frames"] += 1
                    log.debug("<- stale frame seq=%d opcode=0x%02X ignored", item.seq, item.opcode)
            if corrupt is not None:
                return None, f"corrupt response: {corrupt}"


class _Named(int):
    """An opcode that always has a ``.name`` for messages, also when it is not in :class:`Opcode`."""

    name: str

    def __new__(cls, value: int) -> "_Named":
        self = super().__new__(cls, int(value))
        self.name = Opcode(value).name if value in Opcode._value2member_map_ else f"opcode 0x{int(value):02X}"
        return self


def _hex(data: bytes) -> str:
    text = data[:_LOG_BYTES].hex(" ")
    return text if len(data) <= _LOG_BYTES else f"{text} ... ({len(data)} bytes)"
