"""Who may connect: the shared token of both emulators over their real transports, the launcher's refusal to
expose an emulator without one, and no unpickling anywhere (protocols/analog_board.md 1.1, fpga_serial.md 7.1).

Every refusal is checked on the device side too: the physics' ``state_dict()`` and the firmware's counters are
unchanged, so a stranger's command never ran.
"""

from __future__ import annotations

import ast
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import AccessDenied
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.mock_instruments import cli
from eqprop_hil.mock_instruments.launch import start_emulator
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.auth import AUTH_REFUSED_LINE, TOKEN_ENV
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.framing import DELIMITER, FrameReader, encode_frame
from eqprop_hil.protocols.ieee_block import encode_block

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "lab-7f3a9c2e"


def _same_state(a: object, b: object) -> bool:
    """Deep equality of two physics state_dicts (nested dicts, lists, arrays, RNG states)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same_state, a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def _recv_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------------------------------------- analog board
@pytest.fixture
def analog():
    with start_emulator("sim://analog?sizes=4,5,3&device=ideal", token=TOKEN) as emu:
        yield emu


@pytest.mark.parametrize("first", [
    b"INP " + encode_block(np.float32([0.5, 0.5, 0.5, 0.5])) + b"\n",  # a set before authenticating
    b"PULS:MATR 0," + encode_block(np.ones(20, np.int8), "b") + b"\n",
    b'SYST:AUTH? "wrong-token"\n',
    b"SYST:AUTH? " + b"x" * 2000,  # never ends: refused once it passes 1 KiB
])
def test_analog_stranger_is_refused_and_nothing_runs(analog, first: bytes) -> None:
    before, commands = analog.physics.state_dict(), analog.server.counters["commands"]
    host, port = analog.resource.split("::")[1:3]
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        sock.sendall(first)
        reply = _recv_until_closed(sock)  # the server closes the connection after its refusal
    assert reply == AUTH_REFUSED_LINE + b"\n"
    assert _same_state(analog.physics.state_dict(), before)
    assert analog.server.counters["commands"] == commands and analog.server.counters["auth_refused"] == 1


def test_analog_driver_needs_the_token(analog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    before = analog.physics.state_dict()
    with pytest.raises(AccessDenied, match="requires a shared token"):
        AnalogBoard(analog.resource, timeout_s=2.0)
    with pytest.raises(AccessDenied, match="refused the token"):
        AnalogBoard(analog.resource, timeout_s=2.0, token="not-the-token")
    assert _same_state(analog.physics.state_dict(), before) and analog.server.counters["commands"] == 0
    with AnalogBoard(analog.resource, timeout_s=2.0, token=TOKEN) as board:
        board.set_input(np.full(4, 0.25))
        np.testing.assert_allclose(analog.server.firmware.input, 0.25)
        # A stranger connecting meanwhile neither gets in nor knocks the controller off the link.
        host, port = analog.resource.split("::")[1:3]
        with socket.create_connection((host, int(port)), timeout=5.0) as sock:
            sock.sendall(b"*RST\n")
            assert _recv_until_closed(sock) == AUTH_REFUSED_LINE + b"\n"
        assert board.read_state(0)[0].tolist() == [0.25] * 4 and board.stats["reconnects"] == 0
    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the environment variable serves when no token= is given
    with AnalogBoard(analog.resource, timeout_s=2.0) as board:
        assert board.identity()["model"] == "ANALOG-EP-1"


def test_a_board_without_a_token_accepts_any_authentication() -> None:
    with start_emulator("sim://analog?sizes=4,3") as emu, AnalogBoard(emu.resource, token="anything") as board:
        assert board.identity()["vendor"] == "EQPROP-HIL" and emu.server.counters["auth_refused"] == 0


# ---------------------------------------------------------------------------------------------- FPGA over TCP
@pytest.fixture
def fpga():
    with start_emulator("sim://fpga?sizes=4,5,3&device=ideal&transport=tcp", token=TOKEN) as emu:
        yield emu


def _exchange(resource: str, frames: list[bytes]) -> list:
    host, port = resource.removeprefix("socket://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        sock.sendall(b"".join(DELIMITER + f for f in frames))
        raw = _recv_until_closed(sock)
    return FrameReader().feed(raw)


@pytest.mark.parametrize("opcode,payload", [
    (m.Opcode.SYNC, b""),
    (m.Opcode.APPLY_PULSES, m.encode_request(m.Opcode.APPLY_PULSES, edge=0, feedback=0, row_start=0, n_rows=5,
                                             counts=np.ones(20, np.int8))),
    (m.Opcode.AUTH, m.encode_request(m.Opcode.AUTH, token="wrong-token")),
])
def test_fpga_stranger_is_refused_and_nothing_runs(fpga, opcode: m.Opcode, payload: bytes) -> None:
    before, frames = fpga.physics.state_dict(), fpga.server.counters["frames"]
    sync = encode_frame(2, m.Opcode.SYNC, b"")  # would follow a successful AUTH; must never run
    replies = _exchange(fpga.resource, [encode_frame(1, opcode, payload), sync])
    assert len(replies) == 1 and replies[0].seq == 1 and replies[0].opcode == opcode | m.RESPONSE_BIT
    assert m.decode_envelope(replies[0].payload)[0] == m.Status.UNAUTHORIZED
    assert _same_state(fpga.physics.state_dict(), before) and fpga.server.counters["frames"] == frames
    assert fpga.server.counters["auth_refused"] == 1 and not fpga.server.device.synced


def test_fpga_garbage_before_auth_closes_without_an_answer(fpga) -> None:
    assert _exchange(fpga.resource, [b"\x01\x02\x03garbage\x00"]) == []
    assert fpga.server.counters["auth_refused"] == 1 and fpga.server.counters["frames"] == 0


def test_fpga_driver_needs_the_token(fpga, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    before = fpga.physics.state_dict()
    with pytest.raises(AccessDenied, match="requires a shared token"):
        FpgaArray(fpga.resource, timeout_s=1.0)
    with pytest.raises(AccessDenied, match="refused the token"):
        FpgaArray(fpga.resource, timeout_s=1.0, token="not-the-token")
    assert _same_state(fpga.physics.state_dict(), before) and fpga.server.counters["frames"] == 0
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with FpgaArray(fpga.resource, timeout_s=1.0) as array:
        array.set_input(np.full(4, 0.5))
        assert array.read_state(0)[0].tolist() == [0.5] * 4
        assert fpga.server.counters["auth_ok"] == 1


def test_fpga_reconnect_authenticates_again(fpga) -> None:
    with FpgaArray(fpga.resource, timeout_s=1.0, token=TOKEN) as array:
        array.link._serial.close()  # the link drops; the next command reconnects (and must give the token again)
        assert array.identity()["model"] == "FPGA-EP-1"
        assert array.stats["reconnects"] == 1 and fpga.server.counters["auth_ok"] == 2


@pytest.mark.parametrize("url,attr", [("sim://analog?sizes=4,3", "resource_name"),
                                      ("sim://fpga?sizes=4,3&transport=tcp", None)])
def test_open_array_passes_the_token_to_the_emulator_and_the_driver(url: str, attr: str | None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    array = open_array(url, token=TOKEN, timeout_s=2.0)
    try:
        assert array.identity()["vendor"] == "EQPROP-HIL"
        if attr:  # the emulator open_array started requires that token (the FPGA serves one connection at a time)
            with pytest.raises(AccessDenied):
                AnalogBoard(getattr(array, attr), timeout_s=1.0)
    finally:
        array.close()


# ---------------------------------------------------------------------------------------------- launcher
def test_launcher_refuses_a_network_address_without_a_token(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    # Port 70000 cannot be bound: where the checks pass, the command stops there, before anything listens.
    assert cli.main(["analog", "--host", "0.0.0.0", "--port", "70000", "--sizes", "4,3"]) == 1
    err = capsys.readouterr().err
    assert "exposed to the network" in err and "refusing to listen on 0.0.0.0:70000 without a token" in err
    assert "--insecure" in err
    assert cli.main(["analog", "--host", "0.0.0.0", "--port", "70000", "--sizes", "4,3", "--insecure"]) == 1
    err = capsys.readouterr().err
    assert "anyone who can reach it can drive it" in err and "refusing" not in err and "70000" in err
    assert cli.main(["fpga", "--host", "0.0.0.0", "--port", "70000", "--sizes", "4,3", "--token", TOKEN]) == 1
    err = capsys.readouterr().err
    assert "only clients that give the shared token are served" in err and "refusing" not in err
    empty = tmp_path / "empty"
    empty.write_text("")
    assert cli.main(["analog", "--token-file", str(empty), "--sizes", "4,3"]) == 1
    assert "token in" in capsys.readouterr().err
    with pytest.raises(ValueRangeError, match="without spaces"):
        start_emulator("sim://analog?sizes=4,3", token="has space")


def test_mock_command_serves_with_a_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mock_instruments", "analog", "--sizes", "4,3", "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        resource = proc.stdout.readline().strip()  # printed once it listens
        assert resource.startswith("TCPIP0::127.0.0.1::"), proc.stderr.read() if not resource else resource
        with pytest.raises(AccessDenied):
            AnalogBoard(resource, timeout_s=2.0, token="wrong-token")
        with AnalogBoard(resource, timeout_s=2.0, token=TOKEN) as board:
            assert board.topology()["sizes"] == [4, 3]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0


# ---------------------------------------------------------------------------------------------- no pickle
_PACKAGES = ("hil", "drivers", "protocols", "mock_instruments")
_FORBIDDEN = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}


def _sources() -> list[Path]:
    return [p for pkg in _PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_module_unpickles() -> None:
    """No import of a pickle-like module, no pyzmq *_pyobj, torch.load only with weights_only=True and
    numpy.load never with allow_pickle=True: nothing that arrives on a socket or from a file can run code."""
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _FORBIDDEN]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FORBIDDEN:
                problems.append(f"{where}: from {node.module} import")
            elif isinstance(node, ast.Attribute) and node.attr in ("recv_pyobj", "send_pyobj", "recv_serialized"):
                problems.append(f"{where}:{node.lineno}: {node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = ast.unparse(node.func.value)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if owner == "torch" and kw.get("weights_only") != "True":
                    problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
                if owner in ("np", "numpy") and kw.get("allow_pickle", "False") != "False":
                    problems.append(f"{where}:{node.lineno}: np.load with allow_pickle")
    assert not problems, problems
    assert len(_sources()) > 40  # the walk really saw the packages


def test_a_token_with_a_trailing_newline_is_refused() -> None:
    """`^...$` accepts "abc\\n"; the check must take the whole token, or a newline would end the SCPI line early."""
    from eqprop_hil.protocols.auth import check_token
    from eqprop_hil.protocols.errors import ValueRangeError

    with pytest.raises(ValueRangeError):
        check_token("abc\n")
    assert check_token("abc") == "abc"
