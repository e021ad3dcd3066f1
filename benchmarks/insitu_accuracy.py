"""In-situ accuracy against the software engine and backprop on the same network (issue 11's accuracy table).

Runs `hil train` (the real CLI, the real transports) with the digits-hw preset on each emulator with its default
soft-bounds devices (30 % device-to-device variation, 30 % cycle-to-cycle noise) in each update mode, the
software engine with the same preset (same rates, schedule, batch 1, epochs), and backprop on the same sizes and
activation (digits-bp, Adam, the same epochs and the preset's batch size 1), for each seed. Prints the last-epoch test accuracy of every run,
the median over seeds, the gaps in points (in situ - software engine, software engine - backprop) and wall times.

    python benchmarks/insitu_accuracy.py [--epochs N] [--seeds 0,1,2] [--modes matrix,outer,local]
                                         [--instruments analog,fpga] [--workers 1] [--out FILE]

``--epochs`` defaults to the preset's. Each run is one `hil train` process; ``--workers`` of them at a time (the
machine's cores are shared: the wall times are those of the runs as they ran, side by side).
Writes benchmarks/out/insitu_accuracy.json. ``--instruments ""`` runs the baselines only; ``--combine A.json
B.json ...`` prints one table from the outputs of several invocations (rows of later files win) and writes it
to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
PRESET = "digits-hw"
INSTRUMENTS = {  # the preset's physics, on each emulator
    "analog": "sim://analog?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed={seed}",
    "fpga": "sim://fpga?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed={seed}&transport=pty",
}


def run(label: str, args: list[str], workdir: Path) -> dict:
    run_dir = workdir / label.replace(" ", "-")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "eqprop_hil", "train", "--no-progress", "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "test_accuracy" in m]
    return {"label": label, "test_accuracy": metrics[-1]["test_accuracy"],
            "curve": [m["test_accuracy"] for m in metrics], "wall_s": time.perf_counter() - t0,
            "train_s": sum(m["seconds"] for m in metrics), "command": " ".join(["hil", *cmd[3:]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--modes", default="matrix,outer,local")
    p.add_argument("--instruments", default="analog,fpga")
    p.add_argument("--no-baselines", action="store_true", help="skip the software engine and backprop runs")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=str(OUT / "insitu_accuracy.json"))
    p.add_argument("--combine", nargs="+", metavar="FILE", help="print (and write to --out) one table from "
                   "these outputs of earlier invocations instead of running anything")
    a = p.parse_args()
    if a.combine:
        docs = [json.loads(Path(f).read_text()) for f in a.combine]
        epochs_seen = {d["epochs"] for d in docs}
        if len(epochs_seen) != 1:
            raise SystemExit(f"--combine: the files ran different epochs {sorted(epochs_seen)}; not one table")
        table = {row: t for d in docs for row, t in d["table"].items()}
        seeds = sorted({int(s) for t in table.values() for s in t["by_seed"]})
        report(table, epochs_seen.pop(), seeds, a.out)
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    epochs = ["--epochs", str(a.epochs)] if a.epochs else []
    jobs: list[tuple[str, str, int, list[str]]] = []  # (row, label, seed, args)
    for seed in seeds:
        common = ["--seed", str(seed), *epochs]
        if not a.no_baselines:
            jobs.append(("software engine", f"software s{seed}", seed,
                         ["--preset", PRESET, "--instrument", "software", *common]))
            # backprop: the same sizes and activation; the preset's epochs unless --epochs
            # and the preset's batch size (1, the hardware's): the same number of updates as the EP learner;
            # digits-bp's own batch 20 makes 20x fewer Adam steps, which at 5-8 epochs is an undertrained baseline
            bp_epochs = epochs or ["--epochs", str(_preset_epochs())]
            jobs.append(("backprop", f"backprop s{seed}", seed, ["--preset", "digits-bp", "--seed", str(seed),
                                                                 "--batch-size", str(_preset_batch()), *bp_epochs]))
        for inst in [i for i in a.instruments.split(",") if i]:
            for mode in [m for m in a.modes.split(",") if m]:
                jobs.append((f"{inst} {mode}", f"{inst} {mode} s{seed}", seed,
                             ["--preset", PRESET, "--instrument", INSTRUMENTS[inst].format(seed=seed),
                              "--update-mode", mode, *common]))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(a.workers) as pool:
        futures = {pool.submit(run, label, args, Path(tmp)): (row, seed) for row, label, seed, args in jobs}
        for fut in cf.as_completed(futures):
            row, seed = futures[fut]
            r = fut.result() | {"seed": seed}
            results.setdefault(row, []).append(r)
            print(f"  {r['label']}: {100 * r['test_accuracy']:.2f} % in {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    table = {row: {"median": statistics.median(r["test_accuracy"] for r in rs),
                   "by_seed": {r["seed"]: r["test_accuracy"] for r in sorted(rs, key=lambda r: r["seed"])},
                   "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                   "median_train_s": statistics.median(r["train_s"] for r in rs), "runs": rs}
             for row, rs in results.items()}
    report(table, a.epochs or _preset_epochs(), seeds, a.out)


def report(table: dict, n_epochs: int, seeds: list[int], out: str) -> None:
    """Print the accuracy table (gaps against the software engine, and its gap against backprop); write it."""
    ref = table.get("software engine", {}).get("median")
    bp = table.get("backprop", {}).get("median")
    print(f"{PRESET}, {n_epochs} epochs, seeds {seeds}, last-epoch test accuracy (median of seeds)")
    print(f"{'run':18s} {'median %':>9s} {'gap pts':>8s}  {'by seed %':24s} {'wall s':>7s} {'train s':>8s}")
    for row, t in table.items():
        gap = "" if ref is None else f"{100 * (t['median'] - (bp if row == 'software engine' and bp is not None else ref)):+8.2f}"
        if row in ("backprop",) or (row == "software engine" and bp is None):
            gap = ""
        seeds_txt = " ".join(f"{100 * v:.1f}" for v in t["by_seed"].values())
        print(f"{row:18s} {100 * t['median']:9.2f} {gap:>8s}  {seeds_txt:24s} {t['median_wall_s']:7.0f} "
              f"{t['median_train_s']:8.1f}")
    print("gap: in situ - software engine; for the software engine: software engine - backprop")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"preset": PRESET, "epochs": n_epochs, "seeds": seeds, "table": table},
                                      indent=1))


def _preset_batch() -> int:
    from eqprop_hil.config import resolve

    return resolve(PRESET).train.batch_size


def _preset_epochs() -> int:
    from eqprop_hil.config import resolve

    return resolve(PRESET).train.epochs


if __name__ == "__main__":
    main()
