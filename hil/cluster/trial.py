"""One trial of a sweep, or one run on a bench: an ordinary run through ``eqprop_hil.session.run_training``.

A trial is described by a plain dictionary (:func:`trial_spec`), so that it travels to any host of the cluster
without the submitter's files: the preset's name, the text of the ``--config`` file, the overrides, the run
directory and the bench. On the host it resolves the config exactly as ``hil train`` does, applies the bench's
instrument and limits (:mod:`eqprop_hil.cluster.bench`), and trains in a run directory with the usual records
(``config.toml``, ``metrics.jsonl``, ``journal.jsonl`` for an instrument, ``checkpoint/``). A run directory that
already holds a run is continued (``resume``), which is how an interrupted sweep picks up where it stopped.

Each trial also writes ``trial.json`` next to those records: where it ran (host, Ray node, process id) and its
wall-clock start and end (Unix seconds), the facts that show a bench ran its queue one run at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eqprop_hil import config as configuration
from eqprop_hil.runs.durable import atomic_write_bytes, to_json_safe
from eqprop_hil.runs.rundir import RunDir

TRIAL_RECORD = "trial.json"
CONSOLE_LOG = "console.log"
POLL_S = 0.25  # how often the reporting thread looks for a new epoch record


def trial_spec(
    name: str, run_dir: str | os.PathLike, *, preset: str | None = None, config_text: str = "",
    overrides: dict[str, Any] | None = None, swept: dict[str, Any] | None = None, bench: str = "",
    quiet: bool = True,
) -> dict[str, Any]:
    """A trial as plain data. ``swept`` (dotted key -> value) is recorded for the results; ``quiet`` sends the
    per-epoch console lines to ``console.log`` in the run directory instead of the worker's stdout."""
    return {
        "name": name, "run_dir": str(Path(run_dir).absolute()), "preset": preset, "config_text": config_text,
        "overrides": overrides or {}, "swept": swept or {}, "bench": bench, "quiet": quiet,
    }


def resolve_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The run's config tables: preset, then the config file's text, then the overrides (as ``hil train``)."""
    data: dict[str, Any] = {}
    if spec.get("preset"):
        data = configuration.merge(data, configuration.load_preset(spec["preset"]))
        data.setdefault("name", spec["preset"])
    if spec.get("config_text"):
        try:
            data = configuration.merge(data, tomllib.loads(spec["config_text"]))
        except tomllib.TOMLDecodeError as e:
            raise configuration.ConfigError(f"the sweep's --config file is not valid TOML: {e}") from e
    return configuration.merge(data, spec.get("overrides") or {})


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    text = json.dumps(to_json_safe(record), indent=1, sort_keys=True)
    atomic_write_bytes(run_dir / TRIAL_RECORD, (text + "\n").encode("utf-8"))


def read_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A trial's ``trial.json`` (None while it has not started)."""
    try:
        return json.loads((Path(run_dir) / TRIAL_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_trial(spec: dict[str, Any], report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one trial here and return its result (raises what the run raised, after recording it).

    ``report(record)`` is called once per finished epoch with that epoch's metrics and the best test accuracy so
    far (Ray Tune's report, which lets ASHA stop a trial). The training runs in a thread of its own and this
    thread reports, so the training loop itself is the unchanged ``run_training``.
    """
    import torch

    from eqprop_hil.cluster.bench import apply_bench, load_bench
    from eqprop_hil.cluster.runtime import node_id
    from eqprop_hil.session import run_training

    torch.set_num_threads(1)  # one trial = one CPU; parallelism comes from running trials side by side
    path = Path(spec["run_dir"])
    resume = (path / RunDir.CONFIG).is_file()
    data = RunDir.open(path).read_config() if resume else resolve_config(spec)
    bench = load_bench(spec["bench"]) if spec.get("bench") else None
    if bench is not None:
        data = apply_bench(data, bench)
    cfg = configuration.build(data)
    run = RunDir.open(path) if resume else RunDir.create(path, cfg.to_dict())
    if bench is not None and resume:
        run.write_config(cfg.to_dict())  # the bench's current limits apply to the continued run too
    record: dict[str, Any] = {
        "name": spec["name"], "host": socket.gethostname(), "node_id": node_id(), "pid": os.getpid(),
        "bench": spec.get("bench", ""), "instrument": cfg.instrument.resource, "resumed": resume,
        "started_at": time.time(), "status": "running",
    }
    _write_record(path, record)
    outcome: dict[str, Any] = {}

    def train_thread() -> None:
        try:
            log = open(path / CONSOLE_LOG, "a", encoding="utf-8") if spec.get("quiet", True) else None
            with contextlib.ExitStack() as stack:
                if log is not None:
                    stack.enter_context(log)
                    stack.enter_context(contextlib.redirect_stdout(log))
                    stack.enter_context(contextlib.redirect_stderr(log))
                outcome["summary"] = run_training(cfg, run, resume=resume, progress=False)
        except BaseException as e:  # noqa: BLE001  (handed to the reporting thread, which re-raises it)
            outcome["error"] = e

    t0 = time.perf_counter()
    worker = threading.Thread(target=train_thread, name=f"trial-{spec['name']}", daemon=True)
    worker.start()
    reported, best = 0, float("-inf")
    while True:
        worker.join(POLL_S)
        alive = worker.is_alive()
        epochs = [m for m in run.read_metrics() if "test_accuracy" in m]
        pending = epochs[reported:] if alive else epochs[reported:-1]  # the last epoch goes out with the result
        for m in pending:
            best = max(best, m["test_accuracy"])
            if report is not None:
                report({"epoch": m["epoch"], "test_accuracy": m["test_accuracy"], "best_test_accuracy": best,
                        "samples_per_second": m["samples_per_second"]})
        reported += len(pending)
        if not alive:
            break
    record["finished_at"] = time.time()
    if "error" in outcome:
        record.update(status="failed", error=repr(outcome["error"]))
        _write_record(path, record)
        raise outcome["error"]
    summary = outcome["summary"]
    record["status"] = "ok" if summary.status == "success" else "interrupted"
    _write_record(path, record)
    return {
        "name": spec["name"], "config": spec.get("swept", {}), "seed": cfg.train.seed, "status": record["status"],
        "test_accuracy": summary.test_accuracy, "best_test_accuracy": summary.best_test_accuracy,
        "samples_per_second": summary.samples_per_second, "epochs": summary.epochs,
        "wall_s": time.perf_counter() - t0, "run_dir": str(path), "host": record["host"],
        "node_id": record["node_id"], "pid": record["pid"], "bench": record["bench"],
        "started_at": record["started_at"], "finished_at": record["finished_at"],
    }
