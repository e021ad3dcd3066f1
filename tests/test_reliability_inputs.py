"""Bad input found by the outside campaign (issue 9): each refused with a clear error naming the key or the file,
before anything reaches the instrument's weights; and corrupted run files found and named.

In-process emulators (``sim://``) are enough here: these are refusals by the controller, not link faults.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.cli import main
from eqprop_hil.config import ConfigError, resolve
from eqprop_hil.drivers.errors import LinkError
from eqprop_hil.insitu.journal import PulseJournal, iter_records
from eqprop_hil.insitu.learner import open_insitu
from eqprop_hil.runs.rundir import RunDir, RunError

BOARD = "sim://analog?sizes=64,16,10&device=ideal&seed=1"
SMALL = {"model": {"sizes": [64, 16, 10]}, "rule": {"t1": 15, "t2": 4},
         "train": {"data_limit": 40, "epochs": 1, "batch_size": 1, "checkpoint_every": 10},
         "instrument": {"resource": BOARD}}


def _cfg(**over):
    data = json.loads(json.dumps(SMALL))
    for table, values in over.items():
        data.setdefault(table, {}).update(values)
    return resolve("digits-hw", overrides=data)


@pytest.mark.parametrize("table,values,key", [
    ("rule", {"lr": float("inf")}, "rule.lr"),
    ("rule", {"lr": [float("inf"), float("inf")]}, "rule.lr[0]"),
    ("rule", {"lr": 1e30}, "rule.lr"),
    ("rule", {"lr": [0.01, float("nan")]}, "rule.lr[1]"),
    ("rule", {"beta": float("nan")}, "rule.beta"),
    ("rule", {"t1": 1_000_000}, "rule.t1"),
    ("instrument", {"weight_range": 1e9}, "instrument.weight_range"),
    ("instrument", {"program_tolerance": 1e-12}, "instrument.program_tolerance"),
    ("instrument", {"timeout_s": float("inf")}, "instrument.timeout_s"),
    ("model", {"init_gain": 1e300}, "model.init_gain"),
    ("model", {"dt": float("-inf")}, "model.dt"),
])
def test_non_finite_or_absurd_values_name_their_key(table, values, key) -> None:
    with pytest.raises(ConfigError) as info:
        _cfg(**{table: values})
    assert key in str(info.value), str(info.value)


def test_cli_refuses_an_infinite_rate_before_opening_anything(tmp_path, capsys) -> None:
    (tmp_path / "bad.toml").write_text("[rule]\nlr = [inf, inf]\n")
    rc = main(["train", "--preset", "digits-hw", "--config", str(tmp_path / "bad.toml"), "--run-dir",
               str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "rule.lr[0]" in err and "finite" in err, err
    assert not (tmp_path / "run").exists()  # nothing was created, nothing opened


def test_settle_longer_than_the_timeout_is_refused_up_front(tmp_path) -> None:
    cfg = _cfg(rule={"t1": 100_000}, instrument={"timeout_s": 0.01})
    run = RunDir.create(tmp_path / "r", cfg.to_dict())
    with pytest.raises(ConfigError, match=r"rule\.t1 = 100000 steps.* instrument\.timeout_s = 0\.01"):
        open_insitu(cfg, run)
    assert iter_records(run.journal_path) == []  # not one pulse command journaled


def test_a_model_far_larger_than_the_board_is_refused_before_allocating(tmp_path) -> None:
    """64-65535-65535-10 would allocate 34 GB of float64 weights: the sizes are compared first."""
    cfg = _cfg(model={"sizes": [64, 65535, 65535, 10]})
    with pytest.raises(ConfigError, match=r"model\.sizes = \[64, 65535, 65535, 10\] does not fit the instrument"):
        open_insitu(cfg, RunDir.create(tmp_path / "r", cfg.to_dict()))


def test_a_non_finite_increment_never_becomes_a_pulse(tmp_path) -> None:
    cfg = _cfg()
    learner = open_insitu(cfg, RunDir.create(tmp_path / "r", cfg.to_dict()))
    try:
        before = learner.guard.executed()
        s = [np.zeros(n) for n in (64, 16, 10)]
        s_new = [np.ones(n) for n in (64, 16, 10)]
        s_new[1][3] = np.nan  # what a broken readout would hand the learner
        with pytest.raises(LinkError, match="non-finite states"):
            learner._commands(s, s_new, 0.2, 0)
        assert learner.guard.executed() == before
        assert learner.journal.stats()["begun"] == 0
    finally:
        learner.close()


def test_a_full_disk_is_one_line_naming_the_file(tmp_path) -> None:
    """metrics.jsonl on a full disk (/dev/full: every write fails with ENOSPC)."""
    run = RunDir.create(tmp_path / "run", _cfg().to_dict())
    os.symlink("/dev/full", run.path / "metrics.jsonl")
    with pytest.raises(RunError, match=r"^cannot write .*/metrics\.jsonl: No space left on device$"):
        run.append_metrics({"epoch": 1})


def test_checkpoint_directory_unwritable_mid_run_then_resume_works(tmp_path) -> None:
    """The trainer (a child process) finds its checkpoint directory gone unwritable mid-run: it stops with one
    line naming the path, exit 1, the instrument left safe by the driver's close; once the directory is back,
    ``--resume`` finishes the run."""
    run = tmp_path / "run"
    (tmp_path / "small.toml").write_text("[model]\nsizes = [64, 16, 10]\n[rule]\nt1 = 15\nt2 = 4\n"
                                         "[train]\nbatch_size = 1\ncheckpoint_every = 5\n")
    args = [sys.executable, "-m", "eqprop_hil", "train", "--preset", "digits-hw", "--config",
            str(tmp_path / "small.toml"), "--instrument", BOARD, "--data-limit", "40", "--epochs", "2",
            "--run-dir", str(run), "--no-progress"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoint").glob("ckpt-*.pt.sha256")):  # polling a file, not a result
            assert proc.poll() is None and time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.01)
        os.rename(run / "checkpoint", run / "checkpoint.away")
        (run / "checkpoint").write_text("not a directory\n")
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err
    assert lines[-1].startswith("hil train: error: cannot write ") and "checkpoint" in lines[-1], err
    assert "Traceback" not in err
    os.remove(run / "checkpoint")
    os.rename(run / "checkpoint.away", run / "checkpoint")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def _finished_run(tmp_path: Path) -> RunDir:
    (tmp_path / "small.toml").write_text("[model]\nsizes = [64, 16, 10]\n[rule]\nt1 = 15\nt2 = 4\n"
                                         "[train]\nbatch_size = 1\ncheckpoint_every = 10\n")
    assert main(["train", "--preset", "digits-hw", "--config", str(tmp_path / "small.toml"), "--instrument", BOARD,
                 "--data-limit", "40", "--epochs", "1", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    return RunDir.open(tmp_path / "run")


def test_a_flipped_bit_in_a_weight_is_named_and_the_previous_checkpoint_used(tmp_path) -> None:
    run = _finished_run(tmp_path)
    latest, previous = run.checkpoints()[-1], run.checkpoints()[-2]
    good = run.verify_checkpoint(previous)
    data = bytearray(latest.read_bytes())
    w = run.verify_checkpoint(latest)["parameters"]["W0"].numpy().tobytes()
    at = bytes(data).find(w[:64])  # the weight tensor's bytes inside the zip (stored, not compressed)
    assert at > 0
    data[at + 13] ^= 0x10
    latest.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"ckpt-\d{8}\.pt is corrupt: tensor\(s\) parameters\.W0 fail their sha256"):
        run.load_checkpoint()
    state = run.load_checkpoint(fallback=True)
    assert state["cursor"] == good["cursor"]
    assert (latest.parent / (latest.name + ".corrupt")).exists()  # kept for inspection, out of the rotation


def test_a_checkpoint_without_its_manifest_is_incomplete(tmp_path) -> None:
    run = _finished_run(tmp_path)
    latest = run.checkpoints()[-1]
    Path(str(latest) + ".sha256").unlink()
    with pytest.raises(RunError, match="has no manifest"):
        run.load_checkpoint()


def test_journal_is_compacted_at_checkpoints_and_keeps_its_totals(tmp_path) -> None:
    run = _finished_run(tmp_path)
    live = PulseJournal(run.journal_path, readonly=True)
    every = iter_records(run.journal_path)
    done = sum(r["state"] == "done" for r in every)
    assert live.compacted_below > 1 and run.journal_path.with_name("journal.archive.jsonl.gz").exists()
    assert live.applied_count() == done and live.stats()["begun"] == sum(r["state"] == "pending" for r in every)
    kept = [r for r in iter_records(run.journal_path, archived=False)]
    assert all(r["id"] >= live.compacted_below for r in kept) and len(kept) < len(every) / 2


def test_resume_on_a_fresh_board_says_so_without_negative_counts(tmp_path, caplog) -> None:
    """The Ctrl-C case of issue 9: ``sim://`` boards live in the trainer's process, so a resume meets a fresh board
    whose counter starts again at 0; the old message said "executed -14173 pulse commands"."""
    run = _finished_run(tmp_path)
    caplog.set_level("WARNING")
    assert main(["train", "--resume", str(run.path), "--epochs", "2", "--no-progress"]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "re-programming the checkpoint's weights" in text, text
    assert not re.search(r"-\d+ (executed )?pulse", text), text
