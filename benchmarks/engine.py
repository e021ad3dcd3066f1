"""Software-engine benchmark: training throughput and peak memory per rule, and free-phase settling vs feedback gain.

    python benchmarks/engine.py [--quick] [--out benchmarks/out]

1. Samples per second of one training batch (batch 20, the paper's step counts) for every rule (ep, cep,
   cep-control, cvf, fre, bptt) on 784-512-10 and 784-512-512-10, on random input (throughput does not depend on
   the data). Each (rule, size) runs in its own subprocess so that its peak resident memory (getrusage maxrss) is
   its own; "peak MiB" is that peak, "+MiB" the part above the process after importing torch.
2. Free-phase steps to settle (first t with max |s_{t+1} - s_t| < 1e-4 per sample; median and 90th percentile
   over a batch of test digits) against the feedback gain gamma (1, 0.5, 0.25, 0.1, 0.05) for a 3-hidden-layer
   tanh FRE network (64-256-256-256, softmax readout) on the 8x8 digits, at initialisation and after one short
   FRE training epoch at that gain (trained weights settle more slowly: REFERENCE.md section 9).
Timings are wall clock on a shared machine: read them as orders of magnitude. Writes benchmarks/out/settle_vs_gain.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root first, so benchmarks/hil.py never shadows `hil`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GAINS = (1.0, 0.5, 0.25, 0.1, 0.05)
RULES = ("ep", "cep", "cep-control", "cvf", "fre", "bptt")
# (architecture, rule) -> the preset whose hyperparameters it uses, and overrides (batch 20 everywhere)
PRESETS = {
    "1h": {"ep": "ep-1h", "cep": "cep-1h", "cep-control": "cep-1h", "cvf": "cvf-1h", "fre": "fre-2h", "bptt": "ep-1h"},
    "2h": {"ep": "ep-2h", "cep": "cep-2h", "cep-control": "cep-2h", "cvf": "cvf-2h", "fre": "fre-2h", "bptt": "ep-2h"},
}
SIZES = {"1h": [784, 512, 10], "2h": [784, 512, 512, 10]}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kibibytes


def worker(rule: str, arch: str, batches: int) -> dict:
    """One (rule, architecture) measurement in this process; returns samples/s and memory."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base_rss = _maxrss_mib()
    from eqprop_hil.engine.bptt import BPTTLearner
    from eqprop_hil.config import resolve
    from eqprop_hil.engine.model import Network
    from eqprop_hil.engine.rules import Learner

    overrides: dict = {"rule": {"name": rule}, "model": {"sizes": SIZES[arch]}, "train": {"batch_size": 20}}
    if rule == "fre" and arch == "1h":  # REFERENCE.md section 6: 10 free / 5 nudged steps per hidden layer
        overrides["rule"].update({"t1": 10, "t2": 5})
    if rule == "bptt":
        overrides["rule"].update({"optimizer": "sgd"})
    cfg = resolve(PRESETS[arch][rule], None, overrides)
    if rule == "fre":
        cfg.model.sizes = SIZES[arch] + [10]  # the softmax readout sits on top of the core
    net = Network(cfg.model, seed=0)
    learner = (BPTTLearner if rule == "bptt" else Learner)(net, cfg.rule, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 784, generator=gen)
    y = torch.nn.functional.one_hot(torch.randint(10, (20,), generator=gen), 10).float()
    learner.train_batch(x, y)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        learner.train_batch(x, y)
    seconds = time.perf_counter() - t0
    peak = _maxrss_mib()
    return {
        "rule": rule, "arch": arch, "sizes": "-".join(map(str, SIZES[arch])), "t1": cfg.rule.t1, "t2": cfg.rule.t2,
        "samples_per_s": 20 * batches / seconds, "peak_mib": peak, "extra_mib": peak - base_rss,
    }


def throughput(batches: dict[str, int]) -> list[dict]:
    rows = []
    for arch in ("1h", "2h"):
        for rule in RULES:
            cmd = [sys.executable, __file__, "--worker", rule, arch, str(batches[arch])]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"worker {rule} {arch} failed:\n{done.stderr}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['sizes']:>16} {rule:>12} T1/T2 {r['t1']:>3}/{r['t2']:<3} {r['samples_per_s']:>9.0f} samples/s "
                  f"peak {r['peak_mib']:>6.0f} MiB (+{r['extra_mib']:.0f})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ settling
def settle_steps(net, x, *, tol: float = 1e-4, max_steps: int = 1000):
    """Per sample, free steps from zero until max |s_{t+1} - s_t| < tol (max_steps if never)."""
    return net.settle_steps(x, tol=tol, max_steps=max_steps)


def settling(quick: bool) -> list[dict]:
    import torch

    from eqprop_hil.data import load_dataset
    from eqprop_hil.engine.model import Network, NetworkConfig
    from eqprop_hil.engine.rules import Learner, RuleConfig

    data = load_dataset("digits", seed=0)
    n_train = 400 if quick else len(data.y_train)
    x_test = data.x_test[:200].reshape(200, -1).float()
    rows = []
    for gamma in GAINS:
        cfg = NetworkConfig(sizes=[64, 256, 256, 256, 10], activation="tanh", gamma=gamma, readout="softmax")
        net = Network(cfg, seed=0)
        init = settle_steps(net, x_test).double()
        learner = Learner(net, RuleConfig(name="fre", t1=30, t2=15, beta=0.1, lr=1e-3, lr_readout=1e-3, optimizer="adam"))
        for _, xb, yb in data.batches(20, epoch=0, seed=0):
            learner.train_batch(xb.reshape(len(xb), -1), torch.nn.functional.one_hot(yb, 10).float())
            n_train -= len(yb)
            if n_train <= 0:
                break
        trained = settle_steps(net, x_test).double()
        acc = learner.evaluate(x_test, torch.nn.functional.one_hot(data.y_test[:200], 10).float()).correct / 200
        row = {"gamma": gamma, "init_median": float(init.median()), "init_p90": float(init.quantile(0.9)),
               "trained_median": float(trained.median()), "trained_p90": float(trained.quantile(0.9)),
               "trained_max": float(trained.max()), "test_acc_30_15": acc}
        rows.append(row)
        print(f"gamma {gamma:>5}: init median {row['init_median']:>5.0f} p90 {row['init_p90']:>5.0f} | trained median "
              f"{row['trained_median']:>5.0f} p90 {row['trained_p90']:>5.0f} max {row['trained_max']:>5.0f} "
              f"| accuracy at 30/15 steps {acc:.3f}", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    from eqprop_hil.runs.plots import new_figure, save_figure

    fig, ax = new_figure()
    g = [r["gamma"] for r in rows]
    for key, style in (("init", "--"), ("trained", "-")):
        ax.plot(g, [r[f"{key}_median"] for r in rows], "o" + style, color="C0", label=f"{key}: median")
        ax.plot(g, [r[f"{key}_p90"] for r in rows], "s" + style, color="C1", label=f"{key}: 90th percentile")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feedback gain gamma")
    ax.set_ylabel("free steps to settle (max |ds| < 1e-4)")
    ax.set_title("3 hidden tanh layers (64-256-256-256), 8x8 digits", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and a shorter training epoch")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"), help="folder of the PNG and JSON")
    parser.add_argument("--worker", nargs=3, metavar=("RULE", "ARCH", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rule, arch, batches = args.worker
        print(json.dumps(worker(rule, arch, int(batches))))
        return 0
    print(f"throughput, batch 20, {os.cpu_count()} cores (shared machine: timings are noisy)")
    rates = throughput({"1h": 3, "2h": 2} if args.quick else {"1h": 25, "2h": 10})
    print("free-phase settling vs feedback gain (tolerance 1e-4, 200 test digits, cap 1000 steps)")
    settle = settling(args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps({"throughput": rates, "settling": settle}, indent=1), encoding="utf-8")
    print(f"plot: {plot(settle, out / 'settle_vs_gain.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
