"""Shared helpers of the link and hardware-in-the-loop benchmarks: timing proxies, statistics, tables, JSON.

The proxies measure where a training loop's time goes without touching driver or learner code:
:func:`timed` wraps any object so that every call of its public methods adds its wall time (seconds) to a
:class:`Clock`, under a bucket the caller chooses (for example "train" while a training batch runs, "other"
during evaluation). Wrapping the learner's ``array`` this way gives the time the controller is blocked in the
link and the emulator; what remains of a training batch is the controller's own time.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "out"


class Clock:
    """Seconds and call counts per (bucket, method); ``bucket`` is switched by the code being measured."""

    def __init__(self) -> None:
        self.bucket = "other"
        self.seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[self.bucket][name] += seconds
        self.calls[self.bucket][name] += 1

    def total(self, bucket: str, exclude: Iterable[str] = ()) -> float:
        """Seconds spent in ``bucket`` by every method but those in ``exclude``."""
        skip = set(exclude)
        return sum(s for name, s in self.seconds[bucket].items() if name not in skip)


def _public_methods(obj: Any) -> list[str]:
    names = []
    for name in dir(type(obj)):
        if name.startswith("_"):
            continue
        attr = getattr(type(obj), name, None)
        if callable(attr) and not isinstance(attr, type):
            names.append(name)
    return names


def _wire_readings(obj: Any) -> list[str]:
    """Public data descriptors of ``obj``'s class other than Python properties: readings that go to the wire."""
    names = []
    for name in dir(type(obj)):
        if name.startswith("_"):
            continue
        attr = next((vars(k)[name] for k in type(obj).__mro__ if name in vars(k)), None)
        if attr is not None and not isinstance(attr, property) and hasattr(attr, "__get__") \
                and hasattr(attr, "__set__"):
            names.append(name)
    return names


def timed(target: Any, clock: Clock, prefix: str = "") -> Any:
    """A proxy of ``target`` whose public methods are timed into ``clock`` (key ``prefix + method name``).

    The proxy is an instance of a class made for it with one real method per public method of the target (not a
    ``__getattr__`` forwarder), so ``isinstance(proxy, SomeRuntimeProtocol)`` answers as it would for the target
    on every Python version. Other attributes (``stats``, ``limits``, ...) are read from the target.
    """

    def make(name: str) -> Callable[..., Any]:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return getattr(target, name)(*args, **kwargs)
            finally:
                clock.add(prefix + name, time.perf_counter() - t0)

        method.__name__ = name
        return method

    def reading(name: str) -> property:
        def get(self: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return getattr(target, name)
            finally:
                clock.add(prefix + name, time.perf_counter() - t0)

        return property(get, lambda self, value: setattr(target, name, value))

    namespace: dict[str, Any] = {name: make(name) for name in _public_methods(target)}
    # Readings declared as descriptors (SCPI properties such as ``boot_count``: a query on the wire each time)
    # are timed too; plain attributes and Python properties (``stats``, ``limits``) are read through.
    namespace.update({name: reading(name) for name in _wire_readings(target)})
    namespace["__getattr__"] = lambda self, name: getattr(target, name)
    namespace["__enter__"] = lambda self: self
    namespace["__exit__"] = lambda self, *exc: target.__exit__(*exc)
    namespace["wrapped"] = target
    cls = type(f"Timed{type(target).__name__}", (), namespace)
    return cls()


def repeat_times(fn: Callable[[], Any], repetitions: int, warmup: int = 3) -> list[float]:
    """Wall time of each of ``repetitions`` calls of ``fn`` (seconds), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), 90)) if values else float("nan")


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What a driver's ``stats`` counters (bytes_sent, bytes_received, round_trips, ...) grew by."""
    return {k: int(after[k]) - int(before.get(k, 0)) for k in after if isinstance(after[k], (int, np.integer))}


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: integers with thousands separators, floats to ``digits`` significant figures."""
    if isinstance(value, (bool, str)) or value is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    v = float(value)
    if v != v:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    """A plain-text table: title, header, a rule, right-aligned cells, then the notes that say what each figure
    means and its unit."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(columns, widths))))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for note in notes:
        print(f"  {note}")


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON (NaN becomes null) and return the path."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [clean(v) for v in obj]
        if isinstance(obj, (np.integer,)):
            return int(obj)
        if isinstance(obj, (float, np.floating)):
            return None if obj != obj else float(obj)
        return obj

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(clean(payload), indent=1) + "\n", encoding="utf-8")
    return p


def environment() -> dict:
    """What the figures were measured on (they depend on it)."""
    import os
    import platform

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "note": "wall-clock medians on a possibly shared machine; compare orders of magnitude"}
