"""Stochastic rounding of weight increments to pulse counts, at a cost that follows the pulses, not the matrix.

An on-device learning rule asks for ``q`` pulses per device (``q`` = increment / (scale * dw_min), a real number);
the board fires ``floor(q) + Bernoulli(q - floor(q))`` pulses, capped at ``cap``, so that the expected count is ``q``
(unbiased, independently per device). Local-learning steps make ``|q| << 1`` on most devices: a C-EP step of the
digits preset asks for ~700 pulses from 16k devices, most of them in a few rows (the hidden units that moved).

Rounding runs row by row (mock_instruments/kernels.py): a row whose largest ``|q|`` is ``p <= THIN_BOUND`` draws its
candidates as a Bernoulli(p) process (geometric gaps, ~``n p`` draws) and keeps each with probability ``|q| / p``,
so each device fires with probability ``|q|``, exactly the dense rule for ``|q| <= 1``; other rows draw one uniform
per device. All functions return the sparse form the devices take: ascending flat (C-order) indices and non-zero
signed int64 counts. ``state`` is the board's xoshiro256** state (kernels.new_state), advanced in place.
"""

from __future__ import annotations

import numpy as np

from eqprop_hil.mock_instruments.kernels import THIN_BOUND, new_state, round_rank1, round_rows

__all__ = ["THIN_BOUND", "dense_counts", "new_state", "round_matrix", "round_outer"]

_EMPTY = np.zeros(0, dtype=np.int64)


def dense_counts(rng: np.random.Generator, quanta: np.ndarray, cap: int) -> np.ndarray:
    """The dense rule as a matrix: ``clip(floor(q + U), -cap, cap)``, one uniform U per device, int64: the
    definition the row kernels are tested against."""
    u = rng.random(quanta.shape)
    u += quanta
    return np.clip(np.floor(u, out=u), -cap, cap).astype(np.int64)


def round_matrix(state: np.ndarray, quanta: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Stochastically rounded pulse counts of a 2-d ``quanta`` matrix: ``(flat indices, counts)``."""
    quanta = np.ascontiguousarray(quanta, dtype=np.float64)
    flat, counts = np.empty(quanta.size, dtype=np.int64), np.empty(quanta.size, dtype=np.int64)
    m = round_rows(state, quanta, cap, THIN_BOUND, flat, counts)
    return flat[:m], counts[:m]


def round_outer(
    state: np.ndarray, scale: float, a: np.ndarray, b: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rounded counts of the rank-1 quanta ``scale * outer(a, b)`` (shape ``(a.size, b.size)``), without forming
    the matrix. Rows with ``a_j == 0`` and columns with ``b_i == 0`` (e.g. dark input pixels) have ``q == 0``,
    fire nothing and cost nothing."""
    if scale == 0:
        return _EMPTY, _EMPTY
    rows, cols = np.flatnonzero(a), np.flatnonzero(b)
    if not rows.size or not cols.size:
        return _EMPTY, _EMPTY
    av = np.multiply(a[rows], scale, dtype=np.float64)
    bv = np.ascontiguousarray(b[cols], dtype=np.float64)
    size = rows.size * cols.size
    flat, counts = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    m = round_rank1(state, av, rows, bv, cols, b.size, cap, THIN_BOUND, flat, counts)
    return flat[:m], counts[:m]
