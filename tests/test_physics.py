"""Emulator physics: dynamics checked against hand-computed values, nudge modes, converters, local learning,
validation (bad input changes nothing), reproducibility and the sim:// query parser."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eqprop_hil.mock_instruments.devices import DeviceConfig
from eqprop_hil.mock_instruments.physics import ArrayConfig, ArrayPhysics
from eqprop_hil.protocols.errors import ValueRangeError



def make(sizes, skips=(), **kw) -> ArrayPhysics:
    kw.setdefault("device", DeviceConfig(model="ideal"))
    return ArrayPhysics(ArrayConfig(sizes=list(sizes), skips=list(skips), **kw))


def program(p: ArrayPhysics, weights: dict, feedback: dict | None = None) -> None:
    for e, w in weights.items():
        assert p.program_weights(e, np.asarray(w, dtype=float)) < 1e-12
    for e, w in (feedback or {}).items():
        assert p.program_weights(e, np.asarray(w, dtype=float), feedback=True) < 1e-12


def scalar_net(activation="identity", **kw) -> ArrayPhysics:
    """1-1-1 network with a skip 0->2: W01 = 0.5, W12 = 2, W02 = 0.25, gamma_12 = 0.5, b1 = 0.1, x = 1."""
    p = make([1, 1, 1], [(0, 2)], activation=activation, **kw)
    program(p, {0: [[0.5]], 1: [[2.0]], 2: [[0.25]]})
    p.set_gain(1, 0.5)
    p.set_bias(1, [0.1])
    p.set_input([1.0])
    return p


def states(p: ArrayPhysics) -> list[float]:
    return [float(s[0]) for s in p.read_state()[1:]]


def test_free_steps_by_hand_tied_skip_and_gain():
    p = scalar_net()
    p.set_phase("FREE")
    p.step(1)  # s1 = 0.5*1 + 0.5*2*0 + 0.1 = 0.6 ; o = 2*0 + 0.25*1 = 0.25
    assert states(p) == pytest.approx([0.6, 0.25])
    p.step(1)  # s1 = 0.5 + 0.5*2*0.25 + 0.1 = 0.85 ; o = 2*0.6 + 0.25 = 1.45
    assert states(p) == pytest.approx([0.85, 1.45])
    p.set_phase("HOLD")
    p.step(5)
    assert states(p) == pytest.approx([0.85, 1.45])


def test_untied_feedback_uses_b_not_w_transpose():
    p = make([1, 1, 1], [(0, 2)], activation="identity", feedback="untied")
    program(p, {0: [[0.5]], 1: [[2.0]], 2: [[0.25]]}, {1: [[-1.0]]})
    with pytest.raises(ValueRangeError, match="out of the input"):
        p.read_weights(0, feedback=True)
    p.set_gain(1, 0.5)
    p.set_input([1.0])
    p.set_phase("FREE")
    p.step(2)  # step 1: s1 = 0.5, o = 0.25 ; step 2: s1 = 0.5 + 0.5*(-1)*0.25 = 0.375, o = 2*0.5 + 0.25 = 1.25
    assert states(p) == pytest.approx([0.375, 1.25])


def test_nudge_target_outside_and_current():
    p = scalar_net()
    p.set_phase("FREE")
    p.step(2)  # (0.85, 1.45) as above
    p.set_nudge_target([1.0], beta=0.5)
    p.set_phase("NUDGE")
    p.step(1)  # o = 2*0.85 + 0.25 + 0.5*(1 - 1.45) = 1.725 ; s1 = 0.5 + 0.5*2*1.45 + 0.1 = 2.05
    assert states(p) == pytest.approx([2.05, 1.725])
    q = scalar_net(transimpedance_ohms=1e4)
    q.set_phase("FREE")
    q.step(2)
    q.set_nudge_current([-2.25e-5])  # R*I = -0.225 V, the same nudge as beta*(y - o) above
    q.set_phase("NUDGE")
    q.step(1)
    assert states(q) == pytest.approx([2.05, 1.725])
    q.set_phase("FREE")  # the nudge acts only in NUDGE
    q.step(1)  # s1 = 0.5 + 0.5*2*1.725 + 0.1 = 2.325 ; o = 2*2.05 + 0.25 = 4.35
    assert states(q) == pytest.approx([2.325, 4.35])


def test_nudge_inside_versus_outside_rho_tanh():
    outside, inside = scalar_net("tanh"), scalar_net("tanh", nudge_placement="inside")
    for p in (outside, inside):
        p.set_phase("FREE")
        p.step(1)
        p.set_nudge_target([1.0], beta=0.5)
        p.set_phase("NUDGE")
        p.step(1)
    s1, o = math.tanh(0.6), math.tanh(0.25)  # after the free step
    u_o = 2 * s1 + 0.25
    assert states(outside)[1] == pytest.approx(math.tanh(u_o) + 0.5 * (1 - o))
    assert states(inside)[1] == pytest.approx(math.tanh(u_o + 0.5 * (1 - o)))
    assert states(inside)[0] == pytest.approx(math.tanh(0.5 + 0.5 * 2 * o + 0.1))


def test_leaky_dt():
    p = scalar_net(dt=0.5)
    p.set_phase("FREE")
    p.step(2)  # step 1: (0.3, 0.125) ; step 2: s1 = 0.3 + 0.5*(0.5 + 0.125 + 0.1 - 0.3) ; o = 0.125 + 0.5*(0.6 + 0.25 - 0.125)
    assert states(p) == pytest.approx([0.5125, 0.4875])


def reference_step(W, B, gains, biases, s, edges, rho, untied):
    """Independent per-layer loop over explicit sums (no shared code with the emulator)."""
    u = [b.copy() for b in biases]
    for e, (i, j) in enumerate(edges):
        u[j] = u[j] + W[e] @ s[i]
        if i > 0:
            u[i] = u[i] + gains[e] * ((B[e] if untied else W[e].T) @ s[j])
    return [s[0]] + [rho(u[k]) for k in range(1, len(s))]


@pytest.mark.parametrize("feedback", ["tied", "untied"])
def test_random_network_matches_reference(feedback):
    sizes, skips = [5, 7, 4, 3], [(0, 2), (1, 3)]
    p = make(sizes, skips, feedback=feedback, seed=4)
    rng = np.random.default_rng(0)
    edges = p.topology()["edges"]
    W = [rng.normal(0, 0.5, (sizes[j], sizes[i])) for i, j in edges]
    B = [rng.normal(0, 0.5, (sizes[i], sizes[j])) if i > 0 else None for i, j in edges]
    program(p, dict(enumerate(W)), {e: b for e, b in enumerate(B) if b is not None and feedback == "untied"})
    gains = [1.0, 0.3, 0.7, 1.0, 0.2]
    for e, g in enumerate(gains):
        p.set_gain(e, g)
    biases = [np.zeros(5)] + [rng.normal(0, 0.1, n) for n in sizes[1:]]
    for k in range(1, 4):
        p.set_bias(k, biases[k])
    x = rng.uniform(0, 1, 5)
    p.set_input(x)
    p.set_phase("FREE")
    p.step(15)
    rho = lambda v: 1 / (1 + np.exp(-4 * (v - 0.5)))  # noqa: E731
    s = [x] + [np.zeros(n) for n in sizes[1:]]
    for _ in range(15):
        s = reference_step(W, B, gains, biases, s, edges, rho, feedback == "untied")
    for got, want in zip(p.read_state(), s):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("feedback", ["tied", "untied"])
def test_local_learning_one_step_by_hand(feedback):
    p = make([3, 4, 2], [(0, 2)], feedback=feedback, seed=1)
    p.set_input([0.2, 0.9, 0.5])
    p.set_phase("FREE")
    p.step(10)
    eta, beta = [0.1, 0.2, 0.05], 0.5
    p.set_nudge_target([1.0, 0.0], beta)
    p.set_phase("NUDGE")
    p.step(1)  # without learning: only the output moves; the next step moves every layer
    before = [s.astype(float) for s in p.read_state()]
    w_before = {(e, fb): p.read_weights(e, fb).astype(float) for e in range(3) for fb in (False, True)
                if not fb or (feedback == "untied" and e == 1)}
    p.set_local_learning(True, eta, beta)
    p.step(1)
    after = [s.astype(float) for s in p.read_state()]
    for (e, fb), w0 in w_before.items():
        i, j = p.topology()["edges"][e]
        if feedback == "tied":
            expect = eta[e] / beta * (np.outer(after[j], after[i]) - np.outer(before[j], before[i]))
        elif not fb:
            expect = eta[e] / beta * np.outer(after[j] - before[j], before[i])
        else:
            expect = eta[e] / beta * np.outer(after[i] - before[i], before[j])
        assert np.abs(expect).max() > 1e-4
        np.testing.assert_allclose(p.read_weights(e, fb) - w0, expect, atol=2e-6)
    assert p.counters["local_updates"] == 1


def test_local_learning_pulses_capped_per_step():
    dev = DeviceConfig(model="constant", dw_min_d2d=0, dw_min_c2c=0, up_down_d2d=0, w_bounds_d2d=0, w_max=5, w_min=-5)
    p = make([2, 2], device=dev, init_scale=0.0)
    p.set_input([1.0, 1.0])
    p.set_local_learning(True, [100.0], 1.0)
    p.set_nudge_target([1.0, 1.0], 1.0)
    p.set_phase("NUDGE")
    p.step(1)  # increment = 100 * rho(0) * 1 ~ 12 in weight units >> 127 pulses * 0.001
    np.testing.assert_allclose(p.read_weights(0), np.full((2, 2), 0.127), rtol=1e-6)
    assert p.counters["pulses"] == 4 * 127


def test_learning_without_beta_refused_before_anything_moves():
    p = make([2, 2])
    p.set_local_learning(True, [0.1])
    p.set_nudge_current([1e-5, 0.0])
    p.set_phase("NUDGE")
    snap = p.state_dict()
    with pytest.raises(ValueRangeError, match="beta"):
        p.step(3)
    assert_same(snap, p.state_dict())


def test_converters_dac_adc_and_read_noise():
    p = make([3, 2], dac_bits=3, adc_bits=4, adc_range_volts=(-1.0, 1.0), activation="identity")
    p.set_input([0.3, -1.0, 0.99])  # DAC step 0.25: codes -> 0.25, -1.0, 0.75 (top code is 1 - step)
    np.testing.assert_allclose(p.read_state(0)[0], [0.25, -1.0, 0.75])
    program(p, {0: [[4.0, 0, 0], [0, 0.1, 0]]})  # ideal devices accept any weight
    p.set_phase("FREE")
    p.step(1)  # exact states (1.0, -0.1): ADC clips 1.0 to 0.875, rounds -0.1 to -0.125
    np.testing.assert_allclose(p.read_state(1)[0], [0.875, -0.125])
    with pytest.raises(ValueRangeError, match="DAC range"):
        p.set_input([0.0, 0.0, 1.5])
    noisy = make([2, 400], read_noise=0.05, seed=3, init_scale=0.0)
    reads = noisy.read_state(1)[0]
    assert reads.std() == pytest.approx(0.05, rel=0.15)


def test_power_cycle_keeps_conductances_only():
    p = make([3, 4, 2], seed=2)
    w0 = [p.read_weights(e) for e in range(2)]
    p.set_gain(1, 0.3)
    p.set_scale(0, 2.0)
    p.set_input([0.5, 0.5, 0.5])
    p.set_phase("FREE")
    p.step(5)
    p.set_local_learning(True, [0.1, 0.1], 0.5)
    p.power_cycle()
    assert p.phase == "HOLD" and p.gain(1) == 1.0 and p.local_learning[0] is False
    assert all(not s.any() for s in p.read_state())
    np.testing.assert_array_equal(p.read_weights(0), 2.0 * w0[0])
    np.testing.assert_array_equal(p.read_weights(1), w0[1])
    assert p.counters["power_cycles"] == 1


def test_train_sample_runs_free_then_learns():
    p = make([3, 4, 2], seed=5)
    p.set_local_learning(False, [0.2, 0.2], None)
    w0 = p.read_weights(1)
    out = p.train_sample(np.array([0.1, 0.8, 0.4]), np.array([1.0, 0.0]), 0.5, 20, 4)
    assert out.shape == (2,) and out.dtype == np.float32
    assert np.abs(p.read_weights(1) - w0).max() > 1e-4
    assert p.phase == "HOLD" and p.local_learning == (False, [0.2, 0.2], None)
    np.testing.assert_allclose(p.infer(np.array([0.1, 0.8, 0.4]), 20), out, atol=0.05)


def assert_same(a, b) -> None:
    """Deep equality of state_dicts (arrays compared exactly)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


BAD_CALLS = [
    ("set_input", lambda p: p.set_input([0.1, 0.2])),
    ("set_input nan", lambda p: p.set_input([0.1, np.nan, 0.0])),
    ("set_input range", lambda p: p.set_input([0.1, 2.0, 0.0])),
    ("phase", lambda p: p.set_phase("free")),
    ("compliance", lambda p: p.set_nudge_current([2e-4, 0.0])),
    ("target shape", lambda p: p.set_nudge_target([1.0], 0.5)),
    ("target beta", lambda p: p.set_nudge_target([1.0, 0.0], float("inf"))),
    ("gain", lambda p: p.set_gain(1, 1.5)),
    ("gain edge", lambda p: p.set_gain(3, 0.5)),
    ("scale", lambda p: p.set_scale(0, 0.0)),
    ("bias layer", lambda p: p.set_bias(0, [0.0, 0.0, 0.0])),
    ("counts dtype", lambda p: p.apply_pulses(1, np.zeros((2, 4)))),
    ("counts range", lambda p: p.apply_pulses(1, np.full((2, 4), 128, dtype=np.int16))),
    ("counts -128", lambda p: p.apply_pulses(1, np.full((2, 4), -128, dtype=np.int8))),
    ("counts shape", lambda p: p.apply_pulses(1, np.ones((4, 2), dtype=np.int8))),
    ("counts edge", lambda p: p.apply_pulses(-1, np.ones((2, 4), dtype=np.int8))),
    ("tied feedback", lambda p: p.apply_pulses(1, np.ones((4, 2), dtype=np.int8), feedback=True)),
    ("bit length 0", lambda p: p.apply_outer(1, np.ones(2) * 0.5, np.ones(4) * 0.5, 0)),
    ("bit length 256", lambda p: p.apply_outer(1, np.ones(2) * 0.5, np.ones(4) * 0.5, 256)),
    ("outer range", lambda p: p.apply_outer(1, np.ones(2) * 1.5, np.ones(4) * 0.5, 31)),
    ("eta length", lambda p: p.set_local_learning(True, [0.1], 0.5)),
    ("eta negative", lambda p: p.set_local_learning(True, [0.1, -0.1], 0.5)),
    ("beta zero", lambda p: p.set_local_learning(True, [0.1, 0.1], 0.0)),
    ("program range", lambda p: p.program_weights(1, np.full((2, 4), 5.0))),
    ("program nan", lambda p: p.program_weights(1, np.full((2, 4), np.nan))),
    ("tolerance", lambda p: p.program_weights(1, np.zeros((2, 4)), tolerance=0.0)),
    ("steps", lambda p: p.step(-1)),
    ("steps float", lambda p: p.step(1.5)),
    ("read layer", lambda p: p.read_state(3)),
    ("train target", lambda p: p.train_sample(np.zeros(3), np.zeros(3), 0.5, 5, 5)),
    ("train beta", lambda p: p.train_sample(np.zeros(3), np.zeros(2), 0.0, 5, 5)),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_invalid_input_changes_nothing(name, call):
    p = ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], adc_bits=9, dac_bits=7, read_noise=0.01, seed=7))
    p.set_input([0.1, 0.5, -0.2])
    p.set_phase("FREE")
    p.step(3)
    p.apply_pulses(0, np.ones((4, 3), dtype=np.int8))
    snap = p.state_dict()
    with pytest.raises(ValueRangeError):
        call(p)
    assert_same(snap, p.state_dict())


def run_session(seed: int) -> tuple[list, dict]:
    cfg = ArrayConfig.from_query({"sizes": "4,5,3", "skips": "0-2", "feedback": "untied", "seed": str(seed),
                                  "read_noise": "0.01", "adc_bits": "9", "write_noise": "1.0"})
    p = ArrayPhysics(cfg)
    p.set_input(np.linspace(0, 1, 4))
    p.set_phase("FREE")
    p.step(10)
    p.apply_outer(1, np.linspace(-1, 1, 3), np.linspace(1, -0.5, 5), 31)
    p.apply_pulses(0, np.arange(-10, 10, dtype=np.int8).reshape(5, 4))
    p.set_local_learning(True, [0.05, 0.05, 0.05], 0.5)
    p.set_nudge_target(np.array([1.0, 0.0, 0.0]), 0.5)
    p.set_phase("NUDGE")
    p.step(3)
    return p.read_state(), p.state_dict()


def test_seeded_reproducibility():
    a_reads, a_state = run_session(11)
    b_reads, b_state = run_session(11)
    assert_same(a_reads, b_reads)
    assert_same(a_state, b_state)
    c_reads, _ = run_session(12)
    assert not np.array_equal(a_reads[1], c_reads[1])


def test_from_query_parses_and_refuses():
    cfg = ArrayConfig.from_query({"sizes": "64,256,10", "skips": "0-2", "feedback": "untied", "activation": "tanh",
                                  "device": "power", "dt": "0.5", "adc_bits": "none", "dac_bits": "7",
                                  "dw_min": "0.002", "adc_range": "-1,1", "seed": "9"})
    assert cfg.sizes == [64, 256, 10] and cfg.skips == [(0, 2)] and cfg.edges == [(0, 1), (1, 2), (0, 2)]
    assert cfg.device.model == "power" and cfg.device.dw_min == 0.002 and cfg.adc_bits is None
    assert cfg.dac_bits == 7 and cfg.adc_range_volts == (-1.0, 1.0) and cfg.dt == 0.5 and cfg.seed == 9
    assert "transport" not in ArrayConfig.query_keys() and "dw_min" in ArrayConfig.query_keys()
    with pytest.raises(ValueRangeError, match="'colour'"):
        ArrayConfig.from_query({"sizes": "4,3", "colour": "red"})
    with pytest.raises(ValueRangeError, match="'dt'"):
        ArrayConfig.from_query({"sizes": "4,3", "dt": "fast"})
    for bad in ({"sizes": "4"}, {"sizes": "4,3", "skips": "0-1"}, {"sizes": "4,3", "device": "magic"},
                {"sizes": "4,3,2", "dt": "2"}, {"sizes": "4,3", "adc_bits": "40"}, {"skips": "0-2"}):
        with pytest.raises(ValueRangeError):
            ArrayConfig.from_query(bad)


def test_describe_is_json_and_counts():
    import json

    p = make([3, 4, 2], [(0, 2)], adc_bits=9)
    d = json.loads(json.dumps(p.describe()))
    assert d["device"]["model"] == "ideal" and d["adc"]["bits"] == 9 and d["topology"]["edges"][2] == [0, 2]
    fired = p.apply_pulses(1, np.full((2, 4), -3, dtype=np.int8))
    assert fired == 24 and p.counters["pulse_commands"] == 1 and p.counters["pulses"] == 24
