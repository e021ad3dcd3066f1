"""``hil mock analog|fpga``: run an emulated instrument by hand until interrupted.

The command itself lives in :mod:`eqprop_hil.mock_instruments.cli` (so ``python -m mock_instruments`` needs no ``hil``);
``hil`` may import ``mock_instruments`` for this, the reverse never happens.
"""

from __future__ import annotations

import argparse

from eqprop_hil.mock_instruments import cli


def configure(parser: argparse.ArgumentParser) -> None:
    """Options: kind, --host/--port/--pty/--link-rate, network and device keys, --fault-*, --config FILE.toml."""
    cli.configure(parser)


def run(args: argparse.Namespace) -> int:
    """Print the resource string, serve until SIGINT/SIGTERM, return 0."""
    return cli.run(args)
