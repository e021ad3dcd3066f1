"""`hil`: the command line. Each subcommand lives in its own module under ``hil/cli`` and is imported only
when used, so ``hil monitor`` does not pay for torch and ``hil mock`` does not pay for matplotlib.

Conventions every subcommand follows: ``-v``/``-q`` before or after the subcommand; progress bars only when
stderr is a terminal (and never with ``TQDM_DISABLE`` set); exit 0 success, 1 an error (one line, ``hil CMD:
error: ...``), 2 a usage error, 130 Ctrl-C, 143 SIGTERM; environment variables start with ``EQPROP_HIL_``;
files are written where ``--out`` / ``--run-dir`` say or under ``runs/``, and a parent directory the user
named must exist (it is never created silently), while the directories the tool names itself are created.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from eqprop_hil import __version__
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
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
# what the light install (drivers, emulators) lacks, and the extra that brings it
TRAIN_EXTRA_MODULES = ("torch", "tqdm", "matplotlib", "sklearn", "event_model")


class Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself): unwind, closing instruments, and exit 143."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def progress_wanted(no_progress: bool = False, quiet: int = 0) -> bool:
    """Progress bars only on a terminal: not with --no-progress / -q, a redirected stderr, or TQDM_DISABLE set."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")
    return not (no_progress or quiet or disabled) and sys.stderr.isatty()


def output_file(text: str) -> Path:
    """An argparse type for a file the command writes: its directory must exist (a typo is not silently created)."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {str(path.parent)!r} does not exist; create it first")
    return path


def default_out_dir(command: str, root: str = "runs") -> Path:
    """Where a command puts its files when not told: ``runs/<YYYYmmdd-HHMMSS>-<command>/`` (created)."""
    import datetime

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path(root) / f"{stamp}-{command}", 2
    while path.exists():
        path, n = Path(root) / f"{stamp}-{command}-{n}", n + 1
    path.mkdir(parents=True)
    return path


def _verbosity() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="-v info, -vv debug (every message)")
    common.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                        help="errors only; no progress bar")
    return common


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    common = _verbosity()
    parser = argparse.ArgumentParser(prog="hil", parents=[common],
                                     description="eqprop-hil: train physical neural networks in situ with Equilibrium Propagation")
    parser.add_argument("--version", action="version", version=f"%(prog)s (eqprop-hil) {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (modname, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if name == chosen:  # import only the module that will run
            module = importlib.import_module(modname)
            module.configure(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, module = build_parser(argv)
    except ModuleNotFoundError as e:
        return _missing_extra(e, next((a for a in argv if a in COMMANDS), "hil"))
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    args.verbose, args.quiet = getattr(args, "verbose", 0), getattr(args, "quiet", 0)
    level = logging.ERROR if args.quiet else [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.captureWarnings(True)  # deprecation notices (old environment names) reach the log once
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return int(module.run(args) or 0)
    except EqpropError as e:
        print(f"hil {args.command}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        return _missing_extra(e, args.command)
    except KeyboardInterrupt:  # Ctrl-C (the instrument was still closed safely on the way out)
        print(f"hil {args.command}: aborted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print(f"hil {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _missing_extra(error: ModuleNotFoundError, command: str) -> int:
    """A light install running a command that needs the training stack: say which extra to install."""
    if (error.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
        raise error
    print(f"hil {command}: error: this command needs {error.name}, which the light install leaves out; install "
          "the training extra: pip install 'eqprop-hil[train]'", file=sys.stderr)
    return 1


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
