"""Start an emulated instrument from a ``sim://`` URL and hand back the real resource string to connect to.

``sim://analog?sizes=64,256,10&device=soft_bounds&seed=1`` starts an SCPI server on loopback TCP and yields
``TCPIP0::127.0.0.1::PORT::SOCKET``; ``sim://fpga?transport=pty&link_rate=11520`` starts the framed serial
device on a pty (or ``transport=tcp``: a ``socket://`` URL). The caller then talks to it through the real
transport and the real driver, exactly as to hardware.

:func:`open_sim` is registered under the entry-point group ``eqprop_hil.schemes`` (name ``sim``), which is how
``eqprop_hil.drivers.open_array`` reaches the emulator without ``drivers`` ever importing ``mock_instruments`` (the way
pyserial finds its URL handlers by name).

The query keys are those of ``ArrayConfig.from_query`` (the physics), the ``fault_*`` keys of
:class:`~eqprop_hil.mock_instruments.faults.FaultConfig`, and the server keys in :data:`SERVER_KEYS`. Every key is
checked: a misspelt one raises :class:`ValueRangeError` naming it rather than being silently ignored.
``link_rate`` is in bytes per second; ``sizes`` defaults to :data:`DEFAULT_SIZES`; the faults take the
physics' ``seed`` unless ``fault_seed`` is given.

``process=own`` (either kind) runs the emulator in a process of its own instead of a server thread of the
caller's: the emulator's physics and the controller then no longer share one interpreter lock, which is what a
real instrument looks like to the host (benchmarks/hil.py measures both). It still listens on loopback (or its
pty), and it stops when the caller stops it, closes the pipe it was started with, or dies.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import json
import select
import signal
import subprocess
import sys

from eqprop_hil.mock_instruments.faults import QUERY_PREFIX, FaultConfig
from eqprop_hil.protocols.errors import ValueRangeError

Kind = Literal["analog", "fpga"]
KINDS: tuple[str, ...] = ("analog", "fpga")

# Query keys read by the server of each kind (the rest of the query belongs to the physics and the faults).
SERVER_KEYS: dict[str, tuple[str, ...]] = {
    "analog": ("serial",),
    "fpga": ("transport", "link_rate", "serial"),
}

# Where the emulator runs: a server thread of the caller's process (default) or a process of its own.
PROCESS_KEY = "process"
PROCESS_VALUES = ("thread", "own")
CHILD_START_TIMEOUT_S = 60.0  # a cold start imports numpy and the physics: seconds on a busy machine

# The network an emulator is wired as when the settings name none: the 8x8 digits default of ``hil train``.
DEFAULT_SIZES = "64,256,10"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1): nothing off this machine can connect."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_sim_url(url: str) -> tuple[Kind, Any, FaultConfig, dict[str, Any]]:
    """Split a ``sim://KIND?key=value&...`` URL into (kind, ArrayConfig, FaultConfig, server options).

    The server options are keyword arguments of the server's constructor (``serial`` for the analog board,
    ``transport`` and ``link_rate_bytes_per_s`` for the FPGA). Raises :class:`ValueRangeError` naming the
    offending part for anything that is not understood.
    """
    parts = urlsplit(url.strip())
    if parts.scheme != "sim":
        raise ValueRangeError(f"not a sim:// URL: {url!r}")
    kind = parts.netloc.lower()
    if kind not in KINDS:
        raise ValueRangeError(f"unknown emulator kind {parts.netloc!r} in {url!r}; use sim://analog or sim://fpga")
    if parts.path not in ("", "/") or parts.fragment:
        raise ValueRangeError(f"sim:// URL {url!r} has a path or fragment; settings go in the query (?key=value)")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise ValueRangeError(f"malformed query {parts.query!r} in {url!r}: expected key=value pairs joined by &") from e
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise ValueRangeError(f"query key {key!r} given twice in {url!r}")
        params[key] = value
    where = params.pop(PROCESS_KEY, "thread")  # where it runs, not what it is (see open_sim)
    if where not in PROCESS_VALUES:
        raise ValueRangeError(f"{PROCESS_KEY}={where!r}: use {' or '.join(PROCESS_VALUES)}")
    return parse_params(kind, params)  # type: ignore[arg-type]


def split_process(url: str) -> tuple[str, str]:
    """``(url without the process key, "thread" | "own")``; the URL itself is checked by :func:`parse_sim_url`."""
    parts = urlsplit(url.strip())
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return url, "thread"  # parse_sim_url reports the malformed query
    where = [v for k, v in pairs if k == PROCESS_KEY]
    if len(where) > 1:
        raise ValueRangeError(f"query key {PROCESS_KEY!r} given twice in {url!r}")
    if where and where[0] not in PROCESS_VALUES:
        raise ValueRangeError(f"{PROCESS_KEY}={where[0]!r}: use {' or '.join(PROCESS_VALUES)}")
    rest = urlencode([(k, v) for k, v in pairs if k != PROCESS_KEY])
    return parts._replace(query=rest).geturl(), (where[0] if where else "thread")


def parse_params(kind: Kind, params: Mapping[str, str]) -> tuple[Kind, Any, FaultConfig, dict[str, Any]]:
    """The URL-free core of :func:`parse_sim_url`, shared with the ``hil mock`` command line."""
    from eqprop_hil.mock_instruments.physics import ArrayConfig

    if kind not in KINDS:
        raise ValueRangeError(f"unknown emulator kind {kind!r}; use one of {', '.join(KINDS)}")
    server_keys = SERVER_KEYS[kind]
    other_kind_keys = {k for other, keys in SERVER_KEYS.items() if other != kind for k in keys} - set(server_keys)
    misplaced = sorted(other_kind_keys & set(params))
    if misplaced:
        raise ValueRangeError(f"key(s) {', '.join(misplaced)} do not apply to the {kind} emulator")
    fault_params = {k: v for k, v in params.items() if k.startswith(QUERY_PREFIX)}
    server_params = {k: v for k, v in params.items() if k in server_keys}
    physics_params = {k: v for k, v in params.items() if k not in fault_params and k not in server_params}
    physics_params.setdefault("sizes", DEFAULT_SIZES)
    config = ArrayConfig.from_query(physics_params)
    faults = FaultConfig.from_query(fault_params)
    if QUERY_PREFIX + "seed" not in fault_params:
        # One seed makes the whole emulator reproducible unless the faults are given their own.
        faults = replace(faults, seed=int(config.seed))
    return kind, config, faults, _server_options(kind, server_params)


def _server_options(kind: str, params: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "serial" in params:  # the identity's serial number; each server has its own default
        serial = params["serial"]
        if not serial or not serial.isprintable() or any(c in serial for c in ',;"\'\n'):
            raise ValueRangeError(f"serial={serial!r}: a non-empty printable string without , ; or quotes")
        options["serial"] = serial
    if kind == "analog":
        return options
    transport = params.get("transport", "pty")
    if transport not in ("pty", "tcp"):
        raise ValueRangeError(f"transport={transport!r}: use pty or tcp")
    if transport == "pty" and not hasattr(os, "openpty"):
        raise ValueRangeError("transport=pty needs a POSIX system (os.openpty); use transport=tcp")
    options.update(transport=transport, link_rate_bytes_per_s=None)
    if "link_rate" in params:
        raw = params["link_rate"]
        try:
            rate = float(raw)
        except ValueError as e:
            raise ValueRangeError(f"link_rate={raw!r} is not a number (bytes per second)") from e
        if not (math.isfinite(rate) and rate > 0):
            raise ValueRangeError(f"link_rate={raw!r}: bytes per second must be finite and > 0")
        options["link_rate_bytes_per_s"] = rate
    return options


class Emulator:
    """A running emulated instrument: its server, its physics and the resource string to connect to.

    A context manager; :meth:`stop` is idempotent and is what ``eqprop_hil.drivers.open_array`` calls when the array
    it opened on this emulator is closed.
    """

    def __init__(self, kind: Kind, server: Any, physics: Any, resource: str, faults: FaultConfig) -> None:
        self.kind = kind
        self.server = server
        self.physics = physics
        self.resource = resource
        self.faults = faults
        self._stopped = False

    def stop(self) -> None:
        """Stop serving and release the port or pty. Safe to call more than once."""
        if not self._stopped:
            self._stopped = True
            self.server.stop()

    @property
    def running(self) -> bool:
        return not self._stopped

    def __enter__(self) -> "Emulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Emulator {self.kind} {self.resource!r} {state}>"


def start_emulator(url: str, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> Emulator:
    """Start the emulator a ``sim://`` URL describes; ``port=0`` picks a free port (ignored for a pty).

    ``token``: clients must authenticate with it first (protocols/analog_board.md 1.1, fpga_serial.md 7.1).
    """
    kind, config, faults, options = parse_sim_url(url)
    return start_parsed(kind, config, faults, options, host=host, port=port, token=token)


def start_parsed(
    kind: Kind, config: Any, faults: FaultConfig, options: Mapping[str, Any], host: str = "127.0.0.1", port: int = 0,
    token: str | None = None,
) -> Emulator:
    """Build the physics and the server from parsed settings and start serving (``token``: see start_emulator)."""
    from eqprop_hil.mock_instruments.physics import ArrayPhysics

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueRangeError(f"port {port!r} outside 0..65535 (0 picks a free port)")
    if options.get("transport") == "pty" and port != 0:
        raise ValueRangeError(f"port {port} given for a pty emulator; ports apply to transport=tcp")
    physics = ArrayPhysics(config)
    fault_arg = faults if faults.enabled else None
    if kind == "analog":
        from eqprop_hil.mock_instruments.analog_server import AnalogServer

        server = AnalogServer(physics, host=host, port=port, faults=fault_arg, token=token, **options)
    else:
        from eqprop_hil.mock_instruments.fpga_server import FpgaServer

        server = FpgaServer(physics, host=host, port=port, faults=fault_arg, token=token, **options)
    try:
        resource = server.start()
    except OSError as e:  # the port is taken, the host is not an interface of this machine, no pty left
        raise ValueRangeError(f"cannot start the {kind} emulator on {host}:{port}: {e}") from e
    return Emulator(kind, server, physics, resource, faults)


def open_sim(url: str, token: str | None = None) -> "Emulator | ChildEmulator":
    """Entry point of the ``sim`` scheme (group ``eqprop_hil.schemes``): start on loopback, return the emulator.

    The caller connects to ``.resource`` with the real driver and calls ``.stop()`` when done. ``open_array``
    passes its ``token=`` here, so the emulator requires the token the driver gives. ``process=own``: in a
    process of its own (:class:`ChildEmulator`).
    """
    url, where = split_process(url)
    if where == "own":
        return start_child(url, token=token)
    return start_emulator(url, token=token)


class ChildEmulator:
    """An emulator serving from a process of its own (``process=own``); the same ``resource`` / ``stop()`` /
    ``running`` as :class:`Emulator`, without in-process access to its physics.

    The child reads its settings from a pipe (the token never appears on a command line), ignores the terminal's
    Ctrl-C (the trainer's first Ctrl-C must still reach a live instrument to leave it safe) and serves until the
    pipe closes: :meth:`stop`, or the death of the process that started it, ends it.
    """

    def __init__(self, kind: str, proc: subprocess.Popen, resource: str) -> None:
        self.kind, self.proc, self.resource = kind, proc, resource
        self.physics = None  # in another process: reach it through the driver, as a real instrument
        self._stopped = False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the pipe (the child stops serving and exits), wait for it; kill it if it does not exit."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    @property
    def running(self) -> bool:
        return not self._stopped and self.proc.poll() is None

    def __enter__(self) -> "ChildEmulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ChildEmulator {self.kind} {self.resource!r} pid {self.proc.pid} {'running' if self.running else 'stopped'}>"


def start_child(url: str, token: str | None = None, timeout_s: float = CHILD_START_TIMEOUT_S) -> ChildEmulator:
    """Start the emulator ``url`` describes in a process of its own (on loopback or a pty) and return once it
    serves. The URL is checked here first, so a bad one fails with the same message as in-process."""
    kind, _, _, _ = parse_sim_url(url)
    proc = subprocess.Popen([sys.executable, "-m", "eqprop_hil.mock_instruments.launch"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write((json.dumps({"url": url, "token": token}) + "\n").encode())
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if not line.startswith("OK "):
        proc.kill()
        proc.wait()
        why = line.removeprefix("ERR ") if line else f"no answer within {timeout_s:g} s (exit code {proc.returncode})"
        raise ValueRangeError(f"cannot start the {kind} emulator in its own process: {why}")
    return ChildEmulator(kind, proc, line[3:])


def _child_main() -> int:
    """The child of :func:`start_child`: settings from stdin, ``OK <resource>`` (or ``ERR <why>``) on stdout,
    serve until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request = json.loads(sys.stdin.readline())
    try:
        emulator = start_emulator(request["url"], token=request.get("token"))
    except Exception as e:  # reported to the parent, which raises it as its own error
        print(f"ERR {type(e).__name__}: {e}".replace("\n", " "), flush=True)
        return 1
    try:
        print(f"OK {emulator.resource}", flush=True)
        while sys.stdin.buffer.read(4096):  # the lifeline: EOF when the parent stops us or dies
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
