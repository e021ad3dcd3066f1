"""Pulse updates inside STEP and APPLY_SPARSE (``protocols/fpga_serial.md`` section 5.2): codecs of the ``upd`` field.

A nudged step of matrix-mode C-EP changes few devices (most counts round to 0), so an update travels in the
smallest of four forms; the encoder picks it, the decoder accepts any::

    upd    = count u8 | count x update
    update = edge u8 | feedback u8 | form u8 | body
      DENSE    (0): counts i8a                                   every device, row-major (u16 count + int8s)
      SPARSE16 (1): n u16 | n x index u16 | n x count int8      index = row * n_cols + col, strictly increasing
      SPARSE32 (2): n u16 | n x index u32 | n x count int8
      OUTER    (3): bit_length u8 | rows qp | cols qp           stochastic pulse trains (as APPLY_OUTER)

The decoder checks the layout only (a truncated or padded update: ProtocolError, status BAD_LENGTH); indices,
counts and shapes are checked by the device against its topology, so the rules of the spec decide the status.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from eqprop_hil.protocols import fixed_point as fx
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError

DENSE, SPARSE16, SPARSE32, OUTER = 0, 1, 2, 3
FORM_NAMES = {DENSE: "DENSE", SPARSE16: "SPARSE16", SPARSE32: "SPARSE32", OUTER: "OUTER"}
MAX_UPDATES = 255  # the count is a u8
_HEAD = struct.Struct("<BBB")  # edge, feedback, form
_U16 = struct.Struct("<H")


def pulse_update(edge: int, feedback: bool, counts: np.ndarray) -> dict[str, Any]:
    """A matrix update from a full int8 count matrix, in its smallest form (dense, or sparse by flat index).

    ``counts`` must already be checked against the limits (int8, |count| <= 127); only non-zero counts travel
    in the sparse forms."""
    flat = np.asarray(counts).reshape(-1)
    index = np.flatnonzero(flat)
    dense_bytes = 2 + flat.size
    sparse_form = SPARSE16 if flat.size <= 0x10000 else SPARSE32
    sparse_bytes = 2 + index.size * (3 if sparse_form == SPARSE16 else 5)
    if dense_bytes <= sparse_bytes:
        return {"edge": int(edge), "feedback": int(bool(feedback)), "form": DENSE, "counts": flat.astype(np.int8)}
    return {"edge": int(edge), "feedback": int(bool(feedback)), "form": sparse_form, "index": index.astype(np.int64),
            "counts": flat[index].astype(np.int8)}


def outer_update(edge: int, feedback: bool, rows: np.ndarray, cols: np.ndarray, bit_length: int) -> dict[str, Any]:
    """A rank-1 stochastic update (probabilities in [-1, 1], Q1.14 on the wire)."""
    return {"edge": int(edge), "feedback": int(bool(feedback)), "form": OUTER, "bit_length": int(bit_length),
            "rows": np.asarray(rows, dtype=np.float64).reshape(-1), "cols": np.asarray(cols, dtype=np.float64).reshape(-1)}


def encode_updates(updates: list[dict[str, Any]]) -> bytes:
    """The ``upd`` field: a u8 count and each update in the form its ``form`` key names."""
    if len(updates) > MAX_UPDATES:
        raise ValueRangeError(f"{len(updates)} updates exceed {MAX_UPDATES} per command")
    out = bytearray([len(updates)])
    for k, u in enumerate(updates):
        form = int(u["form"])
        if form not in FORM_NAMES:
            raise ValueRangeError(f"update {k}: form {form} is not 0 (DENSE), 1 (SPARSE16), 2 (SPARSE32) or 3 (OUTER)")
        out += _HEAD.pack(int(u["edge"]), int(u["feedback"]), form)
        if form == OUTER:
            rows, cols = np.asarray(u["rows"]).reshape(-1), np.asarray(u["cols"]).reshape(-1)
            if not 1 <= int(u["bit_length"]) <= 255:
                raise ValueRangeError(f"update {k}: bit_length {u['bit_length']!r} outside 1..255")
            out += bytes([int(u["bit_length"])])
            out += _U16.pack(rows.size) + fx.encode_q(rows, fx.PROBABILITY)
            out += _U16.pack(cols.size) + fx.encode_q(cols, fx.PROBABILITY)
            continue
        counts = np.asarray(u["counts"]).reshape(-1)
        if counts.size > 0xFFFF:
            raise ValueRangeError(f"update {k}: {counts.size} counts exceed the u16 count; use the sparse form")
        if form == DENSE:
            out += _U16.pack(counts.size) + fx.encode_int8(counts)
            continue
        index = np.asarray(u["index"]).reshape(-1)
        top = 0xFFFF if form == SPARSE16 else 0xFFFF_FFFF
        if index.size != counts.size or (index.size and (int(index.min()) < 0 or int(index.max()) > top)):
            raise ValueRangeError(f"update {k}: {index.size} indices in 0..{top} needed for {counts.size} counts")
        out += _U16.pack(index.size) + index.astype("<u2" if form == SPARSE16 else "<u4").tobytes()
        out += fx.encode_int8(counts)
    return bytes(out)


def decode_updates(data: bytes, pos: int, what: str) -> tuple[list[dict[str, Any]], int]:
    """Decode the ``upd`` field starting at ``pos``; returns (updates, position after the field)."""

    def take(n: int, name: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ProtocolError(f"{what} ends inside {name} (needs {pos + n} bytes, has {len(data)})")
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    count = take(1, "the update count")[0]
    updates: list[dict[str, Any]] = []
    for k in range(count):
        edge, feedback, form = _HEAD.unpack(take(_HEAD.size, f"update {k}'s head"))
        u: dict[str, Any] = {"edge": edge, "feedback": feedback, "form": form}
        if form == OUTER:
            u["bit_length"] = take(1, f"update {k}'s bit_length")[0]
            for name in ("rows", "cols"):
                n = _U16.unpack(take(2, f"update {k}'s {name} count"))[0]
                u[name] = fx.decode_q(take(2 * n, f"update {k}'s {name}"), fx.PROBABILITY)
        elif form == DENSE:
            n = _U16.unpack(take(2, f"update {k}'s count"))[0]
            u["counts"] = fx.decode_int8(take(n, f"update {k}'s counts"))
        elif form in (SPARSE16, SPARSE32):
            n = _U16.unpack(take(2, f"update {k}'s count"))[0]
            width = 2 if form == SPARSE16 else 4
            raw = take(width * n, f"update {k}'s indices")
            u["index"] = np.frombuffer(raw, dtype="<u2" if width == 2 else "<u4").astype(np.int64)
            u["counts"] = fx.decode_int8(take(n, f"update {k}'s counts"))
        else:
            # The layout of an unknown form cannot be walked: the rest of the payload is unreadable.
            raise ValueRangeError(f"{what}: update {k} has form {form}; known forms are 0..3")
        updates.append(u)
    return updates, pos


def update_bytes(update: dict[str, Any]) -> int:
    """Wire size of one update (head included), for a host that must keep a STEP within one payload."""
    form = int(update["form"])
    if form == OUTER:
        return _HEAD.size + 1 + 4 + 2 * (np.size(update["rows"]) + np.size(update["cols"]))
    n = np.size(update["counts"])
    return _HEAD.size + 2 + (n if form == DENSE else n * (3 if form == SPARSE16 else 5))
