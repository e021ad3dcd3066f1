"""The parts of sweeps and benches that need no running Ray: the search grammar, trial expansion, bench files
and the bench's limits winning over the submitter's. Fast; they run whether or not Ray is installed."""

from __future__ import annotations

import json

import pytest

from eqprop_hil import config as configuration
from eqprop_hil.cluster.bench import BenchError, apply_bench, load_bench, load_benches, resource_name
from eqprop_hil.cluster.report import plot_results, summary_table
from eqprop_hil.cluster.runtime import ClusterError
from eqprop_hil.cluster.sweep import (
    SweepSpec, _check_record, expand, make_row, nest, parse_grid, parse_random, read_results, split_values,
)
from eqprop_hil.protocols.errors import EqpropError


def test_grid_values_are_toml_and_lists_stay_whole():
    assert split_values("[0.1,0.05],[0.2,0.1]") == ["[0.1,0.05]", "[0.2,0.1]"]
    grid = parse_grid(["rule.beta=0.1,0.2", "rule.lr=[0.02,0.01],[0.04,0.02]", "model.activation=tanh,sigmoid4"])
    assert grid == {"rule.beta": [0.1, 0.2], "rule.lr": [[0.02, 0.01], [0.04, 0.02]],
                    "model.activation": ["tanh", "sigmoid4"]}
    assert nest({"rule.beta": 0.1, "train.seed": 2}) == {"rule": {"beta": 0.1}, "train": {"seed": 2}}


@pytest.mark.parametrize("item, message", [
    ("rule.beta", "KEY=V1,V2"), ("=1,2", "KEY=V1,V2"), ("rule.beta=0.1,,0.2", "empty value"),
    ("rule.beta=0.1,{x", "cannot read the value"),
])
def test_bad_grid_items_name_the_problem(item, message):
    with pytest.raises(ClusterError, match=message):
        parse_grid([item])


def test_bad_random_ranges_are_refused():
    assert parse_random(["rule.beta=log:0.05:0.5"]) == {"rule.beta": ("log", 0.05, 0.5)}
    for bad in ("rule.beta=log:0:1", "rule.beta=normal:0:1", "rule.beta=uniform:2:1", "rule.beta=uniform:1"):
        with pytest.raises(ClusterError, match="KEY=DIST:LOW:HIGH"):
            parse_random([bad])


def test_expand_is_deterministic_and_checks_every_trial_first(tmp_path):
    spec = SweepSpec(preset="digits-ep", grid={"rule.beta": [0.1, 0.2]}, random={"rule.t2": ("int", 5, 15)},
                     samples=2, seeds=[0, 1], epochs=2, data_limit=50)
    trials = expand(spec, tmp_path)
    assert len(trials) == 2 * 2 * 2 and trials == expand(spec, tmp_path)  # the same command, the same trials
    assert len({t["name"] for t in trials}) == 8 and all(t["run_dir"].startswith(str(tmp_path)) for t in trials)
    first = trials[0]
    assert first["name"].startswith("t000-beta=0.1-t2=") and first["name"].endswith("-seed=0")
    assert first["overrides"]["train"] == {"epochs": 2, "data_limit": 50, "seed": 0}
    assert first["overrides"]["telemetry"] == {"address": ""}  # trials never share one telemetry socket
    assert all(5 <= t["swept"]["rule.t2"] <= 15 for t in trials)
    with pytest.raises(ClusterError, match="trial t000.*rule.betta"):  # a typo is refused before Ray starts
        expand(SweepSpec(preset="digits-ep", grid={"rule.betta": [0.1]}), tmp_path)
    with pytest.raises(ClusterError, match="train.epochs"):
        expand(SweepSpec(preset="digits-ep", grid={"train.epochs": [0]}), tmp_path)
    with pytest.raises(ClusterError, match="exclude each other"):
        expand(SweepSpec(preset="digits-hw", bench="a", instrument="software"), tmp_path)


def test_one_folder_holds_one_sweep(tmp_path):
    spec = SweepSpec(preset="digits-ep", grid={"rule.beta": [0.1]})
    _check_record(tmp_path, spec, ["t000"])
    _check_record(tmp_path, spec, ["t000"])  # the same sweep again: fine
    with pytest.raises(ClusterError, match="holds another sweep"):
        _check_record(tmp_path, SweepSpec(preset="digits-ep", grid={"rule.beta": [0.2]}), ["t000"])


def test_results_rows_table_and_plot(tmp_path):
    spec = SweepSpec(preset="digits-ep", grid={"rule.beta": [0.1, 0.2]}, seeds=[0, 1], epochs=3)
    trials = expand(spec, tmp_path)
    rows = [make_row(t, {"test_accuracy": 0.9 + i / 100, "best_test_accuracy": 0.95, "samples_per_second": 100.0,
                         "wall_s": 2.0, "epoch": 3, "final": True}) for i, t in enumerate(trials[:3])]
    rows.append(make_row(trials[3], None, error="RayActorError: the actor died unexpectedly"))
    assert rows[3]["status"] == "failed" and rows[3]["test_accuracy"] is None and rows[3]["error"]
    assert rows[0]["status"] == "ok" and not rows[0]["stopped_early"]
    asha_cut = make_row(trials[0], {"test_accuracy": 0.5, "epoch": 1})  # ASHA stopped it after epoch 1 of 3
    asha_at_end = make_row(trials[0], {"test_accuracy": 0.5, "epoch": 3})  # stopped at its last epoch: finished
    assert asha_cut["stopped_early"] and asha_cut["status"] == "ok" and not asha_at_end["stopped_early"]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn', encoding="utf-8")
    assert list(read_results(tmp_path)) == [t["name"] for t in trials]  # a torn last line is skipped
    table = summary_table(rows, ["rule.beta"])
    assert "rule.beta=0.1: 90.50 % (2/2 trials)" in table and "rule.beta=0.2: 92.00 % (1/2 trials)" in table
    assert "FAILED t003" in table
    assert plot_results(rows, ["rule.beta"], tmp_path / "results.png").stat().st_size > 1000


BENCHES = """
[bench.analog-1]
instrument = "TCPIP0::10.0.0.5::5025::SOCKET"
calibration = "/etc/eqprop-hil/analog-1.json"
[bench.analog-1.limits]
max_input_volts = 0.8
max_pulses_per_device = 4
pulse_budget = 1000
"""


def test_the_bench_decides_instrument_and_limits(tmp_path):
    path = tmp_path / "benches.toml"
    path.write_text(BENCHES, encoding="utf-8")
    bench = load_bench("analog-1", path)
    assert bench.resource == resource_name("analog-1") == "bench:analog-1"
    data = configuration.merge(configuration.load_preset("digits-hw"), {"instrument": {
        "input_volts": 0.5, "limits": {"max_input_volts": 5.0, "max_pulses_per_device": 2, "max_bit_length": 99}}})
    cfg = configuration.build(apply_bench(data, bench))
    assert cfg.instrument.resource == "TCPIP0::10.0.0.5::5025::SOCKET"
    assert cfg.instrument.calibration == "/etc/eqprop-hil/analog-1.json"
    limits = cfg.instrument.limits
    assert limits.max_input_volts == 0.8  # the submitter asked for 5 V: the bench's 0.8 V wins
    assert limits.max_pulses_per_device == 2 and limits.max_bit_length == 99  # tighter requests are kept
    assert limits.pulse_budget == 1000  # the submitter's 0 (unlimited) cannot lift the bench's budget
    with pytest.raises(configuration.ConfigError, match="input_volts"):  # 1 V data scale over the bench's 0.8 V
        configuration.build(apply_bench(configuration.load_preset("digits-hw"), bench))


@pytest.mark.parametrize("text, message", [
    ("[bench.x]\ninstrument = 'sim://analog'\nvolts = 3\n", "unknown key"),
    ("[bench.x]\ncalibration = 'c.json'\n", "'instrument'"),
    ("[bench.x]\ninstrument = 'sim://analog'\n[bench.x.limits]\nmax_pulses_per_device = 500\n",
     "max_pulses_per_device"),
    ("[bench.'bad name']\ninstrument = 'sim://analog'\n", "bench name"),
    ("[other]\n", "only \\[bench.NAME\\]"),
    ("[bench.x\n", "cannot read"),
])
def test_bad_bench_files_name_bench_and_key(tmp_path, text, message):
    path = tmp_path / "benches.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BenchError, match=message) as info:
        load_benches(path)
    assert isinstance(info.value, EqpropError)


def test_unknown_or_missing_bench_descriptions(tmp_path, monkeypatch):
    monkeypatch.setenv("EQPROP_HIL_BENCHES", str(tmp_path / "none.toml"))
    with pytest.raises(BenchError, match="no bench description file .*none.toml"):
        load_bench("a")
    (tmp_path / "none.toml").write_text(BENCHES, encoding="utf-8")
    with pytest.raises(BenchError, match="'b' is not described .*analog-1"):
        load_bench("b")


def test_an_address_where_nothing_listens_is_refused_at_once():
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install -c constraints.txt -e '.[cluster]'")
    from eqprop_hil.cluster.runtime import connect

    with pytest.raises(ClusterError, match="nothing answers at 127.0.0.1:1"):
        connect("127.0.0.1:1")
