"""Run an emulated instrument by hand: ``hil mock analog|fpga`` and ``python -m mock_instruments``.

The command prints the resource string to connect to on its own line, flushed at once (scripts and tests read
that line), then serves until SIGINT or SIGTERM and exits 0. Every option is turned into the same key=value
settings a ``sim://`` URL carries, so the command line, ``--config FILE.toml`` and ``sim://`` URLs are checked
by one parser (:func:`eqprop_hil.mock_instruments.launch.parse_params`) and fail with the same messages.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from eqprop_hil.mock_instruments.faults import KINDS as FAULT_KINDS
from eqprop_hil.mock_instruments.launch import is_loopback, parse_params, start_parsed
from eqprop_hil.protocols.auth import check_token
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError

# Options that map one to one onto sim:// query keys (option dest -> key).
_PLAIN_KEYS = ("sizes", "skips", "feedback", "activation", "device", "seed", "serial")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's options to ``parser`` (a ``hil mock`` subparser or the ``python -m`` parser)."""
    parser.add_argument("kind", choices=("analog", "fpga"), help="analog board (SCPI over TCP) or FPGA array (serial)")
    where = parser.add_argument_group("where it listens")
    where.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    where.add_argument("--port", type=int, default=None, help="TCP port, 0 picks a free one (fpga: serve socket://)")
    where.add_argument("--pty", action="store_true", help="fpga only: serve on a pseudo-terminal (the default)")
    where.add_argument("--link-rate", default=None, metavar="BYTES_PER_S", help="fpga only: emulate a serial link rate")
    access = parser.add_argument_group("who may connect (protocols/analog_board.md 1.1, fpga_serial.md 7.1)")
    token = access.add_mutually_exclusive_group()
    token.add_argument("--token", help="clients must authenticate with this shared token first (visible in ps)")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="read the shared token from FILE (first line)")
    access.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without a token: anyone who can reach it can drive it")
    net = parser.add_argument_group("network and devices (as the sim:// query keys)")
    net.add_argument("--sizes", help="neurons per layer, input first (default 64,256,10)")
    net.add_argument("--skips", help="skip edges src-dst, comma separated, e.g. 0-2")
    net.add_argument("--feedback", help="tied or untied feedback matrices")
    net.add_argument("--activation", help="sigmoid4, hard_sigmoid, tanh or identity")
    net.add_argument("--device", help="device model: ideal, constant, soft_bounds or power")
    net.add_argument("--seed", help="seed of the physics (and of the faults unless --fault-seed)")
    net.add_argument("--serial", help="analog only: serial number reported by *IDN?")
    faults = parser.add_argument_group("fault injection (probabilities per message, all off by default)")
    for kind in FAULT_KINDS:
        faults.add_argument(f"--fault-{kind.replace('_', '-')}", dest=f"fault_{kind}", metavar="RATE")
    faults.add_argument("--fault-delay-s", dest="fault_delay_s", metavar="SECONDS", help="delay of a delayed reply")
    faults.add_argument("--fault-seed", dest="fault_seed", metavar="SEED")
    parser.add_argument("--config", type=Path, metavar="FILE.toml", help="emulator settings; options override it")


def settings(args: argparse.Namespace) -> dict[str, str]:
    """The sim:// key=value settings the options and the config file describe (options win)."""
    params = load_config(args.config) if args.config is not None else {}
    for key in _PLAIN_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = str(value)
    for key, value in vars(args).items():
        if key.startswith("fault_") and value is not None:
            params[key] = str(value)
    if args.link_rate is not None:
        params["link_rate"] = str(args.link_rate)
    if args.kind == "fpga":
        if args.pty and args.port is not None:
            raise ValueRangeError("--pty and --port exclude each other: a pty, or socket:// on a TCP port")
        if args.port is not None:
            params["transport"] = "tcp"
        elif args.pty:
            params["transport"] = "pty"
        params.setdefault("transport", "pty")
    elif args.pty:
        raise ValueRangeError("--pty applies to the fpga emulator; the analog board listens on TCP (--port)")
    return params


def load_config(path: Path) -> dict[str, str]:
    """Read a TOML file of sim:// settings: top-level keys as in the query, native TOML values.

    ``sizes = [64, 256, 10]``, ``skips = [[0, 2]]``, ``device = "soft_bounds"``, ``fault_drop = 0.05``; an
    optional ``[faults]`` table takes the fault keys without their prefix (``drop = 0.05``).
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueRangeError(f"cannot read config {str(path)!r}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueRangeError(f"config {str(path)!r} is not valid TOML: {e}") from e
    params: dict[str, str] = {}
    fault_table = data.pop("faults", {})
    if not isinstance(fault_table, dict):
        raise ValueRangeError(f"config {str(path)!r}: 'faults' must be a table, got {fault_table!r}")
    items = list(data.items()) + [(f"fault_{k}", v) for k, v in fault_table.items()]
    for key, value in items:
        if key in params:
            raise ValueRangeError(f"config {str(path)!r}: {key!r} given twice")
        params[key] = _to_query_text(key, value, path)
    return params


def _to_query_text(key: str, value: Any, path: Path) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, list):
        parts = []
        for item in value:
            if isinstance(item, list) and all(isinstance(x, int) for x in item):
                parts.append("-".join(str(x) for x in item))  # skip edge [0, 2] -> "0-2"
            elif isinstance(item, (int, float, str)) and not isinstance(item, bool):
                parts.append(str(item))
            else:
                raise ValueRangeError(f"config {str(path)!r}: cannot use {item!r} in {key}")
        return ",".join(parts)
    raise ValueRangeError(f"config {str(path)!r}: {key} = {value!r} is not a number, string or list")


def run(args: argparse.Namespace) -> int:
    """Start the emulator, print its resource string, serve until SIGINT/SIGTERM; 0 on a clean stop."""
    params = settings(args)
    kind, config, faults, options = parse_params(args.kind, params)
    token = access_token(args)
    if not is_loopback(args.host):
        where = f"{args.host}:{args.port or 0}"
        guard = ("only clients that give the shared token are served, and the token crosses the network in clear "
                 "text" if token else "without a token (--insecure) anyone who can reach it can drive it")
        print(f"warning: the emulator listens on {where}, exposed to the network: {guard}. Use --host 127.0.0.1 "
              f"unless you mean this.", file=sys.stderr, flush=True)
        if token is None and not getattr(args, "insecure", False):
            raise ValueRangeError(f"refusing to listen on {where} without a token: give --token or --token-file "
                                  f"(clients then pass token= or set EQPROP_HIL_TOKEN), or --insecure to allow anyone")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        emulator = start_parsed(kind, config, faults, options, host=args.host, port=args.port or 0, token=token)
        try:
            print(emulator.resource, flush=True)
            while not stop.wait(0.5):  # a bounded wait keeps the main thread responsive to signals everywhere
                continue
        finally:
            emulator.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def access_token(args: argparse.Namespace) -> str | None:
    """The shared token from --token or --token-file (its first line), checked; None when neither is given."""
    if getattr(args, "token_file", None) is not None:
        try:
            lines = args.token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueRangeError(f"cannot read the token file {str(args.token_file)!r}: {e}") from e
        return check_token(lines[0].strip() if lines else "", f"token in {str(args.token_file)!r}")
    if getattr(args, "token", None) is not None:
        return check_token(args.token, "--token")
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m mock_instruments analog --port 0``: the same command as ``hil mock`` without ``hil``."""
    parser = argparse.ArgumentParser(prog="python -m mock_instruments", description=__doc__.split("\n")[0])
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except EqpropError as e:
        print(f"mock_instruments: error: {e}", file=sys.stderr)
        return 1
