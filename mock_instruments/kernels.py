"""Compiled loops of the emulated board: neuron dynamics, stochastic rounding row by row, the pulse response.

Why compiled: a C-EP step touches every device of a matrix (16k for 256x64) but fires a pulse on a few hundred,
and a step of the dynamics is a dozen small vector operations. Vectorised numpy pays one uniform number and
several full passes per device and ~1 us of interpreter per operation; a compiled loop pays only for what each row
needs (``benchmarks/physics.py``). numba compiles these once per machine (``cache=True``: the first process writes
the machine code next to this file, or to the user's numba cache where that is read-only) and runs them without
the interpreter lock.

Random numbers: xoshiro256** (Blackman and Vigna), a four-word state the caller owns as a uint64 array
(:func:`new_state`, from a numpy ``SeedSequence``), normals by Box-Muller. Handing a ``numpy.random.Generator`` to a
compiled function costs ~14 us per call (ctypes unboxing), more than the work itself. The kernels are plain Python
that numba compiles: ``kernel.py_func`` runs the same code interpreted and returns the same numbers, which the
tests use as the reference.
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
def _next(s0, s1, s2, s3):  # pragma: no cover - compiled
    """One xoshiro256** step on a state held in four values (registers, in a loop): ``(u, s0, s1, s2, s3)`` with
    ``u`` the next double in [0, 1), the top 53 bits."""
    out = _rotl(s1 * np.uint64(5), 7) * np.uint64(9)
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    return float(out >> np.uint64(11)) * _U53, s0, s1, s2, _rotl(s3, 45)


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def uniform(s):  # pragma: no cover - compiled
    """Next double in [0, 1) from the xoshiro256** state array ``s`` (advanced in place)."""
    u, s[0], s[1], s[2], s[3] = _next(s[0], s[1], s[2], s[3])
    return u


@numba.njit(cache=True, nogil=True, error_model="numpy")
def uniforms(s, n):  # pragma: no cover - compiled
    """``n`` doubles from :func:`uniform` (for tests of the generator)."""
    out = np.empty(n)
    for i in range(n):
        out[i] = uniform(s)
    return out


@numba.njit(cache=True, nogil=True, error_model="numpy")
def fill_normals(s, out):  # pragma: no cover - compiled
    """Fill ``out`` with standard normal numbers (Marsaglia's polar method: both numbers of each accepted pair
    are used, ~2.5 uniforms and one log per pair)."""
    i, n = 0, out.size
    while i < n:
        u = 2.0 * uniform(s) - 1.0
        v = 2.0 * uniform(s) - 1.0
        q = u * u + v * v
        if q >= 1.0 or q == 0.0:
            continue
        f = math.sqrt(-2.0 * math.log(q) / q)
        out[i] = u * f
        if i + 1 < n:
            out[i + 1] = v * f
        i += 2


@numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
def _neg_log1m(p):  # pragma: no cover - compiled
    """``-log(1 - p)`` for 0 < p < 1: below 2**-7 its series to the p**8 term (the rest is under 1e-17 of it, i.e.
    below double rounding), a polynomial instead of a log1p call for the many rows of tiny p."""
    if p >= 0.0078125:
        return -math.log1p(-p)
    return p * (1.0 + p * (0.5 + p * (1.0 / 3.0 + p * (0.25 + p * (0.2 + p * (1.0 / 6.0 + p * (1.0 / 7.0 + p * 0.125)))))))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _round_block(s, a, c, v, w, p, cap, thin, row_base, index, out_flat, out_counts):  # pragma: no cover - compiled
    """Stochastically rounded counts of the rows ``q_r = a[r] v[r'] - c[r] w[r']`` into ``out_*`` (``r' = r``, or
    0 where v / w have a single row: a rank-1 block); returns how many were written. ``p[r] >= max |q_r|`` (a
    bound the caller knows without a scan, or the maximum). Output flat index of column k of row r:
    ``row_base[r] + index[k]``. ``s``: the xoshiro256** state, advanced.

    Each device gets ``floor(q) + Bernoulli(q - floor(q))`` pulses, capped at ``cap``, independently. A row with
    ``p <= thin`` draws candidate positions as a Bernoulli(p) process (geometric gaps by inversion, in floats, so a
    tiny p cannot overflow) and keeps each with probability ``|q| / p``: ~``2 n p`` draws instead of n, and no pass
    over the row. One loop with no calls that take arrays: each such call costs two atomic reference-count
    operations, which per row and per device were most of the time.
    """
    n = v.shape[1]
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]  # the state in registers
    m = 0
    for r in range(a.size):
        pr = p[r]
        if pr == 0.0:
            continue
        ar, cr, base = a[r], c[r], row_base[r]
        vr = r if v.shape[0] > 1 else 0
        wr = r if w.shape[0] > 1 else 0
        if pr <= thin:
            rate = _neg_log1m(pr)  # P(gap > j) = (1 - p)^j = exp(-rate j)
            pos = -1.0
            while True:
                u, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
                pos += max(1.0, np.ceil(-math.log(1.0 - u) / rate))  # exponential / rate, rounded up (a float)
                if pos >= n:
                    break
                k = int(pos)
                q = ar * v[vr, k] - cr * w[wr, k]
                u, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
                if u * pr < abs(q):
                    out_flat[m] = base + index[k]
                    out_counts[m] = 1 if q > 0 else -1
                    m += 1
        else:
            for k in range(n):
                u, s0, s1, s2, s3 = _next(s0, s1, s2, s3)
                f = np.floor(ar * v[vr, k] - cr * w[wr, k] + u)  # a float: math.floor's int64 would overflow
                if f != 0.0:
                    f = min(max(f, -cap), cap)
                    out_flat[m] = base + index[k]
                    out_counts[m] = int(f)
                    m += 1
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    return m


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_rows(s, quanta, cap, thin, out_flat, out_counts):  # pragma: no cover - compiled
    """Round a C-contiguous 2-d ``quanta`` matrix row by row; flat C-order indices. Returns the count written."""
    rows, n = quanta.shape
    p = np.zeros(rows)
    for r in range(rows):
        for k in range(n):
            p[r] = max(p[r], abs(quanta[r, k]))
    return _round_block(s, np.ones(rows), np.zeros(rows), quanta, quanta, p, cap, thin, np.arange(rows) * n,
                        np.arange(n), out_flat, out_counts)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def round_rank1(s, av, rows, bv, cols, width, cap, thin, out_flat, out_counts):  # pragma: no cover - compiled
    """Round ``outer(av, bv)`` without forming it, row by row; row ``r`` of the block is matrix row ``rows[r]``,
    column ``k`` is matrix column ``cols[k]`` of a matrix ``width`` wide. Returns the count written."""
    bmax = 0.0
    for k in range(bv.size):
        bmax = max(bmax, abs(bv[k]))
    v = bv.reshape((1, bv.size))
    return _round_block(s, av, np.zeros(av.size), v, v, np.abs(av) * bmax, cap, thin, rows * width, cols, out_flat,
                        out_counts)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _fire_all(flat, counts, n, w, w_min, w_max, dw_up, dw_down, stuck, noise, eff, scale, model, gamma_up, gamma_down,
              c2c, c2c_state, sigma, write_state):  # pragma: no cover - compiled
    """Fire ``counts[:n]`` into the devices ``flat[:n]`` (ascending) and give each device written new write noise
    (``sigma > 0``); stuck devices (``stuck[d]``; ``stuck`` empty: none) ignore their pulses and draw nothing.
    The c2c factors are drawn for the whole command at once, device after device; ``eff`` (when not empty) is
    refreshed to ``scale * (w + noise)`` at every device written. Returns the pulses sent (to stuck devices too)."""
    sent, live, moved = 0, 0, 0
    for i in range(n):
        m = abs(counts[i])
        sent += m
        if not (stuck.size and stuck[flat[i]]):
            live += m
            moved += 1
    xi = np.empty(live)
    fill_normals(c2c_state, xi)
    zeta = np.empty(moved if sigma > 0.0 else 0)
    fill_normals(write_state, zeta)
    k, j = 0, 0
    for i in range(n):
        d = flat[i]
        if stuck.size and stuck[d]:
            continue
        # the train of counts[i] pulses, one after another; pulse p's c2c factor 1 + c2c xi[k + p]
        up = counts[i] > 0
        x, lo, hi = w[d], w_min[d], w_max[d]
        dw = dw_up[d] if up else -dw_down[d]
        slope = dw / (hi if up else lo)  # soft bounds: dw (1 - w / bound) = dw - w slope, no division per pulse
        for _ in range(abs(counts[i])):
            if model == 1:
                step = dw - x * slope
            elif model == 0:
                step = dw
            else:
                omega = min(max((hi - x) / (hi - lo), 0.0), 1.0)
                step = dw * (omega ** gamma_up if up else (1.0 - omega) ** gamma_down)
            x = min(max(x + step * (1.0 + c2c * xi[k]), lo), hi)
            k += 1
        w[d] = x
        if sigma > 0.0:
            noise[d] = sigma * zeta[j]
            j += 1
        if eff.size:
            eff[d] = scale * (w[d] + noise[d]) if sigma > 0.0 else scale * w[d]
    return sent


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pulse_trains(w, w_min, w_max, dw_up, dw_down, stuck, noise, flat, counts, model, gamma_up, gamma_down, c2c,
                 c2c_state, sigma, write_state):  # pragma: no cover - compiled
    """Fire ``counts[i]`` signed pulses into device ``flat[i]`` (flat views of a DeviceArray's arrays), in place.

    Each pulse multiplies its noise-free step by ``1 + c2c xi`` (xi standard normal from ``c2c_state``), then
    ``w = min(max(w + step, w_min), w_max)``. Noise-free steps (REFERENCE.md section 7), model 0 ``constant``:
    ``+dw_up`` / ``-dw_down``; 1 ``soft_bounds``: ``dw_up (1 - w / w_max)`` / ``-dw_down (1 - w / w_min)``; 2
    ``power``: with ``omega = clip((w_max - w) / (w_max - w_min), 0, 1)``, ``dw_up omega^gamma_up`` /
    ``-dw_down (1 - omega)^gamma_down``. Stuck devices (``stuck[d]``; ``stuck`` empty: none) ignore their pulses
    and draw nothing; every other device written gets new write noise ``sigma zeta`` (``sigma > 0``, zeta
    standard normal from ``write_state``). Returns the pulses sent.
    """
    return _fire_all(flat, counts, flat.size, w, w_min, w_max, dw_up, dw_down, stuck, noise, noise[:0], 1.0, model,
                     gamma_up, gamma_down, c2c, c2c_state, sigma, write_state)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _learn_matrix(learn_state, coef, kind, a, b, c, d, w, w_min, w_max, up, down, stuck, noise, eff, scale, c2c_state,
                  write_state, model, gamma_up, gamma_down, c2c, sigma, cap, thin, out_flat,
                  out_counts):  # pragma: no cover - compiled
    """Round one matrix's increment, fire it and refresh its effective weights; returns the pulses fired (see
    :func:`local_step`). ``out_flat`` / ``out_counts``: scratch of at least ``a.size * b.size`` int64 each."""
    width = b.size
    cols = np.empty(width, dtype=np.int64)
    bv = np.empty(width)
    dv = np.empty(width)
    nc, bmax, dmax = 0, 0.0, 0.0
    for k in range(width):
        if kind == 0 and b[k] == 0.0:  # rank 1: a dark input pixel's column has q == 0
            continue
        cols[nc] = k
        bv[nc] = b[k]
        dv[nc] = d[k] if kind == 1 else 0.0
        bmax, dmax = max(bmax, abs(b[k])), max(dmax, abs(dv[nc]))
        nc += 1
    av = np.empty(a.size)
    cv = np.zeros(a.size)
    p = np.empty(a.size)
    for r in range(a.size):
        av[r] = coef * a[r]
        if kind == 1:
            cv[r] = coef * c[r]
        p[r] = abs(av[r]) * bmax + abs(cv[r]) * dmax
    n = _round_block(learn_state, av, cv, bv[:nc].reshape((1, nc)), dv[:nc].reshape((1, nc)), p, cap, thin,
                     np.arange(a.size) * width, cols, out_flat, out_counts)
    return _fire_all(out_flat, out_counts, n, w, w_min, w_max, up, down, stuck, noise, eff, scale, model, gamma_up,
                     gamma_down, c2c, c2c_state, sigma, write_state)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def local_step(learn_state, coefs, kinds, va, vb, vc, vd, ws, w_mins, w_maxs, ups, downs, stucks, noises, effs, scales,
               c2c_states, write_states, model, gamma_up, gamma_down, c2c, sigma, cap, thin):  # pragma: no cover
    """One step of on-device learning on every learned matrix m: round the increment, fire it, refresh the
    effective weights the dynamics read. Returns the pulses fired (those sent to stuck devices too).

    Matrix m is ``(va[m].size, vb[m].size)``; its increment in pulses is ``coefs[m] * outer(va, vb)`` (``kinds[m]``
    0: rank 1; columns where vb is 0, e.g. dark input pixels, are skipped) or ``coefs[m] * (outer(va, vb) -
    outer(vc, vd))`` (kind 1: tied C-EP between two hidden layers). ``ws`` ... ``write_states``: the matrices'
    DeviceArray arrays, flat (see :func:`pulse_trains`); ``effs``: the cached effective matrices, flat, refreshed
    as ``scale * (w + noise)`` at every device written.
    """
    size = 0
    for m in range(coefs.size):
        size = max(size, va[m].size * vb[m].size)
    out_flat, out_counts = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
    fired = 0
    for m in range(coefs.size):
        fired += _learn_matrix(learn_state, coefs[m], kinds[m], va[m], vb[m], vc[m], vd[m], ws[m], w_mins[m],
                               w_maxs[m], ups[m], downs[m], stucks[m], noises[m], effs[m], scales[m], c2c_states[m],
                               write_states[m], model, gamma_up, gamma_down, c2c, sigma, cap, thin, out_flat,
                               out_counts)
    return fired


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
def _matvec_add(w, x, y, g):  # pragma: no cover - compiled
    """``y += g * (w @ x)``; the reassociation lets each row's sum run in SIMD lanes (order of adds not kept)."""
    for r in range(w.shape[0]):
        acc = 0.0
        for c in range(w.shape[1]):
            acc += w[r, c] * x[c]
        y[r] += g * acc


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract", "nsz"})
def _rmatvec_add(w, x, y, g):  # pragma: no cover - compiled
    """``y += g * (w.T @ x)``, row by row of ``w`` (contiguous)."""
    for r in range(w.shape[0]):
        xr = g * x[r]
        for c in range(w.shape[1]):
            y[c] += w[r, c] * xr


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _activate(x, act):  # pragma: no cover - compiled
    """rho in place: 0 sigmoid4 ``1 / (1 + exp(-4 (x - 0.5)))`` (= ``0.5 (1 + tanh(2 (x - 0.5)))``; exp is the
    cheaper call; no overflow trouble: exp(+large) = inf gives 0), 1 hard_sigmoid, 2 tanh, 3 identity."""
    if act == 0:
        for k in range(x.size):
            x[k] = 1.0 / (1.0 + math.exp(-4.0 * (x[k] - 0.5)))
    elif act == 1:
        for k in range(x.size):
            x[k] = min(max(x[k], 0.0), 1.0)
    elif act == 2:
        for k in range(x.size):
            x[k] = math.tanh(x[k])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _nudge(y, o, vals, kind, beta):  # pragma: no cover - compiled
    """``y += vals`` (kind 1, fixed volts) or ``y += beta (vals - o)`` (kind 2, target mode on the old output o)."""
    if kind == 1:
        for k in range(y.size):
            y[k] += vals[k]
    elif kind == 2:
        for k in range(y.size):
            y[k] += beta * (vals[k] - o[k])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _base(s, off, bias, src, dst, mats):  # pragma: no cover - compiled
    """What stays fixed while the weights do: the biases plus the drives out of the clamped input, layers 1.."""
    first = off[1]
    base = bias.copy()
    for e in range(src.size):
        if src[e] == 0:
            j = dst[e]
            _matvec_add(mats[e], s[:first], base[off[j] - first:off[j + 1] - first], 1.0)
    return base


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _step(cur, nxt, base, off, src, dst, mats, fbs, gain, untied, act, dt, nudge_kind, nudge_vals, beta,
          inside):  # pragma: no cover - compiled
    """One synchronous step from ``cur`` into ``nxt`` (see :func:`relax`)."""
    first, last = off[1], off[off.size - 2]
    nxt[:first] = cur[:first]
    nxt[first:] = base
    for e in range(src.size):
        i, j = src[e], dst[e]
        if i == 0:
            continue
        _matvec_add(mats[e], cur[off[i]:off[i + 1]], nxt[off[j]:off[j + 1]], 1.0)
        if untied:
            _matvec_add(fbs[e], cur[off[j]:off[j + 1]], nxt[off[i]:off[i + 1]], gain[e])
        else:
            _rmatvec_add(mats[e], cur[off[j]:off[j + 1]], nxt[off[i]:off[i + 1]], gain[e])
    if inside:
        _nudge(nxt[last:], cur[last:], nudge_vals, nudge_kind, beta)
    _activate(nxt[first:], act)
    if not inside:
        _nudge(nxt[last:], cur[last:], nudge_vals, nudge_kind, beta)
    if dt != 1.0:
        for k in range(first, nxt.size):
            nxt[k] = cur[k] + dt * (nxt[k] - cur[k])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relax(n, s_in, s_out, off, bias, src, dst, mats, fbs, gain, untied, act, dt, nudge_kind, nudge_vals, beta, inside,
          tmp):  # pragma: no cover - compiled
    """``n`` synchronous steps of docs/dynamics.md from the states ``s_in`` (every layer side by side, layer k at
    ``off[k]:off[k + 1]``, the clamped input first) into ``s_out`` (``s_in`` is left as it was; ``tmp``: a scratch
    vector of the same size, used when n > 1).

    ``bias``: layers 1.. side by side. Edge e runs ``src[e] -> dst[e]`` through the effective matrix ``mats[e]``
    ``(n_dst, n_src)``; out of a hidden layer it feeds back with gain ``gain[e]`` through ``fbs[e]`` ``(n_src,
    n_dst)`` (untied) or ``mats[e]`` transposed (tied; ``fbs`` is then unused). The drive out of the clamped input
    is computed once per call. Activation ``act``: 0 sigmoid4, 1 hard_sigmoid, 2 tanh, 3 identity. Nudge on the
    last layer, ``nudge_kind`` 0 none, 1 a fixed voltage ``nudge_vals``, 2 target mode ``beta (nudge_vals - o_t)``;
    added inside or outside the activation. ``dt < 1``: leaky integration ``s + dt (rho(u) - s)``.
    """
    base = _base(s_in, off, bias, src, dst, mats)
    cur = s_in
    for step in range(n):
        nxt = s_out if (n - step) % 2 == 1 else tmp  # ping-pong so that the last step lands in s_out
        _step(cur, nxt, base, off, src, dst, mats, fbs, gain, untied, act, dt, nudge_kind, nudge_vals, beta, inside)
        cur = nxt


@numba.njit(cache=True, nogil=True, error_model="numpy")
def relax_learn(n, s, off, bias, src, dst, mats, fbs, gain, untied, act, dt, nudge_kind, nudge_vals, beta, inside,
                learn_state, coefs, kinds, row_layer, col_layer, ws, w_mins, w_maxs, ups, downs, stucks, noises, effs,
                scales, c2c_states, write_states, model, gamma_up, gamma_down, c2c, sigma, cap, thin):  # pragma: no cover
    """``n`` nudged steps with on-device learning after each, in place on ``s``: what ``n`` calls of
    :func:`relax` (one step) and :func:`local_step` do, draw for draw and float for float, in one call.

    Learned matrix m (``effs[m]`` is the flat view of the effective matrix the dynamics read through ``mats`` or
    ``fbs``) has rows on layer ``row_layer[m]`` (R) and columns on ``col_layer[m]`` (C); with the states s before and
    s' after a step, kind 0 learns ``outer(s'_R - s_R, s_C)``, kind 1 ``outer(s'_R, s'_C) - outer(s_R, s_C)``.
    Returns the pulses fired.
    """
    cur, nxt = s, np.empty_like(s)
    size = 0
    for m in range(coefs.size):
        size = max(size, (off[row_layer[m] + 1] - off[row_layer[m]]) * (off[col_layer[m] + 1] - off[col_layer[m]]))
    out_flat, out_counts = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)  # once per call
    fired = 0
    for _ in range(n):
        base = _base(cur, off, bias, src, dst, mats)
        _step(cur, nxt, base, off, src, dst, mats, fbs, gain, untied, act, dt, nudge_kind, nudge_vals, beta, inside)
        for m in range(coefs.size):
            r0, r1, c0, c1 = off[row_layer[m]], off[row_layer[m] + 1], off[col_layer[m]], off[col_layer[m] + 1]
            if kinds[m] == 0:
                a, b, c, d = nxt[r0:r1] - cur[r0:r1], cur[c0:c1], cur[:0], cur[:0]
            else:
                a, b, c, d = nxt[r0:r1], nxt[c0:c1], cur[r0:r1], cur[c0:c1]
            fired += _learn_matrix(learn_state, coefs[m], kinds[m], a, b, c, d, ws[m], w_mins[m], w_maxs[m], ups[m],
                                   downs[m], stucks[m], noises[m], effs[m], scales[m], c2c_states[m],
                                   write_states[m], model, gamma_up, gamma_down, c2c, sigma, cap, thin, out_flat,
                                   out_counts)
        cur, nxt = nxt, cur
    if n % 2 == 1:
        s[:] = cur
    return fired
