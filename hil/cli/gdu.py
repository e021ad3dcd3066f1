"""`hil gdu --preset NAME [--beta B] [--eta E] [--seed S] [--json] [--plot PATH]`: the GDU check.

The per-step curves go to ``--plot PATH`` (its directory must exist) or, by default, to
``runs/<time>-gdu/gdu.png`` with the report as ``gdu.json`` beside it; never into the working directory.

Runs the preset's network (random weights from the seed) on one batch: random input in [0, 1) and random one-hot
targets when the preset's data set is ``random`` (the C-EP paper's demonstration), else the first training batch
of that data set. Compares EP (eta 0) or C-EP (eta > 0, one rate for every edge) per-step updates with minus the
BPTT per-step gradients (hil/engine/gdu.py) and prints a table per parameter and the overall angle, or one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eqprop_hil.cli import default_out_dir, output_file
from eqprop_hil.config import resolve
from eqprop_hil.engine.gdu import measure, plot_curves
from eqprop_hil.engine.model import Network


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="gdu-1h", help="preset name (default gdu-1h)")
    parser.add_argument("--config", metavar="FILE.toml", help="a TOML file merged over the preset")
    parser.add_argument("--beta", type=float, help="nudge strength (default: the preset's rule.beta)")
    parser.add_argument("--eta", type=float, help="C-EP per-step rate for every edge; 0 = EP (default: the preset's rule.lr)")
    parser.add_argument("--seed", type=int, help="seed of the weights and the random batch (default: train.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--plot", type=output_file, metavar="PATH",
                        help="PNG of the per-step curves (default runs/<time>-gdu/gdu.png; the directory must exist)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")


def batch(cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded batch: ``random`` gives uniform input in [0, 1) and random one-hot targets."""
    n_in, n_out, size = cfg.model.sizes[0], cfg.model.sizes[-1], cfg.train.batch_size
    if cfg.train.dataset == "random":
        gen = torch.Generator().manual_seed(seed + 104729)
        x = torch.rand(size, n_in, generator=gen, dtype=torch.float64)
        labels = torch.randint(n_out, (size,), generator=gen)
    else:
        from eqprop_hil.data import load_dataset

        data = load_dataset(cfg.train.dataset, seed=seed)
        x, labels = data.x_train[:size].reshape(size, -1).to(torch.float64), data.y_train[:size]
    return x, torch.nn.functional.one_hot(labels, n_out).to(torch.float64)


def run(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.beta is not None:
        overrides.setdefault("rule", {})["beta"] = args.beta
    if args.eta is not None:
        overrides.setdefault("rule", {})["lr"] = args.eta
    cfg = resolve(args.preset, args.config, overrides)
    seed = cfg.train.seed if args.seed is None else args.seed
    net = Network(cfg.model, seed=seed, dtype=torch.float64)
    x, y = batch(cfg, seed)
    eta = cfg.rule.edge_lrs(len(net.edges))
    report = measure(net, x, y, beta=cfg.rule.beta, t1=cfg.rule.t1, t2=cfg.rule.t2, eta=eta)
    report.settings.update({"preset": args.preset, "seed": seed, "rule": "ep" if max(eta) == 0.0 else "cep"})
    if not args.no_plot:
        if args.plot is None:
            out_dir = default_out_dir("gdu")
            (out_dir / "gdu.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
            args.plot = out_dir / "gdu.png"
        report.settings["plot"] = plot_curves(report, str(args.plot))
    if args.json:
        json.dump(report.to_dict(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    st = report.settings
    print(
        f"GDU check: {args.preset} {'-'.join(map(str, st['sizes']))} {st['activation']}, {st['rule']}, "
        f"beta {st['beta']}, eta/beta {st['eta_over_beta']:.3g}, T1 {st['t1']}, T2 {st['t2']}, batch {st['batch']}, "
        f"float64 (free-phase residual {st['free_residual']:.1e})"
    )
    print(f"{'':8}{'rel. error mean +- std':>24}{'sign agree':>12}{'angle (deg)':>13}")
    for title, table in (("params", report.layers), ("neurons", report.neurons)):
        for name, m in table.items():
            err = f"{m['rel_error_mean']:.3f} +- {m['rel_error_std']:.3f}"
            print(f"{name:8}{err:>24}{m['sign_agreement']:>12.3f}{m['angle_deg']:>13.2f}")
        if title == "params":
            print(f"{'overall':8}{'':>24}{'':>12}{report.angle_deg:>13.2f}")
    if "plot" in st:
        print(f"per-step curves: {st['plot']}")
    return 0
