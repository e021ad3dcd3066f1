"""One training session end to end: data, learner (software or in situ), telemetry, the loop, the records."""

from __future__ import annotations

import logging
import time
from typing import Any

from eqprop_hil.config import RunConfig
from eqprop_hil.runs.rundir import DataCursor, RunDir
from eqprop_hil.train import EpochTally, Summary, prepare_data, train

log = logging.getLogger(__name__)


class RunTelemetry:
    """Feeds the training loop's progress to a :class:`eqprop_hil.telemetry.TelemetryPublisher`."""

    def __init__(self, publisher: Any, every_samples: int, stats: Any = None) -> None:
        self.pub, self.every, self.stats = publisher, max(1, every_samples), stats
        self._next, self._t0, self._seen0 = every_samples, time.perf_counter(), None

    def _extra(self) -> dict:
        s = self.stats() if self.stats else {}
        return {"pulses_sent": int(s["pulses_sent"])} if "pulses_sent" in s else {}

    def sample(self, cursor: DataCursor, tally: EpochTally) -> None:
        if self._seen0 is None:
            self._seen0 = cursor.samples_seen
        if cursor.samples_seen < self._next:
            return
        self._next = cursor.samples_seen + self.every
        rate = (cursor.samples_seen - self._seen0) / max(time.perf_counter() - self._t0, 1e-9)
        self.pub.event({
            "kind": "train", "epoch": cursor.epoch + 1, "samples": cursor.samples_seen,
            "running_accuracy": tally.correct / max(tally.seen, 1), "loss": tally.loss_sum / max(tally.seen, 1),
            "samples_per_second": rate, **self._extra(),
        })

    def evaluation(self, record: dict) -> None:
        self.pub.event({
            "kind": "eval", "epoch": record["epoch"], "test_accuracy": record["test_accuracy"],
            "loss": record["test_loss"], "samples_per_second": record["samples_per_second"], **self._extra(),
        })


MAX_ROLLBACKS = 20  # redo-from-checkpoint rounds per session before the run stops (a board that keeps restarting)


def _train_with_rollbacks(cfg: RunConfig, learner: Any, data: Any, run: RunDir, *, resume: bool, **kw: Any) -> Summary:
    """:func:`train`, redone from the last good checkpoint whenever the in-situ learner raises
    :class:`~eqprop_hil.insitu.recovery.RollBack` (another instance answers, or an outer/local-mode sample
    was interrupted): the checkpoint's weights are re-programmed and the data feed replays from its cursor,
    exactly as ``--resume`` does, without training on. At the end the board's executed-command counter must
    equal the journal's (:meth:`InSituLearner.finish`)."""
    from eqprop_hil.insitu.recovery import RollBack

    if cfg.instrument.resource == "software":
        return train(cfg, learner, data, run, resume=resume, **kw)
    for rounds in range(MAX_ROLLBACKS + 1):
        try:
            summary = train(cfg, learner, data, run, resume=resume, **kw)
            if summary.status == "success":
                run.write_record("reconciliation.json", learner.finish())
            return summary
        except RollBack as e:
            if rounds == MAX_ROLLBACKS:
                raise
            has_checkpoint = bool(run.checkpoints())
            log.warning("%s; redoing the run from %s", e,
                        "its last checkpoint" if has_checkpoint else "the start (no checkpoint yet)")
            learner.guard.stats["rollbacks"] += 1
            learner.recover(e, has_checkpoint)
            if not has_checkpoint:
                run.rewind_metrics(0)
            resume = True
    raise AssertionError("unreachable")


def run_training(cfg: RunConfig, run: RunDir, *, resume: bool = False, progress: bool = True) -> Summary:
    data = prepare_data(cfg)
    if cfg.instrument.resource == "software":
        from eqprop_hil.engine.learners import build_learner

        learner, stats, snapshot, closer = build_learner(cfg), None, {"instrument": "software"}, None
    else:
        from eqprop_hil.insitu.learner import open_insitu

        learner = open_insitu(cfg, run, resume=resume)
        stats, snapshot, closer = learner.stats, learner.snapshot(), learner.close
    run.write_snapshot(snapshot)
    publisher = telemetry = None
    status, reason = "fail", ""
    try:
        if cfg.telemetry.address:
            from eqprop_hil.telemetry import TelemetryPublisher

            publisher = TelemetryPublisher(cfg.telemetry.address)
            print(f"telemetry: hil monitor {publisher.address} --snapshot {publisher.snapshot_address}", flush=True)
            publisher.start(cfg.name, config=cfg.to_dict(), instrument=snapshot, run_dir=str(run.path))
            telemetry = RunTelemetry(publisher, cfg.telemetry.every_samples, stats)
        summary = _train_with_rollbacks(cfg, learner, data, run, resume=resume, progress=progress,
                                        telemetry=telemetry, extra_stats=stats)
        status = "success" if summary.status == "success" else "abort"
        return summary
    except BaseException as e:
        status, reason = ("abort", "interrupted") if isinstance(e, KeyboardInterrupt) else ("fail", repr(e))
        raise
    finally:
        if closer is not None:
            closer()
        if publisher is not None:
            if publisher.run_open:
                publisher.stop(status, reason)
            publisher.close()
