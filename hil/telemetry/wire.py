"""The wire: Bluesky's 0MQ message format, endpoints, and CURVE keys.

A message is ONE frame ``b"<prefix> <name> <json>"``, exactly what ``bluesky.callbacks.zmq.Publisher`` sends and
``bluesky.callbacks.zmq.RemoteDispatcher(address, deserializer=json.loads)`` splits, with JSON in place of
pickle (nothing is ever unpickled). Live documents use the prefix ``eqprop-hil``; the late-joiner remedies use
other prefixes (``eqprop-hil.welcome.<id>``, ``eqprop-hil.resend``) that a plain subscriber never receives, so a
``RunRouter`` behind a ``RemoteDispatcher`` sees every document exactly once (see publisher.py).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import pathlib
from typing import Any

import zmq
import zmq.auth

from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.telemetry.documents import DOCUMENT_NAMES, TelemetryError, reject_constant, validate_document

log = logging.getLogger("eqprop_hil.telemetry")

DEFAULT_PREFIX = b"eqprop-hil"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a subscriber refuses larger messages (ZMQ_MAXMSGSIZE) instead of buffering them


def check_prefix(prefix: bytes) -> bytes:
    """Bluesky's rule: bytes without a space (the space separates prefix, name and payload)."""
    if not isinstance(prefix, bytes) or b" " in prefix or not prefix:
        raise ValueRangeError(f"prefix {prefix!r} must be non-empty bytes without b' '")
    return prefix


def encode_message(prefix: bytes, name: str, payload: bytes) -> bytes:
    """``prefix name payload`` as one frame (``payload`` is the document's JSON)."""
    return b" ".join((prefix, name.encode("ascii"), payload))


def quote(frames: list[bytes]) -> str:
    parts = [repr(f[:120]) + (f"...({len(f)} bytes)" if len(f) > 120 else "") for f in frames]
    return "[" + ", ".join(parts) + "]"


def decode_message(frames: list[bytes] | bytes) -> tuple[bytes, str, dict[str, Any]]:
    """One frame ``prefix name json`` -> (prefix, name, validated document); anything else raises TelemetryError
    quoting the bytes."""
    frames = [frames] if isinstance(frames, bytes) else list(frames)
    try:
        if len(frames) != 1:
            raise ValueError(f"{len(frames)} frames, expected 1 (b'prefix name json')")
        parts = frames[0].split(b" ", 2)
        if len(parts) != 3:
            raise ValueError("expected b'prefix name json' separated by spaces")
        prefix, raw_name, payload = parts
        name = raw_name.decode("ascii")
        if name not in DOCUMENT_NAMES:
            raise ValueError(f"unknown document kind {name!r}; expected one of {DOCUMENT_NAMES}")
        doc = json.loads(payload.decode("utf-8"), parse_constant=reject_constant)
        return prefix, name, validate_document(name, doc)
    except (UnicodeDecodeError, ValueError, TelemetryError) as e:
        raise TelemetryError(f"malformed telemetry message ({e}): {quote(frames)}") from e


# ---------------------------------------------------------------- addresses


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


def warn_if_exposed(endpoints: list[str], *, curve: bool, token: bool) -> bool:
    """One warning (logging, which reaches stderr) when a listening socket is reachable from outside this host
    without CURVE or a token; True if any endpoint is off loopback."""
    exposed = [e for e in endpoints if not is_loopback_endpoint(e)]
    if not exposed:
        return False
    missing = [what for what, on in (("CURVE encryption ([telemetry] curve_secret_key_file or "
                                       "--telemetry-curve-key FILE)", curve),
                                      ("a snapshot token (EQPROP_HIL_TELEMETRY_TOKEN or [telemetry] token_file)", token))
               if not on]
    advice = f"; add {' and '.join(missing)}" if missing else " (CURVE and token on)"
    log.warning("telemetry binds %s, which is NOT loopback: anyone on that network can connect%s",
                " and ".join(repr(e) for e in exposed), advice)
    return True


def sibling_endpoint(endpoint: str) -> str:
    """The default snapshot endpoint: the same host on a free port (tcp) or a neighbouring name (ipc/inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp":
        return f"tcp://{rest.rsplit(':', 1)[0]}:0"
    if scheme in ("ipc", "inproc"):
        return f"{endpoint}.snapshot"
    raise ValueRangeError(f"no default snapshot endpoint for {endpoint!r}; pass snapshot_address")


# ---------------------------------------------------------------- CURVE keys


def z85_key(key: bytes | str, what: str) -> bytes:
    """A 40-character Z85 key (or 32 raw bytes, encoded)."""
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    if len(raw) == 32:
        return zmq.utils.z85.encode(raw)
    if len(raw) != 40:
        raise ValueRangeError(f"{what} must be a 40-character Z85 CURVE key (zmq.curve_keypair()) or a key file "
                              f"from zmq.auth.create_certificates, got {len(raw)} bytes")
    return raw


def load_key(value: bytes | str | os.PathLike, what: str, *, secret: bool) -> bytes:
    """A Z85 key given inline, or read from a certificate file written by ``zmq.auth.create_certificates``
    (the files Bluesky's ``curve_config`` uses): ``NAME.key_secret`` for a secret, ``NAME.key`` for a public key."""
    if isinstance(value, (str, os.PathLike)) and pathlib.Path(value).is_file():
        try:
            public, secret_key = zmq.auth.load_certificate(str(value))
        except (OSError, ValueError) as e:
            raise ValueRangeError(f"{what}: cannot read certificate {str(value)!r}: {e}") from e
        if secret and secret_key is None:
            raise ValueRangeError(f"{what}: {str(value)!r} holds no secret key (use the .key_secret file)")
        return z85_key(secret_key if secret else public, what)
    if isinstance(value, os.PathLike):
        raise ValueRangeError(f"{what}: key file {str(value)!r} does not exist")
    return z85_key(value, what)


def secure_client(sock: zmq.Socket, server_public_key: bytes | str | None) -> None:
    """CURVE on a client socket: an ephemeral client identity; the server's public key is what is shared."""
    if server_public_key is not None:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey = load_key(server_public_key, "server_public_key", secret=False)
        sock.curve_publickey, sock.curve_secretkey = public, secret
