"""The compound opcodes of the FPGA driver: STEP (a nudged step in one round trip) and APPLY_SPARSE.

A mixin of :class:`eqprop_hil.drivers.fpga_array.FpgaArray` (``protocols/fpga_serial.md`` section 5.2): every
update is checked against the topology, the limits and the session's pulse budget before anything is sent (all
or none), then travels in its smallest form (dense, or (index, count) pairs, or outer-product trains).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eqprop_hil.drivers.errors import DriverError
from eqprop_hil.drivers.interface import PulseResult, PulseUpdate
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.fpga_messages import Opcode
from eqprop_hil.protocols.fpga_updates import outer_update, pulse_update, update_bytes


class FpgaStepMixin:
    """:class:`eqprop_hil.drivers.interface.StepRunner` for the FPGA array (needs FpgaArray's helpers)."""

    _call: Any
    _edge: Any
    _shape: Any
    _vector: Any
    _check_budget: Any
    _topology: Any
    limits: Any
    stats: dict[str, int]

    def step(self, updates: list[PulseUpdate], steps: int = 1) -> tuple[PulseResult, list[np.ndarray]]:
        """One STEP round trip: apply ``updates`` (all checked against the limits first: all or none), run
        ``steps`` steps in the current phase, return (pulses fired, every layer's state in volts, input first).

        The board counts the whole step as ONE pulse command (none when ``updates`` is empty); a retransmission
        is answered from its response cache, never executed twice."""
        if isinstance(steps, bool) or not 0 <= int(steps) <= 0xFFFFFFFF:
            raise ValueRangeError(f"STEP steps {steps!r} outside 0..2**32-1")
        wire = self._updates(updates)
        reply = self._call(Opcode.STEP, steps=int(steps), updates=wire)
        pulses = int(reply["pulses"])
        self.stats["pulses_sent"] += pulses
        sizes = self._topology["sizes"]
        flat = reply["states"]
        if flat.size != sum(sizes):
            raise DriverError(f"STEP returned {flat.size} state values, expected {sum(sizes)} for layers {sizes}")
        return PulseResult(pulses=pulses), list(np.split(flat, np.cumsum(sizes)[:-1]))

    def apply_sparse(self, updates: list[PulseUpdate]) -> PulseResult:
        """APPLY_SPARSE: several matrices' pulse updates in sparse form, ONE pulse command (no settle)."""
        wire = self._updates(updates)
        pulses = int(self._call(Opcode.APPLY_SPARSE, updates=wire)["pulses"]) if wire else 0
        self.stats["pulses_sent"] += pulses
        return PulseResult(pulses=pulses)

    def _updates(self, updates: list[PulseUpdate]) -> list[dict[str, Any]]:
        """Check every update against the topology and the limits (nothing is sent unless all pass) and turn
        it into its wire form (the smaller of dense and sparse for counts)."""
        if len(updates) > 255:
            raise ValueRangeError(f"{len(updates)} updates exceed 255 per STEP")
        wire: list[dict[str, Any]] = []
        seen: set[tuple[int, bool]] = set()
        worst = 0
        for k, u in enumerate(updates):
            edge, fb = self._edge(u.get("edge", -1)), bool(u.get("feedback", False))
            if (edge, fb) in seen:
                raise ValueRangeError(f"update {k}: edge {edge} (feedback={fb}) given twice in one step")
            seen.add((edge, fb))
            shape = self._shape(edge, fb)
            if "counts" in u:
                if any(key in u for key in ("rows", "cols", "bit_length")):
                    raise ValueRangeError(f"update {k}: give counts, or rows/cols/bit_length, not both")
                raw = np.asarray(u["counts"])
                if raw.shape != shape:
                    raise ValueRangeError(f"update {k}: pulse matrix of shape {raw.shape} for edge {edge}; expected {shape}")
                checked = self.limits.check_counts(raw)
                worst += int(np.abs(checked.astype(np.int64)).sum())
                wire.append(pulse_update(edge, fb, checked))
            elif {"rows", "cols", "bit_length"} <= u.keys():
                rows_v = self._vector(u["rows"], shape[0], f"update {k} outer rows")
                cols_v = self._vector(u["cols"], shape[1], f"update {k} outer cols")
                for name, v in (("rows", rows_v), ("cols", cols_v)):
                    if np.abs(v).max(initial=0.0) > 1.0:
                        raise ValueRangeError(f"update {k}: outer {name} must be in [-1, 1], got max |x| = "
                                              f"{float(np.abs(v).max()):g}")  # fmt: skip
                bit_length = self.limits.check_bit_length(u["bit_length"])
                worst += int(np.count_nonzero(rows_v)) * int(np.count_nonzero(cols_v)) * bit_length
                wire.append(outer_update(edge, fb, rows_v, cols_v, bit_length))
            else:
                raise ValueRangeError(f"update {k} needs counts, or rows, cols and bit_length; got {sorted(u)}")
        self._check_budget(worst)
        size = m.FENCE.size + 4 + 1 + sum(update_bytes(w) for w in wire)
        if size > m.MAX_PAYLOAD:
            raise ValueRangeError(f"the step's updates need {size} payload bytes, more than {m.MAX_PAYLOAD}; send "
                                  f"the large matrices with apply_pulses (row chunks) instead")  # fmt: skip
        return wire
