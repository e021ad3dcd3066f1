"""Live telemetry: a run streamed over ZeroMQ as JSON documents in Bluesky's document model.

A run is ``start`` (run name, resolved config, instrument snapshot), ``descriptor`` (the data keys with dtype,
shape and units), one ``event`` per evaluation and per N training samples, and ``stop`` (exit status, reason,
event count). Each message is two frames, ``[topic, JSON utf-8]``; nothing is ever pickled.

PUB/SUB drops whatever was sent before a subscriber joined (the slow joiner), so a late ``hil monitor`` would
never learn the run's name or config. Three remedies, all on by default: the publisher is an XPUB socket that
answers every new subscription with the current start, descriptor, last event and stop ("welcome"); it re-sends
start and descriptor every ``resend_start_every_s`` while the run is open; and a ROUTER socket answers snapshot
requests. Subscribers drop the duplicates by uid and sequence number.

All sockets belong to one background thread (ZeroMQ sockets are not thread-safe); the trainer's calls only
encode the document (so encoding errors surface in the caller) and hand the bytes over an inproc pipe.
Security: loopback by default, a warning for anything else; optional CURVE on both sockets (subscribers need the
server's public key) and an optional shared token on snapshot requests.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import ipaddress
import json
import logging
import math
import pathlib
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import zmq

from eqprop_hil.drivers.timeouts import zmq_ms
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError

log = logging.getLogger(__name__)

DOCUMENT_NAMES = ("start", "descriptor", "event", "stop")
EXIT_STATUSES = ("success", "abort", "fail")
DTYPES = ("number", "integer", "string", "boolean", "array")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a subscriber refuses larger messages (ZMQ_MAXMSGSIZE) instead of buffering them
Document = tuple[str, dict[str, Any]]  # (name, body), e.g. ("event", {"seq_num": 3, "data": {...}, ...})

# What a training run reports. Accuracies are fractions in [0, 1]; the monitor shows them as percent.
TRAINING_DATA_KEYS: dict[str, dict[str, Any]] = {
    "kind": {"dtype": "string", "shape": [], "units": "", "description": "'train' every N samples, 'eval' per evaluation"},
    "epoch": {"dtype": "integer", "shape": [], "units": "epochs"},
    "samples": {"dtype": "integer", "shape": [], "units": "samples", "description": "training samples seen so far"},
    "running_accuracy": {"dtype": "number", "shape": [], "units": "fraction"},
    "test_accuracy": {"dtype": "number", "shape": [], "units": "fraction"},
    "loss": {"dtype": "number", "shape": [], "units": ""},
    "samples_per_second": {"dtype": "number", "shape": [], "units": "samples/s"},
    "pulses_sent": {"dtype": "integer", "shape": [], "units": "pulses"},
}


class TelemetryError(EqpropError):
    """A telemetry message or request that breaks the format, or a socket that cannot be set up."""


class TelemetryTimeout(TelemetryError):
    """Nothing arrived within the timeout: wrong address, publisher gone, or a missing/wrong CURVE key."""


class TelemetryRefused(TelemetryError):
    """The publisher refused a snapshot request (wrong or missing token, malformed request)."""


# ---------------------------------------------------------------- encoding


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
    """One document as compact UTF-8 JSON (strict: no NaN tokens reach the wire)."""
    return json.dumps(to_jsonable(doc), allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


def _quote(frames: list[bytes]) -> str:
    parts = [repr(f[:120]) + (f"...({len(f)} bytes)" if len(f) > 120 else "") for f in frames]
    return "[" + ", ".join(parts) + "]"


def _reject_constant(token: str) -> None:
    raise ValueError(f"non-standard JSON constant {token}")


def validate_document(name: str, doc: Any) -> dict[str, Any]:
    """Check the fields a document of this kind must carry; returns it, or raises TelemetryError naming the field."""
    if name not in DOCUMENT_NAMES:
        raise TelemetryError(f"unknown document kind {name!r}; expected one of {DOCUMENT_NAMES}")
    if not isinstance(doc, dict):
        raise TelemetryError(f"{name} document is a {type(doc).__name__}, not a JSON object")

    def need(key: str, types: type | tuple[type, ...]) -> Any:
        value = doc.get(key)
        if isinstance(value, bool) or not isinstance(value, types):
            raise TelemetryError(f"{name} document: field {key!r} is {value!r:.80}, expected {types}")
        return value

    need("uid", str)
    if not math.isfinite(need("time", (int, float))):
        raise TelemetryError(f"{name} document: time {doc['time']!r} is not finite")
    if name == "descriptor":
        need("run_start", str)
        for key, spec in need("data_keys", dict).items():
            if not isinstance(spec, dict) or spec.get("dtype") not in DTYPES or not isinstance(spec.get("shape"), list):
                raise TelemetryError(f"descriptor: data key {key!r} has spec {spec!r:.80}; needs dtype in {DTYPES} and shape")
    elif name == "event":
        need("descriptor", str)
        need("data", dict)
        if need("seq_num", int) < 1:
            raise TelemetryError(f"event: seq_num {doc['seq_num']} is below 1")
    elif name == "stop":
        need("run_start", str)
        need("reason", str)
        need("num_events", dict)
        if doc.get("exit_status") not in EXIT_STATUSES:
            raise TelemetryError(f"stop: exit_status {doc.get('exit_status')!r} is not one of {EXIT_STATUSES}")
    return doc


def decode_message(frames: list[bytes]) -> Document:
    """``[topic, json]`` -> (name, document); anything else raises TelemetryError quoting the frames."""
    if len(frames) != 2:
        raise TelemetryError(f"malformed telemetry message ({len(frames)} frames, expected 2 [topic, json]): "
                            f"{_quote(frames)}")
    try:
        name = frames[0].decode("ascii")
        doc = json.loads(frames[1].decode("utf-8"), parse_constant=_reject_constant)
        return name, validate_document(name, doc)
    except (UnicodeDecodeError, ValueError, TelemetryError) as e:
        raise TelemetryError(f"malformed telemetry message ({e}): {_quote(frames)}") from e


# ---------------------------------------------------------------- addresses and keys


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for tcp on a loopback address (127.0.0.0/8, ::1, localhost, lo) and for host-local ipc/inproc."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueRangeError(f"ZeroMQ endpoint {endpoint!r} has no scheme; use e.g. 'tcp://127.0.0.1:0'")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].split(";")[-1].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", interface names, host names: may be reachable from the network
        return False


def check_bind_address(endpoint: str) -> bool:
    """Warn (log and stderr) when a listening socket would be reachable from outside this host; True if so."""
    if is_loopback_endpoint(endpoint):
        return False
    message = (f"telemetry socket binds {endpoint!r}, which is NOT loopback: anyone on that network can subscribe; "
               "use CURVE keys (curve_secret_key) and a snapshot token")
    log.warning(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)
    return True


def _sibling_endpoint(endpoint: str) -> str:
    """The default snapshot endpoint: the same host on a free port (tcp) or a neighbouring name (ipc/inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        return f"tcp://{rest.rsplit(':', 1)[0]}:0"
    if scheme in ("ipc", "inproc"):
        return f"{endpoint}.snapshot"
    raise ValueRangeError(f"no default snapshot endpoint for {endpoint!r}; pass snapshot_address")


def _z85_key(key: bytes | str, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) == 32:
        return zmq.utils.z85.encode(raw)
    if len(raw) != 40:
        raise ValueRangeError(f"{what} must be a 40-character Z85 CURVE key (zmq.curve_keypair()), got {len(raw)} bytes")
    return raw


def _secure_client(sock: zmq.Socket, server_public_key: bytes | str | None) -> None:
    if server_public_key is not None:
        public, secret = zmq.curve_keypair()  # an ephemeral client identity; the server key is the secret shared
        sock.curve_serverkey = _z85_key(server_public_key, "server_public_key")
        sock.curve_publickey, sock.curve_secretkey = public, secret


# ---------------------------------------------------------------- publisher


class TelemetryPublisher:
    """Streams one run at a time; ``start`` -> ``describe`` (optional) -> ``event``... -> ``stop``.

    ``address`` is bound (port 0 picks a free port; read the result from ``.address``); ``snapshot_address``
    defaults to the same host on another free port (``.snapshot_address``). ``curve_secret_key`` (Z85, from
    ``zmq.curve_keypair()``) turns on CURVE for both sockets: give subscribers ``.public_key``.
    ``token`` is required in snapshot requests. ``linger_s`` bounds how long close() waits to flush.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:0", *, resend_start_every_s: float | None = 2.0,
                 curve_secret_key: bytes | str | None = None, token: str | None = None,
                 snapshot_address: str | None = None, welcome_subscribers: bool = True, linger_s: float = 1.0) -> None:
        if resend_start_every_s is not None and not resend_start_every_s > 0:
            raise ValueRangeError(f"resend_start_every_s={resend_start_every_s!r}: must be > 0 s, or None to disable")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueRangeError("token must be a non-empty string, or None for no token")
        if not 0 <= linger_s <= 60:
            raise ValueRangeError(f"linger_s={linger_s!r}: must be within 0..60 s")
        self._secret = None if curve_secret_key is None else _z85_key(curve_secret_key, "curve_secret_key")
        self.public_key: bytes | None = None if self._secret is None else zmq.curve_public(self._secret)
        self._token = None if token is None else token.encode()
        self._resend_s, self._welcome, self._linger_s = resend_start_every_s, welcome_subscribers, linger_s
        self._lock = threading.Lock()  # caller side: run state and the pipe's sending end
        self._subscribed = threading.Condition()
        self._subscriptions = 0
        self._closed = False
        self._run_uid: str | None = None
        self._descriptor: dict[str, Any] | None = None
        self._seq = 0
        self._worker_error: BaseException | None = None
        self._ctx = zmq.Context()
        try:
            self._pub, self.address = self._bind(zmq.XPUB, address)
            self._router, self.snapshot_address = self._bind(zmq.ROUTER, snapshot_address or _sibling_endpoint(self.address))
            pipe = f"inproc://telemetry-{uuid.uuid4().hex}"
            self._pipe = self._ctx.socket(zmq.PAIR)
            self._pipe.bind(pipe)
            self._pipe_out = self._ctx.socket(zmq.PAIR)
            self._pipe_out.connect(pipe)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        self._state: dict[str, bytes] = {}  # worker-owned: the latest payload per document name
        self._worker = threading.Thread(target=self._serve, name="telemetry-publisher", daemon=True)
        self._worker.start()
        log.info("telemetry on %s (snapshot %s, curve %s, token %s)", self.address, self.snapshot_address,
                 "on" if self._secret else "off", "on" if self._token else "off")

    def _bind(self, kind: int, address: str) -> tuple[zmq.Socket, str]:
        check_bind_address(address)
        sock = self._ctx.socket(kind)
        sock.linger = zmq_ms(self._linger_s)
        if self._secret is not None:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self._secret, self.public_key, True
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # pass every subscription up, so every joiner is welcomed
        else:
            sock.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)  # snapshot requests are tiny
        if "[" in address:
            sock.ipv6 = True
        try:
            sock.bind(address)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise TelemetryError(f"cannot bind telemetry socket to {address!r}: {e}; use tcp://127.0.0.1:0 "
                                 "for a free loopback port") from e
        return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- caller side

    @property
    def subscriptions(self) -> int:
        """How many subscriptions have reached the publisher so far (CURVE rejects never count)."""
        with self._subscribed:
            return self._subscriptions

    def wait_for_subscribers(self, count: int = 1, timeout_s: float | None = 5.0) -> bool:
        """Block until ``count`` subscriptions have arrived (a run that must not start unwatched); False on timeout."""
        with self._subscribed:
            return self._subscribed.wait_for(lambda: self._subscriptions >= count, timeout_s)

    def start(self, run_name: str, config: Any = None, instrument: Any = None, **metadata: Any) -> str:
        """Open a run; returns its uid. ``config`` (resolved) and ``instrument`` (snapshot) go in the document."""
        with self._lock:
            if self._run_uid is not None:
                raise TelemetryError(f"run {self._run_uid} is still open; stop() it before starting {run_name!r}")
            uid = uuid.uuid4().hex
            self._send("start", {**metadata, "uid": uid, "time": time.time(), "run_name": str(run_name),
                                 "config": config, "instrument": instrument})
            self._run_uid, self._descriptor, self._seq = uid, None, 0
            return uid

    def describe(self, data_keys: Mapping[str, Mapping[str, Any]] | None = None, *, name: str = "primary") -> str:
        """Declare the event data keys (``{key: {"dtype", "shape", "units"}}``; default TRAINING_DATA_KEYS)."""
        with self._lock:
            return self._describe(dict(TRAINING_DATA_KEYS if data_keys is None else data_keys), name)

    def _describe(self, data_keys: dict[str, Any], name: str) -> str:
        if self._run_uid is None:
            raise TelemetryError("describe() before start(): open a run first")
        if self._descriptor is not None:
            raise TelemetryError(f"run {self._run_uid} already has its descriptor {self._descriptor['uid']}")
        doc = {"uid": uuid.uuid4().hex, "time": time.time(), "run_start": self._run_uid, "name": name,
               "data_keys": {k: {"shape": [], "units": "", **v} for k, v in data_keys.items()}}
        validate_document("descriptor", to_jsonable(doc))
        self._send("descriptor", doc)
        self._descriptor = doc
        return doc["uid"]

    def event(self, data: Mapping[str, Any]) -> int:
        """Publish one event (a subset of the described keys); returns its seq_num (1, 2, ...).

        Without an explicit ``describe()``, the first event describes TRAINING_DATA_KEYS plus its own extra keys.
        """
        with self._lock:
            if self._descriptor is None:
                extra = {k: {"dtype": _infer_dtype(v), "shape": list(np.shape(v))} for k, v in data.items()
                         if k not in TRAINING_DATA_KEYS}
                self._describe({**TRAINING_DATA_KEYS, **extra}, "primary")
            unknown = sorted(set(data) - set(self._descriptor["data_keys"]))
            if unknown:
                raise TelemetryError(f"event keys {unknown} are not in the descriptor; declare them with describe()")
            now = time.time()
            self._seq += 1
            self._send("event", {"uid": uuid.uuid4().hex, "time": now, "descriptor": self._descriptor["uid"],
                                 "seq_num": self._seq, "data": dict(data), "timestamps": {k: now for k in data}})
            return self._seq

    def stop(self, exit_status: str = "success", reason: str = "") -> None:
        """Close the run: ``exit_status`` is "success", "abort" (user stop) or "fail" (error, with ``reason``)."""
        if exit_status not in EXIT_STATUSES:
            raise ValueRangeError(f"exit_status {exit_status!r} is not one of {EXIT_STATUSES}")
        with self._lock:
            if self._run_uid is None:
                raise TelemetryError("stop() without an open run")
            self._send("stop", {"uid": uuid.uuid4().hex, "time": time.time(), "run_start": self._run_uid,
                                "exit_status": exit_status, "reason": str(reason), "num_events": {"primary": self._seq}})
            self._run_uid = None

    @property
    def run_open(self) -> bool:
        return self._run_uid is not None

    def _send(self, name: str, doc: Mapping[str, Any]) -> None:  # caller holds self._lock
        if self._closed:
            raise TelemetryError(f"telemetry publisher {self.address} is closed; {name} document not sent")
        if self._worker_error is not None:
            raise TelemetryError(f"telemetry thread died: {self._worker_error!r}") from self._worker_error
        self._pipe.send_multipart([name.encode(), encode_document(doc)])

    def close(self) -> None:
        """Flush what was published (bounded by ``linger_s``) and close; sends nothing more. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pipe.send(b"close")
        self._worker.join(timeout=self._linger_s + 5.0)
        self._pipe.close(linger=0)
        if self._worker.is_alive():
            log.error("telemetry thread did not stop; dropping unsent documents")
            self._ctx.destroy(linger=0)
        else:
            self._ctx.term()

    def __enter__(self) -> TelemetryPublisher:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """A run still open is stopped first: "abort" on KeyboardInterrupt, "fail" on another exception."""
        try:
            if self._run_uid is not None and not self._closed and self._worker_error is None:
                if exc_type is None:
                    self.stop("success")
                elif issubclass(exc_type, KeyboardInterrupt):
                    self.stop("abort", "interrupted")
                else:
                    self.stop("fail", f"{exc_type.__name__}: {exc}")
        finally:
            self.close()

    # -- worker side: owns the XPUB, ROUTER and the pipe's receiving end

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self._pipe_out, self._pub, self._router):
            poller.register(sock, zmq.POLLIN)
        next_resend: float | None = None
        try:
            while True:
                wait = None if next_resend is None else max(0.0, next_resend - time.monotonic())
                ready = dict(poller.poll(zmq_ms(wait)))
                if self._pipe_out in ready:
                    frames = self._pipe_out.recv_multipart()
                    if frames == [b"close"]:
                        return
                    self._publish(*frames)
                    if frames[0] == b"start" and self._resend_s:
                        next_resend = time.monotonic() + self._resend_s
                    elif frames[0] == b"stop":
                        next_resend = None
                if self._pub in ready:
                    self._on_subscription(self._pub.recv())
                if self._router in ready:
                    self._answer(self._router.recv_multipart())
                if next_resend is not None and time.monotonic() >= next_resend:
                    for name in ("start", "descriptor"):
                        if name in self._state:
                            self._pub.send_multipart([name.encode(), self._state[name]])
                    next_resend = time.monotonic() + self._resend_s
        except BaseException as e:  # surfaced to the caller on its next publish
            self._worker_error = e
            log.exception("telemetry thread failed")
        finally:
            for sock in (self._pub, self._router, self._pipe_out):
                sock.close()

    def _publish(self, topic: bytes, payload: bytes) -> None:
        name = topic.decode()
        if name == "start":
            self._state.clear()
        self._state[name] = payload
        self._pub.send_multipart([topic, payload])

    def _on_subscription(self, message: bytes) -> None:
        if message[:1] != b"\x01":
            return  # an unsubscription
        with self._subscribed:
            self._subscriptions += 1
            self._subscribed.notify_all()
        if self._welcome:
            for name in DOCUMENT_NAMES:
                if name in self._state:
                    self._pub.send_multipart([name.encode(), self._state[name]])

    def _answer(self, frames: list[bytes]) -> None:
        """Reply to ``{"request": "snapshot", "token": ...}`` with the latest start/descriptor/event/stop."""
        if len(frames) < 2:
            return
        try:
            request = json.loads(frames[-1].decode("utf-8"), parse_constant=_reject_constant)
            if not isinstance(request, dict) or request.get("request") != "snapshot":
                raise ValueError("expected a JSON object {\"request\": \"snapshot\"}")
        except ValueError as e:
            reply = encode_document({"ok": False, "error": f"malformed request {_quote(frames[-1:])}: {e}"})
        else:
            given = request.get("token")
            if self._token is not None and not (isinstance(given, str) and hmac.compare_digest(given.encode(), self._token)):
                log.warning("telemetry snapshot request refused: missing or wrong token")
                reply = encode_document({"ok": False, "error": "refused: missing or wrong token"})
            else:
                reply = b'{"ok":true' + b"".join(b',"%s":%s' % (n.encode(), self._state.get(n, b"null"))
                                                  for n in DOCUMENT_NAMES) + b"}"
        self._router.send_multipart([*frames[:-1], reply])


def _infer_dtype(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    return "string" if isinstance(value, str) else "array"


# ---------------------------------------------------------------- subscriber


class TelemetrySubscriber:
    """Receives and validates a publisher's documents; duplicates (welcome and re-sends) are dropped by default.

    ``timeout_s`` (None: forever) bounds each wait. ``server_public_key`` is the publisher's ``.public_key``
    when it uses CURVE: without it the handshake fails and nothing ever arrives (a TelemetryTimeout).
    """

    def __init__(self, address: str, *, server_public_key: bytes | str | None = None, timeout_s: float | None = 5.0,
                 snapshot_address: str | None = None, token: str | None = None, dedupe: bool = True) -> None:
        self.address, self.snapshot_address, self.timeout_s = address, snapshot_address, timeout_s
        self._key, self._token, self._dedupe = server_public_key, token, dedupe
        self._seen: set[str] = set()  # uids of start, descriptor and stop documents already yielded
        self._last_seq: dict[str, int] = {}  # descriptor uid -> highest seq_num yielded
        self._ctx = zmq.Context()
        try:
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.linger = 0
            self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            _secure_client(self._sub, server_public_key)
            if "[" in address:
                self._sub.ipv6 = True
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.connect(address)
        except zmq.ZMQError as e:
            self._ctx.destroy(linger=0)
            raise TelemetryError(f"cannot connect a telemetry subscriber to {address!r}: {e}") from e

    def receive(self, timeout_s: float | None = None) -> Document | None:
        """The next new document, or None after ``timeout_s`` (None: the instance's timeout_s) without one.

        A malformed message raises TelemetryError (quoting it); the subscriber stays usable afterwards.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._sub.poll(zmq_ms(remaining), zmq.POLLIN):
                return None
            name, doc = decode_message(self._sub.recv_multipart())
            if not self._dedupe or self._is_new(name, doc):
                return name, doc

    def _is_new(self, name: str, doc: dict[str, Any]) -> bool:
        if name == "event":
            if doc["seq_num"] <= self._last_seq.get(doc["descriptor"], 0):
                return False
            self._last_seq[doc["descriptor"]] = doc["seq_num"]
            return True
        if doc["uid"] in self._seen:
            return False
        self._seen.add(doc["uid"])
        return True

    def documents(self, *, until_stop: bool = True) -> Iterator[Document]:
        """Yield documents until a stop (or forever); TelemetryTimeout when ``timeout_s`` passes with none."""
        while True:
            item = self.receive()
            if item is None:
                raise TelemetryTimeout(f"no telemetry from {self.address} within {self.timeout_s} s (publisher "
                                       "gone, wrong address, or a missing/wrong CURVE server key?)")
            yield item
            if until_stop and item[0] == "stop":
                return

    __iter__ = documents

    def snapshot(self, address: str | None = None, *, token: str | None = None,
                 timeout_s: float | None = None) -> dict[str, dict[str, Any] | None]:
        """The publisher's latest start/descriptor/event/stop (see fetch_snapshot); defaults from this instance."""
        target = address or self.snapshot_address
        if target is None:
            raise ValueRangeError("no snapshot address: pass it here or as snapshot_address=")
        return fetch_snapshot(target, token=token or self._token, server_public_key=self._key,
                              timeout_s=self.timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> TelemetrySubscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fetch_snapshot(address: str, *, token: str | None = None, server_public_key: bytes | str | None = None,
                   timeout_s: float | None = 5.0) -> dict[str, dict[str, Any] | None]:
    """Ask a publisher's snapshot socket for ``{"start", "descriptor", "event", "stop"}`` (each None if not sent).

    Uses a DEALER socket (a REQ socket is unusable after a timeout). Raises TelemetryRefused if the publisher
    refuses (wrong token), TelemetryTimeout if nothing answers, TelemetryError for a malformed reply.
    """
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        _secure_client(sock, server_public_key)
        if "[" in address:
            sock.ipv6 = True
        sock.connect(address)
        request: dict[str, Any] = {"request": "snapshot"}
        if token is not None:
            request["token"] = token
        sock.send_multipart([b"", encode_document(request)])  # the empty frame mimics REQ's envelope
        if not sock.poll(zmq_ms(timeout_s), zmq.POLLIN):
            raise TelemetryTimeout(f"no snapshot reply from {address} within {timeout_s} s (publisher gone, wrong "
                                   "address, or a missing/wrong CURVE server key?)")
        frames = sock.recv_multipart()
    except zmq.ZMQError as e:
        raise TelemetryError(f"snapshot request to {address!r} failed: {e}") from e
    finally:
        ctx.destroy(linger=0)
    try:
        if len(frames) != 2 or frames[0] != b"":
            raise ValueError(f"expected 2 frames [b'', json], got {len(frames)}")
        reply = json.loads(frames[1].decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ValueError("reply is not a JSON object with a boolean 'ok'")
    except (UnicodeDecodeError, ValueError) as e:
        raise TelemetryError(f"malformed snapshot reply ({e}): {_quote(frames)}") from e
    if not reply["ok"]:
        raise TelemetryRefused(f"snapshot request to {address} refused: {reply.get('error')!r}")
    out: dict[str, dict[str, Any] | None] = {}
    for name in DOCUMENT_NAMES:
        doc = reply.get(name)
        out[name] = None if doc is None else validate_document(name, doc)
    return out
