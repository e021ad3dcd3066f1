"""The run configuration: typed dataclasses loaded from TOML, strictly.

A preset (hil/presets/NAME.toml) or the user's file gives the tables ``[model]``, ``[rule]``, ``[train]``,
``[instrument]`` and ``[telemetry]``; command-line options override single keys. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from eqprop_hil.engine.model import NetworkConfig
from eqprop_hil.engine.rules import RuleConfig
from eqprop_hil.protocols.errors import EqpropError, ValueRangeError


DEFAULT_PRESET = "digits-hw"  # what a bare `hil train` runs


class ConfigError(EqpropError, ValueError):
    """A configuration that cannot be used; the message names the key and the problem."""


@dataclass
class TrainConfig:
    """The data and the loop; TOML table ``[train]``."""

    dataset: str = "digits"  # digits | mnist5k | fashion-mnist | idx:DIR
    data_limit: int = 0  # > 0: a stratified subset of this many training samples (quick runs)
    epochs: int = 10
    batch_size: int = 20
    seed: int = 0
    device: str = "cpu"  # torch device of the software engine: "cpu", "cuda" or "cuda:N"
    # torch intra-op threads, set once when a run starts (0 = torch's default, one per core). Default 1: at batch 20
    # an operation is microseconds of work, and splitting it over threads only adds barriers; on a busy 2-core
    # machine 2 threads ran 2-5x slower than 1 (issue 12). Raise it for large batches or a dedicated machine.
    threads: int = 1
    checkpoint_every: int = 0  # also checkpoint every N training samples within an epoch (0 = at epoch ends only)
    # Learning-rate schedule: the rates of the last epoch as a fraction of rule.lr, linear per epoch in between
    # (1 = constant). Per-sample (batch 1) updates are noisy; decaying them lets the last epoch settle.
    lr_final: float = 1.0

    def __post_init__(self) -> None:
        for key, value, least in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                                  ("data_limit", self.data_limit, 0), ("checkpoint_every", self.checkpoint_every, 0)):
            if value < least:
                raise ConfigError(f"train.{key} = {value}: must be >= {least}"
                                  + (" (0 = the whole data set)" if key == "data_limit" else ""))
        if self.threads < 0:
            raise ConfigError(f"train.threads = {self.threads}: must be >= 0 (0 = one per core)")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device = {self.device!r}: must be 'cpu', 'cuda' or 'cuda:N'")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ConfigError(f"train.lr_final = {self.lr_final!r}: a fraction of the rates, in [0, 1]")

    def rate_scale(self, epoch: int) -> float:
        """The factor on every learning rate during ``epoch`` (0-based): 1 at the first, ``lr_final`` at the last."""
        if self.epochs == 1:
            return 1.0
        return 1.0 - (1.0 - self.lr_final) * min(epoch, self.epochs - 1) / (self.epochs - 1)


@dataclass
class LimitsConfig:
    """Safety limits, checked before anything is sent; TOML table ``[instrument.limits]``."""

    max_input_volts: float = 1.0
    max_nudge_amperes: float = 1e-4
    max_pulses_per_device: int = 8  # per device per nudged step
    max_bit_length: int = 255
    pulse_budget: int = 0  # total pulses per run; 0 = unlimited

    def __post_init__(self) -> None:
        """Refuse limits no instrument can honour (int8 pulse counts, u8 bit lengths) before anything is opened."""
        for name in ("max_input_volts", "max_nudge_amperes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"instrument.limits.{name} = {value!r}: must be finite and > 0")
        if not 1 <= self.max_pulses_per_device <= 127:
            raise ConfigError(f"instrument.limits.max_pulses_per_device = {self.max_pulses_per_device}: must be in "
                              "1..127 (a pulse count travels as int8)")
        if not 1 <= self.max_bit_length <= 255:
            raise ConfigError(f"instrument.limits.max_bit_length = {self.max_bit_length}: must be in 1..255 (u8)")
        if self.pulse_budget < 0:
            raise ConfigError(f"instrument.limits.pulse_budget = {self.pulse_budget}: must be >= 0 (0 = unlimited)")


@dataclass
class InstrumentConfig:
    """Where the network lives; TOML table ``[instrument]``."""

    resource: str = "software"  # software | sim://analog?... | sim://fpga?... | a VISA resource | a serial port
    update_mode: Literal["matrix", "outer", "local"] = "matrix"
    calibration: str = ""  # path of a `hil calibrate` JSON file; empty = the instrument's nominal values
    bit_length: int = 31  # outer mode: stochastic pulse-train length
    timeout_s: float = 5.0
    input_volts: float = 1.0  # volts per unit of input data (data lie in [0, 1])
    # Without calibration: the device's nominal w_max maps to this many initial weight bounds. A tight mapping
    # lets soft bounds act as weight decay on C-EP's many small updates (digits-hw, 10 epochs, matrix mode:
    # 4 -> 88.3 %, 16 -> 90.3 %; local: 88.1 % / 90.3 %), so the default is wide; `hil calibrate` measures it.
    weight_range: float = 16.0
    program_tolerance: float = 1e-3  # write-verify tolerance when weights are programmed, effective units
    use_recommended_gain: bool = False  # take the FRE feedback gain from the calibration (see hil/insitu/learner.py)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        """Settings that contradict each other or the limits would fail mid-run: refuse them at load time."""
        for name in ("timeout_s", "input_volts", "weight_range", "program_tolerance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"instrument.{name} = {value!r}: must be finite and > 0")
        if not 1 <= self.bit_length <= 255:
            raise ConfigError(f"instrument.bit_length = {self.bit_length}: must be in 1..255 (u8 on the wire)")
        if self.bit_length > self.limits.max_bit_length:
            raise ConfigError(f"instrument.bit_length = {self.bit_length} exceeds instrument.limits.max_bit_length "
                              f"= {self.limits.max_bit_length}: every outer update would be refused")
        if self.input_volts > self.limits.max_input_volts:
            raise ConfigError(f"instrument.input_volts = {self.input_volts:g} V (data lie in [0, 1]) exceeds "
                              f"instrument.limits.max_input_volts = {self.limits.max_input_volts:g} V: inputs would "
                              "be refused; lower input_volts or raise the limit")


@dataclass
class TelemetryConfig:
    """Live documents; TOML table ``[telemetry]``. Secrets stay in files (or the environment), never in here."""

    address: str = ""  # e.g. tcp://127.0.0.1:5556; empty = no telemetry
    every_samples: int = 200  # a "primary" event document every N training samples
    curve_secret_key_file: str = ""  # a zmq.auth .key_secret certificate: CURVE-encrypts both telemetry sockets
    token_file: str = ""  # a file holding the snapshot token (default: $EQPROP_HIL_TELEMETRY_TOKEN, else none)
    wait_for_subscribers: int = 0  # hold the start document until this many subscribers joined (e.g. a Bluesky
    wait_timeout_s: float = 30.0  # RemoteDispatcher, which has no late-joiner remedy); then start anyway

    def __post_init__(self) -> None:
        if self.every_samples < 1:
            raise ConfigError(f"telemetry.every_samples = {self.every_samples}: must be >= 1")
        if self.wait_for_subscribers < 0 or not (math.isfinite(self.wait_timeout_s) and self.wait_timeout_s > 0):
            raise ConfigError(f"telemetry.wait_for_subscribers = {self.wait_for_subscribers} must be >= 0 and "
                              f"telemetry.wait_timeout_s = {self.wait_timeout_s} finite and > 0")


@dataclass
class RunConfig:
    name: str = "run"
    model: NetworkConfig = field(default_factory=lambda: NetworkConfig(sizes=[64, 256, 10]))
    rule: RuleConfig = field(default_factory=RuleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("eqprop_hil.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("eqprop_hil.presets") / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return _parse(path.read_text(encoding="utf-8"), f"preset {name}")


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return _parse(p.read_text(encoding="utf-8"), str(p))


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from e


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of TOML tables: override wins, tables merge key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(data: dict[str, Any]) -> RunConfig:
    """Strictly turn a TOML dictionary into a :class:`RunConfig`."""
    try:
        return _build(RunConfig, data, "")
    except ValueRangeError as e:
        raise ConfigError(str(e)) from e


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{path}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{path or 'top level'}]; allowed: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"[{path or 'top level'}]: {e}") from e


# Every float of a config is finite and within ABSURD of zero; these keys have tighter, physical ranges
# (inclusive; a value outside names its key). A rate of 1e30 or a weight range of 1e9 is a typo, not a setting.
ABSURD = 1e6
FLOAT_RANGES: dict[str, tuple[float, float]] = {
    "rule.lr": (0.0, 10.0),
    "rule.lr_readout": (0.0, 10.0),
    "rule.beta": (-10.0, 10.0),
    "rule.control_epsilon": (0.0, 1.0),
    "model.init_gain": (0.0, 100.0),
    "instrument.timeout_s": (1e-3, 3600.0),
    "instrument.input_volts": (1e-6, 100.0),
    "instrument.weight_range": (1e-3, 1000.0),
    "instrument.program_tolerance": (1e-6, 1.0),
    "instrument.limits.max_input_volts": (1e-6, 100.0),
    "instrument.limits.max_nudge_amperes": (1e-12, 1.0),
}
INT_RANGES: dict[str, tuple[int, int]] = {
    "rule.t1": (1, 100_000),  # settle steps; the in-situ learner also checks them against instrument.timeout_s
    "rule.t2": (1, 100_000),
    "model.sizes": (1, 1_000_000),
}


def _sane_float(key: str, value: float) -> float:
    """Refuse NaN, infinities and absurd magnitudes before any of them can reach an instrument, naming the key."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: must be a finite number")
    lo, hi = FLOAT_RANGES.get(key.split("[")[0], (-ABSURD, ABSURD))
    if not lo <= value <= hi:
        raise ConfigError(f"{key} = {value!r}: must be in [{lo:g}, {hi:g}]")
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in args:
            try:
                return _coerce(alt, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of the allowed types ({'; '.join(errors)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return _sane_float(key, float(value))
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        lo, hi = INT_RANGES.get(key.split("[")[0], (-(2**31), 2**31 - 1))
        if not lo <= value <= hi:
            raise ConfigError(f"{key} = {value}: must be in {lo}..{hi}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def resolve(preset: str | None = None, file: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Preset, then file, then command-line overrides (``{"train": {"epochs": 3}}``), each deep-merged."""
    data: dict[str, Any] = {}
    if preset:
        data = merge(data, load_preset(preset))
        data.setdefault("name", preset)
    if file:
        data = merge(data, load_file(file))
    if overrides:
        data = merge(data, overrides)
    return build(data)
