"""In-situ accuracy against the software engine on the same network (issue: "within 3 points").

Runs `hil train` (the real CLI, the real transports) with the digits-hw preset on the emulated analog board with
its default soft-bounds devices (device-to-device variation, cycle-to-cycle noise) in each update mode, and the
software engine with the same preset, and prints the last-epoch test accuracy of each and the gap in points.

    python benchmarks/insitu_accuracy.py [--epochs 3] [--modes matrix,local,outer] [--instrument sim://analog?...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"


def run(label: str, args: list[str], workdir: Path) -> dict:
    run_dir = workdir / label
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "eqprop_hil", "train", "--preset", "digits-hw", "--no-progress", "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-2000:]}")
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [line for line in proc.stdout.splitlines() if line.startswith("final")]
    return {
        "label": label,
        "test_accuracy": metrics[-1]["test_accuracy"],
        "curve": [m["test_accuracy"] for m in metrics],
        "wall_s": time.perf_counter() - t0,
        "summary": final[-1] if final else "",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--modes", default="matrix,local,outer")
    p.add_argument("--instrument", default="sim://analog?sizes=64,256,10&activation=sigmoid4&device=soft_bounds&seed=0")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    common = ["--epochs", str(a.epochs), "--seed", str(a.seed)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [run("software", common + ["--instrument", "software"], work)]
        for mode in a.modes.split(","):
            rows.append(run(mode, common + ["--instrument", a.instrument, "--update-mode", mode], work))
    ref = rows[0]["test_accuracy"]
    print(f"digits-hw, {a.epochs} epochs, seed {a.seed}, instrument {a.instrument}")
    print(f"{'run':10s} {'test acc %':>10s} {'gap (pts)':>10s} {'wall s':>8s}  curve (test acc % per epoch)")
    for r in rows:
        gap = 100 * (r["test_accuracy"] - ref)
        curve = " ".join(f"{100 * v:.1f}" for v in r["curve"])
        print(f"{r['label']:10s} {100 * r['test_accuracy']:10.2f} {gap:+10.2f} {r['wall_s']:8.0f}  {curve}")
    OUT.mkdir(exist_ok=True)
    (OUT / "insitu_accuracy.json").write_text(json.dumps({"epochs": a.epochs, "instrument": a.instrument, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
