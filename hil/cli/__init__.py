"""`hil`: the command line. Each subcommand lives in its own module under ``hil/cli`` and is imported only
when used, so ``hil monitor`` does not pay for torch and ``hil mock`` does not pay for matplotlib."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from eqprop_hil.protocols.errors import EqpropError

# name -> (module, one-line help). Each module offers configure(parser) and run(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("eqprop_hil.cli.train", "train a network (software engine or an instrument) with EP / C-EP / C-VF / FRE"),
    "gdu": ("eqprop_hil.cli.gdu", "compare EP / C-EP updates with BPTT gradients (the GDU check)"),
    "mock": ("eqprop_hil.cli.mock", "run an emulated instrument (analog board or FPGA array) until interrupted"),
    "calibrate": ("eqprop_hil.cli.calibrate", "measure an instrument's devices, converters and settling"),
    "report": ("eqprop_hil.cli.report", "summarise a run directory and write its plots"),
    "monitor": ("eqprop_hil.cli.monitor", "show a run's live telemetry stream in the terminal"),
    "sweep": ("eqprop_hil.cli.sweep", "run a grid / random search of trials (seeds included) on Ray, with a summary"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="hil", description="eqprop-hil: train physical neural networks in situ with Equilibrium Propagation")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug (every message)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            module = importlib.import_module(modname)
            module.configure(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(module.run(args) or 0)
    except EqpropError as e:
        print(f"hil {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the second Ctrl-C: aborted at once (the instrument was still closed safely)
        print(f"hil {args.command}: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
