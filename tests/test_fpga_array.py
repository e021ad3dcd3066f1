"""FpgaArray against the emulated FPGA through real transports (pyserial over a pty and over socket://).

Every opcode and every error status end to end; retransmission after dropped, corrupt, truncated, delayed
responses, corrupted requests, busy answers and closed connections (a pulse is applied once: weights are
compared with a twin physics that received each pulse exactly once); restarts; the link-rate limit by byte
accounting; limits checked before sending; and fuzzed bytes that never change the emulated device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import serial
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from eqprop_hil.drivers.errors import DeviceRestarted, InstanceChanged, InstrumentError, LimitError, LinkError
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.drivers.fpga_link import (
    BadLengthError,
    BadStateError,
    DeviceFailure,
    FpgaStatusError,
    OutOfRangeError,
    UnknownOpcodeError,
)
from eqprop_hil.drivers.interface import NeuronArray, SampleRunner, StepRunner
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.mock_instruments.faults import FaultConfig, FaultInjector
from eqprop_hil.mock_instruments.fpga_server import FpgaServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.fixed_point import STATE, quantize
from eqprop_hil.protocols.fpga_messages import Opcode, Status
from eqprop_hil.protocols.framing import Frame, FrameReader, crc16, encode_frame

SIZES = [4, 6, 3]
TRANSPORTS = ["pty", "tcp"]


def make_physics(sizes: list[int] = SIZES, cls: type = ArrayPhysics) -> ArrayPhysics:
    config = ArrayConfig(list(sizes), skips=[(0, 2)] if len(sizes) == 3 else [], feedback="untied",
                         device=DeviceConfig(model="ideal"), seed=1)  # fmt: skip
    return cls(config)


def same(a: object, b: object) -> bool:
    """Deep equality of state_dicts (nested dicts, lists, tuples, numpy arrays)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


@pytest.fixture(scope="module", params=TRANSPORTS)
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[FpgaServer, FpgaArray]]:
    with FpgaServer(make_physics(), transport=request.param) as server:
        array = FpgaArray(server.resource, timeout_s=2.0)
        yield server, array
        array.close()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


def twin_of(array: FpgaArray, sizes: list[int] = SIZES) -> ArrayPhysics:
    """A physics with the array's current weights, programmed through the driver's own readback."""
    twin = make_physics(sizes)
    for e, (i, _) in enumerate(array.topology()["edges"]):
        twin.program_weights(e, array.read_weights(e))
        if i >= 1:
            twin.program_weights(e, array.read_weights(e, feedback=True), feedback=True)
    return twin


# ------------------------------------------------------------------------------------------ every opcode


def test_description_opcodes(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    assert isinstance(array, NeuronArray) and isinstance(array, SampleRunner) and isinstance(array, StepRunner)
    instance = f"{server.device.instance:016x}"
    assert array.identity() == {"vendor": "EQPROP-HIL", "model": "FPGA-EP-1", "serial": "FPGA0001", "firmware": "0.1.0",
                                "protocol": 2, "instance": instance}
    assert array.bound_instance == array.instance_id() == instance
    assert array.topology() == server.physics.topology()
    info = array.describe()
    assert info["protocol"]["version"] == 2 and info["device"]["model"] == "ideal"
    counters = array.counters()
    assert counters["boot"] == 1 and counters["link_executed"] >= 3
    snap = array.snapshot()
    assert snap["gains"] == [server.physics.gain(e) for e in range(3)] and snap["boot"] == 1


def test_drive_settle_and_read_state_match_the_physics(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    array.reset()
    array.set_input(np.array([0.5, -0.25, 1.0, 0.125]))
    array.set_phase("FREE")
    array.settle(12)
    states = array.read_state()
    expected = [quantize(s, STATE) for s in server.physics.read_state()]
    assert [s.shape for s in states] == [(4,), (6,), (3,)]
    assert all(np.array_equal(a, b) for a, b in zip(states, expected))
    np.testing.assert_array_equal(array.read_state(1)[0], states[1])
    assert array.status() == {"phase": "FREE", "nudge_mode": "OFF", "local_learning": False}
    array.set_phase("HOLD")
    array.settle(5)
    np.testing.assert_array_equal(array.read_state(2)[0], states[2])  # HOLD: nothing moves


def test_nudge_modes(rig: tuple[FpgaServer, FpgaArray]) -> None:
    _, array = rig
    array.set_nudge_current(np.array([1e-5, -2e-5, 0.0]))
    assert array.status()["nudge_mode"] == "CURRENT"
    array.set_nudge_target(np.array([1.0, 0.0, 0.0]), 0.5)
    assert array.status()["nudge_mode"] == "TARGET"
    array.nudge_off()
    assert array.status()["nudge_mode"] == "OFF"


def test_gains_and_scales(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    array.set_feedback_gain(1, 0.25)
    assert array.feedback_gain(1) == 0.25 == server.physics.gain(1)
    array.set_weight_scale(1, 2.0, feedback=True)
    assert array.weight_scale(1, feedback=True) == 2.0 and array.weight_scale(1) == 1.0
    array.set_weight_scale(1, 1.0, feedback=True)
    array.set_feedback_gain(1, 1.0)


@pytest.mark.parametrize("edge,feedback", [(0, False), (1, False), (1, True), (2, False)])
def test_pulse_matrix_applied_once_matches_a_twin(rig: tuple[FpgaServer, FpgaArray], edge: int, feedback: bool) -> None:
    server, array = rig
    twin = twin_of(array)
    shape = twin.read_weights(edge, feedback=feedback).shape
    counts = np.random.default_rng(edge).integers(-5, 6, size=shape).astype(np.int8)
    before = server.physics.counters["pulse_commands"]
    result = array.apply_pulses(edge, counts, feedback=feedback)
    assert result["pulses"] == int(np.abs(counts).sum()) == twin.apply_pulses(edge, counts, feedback=feedback)
    assert server.physics.counters["pulse_commands"] == before + 1
    # the twin started from the float32 readback: equal to float32 rounding; one pulse is 0.001
    np.testing.assert_allclose(array.read_weights(edge, feedback=feedback), twin.read_weights(edge, feedback=feedback),
                               rtol=0, atol=1e-6)  # fmt: skip


def test_outer_update(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    before_w = array.read_weights(1)
    before = server.physics.counters["coincidences"]
    result = array.apply_outer(1, np.array([1.0, -0.5, 0.0]), np.array([0.5, -1.0, 0.75, 0.25, 1.0, -1.0]), 31)
    assert result["pulses"] == server.physics.counters["coincidences"] - before > 0
    changed = array.read_weights(1) != before_w
    assert changed.any() and not changed[2].any()  # row 2 had probability 0: never fires


def test_local_learning_settings(rig: tuple[FpgaServer, FpgaArray]) -> None:
    _, array = rig
    array.set_local_learning(True, [0.01, 0.02, 0.03], 0.5)
    enabled, eta, beta = array.local_learning()
    assert enabled and beta == 0.5 and eta == pytest.approx([0.01, 0.02, 0.03])
    array.set_local_learning(False)  # None keeps eta and beta
    assert array.local_learning() == (False, eta, 0.5)
    assert array.status()["local_learning"] is False


def test_train_sample_and_infer_match_a_twin(transport: str) -> None:
    with FpgaServer(make_physics(), transport=transport) as server, FpgaArray(server.resource) as array:
        twin = make_physics()  # same config and seed, untouched: same weights and random streams
        for target in (array, twin):
            target.set_local_learning(False, [0.05, 0.05, 0.05], None)
        x, y = np.array([0.5, -0.25, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])
        out = array.train_sample(x, y, 0.5, 20, 8)
        np.testing.assert_array_equal(out, quantize(twin.train_sample(x, y, 0.5, 20, 8), STATE))
        for e in range(3):
            np.testing.assert_allclose(array.read_weights(e), twin.read_weights(e), rtol=0, atol=1e-7)
        assert not np.array_equal(array.read_weights(1), make_physics().read_weights(1))  # it learned
        np.testing.assert_array_equal(array.infer(x, 20), quantize(twin.infer(x, 20), STATE))
        assert array.status()["phase"] == "HOLD"


def test_large_matrices_travel_in_row_chunks(transport: str) -> None:
    sizes = [784, 512, 10]
    with FpgaServer(make_physics(sizes), transport=transport) as server, FpgaArray(server.resource) as array:
        trips = array.stats["round_trips"]
        weights = array.read_weights(0)
        assert weights.shape == (512, 784) and array.stats["round_trips"] - trips == 26
        np.testing.assert_array_equal(weights, server.physics.read_weights(0))
        target = np.random.default_rng(0).uniform(-0.05, 0.05, size=(512, 784)).astype(np.float32)
        assert array.program_weights(0, target) == 0.0
        np.testing.assert_array_equal(array.read_weights(0), target)
        twin = twin_of(array, sizes)
        counts = np.zeros((512, 784), dtype=np.int8)
        counts[100:190] = 1  # mostly non-zero rows of chunks 1 and 2 (83 rows per chunk): dense is smaller
        counts[500, 7] = -2  # chunk 6
        trips, sent = array.stats["round_trips"], array.stats["bytes_sent"]
        assert array.apply_pulses(0, counts)["pulses"] == 90 * 784 + 2
        assert array.stats["round_trips"] - trips == 3  # all-zero chunks are not sent
        twin.apply_pulses(0, counts)
        sparse = np.zeros((512, 784), dtype=np.int8)
        sparse[100:110] = 3  # 7841 of 401408 devices: one APPLY_SPARSE (5 bytes per pulse) beats 2 dense chunks
        sparse[500, 7] = -2
        trips, sent = array.stats["round_trips"], array.stats["bytes_sent"]
        assert array.apply_pulses(0, sparse)["pulses"] == 10 * 784 * 3 + 2
        assert array.stats["round_trips"] - trips == 1 and array.stats["bytes_sent"] - sent < 7841 * 5 + 200
        twin.apply_pulses(0, sparse)
        np.testing.assert_allclose(array.read_weights(0), twin.read_weights(0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ error statuses


def _payload(opcode: Opcode, fence: int = 0, **fields: object) -> bytes:
    return m.encode_request(opcode, fence=fence, **fields)


def _fenced(payload: bytes, fence: int) -> bytes:
    """``payload`` (built at import time with fence 0) fenced for ``fence``."""
    return m.FENCE.pack(fence) + payload[m.FENCE.size :] if len(payload) >= m.FENCE.size else payload


def _nan_field(opcode: Opcode, value: float, **fields: object) -> bytes:
    """A well-formed request whose LAST 4 bytes (a float32 field) hold ``value`` (NaN or infinity)."""
    return _payload(opcode, **fields)[:-4] + np.float32(value).tobytes()


ERRORS = [
    ("unknown opcode", 0x55, b"", UnknownOpcodeError, Status.UNKNOWN_OPCODE, "0x55"),
    ("input too short", Opcode.SET_INPUT, _payload(Opcode.SET_INPUT, volts=np.zeros(3)), BadLengthError,
     Status.BAD_LENGTH, "3 values, the board needs 4"),
    ("truncated payload", Opcode.SET_INPUT, _payload(Opcode.SET_INPUT, volts=np.zeros(4))[:-1], BadLengthError,
     Status.BAD_LENGTH, "ends inside field"),
    ("input beyond DAC", Opcode.SET_INPUT, _payload(Opcode.SET_INPUT, volts=np.array([1.5, 0, 0, 0])),
     OutOfRangeError, Status.OUT_OF_RANGE, "1.5"),
    ("phase code", Opcode.SET_PHASE, _payload(Opcode.SET_PHASE, phase=7), OutOfRangeError, Status.OUT_OF_RANGE, "7"),
    ("edge", Opcode.SET_GAIN, _payload(Opcode.SET_GAIN, edge=9, gain=0.5), OutOfRangeError, Status.OUT_OF_RANGE, "edge 9"),
    ("gain", Opcode.SET_GAIN, _payload(Opcode.SET_GAIN, edge=1, gain=1.5), OutOfRangeError, Status.OUT_OF_RANGE, "1.5"),
    ("settle", Opcode.SETTLE, _payload(Opcode.SETTLE, steps=2_000_000), OutOfRangeError, Status.OUT_OF_RANGE, "2000000"),
    ("compliance", Opcode.SET_NUDGE_CURRENT, _payload(Opcode.SET_NUDGE_CURRENT, amperes=np.array([1e-3, 0, 0])),
     OutOfRangeError, Status.OUT_OF_RANGE, "compliance"),
    ("pulse -128", Opcode.APPLY_PULSES, _payload(Opcode.APPLY_PULSES, edge=1, feedback=0, row_start=0, n_rows=1,
     counts=np.array([-128, 0, 0, 0, 0, 0])), OutOfRangeError, Status.OUT_OF_RANGE, "128"),
    ("pulse rows", Opcode.APPLY_PULSES, _payload(Opcode.APPLY_PULSES, edge=1, feedback=0, row_start=3, n_rows=1,
     counts=np.ones(6, dtype=np.int8)), OutOfRangeError, Status.OUT_OF_RANGE, "rows 3..3"),
    ("pulse count length", Opcode.APPLY_PULSES, _payload(Opcode.APPLY_PULSES, edge=1, feedback=0, row_start=0,
     n_rows=1, counts=np.ones(5, dtype=np.int8)), BadLengthError, Status.BAD_LENGTH, "5 values"),
    ("outer probability", Opcode.APPLY_OUTER, _payload(Opcode.APPLY_OUTER, edge=1, feedback=0, bit_length=8,
     rows=np.array([1.5, 0, 0]), cols=np.zeros(6)), OutOfRangeError, Status.OUT_OF_RANGE, "[-1, 1]"),
    ("layer", Opcode.READ_STATE, _payload(Opcode.READ_STATE, layer=5), OutOfRangeError, Status.OUT_OF_RANGE, "layer 5"),
    ("feedback of an input edge", Opcode.READ_WEIGHTS, _payload(Opcode.READ_WEIGHTS, edge=0, feedback=1, row_start=0,
     n_rows=1), BadStateError, Status.BAD_STATE, "no feedback matrix"),
    ("commit with rows missing", Opcode.PROGRAM_WEIGHTS, _payload(Opcode.PROGRAM_WEIGHTS, edge=1, feedback=0,
     row_start=1, n_rows=1, commit=1, tolerance=0.01, max_iterations=5, weights=np.zeros(6)), BadStateError,
     Status.BAD_STATE, "not staged"),
    ("eta count", Opcode.SET_LOCAL_LEARNING, _payload(Opcode.SET_LOCAL_LEARNING, enabled=1, set_beta=0, beta=0.0,
     eta=np.zeros(2)), BadLengthError, Status.BAD_LENGTH, "eta holds 2"),
    ("beta zero", Opcode.TRAIN_SAMPLE, _payload(Opcode.TRAIN_SAMPLE, beta=0.0, t1=5, t2=5, volts=np.zeros(4),
     target=np.zeros(3)), OutOfRangeError, Status.OUT_OF_RANGE, "beta"),
    # issue 10: a NaN or infinite float names the value problem (OUT_OF_RANGE), not the layout (BAD_LENGTH)
    ("gain NaN", Opcode.SET_GAIN, _nan_field(Opcode.SET_GAIN, np.nan, edge=1, gain=0.5), OutOfRangeError,
     Status.OUT_OF_RANGE, "field 'gain' holds nan"),
    ("nudge current inf", Opcode.SET_NUDGE_CURRENT, _nan_field(Opcode.SET_NUDGE_CURRENT, np.inf, amperes=np.zeros(3)),
     OutOfRangeError, Status.OUT_OF_RANGE, "field 'amperes' holds NaN or infinity: inf at index 2"),
    ("scale -inf", Opcode.SET_SCALE, _nan_field(Opcode.SET_SCALE, -np.inf, edge=1, feedback=0, scale=1.0),
     OutOfRangeError, Status.OUT_OF_RANGE, "field 'scale' holds -inf"),
    ("STEP dense count", Opcode.STEP, _payload(Opcode.STEP, steps=1, updates=[{"edge": 1, "feedback": 0, "form": 0,
     "counts": np.ones(5, dtype=np.int8)}]), BadLengthError, Status.BAD_LENGTH, "5 values, the board needs 18"),
    ("STEP sparse index", Opcode.STEP, _payload(Opcode.STEP, steps=1, updates=[{"edge": 1, "feedback": 0, "form": 1,
     "index": np.array([4, 2]), "counts": np.ones(2, dtype=np.int8)}]), OutOfRangeError, Status.OUT_OF_RANGE,
     "strictly increasing"),
    ("STEP steps", Opcode.STEP, _payload(Opcode.STEP, steps=1_000_001, updates=[]), OutOfRangeError,
     Status.OUT_OF_RANGE, "1000001"),
]  # fmt: skip


@pytest.mark.parametrize("what,opcode,payload,error,status,text", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_error_status_changes_nothing(
    rig: tuple[FpgaServer, FpgaArray], what: str, opcode: int, payload: bytes, error: type, status: Status, text: str
) -> None:
    server, array = rig
    before = server.physics.state_dict()
    with pytest.raises(error) as info:
        array.link.transact(opcode, _fenced(payload, array.link.fence))
    assert isinstance(info.value, (FpgaStatusError, InstrumentError))
    assert info.value.code == status and info.value.name == status.name
    assert text in str(info.value)
    assert same(server.physics.state_dict(), before), f"{what} changed the device"


class _BrokenPhysics(ArrayPhysics):
    def describe(self) -> dict:
        raise RuntimeError("temperature sensor offline")


def test_device_failure_is_reported_as_device_error() -> None:
    with FpgaServer(make_physics(cls=_BrokenPhysics)) as server, FpgaArray(server.resource) as array:
        with pytest.raises(DeviceFailure, match="DEVICE_ERROR: RuntimeError: temperature sensor offline") as info:
            array.describe()
        assert info.value.code == Status.DEVICE_ERROR
        assert array.identity()["model"] == "FPGA-EP-1"  # the link survives


# ------------------------------------------------------------------------------------------ raw frames


class RawClient:
    """A bare pyserial client that writes frames and reads responses, for what the driver never sends."""

    def __init__(self, resource: str) -> None:
        self.port = serial.serial_for_url(resource, timeout=2.0)
        self.reader = FrameReader()
        self.pending: list = []

    def next_frame(self) -> Frame:
        while not self.pending:
            data = self.port.read(1)
            assert data, "no response within the timeout"
            self.pending += self.reader.feed(data)
        item = self.pending.pop(0)
        assert isinstance(item, Frame), item
        return item

    def exchange(self, wire: bytes) -> Frame:
        self.port.write(wire)
        return self.next_frame()

    def call(self, seq: int, opcode: int, payload: bytes = bytes(8)) -> tuple[Status, int, bytes, bytes]:
        wire = b"\x00" + encode_frame(seq, opcode, payload)
        frame = self.exchange(wire)
        assert frame.seq == seq and frame.opcode == (opcode | 0x80)
        status, boot, body = m.decode_envelope(frame.payload)
        return status, boot, body, encode_frame(frame.seq, frame.opcode, frame.payload)


@pytest.fixture(scope="module", params=TRANSPORTS)
def raw(request: pytest.FixtureRequest) -> Iterator[tuple[FpgaServer, RawClient]]:
    with FpgaServer(make_physics(), transport=request.param) as server:
        client = RawClient(server.resource)
        yield server, client
        client.port.close()


def test_commands_wait_for_sync_after_boot(raw: tuple[FpgaServer, RawClient]) -> None:
    server, client = raw
    old = server.device.instance
    server.power_cycle()
    new = server.device.instance
    assert new != old
    before = server.physics.state_dict()
    # The old power-up's fence is refused first (precedence 6 before 7); the new one's waits for SYNC.
    status, boot, body, _ = client.call(39, Opcode.SET_PHASE, _payload(Opcode.SET_PHASE, fence=old, phase=1))
    assert status == Status.WRONG_INSTANCE and f"{old:016x}".encode() in body and f"{new:016x}".encode() in body
    status, boot, body, _ = client.call(40, Opcode.SET_PHASE, _payload(Opcode.SET_PHASE, fence=new, phase=1))
    assert status == Status.NOT_SYNCED and boot == server.device.boot and b"SYNC" in body
    assert client.call(41, Opcode.IDENTIFY)[0] == Status.OK  # read-only commands are answered
    assert same(server.physics.state_dict(), before)
    assert client.call(42, Opcode.SYNC)[0] == Status.OK
    assert client.call(43, Opcode.SET_PHASE, _payload(Opcode.SET_PHASE, fence=new, phase=1))[0] == Status.OK
    assert server.physics.phase == "FREE"


def test_bad_crc_and_bad_version_are_answered_not_executed(raw: tuple[FpgaServer, RawClient]) -> None:
    server, client = raw
    client.call(50, Opcode.SYNC)
    before = server.physics.state_dict()
    payload = _payload(Opcode.SET_PHASE, fence=server.device.instance, phase=2)
    frame = bytearray(encode_frame(51, Opcode.SET_PHASE, payload))
    frame[-3] ^= 0x10  # CRC byte
    reply = client.exchange(b"\x00" + bytes(frame))
    assert (reply.seq, m.decode_envelope(reply.payload)[0]) == (51, Status.CRC_ERROR)
    reply = client.exchange(b"\x00" + encode_frame(52, Opcode.SET_PHASE, payload, version=1))
    assert (reply.version, reply.seq, reply.opcode) == (2, 52, Opcode.SET_PHASE | 0x80)
    env = m.split_envelope(reply.payload)
    assert env.status == Status.BAD_VERSION and env.instance == server.device.instance
    assert env.body == b"protocol version 1 not supported; this device speaks 2"
    assert same(server.physics.state_dict(), before)


def test_a_retransmitted_command_is_answered_from_the_cache(raw: tuple[FpgaServer, RawClient]) -> None:
    server, client = raw
    client.call(60, Opcode.SYNC)
    payload = _payload(Opcode.APPLY_PULSES, fence=server.device.instance, edge=1, feedback=0, row_start=0, n_rows=1,
                       counts=np.full(6, 2))  # fmt: skip
    weights = server.physics.read_weights(1)
    commands = server.physics.counters["pulse_commands"]
    first = client.call(61, Opcode.APPLY_PULSES, payload)
    again = client.call(61, Opcode.APPLY_PULSES, payload)
    assert first == again and first[0] == Status.OK
    assert server.physics.counters["pulse_commands"] == commands + 1  # executed once
    assert server.counters["replayed"] >= 1
    changed = payload[:-6] + payload[-6:].replace(b"\x02", b"\x01")
    assert client.call(61, Opcode.APPLY_PULSES, changed)[0] == Status.OK  # new command
    assert server.physics.counters["pulse_commands"] == commands + 2
    np.testing.assert_allclose(server.physics.read_weights(1)[0] - weights[0], 3 * 0.001, rtol=1e-5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_bytes_never_change_the_device(raw: tuple[FpgaServer, RawClient], data: st.DataObject) -> None:
    server, client = raw
    client.call(70, Opcode.SYNC)
    valid = encode_frame(71, Opcode.APPLY_PULSES, _payload(Opcode.APPLY_PULSES, fence=server.device.instance, edge=1,
                                                            feedback=0, row_start=0, n_rows=1, counts=np.full(6, 3)))  # fmt: skip
    if data.draw(st.booleans()):
        garbage = data.draw(st.binary(max_size=300))
    else:
        mutated = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            mutated[data.draw(st.integers(0, len(mutated) - 2))] ^= data.draw(st.integers(1, 255))
        garbage = bytes(mutated)
        assume(garbage != valid)  # mutations that cancel out leave a valid command, which runs
    before = server.physics.state_dict()
    client.port.write(b"\x00" + garbage + b"\x00" + encode_frame(72, Opcode.STATUS, bytes(8)))
    # The read-only request after the garbage: once it is answered, the device has processed everything before it.
    for _ in range(1000):
        reply = client.next_frame()  # CRC_ERROR answers to the garbage may come first
        if reply.seq == 72 and reply.opcode == Opcode.STATUS | 0x80:
            break
    else:
        raise AssertionError("the device stopped answering after garbage")
    assert same(server.physics.state_dict(), before)


# ------------------------------------------------------------------------------------------ faults and retries


def _pulse_session(server: FpgaServer, array: FpgaArray, n_commands: int = 8) -> ArrayPhysics:
    """Fire ``n_commands`` pulse matrices through a faulty link; return a twin that got each exactly once."""
    twin = twin_of(array)
    commands = server.physics.counters["pulse_commands"]
    rng = np.random.default_rng(7)
    for _ in range(n_commands):
        counts = rng.integers(1, 4, size=(3, 6)).astype(np.int8)  # every command fires: no all-zero skip
        assert array.apply_pulses(1, counts)["pulses"] == twin.apply_pulses(1, counts)
    assert server.physics.counters["pulse_commands"] == commands + n_commands  # each executed once
    np.testing.assert_allclose(array.read_weights(1), twin.read_weights(1), rtol=0, atol=1e-6)
    return twin


FAULTS = [
    ("drop", FaultConfig(seed=3, drop_rate=0.3), "timeouts"),
    ("truncate", FaultConfig(seed=4, truncate_rate=0.3), "partial_frames"),
    ("corrupt", FaultConfig(seed=5, corrupt_rate=0.3), "corrupt_frames"),
    ("delay", FaultConfig(seed=6, delay_rate=0.3, delay_s=0.3), "stale_frames"),
    ("corrupt request", FaultConfig(seed=7, corrupt_request_rate=0.3), "crc_rejected"),
    ("busy", FaultConfig(seed=8, busy_rate=0.3), "busy"),
]


@pytest.mark.parametrize("what,faults,stat", FAULTS, ids=[f[0] for f in FAULTS])
def test_retransmission_recovers_and_applies_each_pulse_once(transport: str, what: str, faults: FaultConfig, stat: str) -> None:
    with FpgaServer(make_physics(), transport=transport, faults=faults) as server:
        with FpgaArray(server.resource, timeout_s=0.2, retries=8) as array:
            _pulse_session(server, array)
            assert array.stats[stat] > 0 and array.stats["retransmissions"] > 0
            if what in ("drop", "truncate", "corrupt", "delay"):
                assert server.counters["replayed"] > 0  # lost responses were answered again, not re-executed


def test_closed_connection_is_reopened() -> None:
    with FpgaServer(make_physics(), transport="tcp", faults=FaultConfig(seed=1, close_rate=0.25)) as server:
        with FpgaArray(server.resource, timeout_s=0.5, retries=6) as array:
            _pulse_session(server, array, n_commands=4)
            assert array.stats["reconnects"] > 0 and server.counters["closed_by_fault"] > 0


@pytest.mark.parametrize("faults,text", [(FaultConfig(busy_rate=1.0), "BUSY"), (FaultConfig(corrupt_request_rate=1.0), "CRC_ERROR")])
def test_bounded_retries_end_in_link_error_with_nothing_applied(faults: FaultConfig, text: str) -> None:
    physics = make_physics()
    with FpgaServer(physics, transport="pty") as server:
        array = FpgaArray(server.resource, timeout_s=0.2, retries=2)
        server.device.faults = server.faults = FaultInjector(faults)  # after the handshake
        before = physics.state_dict()
        with pytest.raises(LinkError, match=f"after 3 attempts: device answered {text}"):
            array.apply_pulses(1, np.ones((3, 6), dtype=np.int8))
        assert same(physics.state_dict(), before)
        server.device.faults = server.faults = None
        array.close()


def test_power_cycle_is_refused_by_the_fence_until_rebound(transport: str) -> None:
    with FpgaServer(make_physics(), transport=transport) as server, FpgaArray(server.resource) as array:
        array.set_input(np.array([0.5, 0.5, 0.5, 0.5]))
        array.set_phase("FREE")
        array.settle(10)
        weights = array.read_weights(1)
        first = array.bound_instance
        server.power_cycle()
        second = f"{server.device.instance:016x}"
        steps = server.physics.counters["steps"]
        with pytest.raises(InstanceChanged, match=f"bound to {first}, the board is now {second}") as info:
            array.settle(1)  # fenced: refused by the board (WRONG_INSTANCE), so it did not run
        assert (info.value.expected, info.value.actual) == (first, second)
        assert isinstance(info.value, DeviceRestarted) and server.physics.counters["steps"] == steps
        assert server.counters["wrong_instance"] == 1
        with pytest.raises(InstanceChanged):
            array.read_state()  # read-only, answered by another power-up: not the run's states
        with pytest.raises(InstanceChanged):
            array.settle(1)  # never rebinds by itself
        assert array.bound_instance == first and array.instance_id() == second
        assert array.identity()["instance"] == second
        np.testing.assert_array_equal(server.physics.read_weights(1), weights)  # conductances kept
        assert array.rebind_instance() == second == array.bound_instance
        assert all(not s.any() for s in array.read_state()[1:])  # states lost
        assert array.status()["phase"] == "HOLD" and array.link.boot == 2
        server.power_cycle()
        with pytest.raises(InstanceChanged, match=f"bound to {second}"):
            array.status()  # read-only: answered, but by another instance
        array.rebind_instance()
        array.settle(1)


def test_fault_power_cycles_are_each_refused() -> None:
    with FpgaServer(make_physics(), faults=FaultConfig(seed=1, power_cycle_rate=0.2)) as server:
        array = FpgaArray(server.resource, retries=0)
        refused = executed = 0
        for _ in range(30):
            phases = server.physics.counters["steps"]
            try:
                array.settle(1)
                executed += 1
            except InstanceChanged:
                refused += 1
                assert server.physics.counters["steps"] == phases  # a refused settle did not run
                array.rebind_instance()
        cycles = server.faults.counts["power_cycle"]
        assert refused > 0 and server.counters["boot"] == 1 + cycles
        assert server.physics.counters["steps"] == executed  # every settle that ran was acknowledged
        assert array.stats["instance_refusals"] >= refused  # (+ one absorbed while opening, if a cycle hit it)
        array.close()


# ------------------------------------------------------------------------------------------ link rate


@pytest.mark.parametrize("rate", [0, -5, float("nan"), float("inf")])
def test_invalid_link_rates_are_refused(rate: float) -> None:
    with pytest.raises(ValueRangeError, match="link rate"):
        FpgaServer(make_physics(), link_rate_bytes_per_s=rate)


def test_link_rate_paces_every_byte(transport: str) -> None:
    rate = 40_000.0  # bytes per second
    with FpgaServer(make_physics([4, 500, 3]), transport=transport, link_rate_bytes_per_s=rate) as server:
        with FpgaArray(server.resource, timeout_s=2.0) as array:
            array.read_weights(0)  # 500 x 4 float32: an 8 KB response
        sent, received = array.stats["bytes_sent"], array.stats["bytes_received"]  # closing included
        assert server.link["rx_bytes"] == sent and server.link["tx_bytes"] == received > 8000
        log = server.link_log
        assert sum(n for _, n in log) == server.link["tx_bytes"]
        slice_bytes = int(rate * 0.005)
        assert max(n for _, n in log) <= slice_bytes and len(log) >= received / slice_bytes
        # every burst left at least its own wire time after the previous one: never faster than the rate
        gaps = [(t1 - t0) * rate - n1 for (t0, _), (t1, n1) in zip(log, log[1:])]
        assert min(gaps) >= -1e-6


# ------------------------------------------------------------------------------------------ host side


def test_limits_are_checked_before_sending() -> None:
    limits = Limits(max_input_volts=0.5, max_pulses_per_device=3, pulse_budget=40, max_bit_length=31)
    with FpgaServer(make_physics()) as server, FpgaArray(server.resource, limits=limits) as array:
        before, sent = server.physics.state_dict(), array.stats["bytes_sent"]
        with pytest.raises(LimitError, match="input drive of 0.6 V exceeds the limit of 0.5 V"):
            array.set_input(np.array([0.6, 0, 0, 0]))
        with pytest.raises(LimitError, match="pulse count 4 exceeds the limit of 3"):
            array.apply_pulses(1, np.full((3, 6), 4, dtype=np.int8))
        with pytest.raises(LimitError, match="budget of 40"):
            array.apply_pulses(1, np.full((3, 6), 3, dtype=np.int8))  # 54 pulses
        with pytest.raises(LimitError, match="bit length 32"):
            array.apply_outer(1, np.zeros(3), np.zeros(6), 32)
        with pytest.raises(LimitError, match="nudge current"):
            array.set_nudge_current(np.array([2e-4, 0, 0]))
        with pytest.raises(ValueRangeError, match=r"shape \(2, 6\)"):
            array.apply_pulses(1, np.ones((2, 6), dtype=np.int8))
        with pytest.raises(ValueRangeError, match="outside Q3.12"):
            array.set_nudge_target(np.array([9.0, 0, 0]), 0.5)
        assert array.stats["bytes_sent"] == sent and same(server.physics.state_dict(), before)
        assert array.apply_pulses(1, np.full((3, 6), 2, dtype=np.int8))["pulses"] == 36
        with pytest.raises(LimitError, match="36 already sent"):
            array.apply_pulses(1, np.full((3, 6), 1, dtype=np.int8))


def test_frames_are_logged_as_hex(caplog: pytest.LogCaptureFixture) -> None:
    with FpgaServer(make_physics()) as server, FpgaArray(server.resource) as array:
        with caplog.at_level(logging.DEBUG, logger="eqprop_hil.drivers.fpga_link"):
            array.set_phase("FREE")
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("-> SET_PHASE")]
    assert sent and sent[0].split()[2].startswith("seq=") and " 00" in sent[0]
    assert any(r.getMessage().startswith("<- SET_PHASE") for r in caplog.records)


def test_closed_array_refuses_commands() -> None:
    with FpgaServer(make_physics()) as server:
        array = FpgaArray(server.resource)
        array.close()
        array.close()  # idempotent
        assert server.physics.phase == "HOLD"
        with pytest.raises(Exception, match="closed FpgaArray"):
            array.status()


def test_plugin_fixture_serves_an_fpga(fpga_resource: str) -> None:
    with FpgaArray(fpga_resource) as array:
        assert array.topology()["sizes"] == SIZES
        assert array.infer(np.zeros(4), 5).shape == (3,)
