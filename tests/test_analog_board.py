"""Conformance of the emulated analog board and its driver, through pyvisa-py over TCP on loopback.

Every command of protocols/analog_board.md runs once on the wire, every command has an error path that leaves
the device unchanged (read back), and the driver refuses out-of-limit values before sending anything.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import pyvisa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eqprop_hil.drivers.analog_board import AnalogBoard
from eqprop_hil.drivers.errors import InstrumentError, LimitError, LinkError
from eqprop_hil.drivers.interface import Fenced, NeuronArray, SampleRunner, StepRunner
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.drivers.scpi_property import declared_properties
from eqprop_hil.mock_instruments.analog_server import AnalogServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.ieee_block import encode_block, encode_bytes
from eqprop_hil.protocols.scpi_tags import encode_updates, sparse_update
from eqprop_hil.protocols.scpi import ScpiCommandError, match_header, parse_command
from eqprop_hil.protocols.scpi_commands import BY_KEY

SIZES, SKIPS = [3, 4, 2], [(0, 2)]  # edges: 0 = (0,1), 1 = (1,2), 2 = (0,2) skip


def make_physics(feedback: str = "untied", model: str = "ideal") -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=SIZES, skips=SKIPS, feedback=feedback, device=DeviceConfig(model=model)))


@pytest.fixture
def server() -> Iterator[AnalogServer]:
    with AnalogServer(make_physics()) as srv:
        yield srv


@pytest.fixture
def visa(server: AnalogServer) -> Iterator[pyvisa.resources.MessageBasedResource]:
    rm = pyvisa.ResourceManager("@py")
    res = rm.open_resource(server.resource, read_termination="\n", write_termination="\n", timeout=3000)
    yield res
    res.close()


@pytest.fixture
def board(server: AnalogServer) -> Iterator[AnalogBoard]:
    with AnalogBoard(server.resource, timeout_s=3.0) as b:
        yield b


def f32(*values: float) -> bytes:
    return encode_block(np.array(values, np.float32))


def send(res, line: bytes) -> None:
    res.write_raw(line + b"\n")


def ask(res, line: bytes) -> bytes:
    send(res, line)
    return res.read_raw().rstrip(b"\n")


def ask_block(res, line: bytes) -> np.ndarray:
    send(res, line)
    return np.asarray(res.read_binary_values(datatype="f", container=np.ndarray))


def wire_state(res) -> dict:
    """Everything the board reports, read back over the wire."""
    out = {f"WEIG? {e}": ask_block(res, f"WEIG? {e}".encode()).tolist() for e in range(3)}
    out["WEIG:FEED? 1"] = ask_block(res, b"WEIG:FEED? 1").tolist()
    for q in (b"STAT?", b"INP?", b"NUDG:CURR?", b"NUDG:TARG?"):
        out[q.decode()] = ask_block(res, q).tolist()
    for q in (b"PHAS?", b"NUDG:MODE?", b"NUDG:COMP?", b"NUDG:BETA?", b"LEAR?", b"LEAR:ETA?", b"LEAR:BETA?",
              b"SETT:COUN?", b"PULS:TOT?", b"EDGE:GAIN? 1", b"EDGE:SCAL? 2", b"*ESE?", b"WEIG:RES?"):
        out[q.decode()] = ask(res, q)
    return out


# ------------------------------------------------------------------------------------------------ conformance
GOOD: list[tuple[bytes, str | None]] = [  # (command, expected reply as a regex; None = no reply)
    (b"*IDN?", r"EQPROP-HIL,ANALOG-EP-1,SIM0001,0\.3\.0"), (b"SYST:PROT?", r"2"), (b"SYST:INST?", r'"[0-9a-f]{16}"'),
    (b"SYST:REQ:LAST?", r"-1"),
    (b"*CLS", None), (b"*ESR?", r"0"), (b"*ESE 36", None), (b"*ESE?", r"36"), (b"*STB?", r"0"),
    (b"*OPC", None), (b"*ESR?", r"1"), (b"*OPC?", r"1"),
    (b"SYST:ERR?", r'0,"No error"'), (b"SYST:ERR:COUN?", r"0"), (b"SYST:VERS?", r"1999\.0"),
    (b"SYST:INT OFF", None), (b"SYST:INT?", r"0"),
    (b"TOP:SIZ?", r"3,4,2"), (b"TOP:EDG?", r"0,1,1,2,0,2"), (b"TOP:FEED?", r"UNTIED"), (b"TOP:ACT?", r"SIGMOID4"),
    (b"DEV:MOD?", r"IDEAL"), (b"CONV:DAC?", r"0,-1\.0,1\.0"), (b"CONV:ADC?", r"0,-2\.0,2\.0"),
    (b"INP " + f32(0.5, -0.25, 1.0), None), (b"PHAS FREE", None), (b"PHAS?", r"FREE"),
    (b"EDGE:GAIN 1,0.5", None), (b"EDGE:GAIN? 1", r"0\.5"), (b"EDGE:SCAL 2,2", None), (b"EDGE:SCAL? 2", r"2\.0"),
    (b"EDGE:SCAL:FEED 1,0.5", None), (b"EDGE:SCAL:FEED? 1", r"0\.5"), (b"EDGE:SCAL:FEED 1,1", None),
    (b"SETT 10", None), (b"SETT:TIME 5e-6", None), (b"SETT:PER?", r"1e-06"), (b"SETT:COUN?", r"15"),
    (b"NUDG:COMP 5e-5", None), (b"NUDG:COMP?", r"5e-05"),
    (b"NUDG:CURR " + f32(1e-5, -2e-5), None), (b"NUDG:MODE?", r"CURRENT"),
    (b"NUDG:TARG 0.25," + f32(1.0, 0.0), None), (b"NUDG:MODE?", r"TARGET"), (b"NUDG:BETA?", r"0\.25"),
    (b"PHAS NUDG", None), (b"SETT 2", None), (b"NUDG:OFF", None), (b"NUDG:MODE?", r"OFF"),
    (b"PULS:MATR 0," + encode_block(np.ones(12, np.int8), "b"), None), (b"PULS:LAST?", r"12"),
    (b"PULS:MATR:FEED 1," + encode_block(-np.ones(8, np.int8), "b"), None), (b"PULS:LAST?", r"8"),
    (b"PULS:OUT 1,31," + f32(1, 1, 1, 1, 1, 1), None), (b"PULS:LAST?", r"248"),
    (b"PULS:OUT:FEED 1,2," + f32(*[0.0] * 6), None), (b"PULS:TOT?", r"268"),
    (b"PULS:COUN?", r"4"), (b"SYST:BOOT?", r"1"),
    (b"LEAR:ETA 0.01,0.02,0.03", None), (b"LEAR:ETA?", r"0\.01,0\.02,0\.03"), (b"LEAR:BETA 0.5", None),
    (b"LEAR:BETA?", r"0\.5"), (b"LEAR ON", None), (b"LEAR?", r"1"), (b"LEAR OFF", None),
    (b"WEIG:PROG 0,0.01,5," + f32(*[0.1] * 12), None), (b"WEIG:RES?", r"0\.0"),
    (b"WEIG:PROG:FEED 1,0.01,5," + f32(*[0.2] * 8), None), (b"*RST", None), (b"PHAS?", r"HOLD"),
]
BLOCK_QUERIES = [  # (command, expected number of float32 values)
    (b"INP?", 3), (b"NUDG:CURR?", 2), (b"NUDG:TARG?", 2), (b"STAT?", 9), (b"STAT? 1", 4), (b"WEIG? 0", 12),
    (b"WEIG:FEED? 1", 8), (b"INF? 5," + f32(0.5, 0.5, 0.5), 2),
    (b"LEAR:SAMP? 0.5,5,3," + f32(0.5, -0.25, 1.0, 1.0, 0.0), 2),
]


def test_every_command_on_the_wire(server: AnalogServer, visa) -> None:
    for line, expected in GOOD:
        if expected is None:
            send(visa, line)
        else:
            reply = ask(visa, line).decode()
            assert re.fullmatch(expected, reply), (line, reply)
    for line, count in BLOCK_QUERIES:
        values = ask_block(visa, line)
        assert values.shape == (count,) and np.all(np.isfinite(values)), line
    send(visa, b"STEP? 2," + encode_bytes(encode_updates([sparse_update(0, np.eye(4, 3, dtype=np.int8))])))
    pulses, block = visa.read_raw().rstrip(b"\n").split(b",", 1)
    assert pulses == b"3" and np.frombuffer(block[4:], "<f4").shape == (9,)
    describe = ask(visa, b"SYST:DESC?")
    assert describe.startswith(b"#") and b'"model": "ideal"' in describe
    np.testing.assert_allclose(ask_block(visa, b"WEIG:FEED? 1"), 0.2, atol=1e-2)  # programmed, then one sample
    assert ask(visa, b"SYST:ERR?") == b'0,"No error"'
    assert set(server.firmware.executed) == set(BY_KEY), set(BY_KEY) - set(server.firmware.executed)


BAD: list[tuple[bytes, int]] = [  # (command, error code): device-level errors of every command
    (b"*IDN? 1", -108), (b"*RST 1", -108), (b"*CLS 1", -108), (b"*OPC 1", -108), (b"*OPC? 1", -108),
    (b"*ESR? 1", -108), (b"*ESE 256", -222), (b"*ESE? 1", -108), (b"*STB? 1", -108),
    (b"SYST:ERR? 1", -108), (b"SYST:ERR:COUN? 1", -108), (b"SYST:VERS? 1", -108), (b"SYST:DESC? 1", -108),
    (b"SYST:PROT? 1", -108), (b"SYST:INST? 1", -108), (b"SYST:REQ:LAST? 1", -108),
    (b"STEP? 1," + encode_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00"), -161),
    (b"SYST:INT MAYBE", -141), (b"SYST:INT? 1", -108),
    (b"TOP:SIZ? 1", -108), (b"TOP:EDG? 1", -108), (b"TOP:FEED? 1", -108), (b"TOP:ACT? 1", -108),
    (b"DEV:MOD? 1", -108), (b"CONV:DAC? 1", -108), (b"CONV:ADC? 1", -108),
    (b"INP " + f32(0.5, 0.5), 101), (b"INP " + f32(0.5, 0.5, 1.5), -222), (b"INP " + f32(0, 0, np.nan), 102),
    (b"INP? 1", -108), (b"PHAS RUN", -141), (b"PHAS? 1", -108),
    (b"NUDG:CURR " + f32(1e-5), 101), (b"NUDG:CURR " + f32(0, 2e-4), 110), (b"NUDG:CURR? 1", -108),
    (b"NUDG:COMP 1", -222), (b"NUDG:COMP? 1", -108),
    (b"NUDG:TARG 0.5," + f32(1.0), 101), (b"NUDG:TARG 0.5," + f32(1.0, 9.0), -222),
    (b"NUDG:TARG 11," + f32(1.0, 0.0), -222), (b"NUDG:TARG? 1", -108), (b"NUDG:BETA? 1", -108),
    (b"NUDG:MODE? 1", -108), (b"NUDG:OFF 1", -108),
    (b"EDGE:GAIN 3,0.5", -222), (b"EDGE:GAIN? 3", -222), (b"EDGE:SCAL 0,0", -222), (b"EDGE:SCAL? 9", -222),
    (b"EDGE:SCAL:FEED 0,2", -221), (b"EDGE:SCAL:FEED? 2", -221),
    (b"SETT 0", -222), (b"SETT:TIME 10", -222), (b"SETT:PER? 1", -108), (b"SETT:COUN? 1", -108),
    (b"STAT? 3", -222),
    (b"PULS:MATR 3," + encode_block(np.ones(12, np.int8), "b"), -222),
    (b"PULS:MATR 0," + encode_block(np.ones(11, np.int8), "b"), 101),
    (b"PULS:MATR 0," + encode_block(np.full(12, -128, np.int8), "b"), -222),
    (b"PULS:MATR:FEED 0," + encode_block(np.ones(12, np.int8), "b"), -221),
    (b"PULS:OUT 1,31," + f32(1, 1, 1), 101), (b"PULS:OUT 1,0," + f32(*[0.5] * 6), -222),
    (b"PULS:OUT 1,31," + f32(*[1.5] * 6), -222), (b"PULS:OUT:FEED 2,3," + f32(*[0.5] * 5), -221),
    (b"PULS:LAST? 1", -108), (b"PULS:TOT? 1", -108), (b"PULS:COUN? 1", -108), (b"SYST:BOOT? 1", -108),
    (b"LEAR MAYBE", -141), (b"LEAR? 1", -108), (b"LEAR:ETA 0.1,0.1", -109), (b"LEAR:ETA 0.1,0.1,0.1,0.1", -108),
    (b"LEAR:ETA? 1", -108), (b"LEAR:BETA 0", -222), (b"LEAR:BETA? 1", -108),
    (b"LEAR:SAMP? 0.5,5,3," + f32(0.5, 0.5, 0.5), 101), (b"LEAR:SAMP? 0.5,0,3," + f32(*[0.5] * 5), -222),
    (b"INF? 5," + f32(0.5), 101), (b"INF? 5," + f32(2.0, 0, 0), -222),
    (b"WEIG? 3", -222), (b"WEIG:FEED? 0", -221),
    (b"WEIG:PROG 0,0.01,5," + f32(0.1), 101), (b"WEIG:PROG 0,0,5," + f32(*[0.1] * 12), -222),
    (b"WEIG:PROG:FEED 2,0.01,5," + f32(*[0.1] * 12), -221), (b"WEIG:RES? 1", -108),
]


def test_every_command_has_a_tested_error_path() -> None:
    covered = {match_header(line.split(b" ")[0].decode("latin-1")).key for line, _ in BAD}
    assert covered == set(BY_KEY), set(BY_KEY) - covered


def test_errors_change_nothing(server: AnalogServer, visa) -> None:
    """Each refused command pushes exactly its error and leaves weights, states and settings as they were."""
    for line in (b"INP " + f32(0.5, -0.25, 1.0), b"PHAS FREE", b"SETT 5", b"NUDG:TARG 0.3," + f32(1, 0)):
        send(visa, line)
    before = wire_state(visa)
    for line, code in BAD:
        physics_before = server.physics.state_dict()
        send(visa, line)  # a refused query sends no reply, so the next line read is the error entry
        entry = ask(visa, b"SYST:ERR?").decode()
        assert entry.startswith(f"{code},"), (line, entry)
        assert ask(visa, b"SYST:ERR?") == b'0,"No error"'
        assert _same(server.physics.state_dict(), physics_before), line
    send(visa, b"*CLS")
    assert _same(wire_state(visa), before)


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def test_error_queue_is_fifo_and_overflows(visa) -> None:
    send(visa, b"PHAS RUN")
    send(visa, b"FOO")
    assert ask(visa, b"SYST:ERR:COUN?") == b"2"
    assert ask(visa, b"*STB?") == b"4"
    assert ask(visa, b"SYST:ERR?").startswith(b"-141,")
    assert ask(visa, b"SYST:ERR?").startswith(b"-113,")
    for _ in range(40):
        send(visa, b"FOO")
    assert ask(visa, b"SYST:ERR:COUN?") == b"32"
    entries = [ask(visa, b"SYST:ERR?") for _ in range(32)]
    assert entries[-1] == b'-350,"Queue overflow"' and entries[0].startswith(b"-113,")
    assert int(ask(visa, b"*ESR?")) & 0x20  # command error bit


_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="#"), max_size=40)
_SETS = [b"PHAS FREE", b"EDGE:GAIN 1,0.5", b"SETT 3", b"NUDG:COMP 5e-5", b"LEAR:ETA 0.1,0.1,0.1", b"*ESE 4"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(_TEXT.map(str.encode), st.tuples(st.sampled_from(_SETS), _TEXT).map(lambda t: t[0][:5] + t[1].encode())))
def test_random_and_mutated_lines_over_tcp(server: AnalogServer, visa, line: bytes) -> None:
    """Whatever arrives: the server survives, answers the next query, and a refused line changes nothing."""
    try:
        command = parse_command(line)
    except ScpiCommandError:
        command = None
    if command is not None and command.spec.query:
        return  # a valid query answers; the interesting inputs are the refused ones
    before = server.physics.state_dict()
    send(visa, line)
    entry = ask(visa, b"SYST:ERR?")
    if command is None:
        assert re.match(rb"^-?\d+,\"", entry) and not entry.startswith(b"0,"), (line, entry)
    if not entry.startswith(b"0,"):
        assert _same(server.physics.state_dict(), before), line
        send(visa, b"*CLS")
    assert ask(visa, b"*OPC?") == b"1"


# ------------------------------------------------------------------------------------------------ driver
def test_driver_implements_the_interfaces(board: AnalogBoard) -> None:
    assert isinstance(board, NeuronArray) and isinstance(board, SampleRunner) and isinstance(board, StepRunner)
    assert isinstance(board, Fenced)
    identity = board.identity()
    assert identity["serial"] == "SIM0001" and identity["protocol"] == 2
    assert identity["instance"] == board.bound_instance == board.instance_id() and len(identity["instance"]) == 16
    assert board.topology() == {"sizes": SIZES, "edges": [(0, 1), (1, 2), (0, 2)], "feedback": "untied",
                                "activation": "sigmoid4"}


def test_driver_states_match_the_physics_run_directly(board: AnalogBoard) -> None:
    reference = make_physics()
    x = np.array([0.5, -0.25, 1.0])
    board.set_feedback_gain(1, 0.5)
    reference.set_gain(1, 0.5)
    board.set_input(x)
    board.set_phase("FREE")
    board.settle(25)
    reference.set_input(x)
    reference.set_phase("FREE")
    reference.step(25)
    for got, want in zip(board.read_state(), reference.read_state()):
        np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(board.read_state(2)[0], reference.read_state(2)[0], atol=1e-6)
    assert board.stats["round_trips"] > 0 and board.stats["bytes_sent"] > 0


def test_driver_pulses_weights_and_samples(board: AnalogBoard, server: AnalogServer) -> None:
    w0 = board.read_weights(0)
    assert board.apply_pulses(0, np.ones((4, 3), np.int8))["pulses"] == 12
    np.testing.assert_allclose(board.read_weights(0) - w0, 0.001, atol=1e-6)
    assert board.apply_outer(1, np.full(2, 0.5), np.full(4, 0.5), 20)["pulses"] > 0
    assert board.apply_pulses(1, -np.ones((4, 2), np.int8), feedback=True)["pulses"] == 8
    assert board.stats["pulses_sent"] == server.counters["pulses"]
    assert board.program_weights(2, np.full((2, 3), 0.25)) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(board.read_weights(2), 0.25)
    board.set_local_learning(True, [0.01, 0.01, 0.01], 0.5)
    assert board.learning_enabled and board.learning_eta() == [0.01, 0.01, 0.01]
    out = board.train_sample(np.array([0.5, 0.0, -0.5]), np.array([1.0, 0.0]), 0.5, 10, 4)
    assert out.shape == (2,) and board.infer(np.zeros(3), 5).shape == (2,)
    assert board.phase == "HOLD"
    board.set_nudge_target(np.array([1.0, 0.0]), 0.2)
    assert board.nudge_mode == "TARGET" and board.nudge_beta == 0.2
    board.set_nudge_current(np.array([1e-5, 0.0]))
    board.settle_time(3e-6)
    assert board.steps_total == 10 + 4 + 5 + 3
    snap = board.snapshot()
    assert snap["gains"] == [1.0, 1.0, 1.0] and snap["describe"]["device"]["model"] == "ideal"


def test_driver_refuses_out_of_limit_values_before_sending(server: AnalogServer) -> None:
    limits = Limits(max_input_volts=0.5, max_nudge_amperes=5e-5, max_pulses_per_device=3, max_bit_length=31,
                    pulse_budget=20)
    with AnalogBoard(server.resource, limits=limits, timeout_s=3.0) as board:
        board.compliance_amperes = 2e-5
        sent, commands = board.stats["bytes_sent"], server.counters["commands"]
        refused = [
            (LimitError, lambda: board.set_input(np.array([0.6, 0, 0]))),
            (LimitError, lambda: board.set_input(np.array([np.nan, 0, 0]))),
            (ValueRangeError, lambda: board.set_input(np.zeros(4))),
            (LimitError, lambda: board.set_nudge_current(np.array([6e-5, 0]))),
            (LimitError, lambda: board.set_nudge_current(np.array([3e-5, 0]))),  # above the board's compliance
            (LimitError, lambda: board.apply_pulses(0, np.full((4, 3), 4, np.int8))),
            (LimitError, lambda: board.apply_pulses(0, np.full((4, 3), 2, np.int8))),  # 24 > budget 20
            (LimitError, lambda: board.apply_pulses(0, np.full((4, 3), 0.5))),
            (ValueRangeError, lambda: board.apply_pulses(0, np.ones((3, 4), np.int8))),
            (ValueRangeError, lambda: board.apply_pulses(0, np.ones((3, 4), np.int8), feedback=True)),
            (ValueRangeError, lambda: board.apply_pulses(7, np.ones((3, 4), np.int8))),
            (LimitError, lambda: board.apply_outer(1, np.full(2, 0.5), np.full(4, 0.5), 32)),
            (LimitError, lambda: board.apply_outer(1, np.full(2, 1.5), np.full(4, 0.5), 3)),
            (LimitError, lambda: board.set_feedback_gain(1, 1.5)),
            (LimitError, lambda: board.settle(0)),
            (LimitError, lambda: board.set_phase("RUN")),  # type: ignore[arg-type]
            (LimitError, lambda: board.set_local_learning(True, [0.1, 0.1, 2.0])),
            (ValueRangeError, lambda: board.set_local_learning(True, [0.1, 0.1])),
            (LimitError, lambda: board.train_sample(np.zeros(3), np.zeros(2), 0.5, 0, 3)),
            (ValueRangeError, lambda: board.program_weights(0, np.full((4, 3), np.inf))),
            (LimitError, lambda: board.read_state(5)),
        ]
        for error, action in refused:
            with pytest.raises(error):
                action()
        assert board.stats["bytes_sent"] == sent and server.counters["commands"] == commands


def test_instrument_errors_are_typed_and_change_nothing(server: AnalogServer) -> None:
    with AnalogBoard(server.resource, limits=Limits(max_input_volts=5.0), timeout_s=3.0) as board:
        states = board.read_state()
        with pytest.raises(InstrumentError) as info:
            board.set_input(np.array([2.0, 0.0, 0.0]))  # within Limits, outside the board's DAC range
        assert info.value.code == -222 and info.value.command.startswith("INP")
        assert board.error_count == 0
        for got, want in zip(board.read_state(), states):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(declared_properties(AnalogBoard)))
def test_declared_property_rule(name: str, board: AnalogBoard) -> None:
    prop = declared_properties(AnalogBoard)[name]
    doc = prop.__doc__ or ""
    assert re.match(r"^(Control|Measure|Set|Get) ", doc), doc
    assert re.search(r"\([a-z ]+\)\.$", doc), f"{name}: docstring must end with the unit in parentheses"
    assert prop.get_command in BY_KEY and BY_KEY[prop.get_command].query
    value = getattr(board, name)
    if prop.set_command is None:
        assert not doc.startswith("Control")
        return
    assert doc.startswith(("Control", "Set")) and prop.set_command in BY_KEY
    sent = board.stats["bytes_sent"]
    with pytest.raises(LimitError):
        setattr(board, name, prop.invalid)
    assert board.stats["bytes_sent"] == sent
    value = {"learning_beta": 0.3, "phase": "FREE", "compliance_amperes": 5e-5}.get(name, value)
    setattr(board, name, value)
    assert getattr(board, name) == value


def test_another_client_does_not_disturb_the_driver(server: AnalogServer, board: AnalogBoard) -> None:
    other = socket.create_connection((server.host, server.port))  # several clients are served (spec 1.4)
    try:
        assert other.sendall(b"*OPC?\n") is None and other.recv(16) == b"1\n"
        assert board.phase == "HOLD" and board.stats["reconnects"] == 0
    finally:
        other.close()


def test_driver_reconnects_when_the_board_cuts_the_link(server: AnalogServer) -> None:
    board = AnalogBoard(server.resource, timeout_s=0.5)
    try:
        assert server.drop_connections() == 1
        assert board.phase == "HOLD"  # the old session is dead: the driver reconnects and resends
        assert board.stats["reconnects"] == 1
    finally:
        board.close()


def test_lost_replies_are_resent_with_the_same_id_and_pulses_run_once() -> None:
    """A pulse command whose reply is lost is resent with the same request id: the duplicate cache answers, so
    every acknowledged command ran exactly once (spec 4.2, 4.3)."""
    from eqprop_hil.mock_instruments.faults import FaultConfig

    physics = make_physics()
    with AnalogServer(physics, faults=FaultConfig(seed=3, drop_rate=0.3)) as srv, \
            AnalogBoard(srv.resource, timeout_s=0.2, retries=8) as board:
        before = physics.read_weights(0).copy()
        for _ in range(10):
            assert board.apply_pulses(0, np.ones((4, 3), np.int8))["pulses"] == 12
        assert srv.counters["pulse_commands"] == 10 and srv.counters["duplicates"] > 0
        assert srv.counters["fault_drop"] > 0 and board.stats["reconnects"] > 0
        step = physics.config.device.dw_min * 12 / 12  # ideal devices: one pulse is dw_min
        np.testing.assert_allclose(physics.read_weights(0) - before, 10 * step * physics.scale(0), rtol=1e-5)


def test_close_leaves_the_board_safe(server: AnalogServer) -> None:
    board = AnalogBoard(server.resource, timeout_s=3.0)
    board.set_input(np.array([0.5, 0.5, 0.5]))
    board.set_nudge_current(np.array([1e-5, 1e-5]))
    board.set_phase("FREE")
    board.close()
    fw = server.firmware
    assert server.physics.phase == "HOLD" and fw.nudge_mode == "OFF" and not fw.input.any()


def test_tied_board_refuses_feedback_matrices() -> None:
    with AnalogServer(make_physics("tied")) as srv, AnalogBoard(srv.resource, timeout_s=3.0) as board:
        assert board.topology()["feedback"] == "tied"
        with pytest.raises(ValueRangeError, match="no feedback matrix"):
            board.read_weights(1, feedback=True)
        with pytest.raises(InstrumentError) as info:
            board._set("PULS:MATR:FEED 1,", np.ones(8, np.int8), "b", idempotent=False)
        assert info.value.code == -221 and srv.counters["pulse_commands"] == 0


def wait_for(predicate, timeout_s: float = 3.0) -> bool:
    """Bounded wait on a condition the server thread makes true (no reply exists to wait on)."""
    deadline, tick = time.monotonic() + timeout_s, threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.002)
    return True


def test_faults_busy_refuses_and_power_cycle_keeps_weights() -> None:
    from eqprop_hil.mock_instruments.faults import FaultConfig

    physics = make_physics()
    weights = physics.read_weights(0)
    with AnalogServer(physics, faults=FaultConfig(busy_rate=1.0)) as srv:
        rm = pyvisa.ResourceManager("@py")
        res = rm.open_resource(srv.resource, read_termination="\n", write_termination="\n", timeout=3000)
        send(res, b"PHAS FREE")  # refused as busy, not executed; so is every later command, error reads included
        assert wait_for(lambda: srv.counters["busy"] == 1)
        assert physics.phase == "HOLD" and srv.counters["busy"] == 1
        [session] = srv.sessions  # errors belong to the connection that caused them (spec 1.4)
        assert len(session.errors) == 1 and session.errors[0].startswith("140,")
        res.close()
    with AnalogServer(physics, faults=FaultConfig(power_cycle_rate=1.0)) as srv:
        rm = pyvisa.ResourceManager("@py")
        res = rm.open_resource(srv.resource, read_termination="\n", write_termination="\n", timeout=3000)
        send(res, b"EDGE:GAIN 1,0.5")
        assert ask(res, b"EDGE:GAIN? 1") == b"1.0"  # the gain was lost in the power cycle before the query
        assert int(ask(res, b"*ESR?")) & 0x80  # power-on bit
        np.testing.assert_array_equal(ask_block(res, b"WEIG? 0").reshape(4, 3), weights)  # conductances kept
        res.close()


def test_two_controllers_share_the_boards_request_ids(server: AnalogServer) -> None:
    """Spec 4.2: the id space is the board's; a fresh message refused as stale (another controller's ids moved
    on) never ran, so the driver renumbers it after the board's newest id and sends it again."""
    with AnalogBoard(server.resource, timeout_s=3.0) as a, AnalogBoard(server.resource, timeout_s=3.0) as b:
        for i in range(5):
            a.set_feedback_gain(1, 0.1 * i)
            assert b.feedback_gain(1) == pytest.approx(0.1 * i)
            assert b.apply_pulses(0, np.ones((4, 3), np.int8)) == {"pulses": 12}
            assert len(a.read_state()) == 3
        assert a.stats["id_resyncs"] + b.stats["id_resyncs"] > 0
        assert server.counters["pulse_commands"] == 5 and a.pulse_commands_executed == 5


def test_step_checks_every_update_before_sending_anything(server: AnalogServer) -> None:
    """All or none on the host side too: one update over the limits and nothing is sent (issue 11)."""
    with AnalogBoard(server.resource, timeout_s=3.0, limits=Limits(max_pulses_per_device=3, pulse_budget=40)) as b:
        good = {"edge": 0, "counts": np.ones((4, 3), np.int8)}
        sent = b.stats["bytes_sent"]
        for bad, error in (
            ({"edge": 1, "counts": np.full((2, 4), 5, np.int8)}, LimitError),  # above max_pulses_per_device
            ({"edge": 1, "counts": np.ones((4, 2), np.int8)}, ValueRangeError),  # wrong shape
            ({"edge": 1, "rows": np.ones(2), "cols": np.full(4, 2.0), "bit_length": 4}, LimitError),  # |p| > 1
            ({"edge": 1, "rows": np.ones(2), "cols": np.ones(4), "bit_length": 0}, LimitError),
            ({"edge": 7, "counts": np.ones((2, 4), np.int8)}, ValueRangeError),
            ({"edge": 1, "feedback": True, "counts": np.ones((4, 2), np.int8), "rows": np.ones(4)}, ValueRangeError),
        ):
            with pytest.raises(error):
                b.step([good, {"edge": 2, "counts": np.ones((2, 3), np.int8)}, bad], 1)
        with pytest.raises(LimitError, match="budget"):  # 12 + 24 + 18 pulses: over the budget of 40
            b.step([good, {"edge": 1, "counts": np.full((2, 4), 3, np.int8)},
                    {"edge": 2, "counts": np.full((2, 3), 3, np.int8)}], 1)
        with pytest.raises(ValueRangeError, match="twice"):
            b.step([good, good], 1)
        assert b.stats["bytes_sent"] == sent and server.counters["pulse_commands"] == 0
        result, states = b.step([good, {"edge": 1, "feedback": True, "counts": np.eye(4, 2, dtype=np.int8)}], 3)
        assert result == {"pulses": 14} and [s.shape for s in states] == [(3,), (4,), (2,)]
        assert server.counters["pulse_commands"] == 1 and b.pulse_commands_executed == 1
