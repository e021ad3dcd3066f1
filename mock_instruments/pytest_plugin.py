"""pytest plugin (registered through the ``pytest11`` entry point): fixtures that start an emulated
instrument on loopback and hand the test its resource string, so users' own suites can test against it.

The fixtures import the servers lazily, so merely having eqprop-hil installed costs a test session nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def analog_resource() -> Iterator[str]:
    """A running emulated analog board (ideal devices, small network); yields its VISA resource string."""
    from eqprop_hil.mock_instruments.launch import start_emulator

    with start_emulator("sim://analog?sizes=4,6,3&device=ideal&seed=0") as emulator:
        yield emulator.resource


@pytest.fixture
def fpga_resource() -> Iterator[str]:
    """A running emulated FPGA array on a pty (ideal devices, small network); yields the serial device path."""
    from eqprop_hil.mock_instruments.launch import start_emulator

    with start_emulator("sim://fpga?sizes=4,6,3&device=ideal&seed=0&transport=pty") as emulator:
        yield emulator.resource
