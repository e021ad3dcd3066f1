"""STEP and APPLY_SPARSE on the emulated FPGA (``protocols/fpga_serial.md`` section 5.2): a mixin of FpgaDevice.

The whole request is validated against the topology before anything is applied (all or none); the updates are
then applied in request order and counted as ONE executed pulse command, whatever they hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.fixed_point import STATE, quantize
from eqprop_hil.protocols.fpga_messages import Opcode, Status
from eqprop_hil.protocols.fpga_updates import DENSE, OUTER

MAX_SETTLE_STEPS = 1_000_000


class _Refused(Exception):
    """A request refused with ``status``; the message goes back to the host in the response body."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status


class CompoundOps:
    """The compound opcodes; uses FpgaDevice's physics, counters and address checks."""

    physics: Any
    counters: dict[str, int]
    _edge: Any
    _shape: Any
    _length: Any

    def _op_step(self, steps: int, updates: list[dict[str, Any]]) -> bytes:
        """Apply every update (checked first, all or none; ONE pulse command), settle, return every state."""
        if steps > MAX_SETTLE_STEPS:
            raise _Refused(Status.OUT_OF_RANGE, f"STEP of {steps} steps exceeds {MAX_SETTLE_STEPS}")
        plan = self._plan(updates)
        fired = self._apply(plan)
        self.physics.step(steps)
        states = quantize(np.concatenate(self.physics.read_state(None)), STATE, saturate=True)
        return m.encode_response(Opcode.STEP, pulses=fired, states=states)

    def _op_apply_sparse(self, updates: list[dict[str, Any]]) -> bytes:
        return m.encode_response(Opcode.APPLY_SPARSE, pulses=self._apply(self._plan(updates)))

    def _plan(self, updates: list[dict[str, Any]]) -> list[tuple[int, bool, Any, Any]]:
        """Validate every update against the topology before anything is applied (fpga_serial.md 5.2)."""
        plan: list[tuple[int, bool, Any, Any]] = []  # (edge, feedback, form, payload)
        seen: set[tuple[int, bool]] = set()
        for k, u in enumerate(updates):
            edge, fb = self._edge(u["edge"], u["feedback"])
            if (edge, fb) in seen:
                raise _Refused(Status.OUT_OF_RANGE, f"update {k}: edge {edge} feedback {int(fb)} given twice")
            seen.add((edge, fb))
            shape = self._shape(edge, fb)
            size = shape[0] * shape[1]
            form = u["form"]
            if form == OUTER:
                rows = self._length(u["rows"], shape[0], f"update {k} outer rows")
                cols = self._length(u["cols"], shape[1], f"update {k} outer cols")
                if u["bit_length"] < 1:
                    raise _Refused(Status.OUT_OF_RANGE, f"update {k}: bit_length 0 outside 1..255")
                for name, v in (("rows", rows), ("cols", cols)):
                    if v.size and float(np.abs(v).max()) > 1.0:
                        raise _Refused(Status.OUT_OF_RANGE,
                                       f"update {k}: outer {name} must be in [-1, 1], got {float(np.abs(v).max()):g}")
                plan.append((edge, fb, OUTER, (u["bit_length"], rows, cols)))
                continue
            counts = np.asarray(u["counts"], dtype=np.int64)
            if form == DENSE:
                what: Any = self._length(counts, size, f"update {k} dense counts").reshape(shape)
            else:  # SPARSE16 / SPARSE32 (decode refused other forms): kept sparse, the physics works on the touched
                index = np.asarray(u["index"], dtype=np.int64)
                if index.size and (int(index.max()) >= size or np.any(np.diff(index) <= 0)):
                    raise _Refused(Status.OUT_OF_RANGE, f"update {k}: indices must be strictly increasing in "
                                                        f"0..{size - 1}, got {index[:8].tolist()}")
                if index.size != counts.size:
                    raise _Refused(Status.OUT_OF_RANGE, f"update {k}: {index.size} indices but {counts.size} counts")
                what = (index, counts)
            if counts.size and int(np.abs(counts).max()) > 127:
                raise _Refused(Status.OUT_OF_RANGE, f"update {k}: pulse count -128 outside -127..127")
            plan.append((edge, fb, form, what))
        return plan

    def _apply(self, plan: list[tuple[int, bool, Any, Any]]) -> int:
        """Fire a validated plan; the executed-command counter moves by one for the whole plan (none if empty)."""
        fired = 0
        counters = self.physics.counters
        before = (counters["pulse_commands"], counters["outer_commands"])
        for edge, fb, form, what in plan:
            if form == OUTER:
                fired += self.physics.apply_outer(edge, what[1], what[2], what[0], feedback=fb)
            elif form == DENSE:
                fired += self.physics.apply_pulses(edge, what, feedback=fb)
            else:
                fired += self.physics.apply_pulses_sparse(edge, what[0], what[1], feedback=fb)
        if plan:  # one command on the wire is one executed pulse command, whatever it carried
            counters["pulse_commands"], counters["outer_commands"] = before[0] + 1, before[1]
            self.counters["step_commands"] += 1
        return fired
