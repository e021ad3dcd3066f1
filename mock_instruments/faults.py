"""Fault injection for the emulated instruments: the link misbehaving the way real links do.

Drivers claim to survive corrupted, dropped, truncated and late replies, closed connections, a busy device and
a device that reboots under them. These faults are rare on a bench, so the emulator makes them happen on
purpose, at a configured probability per message, reproducibly from a seed. Everything is off by default.

A server calls the injector at three points of every transaction::

    data = faults.on_request(raw)          # maybe flip a byte before parsing
    action = faults.before_command()       # "run", "busy" (refuse, do not execute) or "power_cycle"
    plan = faults.on_response(reply)       # what to actually put on the wire, after how long, or close

The injector only decides; the server carries the decision out (it owns the socket, the pty and the physics).
Every decision draws a fixed number of random numbers, so the same seed and the same sequence of calls give
the same faults whichever of them fire.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

from eqprop_hil.protocols.errors import ValueRangeError

# Prefix of the fault keys in a sim:// query string (sim://analog?fault_drop=0.05&fault_delay_s=0.2).
QUERY_PREFIX = "fault_"

# The kinds of fault, in the order their counters appear; each has a ``<kind>_rate`` field in FaultConfig.
KINDS = ("corrupt", "drop", "truncate", "delay", "close", "busy", "power_cycle", "corrupt_request")


@dataclass(frozen=True)
class FaultConfig:
    """Probabilities per message of each fault, plus the seed that makes them reproducible.

    Every ``*_rate`` is a probability in [0, 1], drawn independently for each message it applies to:
    request faults per incoming command, response faults per outgoing reply.
    """

    seed: int = 0  # seed of the injector's own numpy Generator (independent of the physics' seed)
    corrupt_rate: float = 0.0  # flip one bit of one byte of a response (never its last byte, the terminator)
    drop_rate: float = 0.0  # the response is never sent (the command was executed)
    truncate_rate: float = 0.0  # only a leading part of the response is sent, its terminator never arrives
    delay_rate: float = 0.0  # the response is sent after delay_s seconds
    delay_s: float = 0.0  # seconds a delayed response waits; must be > 0 exactly when delay_rate > 0
    close_rate: float = 0.0  # the connection is closed instead of replying (the command was executed)
    busy_rate: float = 0.0  # the command is refused as busy and not executed
    power_cycle_rate: float = 0.0  # the device power-cycles before the command (states lost, weights kept)
    corrupt_request_rate: float = 0.0  # flip one bit of one byte of an incoming request before it is parsed

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueRangeError(f"fault seed must be a non-negative integer, got {self.seed!r}")
        for kind in KINDS:
            rate = getattr(self, f"{kind}_rate")
            if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
                raise ValueRangeError(f"{kind}_rate must be a number in [0, 1], got {rate!r}")
            if not (0.0 <= float(rate) <= 1.0):  # also rejects NaN
                raise ValueRangeError(f"{kind}_rate must be a probability in [0, 1], got {rate!r}")
        delay = self.delay_s
        if isinstance(delay, bool) or not isinstance(delay, (int, float, np.floating, np.integer)):
            raise ValueRangeError(f"delay_s must be a number of seconds, got {delay!r}")
        if not (math.isfinite(float(delay)) and float(delay) >= 0.0):
            raise ValueRangeError(f"delay_s must be finite and >= 0 seconds, got {delay!r}")
        # A delay without a rate (or a rate without a delay) would silently do nothing: refuse it.
        if (self.delay_rate > 0) != (delay > 0):
            raise ValueRangeError(
                f"delay_rate={self.delay_rate!r} and delay_s={delay!r}: set both (a probability and a time "
                f"in seconds) or neither, e.g. fault_delay=0.1&fault_delay_s=0.2"
            )

    @property
    def enabled(self) -> bool:
        """True when any fault can fire; a disabled injector never touches the data."""
        return any(getattr(self, f"{kind}_rate") > 0 for kind in KINDS)

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> "FaultConfig":
        """Build from the ``fault_*`` keys of a sim:// query; other keys are left to their owners.

        Each rate may be given as ``fault_<kind>`` or ``fault_<kind>_rate`` (``fault_drop=0.05``,
        ``fault_power_cycle_rate=0.01``); the other fields as ``fault_seed`` and ``fault_delay_s``.
        Unknown ``fault_`` keys and unparseable values raise :class:`ValueRangeError` naming them.
        """
        aliases = query_keys()
        values: dict[str, object] = {}
        unknown = []
        for key, raw in params.items():
            if not key.startswith(QUERY_PREFIX):
                continue
            name = aliases.get(key)
            if name is None:
                unknown.append(key)
                continue
            if name in values:
                raise ValueRangeError(f"fault setting {name!r} given twice (as {key!r} and another alias)")
            values[name] = _parse_value(key, name, raw)
        if unknown:
            raise ValueRangeError(
                f"unknown fault key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(aliases))}"
            )
        return cls(**values)

    def to_query(self) -> dict[str, str]:
        """The non-default settings as sim:// query keys (the inverse of :meth:`from_query`)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[QUERY_PREFIX + f.name.removesuffix("_rate")] = repr(value)
        return out


def query_keys() -> dict[str, str]:
    """Every accepted ``fault_*`` query key -> the FaultConfig field it sets."""
    keys = {}
    for f in fields(FaultConfig):
        keys[QUERY_PREFIX + f.name] = f.name
        if f.name.endswith("_rate"):
            keys[QUERY_PREFIX + f.name.removesuffix("_rate")] = f.name
    return keys


def _parse_value(key: str, name: str, raw: object) -> object:
    text = str(raw).strip()
    try:
        if name == "seed":
            return int(text)
        return float(text)
    except ValueError as e:
        kind = "an integer" if name == "seed" else "a number"
        raise ValueRangeError(f"{key}={raw!r} is not {kind}") from e


@dataclass(frozen=True)
class ResponsePlan:
    """What the server puts on the wire for one response.

    ``data`` is None when nothing is sent (dropped, or the connection is closed); otherwise the bytes to send,
    possibly truncated or corrupted, after waiting ``delay_s`` seconds. ``close``: close the connection
    instead of replying.
    """

    data: bytes | None
    delay_s: float = 0.0
    close: bool = False


class FaultInjector:
    """Decides, per message and reproducibly, which faults of a :class:`FaultConfig` fire.

    Thread safe: one lock around the generator, so a server with a thread per connection draws a consistent
    sequence. ``counts`` holds how often each kind fired plus the number of requests, commands and responses
    seen, for tests and for the server's counters.
    """

    def __init__(self, config: FaultConfig | None = None) -> None:
        self.config = config if config is not None else FaultConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"requests": 0, "commands": 0, "responses": 0}
        self.counts.update({kind: 0 for kind in KINDS})

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def before_command(self) -> str:
        """Decide what happens to a parsed command: ``"run"``, ``"busy"`` or ``"power_cycle"``.

        ``"busy"``: answer busy and do not execute. ``"power_cycle"``: power-cycle the device, then execute the
        command as the freshly booted device would. A power cycle takes precedence over busy.
        """
        cfg = self.config
        with self._lock:
            self.counts["commands"] += 1
            if not cfg.enabled:
                return "run"
            u = self._rng.random(2)
            if u[0] < cfg.power_cycle_rate:
                self.counts["power_cycle"] += 1
                return "power_cycle"
            if u[1] < cfg.busy_rate:
                self.counts["busy"] += 1
                return "busy"
            return "run"

    def on_request(self, data: bytes) -> bytes:
        """Return the request as the device receives it: maybe one bit flipped (never in the last byte)."""
        with self._lock:
            self.counts["requests"] += 1
            if not self.config.enabled:
                return data
            u, position, bit = self._draw_flip()
            if u < self.config.corrupt_request_rate and len(data) > 1:
                self.counts["corrupt_request"] += 1
                return _flip(data, position, bit)
            return data

    def on_response(self, data: bytes) -> ResponsePlan:
        """Plan one response. Precedence: close, drop, truncate, then corrupt and delay (which may combine)."""
        cfg = self.config
        with self._lock:
            self.counts["responses"] += 1
            if not cfg.enabled:
                return ResponsePlan(data)
            u = self._rng.random(5)  # close, drop, truncate, corrupt, delay: always five draws
            cut = self._rng.random()
            _, position, bit = self._draw_flip()
            if u[0] < cfg.close_rate:
                self.counts["close"] += 1
                return ResponsePlan(None, 0.0, close=True)
            if u[1] < cfg.drop_rate:
                self.counts["drop"] += 1
                return ResponsePlan(None)
            delay = 0.0
            if u[4] < cfg.delay_rate:
                self.counts["delay"] += 1
                delay = float(cfg.delay_s)
            if u[2] < cfg.truncate_rate and len(data) > 0:
                self.counts["truncate"] += 1
                keep = int(cut * len(data))  # 0 .. len-1 bytes: never the whole response
                return ResponsePlan(data[:keep], delay)
            if u[3] < cfg.corrupt_rate and len(data) > 1:
                self.counts["corrupt"] += 1
                data = _flip(data, position, bit)
            return ResponsePlan(data, delay)

    def _draw_flip(self) -> tuple[float, float, int]:
        """One probability, one relative position in [0, 1) and one bit index (caller holds the lock)."""
        u, position = self._rng.random(2)
        bit = int(self._rng.integers(0, 8))
        return float(u), float(position), bit


def _flip(data: bytes, position: float, bit: int) -> bytes:
    """Flip ``bit`` of the byte at relative ``position`` among all bytes but the last (the terminator).

    A single-bit error is what a noisy line does and what a CRC-16 is guaranteed to catch; sparing the
    terminator makes the receiver see a corrupt message rather than wait for one that never ends.
    """
    index = int(position * (len(data) - 1))
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)
