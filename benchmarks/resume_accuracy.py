"""Resume on noisy hardware, measured (issue 9 item 8): accuracy of runs killed and resumed against uninterrupted
runs, on the emulated analog board with its default soft-bounds devices, beside the seed-to-seed spread.

For each seed: an emulator process (default soft-bounds devices, device seed = the seed) and ``hil train
--preset digits-hw`` straight through; then a fresh emulator with the same seed and the same run, SIGKILLed at
``--kills`` random moments and resumed with ``--resume`` each time (the emulator outlives the trainer, as a bench
instrument does). What a resume makes exact is the command stream (every pulse command applied once, the same
draws, the same samples in the same order); what it cannot make exact is the device: an undo on soft-bounds
devices leaves a residual (potentiation and depression steps differ) and the cycle-to-cycle noise of the redone
pulses is drawn anew, so the resumed run's weights, and its accuracy, differ from the straight run's by device
noise. This measures by how much, against how much runs differ from seed to seed anyway.

    nice -n 10 python benchmarks/resume_accuracy.py --seeds 0,1,2 --kills 3 --data-limit 300 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"
PY = sys.executable


def emulator(seed: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([PY, "-m", "eqprop_hil.mock_instruments", "analog", "--port", "0", "--sizes",
                             "64,256,10", "--seed", str(seed)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    if not line.startswith("TCPIP"):
        proc.kill()
        raise SystemExit(f"emulator did not start: {line!r}")
    return proc, line


def train(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "eqprop_hil", "train", *args, "--no-progress"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def accuracy(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]


def one_seed(seed: int, kills: int, common: list[str], work: Path, rng: random.Random) -> dict:
    emu, res = emulator(seed)
    try:
        t0 = time.monotonic()
        straight = work / f"straight-{seed}"
        p = train([*common, "--seed", str(seed), "--instrument", res, "--run-dir", str(straight)], work)
        out = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(out[-2000:])
        seconds = time.monotonic() - t0
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait()
    emu, res = emulator(seed)
    try:
        resumed = work / f"resumed-{seed}"
        moments = sorted(rng.uniform(0.1, 0.9) * seconds for _ in range(kills))
        done, starts, killed, t0 = False, 0, 0, time.monotonic()
        while not done:
            args = [*common, "--seed", str(seed), "--instrument", res, "--run-dir", str(resumed)] if starts == 0 \
                else ["--resume", str(resumed)]
            p = train(args, work)
            starts += 1
            while p.poll() is None:
                if moments and time.monotonic() - t0 >= moments[0]:
                    moments.pop(0)
                    p.send_signal(signal.SIGKILL)
                    killed += 1
                time.sleep(0.05)  # polling the kill schedule
            out = p.communicate()[0]
            if p.returncode == 0:
                done = True
            elif p.returncode != -signal.SIGKILL:
                raise SystemExit(f"seed {seed}: resume failed:\n{out[-2000:]}")
            if starts > kills + 5:
                raise SystemExit(f"seed {seed}: did not finish after {starts} starts")
        warnings = re.findall(r"WARNING.*", out)
    finally:
        emu.send_signal(signal.SIGINT)
        emu.wait()
    return {"seed": seed, "straight": accuracy(straight), "resumed": accuracy(resumed), "kills": killed,
            "starts": starts, "straight_seconds": round(seconds, 1), "last_warnings": warnings[-3:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--data-limit", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--out", default=str(OUT / "resume_accuracy.json"))
    args = ap.parse_args(argv)
    rng = random.Random(20260605)
    rows = []
    with tempfile.TemporaryDirectory(prefix="resume-acc-") as tmp:
        work = Path(tmp)
        (work / "ckpt.toml").write_text(f"[train]\ncheckpoint_every = {args.checkpoint_every}\n")
        common = ["--preset", "digits-hw", "--config", str(work / "ckpt.toml"), "--data-limit", str(args.data_limit),
                  "--epochs", str(args.epochs)]
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(one_seed(seed, args.kills, common, work, rng))
            print(json.dumps(rows[-1]), flush=True)
    straight = [r["straight"] for r in rows]
    diffs = [r["resumed"] - r["straight"] for r in rows]
    summary = {
        "command": "python benchmarks/resume_accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
        "straight_mean": statistics.mean(straight),
        "seed_to_seed_std_points": 100 * statistics.stdev(straight) if len(straight) > 1 else None,
        "resumed_minus_straight_points": [round(100 * d, 2) for d in diffs],
        "mean_abs_resume_effect_points": 100 * statistics.mean(abs(d) for d in diffs),
        "note": "machine shared with other jobs; accuracies are fractions of the digits test set",
    }
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
