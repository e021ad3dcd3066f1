"""Fixed-point formats and the payload codecs of every opcode: exact values, round trips over every option,
malformed payloads with the error text checked, and random payloads that never crash a decoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.protocols import fixed_point as fx
from eqprop_hil.protocols import fpga_messages as m
from eqprop_hil.protocols.errors import ProtocolError, ValueRangeError
from eqprop_hil.protocols.fpga_messages import Opcode, Status

# ------------------------------------------------------------------------------------------ fixed point


def test_formats_are_stated_exactly() -> None:
    assert (fx.Q3_12.min_value, fx.Q3_12.max_value, fx.Q3_12.step) == (-8.0, 8 - 2**-12, 2**-12)
    assert (fx.Q1_14.min_value, fx.Q1_14.max_value, fx.Q1_14.step) == (-2.0, 2 - 2**-14, 2**-14)


@pytest.mark.parametrize("fmt", [fx.Q3_12, fx.Q1_14])
def test_every_code_round_trips_exactly(fmt: fx.QFormat) -> None:
    codes = np.arange(-32768, 32768, dtype=np.int16)
    values = fx.from_raw(codes, fmt)
    np.testing.assert_array_equal(fx.to_raw(values, fmt), codes)
    np.testing.assert_array_equal(fx.decode_q(fx.encode_q(values, fmt), fmt), values)


def test_known_encodings_and_ties_to_even() -> None:
    assert fx.encode_q(np.array([0.5, -0.25, 1.0, -8.0]), fx.Q3_12).hex() == "0008" + "00fc" + "0010" + "0080"
    half = fx.Q3_12.step / 2
    np.testing.assert_array_equal(fx.to_raw(np.array([half, 3 * half]), fx.Q3_12), [0, 2])  # ties to even
    assert fx.encode_q(np.array([1.0, -1.0]), fx.Q1_14).hex() == "0040" + "00c0"  # +-1 exact in Q1.14


@pytest.mark.parametrize("bad", [8.0, -8.001, math.nan, math.inf])
def test_out_of_range_values_are_refused_with_the_value(bad: float) -> None:
    with pytest.raises(ValueRangeError, match=r"outside Q3\.12") as info:
        fx.encode_q(np.array([0.0, bad]), fx.Q3_12)
    assert "index 1" in str(info.value)


def test_saturate_clips_like_a_readout() -> None:
    out = fx.quantize(np.array([9.0, -9.0, math.nan, 0.3]), fx.Q3_12, saturate=True)
    np.testing.assert_array_equal(out[:3], [fx.Q3_12.max_value, -8.0, 0.0])
    assert abs(out[3] - 0.3) <= fx.Q3_12.step / 2


def test_int8_and_float32_codecs() -> None:
    counts = np.array([-127, 0, 5, 127], dtype=np.int16)
    np.testing.assert_array_equal(fx.decode_int8(fx.encode_int8(counts)), counts)
    with pytest.raises(ValueRangeError, match="int8"):
        fx.encode_int8(np.array([128]))
    with pytest.raises(ValueRangeError, match="integers"):
        fx.encode_int8(np.array([1.5]))
    np.testing.assert_array_equal(fx.decode_f32(fx.encode_f32(np.array([1.5, -2e-7]))), np.float32([1.5, -2e-7]))
    with pytest.raises(ValueRangeError, match="finite"):
        fx.encode_f32(np.array([math.nan]))
    with pytest.raises(ValueRangeError, match="overflows"):
        fx.encode_f32(np.array([1e39]))
    with pytest.raises(ProtocolError, match="multiple of 4"):
        fx.decode_f32(b"\x00\x00\x00")


# ------------------------------------------------------------------------------------------ payloads
V = np.array([0.5, -0.25, 1.0])
W = np.float32([[0.1, -0.2], [0.3, 0.4]]).reshape(-1)

# Every update form of STEP / APPLY_SPARSE (protocols/fpga_updates.py).
UPDATES = [
    {"edge": 0, "feedback": 0, "form": 0, "counts": np.array([-127, 0, 1, 127], dtype=np.int8)},
    {"edge": 1, "feedback": 1, "form": 1, "index": np.array([0, 7, 65535]), "counts": np.array([3, -3, 1], dtype=np.int8)},
    {"edge": 2, "feedback": 0, "form": 2, "index": np.array([5, 2**32 - 1]), "counts": np.array([-1, 2], dtype=np.int8)},
    {"edge": 3, "feedback": 0, "form": 3, "bit_length": 255, "rows": np.array([-1.0, 0.5]), "cols": np.array([0.25])},
]

# Every opcode with every option: (opcode, request fields, response fields).
CASES = [
    (Opcode.SYNC, {}, {"max_payload": 65535, "cache_depth": 16}),
    (Opcode.IDENTIFY, {}, {"vendor": "EQPROP-HIL", "model": "FPGA-EP-1", "serial": "Ünï", "firmware": "0.1.0"}),
    (Opcode.TOPOLOGY, {}, {"sizes": np.array([784, 512, 10]), "edges": np.array([0, 1, 1, 2, 0, 2]), "feedback": 1,
                           "activation": "sigmoid4"}),
    (Opcode.RESET, {}, {}),
    (Opcode.SET_INPUT, {"volts": V}, {}),
    (Opcode.SET_INPUT, {"volts": np.zeros(0)}, {}),
    *[(Opcode.SET_PHASE, {"phase": p}, {}) for p in m.PhaseCode],
    (Opcode.SET_NUDGE_CURRENT, {"amperes": np.array([1e-5, -3e-5])}, {}),
    (Opcode.SET_NUDGE_TARGET, {"beta": 0.5, "target": V}, {}),
    (Opcode.NUDGE_OFF, {}, {}),
    (Opcode.SET_GAIN, {"edge": 2, "gain": 0.25}, {}),
    (Opcode.GET_GAIN, {"edge": 2}, {"gain": 0.25}),
    *[(Opcode.SET_SCALE, {"edge": 1, "feedback": fb, "scale": 2.0}, {}) for fb in (0, 1)],
    *[(Opcode.GET_SCALE, {"edge": 1, "feedback": fb}, {"scale": 2.0}) for fb in (0, 1)],
    (Opcode.SETTLE, {"steps": 1_000_000}, {}),
    *[(Opcode.READ_STATE, {"layer": layer}, {"states": V}) for layer in (0, 2, m.ALL_LAYERS)],
    *[(Opcode.STATUS, {}, {"phase": p, "nudge_mode": n, "local_learning": lo})
      for p in m.PhaseCode for n in m.NudgeMode for lo in (0, 1)],
    *[(Opcode.APPLY_PULSES, {"edge": 0, "feedback": fb, "row_start": 3, "n_rows": 2,
                             "counts": np.array([-127, 0, 1, 127], dtype=np.int8)}, {"pulses": 255}) for fb in (0, 1)],
    *[(Opcode.APPLY_OUTER, {"edge": 1, "feedback": fb, "bit_length": bl, "rows": np.array([-1.0, 0.5]),
                            "cols": np.array([1.0, 0.0, -0.25])}, {"pulses": 7}) for fb in (0, 1) for bl in (1, 255)],
    *[(Opcode.SET_LOCAL_LEARNING, {"enabled": en, "set_beta": sb, "beta": 0.5, "eta": eta}, {})
      for en in (0, 1) for sb in (0, 1) for eta in (np.zeros(0), np.array([0.01, 0.02]))],
    *[(Opcode.GET_LOCAL_LEARNING, {}, {"enabled": en, "beta": beta, "eta": np.array([0.01, 0.0])})
      for en in (0, 1) for beta in (math.nan, -0.5)],
    (Opcode.READ_WEIGHTS, {"edge": 0, "feedback": 0, "row_start": 0, "n_rows": 2}, {"weights": W}),
    *[(Opcode.PROGRAM_WEIGHTS, {"edge": 0, "feedback": 1, "row_start": 0, "n_rows": 2, "commit": c, "tolerance": 0.01,
                                "max_iterations": 20, "weights": W}, {"staged_rows": 2, "residual": r})
      for c, r in ((0, math.nan), (1, 0.004))],
    (Opcode.TRAIN_SAMPLE, {"beta": 0.5, "t1": 30, "t2": 10, "volts": V, "target": np.array([1.0, 0.0])},
     {"output": np.array([0.25, 0.75])}),
    (Opcode.INFER, {"t1": 65535, "volts": V}, {"output": np.array([0.25, 0.75])}),
    (Opcode.DESCRIBE, {}, {"description": {"device": {"model": "ideal"}, "dt": 1.0}}),
    (Opcode.COUNTERS, {}, {"counters": {"pulses": 12, "boot": 3}}),
    (Opcode.AUTH, {"token": "s3cret-token"}, {}),
    *[(Opcode.STEP, {"steps": st_, "updates": ups}, {"pulses": 9, "states": V}) for st_ in (0, 1, 1_000_000)
      for ups in ([], UPDATES)],
    *[(Opcode.APPLY_SPARSE, {"updates": ups}, {"pulses": 9}) for ups in ([], UPDATES)],
]  # fmt: skip


def _same(a: object, b: object) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(
            x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        # float32 fields carry float32 precision; Q and integer fields are exact either way
        return np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-7)
    return a == b


def test_every_opcode_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(Opcode) == set(m.SCHEMAS)


@pytest.mark.parametrize("opcode,request_fields,response_fields", CASES, ids=[c[0].name for c in CASES])
def test_round_trip_request_and_response(opcode: Opcode, request_fields: dict, response_fields: dict) -> None:
    decoded = m.decode_request(opcode, m.encode_request(opcode, **request_fields))
    assert decoded.keys() == request_fields.keys()
    assert all(_same(request_fields[k], decoded[k]) for k in decoded), decoded
    body = m.encode_response(opcode, **response_fields)
    status, boot, rest = m.decode_envelope(m.encode_envelope(Status.OK, 7, body))
    assert (status, boot) == (Status.OK, 7)
    back = m.decode_response(opcode, rest)
    assert back.keys() == response_fields.keys()
    assert all(_same(response_fields[k], back[k]) for k in back), back


@pytest.mark.parametrize("opcode,request_fields", [(c[0], c[1]) for c in CASES if c[1]], ids=lambda x: str(x)[:20])
def test_truncated_and_padded_requests_are_refused(opcode: Opcode, request_fields: dict) -> None:
    payload = m.encode_request(opcode, **request_fields)
    with pytest.raises(ProtocolError, match="ends inside"):
        m.decode_request(opcode, payload[:-1] if payload[-1:] else payload[:0])
    with pytest.raises(ProtocolError, match="trailing byte"):
        m.decode_request(opcode, payload + b"\x00")


def test_encoders_name_the_field_at_fault() -> None:
    with pytest.raises(ValueRangeError, match=r"SET_GAIN request takes fields \['edge', 'gain'\]"):
        m.encode_request(Opcode.SET_GAIN, edge=1)
    with pytest.raises(ValueRangeError, match="field 'edge'"):
        m.encode_request(Opcode.SET_GAIN, edge=256, gain=0.5)
    with pytest.raises(ValueRangeError, match="field 'volts'.*outside Q3.12"):
        m.encode_request(Opcode.SET_INPUT, volts=np.array([9.0]))
    with pytest.raises(ValueRangeError, match="field 'gain'.*finite"):
        m.encode_request(Opcode.SET_GAIN, edge=0, gain=math.nan)
    with pytest.raises(ValueRangeError, match="exceeds 65535; send it in row chunks"):
        m.encode_response(Opcode.READ_WEIGHTS, weights=np.zeros(16384))  # 2 + 4 * 16384 bytes


def test_decoders_refuse_non_finite_floats_and_bad_text() -> None:
    nan_gain = m.encode_request(Opcode.SET_GAIN, edge=0, gain=0.0)[:9] + np.float32(np.nan).tobytes()
    with pytest.raises(ValueRangeError, match="field 'gain' holds nan; a finite float32"):  # OUT_OF_RANGE, not BAD_LENGTH
        m.decode_request(Opcode.SET_GAIN, nan_gain)
    with pytest.raises(ProtocolError, match="trailing"):  # the layout is checked before the value
        m.decode_request(Opcode.SET_GAIN, nan_gain + b"\x00")
    inf_amps = m.encode_request(Opcode.SET_NUDGE_CURRENT, amperes=np.zeros(2))[:-4] + np.float32(np.inf).tobytes()
    with pytest.raises(ValueRangeError, match="holds NaN or infinity: inf at index 1"):
        m.decode_request(Opcode.SET_NUDGE_CURRENT, inf_amps)
    with pytest.raises(ProtocolError, match="finite float32"):  # in a response it is the device's fault
        m.decode_response(Opcode.GET_GAIN, np.float32(np.nan).tobytes())
    with pytest.raises(ProtocolError, match="not UTF-8"):
        m.decode_response(Opcode.IDENTIFY, b"\x02\xff\xfe" + b"\x00" * 3)
    with pytest.raises(ProtocolError, match="not JSON"):
        m.decode_response(Opcode.DESCRIBE, b"{nope")


def test_envelope_errors() -> None:
    with pytest.raises(ProtocolError, match="unknown status code 0x42"):
        m.decode_envelope(b"\x42\x01\x00" + bytes(8))
    with pytest.raises(ProtocolError, match="lacks the 11-byte envelope"):
        m.decode_envelope(b"\x00\x01\x00")
    env = m.split_envelope(m.encode_envelope(Status.WRONG_INSTANCE, 3, b"why", 0x0123456789ABCDEF))
    assert env == (Status.WRONG_INSTANCE, 3, 0x0123456789ABCDEF, b"why")
    assert m.instance_hex(env.instance) == "0123456789abcdef"
    with pytest.raises(ProtocolError, match="lacks the 8-byte fence"):
        m.decode_request(Opcode.SYNC, b"\x00" * 7)
    assert m.request_fence(m.encode_request(Opcode.SETTLE, fence=2**64 - 1, steps=1)) == 2**64 - 1
    with pytest.raises(ValueRangeError, match="fence"):
        m.encode_request(Opcode.SYNC, fence=2**64)


def test_row_chunks_of_a_784_wide_matrix_match_the_spec() -> None:
    assert m.rows_per_chunk(784, 1, m.PULSE_FIXED) == 83  # (65535 - 14 - 2) // 784
    assert m.rows_per_chunk(784, 4, m.READ_FIXED) == 20
    assert m.rows_per_chunk(784, 4, m.PROGRAM_FIXED) == 20
    big = m.encode_request(Opcode.APPLY_PULSES, edge=0, feedback=0, row_start=0, n_rows=83,
                           counts=np.ones(83 * 784, dtype=np.int8))  # fmt: skip
    assert len(big) <= 65535
    assert len(m.encode_envelope(Status.OK, 1, m.encode_response(Opcode.READ_WEIGHTS, weights=np.zeros(20 * 784)))) <= 65535
    with pytest.raises(ValueRangeError, match="does not fit"):
        m.rows_per_chunk(20000, 4, 0)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Opcode)), st.binary(max_size=64))
def test_random_payloads_decode_or_raise_protocol_error(opcode: Opcode, payload: bytes) -> None:
    for decode in (m.decode_request, m.decode_response):
        try:
            fields = decode(opcode, payload)
        except (ProtocolError, ValueRangeError):  # layout (BAD_LENGTH) or a non-finite float (OUT_OF_RANGE)
            continue
        assert isinstance(fields, dict)
