"""Conformance of an FPGA neuron array to protocols/fpga_serial.md (version 2), section by section.

Every test is named ``test_s<section>_...`` after the section whose rule it checks, and talks to the device
only through bytes on a pyserial port (its own frames, not the driver's), so it holds for any firmware.

    pytest tests/conformance/test_fpga_conformance.py                        # starts the emulator (pty)
    EQPROP_HIL_CONFORMANCE_FPGA=/dev/ttyUSB0 pytest tests/conformance/...   # a real board over a UART
    EQPROP_HIL_CONFORMANCE_FPGA=socket://10.0.0.7:5555 pytest ...           # a board or bridge over TCP

Against hardware the board must hold a network of at least 2 layers and 1 edge; the suite changes phase, gains,
input and (small) pulses, and puts the board back in HOLD with the nudge off and zero input at the end. Tests
that need to power-cycle the board, or the emulator's TCP service, are skipped on hardware (they say why).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import serial
from cobs import cobs

from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.fpga_messages import Opcode, Status
from eqprop_hil.protocols.fpga_updates import pulse_update
from eqprop_hil.protocols.framing import MAX_ENCODED, Frame, FrameReader, encode_frame

TARGET = os.environ.get("EQPROP_HIL_CONFORMANCE_FPGA")
HARDWARE = bool(TARGET)
needs_emulator = pytest.mark.skipif(HARDWARE, reason="needs the emulator (power cycle / server internals)")


class Client:
    """A bare host: numbered frames over pyserial, responses matched by seq; no retransmission."""

    def __init__(self, resource: str, timeout_s: float = 3.0) -> None:
        self.port = serial.serial_for_url(resource, baudrate=115200, timeout=timeout_s)
        self.reader = FrameReader()
        self.seq = int.from_bytes(os.urandom(2), "little")
        self.fence = 0
        self.pending: list[Frame] = []

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF
        return self.seq

    def send_raw(self, data: bytes) -> None:
        self.port.write(data)

    def receive(self, seq: int) -> Frame:
        """The next frame with ``seq`` (others are stale and dropped, as section 6 says a host does)."""
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for k, item in enumerate(self.pending):
                if item.seq == seq:
                    del self.pending[: k + 1]  # frames before it are stale
                    return item
            data = self.port.read(1)
            if data:
                data += self.port.read(self.port.in_waiting or 0)
                self.pending += [f for f in self.reader.feed(data) if isinstance(f, Frame)]
        raise AssertionError(f"no response with seq {seq}")

    def exchange(self, opcode: int, payload: bytes, seq: int | None = None, version: int = 2) -> tuple[Frame, m.Envelope]:
        seq = self.next_seq() if seq is None else seq
        self.send_raw(b"\x00" + encode_frame(seq, opcode, payload, version=version))
        frame = self.receive(seq)
        return frame, m.split_envelope(frame.payload)

    def call(self, opcode: Opcode, fence: int | None = None, **fields: Any) -> m.Envelope:
        payload = m.encode_request(opcode, fence=self.fence if fence is None else fence, **fields)
        return self.exchange(opcode, payload)[1]

    def ok(self, opcode: Opcode, **fields: Any) -> dict[str, Any]:
        env = self.call(opcode, **fields)
        assert env.status == Status.OK, (opcode.name, env.status.name, env.body[:200])
        return m.decode_response(opcode, env.body)

    def bind(self) -> int:
        env = self.call(Opcode.SYNC)
        assert env.status == Status.OK
        self.fence = env.instance
        return env.instance

    def close(self) -> None:
        self.port.close()


@pytest.fixture(scope="module")
def device() -> Iterator[tuple[Any, str]]:
    """(emulator server or None, resource)."""
    if HARDWARE:
        yield None, str(TARGET)
        return
    from eqprop_hil.mock_instruments.fpga_server import FpgaServer
    from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics, DeviceConfig

    physics = ArrayPhysics(ArrayConfig(sizes=[4, 6, 3], skips=[(0, 2)], feedback="untied",
                                       device=DeviceConfig(model="ideal"), seed=2))  # fmt: skip
    with FpgaServer(physics) as server:
        yield server, server.resource


@pytest.fixture(scope="module")
def client(device: tuple[Any, str]) -> Iterator[Client]:
    c = Client(device[1])
    c.bind()
    yield c
    c.bind()
    for op, fields in ((Opcode.SET_PHASE, {"phase": 0}), (Opcode.NUDGE_OFF, {})):
        c.call(op, **fields)
    c.call(Opcode.SET_INPUT, volts=np.zeros(c_sizes(c)[0]))
    c.close()


def c_sizes(c: Client) -> list[int]:
    return [int(n) for n in c.ok(Opcode.TOPOLOGY)["sizes"]]


@pytest.fixture(scope="module")
def topo(client: Client) -> dict[str, Any]:
    t = client.ok(Opcode.TOPOLOGY)
    flat = [int(v) for v in t["edges"]]
    edges = [(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)]
    sizes = [int(n) for n in t["sizes"]]
    return {"sizes": sizes, "edges": edges, "untied": bool(t["feedback"]),
            "shape": lambda e: (sizes[edges[e][1]], sizes[edges[e][0]])}  # fmt: skip


def counters(c: Client) -> dict[str, int]:
    return c.ok(Opcode.COUNTERS)["counters"]


def executed(c: Client) -> int:
    cn = counters(c)
    return int(cn.get("physics_pulse_commands", 0)) + int(cn.get("physics_outer_commands", 0))


# ------------------------------------------------------------------------------------------ 2 frames
def test_s2_response_echoes_seq_and_sets_the_response_bit(client: Client) -> None:
    frame, env = client.exchange(Opcode.STATUS, m.encode_request(Opcode.STATUS), seq=0xBEEF)
    assert (frame.version, frame.seq, frame.opcode, env.status) == (2, 0xBEEF, Opcode.STATUS | 0x80, Status.OK)


def test_s2_bad_crc_is_answered_crc_error_and_not_executed(client: Client) -> None:
    before = executed(client)
    good = encode_frame(0x1111, Opcode.APPLY_PULSES, m.encode_request(
        Opcode.APPLY_PULSES, fence=client.fence, edge=0, feedback=0, row_start=0, n_rows=1,
        counts=np.ones(1, dtype=np.int8).repeat(_cols(client, 0))))  # fmt: skip
    raw = bytearray(cobs.decode(good[:-1]))  # header + payload + CRC, before the byte stuffing
    raw[-1] ^= 0x01  # a wrong CRC, still one well-formed COBS frame (a flip after stuffing could make a 0x00)
    client.send_raw(b"\x00" + cobs.encode(bytes(raw)) + b"\x00")
    reply = client.receive(0x1111)
    assert m.split_envelope(reply.payload).status == Status.CRC_ERROR
    assert executed(client) == before


def _cols(c: Client, edge: int) -> int:
    t = c.ok(Opcode.TOPOLOGY)
    flat = [int(v) for v in t["edges"]]
    return int(t["sizes"][flat[2 * edge]])


def test_s2_empty_frames_and_leading_delimiters_are_ignored(client: Client) -> None:
    seq = client.next_seq()
    client.send_raw(b"\x00\x00\x00" + b"\x00" + encode_frame(seq, Opcode.STATUS, m.encode_request(Opcode.STATUS)))
    assert m.split_envelope(client.receive(seq).payload).status == Status.OK


def test_s2_a_truncated_frame_is_cut_off_by_the_next_delimiter(client: Client) -> None:
    good = encode_frame(client.next_seq(), Opcode.STATUS, m.encode_request(Opcode.STATUS))
    client.send_raw(b"\x00" + good[:5] + b"\x00" + good)  # a frame broken off, then a whole one
    assert m.split_envelope(client.receive(client.seq).payload).status == Status.OK


@pytest.mark.slow
def test_s2_an_oversized_frame_is_dropped_and_the_receiver_resynchronises(client: Client) -> None:
    client.send_raw(b"\x00" + b"\x01" * (MAX_ENCODED + 10))  # no delimiter past the longest frame
    seq = client.next_seq()
    client.send_raw(b"\x00" + encode_frame(seq, Opcode.STATUS, m.encode_request(Opcode.STATUS)))
    assert m.split_envelope(client.receive(seq).payload).status == Status.OK


def test_s2_1_another_version_gets_bad_version_in_a_version_2_frame(client: Client) -> None:
    before = executed(client)
    payload = m.encode_request(Opcode.APPLY_PULSES, fence=client.fence, edge=0, feedback=0, row_start=0, n_rows=1,
                               counts=np.ones(_cols(client, 0), dtype=np.int8))  # fmt: skip
    for version in (1, 3, 255):
        frame, env = client.exchange(Opcode.APPLY_PULSES, payload, version=version)
        assert frame.version == 2 and env.status == Status.BAD_VERSION
        assert f"protocol version {version} not supported".encode() in env.body and b"speaks 2" in env.body
    assert executed(client) == before


# ------------------------------------------------------------------------------------------ 3 numbers
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_s3_non_finite_floats_are_out_of_range(client: Client, value: float) -> None:
    payload = m.encode_request(Opcode.SET_GAIN, fence=client.fence, edge=0, gain=0.5)[:-4] + np.float32(value).tobytes()
    env = client.exchange(Opcode.SET_GAIN, payload)[1]
    assert env.status == Status.OUT_OF_RANGE and b"gain" in env.body


def test_s3_pulse_count_minus_128_is_out_of_range(client: Client) -> None:
    counts = np.zeros(_cols(client, 0), dtype=np.int8)
    counts[0] = -128
    env = client.call(Opcode.APPLY_PULSES, edge=0, feedback=0, row_start=0, n_rows=1, counts=counts)
    assert env.status == Status.OUT_OF_RANGE


# ------------------------------------------------------------------------------------------ 4 envelope, 4.1 fencing
def test_s4_every_response_carries_boot_and_the_same_non_zero_instance(client: Client) -> None:
    envs = [client.call(op) for op in (Opcode.STATUS, Opcode.IDENTIFY, Opcode.TOPOLOGY)]
    envs.append(client.call(Opcode.SET_GAIN, edge=99, gain=0.5))  # an error answer carries them too
    assert {e.instance for e in envs} == {client.fence} and client.fence != 0
    assert len({e.boot for e in envs}) == 1


STATE_CHANGING = [
    (Opcode.RESET, {}), (Opcode.SET_PHASE, {"phase": 1}), (Opcode.NUDGE_OFF, {}), (Opcode.SET_GAIN, {"edge": 0, "gain": 1.0}),
    (Opcode.SETTLE, {"steps": 1}), (Opcode.STEP, {"steps": 1, "updates": []}), (Opcode.APPLY_SPARSE, {"updates": []}),
    (Opcode.SET_LOCAL_LEARNING, {"enabled": 0, "set_beta": 0, "beta": 0.0, "eta": np.zeros(0)}),
]  # fmt: skip


@pytest.mark.parametrize("opcode,fields", STATE_CHANGING, ids=[o.name for o, _ in STATE_CHANGING])
def test_s4_1_a_state_changing_request_for_another_instance_is_refused(client: Client, opcode: Opcode, fields: dict) -> None:
    status_before = client.ok(Opcode.STATUS)
    for fence in (0, client.fence ^ 1):
        env = client.call(opcode, fence=fence, **fields)
        assert env.status == Status.WRONG_INSTANCE and f"{client.fence:016x}".encode() in env.body
    assert client.ok(Opcode.STATUS) == status_before


def test_s4_1_read_only_requests_ignore_the_fence(client: Client) -> None:
    for op in (Opcode.IDENTIFY, Opcode.TOPOLOGY, Opcode.STATUS, Opcode.COUNTERS, Opcode.DESCRIBE):
        assert client.call(op, fence=0x5555).status == Status.OK


def test_s4_1_a_refused_request_is_not_cached(client: Client) -> None:
    payload_bad = m.encode_request(Opcode.SET_PHASE, fence=client.fence ^ 1, phase=1)
    seq = client.next_seq()
    assert client.exchange(Opcode.SET_PHASE, payload_bad, seq=seq)[1].status == Status.WRONG_INSTANCE
    payload_good = m.encode_request(Opcode.SET_PHASE, fence=client.fence, phase=1)
    assert client.exchange(Opcode.SET_PHASE, payload_good, seq=seq)[1].status == Status.OK
    assert client.ok(Opcode.STATUS)["phase"] == 1
    client.ok(Opcode.SET_PHASE, phase=0)


@needs_emulator
def test_s4_1_a_power_cycle_draws_a_new_instance_and_refuses_the_old_fence(device: tuple[Any, str], client: Client) -> None:
    server = device[0]
    old = client.fence
    server.power_cycle()
    env = client.call(Opcode.SETTLE, steps=1)
    assert env.status == Status.WRONG_INSTANCE and env.instance != old and env.instance != 0
    assert client.call(Opcode.SETTLE, fence=env.instance, steps=1).status == Status.NOT_SYNCED
    assert client.bind() == env.instance


def test_s4_1_a_short_state_changing_payload_is_bad_length(client: Client) -> None:
    assert client.exchange(Opcode.SETTLE, b"\x01\x02")[1].status == Status.BAD_LENGTH


# ------------------------------------------------------------------------------------------ 4.2 precedence
def test_s4_2_precedence(client: Client) -> None:
    wrong = client.fence ^ 1
    assert client.exchange(0x55, m.FENCE.pack(wrong))[1].status == Status.UNKNOWN_OPCODE  # 3 before 6
    frame, env = client.exchange(Opcode.SET_PHASE | 0x80, m.FENCE.pack(client.fence) + b"\x01")  # response bit
    assert env.status == Status.UNKNOWN_OPCODE and frame.opcode == Opcode.SET_PHASE | 0x80
    assert client.exchange(Opcode.SET_GAIN, m.FENCE.pack(wrong) + b"\x01")[1].status == Status.WRONG_INSTANCE  # 6 < 8
    nan_and_long = m.encode_request(Opcode.SET_GAIN, fence=client.fence, edge=0, gain=0.5)[:-4] + np.float32(np.nan).tobytes() + b"\x00"
    assert client.exchange(Opcode.SET_GAIN, nan_and_long)[1].status == Status.BAD_LENGTH  # 8 before 9
    nan_edge = m.encode_request(Opcode.SET_GAIN, fence=client.fence, edge=99, gain=0.5)[:-4] + np.float32(np.nan).tobytes()
    assert client.exchange(Opcode.SET_GAIN, nan_edge)[1].status == Status.OUT_OF_RANGE  # 9 (names the float)
    assert b"gain" in client.exchange(Opcode.SET_GAIN, nan_edge)[1].body


# ------------------------------------------------------------------------------------------ 4.3 ranges
def _range_cases(topo: dict[str, Any]) -> list[tuple[str, Opcode, dict, Status]]:
    n0, n_out, n_edges = topo["sizes"][0], topo["sizes"][-1], len(topo["edges"])
    rows, cols = topo["shape"](0)
    return [
        ("edge", Opcode.SET_GAIN, {"edge": n_edges, "gain": 0.5}, Status.OUT_OF_RANGE),
        ("gain", Opcode.SET_GAIN, {"edge": 0, "gain": 1.01}, Status.OUT_OF_RANGE),
        ("feedback flag", Opcode.GET_SCALE, {"edge": 0, "feedback": 2}, Status.OUT_OF_RANGE),
        ("feedback of input edge", Opcode.GET_SCALE, {"edge": 0, "feedback": 1}, Status.BAD_STATE),
        ("scale", Opcode.SET_SCALE, {"edge": 0, "feedback": 0, "scale": 0.0}, Status.OUT_OF_RANGE),
        ("layer", Opcode.READ_STATE, {"layer": len(topo["sizes"])}, Status.OUT_OF_RANGE),
        ("phase", Opcode.SET_PHASE, {"phase": 3}, Status.OUT_OF_RANGE),
        ("input count", Opcode.SET_INPUT, {"volts": np.zeros(n0 + 1)}, Status.BAD_LENGTH),
        ("input volts", Opcode.SET_INPUT, {"volts": np.full(n0, 7.0)}, Status.OUT_OF_RANGE),
        ("nudge current", Opcode.SET_NUDGE_CURRENT, {"amperes": np.full(n_out, 1.0)}, Status.OUT_OF_RANGE),
        ("target count", Opcode.SET_NUDGE_TARGET, {"beta": 0.5, "target": np.zeros(n_out + 1)}, Status.BAD_LENGTH),
        ("settle steps", Opcode.SETTLE, {"steps": 1_000_001}, Status.OUT_OF_RANGE),
        ("row range", Opcode.READ_WEIGHTS, {"edge": 0, "feedback": 0, "row_start": rows, "n_rows": 1}, Status.OUT_OF_RANGE),
        ("zero rows", Opcode.READ_WEIGHTS, {"edge": 0, "feedback": 0, "row_start": 0, "n_rows": 0}, Status.OUT_OF_RANGE),
        ("pulse count length", Opcode.APPLY_PULSES, {"edge": 0, "feedback": 0, "row_start": 0, "n_rows": 1,
                                                     "counts": np.zeros(cols + 1, dtype=np.int8)}, Status.BAD_LENGTH),
        ("bit length", Opcode.APPLY_OUTER, {"edge": 0, "feedback": 0, "bit_length": 0, "rows": np.zeros(rows),
                                            "cols": np.zeros(cols)}, Status.OUT_OF_RANGE),
        ("outer value", Opcode.APPLY_OUTER, {"edge": 0, "feedback": 0, "bit_length": 4, "rows": np.full(rows, 1.5),
                                             "cols": np.zeros(cols)}, Status.OUT_OF_RANGE),
        ("enabled flag", Opcode.SET_LOCAL_LEARNING, {"enabled": 2, "set_beta": 0, "beta": 0.0, "eta": np.zeros(0)},
         Status.OUT_OF_RANGE),
        ("eta count", Opcode.SET_LOCAL_LEARNING, {"enabled": 0, "set_beta": 0, "beta": 0.0, "eta": np.zeros(n_edges + 1)},
         Status.BAD_LENGTH),
        ("eta negative", Opcode.SET_LOCAL_LEARNING, {"enabled": 0, "set_beta": 0, "beta": 0.0,
                                                     "eta": np.full(n_edges, -1.0)}, Status.OUT_OF_RANGE),
        ("learning beta 0", Opcode.SET_LOCAL_LEARNING, {"enabled": 0, "set_beta": 1, "beta": 0.0, "eta": np.zeros(0)},
         Status.OUT_OF_RANGE),
        ("commit flag", Opcode.PROGRAM_WEIGHTS, {"edge": 0, "feedback": 0, "row_start": 0, "n_rows": 1, "commit": 2,
                                                 "tolerance": 0.01, "max_iterations": 5, "weights": np.zeros(cols)},
         Status.OUT_OF_RANGE),
        ("tolerance", Opcode.PROGRAM_WEIGHTS, {"edge": 0, "feedback": 0, "row_start": 0, "n_rows": rows, "commit": 1,
                                               "tolerance": 0.0, "max_iterations": 5, "weights": np.zeros(rows * cols)},
         Status.OUT_OF_RANGE),
        ("train beta 0", Opcode.TRAIN_SAMPLE, {"beta": 0.0, "t1": 1, "t2": 1, "volts": np.zeros(n0),
                                               "target": np.zeros(n_out)}, Status.OUT_OF_RANGE),
        ("STEP steps", Opcode.STEP, {"steps": 1_000_001, "updates": []}, Status.OUT_OF_RANGE),
    ]  # fmt: skip


RANGE_NAMES = [c[0] for c in _range_cases({"sizes": [4, 6, 3], "edges": [(0, 1)], "shape": lambda e: (6, 4)})]


@pytest.mark.parametrize("name", RANGE_NAMES)
def test_s4_3_out_of_range_fields_get_their_status_and_change_nothing(client: Client, topo: dict, name: str) -> None:
    [(_, opcode, fields, status)] = [c for c in _range_cases(topo) if c[0] == name]
    before = (client.ok(Opcode.STATUS), executed(client), client.ok(Opcode.GET_GAIN, edge=0))
    env = client.call(opcode, **fields)
    assert env.status == status, (name, env.status.name, env.body[:160])
    assert env.body, "a refusal names the problem"
    assert (client.ok(Opcode.STATUS), executed(client), client.ok(Opcode.GET_GAIN, edge=0)) == before


# ------------------------------------------------------------------------------------------ 5 opcodes
@pytest.mark.parametrize("opcode", [Opcode.IDENTIFY, Opcode.TOPOLOGY, Opcode.STATUS, Opcode.GET_LOCAL_LEARNING,
                                    Opcode.DESCRIBE, Opcode.COUNTERS])  # fmt: skip
def test_s5_read_only_opcodes_answer_their_layout(client: Client, opcode: Opcode) -> None:
    assert isinstance(client.ok(opcode), dict)


def test_s5_unassigned_opcodes_are_unknown(client: Client) -> None:
    for op in (0x1C, 0x42, 0x6F, 0x71, 0x7F):
        assert client.exchange(op, m.FENCE.pack(client.fence))[1].status == Status.UNKNOWN_OPCODE


def test_s5_drive_settle_and_read_every_layer(client: Client, topo: dict) -> None:
    n0 = topo["sizes"][0]
    client.ok(Opcode.SET_INPUT, volts=np.linspace(-0.5, 0.5, n0))
    client.ok(Opcode.SET_PHASE, phase=1)
    client.ok(Opcode.SETTLE, steps=5)
    states = client.ok(Opcode.READ_STATE, layer=255)["states"]
    assert states.size == sum(topo["sizes"])
    np.testing.assert_allclose(states[:n0], np.linspace(-0.5, 0.5, n0), atol=0.01)
    client.ok(Opcode.SET_PHASE, phase=0)


def test_s5_1_a_weight_read_larger_than_one_payload_is_refused(client: Client, topo: dict) -> None:
    rows, cols = topo["shape"](0)
    if rows * cols * 4 <= 65522:
        fits = client.ok(Opcode.READ_WEIGHTS, edge=0, feedback=0, row_start=0, n_rows=rows)["weights"]
        assert fits.size == rows * cols
    else:
        env = client.call(Opcode.READ_WEIGHTS, edge=0, feedback=0, row_start=0, n_rows=rows)
        assert env.status == Status.OUT_OF_RANGE


def test_s5_2_step_is_one_pulse_command_and_returns_every_state(client: Client, topo: dict) -> None:
    rows, cols = topo["shape"](0)
    counts = np.zeros((rows, cols), dtype=np.int8)
    counts[0, 0], counts[-1, -1] = 1, -1
    before = executed(client)
    reply = client.ok(Opcode.STEP, steps=2, updates=[pulse_update(0, False, counts)])
    assert reply["pulses"] == 2 and reply["states"].size == sum(topo["sizes"])
    assert executed(client) == before + 1
    assert client.ok(Opcode.STEP, steps=1, updates=[])["pulses"] == 0 and executed(client) == before + 1
    assert client.ok(Opcode.APPLY_SPARSE, updates=[pulse_update(0, False, -counts)])["pulses"] == 2
    assert executed(client) == before + 2


def test_s5_2_a_bad_update_refuses_the_whole_step(client: Client, topo: dict) -> None:
    rows, cols = topo["shape"](0)
    good = pulse_update(0, False, np.ones((rows, cols), dtype=np.int8))
    before = executed(client)
    cases = [
        ([good, good], Status.OUT_OF_RANGE),  # one matrix twice
        ([good, {"edge": 0, "feedback": 0, "form": 1, "index": np.array([2, 1]), "counts": np.ones(2, np.int8)}],
         Status.OUT_OF_RANGE),
        ([good, {"edge": len(topo["edges"]), "feedback": 0, "form": 0, "counts": np.zeros(1, np.int8)}], Status.OUT_OF_RANGE),
        ([{"edge": 0, "feedback": 0, "form": 0, "counts": np.zeros(rows * cols + 1, np.int8)}], Status.BAD_LENGTH),
    ]  # fmt: skip
    for updates, status in cases:
        assert client.call(Opcode.STEP, steps=1, updates=updates).status == status
    bad_form = m.encode_request(Opcode.STEP, fence=client.fence, steps=1, updates=[])[:-1] + bytes([1, 0, 0, 9])
    assert client.exchange(Opcode.STEP, bad_form)[1].status == Status.OUT_OF_RANGE
    assert executed(client) == before


# ------------------------------------------------------------------------------------------ 6 cache and resync
def test_s6_a_repeated_request_is_answered_from_the_cache(client: Client, topo: dict) -> None:
    rows, cols = topo["shape"](0)
    counts = np.zeros((rows, cols), dtype=np.int8)
    counts[0, 1] = 2
    payload = m.encode_request(Opcode.STEP, fence=client.fence, steps=1, updates=[pulse_update(0, False, counts)])
    seq = client.next_seq()
    before = executed(client)
    first = client.exchange(Opcode.STEP, payload, seq=seq)[0]
    second = client.exchange(Opcode.STEP, payload, seq=seq)[0]
    assert first == second and executed(client) == before + 1
    undo = m.encode_request(Opcode.STEP, fence=client.fence, steps=1, updates=[pulse_update(0, False, -counts)])
    assert client.exchange(Opcode.STEP, undo, seq=seq)[1].status == Status.OK  # same seq, new digest: new command
    assert executed(client) == before + 2


def test_s6_sync_clears_the_cache(client: Client) -> None:
    payload = m.encode_request(Opcode.SET_PHASE, fence=client.fence, phase=0)
    seq = client.next_seq()
    client.exchange(Opcode.SET_PHASE, payload, seq=seq)
    replayed = counters(client).get("link_replayed")
    client.bind()
    client.exchange(Opcode.SET_PHASE, payload, seq=seq)
    if replayed is not None:
        assert counters(client)["link_replayed"] == replayed  # executed again, not replayed


def test_s6_stale_responses_carry_another_seq(client: Client) -> None:
    """Two requests sent back to back: each answer carries its own seq, so a host that matches seq and opcode
    can tell a late answer from the one it waits for."""
    a, b = client.next_seq(), client.next_seq()
    for seq in (a, b):
        client.send_raw(b"\x00" + encode_frame(seq, Opcode.STATUS, m.encode_request(Opcode.STATUS)))
    assert client.receive(a).seq == a and client.receive(b).seq == b


# ------------------------------------------------------------------------------------------ 7 session, 7.2 TCP
def _tcp(device: tuple[Any, str]) -> tuple[str, int]:
    resource = device[1]
    if not resource.startswith("socket://"):
        pytest.skip("section 7.2 applies to a TCP service; the target is a serial port")
    host, port = resource.removeprefix("socket://").rsplit(":", 1)
    return host, int(port)


@pytest.fixture(scope="module")
def tcp_device(device: tuple[Any, str]) -> Iterator[tuple[Any, str]]:
    if HARDWARE:
        yield device
        return
    from eqprop_hil.mock_instruments.fpga_server import FpgaServer

    with FpgaServer(device[0].physics, transport="tcp", handshake_timeout_s=1.0, send_timeout_s=2.0) as server:
        yield server, server.resource


def test_s7_2_a_silent_stranger_does_not_lock_the_host_out(tcp_device: tuple[Any, str]) -> None:
    address = _tcp(tcp_device)
    stranger = socket.create_connection(address, timeout=5)
    try:
        host = Client(tcp_device[1])
        try:
            host.bind()
            assert host.ok(Opcode.STATUS) is not None  # served while the stranger holds its connection
        finally:
            host.close()
    finally:
        stranger.close()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the device closed the connection of a client that does not read
        sock.sendall(data)


def test_s7_2_up_to_eight_connections_are_served_at_once_a_ninth_is_closed(tcp_device: tuple[Any, str]) -> None:
    address = _tcp(tcp_device)
    held = 1 if HARDWARE else 0  # on a TCP target the module's own client holds one of the 8 connections
    time.sleep(0.2)  # let the device notice the connections earlier tests closed
    clients = [Client(tcp_device[1]) for _ in range(8 - held)]
    try:
        for c in clients:
            assert c.call(Opcode.STATUS).status == Status.OK
        with socket.create_connection(address, timeout=10) as ninth:
            assert ninth.recv(1) == b""  # closed at once, without an answer
    finally:
        for c in clients:
            c.close()


@pytest.mark.slow
def test_s7_2_a_silent_connection_is_closed_after_the_handshake_timeout(tcp_device: tuple[Any, str]) -> None:
    address = _tcp(tcp_device)
    limit = 5.0 if HARDWARE else 1.0
    with socket.create_connection(address, timeout=limit + 10) as stranger:
        assert stranger.recv(1) == b""  # closed by the device, no answer


@pytest.mark.slow
def test_s7_2_a_client_that_never_reads_stalls_only_itself(tcp_device: tuple[Any, str]) -> None:
    address = _tcp(tcp_device)
    hog = socket.create_connection(address, timeout=5)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        request = b"\x00" + encode_frame(1, Opcode.DESCRIBE, m.encode_request(Opcode.DESCRIBE))
        threading.Thread(target=_send_quietly, args=(hog, request * 20000), daemon=True).start()  # never reads
        host = Client(tcp_device[1])
        try:
            host.bind()
            for _ in range(20):
                assert host.call(Opcode.STATUS).status == Status.OK
        finally:
            host.close()
    finally:
        hog.close()


