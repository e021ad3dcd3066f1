"""The firmware of the emulated analog board: executes parsed SCPI commands on an ArrayPhysics.

Transport-free (the TCP side is :mod:`eqprop_hil.mock_instruments.analog_server`), so the rule "an invalid command or an
out-of-range value pushes an error and changes nothing" is one place: every handler checks all of its
arguments against the board (edge and layer indices, vector lengths, DAC range, compliance) before it calls the
physics, and the physics itself validates before it changes state. Registers the physics has no reader for
(input drive, nudge settings, compliance) are mirrored here, as firmware keeps its own copy of what it wrote.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from eqprop_hil.mock_instruments.analog_session import ESR_OPC, RequestCache, Session, esr_bit
from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError
from eqprop_hil.protocols.scpi import Command, ScpiCommandError, format_error_entry, format_number, format_numbers, parse_command
from eqprop_hil.protocols.scpi_commands import MAX_SETTLE_STEPS, PROTOCOL_VERSION
from eqprop_hil.protocols.scpi_integrity import INTEGRITY_ERROR, IntegrityError, crc32, decode_request, encode_reply
from eqprop_hil.protocols.scpi_tags import INSTANCE_MISMATCH, NOT_CACHED, decode_updates, parse_tag, split_tag, tagged_reply

if TYPE_CHECKING:
    from eqprop_hil.mock_instruments.physics import ArrayPhysics

log = logging.getLogger(__name__)

VENDOR, MODEL, FIRMWARE = "EQPROP-HIL", "ANALOG-EP-1", "0.3.0"  # 0.2: SYST:INTegrity; 0.3: protocol 2 (tags, STEP?)


def draw_instance() -> str:
    """16 lower-case hex digits from the OS entropy source: a new one at every power-up (spec 4.1)."""
    return secrets.token_hex(8)


class AnalogFirmware:
    """Command interpreter of one board. ``execute(message, session)`` returns the reply bytes (with LF) or None.

    ``session`` is the connection's :class:`Session` (error queue, ESR, integrity mode); without one the
    firmware's own default session is used (a single-client caller, or tests that drive the firmware directly).
    """

    def __init__(self, physics: "ArrayPhysics", serial: str = "SIM0001", step_period_s: float = 1e-6) -> None:
        self.physics = physics
        self.serial = serial
        self.step_period_s = float(step_period_s)
        topo = physics.topology()
        self.sizes: list[int] = [int(n) for n in topo["sizes"]]
        self.edges: list[tuple[int, int]] = [(int(i), int(j)) for i, j in topo["edges"]]
        self.feedback: str = str(topo["feedback"])
        self.activation: str = str(topo["activation"])
        self.counters: dict[str, int] = {"commands": 0, "queries": 0, "errors": 0, "pulse_commands": 0, "pulses": 0,
                                         "boots": 1, "integrity_refused": 0, "duplicates": 0, "fenced": 0,
                                         "request_refused": 0}  # non-volatile (survive power cycles)
        self.executed: Counter[str] = Counter()  # command keys run without error (conformance coverage)
        self.default_session = Session()
        self._session = self.default_session  # the session of the message being executed
        self.cache = RequestCache()
        self._handlers: dict[str, Callable[[Command], bytes | str | None]] = self._table()
        self.power_on()

    # ------------------------------------------------------------------------------------------ state
    def power_on(self) -> None:
        """Volatile registers to their power-on values (also after an emulated power cycle): a new instance id,
        an empty duplicate cache; every connection's session is reset when it next speaks."""
        self.instance = draw_instance()
        self.cache.clear()
        self.compliance = float(self.physics.config.compliance_amperes)
        self.residual = 0.0
        self.last_pulses = 0
        self.total_pulses = 0
        self._dynamics_reset()
        self._sync(self.default_session)

    def power_cycle(self) -> None:
        """Emulated power loss: the physics loses states and settings (conductances kept), so do the registers."""
        self.physics.power_cycle()
        self.counters["boots"] += 1
        self.power_on()

    def _dynamics_reset(self) -> None:
        self.input = np.zeros(self.sizes[0], np.float32)
        self.nudge_mode = "OFF"
        self.currents = np.zeros(self.sizes[-1], np.float32)
        self.target = np.zeros(self.sizes[-1], np.float32)
        self.beta = 0.0

    def _sync(self, session: Session) -> Session:
        if session.boot != self.counters["boots"]:
            session.reset()
            session.boot = self.counters["boots"]
        return session

    # the default session's registers, for single-client callers and tests
    @property
    def integrity(self) -> bool:
        return self.default_session.integrity

    @integrity.setter
    def integrity(self, value: bool) -> None:
        self.default_session.integrity = bool(value)

    @property
    def error_count(self) -> int:
        return len(self.default_session.errors)

    def push_error(self, code: int, detail: str = "", session: Session | None = None) -> None:
        """Append to a connection's FIFO error queue (the default session's without one)."""
        self.counters["errors"] += 1
        self._sync(session or self.default_session).push_error(code, detail)

    # ------------------------------------------------------------------------------------------ execute
    def execute(self, message: bytes, session: Session | None = None) -> bytes | None:
        """Parse and run one program message. Errors go to the queue; a failed query sends no reply.

        A message carrying a CRC-32 field is checked before anything else, whatever the mode, and its reply
        carries one too; in integrity mode a message without one is refused. A refused message runs nothing.
        A tagged message (spec 4.2) is fenced, looked up in the duplicate cache, and always answered.
        """
        s = self._session = self._sync(session or self.default_session)
        self.counters["commands"] += 1
        try:
            plain, protected = decode_request(message, required=s.integrity)
        except IntegrityError as e:
            self.counters["integrity_refused"] += 1
            return self.refuse(message, INTEGRITY_ERROR, str(e), s, protected=True)
        try:
            tag, plain = split_tag(plain)
        except ScpiCommandError as e:
            self.push_error(e.code, e.detail, s)
            return None
        if tag is None:
            reply = self._run(plain)
            if reply is None:
                return None
            return (encode_reply(reply) if protected else reply) + b"\n"
        return self._wrap(self._run_tagged(tag, plain), protected or s.integrity)

    @staticmethod
    def _wrap(reply: bytes, protected: bool) -> bytes:
        return (encode_reply(reply) if protected else reply) + b"\n"

    def refuse(self, message: bytes, code: int, detail: str = "", session: Session | None = None, *,
               protected: bool = False) -> bytes | None:
        """A message refused before it ran (busy, CRC, a scanner error): answered with its tag when it has a
        well-formed one (not cached: a resend may cure it), else queued on its connection."""
        s = self._sync(session or self.default_session)
        try:
            tag, _ = split_tag(bytes(message))
        except ScpiCommandError:
            tag = None
        if tag is None:
            self.push_error(code, detail, s)
            return None
        self.counters["errors"] += 1
        s.esr |= esr_bit(code)
        return self._wrap(tagged_reply(tag, code, detail=detail), protected or s.integrity)

    def _run_tagged(self, tag: bytes, plain: bytes) -> bytes:
        """Fence, de-duplicate, run and cache one tagged message; the tagged reply without terminator."""
        instance, rid = parse_tag(tag)
        try:
            command: Command | None = parse_command(plain)
            failure: ScpiCommandError | None = None
        except ScpiCommandError as e:
            command, failure = None, e
        if command is not None and command.spec.changes and instance != self.instance:
            self.counters["fenced"] += 1
            return self._tag_error(tag, INSTANCE_MISMATCH, f"board is {self.instance}")
        digest = crc32(plain)
        action, found = self.cache.lookup(rid, digest)
        if action == "replay":
            self.counters["duplicates"] += 1
            log.debug("request %08x answered from the duplicate cache", rid)
            return found  # type: ignore[return-value]
        if action == "refuse":
            self.counters["request_refused"] += 1
            code = int(found)  # type: ignore[arg-type]
            why = "in the cache with another message" if code != 132 else "older than the cache window"
            return self._tag_error(tag, code, f"request id {rid:08x} {why}")
        if failure is None:
            assert command is not None
            try:
                body = self._call(command)
                reply = tagged_reply(tag, 0, body)
            except ScpiCommandError as e:
                failure = e
        if failure is not None:
            reply = self._tag_error(tag, failure.code, failure.detail)
            if failure.code in NOT_CACHED:
                return reply
        self.cache.store(rid, digest, reply)
        return reply

    def _tag_error(self, tag: bytes, code: int, detail: str) -> bytes:
        self.counters["errors"] += 1
        self._session.esr |= esr_bit(code)
        return tagged_reply(tag, code, detail=detail)

    def _call(self, command: Command) -> bytes | None:
        """Run one parsed command; its reply bytes or None. Every refusal as ScpiCommandError."""
        if command.spec.query:
            self.counters["queries"] += 1
        try:
            reply = self._handlers[command.key](command)
        except ScpiCommandError:
            raise
        except ValueRangeError as e:
            raise ScpiCommandError(-222, str(e)) from e
        except (EqpropError, ValueError) as e:
            raise ScpiCommandError(-224, str(e)) from e
        self.executed[command.key] += 1
        if reply is None:
            return None
        return reply.encode("ascii") if isinstance(reply, str) else reply

    def _run(self, message: bytes) -> bytes | None:
        """Parse and run one plain untagged message; the reply without its terminator, or None (errors queued)."""
        try:
            return self._call(parse_command(message))
        except ScpiCommandError as e:
            self.push_error(e.code, e.detail, self._session)
            return None

    # ------------------------------------------------------------------------------------------ checks
    def _edge(self, edge: int, feedback: bool = False) -> tuple[int, int]:
        if not 0 <= edge < len(self.edges):
            raise ScpiCommandError(-222, f"edge {edge} not in 0..{len(self.edges) - 1}")
        src, dst = self.edges[edge]
        if feedback and self.feedback != "untied":
            raise ScpiCommandError(-221, "board has tied feedback: no separate feedback matrix")
        if feedback and src == 0:
            raise ScpiCommandError(-221, f"edge {edge} leaves the input layer and has no feedback matrix")
        return (self.sizes[src], self.sizes[dst]) if feedback else (self.sizes[dst], self.sizes[src])

    @staticmethod
    def _length(values: np.ndarray, n: int, what: str) -> np.ndarray:
        if values.size != n:
            raise ScpiCommandError(101, f"{what} block holds {values.size} elements, expected {n}")
        return values

    def _volts(self, values: np.ndarray, lo_hi: tuple[float, float], what: str) -> np.ndarray:
        lo, hi = lo_hi
        if values.size and (values.min() < lo or values.max() > hi):
            worst = float(values[np.argmax(np.maximum(lo - values, values - hi))])
            raise ScpiCommandError(-222, f"{what} {worst:g} V outside {lo:g}..{hi:g} V")
        return values

    def _input(self, values: np.ndarray) -> np.ndarray:
        values = self._length(values, self.sizes[0], "input")
        return self._volts(values, self.physics.config.dac_range_volts, "input")

    def _block(self, values: Any, datatype: str = "f") -> bytes:
        return ieee_block.encode_block(np.asarray(values).ravel(), datatype)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------ handlers
    def _table(self) -> dict[str, Callable[[Command], bytes | str | None]]:
        p = self.physics
        return {
            "*IDN?": lambda c: f"{VENDOR},{MODEL},{self.serial},{FIRMWARE}",
            "*RST": self._rst,
            "*CLS": self._cls,
            "*OPC": self._opc,
            "*OPC?": lambda c: "1",
            "*ESR?": self._esr_query,
            "*ESE": lambda c: setattr(self._session, "ese", c.args[0]),
            "*ESE?": lambda c: format_number(self._session.ese),
            "*STB?": self._stb,
            "SYST:ERR?": lambda c: self._session.errors.popleft() if self._session.errors else format_error_entry(0),
            "SYST:ERR:COUN?": lambda c: format_number(len(self._session.errors)),
            "SYST:VERS?": lambda c: "1999.0",
            "SYST:PROT?": lambda c: format_number(PROTOCOL_VERSION),
            "SYST:INST?": lambda c: f'"{self.instance}"',
            "SYST:REQ:LAST?": lambda c: format_number(-1 if self.cache.newest is None else self.cache.newest),
            "SYST:BOOT?": lambda c: format_number(self.counters["boots"]),
            "SYST:DESC?": lambda c: ieee_block.encode_bytes(json.dumps(
                {**p.describe(), "protocol": PROTOCOL_VERSION, "instance": self.instance}, default=str).encode()),
            "SYST:INT": lambda c: setattr(self._session, "integrity", bool(c.args[0])),
            "SYST:INT?": lambda c: format_number(self._session.integrity),
            "TOP:SIZ?": lambda c: format_numbers(self.sizes),
            "TOP:EDG?": lambda c: format_numbers([n for e in self.edges for n in e]),
            "TOP:FEED?": lambda c: self.feedback.upper(),
            "TOP:ACT?": lambda c: self.activation.upper(),
            "INP": self._set_input,
            "INP?": lambda c: self._block(self.input),
            "PHAS": lambda c: p.set_phase(c.args[0]),
            "PHAS?": lambda c: str(p.phase).upper(),
            "NUDG:CURR": self._set_currents,
            "NUDG:CURR?": lambda c: self._block(self.currents),
            "NUDG:COMP": self._set_compliance,
            "NUDG:COMP?": lambda c: format_number(self.compliance),
            "NUDG:TARG": self._set_target,
            "NUDG:TARG?": lambda c: self._block(self.target),
            "NUDG:BETA?": lambda c: format_number(self.beta),
            "NUDG:MODE?": lambda c: self.nudge_mode,
            "NUDG:OFF": self._nudge_off,
            "EDGE:GAIN": lambda c: (self._edge(c.args[0]), p.set_gain(c.args[0], c.args[1]))[-1],
            "EDGE:GAIN?": lambda c: (self._edge(c.args[0]), format_number(float(p.gain(c.args[0]))))[-1],
            "EDGE:SCAL": lambda c: (self._edge(c.args[0]), p.set_scale(c.args[0], c.args[1]))[-1],
            "EDGE:SCAL?": lambda c: (self._edge(c.args[0]), format_number(float(p.scale(c.args[0]))))[-1],
            "EDGE:SCAL:FEED": lambda c: (self._edge(c.args[0], True), p.set_scale(c.args[0], c.args[1], True))[-1],
            "EDGE:SCAL:FEED?": lambda c: (self._edge(c.args[0], True), format_number(float(p.scale(c.args[0], True))))[-1],
            "SETT": lambda c: p.step(c.args[0]),
            "SETT:TIME": self._settle_time,
            "SETT:PER?": lambda c: format_number(self.step_period_s),
            "SETT:COUN?": lambda c: format_number(int(p.counters.get("steps", 0))),
            "STAT?": self._state,
            "STEP?": self._step,
            "PULS:MATR": lambda c: self._pulse_matrix(c, False),
            "PULS:MATR:FEED": lambda c: self._pulse_matrix(c, True),
            "PULS:OUT": lambda c: self._pulse_outer(c, False),
            "PULS:OUT:FEED": lambda c: self._pulse_outer(c, True),
            "PULS:LAST?": lambda c: format_number(self.last_pulses),
            "PULS:TOT?": lambda c: format_number(self.total_pulses),
            "PULS:COUN?": lambda c: format_number(self.counters["pulse_commands"]),  # non-volatile
            "LEAR": lambda c: p.set_local_learning(c.args[0], None, None),
            "LEAR?": lambda c: format_number(bool(p.local_learning[0])),
            "LEAR:ETA": self._set_eta,
            "LEAR:ETA?": lambda c: format_numbers(float(e) for e in (p.local_learning[1] or [0.0] * len(self.edges))),
            "LEAR:BETA": lambda c: p.set_local_learning(bool(p.local_learning[0]), None, c.args[0]),
            "LEAR:BETA?": lambda c: format_number(float(p.local_learning[2] or 0.0)),
            "LEAR:SAMP?": self._train_sample,
            "INF?": self._infer,
            "WEIG?": lambda c: (self._edge(c.args[0]), self._block(p.read_weights(c.args[0])))[-1],
            "WEIG:FEED?": lambda c: (self._edge(c.args[0], True), self._block(p.read_weights(c.args[0], True)))[-1],
            "WEIG:PROG": lambda c: self._program(c, False),
            "WEIG:PROG:FEED": lambda c: self._program(c, True),
            "WEIG:RES?": lambda c: format_number(self.residual),
            "DEV:MOD?": lambda c: str(p.config.device.model).upper(),
            "CONV:DAC?": lambda c: self._converter(p.config.dac_bits, p.config.dac_range_volts),
            "CONV:ADC?": lambda c: self._converter(p.config.adc_bits, p.config.adc_range_volts),
        }

    def _rst(self, c: Command) -> None:
        self.physics.reset()
        self.physics.set_local_learning(False, None, None)
        self._dynamics_reset()

    def _cls(self, c: Command) -> None:
        self._session.errors.clear()
        self._session.esr = 0

    def _opc(self, c: Command) -> None:
        self._session.esr |= ESR_OPC

    def _esr_query(self, c: Command) -> str:
        value, self._session.esr = self._session.esr, 0
        return format_number(value)

    def _stb(self, c: Command) -> str:
        s = self._session
        return format_number((0x04 if s.errors else 0) | (0x20 if s.esr & s.ese else 0))

    def _set_input(self, c: Command) -> None:
        volts = self._input(c.args[0])
        self.physics.set_input(volts)
        self.input = volts.astype(np.float32)

    def _set_currents(self, c: Command) -> None:
        amps = self._length(c.args[0], self.sizes[-1], "nudge current")
        worst = float(np.abs(amps).max(initial=0.0))
        if worst > self.compliance:
            raise ScpiCommandError(110, f"{worst:g} A above the compliance of {self.compliance:g} A")
        self.physics.set_nudge_current(amps)
        self.currents, self.nudge_mode, self.beta = amps.astype(np.float32), "CURRENT", 0.0  # spec: 0 outside TARGET

    def _set_compliance(self, c: Command) -> None:
        hardware = float(self.physics.config.compliance_amperes)
        if c.args[0] > hardware:
            raise ScpiCommandError(-222, f"compliance {c.args[0]:g} A above the hardware maximum {hardware:g} A")
        worst = float(np.abs(self.currents).max(initial=0.0))
        if worst > c.args[0]:
            raise ScpiCommandError(-221, f"active nudge current {worst:g} A exceeds the new compliance")
        self.compliance = float(c.args[0])

    def _set_target(self, c: Command) -> None:
        beta, target = c.args
        target = self._length(target, self.sizes[-1], "target")
        self._volts(target, self.physics.config.adc_range_volts, "target")
        self.physics.set_nudge_target(target, beta)
        self.target, self.beta, self.nudge_mode = target.astype(np.float32), float(beta), "TARGET"
        self.currents = np.zeros_like(self.currents)

    def _nudge_off(self, c: Command) -> None:
        self.physics.nudge_off()
        self.nudge_mode, self.beta = "OFF", 0.0
        self.currents = np.zeros_like(self.currents)

    def _settle_time(self, c: Command) -> None:
        steps = math.ceil(c.args[0] / self.step_period_s - 1e-9)
        if steps > MAX_SETTLE_STEPS:
            raise ScpiCommandError(-222, f"{c.args[0]:g} s is {steps} steps, more than {MAX_SETTLE_STEPS}")
        if steps > 0:
            self.physics.step(steps)

    def _state(self, c: Command) -> bytes:
        layer = c.args[0]
        if layer is not None and not 0 <= layer < len(self.sizes):
            raise ScpiCommandError(-222, f"layer {layer} not in 0..{len(self.sizes) - 1}")
        states = self.physics.read_state(layer)
        return self._block(np.concatenate([np.asarray(s, np.float32).ravel() for s in states]))

    def _fired(self, pulses: int) -> None:
        self.counters["pulse_commands"] += 1
        self.counters["pulses"] += int(pulses)
        self.last_pulses = int(pulses)
        self.total_pulses += int(pulses)

    def _pulse_matrix(self, c: Command, feedback: bool) -> None:
        edge, counts = c.args
        shape = self._edge(edge, feedback)
        counts = self._length(counts, shape[0] * shape[1], "pulse count").reshape(shape)
        self._fired(self.physics.apply_pulses(edge, counts, feedback=feedback))

    def _pulse_outer(self, c: Command, feedback: bool) -> None:
        edge, bit_length, vectors = c.args
        n_rows, n_cols = self._edge(edge, feedback)
        vectors = self._length(vectors, n_rows + n_cols, "rows+cols")
        fired = self.physics.apply_outer(edge, vectors[:n_rows], vectors[n_rows:], bit_length, feedback=feedback)
        self._fired(fired)

    def _step(self, c: Command) -> bytes:
        """STEP? (spec 3.8): check every record, apply them all, settle, answer pulses and every state."""
        steps, payload = c.args
        updates = decode_updates(np.asarray(payload, np.uint8).tobytes())
        seen: set[tuple[int, bool]] = set()
        plan = []
        for u in updates:
            n_rows, n_cols = self._edge(u.edge, u.feedback)
            if (u.edge, u.feedback) in seen:
                raise ScpiCommandError(-222, f"edge {u.edge}{' feedback' if u.feedback else ''} updated twice")
            seen.add((u.edge, u.feedback))
            if u.outer:
                self._length(u.vectors, n_rows + n_cols, f"outer rows+cols of edge {u.edge}")
            elif u.indices.size and int(u.indices[-1]) >= n_rows * n_cols:
                raise ScpiCommandError(-222, f"index {int(u.indices[-1])} of edge {u.edge} not below {n_rows * n_cols}")
            plan.append((u, n_rows, n_cols))
        fired = 0
        for u, n_rows, n_cols in plan:  # all checked: apply all
            if u.outer:
                fired += self.physics.apply_outer(u.edge, u.vectors[:n_rows], u.vectors[n_rows:], u.bit_length,
                                                  feedback=u.feedback)
            elif u.indices.size:
                counts = np.zeros(n_rows * n_cols, np.int64)
                counts[u.indices.astype(np.int64)] = u.counts
                fired += self.physics.apply_pulses(u.edge, counts.reshape(n_rows, n_cols), feedback=u.feedback)
        self._fired(fired)
        if steps:
            self.physics.step(steps)
        states = self.physics.read_state(None)
        flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in states])
        return format_number(fired).encode("ascii") + b"," + self._block(flat)

    def _set_eta(self, c: Command) -> None:
        eta = list(c.args[0])
        if len(eta) < len(self.edges):
            raise ScpiCommandError(-109, f"{len(eta)} learning rates given, one per edge ({len(self.edges)}) needed")
        if len(eta) > len(self.edges):
            raise ScpiCommandError(-108, f"{len(eta)} learning rates given, board has {len(self.edges)} edges")
        self.physics.set_local_learning(bool(self.physics.local_learning[0]), eta, None)

    def _train_sample(self, c: Command) -> bytes:
        beta, t1, t2, data = c.args
        n0, n_out = self.sizes[0], self.sizes[-1]
        data = self._length(data, n0 + n_out, "input+target")
        x = self._input(data[:n0])
        target = self._volts(data[n0:], self.physics.config.adc_range_volts, "target")
        before = int(self.physics.counters.get("pulses", 0))
        out = self.physics.train_sample(x, target, beta, t1, t2)
        self._fired(int(self.physics.counters.get("pulses", 0)) - before)  # a pulse command (spec 3.5)
        self._dynamics_reset()  # the sample ends in HOLD with the nudge off
        self.input = x.astype(np.float32)
        return self._block(np.asarray(out, np.float32))

    def _infer(self, c: Command) -> bytes:
        t1, volts = c.args
        x = self._input(volts)
        out = self.physics.infer(x, t1)
        self._dynamics_reset()
        self.input = x.astype(np.float32)
        return self._block(np.asarray(out, np.float32))

    def _program(self, c: Command, feedback: bool) -> None:
        edge, tolerance, iterations, weights = c.args
        shape = self._edge(edge, feedback)
        weights = self._length(weights, shape[0] * shape[1], "weights").reshape(shape)
        self.residual = float(
            self.physics.program_weights(edge, weights, feedback=feedback, tolerance=tolerance, max_iterations=iterations)
        )

    @staticmethod
    def _converter(bits: int | None, lo_hi: tuple[float, float]) -> str:
        return format_numbers([int(bits or 0), float(lo_hi[0]), float(lo_hi[1])])
