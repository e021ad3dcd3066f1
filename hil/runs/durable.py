"""Durable files for run records: atomic replacement, appends that survive a killed process, torn-line repair.

A leaf module (no torch, no matplotlib) shared by :mod:`eqprop_hil.runs.rundir` and :mod:`eqprop_hil.insitu.journal`, which is why the run
records' error type lives here too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from eqprop_hil.protocols.errors import EqpropError

log = logging.getLogger("eqprop_hil.runs.rundir")


class RunError(EqpropError):
    """A run directory or one of its records is missing, malformed or cannot be written; the message names the file."""


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read the process umask once (os.umask can only be read by setting it)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either the old or the new content, never a torn mix (temp + fsync + replace)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; run records are for the whole lab to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:  # read-only directory, full disk, quota: one line that names the file
        if tmp is not None:
            with contextlib.suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
        raise RunError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a regular file may accept a large write in parts)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def drop_torn_tail(fd: int, path: Path) -> bytes:
    """Cut a final line that has no newline (a write torn by a crash) so the next append starts a clean line.

    ``fd`` must be open for reading and appending. A final line that is complete JSON and only lacks its
    newline is kept and terminated. Returns the bytes cut (empty when nothing was cut). A cut line was never
    a complete record: its writer had not returned, so nothing that depended on it can have happened.
    """
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return b""
    start = size
    chunk = 4096
    while start > 0:  # scan backwards for the last newline
        lo = max(0, start - chunk)
        block = os.pread(fd, start - lo, lo)
        nl = block.rfind(b"\n")
        if nl >= 0:
            start = lo + nl + 1
            break
        start = lo
    torn = os.pread(fd, size - start, start)
    if _is_json(torn):  # a whole record that only lost its newline: keep it, terminate it
        write_all(fd, b"\n")
        return b""
    os.ftruncate(fd, start)
    log.warning("%s: removed a torn last line (%d bytes, crash mid-write): %r", path, len(torn), torn[:80])
    return torn


def to_json_safe(obj: Any) -> Any:
    """Plain JSON values: numpy/torch scalars and arrays to lists, tuples to lists, NaN and infinities to None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    raise RunError(f"cannot record {type(obj).__name__} {obj!r} as JSON")
