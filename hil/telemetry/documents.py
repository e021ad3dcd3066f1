"""A run as Bluesky documents: composed with event-model, encoded as strict JSON, saved as JSON lines.

A training run is one Bluesky run: ``start`` (run name, resolved config, instrument snapshot, ``plan_name``
``hil_train``, ``plan_type``, ``scan_id``, hints), one ``descriptor`` per stream (``primary``: training progress
every N samples; ``eval``: one event per evaluation), their ``event`` documents and ``stop``. Documents are built
by event-model's own ``compose_run`` / ``compose_descriptor`` / ``compose_event`` / ``compose_stop``, so they pass
its JSON schemas and Bluesky's callbacks (``RunRouter``, ``BestEffortCallback``, ``LiveTable``) take them as they
take a RunEngine's. event-model is needed to *compose* documents (training); reading them (``hil monitor``)
needs only the standard library, and validates with event-model's schemas when it is installed.

The run directory keeps them in ``documents.jsonl``, one ``[name, document]`` array per line (the layout of
suitcase-jsonl), so ``for name, doc in read_documents(path): callback(name, doc)`` replays a run into any
Bluesky callback.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from eqprop_hil.protocols.errors import EqpropError, ValueRangeError

DOCUMENT_NAMES = ("start", "descriptor", "event", "stop")
EXIT_STATUSES = ("success", "abort", "fail")
PLAN_NAME = "hil_train"
Document = tuple[str, dict[str, Any]]  # (name, body), e.g. ("event", {"seq_num": 3, "data": {...}, ...})
Sink = Callable[[str, dict[str, Any]], Any]  # any Bluesky callback: cb(name, doc)


class TelemetryError(EqpropError):
    """A telemetry document, message or request that breaks the format, or a socket that cannot be set up."""


def _key(dtype: str, units: str, description: str, source: str = "eqprop-hil") -> dict[str, Any]:
    return {"source": source, "dtype": dtype, "shape": [], "units": units, "description": description}


# Stream "primary": training progress, one event every [telemetry] every_samples samples (x axis: samples).
PRIMARY_DATA_KEYS: dict[str, dict[str, Any]] = {
    "epoch": _key("integer", "epochs", "epoch in progress, from 1"),
    "samples": _key("integer", "samples", "training samples seen so far in the run"),
    "running_accuracy": _key("number", "fraction", "training accuracy of the epoch so far, 0..1"),
    "loss": _key("number", "", "mean training loss of the epoch so far"),
    "samples_per_second": _key("number", "samples/s", "training rate of this session"),
}
# Stream "eval": one event per evaluation on the test set (x axis: epoch).
EVAL_DATA_KEYS: dict[str, dict[str, Any]] = {
    "epoch": _key("integer", "epochs", "epochs completed"),
    "samples": _key("integer", "samples", "training samples seen so far in the run"),
    "train_accuracy": _key("number", "fraction", "training accuracy of the epoch, 0..1"),
    "test_accuracy": _key("number", "fraction", "test accuracy (free phase only), 0..1"),
    "test_loss": _key("number", "", "mean test loss"),
    "samples_per_second": _key("number", "samples/s", "training rate of the epoch"),
}
PULSES_KEY = {"pulses_sent": _key("integer", "pulses", "device pulses sent to the instrument so far in the run")}
STREAM_OBJECTS = {"primary": "trainer", "eval": "evaluation"}  # object_keys / hints name per stream
STREAM_HINTS = {"primary": ["running_accuracy", "loss"], "eval": ["test_accuracy"]}
# BestEffortCallback plots hinted fields against the dimension of the one stream named here (others vs time).
START_HINTS = {"dimensions": [(["samples"], "primary")]}


# ---------------------------------------------------------------- JSON encoding


def to_jsonable(obj: Any, path: str = "$") -> Any:
    """Plain JSON types from numpy scalars/arrays, tensors, dataclasses, enums and paths; NaN/inf become null."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), path)
    if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and not isinstance(obj, (Mapping, list, tuple))):
        a = np.asarray(obj)
        if a.dtype.kind == "f":  # vectorised NaN/inf -> None
            out = a.astype(object)
            out[~np.isfinite(a)] = None
            return out.tolist()
        if a.dtype.kind in "biu":
            return a.tolist()
        if a.dtype.kind in "US":
            return a.astype(str).tolist()
        raise TelemetryError(f"cannot encode {path}: numpy dtype {a.dtype} has no JSON form")
    if isinstance(obj, Mapping):
        out_map = {}
        for k, v in obj.items():
            if isinstance(k, np.generic):
                k = k.item()
            if not isinstance(k, (str, int, float, bool)):
                raise TelemetryError(f"cannot encode {path}: key {k!r} of type {type(k).__name__} is not a JSON key")
            out_map[str(k)] = to_jsonable(v, f"{path}.{k}")
        return out_map
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(sorted(obj, key=repr))]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, path)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, path)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    raise TelemetryError(f"cannot encode {path}: {type(obj).__name__} {obj!r:.80} has no JSON form")


def encode_document(doc: Mapping[str, Any]) -> bytes:
    """One document as compact UTF-8 JSON (strict: no NaN tokens reach the wire or the file)."""
    return json.dumps(to_jsonable(doc), allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


def reject_constant(token: str) -> None:
    """``parse_constant`` hook: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON constant {token}")


def validate_document(name: str, doc: Any) -> dict[str, Any]:
    """Check a document against event-model's JSON schema for its kind; returns it or raises TelemetryError.

    Without event-model installed (a light ``hil monitor`` install) only the structure the monitor relies on is
    checked: uid, time, and the references between documents.
    """
    if name not in DOCUMENT_NAMES:
        raise TelemetryError(f"unknown document kind {name!r}; expected one of {DOCUMENT_NAMES}")
    if not isinstance(doc, dict):
        raise TelemetryError(f"{name} document is a {type(doc).__name__}, not a JSON object")
    try:
        import event_model
    except ImportError:
        event_model = None
    if event_model is not None:
        try:
            event_model.schema_validators[event_model.DocumentNames[name]].validate(doc)
        except Exception as e:  # jsonschema.ValidationError; its first line names the field
            raise TelemetryError(f"{name} document fails event-model's schema: {str(e).splitlines()[0]}") from e
        return doc
    required = {"start": ("uid", "time"), "descriptor": ("uid", "time", "run_start", "data_keys"),
                "event": ("uid", "time", "descriptor", "seq_num", "data", "timestamps"),
                "stop": ("uid", "time", "run_start", "exit_status")}[name]
    missing = [k for k in required if k not in doc]
    if missing:
        raise TelemetryError(f"{name} document lacks {missing}")
    if name == "stop" and doc["exit_status"] not in EXIT_STATUSES:
        raise TelemetryError(f"stop: exit_status {doc['exit_status']!r} is not one of {EXIT_STATUSES}")
    return doc


def infer_data_key(value: Any, source: str = "eqprop-hil") -> dict[str, Any]:
    """A data-key spec (source, dtype, shape) for a value of an undeclared key."""
    if isinstance(value, (bool, np.bool_)):
        dtype = "boolean"
    elif isinstance(value, (int, np.integer)):
        dtype = "integer"
    elif isinstance(value, (float, np.floating)):
        dtype = "number"
    elif isinstance(value, str):
        dtype = "string"
    else:
        dtype = "array"
    return {"source": source, "dtype": dtype, "shape": list(np.shape(value)) if dtype == "array" else []}


# ---------------------------------------------------------------- composing a run


class RunDocuments:
    """Composes one run at a time with event-model and hands every document to the sinks, in order.

    ``sinks`` are Bluesky-style callbacks ``sink(name, doc)``: a :class:`DocumentLog`, a publisher's
    ``publish``, a ``RunRouter``... Each document is validated (event-model) and made JSON-safe before any
    sink sees it, so a bad value raises here, in the caller, and no sink gets half a run.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])
        self._bundle: Any = None
        self._streams: dict[str, Any] = {}  # stream name -> ComposeDescriptorBundle

    @property
    def run_open(self) -> bool:
        return self._bundle is not None

    @property
    def run_uid(self) -> str | None:
        return None if self._bundle is None else self._bundle.start_doc["uid"]

    def descriptor(self, stream: str) -> dict[str, Any] | None:
        bundle = self._streams.get(stream)
        return None if bundle is None else bundle.descriptor_doc

    def _emit(self, name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        plain = to_jsonable(dict(doc))
        for sink in self.sinks:
            sink(name, plain)
        return plain

    def start(self, run_name: str, *, config: Any = None, instrument: Any = None, scan_id: int = 1,
              plan_name: str = PLAN_NAME, hints: Mapping[str, Any] | None = None, **metadata: Any) -> str:
        """Open a run; returns its uid. ``config`` (resolved) and ``instrument`` (snapshot) go in the start."""
        import event_model

        if self._bundle is not None:
            raise TelemetryError(f"run {self.run_uid} is still open; stop() it before starting {run_name!r}")
        if isinstance(scan_id, bool) or not isinstance(scan_id, int) or scan_id < 0:
            raise ValueRangeError(f"scan_id {scan_id!r}: must be an integer >= 0")
        md = to_jsonable({"plan_type": "generator", "plan_name": plan_name, "scan_id": scan_id,
                          "hints": dict(START_HINTS if hints is None else hints), **metadata,
                          "run_name": str(run_name), "config": config, "instrument": instrument})
        try:
            bundle = event_model.compose_run(metadata=md)
        except Exception as e:
            raise TelemetryError(f"start document refused by event-model: {e}") from e
        self._bundle, self._streams = bundle, {}
        self._emit("start", bundle.start_doc)
        return bundle.start_doc["uid"]

    def describe(self, stream: str, data_keys: Mapping[str, Mapping[str, Any]], *, object_name: str | None = None,
                 hint_fields: list[str] | None = None) -> str:
        """Declare a stream's data keys (``{key: {"source", "dtype", "shape", "units"}}``); returns its uid."""
        if self._bundle is None:
            raise TelemetryError("describe() before start(): open a run first")
        if stream in self._streams:
            raise TelemetryError(f"stream {stream!r} of run {self.run_uid} is already described")
        keys = {k: {"source": "eqprop-hil", "shape": [], **v} for k, v in data_keys.items()}
        obj = object_name or STREAM_OBJECTS.get(stream, stream)
        fields = [f for f in (STREAM_HINTS.get(stream, []) if hint_fields is None else hint_fields) if f in keys]
        try:
            bundle = self._bundle.compose_descriptor(data_keys=to_jsonable(keys), name=stream,
                                                     object_keys={obj: sorted(keys)}, hints={obj: {"fields": fields}})
        except Exception as e:
            raise TelemetryError(f"descriptor of stream {stream!r} refused by event-model: {e}") from e
        self._streams[stream] = bundle
        self._emit("descriptor", bundle.descriptor_doc)
        return bundle.descriptor_doc["uid"]

    def event(self, data: Mapping[str, Any], stream: str = "primary") -> int:
        """One event carrying every key of the stream's descriptor; returns its seq_num (1, 2, ... per stream).

        A stream used without ``describe()`` is described from the first event's values.
        """
        if self._bundle is None:
            raise TelemetryError("event() without an open run: start() first")
        if stream not in self._streams:
            self.describe(stream, {k: infer_data_key(v) for k, v in data.items()})
        bundle = self._streams[stream]
        declared = set(bundle.descriptor_doc["data_keys"])
        if set(data) != declared:
            raise TelemetryError(f"event of stream {stream!r}: keys {sorted(set(data) - declared)} are not in the "
                                 f"descriptor and {sorted(declared - set(data))} are missing; every event carries "
                                 "exactly the described keys")
        now = time.time()
        try:
            doc = bundle.compose_event(data=to_jsonable(dict(data)), timestamps={k: now for k in data}, time=now)
        except Exception as e:
            raise TelemetryError(f"event of stream {stream!r} refused by event-model: {e}") from e
        self._emit("event", doc)
        return int(doc["seq_num"])

    def stop(self, exit_status: str = "success", reason: str = "") -> None:
        """Close the run: "success", "abort" (user stop) or "fail" (error, with ``reason``)."""
        if exit_status not in EXIT_STATUSES:
            raise ValueRangeError(f"exit_status {exit_status!r} is not one of {EXIT_STATUSES}")
        if self._bundle is None:
            raise TelemetryError("stop() without an open run")
        doc = self._bundle.compose_stop(exit_status=exit_status, reason=str(reason))
        self._bundle, self._streams = None, {}
        self._emit("stop", doc)


# ---------------------------------------------------------------- documents on disk


class DocumentLog:
    """A Bluesky callback that appends ``[name, doc]`` lines to a file (suitcase-jsonl layout), flushed per line.

    The stop document is fsynced: a finished run's file is complete on disk.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path)
        self._file = open(self.path, "ab")  # noqa: SIM115 (closed by close())

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        line = json.dumps([name, to_jsonable(doc)], allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        self._file.write(line.encode() + b"\n")
        self._file.flush()
        if name == "stop":
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Replay a ``documents.jsonl``: ``(name, doc)`` in the order written. A torn last line (a crash mid-write)
    is skipped; a bad line elsewhere raises TelemetryError naming the file and line."""
    p = pathlib.Path(path)
    lines = p.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            name, doc = json.loads(line, parse_constant=reject_constant)
            if not isinstance(name, str) or not isinstance(doc, dict):
                raise ValueError("not [str, object]")
        except (ValueError, TypeError) as e:
            if i == len(lines) - 1:
                return
            raise TelemetryError(f"{p} line {i + 1} is not a [name, document] JSON array: {line[:80]!r}") from e
        yield name, doc
