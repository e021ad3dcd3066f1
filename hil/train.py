"""The training loop: data feed, one readable loop over epochs and batches, evaluation, run records.

The loop does not care where the network lives: a *learner* (hil/engine/rules.py on the software engine, hil/engine/bptt.py,
hil/engine/baselines.py, or hil/insitu/learner.py on an instrument) offers ``train_batch``, ``evaluate``, ``state_dict`` and
``load_state_dict``; the loop handles progress, metrics, checkpoints, resume, interrupts and telemetry.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from eqprop_hil.config import ConfigError, RunConfig
from eqprop_hil.data import Dataset, load_dataset
from eqprop_hil.interrupt import GracefulInterrupt
from eqprop_hil.engine.rules import BatchResult
from eqprop_hil.runs.rundir import DataCursor, RunDir, capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)


class TrainLearner(Protocol):
    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult: ...
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def parameters_for_checkpoint(self) -> dict[str, torch.Tensor]: ...
    def load_parameters_from_checkpoint(self, params: dict[str, torch.Tensor]) -> None: ...


@dataclass
class EpochTally:
    """Running figures of the epoch in progress (checkpointed, so a resumed epoch reports the same totals)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0

    def add(self, r: BatchResult, n: int) -> None:
        self.loss_sum += r.loss * n
        self.correct += r.correct
        self.seen += n


@dataclass
class Summary:
    """What a training session did; ``line()`` is what ``hil train`` prints and ``summary.json`` what it saved.

    Rates and pulses are the same figures ``hil report`` shows: samples/s is training samples per second of
    training time (evaluation excluded) in this session, pulses_sent the run's cumulative count.
    """

    run_dir: Path
    epochs: int  # epochs completed in the run (all sessions)
    epochs_planned: int
    test_accuracy: float | None  # last evaluation's, None before the first
    best_test_accuracy: float | None
    samples_per_second: float
    status: str  # "success" | "interrupted"
    samples_seen: int = 0  # training samples of the run so far
    stopped_by: str = ""  # "SIGINT" or "SIGTERM" when interrupted
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.extra.items())
        if self.test_accuracy is None:
            where = f"epoch {self.epochs + 1} of {self.epochs_planned}"
            head = f"interrupted in {where} after {self.samples_seen} samples, before the first evaluation"
        else:
            best = "" if self.best_test_accuracy is None else f" (best {100 * self.best_test_accuracy:.2f} %)"
            stopped = "" if self.status == "success" else ", interrupted"
            head = (f"final test accuracy {100 * self.test_accuracy:.2f} % after {self.epochs} of "
                    f"{self.epochs_planned} epochs{best}{stopped}")
        return f"{head}, {self.samples_per_second:.1f} samples/s{extra}; run: {self.run_dir}"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "epochs_done": self.epochs, "epochs_planned": self.epochs_planned,
                "last_test_accuracy": self.test_accuracy, "best_test_accuracy": self.best_test_accuracy,
                "samples_seen": self.samples_seen, "samples_per_second": self.samples_per_second, **self.extra}


SUMMARY_FILE = "summary.json"  # the last session's Summary.to_dict(), read by `hil report`


def write_summary(run: RunDir, summary: Summary) -> None:
    from eqprop_hil.runs.durable import atomic_write_bytes, to_json_safe

    text = json.dumps(to_json_safe(summary.to_dict()), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(run.path / SUMMARY_FILE, (text + "\n").encode("utf-8"))


def check_shapes(cfg: RunConfig, data: Dataset) -> None:
    sizes = cfg.model.sizes
    if sizes[0] != data.n_features or sizes[-1] != data.n_classes:
        raise ConfigError(
            f"model.sizes {sizes} does not fit data set {data.name!r} ({data.n_features} inputs, "
            f"{data.n_classes} classes): the first size must be {data.n_features} and the last {data.n_classes}"
        )


def evaluate(learner: TrainLearner, data: Dataset, chunk: int = 1000) -> tuple[float, float]:
    """Test loss and accuracy, free phase only."""
    loss_sum, correct = 0.0, 0
    for lo in range(0, data.n_test, chunk):
        x, y = data.x_test[lo : lo + chunk], data.y_test[lo : lo + chunk]
        r = learner.evaluate(x, F.one_hot(y, data.n_classes).to(x.dtype))
        loss_sum += r.loss * len(x)
        correct += r.correct
    return loss_sum / data.n_test, correct / data.n_test


def train(
    cfg: RunConfig,
    learner: TrainLearner,
    data: Dataset,
    run: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    telemetry: Any = None,
    extra_stats: Any = None,
) -> Summary:
    """Run (or resume) the epochs of ``cfg`` and keep the run records in ``run``.

    ``extra_stats`` is an optional callable returning figures to add to each epoch record and the final line
    (e.g. pulses sent by an in-situ learner).
    """
    check_shapes(cfg, data)
    tcfg = cfg.train
    cursor, tally = DataCursor(), EpochTally()
    if resume:
        state = run.load_checkpoint(fallback=True)
        if state is not None:
            learner.load_parameters_from_checkpoint(state["parameters"])
            learner.load_state_dict(state["learner"])
            cursor = DataCursor.from_dict(state["cursor"])
            tally = EpochTally(**state["tally"])
            restore_rng_state(state["rng"])
            run.rewind_metrics(state["run_records"]["metrics_records"])
            log.info("resumed at epoch %d, sample %d", cursor.epoch, cursor.position)

    def checkpoint() -> None:
        run.save_checkpoint({
            "parameters": learner.parameters_for_checkpoint(),
            "learner": learner.state_dict(),
            "cursor": cursor.to_dict(),
            "tally": tally.__dict__.copy(),
            "rng": capture_rng_state(),
        })

    history = [m for m in run.read_metrics() if "test_accuracy" in m]
    status, train_seconds, samples_run = "success", 0.0, 0
    with GracefulInterrupt() as interrupt:
        while cursor.epoch < tcfg.epochs:
            if interrupt.requested:  # a signal during the last evaluation or checkpoint: still an interruption
                status = "interrupted"
                break
            bar = tqdm(
                total=data.n_train, initial=cursor.position, disable=not progress, leave=False, unit="sample",
                desc=f"epoch {cursor.epoch + 1}/{tcfg.epochs}", dynamic_ncols=True,
            )
            set_rate_scale = getattr(learner, "set_rate_scale", None)
            if set_rate_scale is not None:  # the rate schedule (train.lr_final), also right after a resume
                set_rate_scale(tcfg.rate_scale(cursor.epoch))
            t0 = time.perf_counter()
            for pos, x, y in data.batches(tcfg.batch_size, epoch=cursor.epoch, seed=tcfg.seed, start=cursor.position):
                r = learner.train_batch(x, F.one_hot(y, data.n_classes).to(x.dtype))
                tally.add(r, len(x))
                cursor.position, cursor.samples_seen = pos, cursor.samples_seen + len(x)
                samples_run += len(x)
                bar.update(len(x))
                bar.set_postfix(acc=f"{tally.correct / tally.seen:.3f}", loss=f"{tally.loss_sum / tally.seen:.4f}")
                if telemetry is not None:
                    telemetry.sample(cursor, tally)
                if interrupt.requested:
                    break
                if tcfg.checkpoint_every and cursor.samples_seen % tcfg.checkpoint_every < len(x):
                    checkpoint()
            bar.close()
            tally.seconds += time.perf_counter() - t0
            train_seconds += time.perf_counter() - t0
            if interrupt.requested:
                status = "interrupted"
                break
            test_loss, test_acc = evaluate(learner, data)
            record = {
                "epoch": cursor.epoch + 1,
                "train_loss": tally.loss_sum / max(tally.seen, 1),
                "train_accuracy": tally.correct / max(tally.seen, 1),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "seconds": tally.seconds,
                "samples_per_second": tally.seen / max(tally.seconds, 1e-9),
                "samples_seen": cursor.samples_seen,
            }
            if extra_stats is not None:
                record.update(extra_stats())
            run.append_metrics(record)
            history.append(record)
            if telemetry is not None:
                telemetry.evaluation(record)
            tqdm.write(  # one line per epoch, with or without the bar (CI logs want it too)
                f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
                f"train acc {100 * record['train_accuracy']:.2f} %  test acc {100 * test_acc:.2f} %  "
                f"({record['seconds']:.1f} s)"
            )
            cursor.epoch, cursor.position, tally = cursor.epoch + 1, 0, EpochTally()
            checkpoint()
        if status == "interrupted":
            checkpoint()
    _plots(run, cfg)
    summary = Summary(
        run_dir=run.path,
        epochs=len(history),
        epochs_planned=tcfg.epochs,
        test_accuracy=history[-1]["test_accuracy"] if history else None,
        best_test_accuracy=max((m["test_accuracy"] for m in history), default=None),
        samples_per_second=samples_run / train_seconds if train_seconds > 0 else 0.0,
        status=status,
        samples_seen=cursor.samples_seen,
        stopped_by=interrupt.signal_name if status == "interrupted" else "",
        extra=extra_stats() if extra_stats is not None else {},
    )
    write_summary(run, summary)
    return summary


def _plots(run: RunDir, cfg: RunConfig) -> None:
    from eqprop_hil.runs.plots import plot_learning_curves

    metrics = run.read_metrics()
    if metrics:
        plot_learning_curves(metrics, run.plots_dir / "learning_curves.png", title=plot_title(cfg, run))


def plot_title(cfg: RunConfig, run: RunDir) -> str:
    """A title that says what was trained where: config, rule, sizes, data set, instrument and run name."""
    where = cfg.instrument.resource.split("?")[0]
    mode = "" if where == "software" else f" ({cfg.instrument.update_mode})"
    return (f"{cfg.name}: {cfg.rule.name} {'-'.join(map(str, cfg.model.sizes))} on {cfg.train.dataset}, "
            f"{where}{mode}\nrun {run.path.name}")


def prepare_data(cfg: RunConfig) -> Dataset:
    return load_dataset(cfg.train.dataset, seed=cfg.train.seed, limit=cfg.train.data_limit or None)
