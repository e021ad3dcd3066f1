"""Open a neuron array from the string a user names it by, picking the driver from the form of the string.

- VISA resource strings (``TCPIP0::host::5025::SOCKET``, ``USB0::...::INSTR``, ``GPIB0::12::INSTR``,
  ``ASRL/dev/ttyUSB0::INSTR``, ``ASRLsocket://host:port::INSTR``): an analog board, :class:`AnalogBoard`.
- Serial device paths (``/dev/ttyUSB0``, a pty slave, ``COM3``) and pyserial URLs (``socket://``, ``loop://``,
  ``rfc2217://``, ``spy://``, ``hwgrep://``, ``alt://``): an FPGA array, :class:`FpgaArray`.
- Any other ``scheme://`` is looked up in the entry-point group ``eqprop_hil.schemes``. The handler takes the
  whole string and returns an object with ``.resource`` (a string of one of the forms above) and ``.stop()``.
  ``mock_instruments`` registers ``sim`` there, so ``sim://analog?...`` starts an emulator and connects through
  the real transport and driver while ``drivers`` never imports ``mock_instruments``. Closing the array stops
  what the handler started. A ``token=`` given to :func:`open_array` goes to the driver and, as the keyword
  ``token``, to the scheme handler (so ``sim://`` starts an emulator that requires it).
"""

from __future__ import annotations

import logging
import re
import socket
from importlib.metadata import entry_points
from typing import Any

from eqprop_hil.drivers.errors import DriverError, LinkError
from eqprop_hil.drivers.interface import NeuronArray

log = logging.getLogger(__name__)

SCHEME_GROUP = "eqprop_hil.schemes"

# Interface types of VISA resource names, as pyvisa parses them (board number optional).
_VISA = re.compile(
    r"^((TCPIP|USB|GPIB|VXI|GPIB-VXI|PXI|VICP|FIREWIRE)\d*::.+|ASRL.+::INSTR)$", re.IGNORECASE
)  # ASRL takes a number, a device path or a pyserial URL: ASRL1::INSTR, ASRLsocket://host:port::INSTR
_WINDOWS_PORT = re.compile(r"^COM\d+$", re.IGNORECASE)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# URL schemes pyserial's serial_for_url handles itself (serial.urlhandler.protocol_*).
SERIAL_SCHEMES = ("socket", "loop", "rfc2217", "spy", "hwgrep", "alt", "cp2110")


class ResourceError(DriverError, ValueError):
    """A resource string that names no driver and no registered scheme; the message lists what would work."""


class InstrumentUnreachable(LinkError):
    """Nothing accepted a connection at the resource's address: the instrument was never connected."""


class NotAnInstrument(DriverError):
    """Something answered at the resource's address, but not in this project's protocol (e.g. a web server)."""


_TCPIP_SOCKET = re.compile(r"^TCPIP\d*::([^:]+|\[[^\]]+\])::(\d+)::SOCKET$", re.IGNORECASE)


def probe_tcpip_socket(resource: str, timeout_s: float = 2.0) -> None:
    """Before a driver (with its retries and reconnects) is built on ``TCPIP::host::port::SOCKET``: connect once
    and ask ``*IDN?``, so an address that refuses, or a port that speaks another protocol, gives one clear error.

    An eqprop-hil board answers ``EQPROP-HIL,...`` or, when it requires a token, its ``-203`` refusal line;
    silence within ``timeout_s`` is left for the driver to judge. Raises InstrumentUnreachable or NotAnInstrument.
    """
    match = _TCPIP_SOCKET.match(resource)
    if match is None:
        return
    host, port = match.group(1).strip("[]"), int(match.group(2))
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        raise InstrumentUnreachable(
            f"cannot connect to {resource}: {e.strerror or e} (never connected); check that the instrument is on, "
            f"that {host} is its address and {port} its SCPI port, or start an emulator: hil mock analog") from e
    try:
        with conn:
            conn.sendall(b"*IDN?\n")
            reply = b""
            while b"\n" not in reply and len(reply) < 256:
                chunk = conn.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:  # silence or a reset: the driver's own open decides (and reports) what it is
        return
    line = reply.split(b"\n", 1)[0].strip()
    if not reply or line.upper().startswith(b"EQPROP-HIL,") or line.startswith(b"-203,"):
        return
    what = "a web server (HTTP)" if line.upper().startswith(b"HTTP/") or b"<html" in reply.lower() else "something else"
    raise NotAnInstrument(
        f"{resource} is not an eqprop-hil instrument: it answered *IDN? with {line[:80]!r}, which looks like {what}; "
        "check the port (an eqprop-hil board answers 'EQPROP-HIL,ANALOG-EP-1,...')")


def driver_kind(resource: str) -> str:
    """``"analog"`` (VISA), ``"fpga"`` (serial) or ``"scheme:<name>"`` for a registry scheme; raises otherwise."""
    text = resource.strip()
    if _VISA.match(text):
        return "analog"
    if text.startswith("/dev/") or _WINDOWS_PORT.match(text):
        return "fpga"
    match = _URL.match(text)
    if match:
        scheme = match.group(1).lower()
        return "fpga" if scheme in SERIAL_SCHEMES else f"scheme:{scheme}"
    raise ResourceError(
        f"cannot tell which driver opens {resource!r}: expected a VISA resource (TCPIP0::host::port::SOCKET, "
        f"USB0::...::INSTR, GPIB0::n::INSTR, ASRL...::INSTR), a serial port (/dev/ttyUSB0, COM3), a pyserial URL "
        f"({', '.join(s + '://' for s in SERIAL_SCHEMES)}) or a registered scheme ({_known_schemes_text()})"
    )


def open_array(resource: str, **driver_kwargs: Any) -> NeuronArray:
    """Open the neuron array ``resource`` names, with the driver its form calls for.

    ``driver_kwargs`` go to the driver's constructor (``limits``, ``timeout_s``, ``retries``, ...). For a scheme
    from the registry (``sim://...``) the handler's emulator is stopped when the array is closed, or at once if
    the driver fails to open.
    """
    if not isinstance(resource, str) or not resource.strip():
        raise ResourceError(f"resource must be a non-empty string, got {resource!r}")
    kind = driver_kind(resource)
    if not kind.startswith("scheme:"):
        return _open_driver(kind, resource.strip(), driver_kwargs)
    scheme = kind.removeprefix("scheme:")
    handler = _scheme_handler(scheme)
    token = driver_kwargs.get("token")
    handle = handler(resource.strip()) if token is None else handler(resource.strip(), token=token)
    try:
        target = handle.resource
        target_kind = driver_kind(target)
        if target_kind.startswith("scheme:"):
            raise ResourceError(f"scheme {scheme!r} handed back {target!r}, which is not a driver resource")
        log.info("%s started, connecting to %s", resource, target)
        array = _open_driver(target_kind, target, driver_kwargs)
    except BaseException:
        handle.stop()
        raise
    add = getattr(array, "add_close_callback", None)
    if add is None:
        array.close()
        handle.stop()
        raise DriverError(
            f"{type(array).__name__} has no add_close_callback, so closing it could not stop what {scheme}:// "
            f"started; the driver should inherit eqprop_hil.drivers.lifecycle.CloseCallbacks"
        )
    add(handle.stop)
    return array


def _open_driver(kind: str, resource: str, kwargs: dict[str, Any]) -> NeuronArray:
    if kind == "analog":
        from eqprop_hil.drivers.analog_board import AnalogBoard

        probe_tcpip_socket(resource, float(kwargs.get("timeout_s") or 2.0))

        return AnalogBoard(resource, **kwargs)
    from eqprop_hil.drivers.fpga_array import FpgaArray

    return FpgaArray(resource, **kwargs)


def registered_schemes() -> dict[str, Any]:
    """Scheme name -> entry point, for every handler installed in the ``eqprop_hil.schemes`` group."""
    return {ep.name.lower(): ep for ep in entry_points(group=SCHEME_GROUP)}


def _known_schemes_text() -> str:
    names = sorted(registered_schemes())
    return ", ".join(f"{n}://" for n in names) if names else "none installed"


def _scheme_handler(scheme: str) -> Any:
    schemes = registered_schemes()
    entry = schemes.get(scheme)
    if entry is None:
        raise ResourceError(
            f"unknown resource scheme {scheme + '://'!r}; registered schemes: {_known_schemes_text()}; serial URL "
            f"schemes: {', '.join(s + '://' for s in SERIAL_SCHEMES)}; or use a VISA resource string"
        )
    try:
        return entry.load()
    except Exception as e:
        raise ResourceError(f"the handler of {scheme}:// ({entry.value}) failed to load: {e}") from e
