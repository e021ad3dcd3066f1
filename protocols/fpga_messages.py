"""Opcodes, status codes and payload codecs of the FPGA serial protocol (``protocols/fpga_serial.md``).

Every opcode has a request schema and a response schema: an ordered list of (field, kind). One generic pair
of functions encodes and decodes each direction from the schema, so the table below *is* the payload layout
that the spec prints, and a round-trip test can walk every opcode. Field kinds (little-endian throughout):

    u8 u16 u32 u64   unsigned integers            f32   float32, finite     f32n  float32, NaN allowed
    qs   u16 count + Q3.12 int16 values (states, volts)   qp  u16 count + Q1.14 values (probabilities)
    i8a  u16 count + int8 values (pulse counts)   f32a  u16 count + float32 values
    u16a u16 count + u16 values    u8a  u16 count + u8 values    str  u8 length + UTF-8
    json UTF-8 JSON text filling the rest of the payload (last field only)

    upd  u8 count + that many pulse updates (STEP, APPLY_SPARSE; see :func:`encode_updates`)

Protocol version 2: a request payload is ``fence u64 | fields`` (the instance the request is meant for, checked
by the device for state-changing opcodes; 0 when unbound), a response payload is
``status u8 | boot u16 | instance u64 | body``: the body follows the response schema when status is OK and is a
UTF-8 message otherwise.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np

from eqprop_hil.protocols import fixed_point as fx
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError
from eqprop_hil.protocols.fpga_updates import decode_updates, encode_updates
from eqprop_hil.protocols.framing import MAX_PAYLOAD

RESPONSE_BIT = 0x80  # response opcode = request opcode | 0x80
ALL_LAYERS = 0xFF  # READ_STATE layer that means "every layer"
ENVELOPE = struct.Struct("<BHQ")  # status, boot counter, instance id (version 2)
FENCE = struct.Struct("<Q")  # the instance a request is meant for, first 8 bytes of every request payload


class Opcode(IntEnum):
    SYNC = 0x00
    IDENTIFY = 0x01
    TOPOLOGY = 0x02
    RESET = 0x03
    SET_INPUT = 0x04
    SET_PHASE = 0x05
    SET_NUDGE_CURRENT = 0x06
    SET_NUDGE_TARGET = 0x07
    NUDGE_OFF = 0x08
    SET_GAIN = 0x09
    GET_GAIN = 0x0A
    SET_SCALE = 0x0B
    GET_SCALE = 0x0C
    SETTLE = 0x0D
    READ_STATE = 0x0E
    STATUS = 0x0F
    APPLY_PULSES = 0x10
    APPLY_OUTER = 0x11
    SET_LOCAL_LEARNING = 0x12
    GET_LOCAL_LEARNING = 0x13
    READ_WEIGHTS = 0x14
    PROGRAM_WEIGHTS = 0x15
    TRAIN_SAMPLE = 0x16
    INFER = 0x17
    DESCRIBE = 0x18
    COUNTERS = 0x19
    STEP = 0x1A  # compound nudged step: sparse pulse updates + settle + every layer's state, one round trip
    APPLY_SPARSE = 0x1B  # pulse updates of one or more matrices in sparse form, one pulse command
    AUTH = 0x70  # shared-token access control, answered by the transport (fpga_serial.md 7.1)


class Status(IntEnum):
    OK = 0x00
    CRC_ERROR = 0x01  # frame failed COBS/CRC/length checks; not executed, resend the same sequence number
    UNKNOWN_OPCODE = 0x02
    BAD_LENGTH = 0x03  # payload shorter/longer than the opcode's layout or than the topology needs
    OUT_OF_RANGE = 0x04  # a value outside its range; nothing changed
    BUSY = 0x05  # device busy; not executed, resend the same sequence number later
    BAD_STATE = 0x06  # not allowed now (feedback matrix on a tied board, commit with rows missing, ...)
    BAD_VERSION = 0x07  # unsupported protocol version
    NOT_SYNCED = 0x08  # device booted since the last SYNC; mutating commands refused until SYNC
    DEVICE_ERROR = 0x09  # internal failure of the device
    UNAUTHORIZED = 0x0A  # no or wrong AUTH token on a connection that needs one; not executed, link closed
    WRONG_INSTANCE = 0x0B  # the request's fence is not this power-up's instance id; not executed, nothing changed


class UpdateForm(IntEnum):
    """How one matrix's pulse update travels inside STEP / APPLY_SPARSE (fpga_serial.md section 5.2)."""

    DENSE = 0  # counts i8a: every device of the matrix, row-major
    SPARSE16 = 1  # n u16, n x index u16 (row-major flat index), n x count int8; matrices of <= 65536 devices
    SPARSE32 = 2  # n u16, n x index u32, n x count int8
    OUTER = 3  # bit_length u8, rows qp, cols qp (stochastic pulse trains, as APPLY_OUTER)


class PhaseCode(IntEnum):
    HOLD = 0
    FREE = 1
    NUDGE = 2


class NudgeMode(IntEnum):
    OFF = 0
    CURRENT = 1
    TARGET = 2


# Commands a device refuses with NOT_SYNCED after a boot: everything that changes a setting, a state or a weight.
READ_ONLY = frozenset(
    {Opcode.SYNC, Opcode.IDENTIFY, Opcode.TOPOLOGY, Opcode.GET_GAIN, Opcode.GET_SCALE, Opcode.READ_STATE,
     Opcode.STATUS, Opcode.GET_LOCAL_LEARNING, Opcode.READ_WEIGHTS, Opcode.DESCRIBE, Opcode.COUNTERS, Opcode.AUTH}
)  # fmt: skip

Schema = tuple[tuple[str, str], ...]
MATRIX_HEAD: Schema = (("edge", "u8"), ("feedback", "u8"), ("row_start", "u16"), ("n_rows", "u16"))

# opcode -> (request schema, response schema)
SCHEMAS: dict[Opcode, tuple[Schema, Schema]] = {
    Opcode.SYNC: ((), (("max_payload", "u16"), ("cache_depth", "u8"))),
    Opcode.IDENTIFY: ((), (("vendor", "str"), ("model", "str"), ("serial", "str"), ("firmware", "str"))),
    Opcode.TOPOLOGY: ((), (("sizes", "u16a"), ("edges", "u8a"), ("feedback", "u8"), ("activation", "str"))),
    Opcode.RESET: ((), ()),
    Opcode.SET_INPUT: ((("volts", "qs"),), ()),
    Opcode.SET_PHASE: ((("phase", "u8"),), ()),
    Opcode.SET_NUDGE_CURRENT: ((("amperes", "f32a"),), ()),
    Opcode.SET_NUDGE_TARGET: ((("beta", "f32"), ("target", "qs")), ()),
    Opcode.NUDGE_OFF: ((), ()),
    Opcode.SET_GAIN: ((("edge", "u8"), ("gain", "f32")), ()),
    Opcode.GET_GAIN: ((("edge", "u8"),), (("gain", "f32"),)),
    Opcode.SET_SCALE: ((("edge", "u8"), ("feedback", "u8"), ("scale", "f32")), ()),
    Opcode.GET_SCALE: ((("edge", "u8"), ("feedback", "u8")), (("scale", "f32"),)),
    Opcode.SETTLE: ((("steps", "u32"),), ()),
    Opcode.READ_STATE: ((("layer", "u8"),), (("states", "qs"),)),
    Opcode.STATUS: ((), (("phase", "u8"), ("nudge_mode", "u8"), ("local_learning", "u8"))),
    Opcode.APPLY_PULSES: (MATRIX_HEAD + (("counts", "i8a"),), (("pulses", "u32"),)),
    Opcode.APPLY_OUTER: (
        (("edge", "u8"), ("feedback", "u8"), ("bit_length", "u8"), ("rows", "qp"), ("cols", "qp")),
        (("pulses", "u32"),),
    ),
    Opcode.SET_LOCAL_LEARNING: (
        (("enabled", "u8"), ("set_beta", "u8"), ("beta", "f32"), ("eta", "f32a")),
        (),
    ),
    Opcode.GET_LOCAL_LEARNING: ((), (("enabled", "u8"), ("beta", "f32n"), ("eta", "f32a"))),
    Opcode.READ_WEIGHTS: (MATRIX_HEAD, (("weights", "f32a"),)),
    Opcode.PROGRAM_WEIGHTS: (
        MATRIX_HEAD + (("commit", "u8"), ("tolerance", "f32"), ("max_iterations", "u16"), ("weights", "f32a")),
        (("staged_rows", "u16"), ("residual", "f32n")),
    ),
    Opcode.TRAIN_SAMPLE: (
        (("beta", "f32"), ("t1", "u16"), ("t2", "u16"), ("volts", "qs"), ("target", "qs")),
        (("output", "qs"),),
    ),
    Opcode.INFER: ((("t1", "u16"), ("volts", "qs")), (("output", "qs"),)),
    Opcode.DESCRIBE: ((), (("description", "json"),)),
    Opcode.COUNTERS: ((), (("counters", "json"),)),
    Opcode.STEP: ((("steps", "u32"), ("updates", "upd")), (("pulses", "u32"), ("states", "qs"))),
    Opcode.APPLY_SPARSE: ((("updates", "upd"),), (("pulses", "u32"),)),
    Opcode.AUTH: ((("token", "str"),), ()),
}

_INTS = {"u8": struct.Struct("<B"), "u16": struct.Struct("<H"), "u32": struct.Struct("<I"), "u64": struct.Struct("<Q")}
_F32 = struct.Struct("<f")
_COUNT = struct.Struct("<H")
# Bytes of one element of each array kind.
_ELEM = {"qs": 2, "qp": 2, "i8a": 1, "f32a": 4, "u16a": 2, "u8a": 1}


def encode_request(opcode: Opcode | int, *, fence: int = 0, **fields: Any) -> bytes:
    """Payload of a request: the ``fence`` (instance id the request is meant for, u64; 0 = none) followed by
    the opcode's fields; every field of the opcode's schema must be given, no other."""
    if isinstance(fence, bool) or not isinstance(fence, (int, np.integer)) or not 0 <= int(fence) <= 0xFFFF_FFFF_FFFF_FFFF:
        raise ValueRangeError(f"fence {fence!r} must be an integer in 0..2**64-1 (an instance id)")
    return FENCE.pack(int(fence)) + _encode(SCHEMAS[Opcode(opcode)][0], fields, f"{Opcode(opcode).name} request",
                                            room=MAX_PAYLOAD - FENCE.size)


def request_fence(payload: bytes) -> int:
    """The fence of a request payload; raises :class:`ProtocolError` (BAD_LENGTH) when it holds fewer than 8 bytes."""
    if len(payload) < FENCE.size:
        raise ProtocolError(f"request payload of {len(payload)} bytes lacks the 8-byte fence: {bytes(payload).hex(' ')}")
    return FENCE.unpack_from(payload)[0]


def decode_request(opcode: Opcode | int, payload: bytes) -> dict[str, Any]:
    """Fields of a request payload (after its fence). Layout mismatch: :class:`ProtocolError` (status BAD_LENGTH);
    a well-formed payload with a NaN or infinite float: :class:`ValueRangeError` (status OUT_OF_RANGE)."""
    request_fence(payload)
    return _decode(SCHEMAS[Opcode(opcode)][0], bytes(payload)[FENCE.size :], f"{Opcode(opcode).name} request",
                   nonfinite=ValueRangeError)


def encode_response(opcode: Opcode | int, **fields: Any) -> bytes:
    """Body of an OK response (without the status/boot envelope)."""
    return _encode(SCHEMAS[Opcode(opcode)][1], fields, f"{Opcode(opcode).name} response")


def decode_response(opcode: Opcode | int, body: bytes) -> dict[str, Any]:
    return _decode(SCHEMAS[Opcode(opcode)][1], body, f"{Opcode(opcode).name} response")


class Envelope(NamedTuple):
    """The fixed head of every response payload (version 2) and the body after it."""

    status: Status
    boot: int  # boot counter, +1 at every power-up
    instance: int  # random u64 drawn at every power-up; never 0
    body: bytes


def encode_envelope(status: Status | int, boot: int, body: bytes = b"", instance: int = 0) -> bytes:
    """Response payload: status u8, boot counter u16, instance id u64, then the body (or an error message)."""
    return ENVELOPE.pack(int(status), boot & 0xFFFF, instance) + body


def split_envelope(payload: bytes) -> Envelope:
    """Split a response payload into status, boot counter, instance id and body; an unknown status code or a
    payload shorter than the 11-byte envelope raises ProtocolError."""
    if len(payload) < ENVELOPE.size:
        raise ProtocolError(f"response payload of {len(payload)} bytes lacks the {ENVELOPE.size}-byte envelope "
                            f"(status, boot, instance): {bytes(payload).hex(' ')}")
    status, boot, instance = ENVELOPE.unpack_from(payload)
    try:
        return Envelope(Status(status), boot, instance, bytes(payload[ENVELOPE.size :]))
    except ValueError as e:
        raise ProtocolError(f"unknown status code 0x{status:02X} in response {bytes(payload[:16]).hex(' ')}") from e


def decode_envelope(payload: bytes) -> tuple[Status, int, bytes]:
    """(status, boot counter, body) of a response payload: :func:`split_envelope` without the instance."""
    env = split_envelope(payload)
    return env.status, env.boot, env.body


def instance_hex(instance: int) -> str:
    """The text form of an instance id: 16 lowercase hex digits (``Identity["instance"]``)."""
    return f"{int(instance):016x}"


def rows_per_chunk(n_cols: int, elem_bytes: int, fixed_bytes: int) -> int:
    """How many matrix rows fit one payload: ``fixed_bytes`` of other fields plus a u16 count plus the rows."""
    room = MAX_PAYLOAD - fixed_bytes - _COUNT.size
    if n_cols < 1 or room < n_cols * elem_bytes:
        raise ValueRangeError(f"a row of {n_cols} elements of {elem_bytes} bytes does not fit one payload")
    return min(room // (n_cols * elem_bytes), 0xFFFF // n_cols)


# Fixed bytes besides the matrix data, for chunking (see spec section 5.1).
PULSE_FIXED = FENCE.size + 6  # fence, edge, feedback, row_start, n_rows
READ_FIXED = ENVELOPE.size  # the response carries status, boot and instance before the f32a
PROGRAM_FIXED = FENCE.size + 6 + 1 + 4 + 2  # fence, matrix head, commit, tolerance, max_iterations


def _encode(schema: Schema, fields: dict[str, Any], what: str, room: int = MAX_PAYLOAD) -> bytes:
    names = [name for name, _ in schema]
    if set(fields) != set(names):
        raise ValueRangeError(f"{what} takes fields {names}, got {sorted(fields)}")
    out = bytearray()
    for name, kind in schema:
        value = fields[name]
        try:
            out += _encode_field(kind, value)
        except (ValueRangeError, OverflowError, struct.error, TypeError, ValueError) as e:
            if isinstance(e, ValueRangeError):
                raise ValueRangeError(f"{what}, field {name!r}: {e}") from e
            raise ValueRangeError(f"{what}, field {name!r} ({kind}) cannot hold {value!r}: {e}") from e
    if len(out) > room:
        raise ValueRangeError(f"{what} payload of {len(out)} bytes exceeds {room}; send it in row chunks")
    return bytes(out)


def _encode_field(kind: str, value: Any) -> bytes:
    if kind in _INTS:
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, (int, np.integer)):
            raise ValueRangeError(f"expected an integer, got {value!r}")
        return _INTS[kind].pack(int(value))
    if kind in ("f32", "f32n"):
        return fx.encode_f32(np.array([value], dtype=np.float64), finite=kind == "f32")
    if kind == "str":
        data = str(value).encode("utf-8")
        if len(data) > 255:
            raise ValueRangeError(f"string of {len(data)} bytes exceeds 255")
        return bytes([len(data)]) + data
    if kind == "json":
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
    if kind == "upd":
        return encode_updates(value)
    arr = np.asarray(value).reshape(-1)
    if arr.size > 0xFFFF:
        raise ValueRangeError(f"array of {arr.size} elements exceeds the u16 count")
    head = _COUNT.pack(arr.size)
    if kind == "qs":
        return head + fx.encode_q(arr, fx.STATE)
    if kind == "qp":
        return head + fx.encode_q(arr, fx.PROBABILITY)
    if kind == "i8a":
        return head + fx.encode_int8(arr)
    if kind == "f32a":
        return head + fx.encode_f32(arr)
    if kind in ("u16a", "u8a"):
        top = 0xFFFF if kind == "u16a" else 0xFF
        if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > top):
            raise ValueRangeError(f"{kind} values must be integers in 0..{top}, got {arr.tolist()[:8]}")
        return head + arr.astype("<u2" if kind == "u16a" else "u1").tobytes()
    raise ValueRangeError(f"unknown field kind {kind!r}")


def _decode(schema: Schema, payload: bytes, what: str, nonfinite: type[Exception] = ProtocolError) -> dict[str, Any]:
    """Walk ``schema`` over ``payload``. The whole layout is checked first (ProtocolError); only then a NaN or
    infinite float raises ``nonfinite`` (a request: ValueRangeError -> OUT_OF_RANGE; a response: ProtocolError)."""
    data = bytes(payload)
    pos = 0
    out: dict[str, Any] = {}
    bad_floats: list[str] = []

    def take(n: int, name: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ProtocolError(
                f"{what} of {len(data)} bytes ends inside field {name!r} (needs {pos + n}): {data[:32].hex(' ')}"
            )
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    for name, kind in schema:
        if kind in _INTS:
            out[name] = _INTS[kind].unpack(take(_INTS[kind].size, name))[0]
        elif kind in ("f32", "f32n"):
            value = _F32.unpack(take(4, name))[0]
            if kind == "f32" and not np.isfinite(value):
                bad_floats.append(f"{what}, field {name!r} holds {value!r}; a finite float32 is required")
            out[name] = float(value)
        elif kind == "str":
            n = take(1, name)[0]
            try:
                out[name] = take(n, name).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ProtocolError(f"{what}, field {name!r} is not UTF-8: {e}") from e
        elif kind == "upd":
            updates, pos = decode_updates(data, pos, f"{what}, field {name!r}")
            out[name] = updates
        elif kind == "json":
            text = take(len(data) - pos, name)
            try:
                out[name] = json.loads(text.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ProtocolError(f"{what}, field {name!r} is not JSON: {text[:40]!r}") from e
        else:
            count = _COUNT.unpack(take(2, name))[0]
            raw = take(count * _ELEM[kind], name)
            if kind == "qs":
                out[name] = fx.decode_q(raw, fx.STATE)
            elif kind == "qp":
                out[name] = fx.decode_q(raw, fx.PROBABILITY)
            elif kind == "i8a":
                out[name] = fx.decode_int8(raw)
            elif kind == "f32a":
                values = fx.decode_f32(raw)
                if not np.all(np.isfinite(values)):
                    first = int(np.flatnonzero(~np.isfinite(values))[0])
                    bad_floats.append(f"{what}, field {name!r} holds NaN or infinity: {float(values[first])!r} at index {first}; finite float32 "
                                      f"values are required")
                out[name] = values
            else:
                out[name] = np.frombuffer(raw, dtype="<u2" if kind == "u16a" else "u1").astype(np.int64)
    if pos != len(data):
        raise ProtocolError(f"{what} has {len(data) - pos} trailing byte(s) after its last field: {data[pos:][:16].hex(' ')}")
    if bad_floats:
        raise nonfinite(bad_floats[0])
    return out
