"""The publisher: a run's documents on a ZeroMQ XPUB socket, in Bluesky's wire format, with late-joiner remedies.

PUB/SUB drops whatever was sent before a subscriber joined (the slow joiner), so a late ``hil monitor`` would
never learn the run's name or config. The remedies, none of which shows a document twice to a plain subscriber:

- welcome: the XPUB runs in manual mode (``ZMQ_XPUB_MANUAL``) and sees every subscription. A subscriber that
  subscribes to its own topic ``eqprop-hil.welcome.<id>`` gets, on that topic only, the open run's start, its
  descriptors, the last event of each stream and the stop; nobody else receives that burst.
- resend: start and descriptors are repeated every ``resend_start_every_s`` on the topic ``eqprop-hil.resend``,
  for subscribers that ask for it.
- snapshot: a ROUTER socket answers ``{"request": "snapshot", "token": ...}`` with the same documents.

A plain subscription to everything (``b""``, as ``RemoteDispatcher`` makes) is registered as the live topic
``b"eqprop-hil "``: it gets each live document exactly once, so a ``RunRouter`` behind it never sees a start
twice. :class:`eqprop_hil.telemetry.TelemetrySubscriber` uses all three remedies and drops duplicates by uid.

All sockets belong to one background thread (ZeroMQ sockets are not thread-safe); ``publish`` only encodes the
document (so encoding errors surface in the caller) and hands the bytes over an inproc pipe.
Security: loopback by default, one warning for anything else; optional CURVE on both sockets (subscribers need
the server's public key) and an optional shared token on snapshot requests.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import zmq

from eqprop_hil.drivers.timeouts import zmq_ms
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.telemetry.documents import DOCUMENT_NAMES, RunDocuments, TelemetryError, encode_document, reject_constant
from eqprop_hil.telemetry.wire import (DEFAULT_PREFIX, check_prefix, encode_message, load_key, quote, sibling_endpoint,
                                       warn_if_exposed)

log = logging.getLogger("eqprop_hil.telemetry")

WELCOME = b".welcome."
RESEND = b".resend"


class TelemetryPublisher:
    """Publishes documents; a Bluesky callback itself (``publisher(name, doc)``), plus a run composer.

    Either hand it documents composed elsewhere (``RunDocuments(sinks=[publisher])``, or subscribe it to a
    RunEngine: ``RE.subscribe(publisher)``), or use its own ``start`` -> ``describe`` -> ``event`` -> ``stop``.
    ``address`` is bound (port 0 picks a free port; read ``.address``); ``snapshot_address`` defaults to the same
    host on another free port (``.snapshot_address``). ``curve_secret_key`` (Z85, or a ``.key_secret`` file
    from ``zmq.auth.create_certificates``) turns on CURVE for both sockets: give subscribers ``.public_key``.
    ``token`` is required in snapshot requests. ``linger_s`` bounds how long close() waits to flush.
    """

    def __init__(self, address: str = "tcp://127.0.0.1:0", *, resend_start_every_s: float | None = 2.0,
                 curve_secret_key: bytes | str | os.PathLike | None = None, token: str | None = None,
                 snapshot_address: str | None = None, welcome_subscribers: bool = True, linger_s: float = 1.0,
                 prefix: bytes = DEFAULT_PREFIX) -> None:
        if resend_start_every_s is not None and not resend_start_every_s > 0:
            raise ValueRangeError(f"resend_start_every_s={resend_start_every_s!r}: must be > 0 s, or None to disable")
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueRangeError("token must be a non-empty string, or None for no token")
        if not 0 <= linger_s <= 60:
            raise ValueRangeError(f"linger_s={linger_s!r}: must be within 0..60 s")
        self.prefix = check_prefix(prefix)
        self._live_topic = self.prefix + b" "
        self._secret = None if curve_secret_key is None else load_key(curve_secret_key, "curve_secret_key", secret=True)
        self.public_key: bytes | None = None if self._secret is None else zmq.curve_public(self._secret)
        self._token = None if token is None else token.encode()
        self._resend_s, self._welcome, self._linger_s = resend_start_every_s, welcome_subscribers, linger_s
        self._lock = threading.Lock()  # caller side: the composer and the pipe's sending end
        self._subscribed = threading.Condition()
        self._subscriptions = 0
        self._closed = False
        self._worker_error: BaseException | None = None
        self._run = RunDocuments(sinks=[self._send])
        self._ctx = zmq.Context()
        try:
            self._pub, self.address = self._bind(zmq.XPUB, address)
            self._router, self.snapshot_address = self._bind(zmq.ROUTER, snapshot_address or sibling_endpoint(self.address))
            pipe = f"inproc://telemetry-{uuid.uuid4().hex}"
            self._pipe = self._ctx.socket(zmq.PAIR)
            self._pipe.bind(pipe)
            self._pipe_out = self._ctx.socket(zmq.PAIR)
            self._pipe_out.connect(pipe)
        except BaseException:
            self._ctx.destroy(linger=0)
            raise
        warn_if_exposed([self.address, self.snapshot_address], curve=self._secret is not None,
                        token=self._token is not None)
        # worker-owned: the open run's documents, as payload bytes
        self._start: bytes | None = None
        self._descriptors: dict[str, bytes] = {}  # descriptor uid -> payload, in order
        self._last_events: dict[str, bytes] = {}  # descriptor uid -> its latest event's payload
        self._stop: bytes | None = None
        self._worker = threading.Thread(target=self._serve, name="telemetry-publisher", daemon=True)
        self._worker.start()
        log.info("telemetry on %s (snapshot %s, curve %s, token %s)", self.address, self.snapshot_address,
                 "on" if self._secret else "off", "on" if self._token else "off")

    def _bind(self, kind: int, address: str) -> tuple[zmq.Socket, str]:
        sock = self._ctx.socket(kind)
        sock.linger = zmq_ms(self._linger_s)
        if self._secret is not None:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self._secret, self.public_key, True
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.XPUB_MANUAL, 1)  # every (un)subscription comes up; we decide what it registers
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
        """How many live subscriptions have reached the publisher so far (CURVE rejects never count)."""
        with self._subscribed:
            return self._subscriptions

    def wait_for_subscribers(self, count: int = 1, timeout_s: float | None = 5.0) -> bool:
        """Block until ``count`` subscriptions have arrived (a run that must not start unwatched); False on timeout."""
        with self._subscribed:
            return self._subscribed.wait_for(lambda: self._subscriptions >= count, timeout_s)

    def __call__(self, name: str, doc: Mapping[str, Any]) -> None:
        """Publish one document composed elsewhere (a Bluesky callback: ``RE.subscribe(publisher)``)."""
        with self._lock:
            self._send(name, doc)

    publish = __call__

    def start(self, run_name: str, config: Any = None, instrument: Any = None, **metadata: Any) -> str:
        """Open a run (see :meth:`RunDocuments.start`); returns its uid."""
        with self._lock:
            return self._run.start(run_name, config=config, instrument=instrument, **metadata)

    def describe(self, data_keys: Mapping[str, Mapping[str, Any]], *, name: str = "primary",
                 hint_fields: list[str] | None = None) -> str:
        """Declare a stream (``{key: {"dtype", "shape", "units", "source"}}``); returns the descriptor uid."""
        with self._lock:
            return self._run.describe(name, data_keys, hint_fields=hint_fields)

    def event(self, data: Mapping[str, Any], stream: str = "primary") -> int:
        """Publish one event of ``stream`` (described from the first event if not declared); returns its seq_num."""
        with self._lock:
            return self._run.event(data, stream)

    def stop(self, exit_status: str = "success", reason: str = "") -> None:
        """Close the run: ``exit_status`` is "success", "abort" (user stop) or "fail" (error, with ``reason``)."""
        with self._lock:
            self._run.stop(exit_status, reason)

    @property
    def run_open(self) -> bool:
        return self._run.run_open

    def _send(self, name: str, doc: Mapping[str, Any]) -> None:  # caller holds self._lock
        if name not in DOCUMENT_NAMES:
            raise TelemetryError(f"document kind {name!r} is not published; expected one of {DOCUMENT_NAMES}")
        if self._closed:
            raise TelemetryError(f"telemetry publisher {self.address} is closed; {name} document not sent")
        if self._worker_error is not None:
            raise TelemetryError(f"telemetry thread died: {self._worker_error!r}") from self._worker_error
        ref = doc.get("descriptor", doc.get("uid", "")) if name == "event" else doc.get("uid", "")
        self._pipe.send_multipart([name.encode(), str(ref).encode(), encode_document(doc)])

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
            if self._run.run_open and not self._closed and self._worker_error is None:
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
                # Everything the caller published so far goes out (and into the state) before a subscription
                # or a snapshot request is answered, so neither ever misses a document published before it.
                while self._pipe_out in ready or self._pipe_out.poll(0):
                    ready.pop(self._pipe_out, None)
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
                    self._replay(self.prefix + RESEND, with_events=False)
                    next_resend = time.monotonic() + self._resend_s
        except BaseException as e:  # surfaced to the caller on its next publish
            self._worker_error = e
            log.exception("telemetry thread failed")
        finally:
            for sock in (self._pub, self._router, self._pipe_out):
                sock.close()

    def _publish(self, name_b: bytes, ref: bytes, payload: bytes) -> None:
        name, key = name_b.decode(), ref.decode()
        if name == "start":
            self._start, self._stop = payload, None
            self._descriptors.clear()
            self._last_events.clear()
        elif name == "descriptor":
            self._descriptors[key] = payload
        elif name == "event":
            self._last_events[key] = payload
        elif name == "stop":
            self._stop = payload
        self._pub.send(encode_message(self.prefix, name, payload))

    def _documents(self, with_events: bool = True) -> list[tuple[str, bytes]]:
        """The open (or last) run as (name, payload): start, descriptors, last event per stream, stop."""
        if self._start is None:
            return []
        docs = [("start", self._start)] + [("descriptor", p) for p in self._descriptors.values()]
        if with_events:
            docs += [("event", p) for p in self._last_events.values()]
        return docs + ([("stop", self._stop)] if self._stop is not None and with_events else [])

    def _replay(self, topic: bytes, with_events: bool = True) -> None:
        for name, payload in self._documents(with_events):
            self._pub.send(encode_message(topic, name, payload))

    def _on_subscription(self, message: bytes) -> None:
        """Manual XPUB: register what a subscription should get, and welcome a subscriber on its own topic."""
        subscribe, topic = message[:1] == b"\x01", message[1:]
        if self._live_topic.startswith(topic):
            topic = self._live_topic  # b"" (everything) means the live documents, never the replays
        self._pub.setsockopt(zmq.SUBSCRIBE if subscribe else zmq.UNSUBSCRIBE, topic)
        if not subscribe:
            return
        if topic == self._live_topic:
            with self._subscribed:
                self._subscriptions += 1
                self._subscribed.notify_all()
        elif self._welcome and topic.startswith(self.prefix + WELCOME):
            self._replay(topic.rstrip(b" "))

    def _answer(self, frames: list[bytes]) -> None:
        """Reply to ``{"request": "snapshot", "token": ...}`` with ``{"ok": true, "documents": [[name, doc]...]}``."""
        if len(frames) < 2:
            return
        try:
            request = json.loads(frames[-1].decode("utf-8"), parse_constant=reject_constant)
            if not isinstance(request, dict) or request.get("request") != "snapshot":
                raise ValueError("expected a JSON object {\"request\": \"snapshot\"}")
        except (UnicodeDecodeError, ValueError) as e:
            reply = encode_document({"ok": False, "error": f"malformed request {quote(frames[-1:])}: {e}"})
        else:
            given = request.get("token")
            if self._token is not None and not (isinstance(given, str) and hmac.compare_digest(given.encode(), self._token)):
                log.warning("telemetry snapshot request refused: missing or wrong token")
                reply = encode_document({"ok": False, "error": "refused: missing or wrong token"})
            else:
                docs = b",".join(b'["%s",%s]' % (n.encode(), p) for n, p in self._documents())
                reply = b'{"ok":true,"documents":[' + docs + b"]}"
        self._router.send_multipart([*frames[:-1], reply])
