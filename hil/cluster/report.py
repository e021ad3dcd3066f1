"""The sweep's summary: a table for the terminal and ``results.png`` (accuracy against the swept keys)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summary_table(rows: list[dict], keys: list[str]) -> str:
    """The terminal summary: one line per trial, then the median over seeds per swept configuration."""
    def pct(x: float | None) -> str:
        return f"{100 * x:.2f}" if x is not None else "-"

    width = min(max([len(r["name"]) for r in rows] + [5]), 40) + 2
    head = f"{'trial':<{width}}" + "".join(f"{k:>16}" for k in keys) \
           + f"{'seed':>6}{'status':>8}{'test %':>8}{'best %':>8}" \
           f"{'samples/s':>11}{'wall s':>8}"
    lines = [head]
    for r in rows:
        vals = "".join(f"{json.dumps(r['config'].get(k)):>16}" for k in keys)
        status = r["status"] + ("*" if r.get("stopped_early") else "")
        sps = f"{r['samples_per_second']:.0f}" if r.get("samples_per_second") else "-"
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-"
        lines.append(f"{r['name'][:width - 2]:<{width}}{vals}{r['seed']:>6}{status:>8}{pct(r['test_accuracy']):>8}"
                     f"{pct(r['best_test_accuracy']):>8}{sps:>11}{wall:>8}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps([r["config"].get(k) for k in keys]), []).append(r)
    if keys and any(len(g) > 1 for g in groups.values()):
        lines.append("median over seeds (last-epoch test accuracy, finished trials):")
        for g in groups.values():
            accs = [r["test_accuracy"] for r in g if r["status"] == "ok" and r["test_accuracy"] is not None]
            desc = ", ".join(f"{k}={json.dumps(g[0]['config'].get(k))}" for k in keys)
            lines.append(f"  {desc}: {pct(_median(accs))} % ({len(accs)}/{len(g)} trials)")
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        lines.append(f"FAILED {r['name']}: {r.get('error', '')[:300]}")
    if any(r.get("stopped_early") for r in rows):
        lines.append("* stopped early by ASHA")
    return "\n".join(lines)


def plot_results(rows: list[dict], keys: list[str], path: Path) -> Path:
    """Last-epoch test accuracy against each swept key (one panel per key; seeds as separate dots, median line)."""
    from eqprop_hil.runs.plots import new_figure, save_figure

    panels = keys or ["seed"]
    fig, axes = new_figure(ncols=len(panels), width_in=4.0, height_in=3.0)
    axes = axes if isinstance(axes, list) else [axes]
    ok = [r for r in rows if r["status"] == "ok" and r["test_accuracy"] is not None]
    for ax, key in zip(axes, panels):
        values = []
        for r in rows:
            v = r["seed"] if key == "seed" else r["config"].get(key)
            if json.dumps(v) not in [json.dumps(x) for x in values]:
                values.append(v)
        labels = [json.dumps(v) for v in values]
        for r in ok:
            v = r["seed"] if key == "seed" else r["config"].get(key)
            ax.plot(labels.index(json.dumps(v)), 100 * r["test_accuracy"], "o", color="C0", alpha=0.6, ms=4)
        med = [_median([100 * r["test_accuracy"] for r in ok
                        if json.dumps(r["seed"] if key == "seed" else r["config"].get(key)) == lab]) for lab in labels]
        xs = [i for i, m in enumerate(med) if m is not None]
        ax.plot(xs, [med[i] for i in xs], "-", color="C1", label="median")
        for i, lab in enumerate(labels):
            n_failed = sum(1 for r in rows if r["status"] == "failed"
                           and json.dumps(r["seed"] if key == "seed" else r["config"].get(key)) == lab)
            if n_failed:
                ax.annotate(f"{n_failed} failed", (i, 0.02), xycoords=("data", "axes fraction"), ha="center",
                            fontsize=7, color="C3")
        rotation = 30 if max(map(len, labels), default=0) > 6 else 0
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=rotation)
        ax.set_xlabel(key)
        ax.set_ylabel("last-epoch test accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{len(ok)} of {len(rows)} trials finished", fontsize=8)
    return save_figure(fig, path, dpi=100)
