"""Data converters of an emulated neuron array: the input DAC, the state ADC and the read noise in between.

An analog board drives its input layer through a DAC of a few bits and reads its neuron voltages back through an
ADC; both have a fixed voltage range. The controller only ever sees states after the ADC, so the emulator puts
the same quantisation (and Gaussian read noise) between its exact internal states and every read. ``bits=None``
means an ideal converter (exact floats, no clipping), which is what the equivalence tests against the software
engine use.
"""

from __future__ import annotations

import numpy as np

from eqprop_hil.protocols.errors import ValueRangeError

MAX_BITS = 24  # no real converter resolves more; keeps the level count exact in float64


def check_bits(bits: int | None, what: str) -> int | None:
    """Validate a converter resolution: None (ideal) or an integer number of bits in 1..24."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= MAX_BITS:
        raise ValueRangeError(f"{what} must be None (ideal) or an integer 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_range(volts: tuple[float, float], what: str) -> tuple[float, float]:
    """Validate a converter's (low, high) range in volts: finite and low < high."""
    try:
        lo, hi = (float(v) for v in volts)
    except (TypeError, ValueError) as e:
        raise ValueRangeError(f"{what} must be two numbers (low, high) in volts, got {volts!r}") from e
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueRangeError(f"{what} must be finite with low < high, got {volts!r}")
    return lo, hi


def quantise(values: np.ndarray, bits: int | None, lo: float, hi: float) -> np.ndarray:
    """Uniform converter transfer: 2**bits codes of width (hi - lo) / 2**bits starting at ``lo``.

    Code k stands for ``lo + k * step``; values are clipped to the range first. With a symmetric range 0 V is a
    code exactly (so a zero input stays zero), and the top code is ``hi - step``, as on a two's-complement
    converter. ``bits=None`` returns the values unchanged (ideal converter, no clipping either).
    """
    arr = np.asarray(values, dtype=np.float64)
    if bits is None:
        return arr.copy()
    codes = 2**bits
    step = (hi - lo) / codes
    code = np.clip(np.rint((arr - lo) / step), 0, codes - 1)
    return lo + code * step


class Dac:
    """The input-drive DAC: refuses voltages outside its range (hardware cannot produce them), quantises the rest."""

    def __init__(self, bits: int | None, range_volts: tuple[float, float]) -> None:
        self.bits = check_bits(bits, "dac_bits")
        self.lo, self.hi = check_range(range_volts, "dac_range_volts")

    def check(self, volts: np.ndarray) -> None:
        """Raise :class:`ValueRangeError` (quoting the worst value) if any voltage is outside the DAC's range."""
        arr = np.asarray(volts, dtype=np.float64)
        bad = (arr < self.lo) | (arr > self.hi)
        if np.any(bad):
            worst = float(arr[bad][np.argmax(np.abs(arr[bad]))])
            raise ValueRangeError(f"input {worst:g} V outside the DAC range [{self.lo:g}, {self.hi:g}] V")

    def convert(self, volts: np.ndarray) -> np.ndarray:
        """Volts actually driven onto the input layer (checked, then quantised)."""
        self.check(volts)
        return quantise(volts, self.bits, self.lo, self.hi)

    def describe(self) -> dict:
        return {"bits": self.bits, "range_volts": [self.lo, self.hi]}


class Adc:
    """The state-readout ADC with Gaussian read noise (volts, standard deviation) added before conversion."""

    def __init__(
        self, bits: int | None, range_volts: tuple[float, float], read_noise: float, rng: np.random.Generator
    ) -> None:
        self.bits = check_bits(bits, "adc_bits")
        self.lo, self.hi = check_range(range_volts, "adc_range_volts")
        if not (np.isfinite(read_noise) and read_noise >= 0):
            raise ValueRangeError(f"read_noise must be a finite standard deviation >= 0 volts, got {read_noise!r}")
        self.read_noise = float(read_noise)
        self.rng = rng

    def read(self, volts: np.ndarray) -> np.ndarray:
        """One noisy, quantised reading of exact internal voltages, as float32 (what goes on the wire)."""
        arr = np.asarray(volts, dtype=np.float64)
        if self.read_noise > 0:
            arr = arr + self.read_noise * self.rng.standard_normal(arr.shape)
        return quantise(arr, self.bits, self.lo, self.hi).astype(np.float32)

    def describe(self) -> dict:
        return {"bits": self.bits, "range_volts": [self.lo, self.hi], "read_noise_volts": self.read_noise}
