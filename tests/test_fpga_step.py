"""STEP and APPLY_SPARSE (protocols/fpga_serial.md 5.2) through pyserial over a pty and socket://: one round trip
that equals apply_pulses + apply_outer + settle + read_state on a twin, counted as ONE pulse command, answered
from the cache when retransmitted, refused as a whole (nothing applied) when any update is bad."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import serial

from eqprop_hil.drivers.errors import LimitError
from eqprop_hil.drivers.fpga_array import FpgaArray
from eqprop_hil.drivers.fpga_link import BadLengthError, OutOfRangeError
from eqprop_hil.drivers.limits import Limits
from eqprop_hil.mock_instruments.fpga_server import FpgaServer
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ValueRangeError
from eqprop_hil.protocols.fixed_point import STATE, quantize
from eqprop_hil.protocols.fpga_updates import pulse_update
from eqprop_hil.protocols.framing import FrameReader, encode_frame

SIZES = [4, 6, 3]


def _physics() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=SIZES, skips=[(0, 2)], device=DeviceConfig(model="ideal"), seed=4))


@pytest.fixture(params=["pty", "tcp"])
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[FpgaServer, FpgaArray]]:
    with FpgaServer(_physics(), transport=request.param) as server, FpgaArray(server.resource) as array:
        yield server, array


def _executed(server: FpgaServer) -> int:
    c = server.physics.counters
    return c["pulse_commands"] + c["outer_commands"]


def _updates(rng: np.random.Generator) -> list[dict]:
    sparse = np.zeros((6, 4), dtype=np.int8)
    sparse[rng.integers(0, 6, 3), rng.integers(0, 4, 3)] = [5, -7, 2]
    return [
        {"edge": 0, "counts": sparse},  # 3 of 24 devices: sent SPARSE16
        {"edge": 1, "counts": rng.integers(-3, 4, size=(3, 6)).astype(np.int8)},  # dense
        {"edge": 2, "rows": np.array([0.5, -1.0, 0.25]), "cols": np.array([1.0, 0.0, -0.5, 0.75]), "bit_length": 8},
    ]


def test_step_equals_the_separate_commands_and_counts_once(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    twin = _physics()
    x = np.array([0.5, -0.25, 1.0, 0.125])
    for target in (array, twin):
        target.set_input(x)
        target.set_phase("FREE")
    array.settle(10)
    twin.step(10)
    before, trips = _executed(server), array.stats["round_trips"]
    rng = np.random.default_rng(1)
    for _ in range(3):
        updates = _updates(rng)
        result, states = array.step(updates, steps=2)
        fired = twin.apply_pulses(0, updates[0]["counts"]) + twin.apply_pulses(1, updates[1]["counts"])
        fired += twin.apply_outer(2, updates[2]["rows"], updates[2]["cols"], 8)
        twin.step(2)
        assert result["pulses"] == fired
        for got, want in zip(states, twin.read_state()):
            np.testing.assert_array_equal(got, quantize(want, STATE, saturate=True))
    assert _executed(server) - before == 3  # three STEPs, each ONE pulse command (five matrices' worth)
    assert array.stats["round_trips"] - trips == 3
    for e in range(3):
        np.testing.assert_allclose(array.read_weights(e), twin.read_weights(e), rtol=0, atol=1e-6)
    result, states = array.step([], steps=1)  # no update: a settle and a read, no pulse command
    assert result["pulses"] == 0 and _executed(server) - before == 3 and len(states) == 3
    assert array.apply_sparse([{"edge": 1, "counts": np.eye(3, 6, dtype=np.int8)}])["pulses"] == 3
    assert _executed(server) - before == 4


def test_a_retransmitted_step_is_answered_from_the_cache(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    fence = array.link.fence
    counts = np.zeros((3, 6), dtype=np.int8)
    counts[1, 2] = 4
    payload = m.encode_request(m.Opcode.STEP, fence=fence, steps=3, updates=[pulse_update(1, False, counts)])
    port = serial.serial_for_url(server.resource, timeout=2.0)
    try:
        reader, answers = FrameReader(), []
        before, steps = _executed(server), server.physics.counters["steps"]
        for attempt in range(2):  # the same bytes twice, as a host does after a lost response
            port.write(b"\x00" + encode_frame(0x4242, m.Opcode.STEP, payload))
            while len(answers) <= attempt:
                data = port.read(1)
                assert data, "no STEP response"
                answers += [f for f in reader.feed(data) if not isinstance(f, Exception)]
        assert len(answers) == 2 and answers[0] == answers[1]
        assert m.split_envelope(answers[0].payload).status == m.Status.OK
        assert _executed(server) - before == 1 and server.physics.counters["steps"] - steps == 3  # once
        assert server.counters["replayed"] >= 1
    finally:
        port.close()


def test_a_bad_update_refuses_the_whole_step(rig: tuple[FpgaServer, FpgaArray]) -> None:
    server, array = rig
    good = {"edge": 0, "counts": np.ones((6, 4), dtype=np.int8)}
    before = server.physics.state_dict()
    weights = [server.physics.read_weights(e) for e in range(3)]
    bad_cases = [
        ([good, {"edge": 1, "counts": np.full((3, 6), 128)}], LimitError, "exceeds the limit"),
        ([good, {"edge": 1, "counts": np.ones((6, 3), dtype=np.int8)}], ValueRangeError, "expected (3, 6)"),
        ([good, {"edge": 5, "counts": np.ones((3, 6), dtype=np.int8)}], ValueRangeError, "edge 5"),
        ([good, good], ValueRangeError, "given twice"),
        ([good, {"edge": 2, "rows": np.array([2.0, 0, 0]), "cols": np.zeros(4), "bit_length": 3}], ValueRangeError,
         "[-1, 1]"),
        ([good, {"edge": 2, "rows": np.zeros(3), "cols": np.zeros(4), "bit_length": 0}], LimitError, "bit length"),
        ([good, {"edge": 2}], ValueRangeError, "needs counts"),
    ]
    trips = array.stats["round_trips"]
    for updates, error, text in bad_cases:
        with pytest.raises(error, match=text.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            array.step(updates, steps=1)
    assert array.stats["round_trips"] == trips  # checked by the driver: nothing sent
    limits, array.limits = array.limits, Limits(pulse_budget=array.stats["pulses_sent"] + 30)
    try:  # the session's pulse budget is checked over the whole step: 24 + 18 pulses > 30
        with pytest.raises(LimitError, match="budget"):
            array.step([good, {"edge": 1, "counts": np.ones((3, 6), dtype=np.int8)}])
    finally:
        array.limits = limits
    assert array.stats["round_trips"] == trips
    # The device checks on its own (a host that skips the driver's checks): all or none there too.
    fence = array.link.fence
    wire = [pulse_update(0, False, np.ones((6, 4), dtype=np.int8)), pulse_update(1, False, np.ones(5, dtype=np.int8))]
    with pytest.raises(BadLengthError, match="update 1 dense counts holds 5 values"):
        array.link.transact(m.Opcode.STEP, m.encode_request(m.Opcode.STEP, fence=fence, steps=1, updates=wire))
    wire[1] = {"edge": 1, "feedback": 0, "form": 1, "index": np.array([3, 18]), "counts": np.ones(2, dtype=np.int8)}
    with pytest.raises(OutOfRangeError, match="strictly increasing in 0..17"):
        array.link.transact(m.Opcode.STEP, m.encode_request(m.Opcode.STEP, fence=fence, steps=1, updates=wire))
    assert server.physics.state_dict()["counters"] == before["counters"]
    for e in range(3):
        np.testing.assert_array_equal(server.physics.read_weights(e), weights[e])


def test_sparse_payload_is_smaller_than_dense_for_a_sparse_step() -> None:
    physics = ArrayPhysics(ArrayConfig(sizes=[64, 256, 10], device=DeviceConfig(model="ideal"), seed=0))
    with FpgaServer(physics) as server, FpgaArray(server.resource) as array:
        counts = np.zeros((256, 64), dtype=np.int8)
        counts[::17, ::5] = 1  # 208 of 16384 devices
        sent = array.stats["bytes_sent"]
        array.step([{"edge": 0, "counts": counts}, {"edge": 1, "counts": np.zeros((10, 256), dtype=np.int8)}], steps=1)
        step_bytes = array.stats["bytes_sent"] - sent
        assert step_bytes < 1000 < 16384  # 208 x 3 bytes + heads, not 16 KiB of dense counts
        assert server.physics.counters["pulses"] == 208
