"""Exact number encodings of the FPGA serial protocol (``protocols/fpga_serial.md`` section 3).

An FPGA computes in fixed point, so states and inputs travel as 16-bit two's-complement fixed-point numbers;
the format is part of the contract, not a detail of the host. Formats use ARM notation Qm.n: one sign bit,
m integer bits, n fractional bits, m + n + 1 = 16, value = raw / 2**n, little-endian on the wire.

- ``Q3_12`` states, inputs and targets, volts: range [-8, 8 - 2**-12], step 2**-12 = 0.000244. Holds tanh and
  sigmoid states (|s| <= 1), nudged outputs (rho + beta (y - o) with beta up to a few units) and identity-rho
  hidden states of moderate size.
- ``Q1_14`` firing probabilities of an outer-product update, [-1, 1] exactly: range [-2, 2 - 2**-14].
- int8 pulse counts; float32 (IEEE 754, little-endian) for currents, gains, scales, rates and weights.

Encoding rounds to the nearest step, ties to even (numpy ``rint``). Values outside the range (or NaN) raise
:class:`ValueRangeError` unless ``saturate=True``, which clips: what the device's readout does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError


@dataclass(frozen=True)
class QFormat:
    """A signed 16-bit fixed-point format Qm.n (m integer bits, n fractional bits, plus the sign)."""

    name: str
    int_bits: int
    frac_bits: int

    def __post_init__(self) -> None:
        if self.int_bits + self.frac_bits != 15 or self.int_bits < 0 or self.frac_bits < 0:
            raise ValueRangeError(f"{self.name}: m + n must be 15 for a 16-bit format")

    @property
    def step(self) -> float:
        """Value of one least significant bit."""
        return 2.0 ** -self.frac_bits

    @property
    def min_value(self) -> float:
        return -(2.0**self.int_bits)

    @property
    def max_value(self) -> float:
        return 2.0**self.int_bits - self.step


Q3_12 = QFormat("Q3.12", 3, 12)  # states, inputs, targets (volts)
Q1_14 = QFormat("Q1.14", 1, 14)  # outer-update probabilities in [-1, 1]
STATE = Q3_12
PROBABILITY = Q1_14


def to_raw(values: np.ndarray, fmt: QFormat, *, saturate: bool = False) -> np.ndarray:
    """Float values -> int16 raw codes. Strict by default: out-of-range or non-finite values raise."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if saturate:
        arr = np.nan_to_num(arr, nan=0.0, posinf=fmt.max_value, neginf=fmt.min_value)
    else:
        bad = ~np.isfinite(arr) | (arr < fmt.min_value) | (arr > fmt.max_value)
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            raise ValueRangeError(
                f"value {arr[index]!r} at index {index} is outside {fmt.name} "
                f"[{fmt.min_value:g}, {fmt.max_value:.6f}]; {int(bad.sum())} value(s) out of range"
            )
    raw = np.rint(arr * 2.0**fmt.frac_bits)
    return np.clip(raw, -32768, 32767).astype(np.int16)


def from_raw(raw: np.ndarray, fmt: QFormat) -> np.ndarray:
    """int16 raw codes -> float32 values (exact: every Q value with 16 bits is a float32)."""
    return (np.asarray(raw, dtype=np.int16).astype(np.float32)) * np.float32(fmt.step)


def quantize(values: np.ndarray, fmt: QFormat, *, saturate: bool = False) -> np.ndarray:
    """The float32 values a round trip through ``fmt`` gives: what the device sees."""
    return from_raw(to_raw(values, fmt, saturate=saturate), fmt)


def encode_q(values: np.ndarray, fmt: QFormat, *, saturate: bool = False) -> bytes:
    """Float values -> little-endian int16 bytes in ``fmt``."""
    return to_raw(values, fmt, saturate=saturate).astype("<i2").tobytes()


def decode_q(data: bytes, fmt: QFormat) -> np.ndarray:
    """Little-endian int16 bytes -> float32 values; an odd byte count raises :class:`ProtocolError`."""
    if len(data) % 2:
        raise ProtocolError(f"{fmt.name} data must be an even number of bytes, got {len(data)}")
    return from_raw(np.frombuffer(data, dtype="<i2"), fmt)


def encode_int8(counts: np.ndarray) -> bytes:
    """Signed pulse counts -> int8 bytes; values outside -128..127 or non-integers raise."""
    arr = np.asarray(counts).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueRangeError(f"pulse counts must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < -128 or int(arr.max()) > 127):
        raise ValueRangeError(f"pulse counts must fit int8 (-128..127), got range {int(arr.min())}..{int(arr.max())}")
    return arr.astype(np.int8).tobytes()


def decode_int8(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.int8).copy()


def encode_f32(values: np.ndarray, *, finite: bool = True) -> bytes:
    """Float values -> little-endian float32 bytes; NaN or infinity raise unless ``finite=False``."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if finite and not np.all(np.isfinite(arr)):
        index = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueRangeError(f"float32 field holds {arr[index]!r} at index {index}; only finite values are allowed")
    with np.errstate(over="ignore"):
        out = arr.astype("<f4")
    if finite and not np.all(np.isfinite(out)):
        raise ValueRangeError(f"value overflows float32: max |x| = {float(np.abs(arr).max()):g}")
    return out.tobytes()


def decode_f32(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise ProtocolError(f"float32 data must be a multiple of 4 bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
