"""One training session end to end: data, learner (software or in situ), telemetry, the loop, the records."""

from __future__ import annotations

import time
from typing import Any

from eqprop_hil.config import RunConfig
from eqprop_hil.runs.rundir import DataCursor, RunDir
from eqprop_hil.train import EpochTally, Summary, prepare_data, train


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


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count once for the process (``[train] threads``; 0 keeps torch's default)."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_training(cfg: RunConfig, run: RunDir, *, resume: bool = False, progress: bool = True) -> Summary:
    apply_threads(cfg.train.threads)
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
        summary = train(cfg, learner, data, run, resume=resume, progress=progress, telemetry=telemetry, extra_stats=stats)
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
