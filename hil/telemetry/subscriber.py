"""The subscriber side: receive a run's documents (deduplicated) and fetch a publisher's snapshot.

Bluesky users need none of this: ``RemoteDispatcher(address, deserializer=json.loads)`` consumes the stream
as it is (see docs/scripting.md). This module is what ``hil monitor`` uses; it needs only pyzmq and the
standard library (no torch, no event-model), so it starts fast next to a training process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import zmq

from eqprop_hil.drivers.timeouts import zmq_ms
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.telemetry.documents import Document, TelemetryError, encode_document, reject_constant, validate_document
from eqprop_hil.telemetry.publisher import RESEND, WELCOME
from eqprop_hil.telemetry.wire import DEFAULT_PREFIX, MAX_MESSAGE_BYTES, check_prefix, decode_message, quote, secure_client


class TelemetryTimeout(TelemetryError):
    """Nothing arrived within the timeout: wrong address, publisher gone, or a missing/wrong CURVE key."""


class TelemetryRefused(TelemetryError):
    """The publisher refused a snapshot request (wrong or missing token, malformed request)."""


class TelemetrySubscriber:
    """Receives and validates a publisher's documents; a late joiner is welcomed with the open run's documents.

    Subscribes to the live topic, to its own welcome topic and to the periodic resend; duplicates are dropped by
    uid (start, descriptor, stop) and by (descriptor, seq_num) for events unless ``dedupe=False``.
    ``timeout_s`` (None: forever) bounds each wait. ``server_public_key`` (Z85, or a public ``.key`` file) is the
    publisher's ``.public_key`` when it uses CURVE: without it nothing ever arrives (a TelemetryTimeout).
    """

    def __init__(self, address: str, *, server_public_key: bytes | str | None = None, timeout_s: float | None = 5.0,
                 snapshot_address: str | None = None, token: str | None = None, dedupe: bool = True,
                 prefix: bytes = DEFAULT_PREFIX) -> None:
        self.address, self.snapshot_address, self.timeout_s = address, snapshot_address, timeout_s
        self._key, self._token, self._dedupe = server_public_key, token, dedupe
        self.prefix = check_prefix(prefix)
        self._seen: set[str] = set()  # uids of start, descriptor and stop documents already yielded
        self._last_seq: dict[str, int] = {}  # descriptor uid -> highest seq_num yielded
        self._ctx = zmq.Context()
        try:
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.linger = 0
            self._sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            secure_client(self._sub, server_public_key)
            if "[" in address:
                self._sub.ipv6 = True
            # Welcome first, so a late joiner gets the run's start before the next live event.
            self._sub.setsockopt(zmq.SUBSCRIBE, self.prefix + WELCOME + uuid.uuid4().hex.encode() + b" ")
            self._sub.setsockopt(zmq.SUBSCRIBE, self.prefix + b" ")
            self._sub.setsockopt(zmq.SUBSCRIBE, self.prefix + RESEND + b" ")
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
            _, name, doc = decode_message(self._sub.recv_multipart())
            if not self._dedupe or self.is_new(name, doc):
                return name, doc

    def is_new(self, name: str, doc: dict[str, Any]) -> bool:
        """True the first time a document is seen (and remembers it)."""
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
                 timeout_s: float | None = None) -> list[Document]:
        """The publisher's snapshot (see fetch_snapshot), marked as seen so the stream does not repeat it."""
        target = address or self.snapshot_address
        if target is None:
            raise ValueRangeError("no snapshot address: pass it here or as snapshot_address=")
        docs = fetch_snapshot(target, token=token or self._token, server_public_key=self._key,
                              timeout_s=self.timeout_s if timeout_s is None else timeout_s)
        return [(n, d) for n, d in docs if not self._dedupe or self.is_new(n, d)]

    def close(self) -> None:
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)

    def __enter__(self) -> TelemetrySubscriber:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fetch_snapshot(address: str, *, token: str | None = None, server_public_key: bytes | str | None = None,
                   timeout_s: float | None = 5.0) -> list[Document]:
    """Ask a publisher's snapshot socket for the open (or last) run: ``[(name, doc), ...]`` in order (start,
    descriptors, the last event of each stream, stop if it ended); ``[]`` before any run.

    Feed them to any Bluesky callback (``for name, doc in fetch_snapshot(a): router(name, doc)``). Uses a
    DEALER socket (a REQ socket is unusable after a timeout). Raises TelemetryRefused if the publisher refuses
    (wrong token), TelemetryTimeout if nothing answers, TelemetryError for a malformed reply.
    """
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        secure_client(sock, server_public_key)
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
        reply = json.loads(frames[1].decode("utf-8"), parse_constant=reject_constant)
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ValueError("reply is not a JSON object with a boolean 'ok'")
        if reply["ok"] and not isinstance(reply.get("documents"), list):
            raise ValueError("reply has no 'documents' list")
    except (UnicodeDecodeError, ValueError) as e:
        raise TelemetryError(f"malformed snapshot reply ({e}): {quote(frames)}") from e
    if not reply["ok"]:
        raise TelemetryRefused(f"snapshot request to {address} refused: {reply.get('error')!r}")
    out: list[Document] = []
    for item in reply["documents"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise TelemetryError(f"malformed snapshot reply: item {str(item)[:80]!r} is not [name, document]")
        out.append((item[0], validate_document(item[0], item[1])))
    return out
