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
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from eqprop_hil.mock_instruments.faults import QUERY_PREFIX, FaultConfig
from eqprop_hil.protocols.errors import ValueRangeError

Kind = Literal["analog", "fpga"]
KINDS: tuple[str, ...] = ("analog", "fpga")

# Query keys read by the server of each kind (the rest of the query belongs to the physics and the faults).
SERVER_KEYS: dict[str, tuple[str, ...]] = {
    "analog": ("serial",),
    "fpga": ("transport", "link_rate", "serial"),
}

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
    return parse_params(kind, params)  # type: ignore[arg-type]


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


def open_sim(url: str, token: str | None = None) -> Emulator:
    """Entry point of the ``sim`` scheme (group ``eqprop_hil.schemes``): start on loopback, return the emulator.

    The caller connects to ``.resource`` with the real driver and calls ``.stop()`` when done. ``open_array``
    passes its ``token=`` here, so the emulator requires the token the driver gives.
    """
    return start_emulator(url, token=token)
