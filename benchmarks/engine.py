"""Software-engine benchmark: the engine against the straightforward oracle, peak memory, settling vs feedback gain.

    python benchmarks/engine.py [--quick] [--threads 1] [--device cpu|cuda] [--reps 7] [--out benchmarks/out]

1. Training samples per second at batch 20 of the engine (hil/engine/rules.py, fused steps of hil/engine/dynamics.py)
   and of the oracle (hil/engine/reference.py: the same rules written the straightforward way) on the presets cep-1h,
   ep-1h (784-512-10) and fre-2h (784-512-512 + softmax readout), with their own step counts. Repetitions are
   interleaved (engine, oracle, engine, ...) so that both see the same machine load; min / median / max over them.
   Random input (throughput does not depend on the data).
2. Peak resident memory (getrusage maxrss) of a cep-1h engine run, each in its own subprocess: at the preset's step
   counts and at 10x the steps (nothing allocated per step grows with T, so the two peaks match).
3. (full run only) Free-phase steps to settle (first t with max |s_{t+1} - s_t| < 1e-4, median and 90th percentile
   over 200 test digits) against the feedback gain for a 3-hidden-layer tanh FRE network (64-256-256-256, softmax
   readout) on the 8x8 digits, at initialisation and after one FRE epoch; writes benchmarks/out/settle_vs_gain.png.
The torch thread count is set once at start (``--threads``, default 1: see ``[train] threads`` in hil/config.py).
Wall clock on a possibly shared machine: compare the ratio measured in one run, read absolute figures loosely.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root first, so benchmarks/hil.py never shadows `hil`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = ("cep-1h", "ep-1h", "fre-2h")
BATCH = 20
GAINS = (1.0, 0.5, 0.25, 0.1, 0.05)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kibibytes


def _rss_mib() -> float:
    """Current resident memory (VmRSS, Linux), MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _setup(preset: str, impl: str, device: str, overrides: dict | None = None):
    """A learner of ``impl`` ("engine" or "oracle") for ``preset`` at batch 20, and one batch of random data."""
    import torch

    from eqprop_hil.config import merge, resolve
    from eqprop_hil.engine.model import Network
    from eqprop_hil.engine.reference import ReferenceLearner
    from eqprop_hil.engine.rules import Learner

    cfg = resolve(preset, None, merge({"train": {"batch_size": BATCH}}, overrides or {}))
    net = Network(cfg.model, seed=0, device=device)
    learner = (Learner if impl == "engine" else ReferenceLearner)(net, cfg.rule, seed=0)
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = cfg.model.sizes[0], cfg.model.sizes[-1]
    x = torch.rand(BATCH, n_in, generator=gen).to(device)
    y = torch.nn.functional.one_hot(torch.randint(n_out, (BATCH,), generator=gen), n_out).float().to(device)
    return cfg, learner, x, y


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def throughput(reps: int, batches: int, device: str) -> list[dict]:
    """Samples/s of engine and oracle per preset, interleaved repetitions of ``batches`` training batches each."""
    rows = []
    for preset in PRESETS:
        runs = {impl: _setup(preset, impl, device) for impl in ("engine", "oracle")}
        rates: dict[str, list[float]] = {"engine": [], "oracle": []}
        for _, learner, x, y in runs.values():
            learner.train_batch(x, y)  # warm-up (allocates the engine's buffers)
        for _ in range(reps):
            for impl, (_, learner, x, y) in runs.items():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(batches):
                    learner.train_batch(x, y)
                _sync(device)
                rates[impl].append(BATCH * batches / (time.perf_counter() - t0))
        cfg = runs["engine"][0]
        row = {"preset": preset, "rule": cfg.rule.name, "sizes": "-".join(map(str, cfg.model.sizes)),
               "t1": cfg.rule.t1, "t2": cfg.rule.t2, "batch": BATCH, "reps": reps, "batches_per_rep": batches}
        for impl, r in rates.items():
            row[impl] = {"min": min(r), "median": statistics.median(r), "max": max(r)}
        row["speedup_median"] = row["engine"]["median"] / row["oracle"]["median"]
        rows.append(row)
        e, o = row["engine"], row["oracle"]
        print(f"{preset:>7} {row['sizes']:>15} T1/T2 {row['t1']:>2}/{row['t2']:<2} engine {e['min']:>7.0f} "
              f"{e['median']:>7.0f} {e['max']:>7.0f}   oracle {o['min']:>6.0f} {o['median']:>6.0f} {o['max']:>6.0f}   "
              f"x{row['speedup_median']:.1f}", flush=True)
    return rows


def memory_worker(steps_scale: int, batches: int, device: str) -> dict:
    """One cep-1h engine run in this process: peak RSS before and after training."""
    import torch

    base = _maxrss_mib()
    cfg, learner, x, y = _setup("cep-1h", "engine", device,
                                {"rule": {"t1": 40 * steps_scale, "t2": 15 * steps_scale}})
    rss0 = _rss_mib()
    for _ in range(batches):
        learner.train_batch(x, y)
    _sync(device)
    peak = _maxrss_mib()
    buffers = sum(t.numel() * t.element_size() for v in vars(learner.dynamics(BATCH)).values() if isinstance(v, list)
                  for t in v if isinstance(t, torch.Tensor)) / 2**20
    return {"preset": "cep-1h", "t1": cfg.rule.t1, "t2": cfg.rule.t2, "batches": batches,
            "peak_mib": peak, "after_import_mib": base, "rss_before_training_mib": rss0,
            "rss_after_training_mib": _rss_mib(), "engine_buffers_mib": buffers}


def memory(batches: int, threads: int, device: str) -> list[dict]:
    rows = []
    for scale in (1, 10):
        cmd = [sys.executable, __file__, "--threads", str(threads), "--device", device,
               "--memory-worker", str(scale), str(batches)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker failed:\n{done.stderr}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"cep-1h engine, T1/T2 {r['t1']}/{r['t2']}, {batches} batches: peak RSS {r['peak_mib']:.0f} MiB "
              f"(torch imported: {r['after_import_mib']:.0f}); RSS {r['rss_before_training_mib']:.0f} MiB before training, "
              f"{r['rss_after_training_mib']:.0f} after; engine buffers {r['engine_buffers_mib']:.2f} MiB", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ settling
def settling() -> list[dict]:
    import torch

    from eqprop_hil.data import load_dataset
    from eqprop_hil.engine.model import Network, NetworkConfig
    from eqprop_hil.engine.rules import Learner, RuleConfig

    data = load_dataset("digits", seed=0)
    x_test = data.x_test[:200].reshape(200, -1).float()
    rows = []
    for gamma in GAINS:
        cfg = NetworkConfig(sizes=[64, 256, 256, 256, 10], activation="tanh", gamma=gamma, readout="softmax")
        net = Network(cfg, seed=0)
        init = net.settle_steps(x_test).double()
        learner = Learner(net, RuleConfig(name="fre", t1=30, t2=15, beta=0.1, lr=1e-3, lr_readout=1e-3, optimizer="adam"))
        for _, xb, yb in data.batches(20, epoch=0, seed=0):
            learner.train_batch(xb.reshape(len(xb), -1), torch.nn.functional.one_hot(yb, 10).float())
        trained = net.settle_steps(x_test).double()
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
    parser.add_argument("--quick", action="store_true", help="few repetitions, no settling study (a smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 7; quick 2)")
    parser.add_argument("--batches", type=int, default=None, help="training batches per repetition (default 10)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out"), help="folder of engine.json (and the PNG)")
    parser.add_argument("--memory-worker", nargs=2, type=int, metavar=("SCALE", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], args.memory_worker[1], args.device)))
        return 0
    from eqprop_hil.engine.learners import check_device

    check_device(args.device)
    reps = args.reps or (2 if args.quick else 7)
    batches = args.batches or (2 if args.quick else 10)
    print(f"samples/s at batch {BATCH}, min / median / max over {reps} interleaved repetitions of {batches} batches, "
          f"{torch.get_num_threads()} thread(s), device {args.device}, {os.cpu_count()} cores (possibly shared)")
    rates = throughput(reps, batches, args.device)
    mem = memory(2 if args.quick else 10, args.threads, args.device)
    settle = [] if args.quick else settling()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "engine.json" if args.device == "cpu" else f"engine-{args.device.replace(':', '')}.json"
    payload = {
        "command": "python benchmarks/engine.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick, "threads": torch.get_num_threads(), "device": args.device,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "throughput": rates, "memory": mem, "settling": settle,
    }
    (out / name).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out / name}")
    if settle:
        print(f"plot: {plot(settle, out / 'settle_vs_gain.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
