"""The emulator's fast paths keep the model: stochastic rounding by thinning has the dense rule's distribution, the
compiled kernels are their own Python source run by the interpreter,
sparse pulses are the dense pulses draw for draw, the cached input drive and the in-place refreshed effective
matrices give the floats a full recomputation gives, and the sparse pulse command refuses bad input untouched.

Statistical checks use enough draws that a tolerance of ~4-5 standard errors is still tight; the seeds are fixed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import physics as physics_bench
from eqprop_hil.mock_instruments import kernels, rounding
from eqprop_hil.mock_instruments.devices import DeviceArray, DeviceConfig
from eqprop_hil.mock_instruments.physics import ACTIVATIONS, ACTIVATIONS_INPLACE, ArrayConfig, ArrayPhysics
from eqprop_hil.protocols.errors import ValueRangeError

from .test_physics import assert_same


def per_device_counts(flat_counts: list[tuple[np.ndarray, np.ndarray]], size: int) -> np.ndarray:
    """(draws, size) dense counts from a list of sparse (flat, counts) results."""
    out = np.zeros((len(flat_counts), size), dtype=np.int64)
    for k, (flat, counts) in enumerate(flat_counts):
        assert flat.dtype == np.int64 and counts.dtype == np.int64
        assert np.all(np.diff(flat) > 0) and np.all(counts != 0)  # the sparse form the devices take
        out[k, flat] = counts
    return out


def thinned_rows(state: np.ndarray, p: float, n: int, draws: int) -> np.ndarray:
    """(draws, n) hits of a one-row matrix whose every |q| is p (<= THIN_BOUND: every candidate is kept, so the
    hits are the candidate process itself)."""
    q = np.full((1, n), p)
    hits = np.zeros((draws, n), dtype=bool)
    for k in range(draws):
        flat, counts = rounding.round_matrix(state, q, 127)
        assert np.all(np.diff(flat) > 0) and np.all(counts == 1)
        hits[k, flat] = True
    return hits


def test_thinning_candidates_are_independent_with_probability_p() -> None:
    p, n, draws = 0.03, 200, 20000
    assert p <= rounding.THIN_BOUND
    hits = thinned_rows(rounding.new_state(0), p, n, draws)
    freq = hits.mean(axis=0)  # every position: Bernoulli(p), standard error sqrt(p (1 - p) / draws) ~ 0.0012
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / draws)
    total = hits.sum(axis=1)  # Binomial(n, p): mean 6, variance 5.82
    assert total.mean() == pytest.approx(n * p, abs=5 * np.sqrt(n * p * (1 - p) / draws))
    assert total.var() == pytest.approx(n * p * (1 - p), rel=0.05)
    pair = (hits[:, :-1] & hits[:, 1:]).mean()  # neighbours independent (no gap structure leaks through)
    assert pair == pytest.approx(p * p, abs=5 * np.sqrt(p * p / (draws * (n - 1))))


def test_thinning_with_a_tiny_probability_neither_overflows_nor_loses_pulses() -> None:
    state = rounding.new_state(1)
    n, p, draws = 10**6, 5e-6, 400  # ~5 pulses per draw over a million devices; 1e-300 below: none, no overflow
    sizes = [rounding.round_matrix(state, np.full((1, n), p), 127)[0].size for _ in range(draws)]
    assert np.mean(sizes) == pytest.approx(n * p, abs=5 * np.sqrt(n * p / draws))
    assert rounding.round_matrix(state, np.full((2, 1000), 1e-300), 127)[0].size == 0


def test_the_generator_is_uniform_seeded_and_the_kernels_are_their_interpreted_code() -> None:
    """xoshiro256**: uniform on [0, 1), the same stream from the same seed; each compiled kernel draws and returns
    what its Python source (``py_func``, run by the interpreter on numpy scalars) does."""
    u = kernels.uniforms(rounding.new_state(3), 200_000)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert u.mean() == pytest.approx(0.5, abs=5 * np.sqrt(1 / 12 / u.size))
    assert u.var() == pytest.approx(1 / 12, rel=0.01)
    assert np.corrcoef(u[:-1], u[1:])[0, 1] == pytest.approx(0.0, abs=5 / np.sqrt(u.size))
    np.testing.assert_array_equal(u[:50], kernels.uniforms(rounding.new_state(3), 50))
    assert not np.array_equal(u[:50], kernels.uniforms(rounding.new_state(4), 50))

    rng = np.random.default_rng(12)
    quanta = np.concatenate([rng.normal(0, 0.05, (3, 40)), rng.normal(0, 2.0, (2, 40)), np.zeros((1, 40))])
    av, bv = rng.normal(0, 0.2, 7), rng.uniform(0, 1, 9)
    rows, cols = np.array([0, 2, 3, 5, 8, 9, 11]), np.array([1, 2, 4, 5, 6, 7, 8, 10, 12])
    out = [np.zeros(400, dtype=np.int64) for _ in range(4)]
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design; numpy scalars warn when it does
        for fn, args in [(kernels.round_rows, (quanta, 127, rounding.THIN_BOUND)),
                         (kernels.round_rank1, (av, rows, bv, cols, 13, 127, rounding.THIN_BOUND))]:
            state_c, state_i = rounding.new_state(5), rounding.new_state(5)
            m_c = fn(state_c, *args, out[0], out[1])
            m_i = fn.py_func(state_i, *args, out[2], out[3])
            assert m_c == m_i > 0
            np.testing.assert_array_equal(out[0][:m_c], out[2][:m_i])
            np.testing.assert_array_equal(out[1][:m_c], out[3][:m_i])
            np.testing.assert_array_equal(state_c, state_i)
    for model in (0, 1, 2):
        arrays = [rng.uniform(-0.3, 0.3, 50), np.full(50, -0.6), np.full(50, 0.6), rng.uniform(5e-4, 15e-4, 50),
                  rng.uniform(5e-4, 15e-4, 50), np.arange(50) == 7, np.zeros(50)]  # device 7 stuck
        twin = [a.copy() for a in arrays]
        pulses = (np.array([1, 4, 7, 30]), np.array([3, -1, 255, -2]))
        states = [rounding.new_state(6), rounding.new_state(7)], [rounding.new_state(6), rounding.new_state(7)]
        kernels.pulse_trains(*arrays, *pulses, model, 1.5, 0.7, 0.3, states[0][0], 1e-4, states[0][1])
        kernels.pulse_trains.py_func(*twin, *pulses, model, 1.5, 0.7, 0.3, states[1][0], 1e-4, states[1][1])
        for a, b in zip(arrays + states[0], twin + states[1]):
            np.testing.assert_array_equal(a, b)
        moved = np.flatnonzero(arrays[6])
        assert moved.tolist() == [1, 4, 30]  # written devices got write noise; the stuck one did not move
    z = np.empty(200_001)  # an odd count: the last pair's second number is dropped
    kernels.fill_normals(rounding.new_state(8), z)
    assert z.mean() == pytest.approx(0.0, abs=5 / np.sqrt(z.size)) and z.var() == pytest.approx(1.0, rel=0.015)
    assert np.mean(np.abs(z) > 3) == pytest.approx(0.0027, abs=0.0005)  # the tails of a normal, not of a uniform


@pytest.mark.parametrize("scale", [0.9, 40.0], ids=["thinning", "dense"])
def test_round_outer_is_unbiased_independent_and_one_quantum_off(scale: float) -> None:
    """scale 0.9: max |q| <= 0.1 (candidates + thinning); scale 40: |q| up to 4.4 (one uniform per device)."""
    state = rounding.new_state(2)
    a = np.array([0.11, -0.05, 0.0, 0.02, -0.1])
    b = np.array([1.0, 0.0, 0.4, -0.7])  # a zero row and a zero column: q == 0 there, never a pulse
    q = scale * np.outer(a, b)
    assert (np.abs(q).max() <= rounding.THIN_BOUND) == (scale < 1)
    draws = per_device_counts([rounding.round_outer(state, scale, a, b, 127) for _ in range(40000)], q.size)
    floor = np.floor(q).ravel()
    assert np.all((draws == floor) | (draws == floor + 1))  # never more than one quantum off
    frac = q.ravel() - floor
    se = np.sqrt(frac * (1 - frac) / draws.shape[0])
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - q.ravel()), 5 * se + 1e-12)  # unbiased, every device
    assert not draws[:, q.ravel() == 0].any()
    live = np.flatnonzero(frac > 0)
    corr = np.corrcoef(draws[:, live].T.astype(float))  # independent devices: no correlation beyond the noise
    assert np.abs(corr - np.eye(live.size)).max() < 5 / np.sqrt(draws.shape[0])


def test_round_matrix_matches_the_dense_rule_in_distribution() -> None:
    rng, state = np.random.default_rng(3), rounding.new_state(3)
    q = np.array([[0.08, -0.02, 0.0], [0.001, -0.08, 0.05]])  # row bounds 0.08: thinning
    thin = per_device_counts([rounding.round_matrix(state, q, 127) for _ in range(60000)], q.size)
    dense = np.stack([rounding.dense_counts(rng, q, 127).ravel() for _ in range(60000)])
    se = np.sqrt(np.abs(q.ravel()) * (1 - np.abs(q.ravel())) / 60000)
    for draws in (thin, dense):
        np.testing.assert_array_less(np.abs(draws.mean(axis=0) - q.ravel()), 5 * se + 1e-12)
        assert set(np.unique(draws)) <= {-1, 0, 1}
    big = np.array([[1e30, -1000.0], [2.5, -0.5]])  # over the bound: the dense rule, capped (no int64 overflow)
    flat, counts = rounding.round_matrix(state, big, 127)
    assert counts[:2].tolist() == [127, -127] and counts[2] in (2, 3)
    assert rounding.round_matrix(state, np.zeros((3, 3)), 127)[0].size == 0


DEVICE_CASES = {
    "soft_bounds": dict(model="soft_bounds"),
    "noisy": dict(model="soft_bounds", write_noise=1.0, stuck_fraction=0.2, drift_nu=0.05),
    "power": dict(model="power", gamma_up=1.5, gamma_down=0.7),
    "constant": dict(model="constant"),
    "ideal": dict(model="ideal"),
}


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_sparse_pulse_is_the_dense_pulse_draw_for_draw(case: str) -> None:
    cfg = DeviceConfig(**DEVICE_CASES[case])
    shape = (30, 20)
    init = np.random.default_rng(4).uniform(-0.3, 0.3, shape)
    dense = DeviceArray(cfg, shape, init, np.random.SeedSequence(9))
    sparse = DeviceArray(cfg, shape, init, np.random.SeedSequence(9))
    rng = np.random.default_rng(5)
    for t in range(6):
        counts = rng.integers(-4, 5, shape) * (rng.random(shape) < 0.1)
        counts[0, 0] = 200 if t == 0 else 0  # one long train (the prefix loop) in the first command
        flat = np.flatnonzero(counts)
        moved_dense = dense.pulse(counts, now=10.0 * t)
        moved_sparse = sparse.pulse_sparse(flat, counts.ravel()[flat], now=10.0 * t)
        np.testing.assert_array_equal(moved_dense, moved_sparse)
        assert_same(dense.state(), sparse.state())
        np.testing.assert_array_equal(dense.visible(10.0 * t + 3), sparse.visible(10.0 * t + 3))
        np.testing.assert_array_equal(sparse.visible_at(flat, 10.0 * t + 3), sparse.visible(10.0 * t + 3).ravel()[flat])
    assert not np.array_equal(dense.w, init)


def test_pulse_sparse_refuses_malformed_input() -> None:
    d = DeviceArray(DeviceConfig(), (4, 3), np.zeros((4, 3)), np.random.SeedSequence(0))
    before = d.state()
    for flat, counts in [([3, 1], [1, 1]), ([0, 12], [1, 1]), ([-1], [1]), ([1], [256]), ([1, 2], [1]),
                         (np.array([1.0]), [1])]:
        with pytest.raises(ValueRangeError):
            d.pulse_sparse(np.asarray(flat), np.asarray(counts))
    assert_same(before, d.state())


def board(feedback: str, seed: int = 6) -> ArrayPhysics:
    cfg = ArrayConfig(sizes=[12, 20, 7, 4], skips=[(0, 2), (1, 3)], feedback=feedback, seed=seed)
    return ArrayPhysics(cfg)


@pytest.mark.parametrize("feedback", ["tied", "untied"])
def test_cached_input_drive_gives_the_states_of_a_full_recomputation(feedback: str) -> None:
    """Twin boards, one of which forgets its cached drive before every step: same floats, through weight writes
    (pulses, outer trains, programming, local learning), scale changes and new inputs."""
    a, b = board(feedback=feedback), board(feedback=feedback)
    x = np.random.default_rng(7).uniform(0, 1, (3, 12))

    def both(action) -> None:
        action(a)
        action(b)

    def steps(n: int) -> None:
        for _ in range(n):
            a.step(1)
            b._drive.clear()
            b.step(1)
            assert_same(a.state_dict(), b.state_dict())

    both(lambda p: (p.set_input(x[0]), p.set_phase("FREE")))
    steps(5)
    both(lambda p: p.apply_pulses(0, np.eye(20, 12, dtype=np.int8) * 3))
    steps(2)
    both(lambda p: p.apply_outer(3, np.full(7, 0.5), np.linspace(-1, 1, 12), 31))  # the skip out of the input
    steps(2)
    both(lambda p: p.set_scale(0, 1.7))
    steps(2)
    both(lambda p: p.program_weights(0, np.clip(p.read_weights(0), -0.2, 0.2).astype(float), tolerance=0.05))
    steps(2)
    both(lambda p: p.set_input(x[1]))
    steps(2)
    both(lambda p: (p.set_local_learning(True, [0.05, 0.05, 0.05, 0.05, 0.05], 0.5),
                    p.set_nudge_target(np.array([1.0, 0, 0, 0]), 0.5), p.set_phase("NUDGE")))
    steps(4)
    assert a.counters["local_updates"] == 4 and a.counters["pulses"] > 0
    for e in range(5):  # the cached effective matrices, refreshed in place, equal a full re-read
        for fb in (False, True):
            key = (e, fb)
            if key in a._cache:
                device = a._device(key)
                np.testing.assert_array_equal(a._cache[key], a.scale(e, fb) * device.visible(a.clock))


@pytest.mark.parametrize("largest", [0.08, 0.7], ids=["thinning", "dense"])
def test_local_learning_fires_the_expected_number_of_pulses(largest: float) -> None:
    """Tied C-EP on real devices: over many repeats of one step the mean pulse count per device is the quanta
    ``eta / beta * (outer(s'_j, s'_i) - outer(s_j, s_i)) / (scale * dw_min)``, on the rank-1 input edge and on the
    hidden edge alike, with the largest |quanta| below the thinning bound and above it."""
    quiet = dict(model="constant", dw_min_d2d=0.0, dw_min_c2c=0.0, up_down_d2d=0.0, w_bounds_d2d=0.0,
                 w_max=100.0, w_min=-100.0)
    p = ArrayPhysics(ArrayConfig(sizes=[6, 5, 3], device=DeviceConfig(**quiet), seed=8))
    p.set_input(np.array([0.0, 0.2, 0.9, 0.5, 0.0, 1.0]))  # dark inputs: columns that never fire
    p.set_phase("FREE")
    p.step(40)
    p.set_nudge_target(np.array([1.0, 0.0, 0.0]), 0.5)
    p.set_phase("NUDGE")
    p.step(1)
    old = p._states
    new = p._next_states()
    beta, draws = 0.5, 3000
    rule = [np.outer(new[j], new[i]) - np.outer(old[j], old[i]) for i, j in p.edges]
    eta = [largest * beta * 0.001 / np.abs(r).max() for r in rule]  # largest |quanta| = `largest` on each edge
    p.set_local_learning(True, eta, beta)
    expect = [eta[e] / beta * rule[e] / 0.001 for e in range(2)]
    got = [np.zeros(q.shape) for q in expect]
    for _ in range(draws):  # the same step over and over: only the rounding is random
        before = [d.w.copy() for d in p._w]
        p._local_update(old, new, beta)
        for e, d in enumerate(p._w):
            got[e] += np.rint((d.w - before[e]) / 0.001)
    for q, n in zip(expect, got):
        assert np.abs(q).max() == pytest.approx(largest)
        se = np.sqrt(np.abs(q) * (1 - np.abs(q)) / draws)
        np.testing.assert_array_less(np.abs(n / draws - q), 5 * se + 1e-9)
    assert not got[0][:, [0, 4]].any()
    assert p.counters["local_updates"] == draws


def sparse_board() -> ArrayPhysics:
    return ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], device=DeviceConfig(write_noise=0.5), seed=10))


def test_apply_pulses_sparse_equals_the_dense_command() -> None:
    a, b = sparse_board(), sparse_board()
    counts = np.zeros((4, 3), dtype=np.int8)
    counts[0, 1], counts[2, 2], counts[3, 0] = 5, -127, 1
    flat = np.flatnonzero(counts)
    assert a.apply_pulses(0, counts) == b.apply_pulses_sparse(0, flat, counts.ravel()[flat]) == 133
    assert b.apply_pulses_sparse(1, np.array([], dtype=np.int64), np.array([], dtype=np.int8)) == 0
    for _ in range(2):  # one command each, as the two sparse ones
        a.apply_pulses(1, np.zeros((2, 4), dtype=np.int8))
    assert b.apply_pulses_sparse(1, np.array([2, 5], dtype=np.uint16), np.array([0, 0], dtype=np.int8)) == 0
    assert_same(a.state_dict(), b.state_dict())


BAD_SPARSE = {
    "not increasing": ([5, 2], [1, 1]),
    "repeated": ([2, 2], [1, 1]),
    "outside": ([0, 12], [1, 1]),
    "negative": ([-1, 3], [1, 1]),
    "count 128": ([1], [128]),
    "count -128": ([1], [-128]),
    "float counts": ([1], [1.0]),
    "float index": ([1.0], [1]),
    "lengths": ([1, 2], [1]),
    "2-d": ([[1, 2]], [[1, 1]]),
}


@pytest.mark.parametrize("name", BAD_SPARSE)
def test_apply_pulses_sparse_refuses_bad_input_and_changes_nothing(name: str) -> None:
    p = sparse_board()
    p.apply_pulses(0, np.ones((4, 3), dtype=np.int8))
    snap = p.state_dict()
    index, counts = BAD_SPARSE[name]
    with pytest.raises(ValueRangeError):
        p.apply_pulses_sparse(0, np.asarray(index), np.asarray(counts))
    assert_same(snap, p.state_dict())


def test_benchmark_quick_prints_the_table_and_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "physics.json"
    physics_bench.main(["--quick", "--sizes", "8,16,4", "--out", str(out)])
    text = capsys.readouterr().out
    assert "Emulator physics per call" in text and "soft_bounds ms" in text and "ideal ms" in text
    data = json.loads(out.read_text())
    for model in ("soft_bounds", "ideal"):
        figures = data["ms_per_call"][model]
        assert set(figures) == {"train_sample", "train_sample (preset eta)", "infer", "step free", "step nudged+learn", "read_state",
                                "apply_pulses (128 nz)", "apply_outer (bl 31)"}
        assert all(v > 0 for v in figures.values())


@pytest.mark.parametrize("feedback", ["tied", "untied"])
def test_ideal_board_is_bit_for_bit_the_plain_formulas(feedback: str) -> None:
    """The fast paths (one vector per step, in-place activation, cached drive, buffered increments, in-place cache
    refresh) change no float on ideal devices: the states and weights equal, exactly, the rule written plainly
    (docs/dynamics.md: u_k = b_k + sum of edge terms in edge order; C-EP / C-VF increments, effective = scale * w)."""
    sizes, skips = [6, 9, 5, 4], [(0, 2), (1, 3)]
    p = ArrayPhysics(ArrayConfig(sizes=sizes, skips=skips, feedback=feedback, device=DeviceConfig(model="ideal"),
                                 seed=11))
    untied = feedback == "untied"
    edges = p.topology()["edges"]
    gains, scales = [1.0, 0.4, 1.0, 1.0, 0.8], [2.0, 1.0, 0.5, 1.0, 1.0]
    biases = [np.zeros(6)] + [np.linspace(-0.1, 0.2, n) for n in sizes[1:]]
    eta, beta = [0.02, 0.03, 0.01, 0.02, 0.015], 0.4
    for e in range(5):
        p.set_gain(e, gains[e])
        p.set_scale(e, scales[e])
    for k in range(1, 4):
        p.set_bias(k, biases[k])
    w = [p._w[e].w.copy() for e in range(5)]  # device units; effective = scale * w
    b = [p._b[e].w.copy() if p._b[e] is not None else None for e in range(5)]
    rho = lambda v: 0.5 * (1.0 + np.tanh(2.0 * (v - 0.5)))  # noqa: E731

    def plain_step(s: list[np.ndarray], y: np.ndarray | None) -> list[np.ndarray]:
        u = [bias.copy() for bias in biases]
        for e, (i, j) in enumerate(edges):
            u[j] += (scales[e] * w[e]) @ s[i]
            if i >= 1:
                u[i] += gains[e] * ((1.0 * b[e] if untied else (scales[e] * w[e]).T) @ s[j])
        new = [s[0]] + [rho(u[k]) for k in range(1, 4)]
        if y is not None:
            new[3] = new[3] + beta * (y - s[3])
        return new

    x, y = np.linspace(0.0, 1.0, 6), np.array([1.0, 0.0, 0.0, 0.0])
    p.set_local_learning(True, eta, beta)
    for sample in range(3):
        out = p.train_sample(x * (sample + 1) / 3, y, beta, 12, 5)
        s = [x * (sample + 1) / 3] + [np.zeros(n) for n in sizes[1:]]
        for _ in range(12):
            s = plain_step(s, None)
        np.testing.assert_array_equal(out, s[3].astype(np.float32))
        for _ in range(5):
            new = plain_step(s, y)
            for e, (i, j) in enumerate(edges):
                rate = eta[e] / beta
                if untied:
                    w[e] += rate * np.outer(new[j] - s[j], s[i]) / scales[e]
                    if i >= 1:
                        b[e] += rate * np.outer(new[i] - s[i], s[j])
                else:
                    w[e] += rate * (np.outer(new[j], new[i]) - np.outer(s[j], s[i])) / scales[e]
            s = new
        for e in range(5):
            np.testing.assert_array_equal(p._w[e].w, w[e])
            if b[e] is not None:
                np.testing.assert_array_equal(p._b[e].w, b[e])
        for got, want in zip(p._states, s):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_in_place_activations_are_the_activations(name: str) -> None:
    x = np.random.default_rng(12).normal(0.5, 2.0, 1000)
    x[:4] = [0.5, -0.0, 1e300, -1e-300]
    y = x.copy()
    ACTIVATIONS_INPLACE[name](y)
    np.testing.assert_array_equal(y, ACTIVATIONS[name](x))


DYNAMICS_CASES = {
    "tied sigmoid4": dict(),
    "untied tanh, skips": dict(feedback="untied", activation="tanh", skips=[(0, 2), (1, 3)]),
    "hard_sigmoid, leaky": dict(activation="hard_sigmoid", dt=0.3, skips=[(0, 3)]),
    "identity, nudge inside": dict(activation="identity", nudge_placement="inside", skips=[(1, 3)]),
}


@pytest.mark.parametrize("case", DYNAMICS_CASES)
@pytest.mark.parametrize("nudge", ["target", "current"])
def test_compiled_dynamics_follow_the_plain_rule(case: str, nudge: str) -> None:
    """Real devices step through kernels.relax (a different order of float adds): the states stay within float64
    round-off of the vectorised rule (_next_states_numpy), free and nudged, with gains, biases and scales set."""
    p = ArrayPhysics(ArrayConfig(sizes=[7, 9, 6, 4], seed=13, **DYNAMICS_CASES[case]))
    assert p._compiled
    for e, gain in enumerate([1.0, 0.5, 0.2, 0.7, 0.9][:len(p.edges)]):
        p.set_gain(e, gain)
    p.set_scale(1, 1.6)
    p.set_bias(2, np.linspace(-0.2, 0.3, 6))
    p.set_input(np.linspace(0.0, 1.0, 7))
    p.set_phase("FREE")
    for phase in ("FREE", "NUDGE"):
        if phase == "NUDGE":
            if nudge == "target":
                p.set_nudge_target(np.array([1.0, 0.0, 0.0, 1.0]), 0.4)
            else:
                p.set_nudge_current(np.array([2e-5, -1e-5, 0.0, 3e-5]))
            p.set_phase("NUDGE")
        start = p._states
        plain = start
        for _ in range(6):
            p._states = plain
            plain = p._next_states_numpy()
        p._states = start
        compiled = p._relax(6)
        for a, b in zip(plain, compiled):
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13)
        assert not np.array_equal(compiled[-1], start[-1])
        p._states = compiled


@pytest.mark.parametrize("feedback", ["tied", "untied"])
def test_one_call_nudged_phase_is_the_step_by_step_path_draw_for_draw(feedback: str) -> None:
    """kernels.relax_learn (train_sample's nudged phase in one call) equals one step of kernels.relax followed by
    kernels.local_step, repeated: the same states, weights, effective matrices, noise and random states, exactly,
    on noisy soft-bounds devices with write noise and stuck devices, over a skip edge."""
    device = DeviceConfig(write_noise=0.5, stuck_fraction=0.1)

    def make() -> ArrayPhysics:
        q = ArrayPhysics(ArrayConfig(sizes=[8, 12, 5], skips=[(0, 2)], feedback=feedback, device=device, seed=14))
        q.set_local_learning(True, [0.02, 0.05, 0.03], None)
        q.set_input(np.r_[np.zeros(3), np.linspace(0.2, 1.0, 5)])  # dark pixels: rank-1 columns skipped
        q.set_phase("FREE")
        q.step(20)
        q.set_nudge_target(np.array([0.0, 1.0, 0.0, 0.0, 0.0]), 0.5)
        q.set_phase("NUDGE")
        return q

    fused, stepwise = make(), make()
    fused.step(7)
    for _ in range(7):
        new = stepwise._relax(1)
        stepwise._local_update_compiled(stepwise._states, new, 0.5)
        stepwise._states = new
        stepwise.clock += 1
    stepwise.counters["steps"] += 7
    assert fused.counters["pulses"] > 0
    assert_same(fused.state_dict(), stepwise.state_dict())
    for key, m in fused._cache.items():
        np.testing.assert_array_equal(m, stepwise._cache[key])
        np.testing.assert_array_equal(m, fused.scale(*key) * fused._device(key).visible(fused.clock))


def test_local_learning_with_every_rate_zero_steps_and_fires_nothing() -> None:
    p = ArrayPhysics(ArrayConfig(sizes=[3, 4, 2], seed=15))
    p.set_local_learning(True, [0.0, 0.0], 0.5)
    p.set_input(np.array([0.2, 0.5, 0.9]))
    p.set_nudge_target(np.array([1.0, 0.0]), 0.5)
    p.set_phase("NUDGE")
    weights = [d.w.copy() for d in p._w]
    p.step(3)
    out = p.train_sample(np.array([0.2, 0.5, 0.9]), np.array([1.0, 0.0]), 0.5, 4, 3)
    assert out.shape == (2,) and p.counters["pulses"] == 0 and p.counters["local_updates"] == 6
    for d, w in zip(p._w, weights):
        np.testing.assert_array_equal(d.w, w)


def test_the_thinning_rate_series_is_log1p_to_double_rounding() -> None:
    """Rows of tiny bound p take ``-log(1 - p)`` from its series (kernels._neg_log1m): within two ulps of log1p."""
    for p in np.concatenate([np.geomspace(1e-300, 0.0078, 3000), np.linspace(0.0078, 0.25, 300)]):
        assert kernels._neg_log1m(p) == pytest.approx(-np.log1p(-p), rel=4.5e-16, abs=0.0)
