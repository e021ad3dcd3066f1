"""Run records: everything needed to understand a run afterwards and to resume it exactly.

A run lives in ``runs/<name>/`` (see ARCHITECTURE.md, "A run on disk")::

    config.toml       the resolved config (written by a small TOML writer: the stdlib only reads TOML)
    instrument.json   the instrument snapshot (identity, settings, calibration)
    metrics.jsonl     one JSON object per epoch and per evaluation, fsynced line by line; NaN/inf -> null
    journal.jsonl     the pulse write-ahead journal (:mod:`eqprop_hil.insitu.journal`)
    checkpoint/       self-contained checkpoints ``ckpt-00000007.pt``: the latest and the previous one
    plots/            learning curves (:mod:`eqprop_hil.runs.plots`)

Metric records are free-form objects; the report and the plots understand these keys: ``kind`` ("epoch" or
"eval"), ``epoch``, ``train_accuracy``, ``test_accuracy`` (fractions 0..1), ``train_loss``, ``test_loss``,
``samples_per_s`` (or ``samples_per_second``), ``pulses_sent`` (cumulative), ``samples_seen``.

A checkpoint holds only plain containers (dict, list, tuple, str, int, float, bool, None) and torch tensors, so
it loads with ``torch.load(weights_only=True)``: nothing in it can run code. numpy arrays are stored as tensors.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eqprop_hil.runs.durable import RunError, atomic_write_bytes, drop_torn_tail, to_json_safe, write_all
from eqprop_hil.runs.toml_writer import TomlWriteError, toml_dumps

__all__ = ["RunError", "RunDir", "DataCursor", "capture_rng_state", "restore_rng_state", "resolve_run_dir",
           "toml_dumps", "to_json_safe", "atomic_write_bytes"]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2  # 2: a sha256 manifest beside every checkpoint
_CKPT_RE = re.compile(r"ckpt-(\d{8})\.pt")


# --------------------------------------------------------------------------------------- checkpoint state
def _plain_for_torch(obj: Any, where: str) -> Any:
    """Check a checkpoint state holds only what ``torch.load(weights_only=True)`` accepts; numpy -> tensors."""
    import torch

    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain_for_torch(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_for_torch(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_plain_for_torch(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise RunError(f"checkpoint state {where} is a {type(obj).__name__}: only plain containers and tensors are "
                   "allowed (so the checkpoint loads with weights_only=True); convert it first")


# --------------------------------------------------------------------------------------- RNG and cursor
def capture_rng_state(generators: dict[str, Any] | None = None) -> dict:
    """The global RNG states (python ``random``, numpy's legacy global, torch CPU) plus named generators
    (``numpy.random.Generator`` or ``torch.Generator``), as plain containers and tensors."""
    import torch

    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].copy()),
                                        "pos": int(np_state["state"]["pos"])}},
        "torch": torch.get_rng_state(),
        "generators": {},
    }
    for name, gen in (generators or {}).items():
        if isinstance(gen, np.random.Generator):
            state["generators"][name] = {"numpy": _plain_for_torch(gen.bit_generator.state, name)}
        elif isinstance(gen, torch.Generator):
            state["generators"][name] = {"torch": gen.get_state()}
        else:
            raise RunError(f"generator {name!r} is a {type(gen).__name__}, not a numpy or torch generator")
    return state


def _numpy_bitgen_state(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _numpy_bitgen_state(v) for k, v in obj.items()}
    if hasattr(obj, "numpy"):
        return obj.numpy().copy()
    return obj


def restore_rng_state(state: dict, generators: dict[str, Any] | None = None) -> None:
    """Put back what :func:`capture_rng_state` took: afterwards the RNGs draw the same numbers as at capture."""
    import torch

    try:
        random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
        np_state = state["numpy"]
        np.random.set_state({**np_state, "state": {"key": np_state["state"]["key"].numpy().astype(np.uint32),
                                                   "pos": int(np_state["state"]["pos"])}})
        torch.set_rng_state(state["torch"])
        for name, gen in (generators or {}).items():
            saved = state["generators"][name]
            if isinstance(gen, np.random.Generator):
                gen.bit_generator.state = _numpy_bitgen_state(saved["numpy"])
            else:
                gen.set_state(saved["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RunError(f"the checkpoint's RNG state cannot be restored ({type(e).__name__}: {e})") from e


@dataclass
class DataCursor:
    """Where the data feed stands: ``position`` indexes the epoch's permutation (next sample to use)."""

    epoch: int = 0
    position: int = 0
    samples_seen: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataCursor":
        try:
            cursor = cls(**{k: d[k] for k in ("epoch", "position", "samples_seen")})
        except (KeyError, TypeError) as e:
            raise RunError(f"malformed data cursor {d!r}: needs epoch, position, samples_seen") from e
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in asdict(cursor).values()):
            raise RunError(f"malformed data cursor {d!r}: fields must be non-negative integers")
        return cursor


# -------------------------------------------------------------------------------------------- the run dir
def resolve_run_dir(name_or_path: str | os.PathLike | None, preset: str = "default", root: str | os.PathLike = "runs") -> Path:
    """Where a run goes: None -> ``runs/<YYYYmmdd-HHMMSS>-<preset>`` (``-2``, ``-3`` if taken); a bare name ->
    ``runs/<name>``; anything with a path separator (or an existing directory) -> that path."""
    root = Path(root)
    if name_or_path is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        candidate = root / f"{stamp}-{preset}"
        n = 2
        while candidate.exists():
            candidate = root / f"{stamp}-{preset}-{n}"
            n += 1
        return candidate
    text = os.fspath(name_or_path)
    if not text:
        raise RunError("empty run name")
    p = Path(text)
    if os.sep in text or (os.altsep and os.altsep in text) or p.is_dir():
        return p
    return root / text


class RunDir:
    """One run's directory. Make it with :meth:`create` (new run) or :meth:`open` (resume, report)."""

    CONFIG = "config.toml"
    SNAPSHOT = "instrument.json"
    METRICS = "metrics.jsonl"
    JOURNAL = "journal.jsonl"
    CHECKPOINTS = "checkpoint"
    PLOTS = "plots"
    KEEP_CHECKPOINTS = 2

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, exist_ok: bool = False) -> "RunDir":
        """Make the directory and write ``config.toml``. An existing non-empty directory is refused unless
        ``exist_ok`` (use :meth:`open` and ``--resume`` to continue a run)."""
        run = cls(path)
        try:
            toml_dumps(config)  # refuse an unwritable config before anything is created
        except TomlWriteError as e:
            raise RunError(f"cannot write {run.path / cls.CONFIG}: {e}") from e
        if run.path.exists() and not run.path.is_dir():
            raise RunError(f"{run.path} exists and is not a directory")
        if run.path.is_dir() and any(run.path.iterdir()) and not exist_ok:
            if (run.path / cls.CONFIG).exists():
                raise RunError(f"{run.path} is already a run; choose another name, or continue it with "
                               f"--resume {run.path}")
            raise RunError(f"{run.path} is not empty and is not a run; choose another directory")
        try:
            (run.path / cls.CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            (run.path / cls.PLOTS).mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {run.path}: {e}") from e
        run.write_config(config)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> "RunDir":
        """An existing run; a directory without ``config.toml`` is refused with a message saying so."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunError(f"{run.path} is not a run directory: it does not exist or is not a directory")
        if not (run.path / cls.CONFIG).is_file():
            raise RunError(f"{run.path} is not a run directory: it has no {cls.CONFIG}")
        return run

    # files
    @property
    def journal_path(self) -> Path:
        return self.path / self.JOURNAL

    @property
    def plots_dir(self) -> Path:
        return self.path / self.PLOTS

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    def journal(self, *, readonly: bool = False, fsync: bool = True) -> Any:
        """The run's :class:`eqprop_hil.insitu.journal.PulseJournal` (see there for ``fsync``)."""
        from eqprop_hil.insitu.journal import PulseJournal

        return PulseJournal(self.journal_path, readonly=readonly, fsync=fsync)

    # config and snapshot
    def write_config(self, config: dict) -> None:
        try:
            text = toml_dumps(config)
        except TomlWriteError as e:
            raise RunError(f"cannot write {self.path / self.CONFIG}: {e}") from e
        atomic_write_bytes(self.path / self.CONFIG, text.encode("utf-8"))

    def read_config(self) -> dict:
        path = self.path / self.CONFIG
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise RunError(f"cannot read {path}: {e}") from e

    def write_snapshot(self, snapshot: dict) -> None:
        text = json.dumps(to_json_safe(snapshot), indent=2, sort_keys=True, allow_nan=False)
        atomic_write_bytes(self.path / self.SNAPSHOT, (text + "\n").encode("utf-8"))

    def read_snapshot(self) -> dict | None:
        path = self.path / self.SNAPSHOT
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read {path}: {e}") from e

    def write_record(self, name: str, record: dict) -> None:
        """A small JSON record of the run (e.g. ``reconciliation.json``), replaced atomically."""
        text = json.dumps(to_json_safe(record), indent=1, sort_keys=True, allow_nan=False)
        atomic_write_bytes(self.path / name, (text + "\n").encode("utf-8"))

    # metrics
    def append_metrics(self, record: dict) -> None:
        """Append one record as one line, flushed and fsynced: a crash loses at most the line being written."""
        line = (json.dumps(to_json_safe(record), allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8")
        path = self.path / self.METRICS
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                drop_torn_tail(fd, path)
                write_all(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:  # read-only directory, full disk: one line naming the file
            raise RunError(f"cannot write {path}: {e.strerror or e}") from e

    def read_metrics(self) -> list[dict]:
        """All complete records. A torn last line (crash mid-write) is skipped with a warning; a bad line
        elsewhere is corruption and raises :class:`RunError` naming the file and line."""
        path = self.path / self.METRICS
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                if i == len(lines) - 1:  # no newline after it: a torn final write
                    log.warning("%s: ignoring a torn last line (%d bytes): %r", path, len(line), line[:80])
                    continue
                raise RunError(f"{path} line {i + 1} is not JSON: {line[:80]!r}") from e
        return records

    def rewind_metrics(self, n_records: int) -> None:
        """Keep only the first ``n_records`` records (on resume: drop records written after the checkpoint)."""
        records = self.read_metrics()[:n_records]
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        atomic_write_bytes(self.path / self.METRICS, data.encode("utf-8"))

    # checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first (temp files from an interrupted save are not listed)."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.iterdir() if _CKPT_RE.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(_CKPT_RE.fullmatch(p.name).group(1)))

    def save_checkpoint(self, state: dict) -> Path:
        """Write a self-contained checkpoint atomically, then its manifest; keep it and the previous one.

        ``state`` holds what resume needs (weights read back, optimiser, ``cursor``, step...). Filled in when
        absent: ``config`` (from config.toml) and ``rng`` (:func:`capture_rng_state` now). Added always:
        ``run_records = {"metrics_records": n}`` so that resume can :meth:`rewind_metrics`.

        The manifest ``ckpt-N.pt.sha256`` (JSON) is written *last*: the sha256 of the checkpoint file and of
        every tensor and of the rest of the state. A checkpoint without a valid manifest was never completed or
        was damaged on disk; :meth:`load_checkpoint` names it and falls back to the previous one.
        """
        import torch

        full = dict(state)
        full.setdefault("config", self.read_config())
        full.setdefault("rng", capture_rng_state())
        full["run_records"] = {"metrics_records": len(self.read_metrics())}
        payload = {"format": "eqprop-hil-checkpoint", "version": CHECKPOINT_VERSION,
                   "state": _plain_for_torch(full, "state")}
        existing = self.checkpoints()
        seq = int(_CKPT_RE.fullmatch(existing[-1].name).group(1)) + 1 if existing else 1
        target = self.checkpoint_dir / f"ckpt-{seq:08d}.pt"
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot write {self.checkpoint_dir}: {e.strerror or e}") from e
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        atomic_write_bytes(target, data)  # temp file, fsync, rename: never a torn checkpoint
        manifest = {"file": target.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                    **state_digests(payload["state"])}
        atomic_write_bytes(_manifest_path(target), (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for old in self.checkpoints()[: -self.KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
            _manifest_path(old).unlink(missing_ok=True)
        return target

    def verify_checkpoint(self, path: Path) -> dict:
        """Load one checkpoint and check it against its manifest; returns its state or raises :class:`RunError`
        naming the file and what is wrong (no manifest, file hash, which tensor, learner state)."""
        import torch

        mpath = _manifest_path(path)
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
            want_file, want_tensors, want_rest = manifest["sha256"], manifest["tensors"], manifest["state"]
        except FileNotFoundError as e:
            legacy = self._legacy_checkpoint(path)
            if legacy is not None:
                return legacy
            raise RunError(f"{path} has no manifest {mpath.name} (its save never completed)") from e
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{path}: its manifest {mpath.name} is unreadable ({type(e).__name__}: {e})") from e
        data = path.read_bytes()
        file_ok = hashlib.sha256(data).hexdigest() == want_file
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds (pickle, zip, runtime) for a damaged file
            raise RunError(f"{path} is corrupt: sha256 {'matches' if file_ok else 'differs from'} the manifest, "
                           f"and it does not load ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from e
        if not isinstance(payload, dict) or payload.get("format") != "eqprop-hil-checkpoint":
            raise RunError(f"{path} is not an eqprop-hil checkpoint")
        if payload.get("version") != CHECKPOINT_VERSION:
            raise RunError(f"{path}: version {payload.get('version')!r}, this code reads {CHECKPOINT_VERSION}")
        have = state_digests(payload["state"])
        bad = sorted(k for k in set(want_tensors) | set(have["tensors"])
                     if want_tensors.get(k) != have["tensors"].get(k))
        if bad:
            raise RunError(f"{path} is corrupt: tensor(s) {', '.join(bad[:5])} fail their sha256 in {mpath.name}")
        if have["state"] != want_rest:
            raise RunError(f"{path} is corrupt: the learner/loop state fails its sha256 in {mpath.name}")
        if not file_ok:
            raise RunError(f"{path} is corrupt: its sha256 differs from {mpath.name}")
        return payload["state"]

    @staticmethod
    def _legacy_checkpoint(path: Path) -> dict | None:
        """A version-1 checkpoint (written before manifests existed) loads, unverified, with a warning; None for
        anything else."""
        import torch

        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch raises many kinds for a damaged file: then it is not a usable legacy one
            return None
        if isinstance(payload, dict) and payload.get("format") == "eqprop-hil-checkpoint" and payload.get("version") == 1:
            log.warning("%s: a version-1 checkpoint without a manifest; loaded unverified", path)
            return payload["state"]
        return None

    def load_checkpoint(self, *, fallback: bool = False) -> dict | None:
        """The latest checkpoint's state, verified against its manifest, or None if the run has none.

        A bad latest raises :class:`RunError` naming it; with ``fallback=True`` it is renamed ``*.corrupt`` (kept
        for inspection, out of the rotation) and the previous good one is used, with a warning naming both."""
        candidates = self.checkpoints()[::-1]
        errors = []
        for path in candidates if fallback else candidates[:1]:
            try:
                state = self.verify_checkpoint(path)
            except RunError as e:
                errors.append(str(e))
                if fallback:
                    for p in (path, _manifest_path(path)):
                        if p.exists():
                            p.replace(p.with_name(p.name + ".corrupt"))
                continue
            if errors:
                log.warning("using the previous checkpoint %s: %s", path, "; ".join(errors))
            self.fallback_errors = errors
            return state
        if errors:
            hint = "" if fallback or len(candidates) < 2 else f"; the previous one is {candidates[1]} (fallback=True)"
            raise RunError("; ".join(errors) + hint + (
                "; no good checkpoint left (the bad ones were renamed *.corrupt): resume again to restart the run "
                "from its initial weights" if fallback else ""))
        return None


def _manifest_path(ckpt: Path) -> Path:
    return ckpt.with_name(ckpt.name + ".sha256")


def state_digests(state: Any) -> dict:
    """``{"tensors": {path: sha256}, "state": sha256}``: every tensor of a checkpoint state by its path
    (``parameters.W0``), hashed over dtype, shape and bytes, and the rest (plain values) hashed as canonical JSON."""
    import torch

    tensors: dict[str, str] = {}

    def walk(obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous().cpu()
            h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            tensors[where] = h.hexdigest()
            return f"<tensor {where}>"
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, float) and not math.isfinite(obj):
            return repr(obj)
        return obj

    rest = walk(state, "")
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), default=repr)
    return {"tensors": tensors, "state": hashlib.sha256(text.encode()).hexdigest()}
