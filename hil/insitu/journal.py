"""The pulse write-ahead journal (``journal.jsonl``): no update applied twice, none forgotten.

Protocol, per pulse command:

1. ``jid = journal.begin({...})`` writes a *pending* record and fsyncs it before returning;
2. only then does the caller send the pulse command to the instrument;
3. ``journal.done(jid, ack)`` on the acknowledgement.

After a crash, :meth:`PulseJournal.pending` lists the commands that were maybe applied: the trainer reads the
weights back, decides with the pulse quantum whether each was applied, and records the verdict with
:meth:`PulseJournal.resolve`. Records are append-only JSON lines::

    {"id": 7, "state": "pending", "t": 1718000000.1, "edge": 0, "feedback": false, "mode": "matrix",
     "step": 12, "counts": {"dtype": "int8", "shape": [6, 4], "enc": "zlib+base64", "data": "eJx..."},
     "hash": "blake2b-128 hex of the arrays"}
    {"id": 7, "state": "done", "t": ..., "ack": {"pulses": 9}}
    {"id": 7, "state": "applied" | "not_applied", "t": ..., "evidence": {...}}

numpy arrays in an entry are encoded compactly (zlib, then base64) and hashed; :meth:`pending` returns them
decoded and checked against the hash. A final line torn by a crash is reported and skipped (a writer cuts it off
when it opens the file); its ``begin`` never returned, so its command was never sent.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from eqprop_hil.runs.durable import RunError, drop_torn_tail, to_json_safe, write_all

log = logging.getLogger(__name__)

_RESERVED = {"id", "state", "t", "hash", "ack", "evidence"}
_OUTCOMES = ("applied", "not_applied")


class JournalError(RunError):
    """The journal is corrupt, in use by another process, or was asked something inconsistent."""


def encode_array(a: np.ndarray) -> dict:
    """Compact JSON form of an array: pulse counts are mostly zeros, so zlib shrinks them several-fold."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "enc": "zlib+base64",
            "data": base64.b64encode(zlib.compress(a.tobytes(), 1)).decode("ascii")}


def is_encoded_array(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("enc") == "zlib+base64" and {"dtype", "shape", "data"} <= obj.keys()


def decode_array(obj: dict) -> np.ndarray:
    """Inverse of :func:`encode_array` (pulse counts come back as int8 of the original shape)."""
    try:
        dtype = np.dtype(obj["dtype"])
        raw = zlib.decompress(base64.b64decode(obj["data"], validate=True))
        return np.frombuffer(raw, dtype=dtype).reshape(obj["shape"]).copy()
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise JournalError(f"cannot decode a journaled array {str(obj)[:120]!r}: {e}") from e


def _arrays_hash(arrays: dict[str, np.ndarray]) -> str:
    """Content hash over name, dtype, shape and bytes of every array, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _ack_pulses(ack: Any) -> int:
    """The ``pulses`` an acknowledgement reports (:class:`eqprop_hil.drivers.interface.PulseResult`), 0 when absent."""
    value = ack.get("pulses") if isinstance(ack, dict) else None
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


class PulseJournal:
    """Append-only write-ahead log of pulse commands. One writer per file (an exclusive ``flock``); any
    number of ``readonly`` readers (``hil report``).

    Every record is written with one ``os.write`` (no user-space buffer), so it survives a killed process.
    ``fsync=True`` (the default, for a bench) also forces begin and resolve records to the disk, so they
    survive a power cut; it costs about 5 ms per call on a virtual disk. ``fsync=False`` suits emulator runs.
    """

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, fsync: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending: dict[int, dict] = {}  # id -> raw begin record, for the entries without a verdict
        self._counts = {"begun": 0, "done": 0, "applied": 0, "not_applied": 0}
        self.torn_tail = b""  # bytes of a torn final line found on open (reported, never parsed)
        self._next_id = 1
        self._pulses = 0  # device pulses the acknowledgements report, summed
        self.compacted_below = 0  # records of ids below this were compacted away (archived) at a checkpoint
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:  # read-only run directory, full disk: one line naming the file
                raise JournalError(f"cannot open {self.path} for writing: {e.strerror or e}") from e
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(self._fd)
                self._fd = None
                raise JournalError(f"{self.path} is in use by another process (is another trainer running?)") from e
            self.torn_tail = drop_torn_tail(self._fd, self.path)  # a writer starts from a clean last line
        self._scan()

    # reading
    def _scan(self) -> None:
        if not self.path.exists():
            return
        lines = self.path.read_bytes().split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if i == 0 and isinstance(rec, dict) and rec.get("state") == "compacted":
                    self._load_header(rec)
                    continue
                jid, state = int(rec["id"]), rec["state"]
            except (ValueError, KeyError, TypeError) as e:
                if i == len(lines) - 1:  # no newline after it: torn by a crash mid-write
                    self.torn_tail = line
                    log.warning("%s: ignoring a torn last line (%d bytes): %r", self.path, len(line), line[:80])
                    continue
                raise JournalError(f"{self.path} line {i + 1} is not a journal record: {line[:120]!r}") from e
            self._apply(jid, state, rec, where=f"{self.path} line {i + 1}")
        self._next_id = max(self._next_id, getattr(self, "_header_next_id", 0))

    def _load_header(self, rec: dict) -> None:
        """The first line of a compacted journal: the totals of the records compacted away."""
        counts = rec["counts"]
        for k in self._counts:
            self._counts[k] += int(counts[k])
        self._pulses += int(rec["pulses_acknowledged"])
        self._next_id = max(self._next_id, int(rec["below"]))  # kept records (ids >= below) follow in order
        self._header_next_id = int(rec["next_id"])
        self.compacted_below = int(rec["below"])

    def _apply(self, jid: int, state: str, rec: dict, where: str) -> None:
        if state == "pending":
            if jid < self._next_id:
                raise JournalError(f"{where}: id {jid} is not above the previous ids (next expected {self._next_id})")
            self._next_id = jid + 1
            self._pending[jid] = rec
            self._counts["begun"] += 1
        elif state in ("done", *_OUTCOMES):
            if self._pending.pop(jid, None) is None:
                raise JournalError(f"{where}: {state!r} for id {jid}, which is not pending")
            self._counts[state] += 1
            if state == "done":
                self._pulses += _ack_pulses(rec.get("ack"))
        else:
            raise JournalError(f"{where}: unknown state {state!r}")

    # writing
    def _append(self, *recs: dict) -> None:
        if self._fd is None:
            raise JournalError(f"{self.path} is open read-only or closed")
        data = "".join(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in recs)
        try:
            write_all(self._fd, data.encode("utf-8"))  # one write: no user-space buffer a crash could lose
        except OSError as e:  # full disk, quota: one line naming the file (the command was not sent)
            raise JournalError(f"cannot write {self.path}: {e.strerror or e}") from e

    def _sync(self) -> None:
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as e:
                raise JournalError(f"cannot write {self.path}: {e.strerror or e}") from e

    def begin(self, entry: dict) -> int:
        """Record a pulse command about to be sent; returns its id once the record is on disk.

        ``entry``: edge, feedback flag, mode, step, sample cursor... numpy arrays (the int8 counts, outer-mode
        rows/cols) are encoded compactly and covered by a content hash.
        """
        return self.begin_many([entry])[0]

    def begin_many(self, entries: list[dict]) -> list[int]:
        """:meth:`begin` for several commands (e.g. every edge of one nudged step) with a single fsync: an
        fsync costs milliseconds, a pulse command's journaling should not dominate the step."""
        if not entries:
            return []
        records = []
        for entry in entries:
            bad = _RESERVED & entry.keys()
            if bad:
                raise JournalError(f"journal entry uses reserved keys {sorted(bad)}")
            arrays = {k: v for k, v in entry.items() if isinstance(v, np.ndarray)}
            body = {k: (encode_array(v) if k in arrays else to_json_safe(v)) for k, v in entry.items()}
            records.append((body, _arrays_hash(arrays) if arrays else None))
        with self._lock:
            now, first = time.time(), self._next_id
            lines = []
            for k, (body, digest) in enumerate(records):
                rec = {"id": first + k, "state": "pending", "t": now, **body}
                if digest is not None:
                    rec["hash"] = digest
                lines.append(rec)
            self._append(*lines)
            self._sync()  # the write-ahead guarantee: recorded before any of these commands can be sent
            for rec in lines:
                self._pending[rec["id"]] = rec
            self._next_id = first + len(lines)
            self._counts["begun"] += len(lines)
        return [rec["id"] for rec in lines]

    def done(self, jid: int, ack: dict | None = None) -> None:
        """The instrument acknowledged command ``jid``. Written (survives a killed process) but not fsynced:
        a done record lost to a power cut only makes the entry pending, and reconciliation settles it."""
        with self._lock:
            if jid not in self._pending:
                raise JournalError(f"done({jid}): no pending entry with that id")
            safe_ack = to_json_safe(ack or {})
            self._append({"id": jid, "state": "done", "t": time.time(), "ack": safe_ack})
            del self._pending[jid]
            self._counts["done"] += 1
            self._pulses += _ack_pulses(safe_ack)

    def resolve(self, jid: int, outcome: Literal["applied", "not_applied"], evidence: dict | None = None) -> None:
        """Verdict of the reconciliation for a pending entry (weights read back and compared), fsynced."""
        if outcome not in _OUTCOMES:
            raise JournalError(f"resolve({jid}): outcome must be 'applied' or 'not_applied', got {outcome!r}")
        with self._lock:
            if jid not in self._pending:
                raise JournalError(f"resolve({jid}): no pending entry with that id")
            self._append({"id": jid, "state": outcome, "t": time.time(), "evidence": to_json_safe(evidence or {})})
            self._sync()
            del self._pending[jid]
            self._counts[outcome] += 1

    # compaction
    @property
    def archive_path(self) -> Path:
        return self.path.with_name(self.path.name.replace(".jsonl", "") + ".archive.jsonl.gz")

    def compact(self, below_id: int, *, archive: bool = True) -> int:
        """Drop the settled records of commands with ids below ``below_id`` (no resume can need them: they
        precede a checkpoint that is kept), keeping their totals in a header line so that
        :meth:`applied_count` and the other counts still cover the whole run. With ``archive`` the dropped
        lines are appended to ``journal.archive.jsonl.gz`` (for audit) before the live file is replaced.
        Returns the bytes the live file shrank by. Bounded by the checkpoint interval, not the run's length."""
        with self._lock:
            if self._fd is None:
                raise JournalError(f"{self.path} is open read-only or closed")
            below_id = min(int(below_id), self._next_id)
            if below_id <= self.compacted_below:
                return 0
            raw = self.path.read_bytes()
            lines = [ln for ln in raw.split(b"\n") if ln.strip()]
            header = {"state": "compacted", "t": time.time(), "below": below_id, "next_id": self._next_id,
                      "counts": dict.fromkeys(self._counts, 0), "pulses_acknowledged": 0}
            keep, gone = [], []
            for n, line in enumerate(lines):
                rec = json.loads(line)
                if n == 0 and rec.get("state") == "compacted":
                    for k in self._counts:
                        header["counts"][k] += int(rec["counts"][k])
                    header["pulses_acknowledged"] += int(rec["pulses_acknowledged"])
                    continue
                jid, state = int(rec["id"]), rec["state"]
                if jid >= below_id or jid in self._pending:
                    keep.append(line)
                    continue
                gone.append(line)
                header["counts"]["begun" if state == "pending" else state] += 1
                if state == "done":
                    header["pulses_acknowledged"] += _ack_pulses(rec.get("ack"))
            if not gone:
                return 0
            try:
                if archive:
                    with gzip.open(self.archive_path, "ab", compresslevel=6) as z:  # one gzip member per compaction
                        z.write(b"\n".join(gone) + b"\n")
                        z.flush()
                        os.fsync(z.fileobj.fileno())  # type: ignore[union-attr]
                data = json.dumps(header, separators=(",", ":")).encode() + b"\n" + b"".join(k + b"\n" for k in keep)
                tmp = self.path.with_name(f".{self.path.name}.compact.tmp")
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                write_all(fd, data)
                os.fsync(fd)
                os.replace(tmp, self.path)
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except OSError as e:
                raise JournalError(f"cannot compact {self.path}: {e.strerror or e}") from e
            os.close(self._fd)
            self._fd = fd
            self.compacted_below = below_id
            return len(raw) - len(data)

    # queries
    def pending(self) -> list[dict]:
        """Entries begun but neither done nor resolved, oldest first, with their arrays decoded (and the hash
        checked): ``entry["counts"]`` is the int8 array that was about to be sent."""
        out = []
        with self._lock:
            records = [self._pending[k] for k in sorted(self._pending)]
        for rec in records:
            entry = {k: (decode_array(v) if is_encoded_array(v) else v) for k, v in rec.items()}
            arrays = {k: v for k, v in entry.items() if isinstance(v, np.ndarray)}
            if "hash" in rec and _arrays_hash(arrays) != rec["hash"]:
                raise JournalError(f"{self.path}: entry {rec['id']} fails its content hash (corrupt counts)")
            out.append(entry)
        return out

    def acknowledged_count(self) -> int:
        """Commands the instrument acknowledged (``done`` records)."""
        return self._counts["done"]

    def applied_count(self) -> int:
        """Commands known to be applied: acknowledged, or found applied by reconciliation. This is the figure
        to compare with the instrument's own count of executed pulse commands."""
        return self._counts["done"] + self._counts["applied"]

    def stats(self) -> dict[str, int]:
        """``{"begun", "done", "applied", "not_applied", "pending", "next_id", "torn_bytes", "pulses_acknowledged"}``."""
        return {**self._counts, "pending": len(self._pending), "next_id": self._next_id,
                "torn_bytes": len(self.torn_tail), "pulses_acknowledged": self._pulses}

    @property
    def next_id(self) -> int:
        return self._next_id

    def close(self) -> None:
        """Release the file (and its lock); a closed journal refuses further writes."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "PulseJournal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def iter_records(path: str | os.PathLike, *, archived: bool = True) -> list[dict]:
    """Every complete record of a journal, oldest first: the compressed archive (records compacted away at
    checkpoints) then the live file, without the live file's header. For audits and tests."""
    path = Path(path)
    out: list[dict] = []
    chunks = []
    archive = path.with_name(path.name.replace(".jsonl", "") + ".archive.jsonl.gz")
    if archived and archive.exists():
        chunks.append(gzip.decompress(archive.read_bytes()))
    if path.exists():
        chunks.append(path.read_bytes())
    for chunk in chunks:
        for line in chunk.split(b"\n"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # blank, or a torn last line
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
    return out
