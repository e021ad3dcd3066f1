"""Benches as Ray resources: a host wired to one board joins the cluster with ``bench:NAME`` = 1.

A bench host runs, for example::

    EQPROP_HIL_BENCHES=/etc/eqprop-hil/benches.toml \\
      ray start --address HEAD:6379 --resources '{"bench:analog-1": 1}'

and keeps a bench description file (``$EQPROP_HIL_BENCHES``, default ``~/.config/eqprop-hil/benches.toml``)::

    [bench.analog-1]
    instrument = "TCPIP0::10.0.0.5::5025::SOCKET"   # the resource string, as `hil train --instrument` takes it
    calibration = "/etc/eqprop-hil/analog-1.json"   # optional: a `hil calibrate` output on this host
    run_store = "/srv/hil-runs"                     # optional: where runs on this bench are written on this host
    description = "analog board rev B, rack 3"
    [bench.analog-1.limits]                         # the board's safety limits (the [instrument.limits] keys)
    max_input_volts = 0.8
    max_nudge_amperes = 5e-5

A run for that bench asks Ray for one unit of ``bench:analog-1``, so Ray places it on that host and runs one at
a time there; more runs wait in Ray's queue. On the host the run reads the description: the instrument comes from
the bench, and every limit is the stricter of the bench's and the submitter's (a submitter may tighten a limit,
never loosen it). Why read on the bench host: the limits belong to the wiring and the board, which only the
bench's owner knows; a submitter's config cannot widen them by mistake.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eqprop_hil import config as configuration
from eqprop_hil import env
from eqprop_hil.cluster.runtime import ClusterError

ENV_VAR = "EQPROP_HIL_BENCHES"  # the one prefix of every setting read from the environment (eqprop_hil.env)
DEFAULT_FILE = Path("~/.config/eqprop-hil/benches.toml")
RESOURCE_PREFIX = "bench:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_KEYS = {"instrument", "calibration", "run_store", "description", "limits"}
# limits where the smaller value is the stricter one; pulse_budget is special (0 = unlimited)
_MAX_LIMITS = ("max_input_volts", "max_nudge_amperes", "max_pulses_per_device", "max_bit_length")


class BenchError(ClusterError):
    """A bench that is unknown, misdescribed, or not in the cluster; the message names the bench and the file."""


@dataclass
class Bench:
    """One board on one host, as its description file states it."""

    name: str
    instrument: str  # resource string of the board on this host
    limits: dict[str, Any] = field(default_factory=dict)  # [instrument.limits] keys, validated
    calibration: str = ""  # path on the bench host
    run_store: str = ""  # folder on the bench host for runs submitted with `hil train --cluster`
    description: str = ""

    @property
    def resource(self) -> str:
        return resource_name(self.name)


def resource_name(name: str) -> str:
    """The Ray custom resource of a bench: ``bench:NAME``."""
    check_name(name)
    return RESOURCE_PREFIX + name


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BenchError(f"bench name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return name


def bench_file() -> Path:
    """The description file of this host: ``$EQPROP_HIL_BENCHES`` or ``~/.config/eqprop-hil/benches.toml``."""
    return Path(env.setting(ENV_VAR) or DEFAULT_FILE).expanduser()


def _limits(table: Any) -> configuration.LimitsConfig:
    """A limits table checked exactly as a run's ``[instrument.limits]`` (the config loader's strict builder)."""
    return configuration._build(configuration.LimitsConfig, table, "instrument.limits")


def load_benches(path: str | os.PathLike | None = None) -> dict[str, Bench]:
    """Every bench of a description file, strictly checked (unknown keys and bad limits name the bench)."""
    p = Path(path) if path is not None else bench_file()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BenchError(f"no bench description file {p} on this host (set ${ENV_VAR} before `ray start`)") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BenchError(f"cannot read bench description file {p}: {e}") from e
    unknown = sorted(set(data) - {"bench"})
    if unknown or not isinstance(data.get("bench", {}), dict):
        raise BenchError(f"{p}: only [bench.NAME] tables are allowed, found {unknown or ['bench = ...']}")
    benches: dict[str, Bench] = {}
    for name, table in data.get("bench", {}).items():
        where = f"{p} [bench.{name}]"
        check_name(name)
        if not isinstance(table, dict):
            raise BenchError(f"{where} must be a table")
        bad = sorted(set(table) - _KEYS)
        if bad:
            raise BenchError(f"{where}: unknown key(s) {bad}; allowed: {sorted(_KEYS)}")
        if not isinstance(table.get("instrument"), str) or not table["instrument"]:
            raise BenchError(f"{where}: 'instrument' (the board's resource string) is required")
        for key in ("calibration", "run_store", "description"):
            if not isinstance(table.get(key, ""), str):
                raise BenchError(f"{where}: {key} must be a string")
        limits = table.get("limits", {})
        try:  # the same checks as a run's [instrument.limits], with the key named
            _limits(limits)
        except (configuration.ConfigError, ValueError) as e:
            raise BenchError(f"{where}: {e}") from e
        benches[name] = Bench(name, table["instrument"], dict(limits), table.get("calibration", ""),
                              table.get("run_store", ""), table.get("description", ""))
    return benches


def load_bench(name: str, path: str | os.PathLike | None = None) -> Bench:
    """The bench ``name`` as described on this host."""
    benches = load_benches(path)
    if name not in benches:
        raise BenchError(f"bench {name!r} is not described in {Path(path) if path else bench_file()} on this host "
                         f"(described: {sorted(benches) or 'none'}); the host holds the resource "
                         f"{RESOURCE_PREFIX}{name} but not its description")
    return benches[name]


def apply_bench(data: dict[str, Any], bench: Bench) -> dict[str, Any]:
    """A run's config (TOML tables) with the bench's instrument and the stricter of both sides' limits."""
    submitted = configuration.build(data).instrument.limits
    own = _limits(bench.limits)
    limits = {k: min(getattr(submitted, k), getattr(own, k)) for k in _MAX_LIMITS}
    budgets = [b for b in (submitted.pulse_budget, own.pulse_budget) if b > 0]
    limits["pulse_budget"] = min(budgets) if budgets else 0
    instrument = dict(data.get("instrument", {}))
    instrument.update(resource=bench.instrument, limits=limits)
    if bench.calibration:
        instrument["calibration"] = bench.calibration
    return configuration.merge(data, {"instrument": instrument}) | {"instrument": instrument}


def cluster_benches() -> dict[str, float]:
    """Benches the connected cluster offers: name -> units (normally 1), from Ray's resource table."""
    import ray

    return {k[len(RESOURCE_PREFIX):]: v for k, v in ray.cluster_resources().items() if k.startswith(RESOURCE_PREFIX)}


def require_bench(name: str) -> str:
    """The Ray resource of ``name``, after checking the cluster has it (else a run would wait forever)."""
    resource = resource_name(name)
    known = cluster_benches()
    if name not in known:
        raise BenchError(f"no host in the cluster offers bench {name!r} (resource {resource}); benches: "
                         f"{sorted(known) or 'none'}. A bench host joins with: ray start --address HEAD "
                         f"--resources '{{\"{resource}\": 1}}'")
    return resource
