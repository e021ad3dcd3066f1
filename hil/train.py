"""The training loop: data feed, one readable loop over epochs and batches, evaluation, run records.

The loop does not care where the network lives: a *learner* (hil/engine/rules.py on the software engine, hil/engine/bptt.py,
hil/engine/baselines.py, or hil/insitu/learner.py on an instrument) offers ``train_batch``, ``evaluate``, ``state_dict`` and
``load_state_dict``; the loop handles progress, metrics, checkpoints, resume, interrupts and telemetry.
"""

from __future__ import annotations

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
    run_dir: Path
    epochs: int
    test_accuracy: float
    best_test_accuracy: float
    samples_per_second: float
    status: str  # "success" | "interrupted"
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.extra.items())
        return (
            f"final test accuracy {100 * self.test_accuracy:.2f} % after {self.epochs} epochs "
            f"(best {100 * self.best_test_accuracy:.2f} %), {self.samples_per_second:.0f} samples/s{extra}; "
            f"run: {self.run_dir}"
        )


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
    status, t_run, samples_run = "success", time.perf_counter(), 0
    with GracefulInterrupt() as interrupt:
        while cursor.epoch < tcfg.epochs and not interrupt.requested:
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
    elapsed = time.perf_counter() - t_run
    last = history[-1]["test_accuracy"] if history else float("nan")
    best = max((m["test_accuracy"] for m in history), default=float("nan"))
    _plots(run, cfg)
    return Summary(
        run_dir=run.path,
        epochs=len(history),
        test_accuracy=last,
        best_test_accuracy=best,
        samples_per_second=samples_run / max(elapsed, 1e-9),
        status=status,
        extra=extra_stats() if extra_stats is not None else {},
    )


def _plots(run: RunDir, cfg: RunConfig) -> None:
    from eqprop_hil.runs.plots import plot_learning_curves

    metrics = run.read_metrics()
    if metrics:
        plot_learning_curves(metrics, run.plots_dir / "learning_curves.png", title=cfg.name)


def prepare_data(cfg: RunConfig) -> Dataset:
    return load_dataset(cfg.train.dataset, seed=cfg.train.seed, limit=cfg.train.data_limit or None)
