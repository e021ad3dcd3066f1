"""`hil report`: the summary of a synthetic run and its learning-curve PNG; a clear error for a non-run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eqprop_hil.cli import main
from eqprop_hil.cli.report import LABEL_WIDTH
from eqprop_hil.insitu.journal import PulseJournal
from eqprop_hil.runs.plots import epoch_series, new_figure, plot_learning_curves, save_figure
from eqprop_hil.runs.rundir import RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(root: Path) -> RunDir:
    run = RunDir.create(root / "run1", {"name": "digits-cep", "train": {"epochs": 5, "mode": "matrix"}})
    run.write_snapshot({"identity": {"vendor": "EQPROP-HIL", "model": "ANALOG-EP-1", "serial": "SIM0001",
                                     "firmware": "0.1.0"}})
    curve = [(0.61, 1.20, 0.58, 1.25), (0.80, 0.71, 0.83, 0.66), (0.88, 0.45, 0.871, 0.49)]
    for epoch, (tr_acc, tr_loss, te_acc, te_loss) in enumerate(curve, start=1):
        run.append_metrics({"kind": "epoch", "epoch": epoch, "train_accuracy": tr_acc, "train_loss": tr_loss,
                            "samples_per_s": 100.0 + epoch, "pulses_sent": 1000 * epoch})
        run.append_metrics({"kind": "eval", "epoch": epoch, "test_accuracy": te_acc, "test_loss": te_loss})
    run.append_metrics({"kind": "eval", "epoch": 4, "test_accuracy": 0.86, "test_loss": float("nan")})
    with PulseJournal(run.journal_path) as j:
        for k in range(3):
            jid = j.begin({"edge": 0, "mode": "matrix", "counts": np.ones((2, 2), np.int8)})
            if k < 2:
                j.done(jid, {"pulses": 4})
    run.save_checkpoint({"step": 3})
    return run


def test_report_prints_the_figures_and_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _synthetic_run(tmp_path)
    assert main(["report", str(run.path)]) == 0
    out = capsys.readouterr().out
    lines = dict((line[:LABEL_WIDTH].strip(), line[LABEL_WIDTH:].strip()) for line in out.splitlines())
    assert lines["config"] == "digits-cep"
    assert lines["instrument"] == "ANALOG-EP-1 SIM0001"
    assert lines["epochs"] == "4 of 5"
    assert lines["test accuracy (last)"] == "86.00 %"
    assert lines["test accuracy (best)"] == "87.10 %"
    assert lines["samples/s"] == "103.0"
    assert lines["pulses sent"] == "3000"
    assert lines["pulse commands acknowledged"] == "2"
    assert lines["pending journal entries"].startswith("1 ")
    assert lines["latest checkpoint"] == "ckpt-00000001.pt"
    png = run.plots_dir / "learning_curves.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert lines["plots"] == str(png)


def test_report_of_a_run_without_metrics_or_journal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = RunDir.create(tmp_path / "fresh", {"preset": "tiny"})
    assert main(["report", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "pending journal entries      0" in out
    assert "never started" in out and "no epoch has finished yet" in out
    assert not (run.plots_dir / "learning_curves.png").exists()  # no empty plot


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notarun").mkdir()
    assert main(["report", str(tmp_path / "notarun")]) == 1
    err = capsys.readouterr().err
    assert "not a run directory" in err and "config.toml" in err
    assert not (tmp_path / "notarun" / "plots").exists()


def test_report_as_a_console_command(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "eqprop_hil", "report", "--no-plots", str(run.path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "87.10 %" in proc.stdout and not (run.plots_dir / "learning_curves.png").exists()


def test_epoch_series_merges_records_and_skips_non_finite() -> None:
    series = epoch_series([{"epoch": 1, "test_accuracy": 0.5}, {"epoch": 1, "test_accuracy": 0.6},
                           {"epoch": 2, "test_accuracy": None}, {"test_accuracy": 0.9}, {"epoch": 3, "test_loss": 0.2}])
    assert series == {"test_accuracy": ([1.0], [0.6]), "test_loss": ([3.0], [0.2])}


def test_save_figure_writes_atomically_with_a_default_suffix(tmp_path: Path) -> None:
    fig, ax = new_figure()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "deep" / "fig")
    assert path.name == "fig.png" and path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in path.parent.iterdir()) == ["fig.png"]
    assert plot_learning_curves([], tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
