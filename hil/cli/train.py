"""`hil train`: train on the software engine or in situ on an instrument, with run records and a final line.

``--config FILE`` is merged over ``--preset`` (default: the same preset as a bare ``hil train``). A start that
fails (instrument unreachable, bad data set) keeps no run directory. ``--resume DIR`` continues a run; options
given with it (``--epochs 6``) update the run's config.toml; a finished run is reported complete without
opening the instrument.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from eqprop_hil import config as configuration
from eqprop_hil.cli import EXIT_SIGINT, EXIT_SIGTERM, progress_wanted
from eqprop_hil.runs.rundir import RunDir, resolve_run_dir


def int_at_least(least: int, meaning: str = "") -> object:
    """An argparse type: an integer >= ``least`` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from e
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}{meaning}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a bundled preset (default {configuration.DEFAULT_PRESET}): "
                                    f"{', '.join(configuration.preset_names())}")
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file; its keys override the preset's")
    p.add_argument("--instrument", metavar="RESOURCE", help="software | sim://analog?... | sim://fpga?... | VISA resource | serial port")
    p.add_argument("--dataset", help="digits | mnist5k | fashion-mnist | idx:DIR")
    p.add_argument("--epochs", type=int_at_least(1))
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int_at_least(1))
    p.add_argument("--data-limit", type=int_at_least(0, " (0 = the whole data set)"),
                   help="train on a stratified subset of this many samples")
    p.add_argument("--update-mode", choices=["matrix", "outer", "local"], help="how updates reach an instrument")
    p.add_argument("--calibration", metavar="FILE.json", help="a `hil calibrate` output to use")
    p.add_argument("--recommended-gain", action="store_true",
                   help="use the FRE feedback gain recommended by --calibration (rates below the output are divided by it)")
    p.add_argument("--telemetry", metavar="ADDRESS", help="publish the run on a ZeroMQ PUB socket, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--telemetry-curve-key", metavar="FILE.key_secret",
                   help="CURVE-encrypt the telemetry with this zmq.auth secret certificate ([telemetry] curve_secret_key_file)")
    p.add_argument("--telemetry-token-file", metavar="FILE",
                   help="require this token in snapshot requests ([telemetry] token_file; or $EQPROP_HIL_TELEMETRY_TOKEN)")
    p.add_argument("--telemetry-wait", type=int_at_least(0), metavar="N",
                   help="hold the run's start until N subscribers joined (at most [telemetry] wait_timeout_s)")
    p.add_argument("--run-dir", metavar="DIR", help="where the run records go (default runs/<time>-<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    p.add_argument("--cluster", metavar="ADDRESS", help="run on a Ray cluster (HOST:PORT or auto; see docs/cluster.md)")
    p.add_argument("--bench", metavar="NAME", help="with --cluster: run on the host holding bench NAME, queued while busy")


def overrides(args: argparse.Namespace) -> dict:
    o: dict = {}

    def put(table: str, key: str, value: object) -> None:
        if value is not None:
            o.setdefault(table, {})[key] = value

    put("train", "dataset", args.dataset)
    put("train", "epochs", args.epochs)
    put("train", "seed", args.seed)
    put("train", "batch_size", args.batch_size)
    put("train", "data_limit", args.data_limit)
    put("instrument", "resource", args.instrument)
    put("instrument", "update_mode", args.update_mode)
    put("instrument", "calibration", args.calibration)
    put("telemetry", "address", args.telemetry)
    put("telemetry", "curve_secret_key_file", args.telemetry_curve_key)
    put("telemetry", "token_file", args.telemetry_token_file)
    put("telemetry", "wait_for_subscribers", args.telemetry_wait)
    if args.recommended_gain:
        put("instrument", "use_recommended_gain", True)
    return o


def _epochs_done(run_dir: RunDir) -> int | None:
    """Epochs the latest checkpoint has completed (None without a checkpoint)."""
    state = run_dir.load_checkpoint(fallback=True)
    return None if state is None else int(state["cursor"]["epoch"])


CREATED_FILES = ("config.toml", "instrument.json", "documents.jsonl", "summary.json", "journal.jsonl", "metrics.jsonl")


def discard_if_never_started(run_dir: RunDir, existed: bool) -> bool:
    """Remove what a failed start created (no checkpoint, no metrics, no journaled pulse); True if removed."""
    path = run_dir.path
    if run_dir.checkpoints() or run_dir.read_metrics():
        return False
    if run_dir.journal_path.exists() and run_dir.journal_path.stat().st_size > 0:
        return False
    for name in CREATED_FILES:
        (path / name).unlink(missing_ok=True)
    for sub in (run_dir.checkpoint_dir, run_dir.plots_dir):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not existed and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    return True


def run(args: argparse.Namespace) -> int:
    from eqprop_hil.session import run_training

    if args.cluster or args.bench:
        from eqprop_hil.cluster.submit import submit_from_args

        return submit_from_args(args, overrides(args))
    progress = progress_wanted(args.no_progress, args.quiet)
    if args.resume:
        run_dir = RunDir.open(args.resume)
        changes = overrides(args)
        cfg = configuration.build(configuration.merge(run_dir.read_config(), changes))
        done = _epochs_done(run_dir)
        if done is not None and done >= cfg.train.epochs:
            print(f"run {run_dir.path} is already complete ({done} of {cfg.train.epochs} epochs); nothing to do "
                  f"(add epochs with: hil train --resume {run_dir.path} --epochs {done + 1})")
            return 0
        if changes:
            run_dir.write_config(cfg.to_dict())  # `hil report` and the next resume see what this session runs
        created, existed = False, True
    else:
        # --config alone is merged over the default preset, exactly as a bare `hil train`
        preset = args.preset or configuration.DEFAULT_PRESET
        cfg = configuration.resolve(preset, args.config, overrides(args))
        target = resolve_run_dir(args.run_dir, preset=cfg.name)
        if args.run_dir is not None and Path(target).parent != Path("runs") and not Path(target).parent.is_dir():
            raise configuration.ConfigError(f"--run-dir {args.run_dir}: the directory {Path(target).parent} does not "
                                            "exist; create it first (only runs/ is created for you)")
        existed = Path(target).exists()
        run_dir = RunDir.create(target, cfg.to_dict())
        created = True
    try:
        summary = run_training(cfg, run_dir, resume=bool(args.resume), progress=progress)
    except BaseException:
        if created and discard_if_never_started(run_dir, existed):
            print(f"hil train: the run never started; {run_dir.path} was not kept", file=sys.stderr)
        raise
    print(summary.line(), flush=True)
    if summary.status != "success":
        print(f"stopped early; continue with: hil train --resume {run_dir.path}", file=sys.stderr)
        return EXIT_SIGTERM if summary.stopped_by == "SIGTERM" else EXIT_SIGINT
    return 0
