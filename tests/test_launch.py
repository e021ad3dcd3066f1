"""Emulators started from sim:// URLs, from the command line and from the pytest plugin, reached through the real
transports and drivers (pyvisa-py over TCP, pyserial over a pty and socket://)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.mock_instruments import cli
from eqprop_hil.mock_instruments.faults import FaultConfig
from eqprop_hil.mock_instruments.launch import Emulator, parse_sim_url, start_emulator
from eqprop_hil.protocols.errors import ValueRangeError

SMALL = "sizes=4,6,3&skips=0-2&device=ideal&seed=3"
REPO = Path(__file__).resolve().parents[1]
LINE_TIMEOUT_S = 30.0  # bound on waiting for a subprocess to print its resource line (a cold import of numpy)


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_sim_url_splits_physics_faults_and_server_options() -> None:
    kind, config, faults, options = parse_sim_url(f"sim://analog?{SMALL}&serial=LAB7&fault_busy=0.1")
    assert kind == "analog" and list(config.sizes) == [4, 6, 3] and config.device.model == "ideal"
    assert [tuple(s) for s in config.skips] == [(0, 2)]
    assert faults == FaultConfig(seed=3, busy_rate=0.1)  # the faults inherit the emulator's seed
    assert options == {"serial": "LAB7"}
    kind, config, faults, options = parse_sim_url("sim://fpga?sizes=4,3&transport=tcp&link_rate=11520&fault_seed=9")
    assert kind == "fpga" and options == {"transport": "tcp", "link_rate_bytes_per_s": 11520.0}
    assert faults == FaultConfig(seed=9) and not faults.enabled
    kind, config, _, options = parse_sim_url("sim://fpga")
    assert options == {"transport": "pty", "link_rate_bytes_per_s": None}
    assert list(config.sizes) == [64, 256, 10]  # DEFAULT_SIZES when the URL names no network


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://analog?sizes=4,3", "not a sim:// URL"),
        ("sim://gpu?sizes=4,3", "'gpu'"),
        ("sim://analog/x?sizes=4,3", "path"),
        ("sim://analog?sizes=4,3&sizes=5,3", "'sizes' given twice"),
        ("sim://analog?sizes", "malformed query"),
        ("sim://analog?sizes=4,3&bogus=1", "bogus"),
        ("sim://analog?sizes=4,x", "sizes"),
        ("sim://analog?sizes=4,3&device=memristor", "memristor"),
        ("sim://analog?sizes=4,3&link_rate=100", "link_rate"),
        ("sim://analog?sizes=4,3&serial=a,b", "serial"),
        ("sim://fpga?sizes=4,3&transport=usb", "transport='usb'"),
        ("sim://fpga?sizes=4,3&link_rate=0", "link_rate='0'"),
        ("sim://fpga?sizes=4,3&link_rate=fast", "link_rate='fast'"),
        ("sim://fpga?sizes=4,3&serial=", "serial"),
        ("sim://fpga?sizes=4,3&fault_drop=2", "drop_rate"),
        ("sim://fpga?sizes=4,3&fault_teleport=0.1", "fault_teleport"),
    ],
)
def test_bad_sim_urls_name_the_offending_part(url: str, needle: str) -> None:
    with pytest.raises(ValueRangeError) as info:
        parse_sim_url(url)
    assert needle in str(info.value)


def test_start_emulator_refuses_a_port_for_a_pty_and_an_impossible_port() -> None:
    with pytest.raises(ValueRangeError, match="pty"):
        start_emulator(f"sim://fpga?{SMALL}&transport=pty", port=5000)
    with pytest.raises(ValueRangeError, match="70000"):
        start_emulator(f"sim://analog?{SMALL}", port=70000)


# --------------------------------------------------------------------------------- sim:// through the drivers
def _emulator_of(array: object) -> Emulator:
    """The emulator open_array registered to stop when ``array`` closes (the bound method's object)."""
    callbacks = array.__dict__["_close_callbacks"]
    return callbacks[-1].__self__


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        (f"sim://analog?{SMALL}", AnalogBoard),
        (f"sim://fpga?{SMALL}&transport=pty", FpgaArray),
        (f"sim://fpga?{SMALL}&transport=tcp", FpgaArray),
    ],
)
def test_open_array_on_sim_starts_the_emulator_and_closing_stops_it(url: str, driver: type) -> None:
    array = open_array(url)
    emulator = _emulator_of(array)
    try:
        assert isinstance(array, driver)
        assert emulator.running and emulator.resource != url
        assert array.identity()["vendor"] == "EQPROP-HIL"
        assert array.topology()["sizes"] == [4, 6, 3]
        assert [tuple(e) for e in array.topology()["edges"]] == [(0, 1), (1, 2), (0, 2)]
    finally:
        array.close()
    assert not emulator.running
    if emulator.resource.startswith("TCPIP0::"):
        _, host, port, _ = emulator.resource.split("::")
        assert _refused(host, int(port))
    elif emulator.resource.startswith("socket://"):
        host, port = emulator.resource.removeprefix("socket://").rsplit(":", 1)
        assert _refused(host, int(port))


def test_start_emulator_resources_open_with_the_driver_open_array_picks() -> None:
    with start_emulator(f"sim://analog?{SMALL}&serial=LAB7") as emulator:
        assert emulator.resource.startswith("TCPIP0::127.0.0.1::") and emulator.resource.endswith("::SOCKET")
        with open_array(emulator.resource) as board:
            assert isinstance(board, AnalogBoard) and board.identity()["serial"] == "LAB7"
        assert emulator.running  # closing a driver on a resource string stops nothing it did not start
    with start_emulator(f"sim://fpga?{SMALL}&transport=pty") as emulator:
        assert emulator.resource.startswith("/dev/")
        with open_array(emulator.resource) as array:
            assert isinstance(array, FpgaArray) and array.topology()["sizes"] == [4, 6, 3]
    assert not emulator.running


# --------------------------------------------------------------------------------------------- pytest plugin
def test_plugin_fixtures_yield_working_resources(analog_resource: str, fpga_resource: str) -> None:
    with open_array(analog_resource) as board, open_array(fpga_resource) as array:
        assert board.topology()["sizes"] == array.topology()["sizes"] == [4, 6, 3]


pytest_plugins = ["pytester"]


def test_plugin_is_usable_from_a_users_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from eqprop_hil.drivers import open_array

        def test_user(analog_resource, fpga_resource):
            with open_array(analog_resource) as a, open_array(fpga_resource) as f:
                assert a.identity()["vendor"] == f.identity()["vendor"] == "EQPROP-HIL"
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# ------------------------------------------------------------------------------------------------ the CLI
def _spawn(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _first_line(proc: subprocess.Popen) -> str:
    """The first stdout line, waiting at most LINE_TIMEOUT_S (select on the pipe: no sleep-and-hope)."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(LINE_TIMEOUT_S):
            proc.kill()
            raise AssertionError(f"no resource line within {LINE_TIMEOUT_S} s; stderr: {proc.communicate()[1]}")
    line = proc.stdout.readline()
    assert line.endswith("\n"), f"resource line not terminated: {line!r}; stderr: {proc.stderr.read()}"
    return line.strip()


@pytest.mark.parametrize(
    ("args", "prefix", "driver"),
    [
        (["-m", "mock_instruments", "analog", "--port", "0", "--serial", "CLI1"], "TCPIP0::127.0.0.1::", AnalogBoard),
        (["-m", "eqprop_hil", "mock", "fpga", "--pty", "--sizes", "4,6,3", "--device", "ideal"], "/dev/", FpgaArray),
        (["-m", "eqprop_hil", "mock", "fpga", "--port", "0", "--sizes", "4,6,3", "--link-rate", "100000"], "socket://127.0.0.1:", FpgaArray),
    ],
)
def test_cli_prints_the_resource_serves_it_and_exits_0_on_sigint(args: list[str], prefix: str, driver: type) -> None:
    proc = _spawn(args)
    try:
        resource = _first_line(proc)
        assert resource.startswith(prefix)
        with open_array(resource) as array:
            assert isinstance(array, driver)
            identity = array.identity()
            assert identity["vendor"] == "EQPROP-HIL"
            if "--serial" in args:
                assert identity["serial"] == "CLI1"
            assert array.topology()["sizes"] == ([64, 256, 10] if "--sizes" not in args else [4, 6, 3])
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=LINE_TIMEOUT_S)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_exits_0_on_sigterm_and_reads_a_toml_config(tmp_path: Path) -> None:
    config = tmp_path / "emulator.toml"
    config.write_text('sizes = [4, 6, 3]\nskips = [[0, 2]]\ndevice = "ideal"\n[faults]\nseed = 4\n')
    proc = _spawn(["-m", "mock_instruments", "fpga", "--port", "0", "--config", str(config)])
    try:
        resource = _first_line(proc)
        with open_array(resource) as array:
            assert [tuple(e) for e in array.topology()["edges"]] == [(0, 1), (1, 2), (0, 2)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=LINE_TIMEOUT_S)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fpga", "--pty", "--port", "0"], "exclude each other"),
        (["analog", "--pty"], "--pty applies to the fpga"),
        (["analog", "--link-rate", "1000"], "link_rate"),
        (["analog", "--sizes", "4,6,3", "--fault-drop", "2"], "drop_rate"),
        (["analog", "--sizes", "4,6,3", "--fault-delay-s", "0.5"], "delay_rate"),
        (["analog", "--sizes", "4,0"], "sizes"),
        (["analog", "--config", "/nonexistent/emulator.toml"], "cannot read config"),
    ],
)
def test_cli_refuses_bad_options_with_exit_1_and_a_message(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_cli_config_file_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("sizes = [4, 3]\nwobble = 1\n")
    assert cli.main(["analog", "--config", str(bad)]) == 1
    assert "wobble" in capsys.readouterr().err
    bad.write_text("sizes = [4, 3\n")
    assert cli.main(["analog", "--config", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err


def test_cli_warns_when_the_emulator_would_be_exposed(capsys: pytest.CaptureFixture[str]) -> None:
    # An impossible port makes the command stop after the warning, before anything is bound.
    assert cli.main(["analog", "--host", "0.0.0.0", "--port", "70000", "--sizes", "4,3"]) == 1
    err = capsys.readouterr().err
    assert "exposed to the network" in err and "70000" in err
    assert cli.main(["analog", "--host", "127.0.0.5", "--port", "70000", "--sizes", "4,3"]) == 1
    assert "exposed" not in capsys.readouterr().err  # all of 127.0.0.0/8 is loopback
