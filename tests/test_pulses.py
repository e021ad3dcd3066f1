"""Increments to pulses (hil/insitu/pulses.py): unbiased stochastic rounding with per-device step sizes, the cap,
counter-based noise that a redone sample draws again, outer-mode trains correct in expectation, and the journal
form of a compound step read back from a real journal file."""

from __future__ import annotations

import numpy as np
import pytest

from eqprop_hil.insitu import pulses
from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.insitu.recovery import entries_since
from eqprop_hil.protocols.errors import ValueRangeError

SHAPE = (5, 3)


def steps(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    up = 0.002 * (1 + 0.3 * rng.standard_normal(SHAPE)).clip(0.3)
    down = 0.002 * (1 + 0.3 * rng.standard_normal(SHAPE)).clip(0.3)
    return {(0, False): (up, down)}


def test_rounding_is_unbiased_with_each_devices_own_step_sizes() -> None:
    st = steps()
    enc = pulses.PulseEncoder("matrix", st, cap=8, bit_length=31, seed=1)
    up, down = st[(0, False)]
    inc = np.linspace(-0.006, 0.006, 15).reshape(SHAPE)  # up to ~3 pulses either way
    draws = np.stack([enc.counts((0, False), inc, np.random.default_rng(k)) for k in range(4000)])
    assert draws.dtype == np.int8
    mean_change = np.where(draws >= 0, draws * up, draws * down).mean(axis=0)
    np.testing.assert_allclose(mean_change, inc, atol=4e-4)  # unbiased: the error is the sampling noise only
    floor = np.floor(np.where(inc >= 0, inc / up, inc / down))
    assert np.all((draws == floor) | (draws == floor + 1))  # never more than one quantum off
    assert enc.counters["clipped"] == 0


def test_cap_clips_and_counts() -> None:
    enc = pulses.PulseEncoder("matrix", steps(), cap=2, bit_length=31, seed=1)
    inc = np.full(SHAPE, 0.05)  # ~25 pulses wanted per device
    inc[0, 0] = -0.05
    counts = enc.counts((0, False), inc, np.random.default_rng(0))
    assert counts[0, 0] == -2 and np.all(counts.ravel()[1:] == 2)
    assert enc.counters["clipped"] == inc.size


def test_counter_based_noise_is_a_function_of_sample_step_and_matrix() -> None:
    enc = pulses.PulseEncoder("matrix", steps(), cap=8, bit_length=31, seed=3)
    s = [np.linspace(0, 1, 3), np.linspace(0.2, 0.8, 5)]
    s_new = [s[0], s[1] + 0.01 * np.arange(5)]
    inc = pulses.continual_increments("cep", [(0, 1)], [False], [0.05], s, s_new, 0.2)
    first = enc.commands(inc, sample=7, step=2)
    again = enc.commands(inc, sample=7, step=2)
    other = [enc.commands(inc, sample=7, step=k) for k in range(3, 9)]
    assert first and np.array_equal(first[0]["counts"], again[0]["counts"])
    assert any(not o or not np.array_equal(o[0]["counts"], first[0]["counts"]) for o in other)


def test_continual_increment_terms_equal_the_rule() -> None:
    rng = np.random.default_rng(5)
    s = [rng.random(3), rng.random(5)]
    s_new = [s[0], s[1] + 0.01 * rng.standard_normal(5)]
    eta, beta = 0.04, 0.2
    [cep] = pulses.continual_increments("cep", [(0, 1)], [False], [eta], s, s_new, beta).values()
    np.testing.assert_allclose(pulses.dense(cep), eta / beta * (np.outer(s_new[1], s_new[0]) - np.outer(s[1], s[0])))
    cvf = pulses.continual_increments("cvf", [(0, 1)], [True], [eta], s, s_new, beta)
    np.testing.assert_allclose(pulses.dense(cvf[(0, False)]), eta / beta * np.outer(s_new[1] - s[1], s[0]))
    np.testing.assert_allclose(pulses.dense(cvf[(0, True)]), eta / beta * np.outer(s_new[0] - s[0], s[1]))


def test_outer_trains_deliver_the_increment_in_expectation() -> None:
    st = {(0, False): (np.full(SHAPE, 0.002), np.full(SHAPE, 0.002))}
    enc = pulses.PulseEncoder("outer", st, cap=8, bit_length=31, seed=0)
    a, b = np.array([0.1, -0.05, 0.0, 0.02, 0.08]), np.array([0.5, 1.0, 0.25])
    term = ("outer1", 0.3, a, b)
    [cmd] = enc.outer((0, False), term)
    assert cmd["mode"] == "outer" and np.abs(cmd["rows"]).max() <= 1 and np.abs(cmd["cols"]).max() <= 1
    # expected pulses per device: BL |r_i| |q_k|, sign sign(r_i q_k); times the step: the increment
    expected = cmd["bit_length"] * 0.002 * np.outer(cmd["rows"], cmd["cols"])
    np.testing.assert_allclose(expected, pulses.dense(term), rtol=1e-5, atol=1e-9)


def test_compound_step_entry_round_trips_through_a_journal_file(tmp_path) -> None:
    enc = pulses.PulseEncoder("matrix", {**steps(), (1, False): steps(1)[(0, False)]}, cap=8, bit_length=31, seed=0)
    inc = {(0, False): ("outer1", 1.0, np.full(5, 0.1), np.full(3, 0.1)),
           (1, False): ("outer1", -1.0, np.full(5, 0.1), np.full(3, 0.05))}
    commands = enc.commands(inc, sample=0, step=0)
    assert [c["edge"] for c in commands] == [0, 1]
    with PulseJournal(tmp_path / "journal.jsonl", fsync=False) as journal:
        [jid] = journal.begin_many([{"sample": 0, "step": 0, "edge": 0, **pulses.step_entry(commands, 1)}])
        journal.done(jid, {"pulses": 1})
    [(read_id, entry, state)] = entries_since(tmp_path / "journal.jsonl", 0)
    assert (read_id, state, entry["mode"], entry["steps"]) == (jid, "done", "step", 1)
    back = pulses.expand_entry(entry)
    for sent, got in zip(commands, back, strict=True):
        assert (got["edge"], got["feedback"], got["mode"]) == (sent["edge"], sent["feedback"], "matrix")
        assert got["counts"].dtype == np.int8 and np.array_equal(got["counts"], sent["counts"])
    plain = {"edge": 0, "feedback": False, "mode": "matrix", "counts": commands[0]["counts"]}
    assert pulses.expand_entry(plain) == [plain]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueRangeError, match="local"):
        pulses.PulseEncoder("local", steps(), cap=8, bit_length=31, seed=0)


def test_rounding_on_the_support_only_is_unbiased_and_leaves_the_rest_untouched() -> None:
    """A term whose column vector has zeros (input pixels at 0 V) is rounded on its support only: those columns
    get no pulse with certainty, the others are still unbiased with each device's own step sizes."""
    st = steps()
    up, down = st[(0, False)]
    enc = pulses.PulseEncoder("matrix", st, cap=8, bit_length=31, seed=1)
    a, b = np.array([0.01, -0.02, 0.0, 0.015, 0.03]), np.array([0.2, 0.0, 0.1])
    term = ("outer2", 0.5, (a, b), (np.full(5, 0.01), np.zeros(3)))  # the second term vanishes (clamped input)
    inc = pulses.dense(term)
    draws = np.stack([enc.term_counts((0, False), term, np.random.default_rng(k)) for k in range(4000)])
    assert draws.dtype == np.int8 and draws.shape[1:] == SHAPE
    assert not draws[:, :, 1].any() and not draws[:, 2, :].any()  # zero column / zero row: never a pulse
    mean_change = np.where(draws >= 0, draws * up, draws * down).mean(axis=0)
    np.testing.assert_allclose(mean_change, inc, atol=4e-4)
    assert enc.term_counts((0, False), ("outer1", 0.5, a, np.zeros(3)), np.random.default_rng(0)) is None
