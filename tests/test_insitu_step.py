"""Compound nudged steps (StepRunner) in the in-situ learner, over the real transports.

With the driver's ``step`` a nudged step is one round trip (previous step's pulses, one step of the dynamics,
every state); without it the learner drives the step piece by piece. On ideal devices both paths follow the same
trajectory up to stochastic rounding (same counter-based draws, float32 round-off apart); the compound path needs
a third of the round trips; every compound step is one journaled pulse command, and the instrument's executed
counter agrees with the journal.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch.nn.functional as F

from eqprop_hil.config import resolve
from eqprop_hil.drivers import open_array
from eqprop_hil.drivers.interface import NeuronArray, StepRunner
from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.insitu.learner import InSituLearner
from eqprop_hil.runs.rundir import RunDir
from eqprop_hil.train import prepare_data

SIZES = "64,24,10"
T2 = 6
SAMPLES = 16


class WithoutStep:
    """The driver with its compound step hidden (an instrument that has none): every other call goes through."""

    def __init__(self, array: Any) -> None:
        self._array = array

    def __getattr__(self, name: str) -> Any:
        if name == "step":
            raise AttributeError(name)
        return getattr(self._array, name)


def run(kind: str, compound: bool, mode: str, tmp_path) -> dict:
    extra = "&transport=pty" if kind == "fpga" else ""
    resource = f"sim://{kind}?sizes={SIZES}&device=ideal&dw_min=1e-4&seed=3{extra}"
    cfg = resolve("digits-hw", overrides={
        "model": {"sizes": [64, 24, 10]},
        "rule": {"t1": 20, "t2": T2, "lr": [0.004, 0.002]},
        "train": {"batch_size": 1, "data_limit": 40, "epochs": 1},
        "instrument": {"resource": resource, "update_mode": mode, "weight_range": 4.0,
                       "limits": {"max_pulses_per_device": 127}},
    })
    run_dir = RunDir.create(tmp_path / f"{kind}-{compound}-{mode}", cfg.to_dict())
    array = open_array(resource)
    driver = array if compound else WithoutStep(array)
    assert isinstance(driver, NeuronArray) and isinstance(driver, StepRunner) == compound
    journal = PulseJournal(run_dir.journal_path, fsync=False)
    learner = InSituLearner(cfg, driver, None, journal)
    try:
        data = prepare_data(cfg)
        before = dict(array.stats)
        for n, (_, x, y) in enumerate(data.batches(1, epoch=0, seed=cfg.train.seed)):
            if n == SAMPLES:
                break
            learner.train_batch(x, F.one_hot(y, 10).to(x.dtype))
        round_trips = (array.stats["round_trips"] - before["round_trips"]) / SAMPLES
        executed = learner.guard.executed()
        weights = [array.read_weights(e).copy() for e in range(2)]
        quantum = [learner.calibration.edge(e).scale * 1e-4 for e in range(2)]
    finally:
        learner.close()
    records = [json.loads(x) for x in run_dir.journal_path.read_text().splitlines()]
    return {"round_trips": round_trips, "executed": executed, "journal": records, "weights": weights,
            "quantum": quantum, "counters": dict(learner.counters)}


@pytest.mark.parametrize("kind", ["analog", "fpga"])
def test_compound_steps_follow_the_piecewise_path_in_a_third_of_the_round_trips(kind, tmp_path) -> None:
    one = run(kind, True, "matrix", tmp_path)
    piece = run(kind, False, "matrix", tmp_path)
    assert one["counters"]["pulses_sent"] > 300 and one["counters"]["clipped"] == 0
    steps = SAMPLES * T2
    for (w1, wp), q in zip(zip(one["weights"], piece["weights"]), one["quantum"]):
        # both round the same increments with the same draws; states differ by float32 round-off (and the
        # nudge: the board's own target mode against the host's currents), so a device may round the other way
        assert np.max(np.abs(w1 - wp)) < 3 * math.sqrt(steps) * q
    assert one["round_trips"] <= T2 + 8 and one["round_trips"] * 2 < piece["round_trips"]
    begun = [r for r in one["journal"] if r["state"] == "pending"]
    assert begun and all(r["mode"] == "step" and r["steps"] in (0, 1) and r["updates"] for r in begun)
    # a sample's last pulses go with no step of the dynamics (in HOLD), one such command per sample at most
    assert 0 < sum(r["steps"] == 0 for r in begun) <= SAMPLES
    done = [r for r in one["journal"] if r["state"] == "done"]
    assert len(done) == len(begun) == one["counters"]["pulse_commands"]
    # the board counted each compound step as ONE pulse command: its counter matches the journal exactly
    assert one["executed"] == len(done)


def test_outer_mode_sends_a_matrix_once_per_compound_step(tmp_path) -> None:
    one = run("analog", True, "outer", tmp_path)
    begun = [r for r in one["journal"] if r["state"] == "pending"]
    steps = [r for r in begun if r["mode"] == "step"]
    assert steps and all(len({(u["edge"], u["feedback"]) for u in r["updates"]}) == len(r["updates"]) for r in steps)
    # C-EP's two rank-1 terms per matrix: the second one of a matrix travels as a plain outer command first
    assert any(r["mode"] == "outer" for r in begun)
    assert one["executed"] == len([r for r in one["journal"] if r["state"] == "done"])


def test_rate_schedule_reaches_the_board_as_it_reaches_the_software_engine(tmp_path) -> None:
    """train.lr_final's per-epoch factor (set by the loop through set_rate_scale) in local mode: the board gets
    the scaled rates, and with ideal devices its weights follow the software engine at the same factor."""
    from eqprop_hil.engine.learners import build_learner
    from eqprop_hil.insitu.learner import open_insitu

    resource = f"sim://analog?sizes={SIZES}&device=ideal&seed=3"
    over = {"model": {"sizes": [64, 24, 10]}, "rule": {"t1": 20, "t2": T2, "lr": [0.004, 0.002]},
            "train": {"batch_size": 1, "data_limit": 40, "epochs": 1}}
    cfg = resolve("digits-hw", overrides={**over, "instrument": {"resource": resource, "update_mode": "local",
                                                                 "weight_range": 4.0}})
    sw = build_learner(resolve("digits-hw", overrides={**over, "instrument": {"resource": "software"}}))
    hw = open_insitu(cfg, RunDir.create(tmp_path / "run", cfg.to_dict()))
    try:
        for learner in (sw, hw):
            learner.set_rate_scale(0.25)
        start = [hw.array.read_weights(e).copy() for e in range(2)]
        data = prepare_data(cfg)
        for n, (_, x, y) in enumerate(data.batches(1, epoch=0, seed=cfg.train.seed)):
            if n == SAMPLES:
                break
            yy = F.one_hot(y, 10).to(x.dtype)
            sw.train_batch(x, yy)
            hw.train_batch(x, yy)
        for e in range(2):
            w_sw, w_hw = sw.net.W[e].numpy(), hw.array.read_weights(e)
            assert np.max(np.abs(w_sw - w_hw)) < 2e-5  # float32 round-off, as in tests/test_insitu.py
            assert np.max(np.abs(w_hw - start[e])) > 1e-4  # and the weights did move
    finally:
        hw.close()
