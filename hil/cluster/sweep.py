"""`hil sweep`: a grid (or random) search over config keys and seeds, each trial an ordinary run, on Ray Tune.

Why Tune and not plain Ray tasks: Tune already places trials by resources (one CPU each, plus ``bench:NAME`` for
a bench), isolates a failing trial from the others (``max_failures=0``, ``fail_fast=False``) and offers ASHA
early stopping, which needs per-epoch reports and a scheduler that stops trials: nothing of that is written here.

The sweep's own ledger is ``OUT/results.jsonl``: one line per finished or failed trial, written by the driver as
Tune reports it (the last line of a trial wins; the file is compacted at the end). Trial names and run
directories (``OUT/runs/<trial>``) follow from the command alone, so running the same command again skips the
trials that finished, continues each interrupted one from its run directory's checkpoint, and (with
``retry_failed``) runs the failed ones again. ``OUT/sweep.json`` records the sweep, so another command cannot
silently mix its trials into the same folder.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import statistics
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eqprop_hil import config as configuration
from eqprop_hil.cluster.runtime import ClusterError
from eqprop_hil.cluster.trial import read_record, resolve_config, trial_spec
from eqprop_hil.runs.durable import atomic_write_bytes, to_json_safe

RESULTS, PLOT, SWEEP_RECORD = "results.jsonl", "results.png", "sweep.json"
DISTRIBUTIONS = ("uniform", "log", "int")


# --------------------------------------------------------------------------------------------- the search
def split_values(text: str) -> list[str]:
    """Split ``V1,V2,...`` at the commas outside brackets, so a list value (``[0.1,0.05]``) stays whole."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_value(text: str) -> Any:
    """A TOML value (``0.1``, ``20``, ``true``, ``[0.1, 0.05]``, ``"x"``); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/?=&-]*", text):
            return text
        raise ClusterError(f"cannot read the value {text!r}: write it as TOML (numbers, true/false, [lists], "
                           "\"strings\")") from None


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["rule.beta=0.1,0.2", ...]`` -> ``{"rule.beta": [0.1, 0.2]}``; keys are dotted config keys."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ClusterError(f"--grid {item!r}: write KEY=V1,V2,... (a dotted config key, e.g. rule.beta=0.1,0.2)")
        if key in grid:
            raise ClusterError(f"--grid {key} is given twice")
        if any(v == "" for v in split_values(values)):
            raise ClusterError(f"--grid {item!r} has an empty value")
        grid[key] = [parse_value(v) for v in split_values(values)]
    return grid


def parse_random(items: list[str]) -> dict[str, tuple[str, float, float]]:
    """``["rule.beta=log:0.05:0.5"]`` -> ``{"rule.beta": ("log", 0.05, 0.5)}`` (uniform, log or int ranges)."""
    out: dict[str, tuple[str, float, float]] = {}
    for item in items:
        key, _, spec = item.partition("=")
        bits = spec.split(":")
        try:
            dist, lo, hi = bits[0], float(bits[1]), float(bits[2])
        except (IndexError, ValueError):
            dist, lo, hi = "", math.nan, math.nan
        if len(bits) != 3 or dist not in DISTRIBUTIONS or not lo < hi or (dist == "log" and lo <= 0):
            raise ClusterError(f"--random {item!r}: write KEY=DIST:LOW:HIGH with DIST one of {list(DISTRIBUTIONS)} "
                               "and LOW < HIGH (LOW > 0 for log)")
        out[key.strip()] = (dist, lo, hi)
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"rule.beta": 0.2}`` -> ``{"rule": {"beta": 0.2}}`` (config tables)."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *tables, leaf = key.split(".")
        node = out
        for t in tables:
            node = node.setdefault(t, {})
        node[leaf] = value
    return out


@dataclass
class SweepSpec:
    """Everything that defines a sweep (the CLI's options); two runs of the same spec have the same trials."""

    preset: str | None = None
    config_file: str = ""  # path of a TOML file whose keys override the preset's
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    samples: int = 1  # random draws per grid point
    search_seed: int = 0
    seeds: list[int] = field(default_factory=list)  # empty: the config's own seed
    epochs: int | None = None
    data_limit: int | None = None
    instrument: str | None = None
    bench: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # further fixed overrides (config tables)

    def fixed_overrides(self) -> dict[str, Any]:
        # trials never share one telemetry address
        o: dict[str, Any] = configuration.merge({"telemetry": {"address": ""}}, self.extra)
        if self.epochs is not None:
            o = configuration.merge(o, {"train": {"epochs": self.epochs}})
        if self.data_limit is not None:
            o = configuration.merge(o, {"train": {"data_limit": self.data_limit}})
        if self.instrument is not None:
            o = configuration.merge(o, {"instrument": {"resource": self.instrument}})
        return o


def _slug(swept: dict[str, Any]) -> str:
    text = "-".join(f"{k.split('.')[-1]}={json.dumps(v, separators=(',', ':'))}" for k, v in swept.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "", text)[:80]


def expand(spec: SweepSpec, out: Path) -> list[dict[str, Any]]:
    """Every trial of the sweep as a trial spec, in a fixed order; each trial's config is checked here first, so
    a bad key or value is refused (with the key named) before Ray starts anything."""
    import numpy as np

    if spec.bench and spec.instrument:
        raise ClusterError("--bench and --instrument exclude each other: the bench decides the instrument")
    if spec.samples < 1:
        raise ClusterError(f"--samples {spec.samples}: must be >= 1")
    if spec.config_file and not Path(spec.config_file).is_file():
        raise ClusterError(f"config file {spec.config_file!r} does not exist")
    config_text = Path(spec.config_file).read_text(encoding="utf-8") if spec.config_file else ""
    rng = np.random.default_rng(spec.search_seed)
    grid_points = [dict(zip(spec.grid, combo)) for combo in itertools.product(*spec.grid.values())]
    points: list[dict[str, Any]] = []
    for point in grid_points:
        for _ in range(spec.samples if spec.random else 1):
            drawn: dict[str, Any] = {}
            for key, (dist, lo, hi) in spec.random.items():
                if dist == "int":
                    drawn[key] = int(rng.integers(int(lo), int(hi) + 1))
                elif dist == "log":
                    drawn[key] = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.6g}")
                else:
                    drawn[key] = float(f"{rng.uniform(lo, hi):.6g}")
            points.append(point | drawn)
    seeds: list[int | None] = list(spec.seeds) or [None]
    trials = []
    for i, (point, seed) in enumerate((p, s) for p in points for s in seeds):
        overrides = configuration.merge(spec.fixed_overrides(), nest(point))
        if seed is not None:
            overrides = configuration.merge(overrides, {"train": {"seed": seed}})
        swept = dict(point)
        name = f"t{i:03d}" + (f"-{_slug(swept)}" if swept else "") + (f"-seed={seed}" if seed is not None else "")
        t = trial_spec(name, out / "runs" / name, preset=spec.preset, config_text=config_text,
                       overrides=overrides, swept=swept, bench=spec.bench)
        trials.append(check_trial(t))
    return trials


def check_trial(t: dict[str, Any]) -> dict[str, Any]:
    """Resolve a trial's config here (a bad key or value names the trial) and note its epochs and seed."""
    try:
        cfg = configuration.build(resolve_config(t))
    except configuration.ConfigError as e:
        swept = ", ".join(f"{k}={v!r}" for k, v in t["swept"].items()) or "no swept keys"
        raise ClusterError(f"trial {t['name']} ({swept}): {e}") from e
    t["epochs"], t["seed"] = cfg.train.epochs, cfg.train.seed
    return t


# --------------------------------------------------------------------------------------------- results
def read_results(out: Path) -> dict[str, dict]:
    """The sweep's ledger: trial name -> its latest line (a torn last line from a crash is skipped)."""
    rows: dict[str, dict] = {}
    path = out / RESULTS
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "name" in row:
                rows[row["name"]] = row
    return rows


def _append(out: Path, row: dict) -> None:
    with open(out / RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_json_safe(row), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def make_row(spec: dict[str, Any], result: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    """One line of ``results.jsonl`` from a trial's last Tune result (and its ``trial.json``)."""
    result = result or {}
    record = read_record(spec["run_dir"]) or {}
    started = result.get("started_at", record.get("started_at"))
    finished = result.get("finished_at") or (time.time() if started else None)
    epochs = int(result.get("epoch") or result.get("epochs") or 0)
    row = {
        "name": spec["name"], "config": spec["swept"], "seed": spec["seed"], "status": "failed" if error else "ok",
        "test_accuracy": _finite(result.get("test_accuracy")),
        "best_test_accuracy": _finite(result.get("best_test_accuracy")),
        "samples_per_second": _finite(result.get("samples_per_second")),
        "wall_s": _finite(result.get("wall_s")) or (round(finished - started, 3) if started else None),
        "run_dir": spec["run_dir"], "epochs": epochs,
        # ASHA stops a trial between two reports; one stopped at its last epoch has still finished
        "stopped_early": not error and not result.get("final") and epochs < spec["epochs"],
        "host": result.get("host", record.get("host", "")), "node_id": result.get("node_id", record.get("node_id", "")),
        "bench": spec.get("bench", ""), "started_at": started, "finished_at": finished,
    }
    if error:
        row["error"] = error
    return row




# --------------------------------------------------------------------------------------------- running
@dataclass
class SweepOutcome:
    """What a call of :func:`run_sweep` did; ``rows`` are every trial's latest line, in trial order."""

    out: Path
    rows: list[dict]
    ran: int  # trials handed to Tune by this call
    skipped: int  # trials already finished by an earlier call
    unfinished: list[str]  # trials neither finished nor failed (Ctrl-C): the same command continues them
    wall_s: float

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


def _trainable(config: dict[str, Any]) -> None:
    """The Tune function trainable: one ordinary run, per-epoch reports, and the result as the last report."""
    from ray import tune

    from eqprop_hil.cluster.trial import run_trial

    result = run_trial(config["trial"], report=tune.report)
    tune.report({k: v for k, v in result.items() if k != "config"} | {"epoch": result["epochs"], "final": True})


def _error_text(trial: Any) -> str:
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001  (an unreadable error file must not hide the failure itself)
        err = None
    text = str(err) if err is not None else ""
    if not text and trial.error_file and Path(trial.error_file).is_file():
        text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
    return text.strip()[-2000:] or "the trial failed (Ray gave no error text)"


def _check_record(out: Path, spec: SweepSpec, names: list[str]) -> None:
    """Refuse to mix two different sweeps in one folder; remember this one."""
    record = {"spec": asdict(spec), "trials": names}
    path = out / SWEEP_RECORD
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old is not None and json.loads(json.dumps(to_json_safe(record))) != old:
            raise ClusterError(f"{out} holds another sweep ({path} differs from this command's trials); repeat "
                               "that sweep's command to continue it, or choose another --out")
    atomic_write_bytes(path, (json.dumps(to_json_safe(record), indent=1) + "\n").encode("utf-8"))


def run_sweep(
    spec: SweepSpec, out: str | os.PathLike, *, address: str | None = None, asha: bool = False,
    asha_grace: int = 1, asha_reduction: int = 3, retry_failed: bool = False, max_concurrent: int | None = None,
    num_cpus: int | None = None, echo: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run (or continue) a sweep and write ``OUT/results.jsonl`` and ``OUT/results.png``.

    ``address`` None starts a local Ray (``num_cpus`` CPUs, default all) and stops it at the end; an address
    joins that cluster. Each trial takes one CPU (and one unit of ``bench:NAME`` with ``spec.bench``). ``asha``
    stops poor trials early (ASHA on the last-epoch test accuracy, at epochs ``asha_grace * reduction**k``).
    """
    out = Path(out).absolute()
    trials = expand(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    _check_record(out, spec, [t["name"] for t in trials])
    return run_trials(trials, out, keys=list(spec.grid) + list(spec.random), bench=spec.bench, address=address,
                      asha=asha, asha_grace=asha_grace, asha_reduction=asha_reduction, retry_failed=retry_failed,
                      max_concurrent=max_concurrent, num_cpus=num_cpus, echo=echo)


def run_trials(
    trials: list[dict[str, Any]], out: str | os.PathLike, *, keys: list[str], bench: str = "",
    address: str | None = None, asha: bool = False, asha_grace: int = 1, asha_reduction: int = 3,
    retry_failed: bool = False, max_concurrent: int | None = None, num_cpus: int | None = None,
    echo: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run a list of trial specs (each passed through :func:`check_trial`) as one sweep in ``out``; ``keys`` are
    the swept keys the table and the figure show. :func:`run_sweep` is this with the trials of a grid; a script
    whose trials differ in more than config keys (``benchmarks/accuracy.py``: one preset per rule) builds its own."""
    from eqprop_hil.cluster import runtime
    from eqprop_hil.cluster.report import plot_results, summary_table

    t0 = time.perf_counter()
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    if len({t["name"] for t in trials}) != len(trials):
        raise ClusterError("two trials share a name; every trial needs its own name and run directory")
    by_name = {t["name"]: t for t in trials}
    done = {n: r for n, r in read_results(out).items() if n in by_name}
    pending = [t for t in trials if t["name"] not in done or (retry_failed and done[t["name"]]["status"] == "failed")]
    skipped = len(trials) - len(pending)
    if skipped:
        echo(f"[sweep] {skipped} of {len(trials)} trials already done in {out / RESULTS}; running {len(pending)}")
    if pending:
        runtime.require_ray()
        os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials keep the submitter's working directory (relative paths)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own tables off (verbose=0): the ledger prints
        started = runtime.connect(address, num_cpus=num_cpus, log_to_driver=False)
        try:
            _tune(pending, out, bench, asha=asha, asha_grace=asha_grace, asha_reduction=asha_reduction,
                  max_concurrent=max_concurrent, total=len(trials), skipped=skipped, echo=echo)
        finally:
            runtime.shutdown(started)
    latest = read_results(out)
    rows = [latest[t["name"]] for t in trials if t["name"] in latest]
    unfinished = [t["name"] for t in trials if t["name"] not in latest]
    text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    atomic_write_bytes(out / RESULTS, text.encode("utf-8"))  # compacted: one line per trial, in trial order
    if rows:
        echo(summary_table(rows, keys))
        echo(f"[sweep] wrote {out / RESULTS} and {plot_results(rows, keys, out / PLOT)}")
    if unfinished:
        echo(f"[sweep] interrupted: {len(unfinished)} trial(s) unfinished; run the same command again to continue "
             "them (each resumes from its run directory's last checkpoint)")
    return SweepOutcome(out, rows, len(pending), skipped, unfinished, time.perf_counter() - t0)


def _tune(pending: list[dict], out: Path, bench: str, *, asha: bool, asha_grace: int, asha_reduction: int,
          max_concurrent: int | None, total: int, skipped: int, echo: Callable[[str], None]) -> None:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from eqprop_hil.cluster.bench import require_bench

    resources: dict[str, float] = {"CPU": 1}
    if bench:
        resources[require_bench(bench)] = 1
    by_name = {t["name"]: t for t in pending}

    max_t = max(t["epochs"] for t in pending)
    scheduler = ASHAScheduler(time_attr="epoch", metric="test_accuracy", mode="max", max_t=max_t,
                              grace_period=min(asha_grace, max_t), reduction_factor=asha_reduction) if asha else None
    tuner = tune.Tuner(
        tune.with_resources(_trainable, tune.PlacementGroupFactory([resources])),
        param_space={"trial": tune.grid_search(pending)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler, max_concurrent_trials=max_concurrent,
            # a finished trial's worker (torch already imported) runs the next one; not with ASHA, whose stopped
            # trial leaves its training thread running until the worker ends
            reuse_actors=not asha,
            trial_name_creator=lambda trial: trial.config["trial"]["name"],
            trial_dirname_creator=lambda trial: trial.config["trial"]["name"],
        ),
        run_config=tune.RunConfig(
            name=time.strftime("tune-%Y%m%d-%H%M%S"), storage_path=str(out / "tune"), verbose=0,
            callbacks=[_ledger_class()(out, pending, total, skipped, echo)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    echo(f"[sweep] {len(pending)} trial(s) on Ray, 1 CPU each" + (f" and bench {bench}" if bench else ""))
    hint = _NoRestoreHint()  # after Ctrl-C Tune suggests Tuner.restore; here the same command continues the sweep
    logging.getLogger("ray.tune.tune").addFilter(hint)
    try:
        tuner.fit()
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)


class _NoRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore" not in record.getMessage()


def _ledger_class() -> type:
    """The Tune callback class (defined when Ray is imported; module level so that Tune can pickle it)."""
    global _LEDGER
    if _LEDGER is None:
        from ray import tune

        class Ledger(tune.Callback):
            """Writes each trial's line to results.jsonl as Tune reports it, and prints the progress."""

            def __init__(self, out: Path, pending: list[dict], total: int, skipped: int,
                         echo: Callable[[str], None]) -> None:
                self.out, self.pending, self.total, self.skipped, self.echo = out, pending, total, skipped, echo
                self.by_name = {t["name"]: t for t in pending}
                self.started: set[str] = set()
                self.ended: dict[str, str] = {}  # name -> "ok" | "failed"

            def __getstate__(self) -> dict:
                return {}  # Tune pickles its callbacks into its experiment state; the ledger is never restored from it

            def _progress(self) -> str:
                failed = sum(1 for v in self.ended.values() if v == "failed")
                running = len(self.started - set(self.ended))
                queued = len(self.pending) - len(self.started | set(self.ended))
                return (f"[sweep] {self.skipped + len(self.ended)}/{self.total} done ({failed} failed), "
                        f"{running} running, {queued} queued")

            def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self.started.add(trial.config["trial"]["name"])
                self.echo(f"{self._progress()}; started {trial.config['trial']['name']}")

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                t = self.by_name[trial.config["trial"]["name"]]
                row = make_row(t, trial.last_result)
                _append(self.out, row)
                self.ended[t["name"]] = "ok"
                acc = row["test_accuracy"]
                self.echo(f"{self._progress()}; {t['name']} {'stopped early' if row['stopped_early'] else 'ok'}: "
                          f"{'-' if acc is None else f'{100 * acc:.2f} %'} after {row['epochs']} epochs")

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                t = self.by_name[trial.config["trial"]["name"]]
                row = make_row(t, trial.last_result, error=_error_text(trial))
                _append(self.out, row)
                self.ended[t["name"]] = "failed"
                last = [ln for ln in row["error"].splitlines() if ln.strip()][-1:]
                self.echo(f"{self._progress()}; {t['name']} FAILED: {last[0][:200] if last else ''}")

        _LEDGER = Ledger
    return _LEDGER


_LEDGER: type | None = None
