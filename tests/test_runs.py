"""Run records: the TOML writer, metrics lines, self-contained atomic checkpoints, RNG and cursor round trips."""

from __future__ import annotations

import math
import os
import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop_hil.runs.rundir import (
    DataCursor,
    RunDir,
    RunError,
    capture_rng_state,
    resolve_run_dir,
    restore_rng_state,
    toml_dumps,
)
from eqprop_hil.runs.toml_writer import TomlWriteError
from eqprop_hil.protocols.errors import EqpropError

CONFIG = {
    "name": "digits-cep",
    "seed": 7,
    "lr": [0.05, 1e-5, 2.5e-12],
    "beta": 0.2,
    "verbose": False,
    "note": 'a "quoted" word, a back\\slash, a tab\t and\nnewline, é',
    "edges": [[0, 1], [1, 2]],
    "model": {"sizes": [64, 32, 10], "activation": "sigmoid4", "device": {"model": "soft_bounds", "w_max": 0.6}},
    "limits": {"nudge_amperes": 1e-4, "pulses_per_step": 3},
    "skips": [{"src": 0, "dst": 2, "gain": 0.5}, {"src": 1, "dst": 2, "gain": 1.0, "extra": {"on": True}}],
    "dotted.key": "needs quotes",
}


# ---------------------------------------------------------------------------------------------------- TOML
def test_toml_round_trip_of_nested_tables_lists_floats_and_quoted_strings() -> None:
    text = toml_dumps(CONFIG)
    assert tomllib.loads(text) == CONFIG
    assert "1e-05" in text  # shortest repr of the float, valid TOML


def test_toml_writes_special_floats_and_documents_none() -> None:
    text = toml_dumps({"a": math.inf, "b": -math.inf, "c": math.nan, "d": None, "t": {"e": None, "f": 1}})
    back = tomllib.loads(text)
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])
    assert "d" not in back and back["t"] == {"f": 1}
    assert "# d = None" in text


def test_toml_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TomlWriteError, match="no null"):
        toml_dumps({"a": [1, None]})
    with pytest.raises(TomlWriteError, match="64-bit"):
        toml_dumps({"a": 2**64})
    with pytest.raises(TomlWriteError, match="object"):
        toml_dumps({"a": {"b": object()}})


def test_unwritable_config_is_a_run_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"config.toml: TOML has no null: a.b\[0\]"):
        RunDir.create(tmp_path / "r", {"a": {"b": [None]}})
    assert not (tmp_path / "r").exists()


_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
_scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
            | st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=3),
                       max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_toml_round_trip_property(doc: dict) -> None:
    assert tomllib.loads(toml_dumps(doc)) == doc


# ---------------------------------------------------------------------------------------------- run dir
def test_create_open_and_refuse(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    assert run.read_config() == CONFIG
    assert (run.path / "checkpoint").is_dir() and (run.path / "plots").is_dir()
    with pytest.raises(RunError, match="is already a run; .* --resume"):
        RunDir.create(tmp_path / "r", CONFIG)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not empty and is not a run"):
        RunDir.create(tmp_path / "other", CONFIG)
    assert RunDir.create(tmp_path / "r", {"x": 1}, exist_ok=True).read_config() == {"x": 1}
    assert RunDir.open(tmp_path / "r").path == tmp_path / "r"
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunError, match="no config.toml") as e:
        RunDir.open(tmp_path / "plain")
    assert isinstance(e.value, EqpropError)
    with pytest.raises(RunError, match="does not exist"):
        RunDir.open(tmp_path / "missing")


def test_snapshot_is_json_with_numpy_converted(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    assert run.read_snapshot() is None
    run.write_snapshot({"identity": {"serial": "SIM0001"}, "gains": np.array([1.0, 0.5]), "edges": [(0, 1)],
                        "offset": np.float32(0.25), "bad": float("nan")})
    assert run.read_snapshot() == {"identity": {"serial": "SIM0001"}, "gains": [1.0, 0.5], "edges": [[0, 1]],
                                   "offset": 0.25, "bad": None}


def test_metrics_append_read_nan_and_torn_line(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    assert run.read_metrics() == []
    run.append_metrics({"kind": "epoch", "epoch": 1, "train_loss": float("nan"), "test_accuracy": np.float64(0.5)})
    run.append_metrics({"kind": "eval", "epoch": 1, "test_accuracy": 0.75, "confusion": np.eye(2, dtype=int)})
    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" not in lines[0] and '"train_loss":null' in lines[0]
    assert run.read_metrics()[1] == {"kind": "eval", "epoch": 1, "test_accuracy": 0.75, "confusion": [[1, 0], [0, 1]]}
    with open(run.path / "metrics.jsonl", "ab") as f:  # a crash in the middle of a write
        f.write(b'{"kind":"epoch","epo')
    assert len(run.read_metrics()) == 2
    run.append_metrics({"epoch": 2})  # the torn tail is cut, not glued to the new line
    assert [r.get("epoch") for r in run.read_metrics()] == [1, 1, 2]
    run.rewind_metrics(1)
    assert run.read_metrics() == [{"kind": "epoch", "epoch": 1, "train_loss": None, "test_accuracy": 0.5}]


def test_metrics_corrupt_middle_line_names_file_and_line(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    (run.path / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is not JSON: b'not json'"):
        run.read_metrics()


# ------------------------------------------------------------------------------------------- checkpoints
def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "step": 41,
        "weights": [torch.randn(6, 4, generator=g), torch.randn(3, 6, generator=g).double()],
        "optimizer": {"momentum": [torch.zeros(6, 4)], "lr": 1e-5},
        "cursor": DataCursor(epoch=1, position=17, samples_seen=1814).to_dict(),
        "permutation": np.random.default_rng(0).permutation(100),
        "edges": [(0, 1), (1, 2)],
    }


def test_checkpoint_round_trip_is_exact_and_self_contained(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    assert run.load_checkpoint() is None
    run.append_metrics({"epoch": 1})
    state = _state()
    path = run.save_checkpoint(state)
    assert path.name == "ckpt-00000001.pt"
    # self-contained: loads with weights_only (no code), carries the config and the RNG states
    raw = torch.load(path, weights_only=True)
    assert raw["state"]["config"] == CONFIG
    back = run.load_checkpoint()
    for a, b in zip(state["weights"], back["weights"]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(back["permutation"], torch.from_numpy(state["permutation"]))
    assert back["edges"] == [(0, 1), (1, 2)] and back["optimizer"]["lr"] == 1e-5
    assert DataCursor.from_dict(back["cursor"]) == DataCursor(1, 17, 1814)
    assert back["run_records"] == {"metrics_records": 1}


def test_rng_state_round_trip_gives_the_same_numbers(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    gen = np.random.default_rng(11)
    tgen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    gen.random(5), np.random.normal(size=3)  # advance, and leave a cached gaussian in numpy's legacy state
    run.save_checkpoint({"rng": capture_rng_state({"data": gen, "noise": tgen})})
    expected = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random(), gen.random(3),
                torch.rand(2, generator=tgen))
    random.seed(99), np.random.seed(99), torch.manual_seed(99), gen.random(7), tgen.manual_seed(99)
    restore_rng_state(run.load_checkpoint()["rng"], {"data": gen, "noise": tgen})
    got = (torch.rand(4), np.random.rand(4), np.random.normal(), random.random(), gen.random(3),
           torch.rand(2, generator=tgen))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and got[3] == expected[3]
    assert np.array_equal(got[4], expected[4]) and torch.equal(got[5], expected[5])


def test_checkpoint_keeps_latest_and_previous_and_ignores_temp_files(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    for step in range(4):
        run.save_checkpoint({"step": step})
    assert [p.name for p in run.checkpoints()] == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    # a save killed before its rename leaves a temp file: never listed, never loaded
    (run.checkpoint_dir / ".ckpt-abc123.tmp").write_bytes(b"half a checkpoint")
    assert run.load_checkpoint()["step"] == 3
    assert len(run.checkpoints()) == 2


def test_corrupt_checkpoint_raises_run_error_naming_it(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    run.save_checkpoint({"step": 1})
    latest = run.save_checkpoint({"step": 2})
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    with pytest.raises(RunError, match=r"ckpt-00000002\.pt is corrupt") as e:
        run.load_checkpoint()
    assert "fallback=True" in str(e.value)
    assert run.load_checkpoint(fallback=True)["step"] == 1


def test_checkpoint_refuses_objects_that_need_code_to_load(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    with pytest.raises(RunError, match=r"state.extra is a DataCursor"):
        run.save_checkpoint({"extra": DataCursor()})
    assert run.checkpoints() == []


def test_data_cursor_validation() -> None:
    assert DataCursor.from_dict({"epoch": 2, "position": 0, "samples_seen": 9}).epoch == 2
    with pytest.raises(RunError, match="needs epoch"):
        DataCursor.from_dict({"epoch": 2})
    with pytest.raises(RunError, match="non-negative"):
        DataCursor.from_dict({"epoch": 2, "position": -1, "samples_seen": 0})


def test_resolve_run_dir(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    first = resolve_run_dir(None, "digits", root=root)
    assert first.parent == root and first.name.endswith("-digits") and len(first.name) == len("20250101-120000-digits")
    first.mkdir(parents=True)
    second = resolve_run_dir(None, "digits", root=root)
    assert second != first and "digits" in second.name
    assert resolve_run_dir("exp1", root=root) == root / "exp1"
    assert resolve_run_dir(str(tmp_path / "elsewhere"), root=root) == tmp_path / "elsewhere"
    with pytest.raises(RunError):
        resolve_run_dir("", root=root)


def test_atomic_config_write_leaves_no_temp_files(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r", CONFIG)
    run.write_config({"a": 1})
    run.write_snapshot({"b": 2})
    assert sorted(os.listdir(run.path)) == ["checkpoint", "config.toml", "instrument.json", "plots"]


def test_toml_keys_with_a_trailing_newline_are_quoted() -> None:
    """Found by the property test: `^...$` also matched before a trailing newline, so "0\\n" went out bare."""
    import tomllib

    from eqprop_hil.runs.toml_writer import toml_dumps

    for doc in ({"0": False, "0\n": {}}, {"0\n": []}, {"a\n": 1}):
        assert tomllib.loads(toml_dumps(doc)) == doc
