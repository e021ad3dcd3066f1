"""One training session end to end: data, learner (software or in situ), run documents and telemetry, the loop.

Every session is one Bluesky run (hil/telemetry/documents.py): its documents go to ``documents.jsonl`` in the run
directory and, with ``[telemetry] address``, to a ZeroMQ publisher that Bluesky's RemoteDispatcher reads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from eqprop_hil.config import ConfigError, RunConfig
from eqprop_hil.runs.rundir import DataCursor, RunDir
from eqprop_hil.train import EpochTally, Summary, prepare_data, train

log = logging.getLogger(__name__)
DOCUMENTS_FILE = "documents.jsonl"


class RunTelemetry:
    """Feeds the training loop's progress into the run's documents: stream ``primary`` every N samples, stream
    ``eval`` once per evaluation."""

    def __init__(self, documents: Any, every_samples: int, stats: Any = None) -> None:
        self.docs, self.every, self.stats = documents, max(1, every_samples), stats
        self._next, self._t0, self._seen0 = every_samples, time.perf_counter(), None

    def _extra(self) -> dict:
        s = self.stats() if self.stats else {}
        return {"pulses_sent": int(s["pulses_sent"])} if "pulses_sent" in s else {}

    def sample(self, cursor: DataCursor, tally: EpochTally) -> None:
        if self._seen0 is None:
            self._seen0, self._next = cursor.samples_seen, cursor.samples_seen + self.every
            return
        if cursor.samples_seen < self._next:
            return
        self._next = cursor.samples_seen + self.every
        rate = (cursor.samples_seen - self._seen0) / max(time.perf_counter() - self._t0, 1e-9)
        self.docs.event({
            "epoch": cursor.epoch + 1, "samples": cursor.samples_seen,
            "running_accuracy": tally.correct / max(tally.seen, 1), "loss": tally.loss_sum / max(tally.seen, 1),
            "samples_per_second": rate, **self._extra(),
        }, "primary")

    def evaluation(self, record: dict) -> None:
        self.docs.event({
            "epoch": record["epoch"], "samples": record["samples_seen"], "train_accuracy": record["train_accuracy"],
            "test_accuracy": record["test_accuracy"], "test_loss": record["test_loss"],
            "samples_per_second": record["samples_per_second"], **self._extra(),
        }, "eval")


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"[telemetry] {what} = {path!r}: cannot read it ({e.strerror or e})") from e


def open_publisher(cfg: RunConfig) -> Any:
    """The telemetry publisher of ``[telemetry]``: address, CURVE secret key file, token (file or
    ``$EQPROP_HIL_TELEMETRY_TOKEN``). Prints how to watch it."""
    from eqprop_hil import env
    from eqprop_hil.telemetry import TelemetryPublisher

    tcfg = cfg.telemetry
    token = _read_text(tcfg.token_file, "token_file") if tcfg.token_file else env.setting("TELEMETRY_TOKEN")
    publisher = TelemetryPublisher(tcfg.address, curve_secret_key=Path(tcfg.curve_secret_key_file).expanduser()
                                   if tcfg.curve_secret_key_file else None, token=token)
    key = f" --server-key {publisher.public_key.decode()}" if publisher.public_key else ""
    print(f"telemetry: hil monitor {publisher.address} --snapshot {publisher.snapshot_address}{key}  "
          f"(Bluesky: RemoteDispatcher({publisher.address.removeprefix('tcp://')!r}, deserializer=json.loads))",
          flush=True)
    if tcfg.wait_for_subscribers:
        print(f"telemetry: waiting up to {tcfg.wait_timeout_s:g} s for {tcfg.wait_for_subscribers} subscriber(s)",
              flush=True)
        if not publisher.wait_for_subscribers(tcfg.wait_for_subscribers, tcfg.wait_timeout_s):
            log.warning("telemetry: %d of %d subscribers joined within %g s; starting anyway",
                        publisher.subscriptions, tcfg.wait_for_subscribers, tcfg.wait_timeout_s)
    return publisher


def _scan_id(path: Path) -> int:
    """1 for a new run, one more for each resumed session (the starts already in documents.jsonl)."""
    if not path.exists():
        return 1
    from eqprop_hil.telemetry import read_documents

    return 1 + sum(1 for name, _ in read_documents(path) if name == "start")


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count once for the process (``[train] threads``; 0 keeps torch's default)."""
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def run_training(cfg: RunConfig, run: RunDir, *, resume: bool = False, progress: bool = True) -> Summary:
    from eqprop_hil.telemetry import EVAL_DATA_KEYS, PRIMARY_DATA_KEYS, PULSES_KEY, DocumentLog, RunDocuments

    apply_threads(cfg.train.threads)
    data = prepare_data(cfg)
    if cfg.instrument.resource == "software":
        from eqprop_hil.engine.learners import build_learner

        learner, stats, snapshot, closer = build_learner(cfg), None, {"instrument": "software"}, None
    else:
        from eqprop_hil.insitu.learner import open_insitu

        learner = open_insitu(cfg, run, resume=resume)
        stats, snapshot, closer = learner.stats, learner.snapshot(), learner.close
    publisher = doc_log = None
    docs = RunDocuments()
    status, reason = "fail", ""
    try:
        run.write_snapshot(snapshot)
        doc_path = run.path / DOCUMENTS_FILE
        scan_id = _scan_id(doc_path)
        doc_log = DocumentLog(doc_path)
        docs.sinks.append(doc_log)
        if cfg.telemetry.address:
            publisher = open_publisher(cfg)
            docs.sinks.append(publisher)
        docs.start(cfg.name, config=cfg.to_dict(), instrument=snapshot, run_dir=str(run.path), resumed=resume,
                   scan_id=scan_id)
        pulses = PULSES_KEY if stats is not None and "pulses_sent" in stats() else {}
        docs.describe("primary", {**PRIMARY_DATA_KEYS, **pulses})
        docs.describe("eval", {**EVAL_DATA_KEYS, **pulses})
        telemetry = RunTelemetry(docs, cfg.telemetry.every_samples, stats)
        summary = train(cfg, learner, data, run, resume=resume, progress=progress, telemetry=telemetry,
                        extra_stats=stats)
        status, reason = ("success", "") if summary.status == "success" else ("abort", "interrupted")
        return summary
    except BaseException as e:
        status, reason = ("abort", "interrupted") if isinstance(e, KeyboardInterrupt) else ("fail", f"{type(e).__name__}: {e}")
        raise
    finally:
        try:
            if closer is not None:
                closer()
        finally:
            if docs.run_open:
                try:
                    docs.stop(status, reason)
                except Exception:  # a dead publisher must not hide the run's own outcome
                    log.exception("could not send the stop document")
            if doc_log is not None:
                doc_log.close()
            if publisher is not None:
                publisher.close()
