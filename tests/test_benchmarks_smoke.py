"""Smoke test of the link, hardware-in-the-loop and engine benchmarks: they run end to end on tiny settings, print their
tables with the headers the README quotes, and write JSON with the keys the lead's figures are taken from.
Wall time is never asserted (the machine is shared); the byte counts are exact, so they are checked."""

from __future__ import annotations

import json

from benchmarks import hil as hil_bench
from benchmarks import link as link_bench


def test_link_quick_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "link.json"
    link_bench.main(["--quick", "--out", str(out)])
    text = capsys.readouterr().out
    for header in ("(a) Round-trip latency per command", "(b) Bytes on the wire per C-EP nudged step",
                   "(c) Share of a serial link's capacity", "median ms", "share %"):
        assert header in text
    data = json.loads(out.read_text())
    assert {"latency", "step_bytes", "link_share", "environment"} <= set(data)
    assert {r["link"] for r in data["latency"]} == {"analog/tcp", "fpga/pty", "fpga/tcp"}
    assert all(r["round_trips"] >= 1 and r["median_ms"] > 0 for r in data["latency"])
    steps = {(r["instrument"], r["mode"]): r for r in data["step_bytes"]}
    assert set(steps) == {(i, m) for i in ("analog/tcp", "fpga/pty") for m in ("matrix", "outer", "local")}
    for inst in ("analog/tcp", "fpga/pty"):
        # a full int8 matrix of 784x512 + 512x10 pulses is on the wire in matrix mode, not in outer or local
        assert steps[(inst, "matrix")]["step_bytes_sent"] >= 784 * 512 + 512 * 10
        assert steps[(inst, "outer")]["step_bytes_sent"] < steps[(inst, "matrix")]["step_bytes_sent"] / 10
        assert steps[(inst, "local")]["sample_round_trips"] == 1
    rows = data["link_share"]["rows"]
    assert {r["mode"] for r in rows} == {"matrix", "outer", "local"}
    assert all(r["bottleneck"] == ("link" if r["share"] > 1 else "compute") for r in rows)


def test_hil_quick_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "hil.json"
    hil_bench.main(["--quick", "--modes", "local", "--process", "thread", "--out", str(out)])
    text = capsys.readouterr().out
    assert "In-situ C-EP training speed" in text and "ctrl us/step" in text and "x sw b1" in text
    data = json.loads(out.read_text())
    assert data["modes"] == ["local"] and data["samples"] == 10
    results = data["results"]
    assert set(results) == {"software b20", "software b1", "analog/tcp (thread) local", "fpga/pty (thread) local"}
    for key in ("analog/tcp (thread) local", "fpga/pty (thread) local"):
        r = results[key]
        for field in ("samples_per_s", "ratio_to_software_b1", "link_ms_per_sample", "controller_ms_per_sample",
                      "bytes_sent_per_sample", "bytes_received_per_sample", "round_trips_per_sample"):
            assert field in r
    # local mode: one sample command per training sample on both, no reboot poll: a fenced board that rebooted
    # refuses the next command (a new instance id), so the learner need not ask SYST:BOOT? after every sample
    assert results["fpga/pty (thread) local"]["round_trips_per_sample"] == 1
    assert results["analog/tcp (thread) local"]["round_trips_per_sample"] == 1
    for key in ("analog/tcp (thread) local", "fpga/pty (thread) local"):
        r = results[key]
        assert r["samples"] == 10


def test_engine_quick_compares_engine_and_oracle_and_writes_json(tmp_path, capsys):
    from benchmarks import engine as engine_bench

    engine_bench.main(["--quick", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "interleaved repetitions" in text and "peak RSS" in text
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["quick"] is True and data["threads"] == 1
    rows = {r["preset"]: r for r in data["throughput"]}
    assert set(rows) == {"cep-1h", "ep-1h", "fre-2h"}
    for r in rows.values():
        assert r["batch"] == 20
        for impl in ("engine", "oracle"):
            assert 0 < r[impl]["min"] <= r[impl]["median"] <= r[impl]["max"]
    mem = data["memory"]
    assert [m["t2"] for m in mem] == [15, 150] and all(m["peak_mib"] > 0 for m in mem)
