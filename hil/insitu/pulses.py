"""From settled states to pulse commands: the C-EP / C-VF / EP increments and their encoding as device pulses.

The learner (hil/insitu/learner.py) reads states back from the instrument; this module turns two consecutive
states into each matrix's effective-weight increment and that increment into what the instrument executes:

- ``matrix``: a signed int8 pulse count per device, ``increment / step size`` stochastically rounded (unbiased)
  with the calibration's per-device step sizes (potentiation and depression differ), capped at
  ``max_pulses_per_device``;
- ``outer``: a rank-1 term ``c a b^T`` as two stochastic pulse trains (rows, columns, bit length), correct in
  expectation, O(rows + cols) numbers on the wire.

The rounding noise is counter-based, a function of (seed, sample, step, matrix) only: a redone or resumed sample
draws exactly the pulses of the first attempt, with no generator state to save. A nudged step's commands can
travel in one compound step (:class:`~eqprop_hil.drivers.interface.StepRunner`); :func:`step_entry` and
:func:`expand_entry` are its journal form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from eqprop_hil.insitu.journal import decode_array, encode_array, is_encoded_array
from eqprop_hil.protocols.errors import ValueRangeError

# A term is ("outer1", c, a, b) meaning c a b^T, or ("outer2", c, (a1, b1), (a2, b2)) meaning c (a1 b1^T + a2 b2^T).
Term = tuple
Key = tuple[int, bool]  # (edge, feedback)
_U64 = (1 << 64) - 1


def continual_increments(rule: str, edges: Sequence[tuple[int, int]], feedback: Sequence[bool], eta: Sequence[float],
                         s: list[np.ndarray], s_new: list[np.ndarray], beta: float) -> dict[Key, Term]:
    """One nudged step's C-EP (``rule="cep"``) or C-VF (``"cvf"``) increment per matrix, as rank-1 terms.

    C-EP: ``(eta/beta)(s'_j s'_i^T - s_j s_i^T) = (eta/beta)((s'_j - s_j) s'_i^T + s_j (s'_i - s_i)^T)``: two rank-1
    terms of *small* vectors, so outer mode fires few pulses instead of two large, mostly cancelling trains.
    C-VF: ``(eta/beta)(s'_j - s_j) s_i^T`` per forward matrix, ``(eta/beta)(s'_i - s_i) s_j^T`` per feedback one.
    """
    out: dict[Key, Term] = {}
    for e, (i, j) in enumerate(edges):
        c = eta[e] / beta
        if rule == "cvf":
            out[(e, False)] = ("outer1", c, s_new[j] - s[j], s[i])
            if feedback[e]:
                out[(e, True)] = ("outer1", c, s_new[i] - s[i], s[j])
        else:
            out[(e, False)] = ("outer2", c, (s_new[j] - s[j], s_new[i]), (s[j], s_new[i] - s[i]))
    return out


def ep_increments(edges: Sequence[tuple[int, int]], eta: Sequence[float], s0: list[np.ndarray],
                  sb: list[np.ndarray], beta: float) -> dict[Key, Term]:
    """Plain EP's one update at the end of the nudged phase, ``(eta/beta)(sb_j sb_i^T - s0_j s0_i^T)``."""
    return {(e, False): ("outer2", eta[e] / beta, (sb[j] - s0[j], sb[i]), (s0[j], sb[i] - s0[i]))
            for e, (i, j) in enumerate(edges)}


def dense(term: Term) -> np.ndarray:
    """The increment a term stands for, ``(n_dst, n_src)``, effective weight units."""
    kind, c, a, b = term
    if kind == "outer1":
        return c * np.outer(a, b)
    return c * (np.outer(*a) + np.outer(*b))


class PulseEncoder:
    """Increments -> pulse commands for one instrument, one update mode.

    ``steps[key] = (up, down)``: per-device effective-weight change of one potentiating / depressing pulse
    (the calibration's, times the weight mapping). ``cap``: most pulses per device per command (the limit).
    ``counters["clipped"]`` counts devices (matrix) or trains (outer) that wanted more than the cap allows.
    """

    def __init__(self, mode: str, steps: dict[Key, tuple[np.ndarray, np.ndarray]], *, cap: int, bit_length: int,
                 seed: int, counters: dict[str, int] | None = None) -> None:
        if mode not in ("matrix", "outer"):
            raise ValueRangeError(f"pulse encoding for update mode {mode!r}: use matrix or outer")
        self.mode, self.steps, self.cap, self.bit_length, self.seed = mode, steps, int(cap), int(bit_length), seed
        # pulses per unit of increment, float32: the rounding runs on every device at every step (the hot path)
        # stored as (mean, half difference) of the two: quanta = inc * mean + |inc| * half_diff picks the
        # potentiating or depressing step by sign in two products, without a select over the matrix
        per = {k: (1.0 / np.asarray(up, np.float64), 1.0 / np.asarray(down, np.float64)) for k, (up, down) in steps.items()}
        self._per_unit = {k: (((u + d) / 2).astype(np.float32), ((u - d) / 2).astype(np.float32),
                              bool(np.any(u != d))) for k, (u, d) in per.items()}
        # outer mode: one nominal step per matrix, the median of the devices' mean of up and down steps
        self._outer_dw = {k: float(np.median(np.add(up, down)) / 2) for k, (up, down) in steps.items()}
        self.counters = counters if counters is not None else {"clipped": 0}  # the learner's, to survive a rebuild
        self.counters.setdefault("clipped", 0)

    def rng(self, sample: int, step: int, key: Key) -> np.random.Generator:
        """Counter-based: the rounding noise is a function of (seed, sample, step, matrix) only. One integer
        packs the four (64 bits each) as the SeedSequence entropy of a PCG64DXSM generator: distinct tuples give
        independent streams, and of numpy's generators it draws uniforms fastest (the hot path: ~10k per step)."""
        entropy = ((int(self.seed) & _U64) << 192) | ((int(sample) & _U64) << 128) | ((int(step) & _U64) << 64) \
            | (2 * int(key[0]) + int(key[1]))
        return np.random.Generator(np.random.PCG64DXSM(entropy))

    def commands(self, increments: dict[Key, Term], *, sample: int, step: int) -> list[dict]:
        """The pulse commands (``{"edge", "feedback", "mode", "counts"}`` or ``{..., "rows", "cols",
        "bit_length"}``) for one step's increments; matrices that get no pulse are left out."""
        out: list[dict] = []
        for key, term in increments.items():
            if self.mode == "outer":
                out.extend(self.outer(key, term))
                continue
            counts = self.term_counts(key, term, self.rng(sample, step, key))
            if counts is not None:
                out.append({"edge": key[0], "feedback": key[1], "mode": "matrix", "counts": counts})
        return out

    def counts(self, key: Key, inc: np.ndarray, rng: np.random.Generator, *, rows: Any = slice(None),
               cols: Any = slice(None)) -> np.ndarray:
        """Stochastic rounding of ``inc / step`` (unbiased), clipped to +-cap: int8 of ``inc``'s shape, which is
        the matrix's ``(n_dst, n_src)`` or, with ``rows`` / ``cols`` (index arrays), that part of it."""
        per_mean, per_half_diff, asymmetric = self._per_unit[key]
        inc = np.asarray(inc, dtype=np.float32)
        quanta = inc * _part(per_mean, rows, cols)
        if asymmetric:
            quanta += np.abs(inc) * _part(per_half_diff, rows, cols)
        # floor(q + U), U uniform in [0, 1): floor(q) + 1 with probability q - floor(q), else floor(q)
        quanta += rng.random(inc.shape, dtype=np.float32)
        counts = np.floor(quanta, out=quanta)
        lo, hi = float(np.minimum.reduce(counts, axis=None)), float(np.maximum.reduce(counts, axis=None))
        if max(-lo, hi) > self.cap:
            self.counters["clipped"] += int(np.count_nonzero(np.abs(counts) > self.cap))
            np.clip(counts, -self.cap, self.cap, out=counts)
        return counts.astype(np.int8)

    def term_counts(self, key: Key, term: Term, rng: np.random.Generator) -> np.ndarray | None:
        """:meth:`counts` of a rank-1 term's increment, rounded on its support only (None: no pulse at all).

        A term is zero outside the rows where its row vectors are non-zero and the columns where its column
        vectors are: an input pixel at 0 V, or an input layer that the clamp keeps still (its C-EP term
        ``s_j (s'_i - s_i)^T`` vanishes), gives exactly zero increments there, which round to no pulse with
        certainty. So only the support draws rounding noise: on the 8x8 digits about half the input matrix.
        """
        kind, c, a, b = term
        pairs = [(c, a, b)] if kind == "outer1" else [(c, *a), (c, *b)]
        nz = [(coef, u, v, np.count_nonzero(u), np.count_nonzero(v)) for coef, u, v in pairs if coef != 0]
        nz = [(coef, u, v, nu, nv) for coef, u, v, nu, nv in nz if nu and nv]
        if not nz:
            return None
        n_rows, n_cols = len(nz[0][1]), len(nz[0][2])
        all_rows = any(nu == n_rows for _, _, _, nu, _ in nz)
        all_cols = any(nv == n_cols for _, _, _, _, nv in nz)
        rows = np.arange(n_rows) if all_rows else np.flatnonzero(np.logical_or.reduce([u != 0 for _, u, _, _, _ in nz]))
        cols = np.arange(n_cols) if all_cols else np.flatnonzero(np.logical_or.reduce([v != 0 for _, _, v, _, _ in nz]))
        all_rows, all_cols = rows.size == n_rows, cols.size == n_cols
        pick_r = slice(None) if all_rows else rows
        pick_c = slice(None) if all_cols else cols
        inc = None
        for coef, u, v, _, _ in nz:
            term_inc = np.multiply.outer(np.float32(coef) * np.asarray(u, np.float32)[pick_r],
                                         np.asarray(v, np.float32)[pick_c])
            inc = term_inc if inc is None else np.add(inc, term_inc, out=inc)
        sub = self.counts(key, inc, rng, rows=pick_r, cols=pick_c)
        if not sub.any():
            return None
        if all_rows and all_cols:
            return sub
        out = np.zeros((n_rows, n_cols), np.int8)
        out[np.ix_(rows, cols) if not (all_rows or all_cols) else (pick_r, pick_c)] = sub
        return out

    def outer(self, key: Key, term: Term) -> list[dict]:
        """A rank-1 term ``c a b^T`` as pulse trains: expected pulses per device ``BL |r_i| |q_k|`` should be
        ``c a_i b_k / dw``, so ``r q^T = c a b^T / (dw BL)``, split evenly between rows and columns."""
        kind, c, a, b = term
        pairs = [(c, a, b)] if kind == "outer1" else [(c, *a), (c, *b)]
        dw, bl = self._outer_dw[key], self.bit_length
        out = []
        for coef, u, v in pairs:
            nu, nv = float(np.abs(u).max()), float(np.abs(v).max())
            if nu == 0 or nv == 0 or coef == 0:
                continue
            k = abs(coef) * nu * nv / (dw * bl)  # wanted max pulse probability product
            if k < 1e-12:
                continue
            if k > 1.0:  # more than one pulse per slot wanted: the trains saturate and deliver less
                self.counters["clipped"] += 1
            r = min(1.0, float(np.sqrt(k)))
            out.append({"edge": key[0], "feedback": key[1], "mode": "outer",
                        "rows": (np.sign(coef) * (u / nu) * r).astype(np.float32),
                        "cols": ((v / nv) * r).astype(np.float32), "bit_length": bl})
        return out


def _part(matrix: np.ndarray, rows: Any, cols: Any) -> np.ndarray:
    """``matrix[rows][:, cols]`` for index arrays or full slices, gathering only what is kept (a scalar step
    size, one for every device, stays as it is)."""
    if np.ndim(matrix) < 2 or (isinstance(rows, slice) and isinstance(cols, slice)):
        return matrix
    if not isinstance(rows, slice):
        matrix = matrix.take(rows, axis=0)
    return matrix if isinstance(cols, slice) else matrix.take(cols, axis=1)


# ---------------------------------------------------------------------------------------- compound steps
def as_update(command: dict) -> dict:
    """A pulse command as a :class:`~eqprop_hil.drivers.interface.PulseUpdate` of a compound step."""
    if command["mode"] == "matrix":
        return {"edge": command["edge"], "feedback": command["feedback"], "counts": command["counts"]}
    return {"edge": command["edge"], "feedback": command["feedback"], "rows": command["rows"],
            "cols": command["cols"], "bit_length": command["bit_length"]}


def step_entry(commands: list[dict], steps: int) -> dict:
    """The journal entry of one compound step (one pulse command on the instrument's counter): its updates with
    their arrays encoded (the journal encodes top-level arrays only), and how many steps it settles."""
    encoded = [{k: (encode_array(v) if isinstance(v, np.ndarray) else v) for k, v in c.items()} for c in commands]
    return {"mode": "step", "steps": int(steps), "updates": encoded}


def expand_entry(entry: dict) -> list[dict]:
    """The pulse commands inside a journal entry: itself, or a compound step's updates with arrays decoded.
    What undoing a compound step negates (its settling is not undone: the sample is redone from its start)."""
    if entry.get("mode") != "step":
        return [entry]
    return [{k: (decode_array(v) if is_encoded_array(v) else v) for k, v in u.items()} for u in entry["updates"]]


def pulses_of(ack: Any) -> int:
    """Device pulses an acknowledgement reports (0 when it was lost and the counter settled the command)."""
    return int(ack["pulses"]) if ack else 0
