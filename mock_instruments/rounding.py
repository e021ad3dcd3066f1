"""Stochastic rounding of weight increments to pulse counts, at a cost that follows the pulses, not the matrix.

An on-device learning rule asks for ``q`` pulses per device (``q`` = increment / (scale * dw_min), a real number);
the board fires ``floor(q) + Bernoulli(q - floor(q))`` pulses, capped at ``cap``, so that the expected count is ``q``
(unbiased, independently per device). Small local-learning steps make ``|q| << 1`` on almost every device and a
pulse on only a few of them, so drawing one uniform number per device (16k for a 256x64 matrix) is wasted work.

When every ``|q| <= p`` with a small bound ``p`` the same distribution is drawn by *thinning*: candidate devices
are a Bernoulli(p) process over the flattened matrix (geometric gaps, ~``n p`` draws), and each candidate fires
with probability ``|q| / p``. Each device then fires independently with probability ``p * |q| / p = |q|``, exactly
the dense rule for ``|q| <= 1``. Above the bound the dense rule runs. All functions return the sparse form the
devices take: ascending flat (C-order) indices and non-zero signed int64 counts.
"""

from __future__ import annotations

import math

import numpy as np

SPARSE_BOUND = 0.1  # largest max|q| that is rounded by thinning; above it one uniform per device is cheaper
_TINY_P = 1e-9  # below this candidate probability geometric gaps could overflow int64: binomial + subset instead
_BATCH_SIGMAS = 5.0  # gaps drawn per batch: mean + this many standard deviations (a short batch is extended)
_EMPTY = np.zeros(0, dtype=np.int64)


def bernoulli_positions(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Ascending positions in ``0..n-1``, each present independently with probability ``p`` (0 < p < 1)."""
    if n <= 0 or p <= 0:
        return _EMPTY
    if p < _TINY_P:  # the count is Binomial(n, p), and given the count the positions are a uniform subset
        k = int(rng.binomial(n, p))
        return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64) if k else _EMPTY
    expect = n * p
    batch = max(int(expect + _BATCH_SIGMAS * math.sqrt(expect) + 10), 1)  # one batch almost always runs past n
    pos = np.cumsum(rng.geometric(p, batch)) - 1
    while pos[-1] < n:
        pos = np.concatenate((pos, pos[-1] + np.cumsum(rng.geometric(p, batch))))
    return pos[: int(np.searchsorted(pos, n))]


def dense_counts(rng: np.random.Generator, quanta: np.ndarray, cap: int) -> np.ndarray:
    """The dense rule as a matrix: ``clip(floor(q + U), -cap, cap)``, one uniform U per device, int64 (see
    :func:`dense_sparse`)."""
    return np.clip(_floor_q_plus_u(rng, quanta), -cap, cap).astype(np.int64)


def dense_sparse(rng: np.random.Generator, quanta: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """The dense rule in sparse form: ``(flat indices, counts)`` of ``clip(floor(q + U), -cap, cap) != 0``.

    ``floor(q + U)`` with U uniform in [0, 1) is ``floor(q) + 1`` with probability ``q - floor(q)`` and
    ``floor(q)`` otherwise: stochastic rounding in three passes over the matrix (draw, add, floor); the zero test,
    the cap and the integer conversion then touch the non-zero counts only.
    """
    counts = _floor_q_plus_u(rng, quanta).ravel()
    flat = np.flatnonzero(counts != 0)
    values = counts[flat]
    if values.size and np.maximum.reduce(np.abs(values)) > cap:
        np.clip(values, -cap, cap, out=values)
    return flat, values.astype(np.int64)


def _floor_q_plus_u(rng: np.random.Generator, quanta: np.ndarray) -> np.ndarray:
    u = rng.random(quanta.shape)
    u += quanta
    return np.floor(u, out=u)


def round_matrix(rng: np.random.Generator, quanta: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Stochastically rounded pulse counts of a dense ``quanta`` matrix: ``(flat indices, counts)``."""
    flat_q = quanta.ravel()
    bound = float(np.maximum.reduce(np.abs(flat_q)))
    if bound == 0.0:
        return _EMPTY, _EMPTY
    if bound <= SPARSE_BOUND:
        pos = bernoulli_positions(rng, flat_q.size, bound)
        q = flat_q[pos]
        hit = rng.uniform(0.0, bound, pos.size) < np.abs(q)  # accept with probability |q| / bound
        return pos[hit], np.sign(q[hit]).astype(np.int64)
    return dense_sparse(rng, quanta, cap)


def round_outer(
    rng: np.random.Generator, scale: float, a: np.ndarray, b: np.ndarray, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rounded counts of the rank-1 quanta ``scale * outer(a, b)`` (shape ``(a.size, b.size)``), without forming
    the matrix when the thinning bound holds. Rows with ``a_j == 0`` and columns with ``b_i == 0`` (e.g. dark input
    pixels) have ``q == 0``, fire nothing and cost nothing."""
    if scale == 0:
        return _EMPTY, _EMPTY
    rows, cols = np.flatnonzero(a), np.flatnonzero(b)
    if not rows.size or not cols.size:
        return _EMPTY, _EMPTY
    whole_rows, whole_cols = rows.size == a.size, cols.size == b.size
    av = scale * (a if whole_rows else a[rows])  # q on the non-zero block = outer(av, bv)
    bv = b if whole_cols else b[cols]
    n = bv.size
    bound = float(np.maximum.reduce(np.abs(av)) * np.maximum.reduce(np.abs(bv)))  # >= every |av_r bv_k| (rounded too)
    if bound <= SPARSE_BOUND:
        pos = bernoulli_positions(rng, av.size * n, bound)
        r, k = np.divmod(pos, n)
        q = av[r] * bv[k]
        hit = rng.uniform(0.0, bound, pos.size) < np.abs(q)  # accept with probability |q| / bound
        if whole_rows and whole_cols:  # block = matrix: the candidate positions are the flat indices
            return pos[hit], np.sign(q[hit]).astype(np.int64)
        r, k, counts = r[hit], k[hit], np.sign(q[hit]).astype(np.int64)
    else:
        nz, counts = dense_sparse(rng, np.multiply.outer(av, bv), cap)
        r, k = np.divmod(nz, n)
    return (r if whole_rows else rows[r]) * b.size + (k if whole_cols else cols[k]), counts
