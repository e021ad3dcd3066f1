"""`hil train --cluster ADDRESS --bench NAME`: one run on the host that holds the board, queued while it is busy.

The run is a Ray task that asks for one unit of ``bench:NAME`` (and one CPU), so Ray starts it on that bench's
host and only when the bench's previous run has ended; the submitter waits in Ray's queue. On the bench host the
run is an ordinary run (:func:`eqprop_hil.cluster.trial.run_trial`) whose instrument and limits come from the bench
description; its directory lives in the bench's ``run_store`` while it runs. When it ends (finished, failed or
stopped) the whole run directory is sent back and written under the submitter's ``runs/``; the per-epoch lines
stream to the submitter's terminal as they happen (Ray forwards the task's output to its driver).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eqprop_hil import config as configuration
from eqprop_hil.cluster.bench import BenchError, load_bench, require_bench
from eqprop_hil.cluster.runtime import ClusterError, connect
from eqprop_hil.cluster.trial import resolve_config, run_trial, trial_spec
from eqprop_hil.runs.durable import atomic_write_bytes

DEFAULT_STORE = Path(tempfile.gettempdir()) / "hil-bench-runs"
MAX_RETURN_BYTES = 256 * 1024 * 1024  # a run directory larger than this stays on the bench host


def _collect(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (relative path -> bytes), to send back to the submitter."""
    files, total = {}, 0
    for p in sorted(run_dir.rglob("*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            data = p.read_bytes()
            total += len(data)
            if total > MAX_RETURN_BYTES:
                raise ClusterError(f"run directory {run_dir} is larger than {MAX_RETURN_BYTES} bytes; it stays on "
                                   f"the bench host")
            files[p.relative_to(run_dir).as_posix()] = data
    return files


def bench_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Executed on the bench host (or any host when ``spec["bench"]`` is empty): run, then pack the records."""
    store = DEFAULT_STORE
    if spec.get("bench"):
        store = Path(load_bench(spec["bench"]).run_store or DEFAULT_STORE).expanduser()
    run_dir = store / spec["name"]
    spec = dict(spec, run_dir=str(run_dir), quiet=False)
    result, error = {}, ""
    try:
        result = run_trial(spec)
    except Exception as e:  # noqa: BLE001  (the run's records still go back, with the error)
        error = f"{type(e).__name__}: {e}"
    return {"result": result, "error": error, "files": _collect(run_dir) if run_dir.is_dir() else {},
            "bench_run_dir": str(run_dir), "host": socket.gethostname()}


def submit(spec: dict[str, Any]) -> Any:
    """Queue one run (a trial spec) on its bench, or on any CPU without one; returns the Ray object ref."""
    import ray

    resources = {require_bench(spec["bench"]): 1} if spec.get("bench") else {}
    task = ray.remote(bench_run).options(num_cpus=1, resources=resources, max_retries=0,
                                         name=f"hil-run:{spec.get('bench') or 'any'}:{spec['name']}")
    return task.remote(spec)


def write_back(reply: dict[str, Any], local_dir: str | os.PathLike) -> Path:
    """Write a finished run's files under ``local_dir`` (which must be new or empty)."""
    local = Path(local_dir)
    if local.exists() and any(local.iterdir()):
        raise ClusterError(f"{local} is not empty; the run's records are on the bench host in {reply['bench_run_dir']}")
    for rel, data in reply["files"].items():
        target = local / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ClusterError(f"refusing a run file outside the run directory: {rel!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    local.mkdir(parents=True, exist_ok=True)
    return local


def submit_from_args(args: Any, overrides: dict[str, Any]) -> int:
    """The ``hil train --cluster/--bench`` path (see :mod:`eqprop_hil.cli.train`)."""
    import ray

    from eqprop_hil.runs.rundir import resolve_run_dir

    if not args.cluster:
        raise ClusterError("--bench needs --cluster ADDRESS (the head node's HOST:PORT, or auto)")
    if args.resume:
        raise ClusterError("--resume with --cluster is not supported: resume on the bench host "
                           "(hil train --resume RUN_STORE/NAME) where the run's journal and instrument are")
    if args.bench and args.instrument:
        raise BenchError("--bench and --instrument exclude each other: the bench decides the instrument")
    preset = args.preset or (None if args.config else configuration.DEFAULT_PRESET)
    if args.config and not Path(args.config).is_file():
        raise ClusterError(f"config file {args.config!r} does not exist")
    config_text = Path(args.config).read_text(encoding="utf-8") if args.config else ""
    local = resolve_run_dir(args.run_dir, preset=preset or "config")
    name = f"{local.name}-{secrets.token_hex(3)}"
    spec = trial_spec(name, local, preset=preset, config_text=config_text, overrides=overrides,
                      bench=args.bench or "", quiet=False)
    configuration.build(resolve_config(spec))  # a bad key is refused here, before anything is queued
    connect(args.cluster, log_to_driver=not args.no_progress)
    queued_at = time.time()
    ref = submit(spec)
    print(f"queued on {'bench ' + args.bench if args.bench else 'the cluster'}; it starts when the "
          f"{'board' if args.bench else 'CPU'} is free", flush=True)
    try:
        reply = ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref)
        print("cancelled; a started run keeps its records (and its journal) on the bench host", file=sys.stderr)
        return 130
    path = write_back(reply, local)
    result = reply["result"]
    if result.get("started_at"):
        print(f"ran on {reply['host']} (waited {result['started_at'] - queued_at:.1f} s in the queue)", flush=True)
    if reply["error"]:
        print(f"hil train: the run failed on {reply['host']}: {reply['error']}; records: {path}", file=sys.stderr)
        return 1
    if result.get("test_accuracy") is None:  # stopped before its first evaluation (Summary says None, not NaN)
        print(f"stopped before the first evaluation, {result['samples_per_second']:.1f} samples/s; run: {path}",
              flush=True)
        return 0
    print(f"final test accuracy {100 * result['test_accuracy']:.2f} % after {result['epochs']} epochs (best "
          f"{100 * result['best_test_accuracy']:.2f} %), {result['samples_per_second']:.0f} samples/s; run: {path}",
          flush=True)
    return 0
