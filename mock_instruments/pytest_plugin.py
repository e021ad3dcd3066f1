"""pytest plugin (registered through the ``pytest11`` entry point): emulated instruments for any test suite.

Installed with ``pip install 'eqprop-hil[emulators]'`` (numpy, numba, pyvisa, pyvisa-py, pyserial, pyzmq, cobs; no
torch, matplotlib or scikit-learn), a project's own tests get:

- ``make_analog_board(sizes=(4, 6, 3), device="ideal", seed=0, noise=0.0, faults=None, token=None, **settings)``
  and ``make_fpga_array(..., transport="pty")``: fixture factories that start an emulator on loopback (a TCP
  port, a pty, or ``transport="tcp"`` for ``socket://``) and return it; ``.resource`` is the string to open
  (``pyvisa``'s ``open_resource``, ``serial.serial_for_url``, or ``eqprop_hil.drivers.open_array``), ``.physics``
  its counters. Every emulator a test made is stopped when the test ends.
- ``analog_resource`` / ``fpga_resource``: one emulator's resource string, a 4-6-3 ideal board unless the test
  carries ``@pytest.mark.analog_board(...)`` / ``@pytest.mark.fpga_array(...)`` with the factory's arguments.

``noise`` is the Gaussian read noise on every state, volts; ``device`` the synapse model ("ideal", "constant",
"soft_bounds", "power"); ``faults`` maps fault kinds to probabilities per message (``{"drop": 0.05,
"delay": 0.1, "delay_s": 0.02}``, see ``eqprop_hil.mock_instruments.faults.FaultConfig``); ``settings`` are any
other ``sim://`` query keys (``adc_bits=8``, ``dw_min_c2c=0.3``, ``link_rate=11520``). Bad keys raise at once,
naming the key. The servers are imported lazily: merely having eqprop-hil installed costs a session nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

import pytest

MARKERS = {
    "analog_board": "analog_board(**kwargs): the emulated analog board `analog_resource` starts "
                    "(make_analog_board's arguments)",
    "fpga_array": "fpga_array(**kwargs): the emulated FPGA array `fpga_resource` starts (make_fpga_array's arguments)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", text)


def sim_url(kind: str, *, sizes: Sequence[int] = (4, 6, 3), device: str = "ideal", seed: int = 0,
            noise: float = 0.0, faults: Mapping[str, float] | None = None, **settings: Any) -> str:
    """The ``sim://`` URL of an emulator with these settings (the launcher checks every key and value)."""
    query: dict[str, Any] = {"sizes": ",".join(str(int(n)) for n in sizes), "device": device, "seed": seed}
    if noise:
        query["read_noise"] = noise
    for key, value in (faults or {}).items():
        query[key if key.startswith("fault_") else f"fault_{key}"] = value
    query.update(settings)
    return f"sim://{kind}?" + urlencode({k: _text(v) for k, v in query.items()})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


class _Factory:
    """Starts emulators on demand; stops them all at teardown."""

    def __init__(self, kind: str) -> None:
        self.kind, self.started = kind, []

    def __call__(self, *, token: str | None = None, **kwargs: Any) -> Any:
        from eqprop_hil.mock_instruments.launch import start_emulator

        if self.kind == "fpga":
            kwargs.setdefault("transport", "pty")
        emulator = start_emulator(sim_url(self.kind, **kwargs), token=token)
        self.started.append(emulator)
        return emulator

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


@pytest.fixture
def make_analog_board() -> Iterator[Callable[..., Any]]:
    """Factory of emulated analog boards (SCPI over TCP on loopback); see the module docstring."""
    factory = _Factory("analog")
    yield factory
    factory.stop_all()


@pytest.fixture
def make_fpga_array() -> Iterator[Callable[..., Any]]:
    """Factory of emulated FPGA arrays (COBS frames on a pty, or ``transport="tcp"``); see the module docstring."""
    factory = _Factory("fpga")
    yield factory
    factory.stop_all()


def _marked(request: pytest.FixtureRequest, name: str) -> dict[str, Any]:
    marker = request.node.get_closest_marker(name)
    if marker is not None and marker.args:
        raise pytest.UsageError(f"@pytest.mark.{name} takes keyword arguments only, got {marker.args!r}")
    return {} if marker is None else dict(marker.kwargs)


@pytest.fixture
def analog_resource(request: pytest.FixtureRequest, make_analog_board: Callable[..., Any]) -> str:
    """A running emulated analog board (4-6-3 ideal unless ``@pytest.mark.analog_board(...)``); its VISA resource."""
    return make_analog_board(**_marked(request, "analog_board")).resource


@pytest.fixture
def fpga_resource(request: pytest.FixtureRequest, make_fpga_array: Callable[..., Any]) -> str:
    """A running emulated FPGA array on a pty (4-6-3 ideal unless ``@pytest.mark.fpga_array(...)``); its serial path."""
    return make_fpga_array(**_marked(request, "fpga_array")).resource
