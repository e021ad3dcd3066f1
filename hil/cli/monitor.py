"""`hil monitor ADDRESS`: a live one-line view of a run's telemetry (run name, epoch, samples, running and test
accuracy, samples per second, pulses sent) that exits with the run's stop document.

Light on purpose: it imports zmq and numpy through ``eqprop_hil.telemetry`` but never torch, so it starts fast on a
lab PC next to the training process. On a terminal the line is redrawn in place (ANSI); when the output is a
pipe or a log, one line is printed per evaluation and at most one per second otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any, TextIO

from eqprop_hil import env
from eqprop_hil.telemetry import TelemetryError, TelemetrySubscriber, TelemetryTimeout, fetch_snapshot

PLAIN_INTERVAL_S = 1.0  # pipes/logs: at most one progress line per second (evaluations always print)
TTY_INTERVAL_S = 0.1  # terminals: redraw at most ten times per second


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the run's telemetry endpoint, e.g. tcp://127.0.0.1:5556")
    parser.add_argument("--snapshot", metavar="ADDRESS", help="the publisher's snapshot endpoint (ROUTER)")
    parser.add_argument("--once", action="store_true",
                        help="print the run's current state and exit (from --snapshot, else from the first documents)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up after S seconds without any document (default: wait forever)")
    parser.add_argument("--server-key", metavar="KEY|FILE.key",
                        help="the publisher's CURVE public key: Z85 text or a zmq.auth .key file "
                             "(or env EQPROP_HIL_TELEMETRY_SERVER_KEY)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="a file holding the snapshot token (or env EQPROP_HIL_TELEMETRY_TOKEN; never on the "
                             "command line, where `ps` shows it)")


def _credentials(args: argparse.Namespace) -> None:
    """Fill args.server_key / args.token from the flags, else the environment (EQPROP_HIL_TELEMETRY_*)."""
    if args.server_key is None:
        args.server_key = env.setting("TELEMETRY_SERVER_KEY")
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                args.token = f.read().strip()
        except OSError as e:
            raise TelemetryError(f"--token-file {args.token_file}: cannot read it ({e.strerror or e})") from e
    else:
        args.token = env.setting("TELEMETRY_TOKEN")


class RunView:
    """The state a monitor shows: the start document plus the latest value of every event key."""

    def __init__(self) -> None:
        self.start: dict[str, Any] | None = None
        self.units: dict[str, str] = {}
        self.streams: dict[str, str] = {}  # descriptor uid -> stream name ("primary", "eval")
        self.data: dict[str, Any] = {}
        self.events = 0
        self.stop: dict[str, Any] | None = None

    def update(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            if self.start is None or doc["uid"] != self.start["uid"]:  # a new run: forget the old one
                self.__init__()
            self.start = doc
        elif name == "descriptor":
            self.streams[doc["uid"]] = str(doc.get("name", "primary"))
            self.units.update({k: str(v.get("units", "")) for k, v in doc["data_keys"].items()})
        elif name == "event":
            self.events += 1
            self.data.update({k: v for k, v in doc["data"].items() if v is not None})
        elif name == "stop":
            self.stop = doc

    @property
    def run_name(self) -> str:
        return "?" if self.start is None else str(self.start.get("run_name", self.start["uid"][:8]))

    def stream_of(self, event: dict[str, Any]) -> str:
        return self.streams.get(event.get("descriptor", ""), "primary")

    def _percent(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, (int, float)):
            return "-"
        return f"{value:.1f} %" if self.units.get(key) in ("%", "percent") else f"{100.0 * value:.1f} %"

    def line(self) -> str:
        d = self.data
        sps = d.get("samples_per_second")
        return " | ".join([
            f"run {self.run_name}",
            f"epoch {d.get('epoch', '-')}",
            f"samples {_count(d.get('samples'))}",
            f"accuracy {self._percent('running_accuracy')}",
            f"test {self._percent('test_accuracy')}",
            f"{sps:,.1f} samples/s" if isinstance(sps, (int, float)) else "- samples/s",
            f"pulses {_count(d.get('pulses_sent'))}",
        ])

    def header(self) -> str:
        s = self.start or {}
        started = datetime.datetime.fromtimestamp(s.get("time", 0)).isoformat(sep=" ", timespec="seconds")
        instrument = json.dumps(s.get("instrument"), separators=(",", ":"))
        if len(instrument) > 160:
            instrument = instrument[:157] + "..."
        return f"run {self.run_name} (uid {s.get('uid', '?')}) started {started}; instrument {instrument}"

    def outcome(self) -> str:
        if self.stop is None:
            return f"run {self.run_name}: running, {self.events} events so far"
        reason = f" ({self.stop['reason']})" if self.stop.get("reason") else ""
        events = sum(v for v in self.stop["num_events"].values() if isinstance(v, int))
        return f"run {self.run_name} finished: exit status {self.stop['exit_status']}{reason}, {events} events"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


class Display:
    """Redraws one line in place on a terminal; prints throttled lines on a pipe."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.tty = out, out.isatty()
        self.last = float("-inf")
        self.last_line = ""
        self.pending = False  # a line was drawn in place and needs a newline before other output

    def show(self, view: RunView, force: bool = False) -> None:
        now, line = time.monotonic(), view.line()
        if line == self.last_line or not force and now - self.last < (TTY_INTERVAL_S if self.tty else PLAIN_INTERVAL_S):
            return
        self.last, self.last_line = now, line
        if self.tty:
            self.out.write("\r\x1b[2K" + line)
            self.pending = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def say(self, text: str) -> None:
        if self.pending:
            self.out.write("\n")
            self.pending = False
        self.out.write(text + "\n")
        self.out.flush()


def _print_state(view: RunView, out: TextIO) -> None:
    out.write(view.header() + "\n" + view.line() + "\n" + view.outcome() + "\n")
    out.flush()


def _once(args: argparse.Namespace, out: TextIO) -> int:
    view = RunView()
    if args.snapshot:
        snapshot = fetch_snapshot(args.snapshot, token=args.token, server_public_key=args.server_key,
                                  timeout_s=5.0 if args.timeout is None else args.timeout)
        for name, doc in snapshot:
            view.update(name, doc)
        if view.start is None:
            out.write("no run has started on this publisher yet\n")
            return 1
    else:
        # A new subscriber is welcomed with start, descriptor, last event and stop in one burst: take the start
        # and whatever follows it within a short grace period.
        with TelemetrySubscriber(args.address, server_public_key=args.server_key, timeout_s=args.timeout) as sub:
            while view.start is None:
                item = sub.receive()
                if item is None:
                    raise TelemetryTimeout(f"no start document from {args.address} within {args.timeout} s")
                view.update(*item)
            while (item := sub.receive(timeout_s=0.5)) is not None:
                view.update(*item)
    _print_state(view, out)
    return 0


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    _credentials(args)
    if args.once:
        return _once(args, out)
    view, display = RunView(), Display(out)
    with TelemetrySubscriber(args.address, server_public_key=args.server_key, timeout_s=args.timeout) as sub:
        if args.snapshot:  # catch up at once instead of waiting for the next document
            for name, doc in sub.snapshot(args.snapshot, token=args.token):
                view.update(name, doc)
            if view.start is not None:
                display.say(view.header())
            if view.stop is not None:  # the run is already over
                display.show(view, force=True)
                display.say(view.outcome())
                return 0 if view.stop["exit_status"] == "success" else 1
        try:
            while True:
                try:
                    item = sub.receive()
                except TelemetryError as e:  # a malformed message is reported and skipped, not fatal
                    display.say(f"hil monitor: skipped a malformed message: {e}")
                    continue
                if item is None:
                    raise TelemetryTimeout(f"no telemetry from {args.address} within {args.timeout} s")
                name, doc = item
                is_new_run = name == "start" and (view.start is None or doc["uid"] != view.start["uid"])
                view.update(name, doc)
                if is_new_run:
                    display.say(view.header())
                elif name == "event":
                    display.show(view, force=view.stream_of(doc) == "eval")
                elif name == "stop":
                    display.show(view, force=True)
                    display.say(view.outcome())
                    return 0 if doc["exit_status"] == "success" else 1
        except KeyboardInterrupt:
            display.say(view.outcome())
            return 130
