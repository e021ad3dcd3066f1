"""`hil report RUN_DIR`: what a run did, read from its records only (no instrument, no torch), and its plots.

Prints the run's status (finished, interrupted, failed with its reason, crashed or still running, or never
started), the config name, epochs, last and best test accuracy, samples per second, pulses sent, pending journal
entries (commands a crash left unconfirmed: ``hil train --resume`` reconciles them) and the latest checkpoint;
writes ``plots/learning_curves.png``. Samples/s and pulses come from ``summary.json``, the figures the training
session printed itself, so the two always agree; older runs fall back to the last epoch record.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from eqprop_hil.runs.rundir import RunDir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/20250101-120000-digits")
    parser.add_argument("--no-plots", action="store_true", help="print the summary only")


def _find(config: dict, key: str) -> Any:
    """``key`` at the top level of the config or in one of its tables (``[train] epochs = 5``)."""
    if key in config:
        return config[key]
    for value in config.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    return None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _last_session(run: RunDir) -> dict:
    """summary.json (what the last training session printed), or {}."""
    path = run.path / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stop_document(run: RunDir) -> tuple[bool, dict | None]:
    """(whether documents.jsonl holds a start, the stop of its last run or None if that run never stopped)."""
    path = run.path / "documents.jsonl"
    if not path.exists():
        return False, None
    started, stop = False, None
    for line in path.read_bytes().splitlines():
        try:
            name, doc = json.loads(line)
        except (ValueError, TypeError):
            continue  # a torn last line: the stop is missing, which is what a crash looks like
        if name == "start":
            started, stop = True, None
        elif name == "stop" and isinstance(doc, dict):
            stop = doc
    return started, stop


def run_status(run: RunDir, epochs_done: int, epochs_planned: Any) -> str:
    """One phrase: finished / interrupted / failed: reason / crashed or running / never started: reason."""
    started, stop = _stop_document(run)
    trained = bool(run.checkpoints()) or epochs_done > 0
    if stop is not None:
        reason = f": {stop['reason']}" if stop.get("reason") else ""
        if stop.get("exit_status") == "success":
            return "finished" if epochs_planned is None or epochs_done >= epochs_planned else "stopped early"
        if stop.get("exit_status") == "abort":
            return f"interrupted{reason} (continue with hil train --resume {run.path})"
        return (f"failed{reason}" if trained else f"never started{reason}")
    if started:
        return f"running, or crashed (continue with hil train --resume {run.path})"
    if not trained:
        return "never started: no training session left a record here"
    return "unknown (a run from an older version: no documents.jsonl)"


def summarize(run: RunDir) -> dict:
    """The report's figures as a dict (None where the records do not say)."""
    config = run.read_config()
    session = _last_session(run)
    metrics = run.read_metrics()
    test = [a for a in (_num(m.get("test_accuracy")) for m in metrics) if a is not None]
    epochs = {m["epoch"] for m in metrics if _num(m.get("epoch")) is not None}
    rates = [r for r in (_num(m.get("samples_per_s", m.get("samples_per_second"))) for m in metrics) if r is not None]
    pulses = [p for p in (_num(m.get("pulses_sent")) for m in metrics) if p is not None]
    journal = run.journal(readonly=True).stats() if run.journal_path.exists() else None
    snapshot = run.read_snapshot() or {}
    identity = snapshot.get("identity") if isinstance(snapshot.get("identity"), dict) else {}
    checkpoints = run.checkpoints()
    if _num(session.get("samples_per_second")) is not None:
        rates.append(float(session["samples_per_second"]))
    if _num(session.get("pulses_sent")) is not None:
        pulses.append(float(session["pulses_sent"]))
    return {
        "run": str(run.path),
        "status": run_status(run, len(epochs), _find(config, "epochs")),
        "name": _find(config, "name") or _find(config, "preset") or run.path.name,
        "instrument": " ".join(str(identity[k]) for k in ("model", "serial") if k in identity) or None,
        "epochs_done": len(epochs),
        "epochs_planned": _find(config, "epochs"),
        "last_test_accuracy": test[-1] if test else None,
        "best_test_accuracy": max(test) if test else None,
        "samples_per_s": rates[-1] if rates else None,  # the last session's (summary.json), else the last epoch's
        # cumulative count in the metrics when the trainer records it, else what the acknowledgements report
        "pulses_sent": int(pulses[-1]) if pulses else (journal["pulses_acknowledged"] if journal else None),
        "pulse_commands_acknowledged": journal["done"] if journal else None,
        "pending_journal_entries": journal["pending"] if journal else 0,
        "latest_checkpoint": checkpoints[-1].name if checkpoints else None,
        "metrics": metrics,
    }


def format_summary(s: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f} %"

    epochs = f"{s['epochs_done']}" + (f" of {s['epochs_planned']}" if s["epochs_planned"] is not None else "")
    rows = [
        ("run", s["run"]),
        ("status", s["status"]),
        ("config", s["name"]),
        ("instrument", s["instrument"] or "-"),
        ("epochs", epochs),
        ("test accuracy (last)", pct(s["last_test_accuracy"])),
        ("test accuracy (best)", pct(s["best_test_accuracy"])),
        ("samples/s", "-" if s["samples_per_s"] is None else f"{s['samples_per_s']:.1f}"),
        ("pulses sent", "-" if s["pulses_sent"] is None else f"{s['pulses_sent']}"),
        ("pulse commands acknowledged", "-" if s["pulse_commands_acknowledged"] is None
         else str(s["pulse_commands_acknowledged"])),
        ("pending journal entries", str(s["pending_journal_entries"])
         + (" (resume to reconcile them)" if s["pending_journal_entries"] else "")),
        ("latest checkpoint", s["latest_checkpoint"] or "-"),
    ]
    return "\n".join(_row(k, v) for k, v in rows)


LABEL_WIDTH = len("pulse commands acknowledged")
log = logging.getLogger(__name__)


def _row(label: str, value: object) -> str:
    return f"{label:<{LABEL_WIDTH}}  {value}"


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir.open(Path(args.run_dir))
    summary = summarize(run_dir)
    log.debug("report of %s: %d metric records, %d checkpoints", run_dir.path, len(summary["metrics"]),
              len(run_dir.checkpoints()))
    print(format_summary(summary))
    if not args.no_plots and summary["metrics"]:
        from eqprop_hil.runs.plots import plot_learning_curves

        title = f"{summary['name']}: {summary['epochs_done']} epochs, {summary['status']}\nrun {run_dir.path.name}"
        path = plot_learning_curves(summary["metrics"], run_dir.plots_dir / "learning_curves.png", title=title)
        print(_row("plots", path))
    elif not args.no_plots:
        print(_row("plots", "none: no epoch has finished yet"))
    return 0
