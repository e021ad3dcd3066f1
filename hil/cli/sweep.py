"""`hil sweep`: many ordinary runs over a grid of config keys and seeds, on a local Ray or a cluster."""

from __future__ import annotations

import argparse

from eqprop_hil import config as configuration


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas, e.g. 0,1,2") from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"a bundled preset: {', '.join(configuration.preset_names())}")
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file; its keys override the preset's")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep a dotted config key over TOML values, e.g. rule.beta=0.1,0.2 or "
                        "'rule.lr=[0.02,0.01],[0.04,0.02]' (repeatable: the grid is the product)")
    p.add_argument("--random", action="append", default=[], metavar="KEY=DIST:LO:HI",
                   help="random search: draw KEY from uniform|log|int on [LO, HI], --samples draws per grid point")
    p.add_argument("--samples", type=int, default=1, help="random draws per grid point (with --random)")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the random draws (the trials stay the same "
                                                             "when the command is repeated)")
    p.add_argument("--seeds", type=_ints, default=[], metavar="0,1,2", help="training seeds: every point runs each")
    p.add_argument("--epochs", type=int)
    p.add_argument("--data-limit", type=int, help="train on a stratified subset of this many samples")
    p.add_argument("--instrument", metavar="RESOURCE", help="software | sim://analog?... | sim://fpga?... (trials "
                                                            "on sim:// each start their own emulator)")
    p.add_argument("--bench", metavar="NAME", help="run every trial on the cluster's bench NAME, one at a time")
    p.add_argument("--address", metavar="HOST:PORT", help="an existing Ray cluster (default: a local Ray, started "
                                                          "for this sweep and stopped after it)")
    p.add_argument("--cpus", type=int, help="CPUs of the local Ray (default: all of this machine's)")
    p.add_argument("--max-concurrent", type=int, help="at most this many trials at a time")
    p.add_argument("--asha", action="store_true", help="stop poor trials early (ASHA on test accuracy per epoch)")
    p.add_argument("--asha-grace", type=int, default=1, help="epochs every trial runs before ASHA may stop it")
    p.add_argument("--retry-failed", action="store_true", help="run again the trials that failed last time")
    p.add_argument("--out", default="sweeps/sweep", metavar="DIR",
                   help="results.jsonl, results.png and the runs (runs/<trial>); with --address, a folder every "
                        "node mounts (the shared run store)")


def run(args: argparse.Namespace) -> int:
    from eqprop_hil.cluster.sweep import SweepSpec, parse_grid, parse_random, run_sweep

    if not args.preset and not args.config:
        args.preset = configuration.DEFAULT_PRESET
    spec = SweepSpec(
        preset=args.preset, config_file=args.config or "", grid=parse_grid(args.grid),
        random=parse_random(args.random), samples=args.samples, search_seed=args.search_seed, seeds=args.seeds,
        epochs=args.epochs, data_limit=args.data_limit, instrument=args.instrument, bench=args.bench or "",
    )
    outcome = run_sweep(spec, args.out, address=args.address, asha=args.asha, asha_grace=args.asha_grace,
                        retry_failed=args.retry_failed, max_concurrent=args.max_concurrent, num_cpus=args.cpus)
    print(f"[sweep] {len(outcome.rows) - len(outcome.failed)} ok, {len(outcome.failed)} failed, "
          f"{len(outcome.unfinished)} unfinished; {outcome.wall_s:.1f} s", flush=True)
    if outcome.unfinished:
        return 130
    return 1 if outcome.failed else 0
