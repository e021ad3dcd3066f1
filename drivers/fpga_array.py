"""Driver of an FPGA neuron array over a serial port (``protocols/fpga_serial.md``), on pyserial.

Implements :class:`eqprop_hil.drivers.interface.NeuronArray` (with :class:`Fenced`), :class:`SampleRunner` and
:class:`StepRunner`. ``port`` is a device path
(``/dev/ttyUSB0``, a pty slave) or any pyserial URL (``socket://host:port``, ``spy://...``). The link layer
(:mod:`eqprop_hil.drivers.fpga_link`) frames, numbers and retransmits; this module turns each operation into payloads,
checks every value against :class:`Limits` before anything is sent, and splits matrices that exceed one
payload into row chunks.

    with FpgaArray("socket://127.0.0.1:5555") as array:
        array.set_input(x); array.set_phase("FREE"); array.settle(30); states = array.read_state()

Instance fencing (``fpga_serial.md`` 4.1): the array binds to the board's power-up instance when it opens; every
command carries it, so a restarted or swapped board refuses state-changing commands (nothing runs) and the
driver raises :class:`InstanceChanged`, also when a bridge hid the restart. Only :meth:`rebind_instance` moves
the binding, never the driver by itself.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from eqprop_hil.drivers.errors import DeviceRestarted, DriverError, LimitError
from eqprop_hil.drivers.fpga_link import FpgaLink
from eqprop_hil.drivers.fpga_step import FpgaStepMixin
from eqprop_hil.drivers.interface import Identity, Phase, PulseResult, Topology
from eqprop_hil.drivers.lifecycle import CloseCallbacks
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.auth import token_or_env
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.fpga_messages import Opcode
from eqprop_hil.protocols.fpga_updates import pulse_update, update_bytes

log = logging.getLogger(__name__)


class FpgaArray(FpgaStepMixin, CloseCallbacks):
    """An FPGA neuron array; see the module docstring. One lock (in the link) per instrument."""

    def __init__(
        self, port: str, *, limits: Limits | None = None, timeout_s: float = 1.0, retries: int = 3,
        baudrate: int = 115200, token: str | None = None,
    ) -> None:  # fmt: skip
        """``token``: the shared token of an instrument that requires one (default ``$EQPROP_HIL_TOKEN``)."""
        self.limits = limits if limits is not None else Limits()
        self._closed = False
        self.link = FpgaLink(port, timeout_s=timeout_s, retries=retries, baudrate=baudrate, token=token_or_env(token))
        try:
            for attempt in range(3):
                try:
                    self.link.bind()
                    self._topology = self._read_topology()
                    break
                except DeviceRestarted:  # a reboot while opening loses nothing of ours: sync again
                    if attempt == 2:
                        raise
        except BaseException:
            self.link.close()
            raise

    @property
    def stats(self) -> dict[str, int]:
        """Link statistics: bytes_sent, bytes_received, round_trips, pulses_sent, retransmissions, timeouts, ..."""
        return self.link.stats

    def _call(self, opcode: Opcode, **fields: Any) -> dict[str, Any]:
        if self._closed:
            raise DriverError(f"{opcode.name} on a closed FpgaArray ({self.link.port}); open a new one")
        return self.link.call(opcode, **fields)

    # ------------------------------------------------------------------------------------------ description
    def identity(self) -> Identity:
        """IDENTIFY plus the protocol revision and the instance id of the board answering now (not checked
        against the bound instance: compare ``instance`` with :attr:`bound_instance` to see a restart)."""
        if self._closed:
            raise DriverError(f"IDENTIFY on a closed FpgaArray ({self.link.port}); open a new one")
        reply = self.link.call(Opcode.IDENTIFY, check_instance=False)
        return Identity(vendor=reply["vendor"], model=reply["model"], serial=reply["serial"], firmware=reply["firmware"],
                        protocol=self.link.protocol, instance=m.instance_hex(self.link.instance or 0))  # fmt: skip

    # ------------------------------------------------------------------------------------------ fencing
    def instance_id(self) -> str:
        """The instance id the board reports now (a fresh IDENTIFY): ``"9f2c4e1a07b3d5c8"``."""
        return self.identity()["instance"]

    @property
    def bound_instance(self) -> str:
        """The instance id every command is fenced with (set at open, moved only by :meth:`rebind_instance`)."""
        return m.instance_hex(self.link.fence)

    def rebind_instance(self) -> str:
        """Bind to the board's current instance (SYNC, then fence with its id) and return the id. Only for a
        caller that re-programs the weights the run needs right after (or starts afresh): never to silence an
        :class:`InstanceChanged`."""
        old = self.bound_instance
        new = m.instance_hex(self.link.bind())
        if new != old:
            log.warning("%s rebound from instance %s to %s", self.link.port, old, new)
        return new

    def _read_topology(self) -> Topology:
        reply = self.link.call(Opcode.TOPOLOGY)
        flat = [int(v) for v in reply["edges"]]
        edges = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
        feedback = "untied" if reply["feedback"] else "tied"
        return Topology(sizes=[int(n) for n in reply["sizes"]], edges=edges, feedback=feedback,
                        activation=reply["activation"])  # fmt: skip

    def topology(self) -> Topology:
        return Topology(**{k: list(v) if isinstance(v, list) else v for k, v in self._topology.items()})  # type: ignore[typeddict-item]

    def describe(self) -> dict:
        """Device model, converters and protocol settings, as the device reports them (JSON)."""
        return self._call(Opcode.DESCRIBE)["description"]

    def counters(self) -> dict[str, int]:
        """Device-side counters: physics (steps, pulses, ...), link (frames, replayed, ...), boot, faults."""
        return self._call(Opcode.COUNTERS)["counters"]

    def status(self) -> dict[str, Any]:
        """``{"phase": "HOLD", "nudge_mode": "OFF", "local_learning": False}``."""
        reply = self._call(Opcode.STATUS)
        return {"phase": m.PhaseCode(reply["phase"]).name, "nudge_mode": m.NudgeMode(reply["nudge_mode"]).name,
                "local_learning": bool(reply["local_learning"])}  # fmt: skip

    def snapshot(self) -> dict:
        n_edges = len(self._topology["edges"])
        enabled, eta, beta = self.local_learning()
        return {
            "driver": "FpgaArray", "port": self.link.port, "identity": self.identity(), "topology": self.topology(),
            "gains": [self.feedback_gain(e) for e in range(n_edges)],
            "scales": [self.weight_scale(e) for e in range(n_edges)],
            "local_learning": {"enabled": enabled, "eta": eta, "beta": beta}, "status": self.status(),
            "device": self.describe(), "boot": self.link.boot, "bound_instance": self.bound_instance,
            "limits": vars(self.limits).copy(),
        }  # fmt: skip

    # ------------------------------------------------------------------------------------------ driving
    def reset(self) -> None:
        self._call(Opcode.RESET)

    def set_input(self, volts: np.ndarray) -> None:
        self._call(Opcode.SET_INPUT, volts=self._input(volts))

    def set_phase(self, phase: Phase) -> None:
        if phase not in ("FREE", "NUDGE", "HOLD"):
            raise ValueRangeError(f"phase {phase!r}: use FREE, NUDGE or HOLD")
        self._call(Opcode.SET_PHASE, phase=int(m.PhaseCode[phase]))

    def set_nudge_current(self, amperes: np.ndarray) -> None:
        arr = self._vector(self.limits.check_nudge(amperes), self._topology["sizes"][-1], "nudge current")
        self._call(Opcode.SET_NUDGE_CURRENT, amperes=arr)

    def set_nudge_target(self, target: np.ndarray, beta: float) -> None:
        arr = self._vector(target, self._topology["sizes"][-1], "nudge target")
        self._call(Opcode.SET_NUDGE_TARGET, beta=float(beta), target=arr)

    def nudge_off(self) -> None:
        self._call(Opcode.NUDGE_OFF)

    def set_feedback_gain(self, edge: int, gain: float) -> None:
        if not 0.0 <= float(gain) <= 1.0:
            raise ValueRangeError(f"feedback gain {gain!r} outside [0, 1]")
        self._call(Opcode.SET_GAIN, edge=self._edge(edge), gain=float(gain))

    def feedback_gain(self, edge: int) -> float:
        return self._call(Opcode.GET_GAIN, edge=self._edge(edge))["gain"]

    def set_weight_scale(self, edge: int, scale: float, *, feedback: bool = False) -> None:
        """Readout scale of one matrix: effective W = scale * device weight (> 0)."""
        self._call(Opcode.SET_SCALE, edge=self._edge(edge), feedback=int(feedback), scale=float(scale))

    def weight_scale(self, edge: int, *, feedback: bool = False) -> float:
        return self._call(Opcode.GET_SCALE, edge=self._edge(edge), feedback=int(feedback))["scale"]

    def settle(self, steps: int) -> None:
        if not 0 <= int(steps) <= 0xFFFFFFFF:
            raise ValueRangeError(f"settle steps {steps!r} outside 0..2**32-1")
        self._call(Opcode.SETTLE, steps=int(steps))

    def read_state(self, layer: int | None = None) -> list[np.ndarray]:
        sizes = self._topology["sizes"]
        if layer is not None and not 0 <= int(layer) < len(sizes):
            raise ValueRangeError(f"layer {layer!r} outside 0..{len(sizes) - 1}")
        code = m.ALL_LAYERS if layer is None else int(layer)
        flat = self._call(Opcode.READ_STATE, layer=code)["states"]
        wanted = sizes if layer is None else [sizes[int(layer)]]
        if flat.size != sum(wanted):
            raise DriverError(f"READ_STATE returned {flat.size} values, expected {sum(wanted)} for layers {wanted}")
        return list(np.split(flat, np.cumsum(wanted)[:-1]))

    # ------------------------------------------------------------------------------------------ plasticity
    def apply_pulses(self, edge: int, counts: np.ndarray, *, feedback: bool = False) -> PulseResult:
        shape = self._shape(edge, feedback)
        raw = np.asarray(counts)
        if raw.shape != shape:
            raise ValueRangeError(f"pulse matrix of shape {raw.shape} for edge {edge}; expected {shape}")
        checked = self.limits.check_counts(raw)
        self._check_budget(int(np.abs(checked.astype(np.int64)).sum()))
        if not checked.any():
            return PulseResult(pulses=0)  # nothing to fire, nothing to send
        sparse = pulse_update(edge, feedback, checked)
        if sparse["form"] != 0 and m.FENCE.size + 1 + update_bytes(sparse) <= m.MAX_PAYLOAD:
            # Mostly zeros: one APPLY_SPARSE (index, count) command instead of dense row chunks (fpga_serial.md 5.2).
            pulses = int(self._call(Opcode.APPLY_SPARSE, updates=[sparse])["pulses"])
            self.stats["pulses_sent"] += pulses
            return PulseResult(pulses=pulses)
        step = m.rows_per_chunk(shape[1], 1, m.PULSE_FIXED)
        fired = 0
        for start in range(0, shape[0], step):
            chunk = checked[start : start + step]
            if not chunk.any():
                continue  # rows without pulses need no command
            reply = self._call(Opcode.APPLY_PULSES, edge=edge, feedback=int(feedback), row_start=start,
                               n_rows=chunk.shape[0], counts=chunk)  # fmt: skip
            fired += int(reply["pulses"])
            self.stats["pulses_sent"] += int(reply["pulses"])
        return PulseResult(pulses=fired)

    def apply_outer(
        self, edge: int, rows: np.ndarray, cols: np.ndarray, bit_length: int, *, feedback: bool = False
    ) -> PulseResult:
        shape = self._shape(edge, feedback)
        rows_v = self._vector(rows, shape[0], "outer rows")
        cols_v = self._vector(cols, shape[1], "outer cols")
        for name, v in (("rows", rows_v), ("cols", cols_v)):
            if np.abs(v).max(initial=0.0) > 1.0:
                raise ValueRangeError(f"outer {name} must be in [-1, 1], got max |x| = {float(np.abs(v).max()):g}")
        bit_length = self.limits.check_bit_length(bit_length)
        worst = int(np.count_nonzero(rows_v)) * int(np.count_nonzero(cols_v)) * bit_length
        self._check_budget(worst)
        reply = self._call(Opcode.APPLY_OUTER, edge=edge, feedback=int(feedback), bit_length=bit_length,
                           rows=rows_v, cols=cols_v)  # fmt: skip
        self.stats["pulses_sent"] += int(reply["pulses"])
        return PulseResult(pulses=int(reply["pulses"]))

    def set_local_learning(self, enabled: bool, eta: list[float] | None = None, beta: float | None = None) -> None:
        n_edges = len(self._topology["edges"])
        eta_arr = np.zeros(0) if eta is None else np.asarray(eta, dtype=np.float64).reshape(-1)
        if eta is not None and eta_arr.size != n_edges:
            raise ValueRangeError(f"eta needs one rate per edge ({n_edges}), got {eta_arr.size}")
        self._call(Opcode.SET_LOCAL_LEARNING, enabled=int(bool(enabled)), set_beta=int(beta is not None),
                   beta=0.0 if beta is None else float(beta), eta=eta_arr)  # fmt: skip

    def local_learning(self) -> tuple[bool, list[float], float | None]:
        """(enabled, eta per edge, beta or None)."""
        reply = self._call(Opcode.GET_LOCAL_LEARNING)
        beta = None if np.isnan(reply["beta"]) else float(reply["beta"])
        return bool(reply["enabled"]), [float(v) for v in reply["eta"]], beta

    def read_weights(self, edge: int, *, feedback: bool = False) -> np.ndarray:
        shape = self._shape(edge, feedback)
        step = m.rows_per_chunk(shape[1], 4, m.READ_FIXED)
        parts = []
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            reply = self._call(Opcode.READ_WEIGHTS, edge=edge, feedback=int(feedback), row_start=start, n_rows=n)
            if reply["weights"].size != n * shape[1]:
                raise DriverError(f"READ_WEIGHTS returned {reply['weights'].size} values for {n} rows of {shape[1]}")
            parts.append(reply["weights"].reshape(n, shape[1]))
        return np.concatenate(parts).astype(np.float32)

    def program_weights(
        self, edge: int, weights: np.ndarray, *, feedback: bool = False, tolerance: float = 0.01, max_iterations: int = 20
    ) -> float:
        shape = self._shape(edge, feedback)
        target = np.asarray(weights, dtype=np.float64)
        if target.shape != shape or not np.all(np.isfinite(target)):
            raise ValueRangeError(f"weights of shape {target.shape} (finite) required for edge {edge}; expected {shape}")
        if not (tolerance > 0) or not 1 <= int(max_iterations) <= 0xFFFF:
            raise ValueRangeError(f"tolerance {tolerance!r} must be > 0, max_iterations {max_iterations!r} in 1..65535")
        step = m.rows_per_chunk(shape[1], 4, m.PROGRAM_FIXED)
        residual = float("nan")
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            reply = self._call(Opcode.PROGRAM_WEIGHTS, edge=edge, feedback=int(feedback), row_start=start, n_rows=n,
                               commit=int(start + n == shape[0]), tolerance=float(tolerance),
                               max_iterations=int(max_iterations), weights=target[start : start + n])  # fmt: skip
            residual = float(reply["residual"])
        return residual

    # ------------------------------------------------------------------------------------------ sample runner
    def train_sample(self, volts: np.ndarray, target: np.ndarray, beta: float, t1: int, t2: int) -> np.ndarray:
        x = self._input(volts)
        y = self._vector(target, self._topology["sizes"][-1], "target")
        for name, t in (("t1", t1), ("t2", t2)):
            if not 0 <= int(t) <= 0xFFFF:
                raise ValueRangeError(f"{name}={t!r} outside 0..65535 steps")
        reply = self._call(Opcode.TRAIN_SAMPLE, beta=float(beta), t1=int(t1), t2=int(t2), volts=x, target=y)
        return reply["output"]

    def infer(self, volts: np.ndarray, t1: int) -> np.ndarray:
        if not 0 <= int(t1) <= 0xFFFF:
            raise ValueRangeError(f"t1={t1!r} outside 0..65535 steps")
        return self._call(Opcode.INFER, t1=int(t1), volts=self._input(volts))["output"]

    # ------------------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Leave the array safe (HOLD, nudge off, input 0), then release the port; safe to call twice."""
        if self._closed:
            return
        try:
            self.set_phase("HOLD")
            self.nudge_off()
            self.set_input(np.zeros(self._topology["sizes"][0]))
        except Exception as e:  # the port is released whatever the device says
            log.warning("could not leave %s safe before closing: %s", self.link.port, e)
        finally:
            self._closed = True
            self.link.close()

    def __enter__(self) -> "FpgaArray":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ checks
    def _edge(self, edge: int) -> int:
        n = len(self._topology["edges"])
        if isinstance(edge, bool) or not 0 <= int(edge) < n:
            raise ValueRangeError(f"edge {edge!r} outside 0..{n - 1}")
        return int(edge)

    def _shape(self, edge: int, feedback: bool) -> tuple[int, int]:
        i, j = self._topology["edges"][self._edge(edge)]
        sizes = self._topology["sizes"]
        return (sizes[i], sizes[j]) if feedback else (sizes[j], sizes[i])

    @staticmethod
    def _vector(values: np.ndarray, n: int, what: str) -> np.ndarray:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        if arr.size != n or not np.all(np.isfinite(arr)):
            raise ValueRangeError(f"{what} needs {n} finite values, got {arr.size}: {arr[:6].tolist()}")
        return arr

    def _input(self, volts: np.ndarray) -> np.ndarray:
        return self._vector(self.limits.check_input(volts), self._topology["sizes"][0], "input")

    def _check_budget(self, pulses: int) -> None:
        budget = self.limits.pulse_budget
        if budget is not None and self.stats["pulses_sent"] + pulses > budget:
            raise LimitError(
                f"{pulses} more pulses would exceed the session budget of {budget} "
                f"({self.stats['pulses_sent']} already sent); nothing was sent"
            )
