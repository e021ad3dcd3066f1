"""The command processor of the emulated FPGA array: one request frame in, one response frame out.

It knows no transport (``fpga_server`` owns the pty or socket and the link rate); it owns what the firmware
would: the boot counter, the SYNC handshake, the response cache that makes retransmission safe, the staging
buffer of chunked weight programming, and the mapping of requests onto :class:`ArrayPhysics`. Every request is
validated completely (lengths against the topology, indices, ranges) before the physics is touched, and the
physics itself validates before changing state, so a refused command changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from eqprop_hil.mock_instruments.fpga_compound import MAX_SETTLE_STEPS, CompoundOps, _Refused
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError
from eqprop_hil.protocols.fixed_point import STATE, quantize
from eqprop_hil.protocols.framing import MAX_PAYLOAD, PROTOCOL_VERSION, Frame, FrameDecodeError, encode_frame
from eqprop_hil.protocols.fpga_messages import Opcode, Status

log = logging.getLogger(__name__)

IDENTITY = {"vendor": "EQPROP-HIL", "model": "FPGA-EP-1", "firmware": "0.1.0"}


class FpgaDevice(CompoundOps):
    """Firmware of the emulated FPGA array. Thread safe (one lock): call :meth:`handle` per received frame."""

    def __init__(self, physics: Any, faults: Any = None, cache_depth: int = 16, serial: str = "FPGA0001") -> None:
        if not 1 <= cache_depth <= 255:
            raise ValueRangeError(f"cache_depth must be in 1..255, got {cache_depth}")
        self.physics = physics
        self.faults = faults
        self.cache_depth = cache_depth
        self.serial = serial
        self.boot = 1
        self.instance = _draw_instance()  # random per power-up: a restarted or swapped board has another
        self.synced = False  # mutating commands wait for the host's SYNC after every boot
        self._cache: OrderedDict[int, tuple[bytes, bytes]] = OrderedDict()  # seq -> (request digest, response)
        self._nudge_mode = m.NudgeMode.OFF
        self._staging: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("frames", "executed", "replayed", "crc_errors", "busy", "not_synced", "refused", "wrong_instance",
             "bad_version", "step_commands"), 0)  # fmt: skip
        self._topology = physics.topology()
        self._sizes = list(self._topology["sizes"])
        self._edges = [tuple(e) for e in self._topology["edges"]]
        self._untied = self._topology["feedback"] == "untied"

    # ------------------------------------------------------------------------------------------ frame level
    def power_cycle(self) -> None:
        """Volatile state lost, boot counter incremented, response cache cleared; conductances kept."""
        with self._lock:
            self._power_cycle()

    def _power_cycle(self) -> None:
        self.physics.power_cycle()
        self.boot = (self.boot + 1) & 0xFFFF
        self.instance = _draw_instance()
        self._cache.clear()
        self.synced = False
        self._nudge_mode = m.NudgeMode.OFF
        self._staging = None
        log.info("FPGA emulator power-cycled, boot counter %d, instance %016x", self.boot, self.instance)

    def reject(self, error: FrameDecodeError) -> bytes | None:
        """Answer a frame that did not decode: CRC_ERROR (or BAD_VERSION), echoing the unverified header."""
        with self._lock:
            if error.fault == "version":  # CRC and length held: a host of another protocol revision
                self.counters["bad_version"] += 1
                text = f"protocol version {error.version} not supported; this device speaks {PROTOCOL_VERSION}"
                return self._frame(error.seq or 0, (error.opcode or 0) & 0x7F, Status.BAD_VERSION, text.encode())
            self.counters["crc_errors"] += 1
            if error.fault == "partial":
                return None
            return self._frame(error.seq or 0, (error.opcode or 0) & 0x7F, Status.CRC_ERROR, str(error).encode()[:200])

    def handle(self, frame: Frame, action: str = "run") -> bytes:
        """Process one decoded request (``action`` from the fault injector); returns the encoded response."""
        with self._lock:
            self.counters["frames"] += 1
            if action == "power_cycle":
                self._power_cycle()
            if frame.opcode >= m.RESPONSE_BIT or frame.opcode not in Opcode._value2member_map_:
                return self._frame(frame.seq, frame.opcode & 0x7F, Status.UNKNOWN_OPCODE,
                                   f"unknown opcode 0x{frame.opcode:02X}".encode())  # fmt: skip
            opcode = Opcode(frame.opcode)
            if action == "busy":
                self.counters["busy"] += 1
                return self._frame(frame.seq, opcode, Status.BUSY, b"busy, not executed")
            digest = hashlib.blake2b(bytes([opcode]) + frame.payload, digest_size=16).digest()
            cached = self._cache.get(frame.seq)
            if cached is not None and cached[0] == digest and opcode != Opcode.SYNC:
                self.counters["replayed"] += 1
                return cached[1]
            fenced = opcode not in m.READ_ONLY
            if fenced:
                try:
                    fence = m.request_fence(frame.payload)
                except ProtocolError as e:
                    self.counters["refused"] += 1
                    return self._frame(frame.seq, opcode, Status.BAD_LENGTH, str(e).encode())
                if fence != self.instance:  # the host means another power-up of this board (or another board)
                    self.counters["wrong_instance"] += 1
                    return self._frame(frame.seq, opcode, Status.WRONG_INSTANCE,
                                       f"request fenced for instance {fence:016x}, this board is {self.instance:016x} "
                                       f"(boot {self.boot}); not executed".encode())  # fmt: skip
            if not self.synced and fenced:
                self.counters["not_synced"] += 1
                return self._frame(frame.seq, opcode, Status.NOT_SYNCED,
                                   f"device booted (boot {self.boot}); send SYNC first".encode())  # fmt: skip
            response = self._execute(frame.seq, opcode, frame.payload)
            if opcode != Opcode.SYNC:
                self._cache[frame.seq] = (digest, response)
                self._cache.move_to_end(frame.seq)
                while len(self._cache) > self.cache_depth:
                    self._cache.popitem(last=False)
            return response

    def _frame(self, seq: int, opcode: int, status: Status, body: bytes = b"") -> bytes:
        payload = m.encode_envelope(status, self.boot, body, self.instance)
        return encode_frame(seq, int(opcode) | m.RESPONSE_BIT, payload)

    def _execute(self, seq: int, opcode: Opcode, payload: bytes) -> bytes:
        try:
            request = m.decode_request(opcode, payload)
            body = getattr(self, f"_op_{opcode.name.lower()}")(**request)
            status = Status.OK
            self.counters["executed"] += 1
        except _Refused as e:
            status, body = e.status, str(e).encode()
        except ProtocolError as e:
            status, body = Status.BAD_LENGTH, str(e).encode()
        except ValueRangeError as e:
            status, body = Status.OUT_OF_RANGE, str(e).encode()
        except ValueError as e:
            status, body = Status.BAD_STATE, str(e).encode()
        except Exception as e:  # the firmware reports its own failure instead of going silent
            log.exception("FPGA emulator failed on %s", opcode.name)
            status, body = Status.DEVICE_ERROR, f"{type(e).__name__}: {e}".encode()
        if status != Status.OK:
            self.counters["refused"] += 1
            body = body[: MAX_PAYLOAD - m.ENVELOPE.size]
        return self._frame(seq, opcode, status, body)

    # ------------------------------------------------------------------------------------------ validation
    def _edge(self, edge: int, feedback: int = 0) -> tuple[int, bool]:
        if edge >= len(self._edges):
            raise _Refused(Status.OUT_OF_RANGE, f"edge {edge} outside 0..{len(self._edges) - 1}")
        if feedback not in (0, 1):
            raise _Refused(Status.OUT_OF_RANGE, f"feedback flag must be 0 or 1, got {feedback}")
        if feedback and (not self._untied or self._edges[edge][0] == 0):
            raise _Refused(Status.BAD_STATE, f"edge {edge} has no feedback matrix on this board")
        return edge, bool(feedback)

    def _shape(self, edge: int, feedback: bool) -> tuple[int, int]:
        i, j = self._edges[edge]
        return (self._sizes[i], self._sizes[j]) if feedback else (self._sizes[j], self._sizes[i])

    def _rows(self, shape: tuple[int, int], row_start: int, n_rows: int) -> slice:
        if n_rows < 1 or row_start + n_rows > shape[0]:
            raise _Refused(Status.OUT_OF_RANGE, f"rows {row_start}..{row_start + n_rows - 1} outside 0..{shape[0] - 1}")
        return slice(row_start, row_start + n_rows)

    @staticmethod
    def _length(values: np.ndarray, n: int, what: str) -> np.ndarray:
        if values.size != n:
            raise _Refused(Status.BAD_LENGTH, f"{what} holds {values.size} values, the board needs {n}")
        return values

    # ------------------------------------------------------------------------------------------ opcodes
    def _op_sync(self) -> bytes:
        self.synced = True
        self._cache.clear()
        return m.encode_response(Opcode.SYNC, max_payload=MAX_PAYLOAD, cache_depth=self.cache_depth)

    def _op_identify(self) -> bytes:
        return m.encode_response(Opcode.IDENTIFY, serial=self.serial, **IDENTITY)

    def _op_topology(self) -> bytes:
        edges = np.array(self._edges, dtype=np.int64).reshape(-1)
        return m.encode_response(Opcode.TOPOLOGY, sizes=np.array(self._sizes), edges=edges,
                                 feedback=int(self._untied), activation=self._topology["activation"])  # fmt: skip

    def _op_reset(self) -> bytes:
        self.physics.reset()
        self._nudge_mode = m.NudgeMode.OFF
        return b""

    def _op_set_input(self, volts: np.ndarray) -> bytes:
        self.physics.set_input(self._length(volts, self._sizes[0], "input"))
        return b""

    def _op_set_phase(self, phase: int) -> bytes:
        if phase not in m.PhaseCode._value2member_map_:
            raise _Refused(Status.OUT_OF_RANGE, f"phase code {phase} is not 0 (HOLD), 1 (FREE) or 2 (NUDGE)")
        self.physics.set_phase(m.PhaseCode(phase).name)
        return b""

    def _op_set_nudge_current(self, amperes: np.ndarray) -> bytes:
        self.physics.set_nudge_current(self._length(amperes, self._sizes[-1], "nudge current"))
        self._nudge_mode = m.NudgeMode.CURRENT
        return b""

    def _op_set_nudge_target(self, beta: float, target: np.ndarray) -> bytes:
        self.physics.set_nudge_target(self._length(target, self._sizes[-1], "nudge target"), beta)
        self._nudge_mode = m.NudgeMode.TARGET
        return b""

    def _op_nudge_off(self) -> bytes:
        self.physics.nudge_off()
        self._nudge_mode = m.NudgeMode.OFF
        return b""

    def _op_set_gain(self, edge: int, gain: float) -> bytes:
        self.physics.set_gain(self._edge(edge)[0], gain)
        return b""

    def _op_get_gain(self, edge: int) -> bytes:
        return m.encode_response(Opcode.GET_GAIN, gain=self.physics.gain(self._edge(edge)[0]))

    def _op_set_scale(self, edge: int, feedback: int, scale: float) -> bytes:
        edge, fb = self._edge(edge, feedback)
        self.physics.set_scale(edge, scale, feedback=fb)
        return b""

    def _op_get_scale(self, edge: int, feedback: int) -> bytes:
        return m.encode_response(Opcode.GET_SCALE, scale=self.physics.scale(*self._edge(edge, feedback)))  # (edge, feedback)

    def _op_settle(self, steps: int) -> bytes:
        if steps > MAX_SETTLE_STEPS:
            raise _Refused(Status.OUT_OF_RANGE, f"settle of {steps} steps exceeds {MAX_SETTLE_STEPS}")
        self.physics.step(steps)
        return b""

    def _op_read_state(self, layer: int) -> bytes:
        if layer != m.ALL_LAYERS and layer >= len(self._sizes):
            raise _Refused(Status.OUT_OF_RANGE, f"layer {layer} outside 0..{len(self._sizes) - 1} (or 255 for all)")
        states = self.physics.read_state(None if layer == m.ALL_LAYERS else layer)
        flat = quantize(np.concatenate(states), STATE, saturate=True)  # the readout saturates, like an ADC
        return m.encode_response(Opcode.READ_STATE, states=flat)

    def _op_status(self) -> bytes:
        phase = m.PhaseCode[self.physics.phase]
        return m.encode_response(Opcode.STATUS, phase=phase, nudge_mode=int(self._nudge_mode),
                                 local_learning=int(self.physics.local_learning[0]))  # fmt: skip

    def _op_apply_pulses(self, edge: int, feedback: int, row_start: int, n_rows: int, counts: np.ndarray) -> bytes:
        edge, fb = self._edge(edge, feedback)
        shape = self._shape(edge, fb)
        rows = self._rows(shape, row_start, n_rows)
        full = np.zeros(shape, dtype=np.int64)
        full[rows] = self._length(counts, n_rows * shape[1], "pulse matrix chunk").reshape(n_rows, shape[1])
        return m.encode_response(Opcode.APPLY_PULSES, pulses=self.physics.apply_pulses(edge, full, feedback=fb))

    def _op_apply_outer(self, edge: int, feedback: int, bit_length: int, rows: np.ndarray, cols: np.ndarray) -> bytes:
        edge, fb = self._edge(edge, feedback)
        shape = self._shape(edge, fb)
        self._length(rows, shape[0], "outer rows")
        self._length(cols, shape[1], "outer cols")
        fired = self.physics.apply_outer(edge, rows, cols, bit_length, feedback=fb)
        return m.encode_response(Opcode.APPLY_OUTER, pulses=fired)

    def _op_set_local_learning(self, enabled: int, set_beta: int, beta: float, eta: np.ndarray) -> bytes:
        if enabled not in (0, 1) or set_beta not in (0, 1):
            raise _Refused(Status.OUT_OF_RANGE, f"enabled/set_beta flags must be 0 or 1, got {enabled}/{set_beta}")
        if eta.size not in (0, len(self._edges)):
            raise _Refused(Status.BAD_LENGTH, f"eta holds {eta.size} values; send 0 (keep) or {len(self._edges)}")
        self.physics.set_local_learning(bool(enabled), [float(v) for v in eta] if eta.size else None,
                                        beta if set_beta else None)  # fmt: skip
        return b""

    def _op_get_local_learning(self) -> bytes:
        enabled, eta, beta = self.physics.local_learning
        return m.encode_response(Opcode.GET_LOCAL_LEARNING, enabled=int(enabled),
                                 beta=float("nan") if beta is None else beta, eta=np.array(eta, dtype=np.float64))  # fmt: skip

    def _op_read_weights(self, edge: int, feedback: int, row_start: int, n_rows: int) -> bytes:
        edge, fb = self._edge(edge, feedback)
        shape = self._shape(edge, fb)
        rows = self._rows(shape, row_start, n_rows)
        if n_rows * shape[1] * 4 > MAX_PAYLOAD - m.READ_FIXED - 2:
            raise _Refused(Status.OUT_OF_RANGE, f"{n_rows} rows of {shape[1]} float32 exceed one payload; ask fewer rows")
        return m.encode_response(Opcode.READ_WEIGHTS, weights=self.physics.read_weights(edge, feedback=fb)[rows])

    def _op_program_weights(self, edge: int, feedback: int, row_start: int, n_rows: int, commit: int,
                            tolerance: float, max_iterations: int, weights: np.ndarray) -> bytes:  # fmt: skip
        edge, fb = self._edge(edge, feedback)
        shape = self._shape(edge, fb)
        rows = self._rows(shape, row_start, n_rows)
        chunk = self._length(weights, n_rows * shape[1], "weight chunk").reshape(n_rows, shape[1])
        if commit not in (0, 1):
            raise _Refused(Status.OUT_OF_RANGE, f"commit flag must be 0 or 1, got {commit}")
        staging = self._staging
        if row_start == 0 or staging is None or staging["key"] != (edge, fb):
            staging = {"key": (edge, fb), "target": np.zeros(shape), "have": np.zeros(shape[0], dtype=bool)}
        have = staging["have"].copy()
        have[rows] = True
        if commit and not have.all():
            missing = np.flatnonzero(~have)
            raise _Refused(Status.BAD_STATE, f"commit with rows {missing[:8].tolist()} (of {missing.size}) not staged")
        staging["target"][rows] = chunk
        staging["have"] = have
        self._staging = staging
        residual = float("nan")
        if commit:
            self._staging = None
            residual = self.physics.program_weights(edge, staging["target"], feedback=fb, tolerance=tolerance,
                                                    max_iterations=max_iterations)  # fmt: skip
        return m.encode_response(Opcode.PROGRAM_WEIGHTS, staged_rows=int(have.sum()), residual=residual)

    def _op_train_sample(self, beta: float, t1: int, t2: int, volts: np.ndarray, target: np.ndarray) -> bytes:
        self._length(volts, self._sizes[0], "input")
        self._length(target, self._sizes[-1], "target")
        out = self.physics.train_sample(volts, target, beta, t1, t2)
        self._nudge_mode = m.NudgeMode.OFF
        return m.encode_response(Opcode.TRAIN_SAMPLE, output=quantize(out, STATE, saturate=True))

    def _op_infer(self, t1: int, volts: np.ndarray) -> bytes:
        self._length(volts, self._sizes[0], "input")
        out = self.physics.infer(volts, t1)
        self._nudge_mode = m.NudgeMode.OFF
        return m.encode_response(Opcode.INFER, output=quantize(out, STATE, saturate=True))

    def _op_describe(self) -> bytes:
        info = dict(self.physics.describe())
        info["protocol"] = {"version": PROTOCOL_VERSION, "max_payload": MAX_PAYLOAD, "cache_depth": self.cache_depth,
                            "state_format": STATE.name, "probability_format": "Q1.14"}  # fmt: skip
        return m.encode_response(Opcode.DESCRIBE, description=info)

    def _op_auth(self, token: str) -> bytes:
        """AUTH reaching the device itself means no transport gate asked for a token: accepted."""
        return b""

    def _op_counters(self) -> bytes:
        counters = {f"physics_{k}": int(v) for k, v in self.physics.counters.items()}
        counters.update({f"link_{k}": v for k, v in self.counters.items()})
        counters["boot"] = self.boot
        if self.faults is not None:
            counters.update({f"fault_{k}": int(v) for k, v in self.faults.counts.items()})
        return m.encode_response(Opcode.COUNTERS, counters=counters)


def _draw_instance() -> int:
    """A random non-zero 64-bit instance id (0 means "no instance" in a request's fence)."""
    while True:
        value = secrets.randbits(64)
        if value:
            return value
