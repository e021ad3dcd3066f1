"""Programmable synapses of an emulated crossbar: device models acting on an array of conductance pairs.

Each device holds a normalised weight ``w = (G+ - G-) / G_ref`` (dimensionless "device units"). Pulses move it
according to one of the models of REFERENCE.md section 7, the way analog-AI simulators describe real devices:

- ``ideal``: every pulse moves w by exactly ``dw_min``; no bounds, no noise, no variation, no stuck devices, and
  exact (unrounded) increments are allowed, so the emulator can reproduce the software engine to float tolerance.
- ``constant``: ``w <- clip(w +- dw (1 + c2c xi))``.
- ``soft_bounds``: up ``w += dw_up (1 - w / w_max)(1 + c2c xi)``, down ``w -= dw_down (1 - w / w_min)(1 + c2c xi)``.
- ``power``: with ``omega = (w_max - w) / (w_max - w_min)``, up ``w += dw_up omega^gamma_up``, down
  ``w -= dw_down (1 - omega)^gamma_down`` (times the same c2c factor).

Device-to-device (d2d) variation is drawn once per device from the array's seed: ``dw = dw_min max(1 + d2d xi, 0.05)``, an
asymmetry ``a = up_down + up_down_d2d xi`` splitting it into ``dw_up = dw (1 + a)`` and ``dw_down = dw (1 - a)``,
and bounds ``w_max (1 + w_bounds_d2d xi)``, ``w_min (1 + w_bounds_d2d xi')``. Cycle-to-cycle noise is drawn on every
pulse. Write noise (standard deviation ``write_noise * dw_min``) is redrawn for every device a command touches and is
seen by reads and by the dynamics but not by the hidden weight that later pulses act on. Drift multiplies the
weight by ``((t + t0) / t0) ** -nu``, with ``t`` the steps since the device was last written. Stuck devices keep
their power-on weight whatever they are sent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from eqprop_hil.mock_instruments.kernels import new_state, pulse_trains
from eqprop_hil.protocols.errors import ValueRangeError

MODELS = ("ideal", "constant", "soft_bounds", "power")
_MODEL_CODES = {"constant": 0, "soft_bounds": 1, "power": 2}  # kernels.pulse_trains's model argument
_NONE_STUCK = np.zeros(0, dtype=bool)
MAX_PULSES = 255  # per device per internal call (int8 commands are capped at 127; outer updates at bit_length 255)


@dataclass
class DeviceConfig:
    """Device model and its statistics; all weights in normalised device units (``w_min < 0 < w_max``)."""

    model: str = "soft_bounds"  # "ideal" | "constant" | "soft_bounds" | "power"
    dw_min: float = 0.001  # nominal weight change per pulse
    dw_min_d2d: float = 0.3  # relative device-to-device spread of the step
    dw_min_c2c: float = 0.3  # relative cycle-to-cycle noise of every pulse
    w_max: float = 0.6  # nominal upper bound
    w_min: float = -0.6  # nominal lower bound
    w_bounds_d2d: float = 0.3  # relative device-to-device spread of each bound
    up_down: float = 0.0  # mean up/down asymmetry a: dw_up = dw (1 + a), dw_down = dw (1 - a)
    up_down_d2d: float = 0.01  # device-to-device spread of a (absolute)
    gamma_up: float = 1.0  # power-step exponent of up pulses
    gamma_down: float = 1.0  # power-step exponent of down pulses
    write_noise: float = 0.0  # std of the read-visible write noise, in units of dw_min
    drift_nu: float = 0.0  # drift exponent; 0 = no drift
    drift_t0_steps: float = 1.0  # drift reference time t0, in dynamics steps
    stuck_fraction: float = 0.0  # fraction of devices that ignore every pulse

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueRangeError` naming the first field that no physical device could have."""
        if self.model not in MODELS:
            raise ValueRangeError(f"device model must be one of {', '.join(MODELS)}, got {self.model!r}")
        for name, value in asdict(self).items():
            if name == "model":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueRangeError(f"device {name} must be a finite number, got {value!r}")
        positive = ("dw_min", "gamma_up", "gamma_down", "drift_t0_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueRangeError(f"device {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("dw_min_d2d", "dw_min_c2c", "w_bounds_d2d", "up_down_d2d", "write_noise", "drift_nu"):
            if getattr(self, name) < 0:
                raise ValueRangeError(f"device {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.w_min < 0 < self.w_max:
            raise ValueRangeError(f"device bounds must satisfy w_min < 0 < w_max, got ({self.w_min!r}, {self.w_max!r})")
        if not -1 < self.up_down < 1:
            raise ValueRangeError(f"device up_down asymmetry must be in (-1, 1), got {self.up_down!r}")
        if not 0 <= self.stuck_fraction <= 1:
            raise ValueRangeError(f"device stuck_fraction must be in [0, 1], got {self.stuck_fraction!r}")

    @property
    def ideal(self) -> bool:
        return self.model == "ideal"


class DeviceArray:
    """One crossbar matrix of devices: hidden weights, per-device parameters, and the pulse response.

    ``now`` arguments are the array clock in dynamics steps (used only by drift). All randomness comes from the
    seed sequence handed in, split into independent streams (d2d, c2c, write noise), so results are reproducible.
    """

    def __init__(
        self, config: DeviceConfig, shape: tuple[int, int], initial: np.ndarray, seed: np.random.SeedSequence
    ) -> None:
        config.validate()
        self.config = config
        self.shape = shape
        d2d_seq, c2c_seq, write_seq = seed.spawn(3)
        d2d = np.random.default_rng(d2d_seq)
        # xoshiro256** states (kernels.py) for the cycle-to-cycle and the write noise, drawn inside the compiled loops
        self.c2c_state, self.write_state = new_state(c2c_seq), new_state(write_seq)
        c = config
        if c.ideal:
            self.dw_up = np.full(shape, c.dw_min)
            self.dw_down = np.full(shape, c.dw_min)
            self.w_max = np.full(shape, np.inf)
            self.w_min = np.full(shape, -np.inf)
            self.stuck = np.zeros(shape, dtype=bool)
        else:
            # a slow device stays a (very) slow device: the spread is floored at 5% of dw_min, never dead
            base = c.dw_min * np.maximum(1 + c.dw_min_d2d * d2d.standard_normal(shape), 0.05)
            asym = c.up_down + c.up_down_d2d * d2d.standard_normal(shape)
            self.dw_up = np.maximum(base * (1 + asym), 0.0)
            self.dw_down = np.maximum(base * (1 - asym), 0.0)
            # a bound can spread but never cross zero (soft bounds divide by it)
            self.w_max = np.maximum(c.w_max * (1 + c.w_bounds_d2d * d2d.standard_normal(shape)), 0.05 * c.w_max)
            self.w_min = np.minimum(c.w_min * (1 + c.w_bounds_d2d * d2d.standard_normal(shape)), 0.05 * c.w_min)
            self.stuck = d2d.random(shape) < c.stuck_fraction
        # C-contiguous on purpose: sparse writes go through ravel() views of w, noise and written_at
        initial = np.asarray(initial, dtype=np.float64).reshape(shape)
        self.w = np.ascontiguousarray(np.clip(initial, self.w_min, self.w_max))
        self.noise = np.zeros(shape)  # read-visible write noise
        self.written_at = np.zeros(shape)  # clock (steps) of each device's last write, for drift

    # ----------------------------------------------------------------------------------------------- reads
    def visible(self, now: float) -> np.ndarray:
        """What a read (and the neuron dynamics) sees: drifted hidden weight plus write noise, shape ``shape``.

        Always a new array: callers may keep it across later pulses."""
        if self.config.ideal:
            return self.w.copy()
        w = self.w * self._drift_factor(now) if self.config.drift_nu > 0 else self.w.copy()
        return w + self.noise if self.config.write_noise > 0 else w

    def _drift_factor(self, now: float) -> np.ndarray:
        t0 = self.config.drift_t0_steps
        return ((now - self.written_at + t0) / t0) ** (-self.config.drift_nu)

    def visible_at(self, flat: np.ndarray, now: float) -> np.ndarray:
        """:meth:`visible` at the flat (C-order) indices ``flat`` only: the same values, elementwise."""
        if self.config.ideal:
            return self.w.ravel()[flat]
        w = self.w.ravel()[flat]
        if self.config.drift_nu > 0:
            t0 = self.config.drift_t0_steps
            w = w * ((now - self.written_at.ravel()[flat] + t0) / t0) ** (-self.config.drift_nu)
        return w + self.noise.ravel()[flat] if self.config.write_noise > 0 else w

    def _settle_drift(self, flat: np.ndarray, now: float) -> None:
        """Before writing devices (flat indices), make their drifted conductance the hidden weight and restart
        their drift clock."""
        if self.config.drift_nu > 0 and not self.config.ideal:
            t0 = self.config.drift_t0_steps
            w, written = self.w.ravel(), self.written_at.ravel()
            w[flat] *= ((now - written[flat] + t0) / t0) ** (-self.config.drift_nu)
            written[flat] = now

    # ---------------------------------------------------------------------------------------------- writes
    def pulse(self, counts: np.ndarray, now: float = 0.0) -> np.ndarray:
        """Fire ``counts`` signed pulses per device (+ potentiates), ``|counts| <= 255``, shape ``shape``.

        Dense entry point: only the devices with a non-zero count are worked on (see :meth:`pulse_sparse`).
        Returns the flat indices of the devices that moved (stuck devices and zero counts excluded).
        """
        counts = np.asarray(counts).reshape(self.shape).ravel()
        flat = np.flatnonzero(counts != 0)  # on a boolean mask: several times faster than on int8 or float
        return self.pulse_flat(flat, counts[flat].astype(np.int64), now)

    def pulse_sparse(self, flat: np.ndarray, counts: np.ndarray, now: float = 0.0) -> np.ndarray:
        """Fire ``counts[k]`` signed pulses into the device at flat (C-order) index ``flat[k]``.

        ``flat`` strictly increasing in ``0..size-1``, integer ``counts`` with ``|counts| <= 255`` (zeros allowed).
        Exactly :meth:`pulse` of the equivalent dense matrix, random draws included, at a cost proportional to the
        number of devices touched. Returns the flat indices of the devices that moved.
        """
        flat, counts = np.asarray(flat), np.asarray(counts)
        if flat.ndim != 1 or counts.shape != flat.shape or flat.dtype.kind not in "iu" or counts.dtype.kind not in "iu":
            raise ValueRangeError(f"sparse pulses need equal-length 1-d integer index and count vectors, got "
                                  f"{flat.dtype}{flat.shape} and {counts.dtype}{counts.shape}")
        flat, counts = flat.astype(np.int64), counts.astype(np.int64)
        size = self.shape[0] * self.shape[1]
        if flat.size and (flat[0] < 0 or flat[-1] >= size or np.any(flat[1:] <= flat[:-1])):
            raise ValueRangeError(f"sparse pulse indices must be strictly increasing in 0..{size - 1}")
        if flat.size and int(np.abs(counts).max()) > MAX_PULSES:
            raise ValueRangeError(f"pulse count {int(np.abs(counts).max())} exceeds {MAX_PULSES} per device per call")
        nonzero = counts != 0
        return self.pulse_flat(flat[nonzero], counts[nonzero], now)

    def pulse_flat(self, flat: np.ndarray, counts: np.ndarray, now: float) -> np.ndarray:
        """The pulse response, unchecked: for callers that built (or checked) strictly increasing int64 flat
        indices and non-zero int64 counts ``|counts| <= 255`` themselves, as the array physics does.

        Compiled (kernels.pulse_trains): one device's train after another, pulse by pulse, in ascending flat order,
        so the dense and the sparse entry points draw identically. Returns the devices that moved (not the stuck).
        """
        if self.config.ideal:
            w = self.w.ravel()
            w[flat] += counts * self.config.dw_min
            return flat
        if self.config.stuck_fraction > 0:  # stuck devices keep their weight: not even drift settles
            free = ~self.stuck.ravel()[flat]
            flat, counts = flat[free], counts[free]
        if flat.size:
            self._settle_drift(flat, now)
            pulse_trains(*self.kernel_arrays(), flat, counts, *self.kernel_params())
        return flat

    def kernel_arrays(self) -> tuple[np.ndarray, ...]:
        """Flat views the compiled pulse loops work on, in kernels.pulse_trains's order: ``w, w_min, w_max, dw_up,
        dw_down, stuck`` (empty when no device is stuck), ``noise``."""
        stuck = self.stuck.ravel() if self.config.stuck_fraction > 0 else _NONE_STUCK
        return (self.w.ravel(), self.w_min.ravel(), self.w_max.ravel(), self.dw_up.ravel(), self.dw_down.ravel(),
                stuck, self.noise.ravel())

    def kernel_params(self) -> tuple:
        """The device model for kernels.pulse_trains: ``model code, gamma_up, gamma_down, c2c, c2c state, write
        sigma, write state``."""
        c = self.config
        return (_MODEL_CODES[c.model], float(c.gamma_up), float(c.gamma_down), float(c.dw_min_c2c), self.c2c_state,
                float(c.write_noise * c.dw_min), self.write_state)

    def add_exact(self, delta: np.ndarray) -> None:
        """Ideal model only: add an exact float increment (on-device learning without pulse quantisation)."""
        if not self.config.ideal:
            raise ValueRangeError(f"exact increments need the ideal device model, not {self.config.model!r}")
        self.w += delta

    def set_exact(self, target: np.ndarray) -> None:
        """Ideal model only: program the weights exactly (write-verify with zero error)."""
        if not self.config.ideal:
            raise ValueRangeError(f"exact programming needs the ideal device model, not {self.config.model!r}")
        self.w[...] = target

    def state(self) -> dict:
        """Copies of everything that can change after construction (for no-state-change checks and tests)."""
        return {
            "w": self.w.copy(),
            "noise": self.noise.copy(),
            "written_at": self.written_at.copy(),
            "rng_c2c": self.c2c_state.tolist(),
            "rng_write": self.write_state.tolist(),
        }
