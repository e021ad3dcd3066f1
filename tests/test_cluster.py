"""Sweeps and shared benches on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster).

Three Ray nodes, each with one CPU: a head, and two bench hosts offering ``bench:a`` and ``bench:b`` whose
description file names an emulated analog board (``sim://``). The tests drive the public entry points
(``run_sweep``, ``hil sweep``, ``submit``) and check what the trials themselves recorded: which Ray node ran them,
and their wall-clock start and end (never a duration threshold).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -c constraints.txt -e '.[cluster]'")
pytest.importorskip("ray.tune", reason="Ray Tune is missing: pip install -c constraints.txt -e '.[cluster]'")
from ray.cluster_utils import Cluster  # noqa: E402

from eqprop_hil.cli import main  # noqa: E402
from eqprop_hil.cluster.bench import BenchError  # noqa: E402
from eqprop_hil.cluster.submit import submit, write_back  # noqa: E402
from eqprop_hil.cluster.sweep import SweepSpec, run_sweep  # noqa: E402
from eqprop_hil.cluster.trial import read_record, trial_spec  # noqa: E402
from eqprop_hil.runs.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.slow

BOARD = "sim://analog?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed=0"
BENCHES = f"""
[bench.a]
instrument = "{BOARD}"
description = "emulated analog board a"
[bench.a.limits]
max_pulses_per_device = 4
[bench.b]
instrument = "{BOARD}"
[bench.b.limits]
max_pulses_per_device = 6
"""
TINY = {"epochs": 1, "data_limit": 40}
NODE_MEMORY = 80 * 1024 * 1024  # each node's object store: the trials pass small dictionaries


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module: starting Ray nodes costs seconds each on two shared cores."""
    folder = tmp_path_factory.mktemp("cluster")
    (folder / "benches.toml").write_text(BENCHES, encoding="utf-8")
    old = {k: os.environ.get(k) for k in ("EQPROP_HIL_BENCHES", "RAY_USAGE_STATS_ENABLED")}
    os.environ["EQPROP_HIL_BENCHES"] = str(folder / "benches.toml")  # the nodes (and their workers) inherit it
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": NODE_MEMORY,
                                                      "include_dashboard": False})
    nodes = {"head": c.head_node}
    nodes["a"] = c.add_node(num_cpus=1, resources={"bench:a": 1}, object_store_memory=NODE_MEMORY)
    nodes["b"] = c.add_node(num_cpus=1, resources={"bench:b": 1}, object_store_memory=NODE_MEMORY)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield c, {name: n.node_id for name, n in nodes.items()}, folder
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def test_sweep_spreads_trials_over_the_nodes(cluster, tmp_path):
    c, nodes, _ = cluster
    spec = SweepSpec(preset="digits-ep", grid={"rule.beta": [0.1, 0.2, 0.3]}, **TINY)
    outcome = run_sweep(spec, tmp_path / "sweep", address=c.address, echo=lambda s: None)
    rows = _rows(tmp_path / "sweep")
    assert [r["status"] for r in rows] == ["ok"] * 3 and not outcome.unfinished
    for r, beta in zip(rows, [0.1, 0.2, 0.3]):
        assert r["config"] == {"rule.beta": beta} and r["seed"] == 0 and r["epochs"] == 1
        for key in ("test_accuracy", "best_test_accuracy", "samples_per_second", "wall_s"):
            assert isinstance(r[key], float) and r[key] > 0, key
        run = RunDir.open(r["run_dir"])  # each trial is an ordinary run directory
        assert run.read_config()["rule"]["beta"] == beta
        assert [m["test_accuracy"] for m in run.read_metrics() if "test_accuracy" in m] == [r["test_accuracy"]]
    ran_on = {r["node_id"] for r in rows}
    assert ran_on <= set(nodes.values()) and len(ran_on) >= 2  # three 1-CPU nodes: the trials spread
    assert (tmp_path / "sweep" / "results.png").stat().st_size > 0

    again = run_sweep(spec, tmp_path / "sweep", address=c.address, echo=lambda s: None)
    assert again.ran == 0 and again.skipped == 3  # the same command again: nothing to do


def test_two_runs_for_one_bench_run_one_after_the_other(cluster, tmp_path):
    c, nodes, _ = cluster
    loose = {"instrument": {"limits": {"max_pulses_per_device": 100, "max_bit_length": 99}}}
    specs = [trial_spec(f"q{i}", tmp_path / f"q{i}", preset="digits-hw", bench="a",
                        overrides={"train": {"epochs": 1, "data_limit": 40, "seed": i}} | loose) for i in range(2)]
    refs = [submit(s) for s in specs]  # both queued at once: bench:a has one unit
    replies = ray.get(refs, timeout=240)
    results = [r["result"] for r in replies]
    assert [r["error"] for r in replies] == ["", ""]
    assert {r["node_id"] for r in results} == {nodes["a"]}  # on the host that holds the board
    first, second = sorted(results, key=lambda r: r["started_at"])
    assert first["finished_at"] <= second["started_at"]  # the second waited for the first to end
    for i, reply in enumerate(replies):
        local = write_back(reply, tmp_path / f"back{i}")  # the records come back to the submitter
        cfg = RunDir.open(local).read_config()
        assert cfg["instrument"]["resource"] == BOARD  # the bench's instrument
        limits = cfg["instrument"]["limits"]
        assert limits["max_pulses_per_device"] == 4  # the bench's limit: a submitter cannot loosen it
        assert limits["max_bit_length"] == 99  # ... but may tighten one
        assert (local / "metrics.jsonl").is_file() and (local / "journal.jsonl").is_file()


def test_hil_sweep_on_a_bench_and_hil_train_on_the_cluster(cluster, tmp_path, capsys, monkeypatch):
    c, nodes, _ = cluster
    out = tmp_path / "bench-sweep"
    rc = main(["sweep", "--preset", "digits-hw", "--seeds", "0,1", "--epochs", "1", "--data-limit", "40",
               "--bench", "b", "--address", c.address, "--out", str(out)])
    assert rc == 0
    rows = _rows(out)
    assert [r["seed"] for r in rows] == [0, 1] and {r["node_id"] for r in rows} == {nodes["b"]}
    records = sorted((read_record(r["run_dir"]) for r in rows), key=lambda r: r["started_at"])
    assert records[0]["finished_at"] <= records[1]["started_at"]  # one run per board at a time
    printed = capsys.readouterr().out
    assert "2/2 done" in printed and "t001-seed=1" in printed

    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--cluster", c.address, "--bench", "b", "--epochs", "1", "--data-limit", "40",
               "--run-dir", "runs/mine", "--no-progress"])
    assert rc == 0
    assert RunDir.open(tmp_path / "runs" / "mine").read_config()["instrument"]["limits"]["max_pulses_per_device"] == 6
    assert "final test accuracy" in capsys.readouterr().out
    with pytest.raises(BenchError, match="no host in the cluster offers bench 'nope'.*benches: \\['a', 'b'\\]"):
        submit(trial_spec("x", tmp_path / "x", preset="digits-hw", bench="nope"))


def test_a_trial_whose_worker_is_killed_is_reported_failed_and_the_sweep_finishes(cluster, tmp_path):
    c, _, _ = cluster
    out = tmp_path / "killed"
    spec = SweepSpec(preset="digits-ep", grid={"train.epochs": [1, 500]}, data_limit=40)
    victim = out / "runs" / "t001-epochs=500"
    killed: list[int] = []

    def kill_when_started() -> None:
        for _ in range(1200):
            record = read_record(victim)
            if record is not None:
                os.kill(record["pid"], signal.SIGKILL)
                killed.append(record["pid"])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    outcome = run_sweep(spec, out, address=c.address, echo=lambda s: None)
    killer.join(5)
    assert killed, "the long trial never started"
    rows = {r["name"]: r for r in _rows(out)}
    assert rows["t000-epochs=1"]["status"] == "ok"
    bad = rows["t001-epochs=500"]
    assert bad["status"] == "failed" and bad["error"] and bad["test_accuracy"] is None
    assert [r["name"] for r in outcome.failed] == ["t001-epochs=500"] and not outcome.unfinished


def test_the_accuracy_benchmark_runs_its_trials_as_a_sweep(cluster, tmp_path):
    import importlib.util

    c, _, _ = cluster
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("bench_accuracy_on_ray", path)
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    assert accuracy.main(["--quick", "--rules", "bp", "--seeds", "0", "--address", c.address,
                          "--sweep-dir", str(tmp_path / "sweep"), "--out", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "accuracy.json").read_text(encoding="utf-8"))["digits"]
    assert entry["executed"].startswith("sweep on the Ray cluster")
    rows = _rows(tmp_path / "sweep" / "digits")
    assert [r["name"] for r in rows] == ["bp-seed0"] and rows[0]["status"] == "ok"
    assert entry["rules"]["bp"]["last_epoch_accuracy"] == [r["test_accuracy"] for r in rows]
