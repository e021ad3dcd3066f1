"""`hil train`: train on the software engine or in situ on an instrument, with run records and a final line."""

from __future__ import annotations

import argparse
import sys

from eqprop_hil import config as configuration
from eqprop_hil.runs.rundir import RunDir, resolve_run_dir


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a bundled preset: {', '.join(configuration.preset_names())}")
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file; its keys override the preset's")
    p.add_argument("--instrument", metavar="RESOURCE", help="software | sim://analog?... | sim://fpga?... | VISA resource | serial port")
    p.add_argument("--dataset", help="digits | mnist5k | fashion-mnist | idx:DIR")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--data-limit", type=int, help="train on a stratified subset of this many samples")
    p.add_argument("--update-mode", choices=["matrix", "outer", "local"], help="how updates reach an instrument")
    p.add_argument("--calibration", metavar="FILE.json", help="a `hil calibrate` output to use")
    p.add_argument("--recommended-gain", action="store_true",
                   help="use the FRE feedback gain recommended by --calibration (rates below the output are divided by it)")
    p.add_argument("--telemetry", metavar="ADDRESS", help="publish the run on a ZeroMQ PUB socket, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--run-dir", metavar="DIR", help="where the run records go (default runs/<time>-<preset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped or crashed run exactly where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")
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
    if args.recommended_gain:
        put("instrument", "use_recommended_gain", True)
    return o


def run(args: argparse.Namespace) -> int:
    from eqprop_hil.session import run_training

    if args.cluster or args.bench:
        from eqprop_hil.cluster.submit import submit_from_args

        return submit_from_args(args, overrides(args))
    if args.resume:
        run_dir = RunDir.open(args.resume)
        cfg = configuration.build(configuration.merge(run_dir.read_config(), overrides(args)))
        resume = True
    else:
        preset = args.preset or (None if args.config else configuration.DEFAULT_PRESET)
        cfg = configuration.resolve(preset, args.config, overrides(args))
        run_dir = RunDir.create(resolve_run_dir(args.run_dir, preset=cfg.name), cfg.to_dict())
        resume = False
    if cfg.train.batch_size == 1 or cfg.instrument.resource != "software":
        # One sample at a time (the hardware's batch, and the software engine on a batch-1 preset): the tensors
        # are tiny, and a second torch thread only adds synchronisation (tens of times slower on busy cores).
        import torch

        torch.set_num_threads(1)
    summary = run_training(cfg, run_dir, resume=resume, progress=not args.no_progress)
    print(summary.line(), flush=True)
    if summary.status != "success":
        print(f"stopped early; continue with: hil train --resume {run_dir.path}", file=sys.stderr)
        return 130
    return 0
