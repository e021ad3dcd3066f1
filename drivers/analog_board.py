"""Driver of an EP analog board over VISA (``protocols/analog_board.md``), on pyvisa with pyvisa-py by default.

Every transaction holds the instance lock, is logged at DEBUG and counted in ``stats``. After each set command
the error queue is drained and its entries raised as :class:`InstrumentError`; a settle waits on ``*OPC?``.
A timeout or lost link reconnects; idempotent operations are retried (bounded), pulse commands and training
samples never are: the driver reconnects and raises :class:`LinkError`, so the caller's journal decides.
Values are checked against :class:`Limits`, the topology and the board's compliance before anything is sent.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import numpy as np

from eqprop_hil.drivers.errors import LimitError, ReplyError
from eqprop_hil.drivers.interface import Identity, Phase, PulseResult, Topology
from eqprop_hil.drivers.lifecycle import CloseCallbacks
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.drivers.scpi_property import (
    ScpiProperty, parse_bool, parse_float, parse_int, parse_word, strict_bool, strict_discrete_set, strict_range,
)
from eqprop_hil.drivers.visa_link import VisaLink
from eqprop_hil.protocols.auth import token_or_env
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.scpi import format_number
from eqprop_hil.protocols.scpi_commands import MAX_BETA, MAX_ETA, MAX_PHASE_STEPS, MAX_SETTLE_STEPS
from eqprop_hil.protocols.scpi_integrity import supports_integrity

log = logging.getLogger(__name__)


class AnalogBoard(CloseCallbacks):
    """An analog EP board: ``AnalogBoard("TCPIP0::127.0.0.1::5025::SOCKET")``; implements NeuronArray, SampleRunner."""

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
            self._identity = self._link.run(self._read_identity, what="*IDN?")
            if integrity and supports_integrity(self._identity["firmware"]):
                self._link.run(self._link.enable_integrity, what="SYST:INT ON")
                self._identity = self._link.run(self._read_identity, what="*IDN?")  # again, now checked
            elif integrity:
                log.info("%s firmware %s has no SYST:INT: messages travel without CRC", resource,
                         self._identity["firmware"])
            self._topology = self._link.run(self._read_topology, what="TOP?")
            self._compliance = self.compliance_amperes
            self._link.run(self._link.collect_errors)  # stale entries of an earlier session are not ours
        except BaseException:
            self._link.close()
            raise

    # ------------------------------------------------------------------------------------------ transactions
    def _query(self, command: str) -> str:
        return self._link.query(command)

    def _set(self, command: str, block: np.ndarray | None = None, datatype: str = "f", *, idempotent: bool = True,
             opc: bool = False) -> None:
        self._link.set(command, block, datatype, idempotent=idempotent, opc=opc)

    def _query_block(self, command: str, count: int, block: np.ndarray | None = None, *,
                     idempotent: bool = True) -> np.ndarray:
        return self._link.query_block(command, count, block, idempotent=idempotent)

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
        fields = self._link.ask("*IDN?").split(",")
        if len(fields) != 4:
            raise ReplyError(f"*IDN? must answer 4 comma-separated fields, got {fields!r}")
        return {"vendor": fields[0], "model": fields[1], "serial": fields[2], "firmware": fields[3]}

    def _read_topology(self) -> Topology:
        try:
            sizes = [int(v) for v in self._link.ask("TOP:SIZ?").split(",")]
            flat = [int(v) for v in self._link.ask("TOP:EDG?").split(",")]
        except ValueError as e:
            raise ReplyError(f"topology reply is not a list of integers: {e}") from e
        feedback = self._link.ask("TOP:FEED?").lower()
        activation = self._link.ask("TOP:ACT?").lower()
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

    def describe(self) -> dict:
        """The board's own description of its physics (``SYST:DESC?``, JSON): device model, converters, ..."""
        raw = self._link.query_bytes("SYST:DESC?")
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
        def operation() -> int:
            self._link.write(command, block, datatype)
            self._link.check(command)
            return parse_int(self._link.ask("PULS:LAST?"))

        fired = self._link.run(operation, idempotent=False, what=command)
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

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Leave the board safe (HOLD, nudge off, input 0), then release the link, even if the first part fails."""
        with self._lock:
            if self._link.res is None:
                return
            try:
                self.set_phase("HOLD")
                self.nudge_off()
                self._set("INP ", np.zeros(self._topology["sizes"][0], np.float32))
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
