"""Safety limits checked before any value that drives a voltage, a current or a pulse leaves the host."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eqprop_hil.drivers.errors import LimitError


@dataclass(frozen=True)
class Limits:
    """Configured safety limits of one instrument.

    Every driver checks these before sending; a violation raises :class:`LimitError` naming the value and the
    limit, and nothing is sent.
    """

    max_input_volts: float = 1.0  # |x_i| on the input drive, volts
    max_nudge_amperes: float = 1e-4  # |I_o| of an explicit nudge current, amperes (board compliance may be lower)
    max_pulses_per_device: int = 127  # |count| per device per pulse command (int8 on the wire)
    max_bit_length: int = 255  # stochastic pulse-train length of an outer update
    pulse_budget: int | None = None  # total device pulses a session may fire; None = unlimited

    def __post_init__(self) -> None:
        if not (self.max_input_volts > 0 and self.max_nudge_amperes > 0):
            raise LimitError(f"limits must be positive: {self}")
        if not 1 <= self.max_pulses_per_device <= 127:
            raise LimitError(f"max_pulses_per_device must be in 1..127 (int8), got {self.max_pulses_per_device}")
        if not 1 <= self.max_bit_length <= 255:
            raise LimitError(f"max_bit_length must be in 1..255, got {self.max_bit_length}")

    def check_input(self, volts: np.ndarray) -> np.ndarray:
        return _check_abs(volts, self.max_input_volts, "input drive", "V")

    def check_nudge(self, amperes: np.ndarray) -> np.ndarray:
        return _check_abs(amperes, self.max_nudge_amperes, "nudge current", "A")

    def check_counts(self, counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts)
        if counts.dtype.kind not in "iu":
            raise LimitError(f"pulse counts must be integers, got dtype {counts.dtype}")
        worst = int(np.abs(counts).max(initial=0))
        if worst > self.max_pulses_per_device:
            raise LimitError(
                f"pulse count {worst} exceeds the limit of {self.max_pulses_per_device} per device per command"
            )
        return counts.astype(np.int8)

    def check_bit_length(self, bit_length: int) -> int:
        if not 1 <= int(bit_length) <= self.max_bit_length:
            raise LimitError(f"bit length {bit_length} outside 1..{self.max_bit_length}")
        return int(bit_length)


def _check_abs(values: np.ndarray, limit: float, what: str, unit: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise LimitError(f"{what} contains NaN or infinity; nothing was sent")
    worst = float(np.abs(arr).max(initial=0.0))
    if worst > limit:
        raise LimitError(f"{what} of {worst:g} {unit} exceeds the limit of {limit:g} {unit}; nothing was sent")
    return arr
