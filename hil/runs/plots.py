"""Plots of a run: learning curves from ``metrics.jsonl``, and the figure helpers the calibration reuses.

matplotlib is imported only when a figure is made (``hil monitor`` and the trainer's inner loop never pay for
it), and figures are built with :class:`matplotlib.figure.Figure` rendered by Agg, without pyplot: no global
figure state, no GUI backend, safe in a headless lab PC or CI.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from eqprop_hil.runs.durable import atomic_write_bytes

# metric key -> (panel, label); accuracies are fractions 0..1 and are drawn in percent
CURVES: dict[str, tuple[str, str]] = {
    "train_accuracy": ("accuracy", "train"),
    "test_accuracy": ("accuracy", "test"),
    "train_loss": ("loss", "train"),
    "test_loss": ("loss", "test"),
}


def new_figure(ncols: int = 1, nrows: int = 1, *, width_in: float = 5.0, height_in: float = 3.6) -> tuple[Any, Any]:
    """A pyplot-free figure and its axes (a list when more than one); sizes in inches per panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in * ncols, height_in * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes[0] if len(axes) == 1 else axes


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write a figure (format from the suffix, PNG by default) atomically, creating the folder; returns the path.

    Atomic so that a viewer refreshing the file never shows half an image.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower(), dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure would otherwise stay alive
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def epoch_series(metrics: Iterable[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Per curve of :data:`CURVES`: (epochs, values), the last finite value recorded for each epoch, by epoch.

    Records without an ``epoch`` are skipped; several records for one epoch (an epoch line and an evaluation
    line) are merged, later ones winning.
    """
    per_key: dict[str, dict[float, float]] = {k: {} for k in CURVES}
    for rec in metrics:
        epoch = rec.get("epoch")
        if not _finite(epoch):
            continue
        for key in CURVES:
            if _finite(rec.get(key)):
                per_key[key][float(epoch)] = float(rec[key])
    return {k: (sorted(v), [v[e] for e in sorted(v)]) for k, v in per_key.items() if v}


def plot_learning_curves(metrics: Iterable[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Accuracy (percent) and loss versus epoch, train and test, side by side; written to ``path`` (PNG)."""
    series = epoch_series(metrics)
    fig, (ax_acc, ax_loss) = new_figure(2)
    for key, (epochs, values) in series.items():
        panel, label = CURVES[key]
        ax = ax_acc if panel == "accuracy" else ax_loss
        ys = [100.0 * v for v in values] if panel == "accuracy" else values
        ax.plot(epochs, ys, marker="o", markersize=3, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax, name, unit in ((ax_acc, "accuracy", "accuracy (%)"), (ax_loss, "loss", "loss")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {name} recorded", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
