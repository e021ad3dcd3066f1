"""Driver of an EP analog board over VISA (``protocols/analog_board.md``, protocol 2), on pyvisa with pyvisa-py.

At open the driver reads the protocol revision (``SYST:PROT?``, refusing any but 2 with
:class:`ProtocolVersionError` before anything changes the board), the identity, the board's power-up instance
id (``SYST:INST?``) and its newest request id. From then on every message is **tagged** (spec section 4) with
the bound instance and a fresh request id, and every reply carries the tag back: a set is acknowledged with its
status (no ``SYST:ERR?`` or ``*OPC?`` round trip), a board that is not the bound instance refuses what would
change it (:class:`InstanceChanged`; the driver never rebinds by itself, see :meth:`rebind_instance`), and after a
timeout, a stall or a garbled reply the driver reconnects and resends the *same bytes*: the board's
duplicate-request cache answers a repeat without running it again, so every command (pulses included) runs at
most once, and replies to other requests are discarded, never taken for this one.
Every transaction holds the instance lock, is logged at DEBUG and counted in ``stats``. Values are checked
against :class:`Limits`, the topology and the board's compliance before anything is sent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from eqprop_hil.drivers.errors import InstanceChanged, LimitError, ProtocolVersionError, ReplyError
from eqprop_hil.drivers.interface import Identity, Phase, PulseResult, PulseUpdate, Topology
from eqprop_hil.drivers.lifecycle import CloseCallbacks
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.drivers.scpi_property import (
    ScpiProperty, parse_bool, parse_float, parse_int, parse_word, strict_bool, strict_discrete_set, strict_range,
)
from eqprop_hil.drivers.visa_link import VisaLink
from eqprop_hil.protocols import ieee_block
from eqprop_hil.protocols.auth import token_or_env
from eqprop_hil.protocols.errors import BlockError, ScpiError, ValueRangeError
from eqprop_hil.protocols.scpi import format_number
from eqprop_hil.protocols.scpi_commands import MAX_BETA, MAX_ETA, MAX_PHASE_STEPS, MAX_SETTLE_STEPS, PROTOCOL_VERSION
from eqprop_hil.protocols.scpi_integrity import supports_integrity
from eqprop_hil.protocols.scpi_tags import StepUpdate, check_instance, encode_updates, sparse_update

log = logging.getLogger(__name__)


class AnalogBoard(CloseCallbacks):
    """An analog EP board: ``AnalogBoard("TCPIP0::127.0.0.1::5025::SOCKET")``; implements NeuronArray (with
    Fenced), SampleRunner and StepRunner."""

    phase = ScpiProperty("Control the phase of the dynamics: FREE, NUDGE or HOLD (no unit).", "PHAS?", "PHAS",
                         parse=parse_word, validator=strict_discrete_set(("FREE", "NUDGE", "HOLD")), invalid="RUN")
    compliance_amperes = ScpiProperty("Control the compliance of the nudge currents (amperes).", "NUDG:COMP?",
                                      "NUDG:COMP", validator=strict_range(1e-9, 1.0), fmt=format_number,
                                      invalid=2.0, cache="_compliance")
    learning_enabled = ScpiProperty("Control on-device local learning, True or False (no unit).", "LEAR?", "LEAR",
                                    parse=parse_bool, validator=strict_bool, fmt=lambda v: "ON" if v else "OFF",
                                    invalid=1)
    learning_beta = ScpiProperty("Control the beta of the on-device learning rule (dimensionless).", "LEAR:BETA?",
                                 "LEAR:BETA", validator=strict_range(1e-9, MAX_BETA), fmt=format_number, invalid=0.0)
    nudge_mode = ScpiProperty("Get the nudge mode: OFF, CURRENT or TARGET (no unit).", "NUDG:MODE?", parse=parse_word)
    nudge_beta = ScpiProperty("Get the beta of the target nudge mode (dimensionless).", "NUDG:BETA?")
    step_period_s = ScpiProperty("Get the duration of one dynamics step (seconds).", "SETT:PER?")
    steps_total = ScpiProperty("Measure the dynamics steps run since power-on (steps).", "SETT:COUN?",
                               parse=parse_int)
    pulses_total = ScpiProperty("Measure the device pulses fired since power-on (pulses).", "PULS:TOT?",
                                parse=parse_int)
    boot_count = ScpiProperty("Measure the boots since manufacture; a change means a power cycle (boots).", "SYST:BOOT?",
                              parse=parse_int)
    pulse_commands_executed = ScpiProperty(
        "Measure the pulse commands executed since manufacture, a non-volatile wear log (commands).", "PULS:COUN?",
        parse=parse_int)
    residual = ScpiProperty("Measure max |W - target| after the last write-verify (effective weight units).",
                            "WEIG:RES?")
    error_count = ScpiProperty("Get the number of entries waiting in the error queue (entries).", "SYST:ERR:COUN?",
                               parse=parse_int)
    device_model = ScpiProperty("Get the synapse device model, e.g. SOFT_BOUNDS (no unit).", "DEV:MOD?",
                                parse=parse_word)

    def __init__(
        self, resource: str, *, limits: Limits | None = None, timeout_s: float = 5.0, retries: int = 2,
        backend: str = "@py", token: str | None = None, integrity: bool = True,
    ) -> None:
        """``token``: the shared token of an instrument that requires one (default ``$EQPROP_HIL_TOKEN``).
        ``integrity``: put a CRC-32 on every message and check one on every reply (protocols/analog_board.md
        1.2) when the board's firmware supports it (``*IDN?``); SCPI alone cannot tell a flipped bit inside a
        pulse-count block from a real count."""
        if not timeout_s > 0 or retries < 0:
            raise ValueRangeError(f"timeout_s must be > 0 and retries >= 0, got {timeout_s!r}, {retries!r}")
        self.resource_name = resource
        self.limits = limits if limits is not None else Limits()
        self._link = VisaLink(resource, timeout_s=timeout_s, retries=retries, backend=backend,
                              token=token_or_env(token))
        self.stats = self._link.stats  # bytes_sent, bytes_received, round_trips, pulses_sent, reconnects, ...
        self._lock = self._link.lock
        try:
            self._identity = self._link.run(self._read_identity, what="SYST:PROT? *IDN?")
            if integrity and supports_integrity(self._identity["firmware"]):
                self._link.run(self._link.enable_integrity, what="SYST:INT ON")
                self._identity = self._link.run(self._read_identity, what="SYST:PROT? *IDN?")  # now checked
            elif integrity:
                log.info("%s firmware %s has no SYST:INT: messages travel without CRC", resource,
                         self._identity["firmware"])
            self._link.run(self._bind, what="SYST:INST? SYST:REQ:LAST?")
            # the untagged reads above only bootstrap the tag; what the driver keeps is read again tagged, so a
            # duplicated or stale untagged reply can fail the opening, never be taken for a value (spec 4.3)
            self._identity = self._read_identity_tagged()
            self._topology = self._read_topology()
            self._compliance = self.compliance_amperes
        except BaseException:
            self._link.close()
            raise

    # ------------------------------------------------------------------------------------------ transactions
    def _query(self, command: str) -> str:
        return self._link.transact(command, expect="text").decode("ascii", "replace")

    def _set(self, command: str, block: np.ndarray | None = None, datatype: str = "f", *, idempotent: bool = True,
             opc: bool = False) -> None:
        """A tagged set: answered once it has run (so ``opc`` needs no ``*OPC?``); every set runs at most once."""
        self._link.transact(command, block, datatype)

    def _query_block(self, command: str, count: int, block: np.ndarray | None = None, *,
                     idempotent: bool = True) -> np.ndarray:
        return self._decode_states(self._link.transact(command, block, expect="block"), count, command)

    def _decode_states(self, data: bytes, count: int, command: str) -> np.ndarray:
        try:
            values = ieee_block.decode_block(data, "f")
        except BlockError as e:
            raise ReplyError(f"malformed binary block after {command[:30]!r}: {e}") from e
        if values.size != count:
            raise ReplyError(f"block holds {values.size} elements, expected {count}")
        if not np.all(np.isfinite(values)):
            raise ReplyError(f"block contains NaN or infinity: {values[~np.isfinite(values)][:4]}")
        return np.array(values, dtype=np.float32)

    # ------------------------------------------------------------------------------------------ checks
    def _edge(self, edge: int, feedback: bool) -> tuple[int, int]:
        edges, sizes = self._topology["edges"], self._topology["sizes"]
        if not isinstance(edge, (int, np.integer)) or not 0 <= edge < len(edges):
            raise ValueRangeError(f"edge {edge!r} not in 0..{len(edges) - 1}")
        src, dst = edges[edge]
        if feedback and (self._topology["feedback"] != "untied" or src == 0):
            raise ValueRangeError(f"edge {edge} has no feedback matrix (tied board, or an edge out of the input)")
        return (sizes[src], sizes[dst]) if feedback else (sizes[dst], sizes[src])

    @staticmethod
    def _vector(values: Any, n: int, what: str) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (n,):
            raise ValueRangeError(f"{what} must have shape ({n},), got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise LimitError(f"{what} contains NaN or infinity; nothing was sent")
        return arr

    @staticmethod
    def _count(value: int, lo: int, hi: int, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
            raise LimitError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
        return int(value)

    def _budget(self, worst: int) -> None:
        budget = self.limits.pulse_budget
        if budget is not None and self.stats["pulses_sent"] + worst > budget:
            raise LimitError(f"up to {worst} pulses would exceed the pulse budget of {budget} "
                             f"({self.stats['pulses_sent']} already fired); nothing was sent")

    # ------------------------------------------------------------------------------------------ Described
    def _read_identity(self) -> Identity:
        """``SYST:PROT?`` then ``*IDN?`` in one go: a revision 1 board answers only the second (spec 4.1)."""
        self._link.write("SYST:PROT?")
        self._link.write("*IDN?")
        first = self._link.read()
        if first.count(",") == 3:  # the identity came first: SYST:PROT? is unknown there (-113, silent)
            self._link.collect_errors()
            found, idn = 1, first
        else:
            try:
                found = int(first)
            except ValueError as e:
                raise ReplyError(f"SYST:PROT? must answer an integer, got {first!r}") from e
            idn = self._link.read()
        return self._checked_identity(found, idn)

    def _read_identity_tagged(self) -> Identity:
        """``SYST:PROT?``, ``*IDN?`` and ``SYST:INST?`` tagged, after the bootstrap; binds to that instance."""
        try:
            found = int(self._query("SYST:PROT?"))
        except ValueError as e:
            raise ReplyError(f"SYST:PROT? must answer an integer: {e}") from e
        identity = self._checked_identity(found, self._query("*IDN?"))
        self._link.instance = self._parse_instance(self._query("SYST:INST?"))  # unfenced: any bound id reads it
        identity["instance"] = self._link.instance
        return identity

    def _checked_identity(self, found: int, idn: str) -> Identity:
        fields = idn.split(",")
        if len(fields) != 4:
            raise ReplyError(f"*IDN? must answer 4 comma-separated fields, got {fields!r}")
        if found != PROTOCOL_VERSION:
            error = ProtocolVersionError(
                f"{self.resource_name} ({idn}) speaks protocol revision {found}; this driver speaks "
                f"{PROTOCOL_VERSION} (protocols/analog_board.md); nothing that changes the board was sent: "
                "update the firmware or use a matching driver")
            error.supported, error.found = PROTOCOL_VERSION, found  # type: ignore[attr-defined]
            raise error
        return {"vendor": fields[0], "model": fields[1], "serial": fields[2], "firmware": fields[3],
                "protocol": found, "instance": self._link.instance or ""}

    def _bind(self) -> None:
        """Bind to the board's instance and continue its request ids (spec 4.2: newest accepted id + 1)."""
        instance = self._parse_instance(self._link.ask("SYST:INST?"))
        try:
            last = int(self._link.ask("SYST:REQ:LAST?"))
        except ValueError as e:
            raise ReplyError(f"SYST:REQ:LAST? must answer an integer: {e}") from e
        self._link.instance = instance
        self._link.next_id = (last + 1) % (1 << 32)

    @staticmethod
    def _parse_instance(reply: str) -> str:
        try:
            return check_instance(reply.strip().strip('"'))
        except ScpiError as e:
            raise ReplyError(f"SYST:INST? must answer a string of 16 hex digits, got {reply!r}") from e

    def _read_topology(self) -> Topology:
        try:
            sizes = [int(v) for v in self._query("TOP:SIZ?").split(",")]
            flat = [int(v) for v in self._query("TOP:EDG?").split(",")]
        except ValueError as e:
            raise ReplyError(f"topology reply is not a list of integers: {e}") from e
        feedback = self._query("TOP:FEED?").lower()
        activation = self._query("TOP:ACT?").lower()
        if len(flat) % 2 or feedback not in ("tied", "untied") or len(sizes) < 2:
            raise ReplyError(f"inconsistent topology: sizes {sizes}, edges {flat}, feedback {feedback!r}")
        return {"sizes": sizes, "edges": list(zip(flat[::2], flat[1::2])), "feedback": feedback,  # type: ignore
                "activation": activation}

    @property
    def integrity(self) -> bool:
        """Get whether every message and reply of this link carries a CRC-32 (protocols/analog_board.md 1.2)."""
        return self._link.crc

    def identity(self) -> Identity:
        return dict(self._identity)  # type: ignore[return-value]

    def topology(self) -> Topology:
        return {**self._topology, "sizes": list(self._topology["sizes"]), "edges": list(self._topology["edges"])}

    def snapshot(self) -> dict:
        """Identity, topology, every setting the board reports, converters, device model, limits and stats."""
        with self._lock:
            n_edges = len(self._topology["edges"])
            return {
                "resource": self.resource_name, "identity": self.identity(), "topology": self.topology(),
                "phase": self.phase, "nudge_mode": self.nudge_mode, "compliance_amperes": self.compliance_amperes,
                "gains": [self.feedback_gain(e) for e in range(n_edges)],
                "scales": [self.weight_scale(e) for e in range(n_edges)],
                "learning": {"enabled": self.learning_enabled, "eta": self.learning_eta(),
                             "beta": self.learning_beta},
                "step_period_s": self.step_period_s, "device_model": self.device_model,
                "dac": self._query("CONV:DAC?"), "adc": self._query("CONV:ADC?"),
                "describe": self.describe(),
                "limits": asdict(self.limits), "stats": dict(self.stats),
            }

    # ------------------------------------------------------------------------------------------ Fenced
    def instance_id(self) -> str:
        """Get the instance id the board reports now (``SYST:INST?``): 16 hex digits, new at every power-up."""
        return self._parse_instance(self._query("SYST:INST?"))

    @property
    def bound_instance(self) -> str:
        """Get the instance id every message is fenced with (set at open; changed only by rebind_instance)."""
        return str(self._link.instance)

    def rebind_instance(self) -> str:
        """Bind to the board's current instance; returns its id. Only after the weights the run needs were
        re-programmed (or deliberately, for a fresh run): never to silence an InstanceChanged."""
        with self._lock:
            instance = self.instance_id()
            if instance != self._link.instance:
                log.warning("%s: rebinding from instance %s to %s", self.resource_name, self._link.instance, instance)
            self._link.instance = instance
            self._identity["instance"] = instance  # type: ignore[typeddict-item]
            return instance

    def describe(self) -> dict:
        """The board's own description of its physics (``SYST:DESC?``, JSON): device model, converters, ..."""
        try:
            raw, _ = ieee_block.split_block(self._link.transact("SYST:DESC?", expect="block"))
        except BlockError as e:
            raise ReplyError(f"SYST:DESC? is not a block: {e}") from e
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ReplyError(f"SYST:DESC? is not UTF-8 JSON: {raw[:40]!r}") from e

    # ------------------------------------------------------------------------------------------ Driven
    def reset(self) -> None:
        self._set("*RST")

    def set_input(self, volts: np.ndarray) -> None:
        arr = self._vector(volts, self._topology["sizes"][0], "input drive")
        self.limits.check_input(arr)
        self._set("INP ", arr.astype(np.float32))

    def set_phase(self, phase: Phase) -> None:
        self.phase = phase

    def set_nudge_current(self, amperes: np.ndarray) -> None:
        arr = self._vector(amperes, self._topology["sizes"][-1], "nudge current")
        self.limits.check_nudge(arr)
        worst = float(np.abs(arr).max(initial=0.0))
        if worst > self._compliance:
            raise LimitError(f"nudge current {worst:g} A exceeds the board's compliance of {self._compliance:g} A; "
                             "nothing was sent")
        self._set("NUDG:CURR ", arr.astype(np.float32))

    def set_nudge_target(self, target: np.ndarray, beta: float) -> None:
        arr = self._vector(target, self._topology["sizes"][-1], "nudge target")
        beta = strict_range(1e-9, MAX_BETA)(beta)
        self._set(f"NUDG:TARG {format_number(beta)},", arr.astype(np.float32))

    def nudge_off(self) -> None:
        self._set("NUDG:OFF")

    def set_feedback_gain(self, edge: int, gain: float) -> None:
        self._edge(edge, False)
        self._set(f"EDGE:GAIN {int(edge)},{format_number(strict_range(0.0, 1.0)(gain))}")

    def feedback_gain(self, edge: int) -> float:
        """Get the feedback gain of one edge (dimensionless, 0..1)."""
        self._edge(edge, False)
        return parse_float(self._query(f"EDGE:GAIN? {int(edge)}"))

    def set_weight_scale(self, edge: int, scale: float, *, feedback: bool = False) -> None:
        """Set the effective-weight scale of one matrix: W = scale * w_device (dimensionless, 1e-3..1e3)."""
        self._edge(edge, feedback)
        head = "EDGE:SCAL:FEED" if feedback else "EDGE:SCAL"
        self._set(f"{head} {int(edge)},{format_number(strict_range(1e-3, 1e3)(scale))}")

    def weight_scale(self, edge: int, *, feedback: bool = False) -> float:
        """Get the effective-weight scale of one matrix (dimensionless)."""
        self._edge(edge, feedback)
        head = "EDGE:SCAL:FEED?" if feedback else "EDGE:SCAL?"
        return parse_float(self._query(f"{head} {int(edge)}"))

    def settle(self, steps: int) -> None:
        steps = self._count(steps, 1, MAX_SETTLE_STEPS, "steps")
        self._set(f"SETT {steps}", idempotent=False, opc=True)

    def settle_time(self, seconds: float) -> None:
        """Run the dynamics for ``seconds`` of board time (ceil(seconds / step_period_s) steps), then *OPC?."""
        seconds = strict_range(0.0, 1e3)(seconds)
        self._set(f"SETT:TIME {format_number(seconds)}", idempotent=False, opc=True)

    def read_state(self, layer: int | None = None) -> list[np.ndarray]:
        sizes = self._topology["sizes"]
        if layer is None:
            flat = self._query_block("STAT?", sum(sizes))
            return np.split(flat, np.cumsum(sizes)[:-1])
        layer = self._count(layer, 0, len(sizes) - 1, "layer")
        return [self._query_block(f"STAT? {layer}", sizes[layer])]

    # ------------------------------------------------------------------------------------------ Plastic
    def _pulse(self, command: str, block: np.ndarray, datatype: str) -> PulseResult:
        with self._lock:
            self._link.transact(command, block, datatype)
            fired = parse_int(self._query("PULS:LAST?"))
        self.stats["pulses_sent"] += fired
        return {"pulses": fired}

    def apply_pulses(self, edge: int, counts: np.ndarray, *, feedback: bool = False) -> PulseResult:
        shape = self._edge(edge, feedback)
        arr = np.asarray(counts)
        if arr.shape != shape:
            raise ValueRangeError(f"pulse counts must have shape {shape}, got {arr.shape}")
        arr = self.limits.check_counts(arr)
        self._budget(int(np.abs(arr.astype(np.int64)).sum()))
        head = "PULS:MATR:FEED" if feedback else "PULS:MATR"
        return self._pulse(f"{head} {int(edge)},", arr, "b")

    def apply_outer(self, edge: int, rows: np.ndarray, cols: np.ndarray, bit_length: int, *,
                    feedback: bool = False) -> PulseResult:
        n_rows, n_cols = self._edge(edge, feedback)
        r, c = self._vector(rows, n_rows, "outer rows"), self._vector(cols, n_cols, "outer cols")
        if max(np.abs(r).max(initial=0), np.abs(c).max(initial=0)) > 1:
            raise LimitError("outer rows and cols must lie in [-1, 1] (firing probabilities); nothing was sent")
        bit_length = self.limits.check_bit_length(self._count(bit_length, 1, 255, "bit length"))
        self._budget(bit_length * int(np.count_nonzero(r)) * int(np.count_nonzero(c)))
        head = "PULS:OUT:FEED" if feedback else "PULS:OUT"
        return self._pulse(f"{head} {int(edge)},{bit_length},", np.concatenate([r, c]).astype(np.float32), "f")

    def set_local_learning(self, enabled: bool, eta: list[float] | None = None, beta: float | None = None) -> None:
        strict_bool(enabled)
        with self._lock:
            if eta is not None:
                values = [strict_range(0.0, MAX_ETA)(v) for v in eta]
                if len(values) != len(self._topology["edges"]):
                    raise ValueRangeError(f"{len(values)} learning rates for {len(self._topology['edges'])} edges")
                self._set("LEAR:ETA " + ",".join(format_number(v) for v in values))
            if beta is not None:
                self.learning_beta = beta
            self.learning_enabled = enabled

    def learning_eta(self) -> list[float]:
        """Get the on-device learning rate per edge (dimensionless)."""
        return [parse_float(v) for v in self._query("LEAR:ETA?").split(",")]

    def read_weights(self, edge: int, *, feedback: bool = False) -> np.ndarray:
        shape = self._edge(edge, feedback)
        head = "WEIG:FEED?" if feedback else "WEIG?"
        return self._query_block(f"{head} {int(edge)}", shape[0] * shape[1]).reshape(shape)

    def program_weights(self, edge: int, weights: np.ndarray, *, feedback: bool = False, tolerance: float = 0.01,
                        max_iterations: int = 20) -> float:
        shape = self._edge(edge, feedback)
        arr = np.asarray(weights, dtype=np.float64)
        if arr.shape != shape or not np.all(np.isfinite(arr)):
            raise ValueRangeError(f"weights must be finite with shape {shape}, got shape {arr.shape}")
        tolerance = strict_range(1e-6, 1.0)(tolerance)
        max_iterations = self._count(max_iterations, 1, 1000, "max_iterations")
        head = "WEIG:PROG:FEED" if feedback else "WEIG:PROG"
        with self._lock:
            self._set(f"{head} {int(edge)},{format_number(tolerance)},{max_iterations},", arr.astype(np.float32))
            return self.residual

    # ------------------------------------------------------------------------------------------ SampleRunner
    def train_sample(self, volts: np.ndarray, target: np.ndarray, beta: float, t1: int, t2: int) -> np.ndarray:
        sizes = self._topology["sizes"]
        x = self.limits.check_input(self._vector(volts, sizes[0], "input drive"))
        y = self._vector(target, sizes[-1], "target")
        beta = strict_range(1e-9, MAX_BETA)(beta)
        t1, t2 = (self._count(t, 1, MAX_PHASE_STEPS, name) for t, name in ((t1, "t1"), (t2, "t2")))
        data = np.concatenate([x, y]).astype(np.float32)
        command = f"LEAR:SAMP? {format_number(beta)},{t1},{t2},"
        return self._query_block(command, sizes[-1], data, idempotent=False)

    def infer(self, volts: np.ndarray, t1: int) -> np.ndarray:
        sizes = self._topology["sizes"]
        x = self.limits.check_input(self._vector(volts, sizes[0], "input drive"))
        t1 = self._count(t1, 1, MAX_PHASE_STEPS, "t1")
        return self._query_block(f"INF? {t1},", sizes[-1], x.astype(np.float32))

    # ------------------------------------------------------------------------------------------ StepRunner
    def _step_update(self, update: PulseUpdate) -> tuple[StepUpdate, int]:
        """One update checked against the topology and the limits; (record, worst-case pulses)."""
        if not isinstance(update, dict):
            raise ValueRangeError(f"a step update must be a dict (PulseUpdate), got {type(update).__name__}")
        unknown = set(update) - {"edge", "feedback", "counts", "rows", "cols", "bit_length"}
        if unknown:
            raise ValueRangeError(f"unknown step update keys {sorted(unknown)}")
        edge, feedback = update.get("edge"), bool(update.get("feedback", False))
        shape = self._edge(edge, feedback)  # type: ignore[arg-type]
        if "counts" in update:
            if {"rows", "cols", "bit_length"} & set(update):
                raise ValueRangeError(f"edge {edge}: give counts or rows/cols/bit_length, not both")
            arr = np.asarray(update["counts"])
            if arr.shape != shape:
                raise ValueRangeError(f"pulse counts of edge {edge} must have shape {shape}, got {arr.shape}")
            arr = self.limits.check_counts(arr)
            return sparse_update(int(edge), arr, feedback), int(np.abs(arr.astype(np.int64)).sum())  # type: ignore
        r = self._vector(update.get("rows"), shape[0], f"outer rows of edge {edge}")
        c = self._vector(update.get("cols"), shape[1], f"outer cols of edge {edge}")
        if max(np.abs(r).max(initial=0), np.abs(c).max(initial=0)) > 1:
            raise LimitError("outer rows and cols must lie in [-1, 1] (firing probabilities); nothing was sent")
        bit_length = self.limits.check_bit_length(self._count(update.get("bit_length"), 1, 255, "bit length"))
        vectors = np.concatenate([r, c]).astype(np.float32)
        worst = bit_length * int(np.count_nonzero(r)) * int(np.count_nonzero(c))
        return StepUpdate(int(edge), feedback, bit_length=bit_length, vectors=vectors), worst  # type: ignore

    def step(self, updates: list[PulseUpdate], steps: int = 1) -> tuple[PulseResult, list[np.ndarray]]:
        """Apply ``updates`` (sparse counts or outer trains; all checked first, all or none), settle ``steps``
        steps in the current phase, return (pulses fired, every layer's state in volts): one round trip,
        ``STEP?`` (spec 3.8), counted by the board as ONE pulse command; at most once (spec 4.2)."""
        steps = self._count(steps, 0, MAX_SETTLE_STEPS, "steps")
        records, worst, seen = [], 0, set()
        for update in updates:
            record, pulses = self._step_update(update)
            if (record.edge, record.feedback) in seen:
                raise ValueRangeError(f"edge {record.edge} (feedback={record.feedback}) updated twice in one step")
            seen.add((record.edge, record.feedback))
            records.append(record)
            worst += pulses
        self._budget(worst)
        sizes = self._topology["sizes"]
        body = self._link.transact(f"STEP? {steps},", encode_updates(records), expect="text,block")
        head, _, block = body.partition(b",")
        try:
            fired = int(head)
        except ValueError as e:
            raise ReplyError(f"STEP? must answer '<pulses>,<block>', got {body[:30]!r}") from e
        flat = self._decode_states(block, sum(sizes), "STEP?")
        self.stats["pulses_sent"] += fired
        return {"pulses": fired}, np.split(flat, np.cumsum(sizes)[:-1])

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Leave the board safe (HOLD, nudge off, input 0), then release the link, even if the first part fails.
        A board that is no longer the bound instance is left alone (it is not this run's)."""
        with self._lock:
            if self._link.res is None:
                return
            try:
                self.set_phase("HOLD")
                self.nudge_off()
                self._set("INP ", np.zeros(self._topology["sizes"][0], np.float32))
            except InstanceChanged as e:
                log.warning("%s: not leaving the board safe: %s", self.resource_name, e)
            finally:
                self._link.close()

    def __enter__(self) -> "AnalogBoard":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except Exception:
            if exc[0] is None:
                raise
            log.warning("closing %s after an error failed", self.resource_name, exc_info=True)
