"""Compiled per-device loops of the emulated board: stochastic rounding row by row and the pulse response.

Why compiled: an on-device learning step touches every device of a matrix (16k for 256x64) but fires a pulse on a
few hundred. Vectorised numpy pays one uniform number and several full passes per device, and a Python-level loop
per pulse index; a compiled loop pays only for what each row needs (``benchmarks/physics.py``). numba compiles
these once per machine (``cache=True``: the first process writes the machine code next to this file, or to the
user's numba cache where that is read-only) and runs them without the interpreter lock.

The rounding kernels draw from xoshiro256** (Blackman and Vigna), a four-word state the caller owns as a uint64
array (:func:`new_state`, from a numpy ``SeedSequence``): handing a ``numpy.random.Generator`` to a compiled
function costs ~14 us per call (ctypes unboxing), more than the rounding itself. The kernels are plain Python that
numba compiles: ``kernel.py_func`` runs the same code interpreted and returns the same numbers, which the tests
use as the reference.
"""

from __future__ import annotations

import math

import numba
import numpy as np

THIN_BOUND = 0.25  # rows whose largest |q| is at most this are rounded by thinning; denser rows one uniform per device
_U53 = 1.0 / 9007199254740992.0  # 2**-53


def new_state(seed: np.random.SeedSequence | int) -> np.ndarray:
    """A xoshiro256** state (uint64[4], never all zero) from a seed sequence or an integer seed."""
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    state = seq.generate_state(4, np.uint64)
    if not state.any():  # the one state xoshiro cannot leave; generate_state makes it astronomically unlikely
        state[0] = np.uint64(1)
    return state


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _rotl(x, k):  # pragma: no cover - compiled
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def uniform(s):  # pragma: no cover - compiled
    """Next double in [0, 1) from the xoshiro256** state ``s`` (advanced in place): the top 53 bits."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    out = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s[0], s[1], s[2], s[3] = s0, s1, s2, _rotl(s3, 45)
    return float(out >> np.uint64(11)) * _U53


@numba.njit(cache=True, nogil=True, error_model="numpy")
def uniforms(s, n):  # pragma: no cover - compiled
    """``n`` doubles from :func:`uniform` (for tests of the generator)."""
    out = np.empty(n)
    for i in range(n):
        out[i] = uniform(s)
    return out


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _round_row(s, a, v, p, cap, thin, base, index, out_flat, out_counts, m):  # pragma: no cover - compiled
    """Append the stochastically rounded counts of the row ``q = a * v`` to ``out_*`` from position ``m``; returns
    the new m. ``p``: an upper bound of ``|q|`` over the row (its maximum: the rank-1 caller knows it without a scan).

    Each device gets ``floor(q) + Bernoulli(q - floor(q))`` pulses, capped at ``cap``, independently. A row with
    ``p <= thin`` draws candidate positions as a Bernoulli(p) process (geometric gaps by inversion, in floats, so a
    tiny p cannot overflow) and keeps each with probability ``|q| / p``: ~``2 n p`` draws instead of n, and no pass
    over the row. Output flat index of column k: ``base + index[k]``. ``s``: the xoshiro256** state.
    """
    n = v.size
    if p == 0.0:
        return m
    if p <= thin:
        rate = -math.log1p(-p)  # P(gap > j) = (1 - p)^j = exp(-rate j)
        pos = -1.0
        while True:
            pos += max(1.0, np.ceil(-math.log1p(-uniform(s)) / rate))  # exponential / rate, rounded up (a float)
            if pos >= n:
                return m
            k = int(pos)
            q = a * v[k]
            if uniform(s) * p < abs(q):
                out_flat[m] = base + index[k]
                out_counts[m] = 1 if q > 0 else -1
                m += 1
    for k in range(n):
        c = np.floor(a * v[k] + uniform(s))  # a float: math.floor's int64 would overflow on a huge q
        if c != 0.0:
            if c > cap:
                c = cap
            elif c < -cap:
                c = -cap
            out_flat[m] = base + index[k]
            out_counts[m] = int(c)
            m += 1
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_rows(s, quanta, cap, thin, out_flat, out_counts):  # pragma: no cover - compiled
    """Round a C-contiguous 2-d ``quanta`` matrix row by row; flat C-order indices. Returns the count written."""
    rows, n = quanta.shape
    index = np.arange(n)
    m = 0
    for r in range(rows):
        row = quanta[r]
        p = 0.0
        for k in range(n):
            p = max(p, abs(row[k]))
        m = _round_row(s, 1.0, row, p, cap, thin, r * n, index, out_flat, out_counts, m)
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_rank1(s, av, rows, bv, cols, width, cap, thin, out_flat, out_counts):  # pragma: no cover - compiled
    """Round ``outer(av, bv)`` without forming it, row by row; row ``r`` of the block is matrix row ``rows[r]``,
    column ``k`` is matrix column ``cols[k]`` of a matrix ``width`` wide. Returns the count written."""
    bmax = 0.0
    for k in range(bv.size):
        bmax = max(bmax, abs(bv[k]))
    m = 0
    for r in range(av.size):
        m = _round_row(s, av[r], bv, abs(av[r]) * bmax, cap, thin, rows[r] * width, cols, out_flat, out_counts, m)
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pulse_trains(w, w_min, w_max, dw_up, dw_down, flat, counts, noise, model, gamma_up, gamma_down):  # pragma: no cover
    """Fire ``counts[i]`` signed pulses into device ``flat[i]`` (flat views of the device arrays), in place on ``w``.

    Pulse k of the whole command multiplies its noise-free step by ``noise[k]`` (devices in the order given, each
    device's pulses one after another), then ``w = min(max(w + step, w_min), w_max)``. Noise-free steps (REFERENCE.md
    section 7), model 0 ``constant``: ``+dw_up`` / ``-dw_down``; 1 ``soft_bounds``: ``dw_up (1 - w / w_max)`` /
    ``-dw_down (1 - w / w_min)``; 2 ``power``: with ``omega = clip((w_max - w) / (w_max - w_min), 0, 1)``,
    ``dw_up omega^gamma_up`` / ``-dw_down (1 - omega)^gamma_down``.
    """
    k = 0
    for i in range(flat.size):
        d = flat[i]
        n = counts[i]
        up = n > 0
        x = w[d]
        lo = w_min[d]
        hi = w_max[d]
        dw = dw_up[d] if up else -dw_down[d]
        bound = hi if up else lo
        for _ in range(abs(n)):
            if model == 1:
                step = dw * (1.0 - x / bound)
            elif model == 0:
                step = dw
            else:
                omega = min(max((hi - x) / (hi - lo), 0.0), 1.0)
                step = dw * (omega ** gamma_up if up else (1.0 - omega) ** gamma_down)
            x = min(max(x + step * noise[k], lo), hi)
            k += 1
        w[d] = x
