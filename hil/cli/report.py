"""`hil report RUN_DIR`: what a run did, read from its records only (no instrument, no torch), and its plots.

Prints the config name, epochs, last and best test accuracy, samples per second, pulses sent, pending journal
entries (commands a crash left unconfirmed: ``hil train --resume`` reconciles them) and the latest checkpoint;
writes ``plots/learning_curves.png``.
"""

from __future__ import annotations

import argparse
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


def summarize(run: RunDir) -> dict:
    """The report's figures as a dict (None where the records do not say)."""
    config = run.read_config()
    metrics = run.read_metrics()
    test = [a for a in (_num(m.get("test_accuracy")) for m in metrics) if a is not None]
    epochs = {m["epoch"] for m in metrics if _num(m.get("epoch")) is not None}
    rates = [r for r in (_num(m.get("samples_per_s", m.get("samples_per_second"))) for m in metrics) if r is not None]
    pulses = [p for p in (_num(m.get("pulses_sent")) for m in metrics) if p is not None]
    journal = run.journal(readonly=True).stats() if run.journal_path.exists() else None
    snapshot = run.read_snapshot() or {}
    identity = snapshot.get("identity") if isinstance(snapshot.get("identity"), dict) else {}
    checkpoints = run.checkpoints()
    return {
        "run": str(run.path),
        "name": _find(config, "name") or _find(config, "preset") or run.path.name,
        "instrument": " ".join(str(identity[k]) for k in ("model", "serial") if k in identity) or None,
        "epochs_done": len(epochs),
        "epochs_planned": _find(config, "epochs"),
        "last_test_accuracy": test[-1] if test else None,
        "best_test_accuracy": max(test) if test else None,
        "samples_per_s": rates[-1] if rates else None,
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


def _row(label: str, value: object) -> str:
    return f"{label:<{LABEL_WIDTH}}  {value}"


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir.open(Path(args.run_dir))
    summary = summarize(run_dir)
    print(format_summary(summary))
    if not args.no_plots:
        from eqprop_hil.runs.plots import plot_learning_curves

        path = plot_learning_curves(summary["metrics"], run_dir.plots_dir / "learning_curves.png",
                                    title=str(summary["name"]))
        print(_row("plots", path))
    return 0
