"""open_array's choice of driver, the scheme registry, and the close callbacks that stop what a scheme started."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.errors import DriverError
from eqprop_hil.drivers.lifecycle import CloseCallbacks
from eqprop_hil.drivers.open import ResourceError, driver_kind, registered_schemes


@pytest.mark.parametrize(
    ("resource", "kind"),
    [
        ("TCPIP0::127.0.0.1::5025::SOCKET", "analog"),
        ("TCPIP::10.0.0.7::inst0::INSTR", "analog"),
        ("USB0::0x0957::0x1796::MY123::INSTR", "analog"),
        ("GPIB0::12::INSTR", "analog"),
        ("ASRL/dev/ttyUSB0::INSTR", "analog"),
        ("ASRLsocket://127.0.0.1:5000::INSTR", "analog"),
        ("/dev/ttyUSB0", "fpga"),
        ("/dev/pts/7", "fpga"),
        ("COM3", "fpga"),
        ("socket://127.0.0.1:5000", "fpga"),
        ("loop://", "fpga"),
        ("rfc2217://host:2217", "fpga"),
        ("spy://socket://127.0.0.1:5000", "fpga"),
        ("sim://analog?sizes=4,6,3", "scheme:sim"),
        ("SIM://fpga", "scheme:sim"),
    ],
)
def test_driver_kind_follows_the_form_of_the_resource(resource: str, kind: str) -> None:
    assert driver_kind(resource) == kind


def test_sim_is_registered_by_mock_instruments() -> None:
    assert registered_schemes()["sim"].value == "eqprop_hil.mock_instruments.launch:open_sim"


@pytest.mark.parametrize("resource", ["software", "ttyUSB0", "", "   ", "TCPIP0"])
def test_unrecognised_resource_strings_say_what_would_work(resource: str) -> None:
    with pytest.raises(ResourceError) as info:
        open_array(resource)
    text = str(info.value)
    assert repr(resource) in text
    if resource.strip():
        assert "TCPIP0::host::port::SOCKET" in text and "socket://" in text and "sim://" in text


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ResourceError) as info:
        open_array("nosuch://device?x=1")
    text = str(info.value)
    assert "'nosuch://'" in text and "sim://" in text and "loop://" in text
    assert isinstance(info.value, DriverError) and isinstance(info.value, ValueError)


@pytest.fixture
def fake_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a second scheme ``fake://`` through real package metadata (a dist-info on sys.path)."""
    dist = tmp_path / "fake_scheme-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-scheme\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[eqprop_hil.schemes]\nfake = fake_scheme_handler:open_fake\n")
    (tmp_path / "fake_scheme_handler.py").write_text(
        textwrap.dedent(
            """
            from urllib.parse import urlsplit

            stopped = []

            class Handle:
                def __init__(self, resource):
                    self.resource = resource
                def stop(self):
                    stopped.append(self.resource)

            def open_fake(url):
                # fake://<resource to hand back>, e.g. fake://socket://127.0.0.1:9
                return Handle(url[len("fake://"):])
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield importlib.import_module("fake_scheme_handler")
    sys.modules.pop("fake_scheme_handler", None)


def test_a_scheme_that_hands_back_another_scheme_is_refused_and_stopped(fake_scheme) -> None:
    assert "fake" in registered_schemes()
    with pytest.raises(ResourceError, match="not a driver resource"):
        open_array("fake://sim://fpga")
    assert fake_scheme.stopped == ["sim://fpga"]


def test_a_driver_that_fails_to_open_stops_what_the_scheme_started(fake_scheme) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on: bind, note the port, close
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(Exception):
        open_array(f"fake://socket://127.0.0.1:{port}", timeout_s=0.2, retries=0)
    assert fake_scheme.stopped == [f"socket://127.0.0.1:{port}"]


class _Link(CloseCallbacks):
    def __init__(self, fail: bool = False) -> None:
        self.log: list[str] = []
        self.fail = fail

    def close(self) -> None:
        self.log.append("link closed")
        if self.fail:
            raise OSError("port vanished")


def test_close_callbacks_run_once_after_the_link_is_released_last_in_first_out() -> None:
    link = _Link()
    link.add_close_callback(lambda: link.log.append("first registered"))
    link.add_close_callback(lambda: link.log.append("second registered"))
    link.close()
    link.close()
    assert link.log == ["link closed", "second registered", "first registered", "link closed"]


def test_close_callbacks_run_even_when_close_raises_and_subclasses_stay_wrapped_once() -> None:
    link = _Link(fail=True)
    link.add_close_callback(lambda: link.log.append("emulator stopped"))
    with pytest.raises(OSError):
        link.close()
    assert link.log == ["link closed", "emulator stopped"]

    class Child(_Link):
        def close(self) -> None:
            self.log.append("child")
            super().close()

    child = Child()
    child.add_close_callback(lambda: child.log.append("stopped"))
    child.close()
    assert child.log == ["child", "link closed", "stopped"]
    with pytest.raises(TypeError):
        child.add_close_callback("not callable")  # type: ignore[arg-type]


def test_a_close_inherited_from_a_base_listed_before_the_mixin_is_wrapped_too() -> None:
    class Base:
        def __init__(self) -> None:
            self.log: list[str] = []

        def close(self) -> None:
            self.log.append("link closed")

    class Driver(Base, CloseCallbacks):
        """A driver whose close the mixin wraps."""

    driver = Driver()
    driver.add_close_callback(lambda: driver.log.append("stopped"))
    driver.close()
    assert driver.log == ["link closed", "stopped"]
