"""Every update mode resumable after SIGKILL (issue 9 item 4): ``outer`` and ``local`` included.

Outer-mode pulse trains are drawn by the device and local-mode updates are the board's own, so neither can be
undone command by command: a resume re-programs the checkpoint's weights (write-verify) and replays from its
cursor. The trainer runs as a child process against an emulator process that outlives it, and is killed with
SIGKILL after its third checkpoint, mid-training. The resumed run must finish, every journal entry settled,
the board's executed-command counter equal to the journal's; local mode (deterministic on ideal devices) must
end on the straight run's weights up to the float32 rounding of one re-programming, amplified by the updates
that follow it.
"""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.runs.rundir import RunDir
from tests.test_crash_resume import RUN_TIMEOUT_S, SMALL_TOML, board_figures, emulators, hil, metrics, trainers  # noqa: F401

EDGES = 2


def _wait_for_checkpoint(run, seq: int, proc) -> None:
    """Bounded wait until checkpoint number ``seq`` (or a later one) is complete (its manifest written)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while max((int(p.name[5:13]) for p in (run / "checkpoint").glob("ckpt-*.pt.sha256")), default=0) < seq:
        assert proc.proc.poll() is None, proc.text()
        assert time.monotonic() < deadline, f"no checkpoint {seq}"
        time.sleep(0.005)  # polling a file


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["local"])  # outer: tests/test_campaign_outside.py (trainer kill + corrupt checkpoint)
def test_sigkill_mid_training_then_resume(mode, emulators, trainers, tmp_path) -> None:
    persistent, fresh = emulators
    (tmp_path / "small.toml").write_text(SMALL_TOML + f'[instrument]\nupdate_mode = "{mode}"\n')
    common = ["--preset", "digits-hw", "--config", str(tmp_path / "small.toml")]
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "crashed"
    if mode == "local":  # outer-mode weights are not comparable after a redo (device-drawn trains): no reference
        ref = hil(trainers, *common, "--instrument", fresh.resource, "--run-dir", str(ref_dir), cwd=tmp_path)
        assert ref.wait(RUN_TIMEOUT_S) == 0, ref.text()

    kills = 0
    proc = hil(trainers, *common, "--instrument", persistent.resource, "--run-dir", str(run_dir), cwd=tmp_path)
    for seq in (3,):  # mid-training, in the first epoch, past a checkpoint
        _wait_for_checkpoint(run_dir, seq, proc)
        time.sleep(0.05)
        rc = proc.kill()
        assert rc == -signal.SIGKILL, proc.text()
        kills += 1
        proc = hil(trainers, "--resume", str(run_dir), cwd=tmp_path)
    assert proc.wait(RUN_TIMEOUT_S) == 0, proc.text()
    assert "cannot undo" not in proc.text()
    assert kills == 1

    run_board, run_executed = board_figures(persistent.resource)
    journal = PulseJournal(run_dir / "journal.jsonl", readonly=True)
    assert journal.stats()["pending"] == 0
    rec = json.loads((run_dir / "reconciliation.json").read_text())  # the reference at the last (re)bind
    assert run_executed == rec["board_executed"] == rec["reference_board"] + journal.applied_count() - rec["reference_journal"]
    assert [m["epoch"] for m in metrics(run_dir)] == [1, 2]
    params = RunDir.open(run_dir).load_checkpoint()["parameters"]
    for e in range(EDGES):
        np.testing.assert_array_equal(run_board[e], params[f"W{e}"].numpy())  # the checkpoint is the board
    if mode == "local":
        ref_board, _ = board_figures(fresh.resource)
        for e in range(EDGES):
            np.testing.assert_allclose(run_board[e], ref_board[e], rtol=0, atol=1e-5)
