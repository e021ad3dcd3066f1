"""`hil train` on the software engine: run records, the final line, and exact resume."""

from __future__ import annotations

import json

import torch

from eqprop_hil.cli import main
from eqprop_hil.runs.rundir import RunDir

ARGS = ["train", "--preset", "digits-ep", "--instrument", "software", "--data-limit", "200", "--no-progress"]


def final_params(run_dir) -> dict[str, torch.Tensor]:
    return RunDir.open(run_dir).load_checkpoint()["parameters"]


def test_train_writes_records_and_prints_the_final_line(tmp_path, capsys) -> None:
    assert main(ARGS + ["--epochs", "2", "--run-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "final test accuracy" in out and "samples/s" in out
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds"):
        assert key in metrics[0]
    assert metrics[-1]["test_accuracy"] > 0.3  # 200 samples, 2 epochs of EP: well above chance (0.1)
    png = (tmp_path / "a" / "plots" / "learning_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[rule]" in (tmp_path / "a" / "config.toml").read_text()


def test_resume_after_epoch_one_equals_straight_run(tmp_path) -> None:
    assert main(ARGS + ["--epochs", "3", "--run-dir", str(tmp_path / "straight")]) == 0
    assert main(ARGS + ["--epochs", "1", "--run-dir", str(tmp_path / "split")]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "3", "--no-progress"]) == 0
    a, b = final_params(tmp_path / "straight"), final_params(tmp_path / "split")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ma = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["test_accuracy"] for m in ma] == [m["test_accuracy"] for m in mb]


def test_shape_mismatch_names_the_fix(tmp_path, capsys) -> None:
    assert main(["train", "--preset", "cep-1h", "--instrument", "software", "--dataset", "digits", "--epochs", "1",
                 "--run-dir", str(tmp_path / "x"), "--no-progress"]) == 1
    assert "does not fit data set 'digits'" in capsys.readouterr().err
