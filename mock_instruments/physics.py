"""The physics core of an emulated EP neuron array: topology, neuron dynamics, nudge, converters, synapses.

Written from ``docs/dynamics.md`` and REFERENCE.md sections 7-8 alone, independently of ``hil``'s software model,
so that comparing the two catches mistakes in either. Hardware runs one sample at a time, so states are vectors
``(n_k,)``; everything inside is float64 and only reads (through the ADC) come out as float32.

Every public method validates all of its arguments before it touches any state: a bad value raises
:class:`eqprop_hil.protocols.errors.ValueRangeError` and leaves the array exactly as it was (``state_dict()`` unchanged).

Speed without a different model (``benchmarks/physics.py``): on real devices (any model but ``ideal``, no drift)
the dynamics and the on-device learning run compiled (``kernels.py``, numba): ``step(n)`` is one call for all n
steps, a nudged phase with the local rule included (rounding row by row with thinning, the pulses, the refresh
of the effective matrices, in one call). Ideal devices and drifting ones keep the vectorised numpy path: effective
matrices cached and refreshed in place at the devices a command wrote, the clamped input's drive computed once
per (weights, input), one vector and one activation pass per step; ideal devices give the floats of the plain
formulas (tests/test_physics_fast.py). The compiled dynamics sum in another order (float64 round-off apart), and
real devices draw their noise from xoshiro256** streams seeded from the board's seed.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from eqprop_hil.mock_instruments import kernels
from eqprop_hil.mock_instruments.converters import Adc, Dac, check_bits, check_range
from eqprop_hil.mock_instruments.devices import DeviceArray, DeviceConfig
from eqprop_hil.mock_instruments.rounding import THIN_BOUND, new_state, round_matrix, round_outer
from eqprop_hil.protocols.errors import ValueRangeError

ACTIVATIONS = {
    "sigmoid4": lambda x: 0.5 * (1.0 + np.tanh(2.0 * (x - 0.5))),  # = 1 / (1 + exp(-4 (x - 0.5))), overflow-free
    "hard_sigmoid": lambda x: np.clip(x, 0.0, 1.0),
    "tanh": np.tanh,
    "identity": lambda x: x,
}


def _sigmoid4_(x: np.ndarray) -> None:
    """sigmoid4 in place, operation for operation the expression in ACTIVATIONS (same floats, no temporaries)."""
    x -= 0.5
    x *= 2.0
    np.tanh(x, out=x)
    x += 1.0
    x *= 0.5


ACTIVATIONS_INPLACE = {  # the same functions, overwriting their argument; the dynamics' hot path
    "sigmoid4": _sigmoid4_,
    "hard_sigmoid": lambda x: np.clip(x, 0.0, 1.0, out=x),
    "tanh": lambda x: np.tanh(x, out=x),
    "identity": lambda x: None,
}
PHASES = ("FREE", "NUDGE", "HOLD")
MAX_LAYER = 65535
MAX_STEPS = 1_000_000  # per call: keeps a single command bounded in time
MAX_PULSE_COUNT = 127  # int8 on the wire, symmetric
_NO_VECTOR = np.zeros(0)  # kernels.local_step's unused vectors of a rank-1 increment


@dataclass
class ArrayConfig:
    """How an emulated array is built: topology, neuron circuit, converters, devices and the seed."""

    sizes: list[int]  # neurons per layer, input first
    skips: list[tuple[int, int]] = field(default_factory=list)  # extra (src, dst) edges, after the chain edges
    feedback: str = "tied"  # "tied" (gamma W^T) or "untied" (separate B_e per edge)
    activation: str = "sigmoid4"  # "sigmoid4" | "hard_sigmoid" | "tanh" | "identity"
    dt: float = 1.0  # relaxation rate: 1 = discrete-time steps, < 1 = leaky continuous-time integration
    nudge_placement: str = "outside"  # nudge added "outside" rho (C-EP default) or "inside" it
    transimpedance_ohms: float = 1e4  # R of the output nodes: a nudge current I adds R * I volts
    device: DeviceConfig = field(default_factory=DeviceConfig)
    dac_bits: int | None = None  # input DAC resolution; None = ideal
    dac_range_volts: tuple[float, float] = (-1.0, 1.0)
    adc_bits: int | None = None  # state ADC resolution; None = ideal (no clipping either)
    adc_range_volts: tuple[float, float] = (-2.0, 2.0)
    read_noise: float = 0.0  # Gaussian read noise on states, volts (std)
    compliance_amperes: float = 1e-4  # largest |nudge current| the output stage sources
    seed: int = 0
    init_scale: float = 1.0  # power-on weights uniform in +-init_scale / sqrt(fan_in), effective units

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ValueRangeError` naming the first setting no array could be built with."""
        sizes = list(self.sizes)
        if len(sizes) < 2 or not all(_is_int(n) and 1 <= n <= MAX_LAYER for n in sizes):
            raise ValueRangeError(f"sizes must be >= 2 layer sizes, each an integer 1..{MAX_LAYER}, got {self.sizes!r}")
        self.sizes = [int(n) for n in sizes]
        skips = []
        for pair in self.skips:
            try:
                i, j = (int(v) for v in pair)
            except (TypeError, ValueError) as e:
                raise ValueRangeError(f"skip edge must be a pair (src, dst), got {pair!r}") from e
            if not 0 <= i < j < len(sizes) or j == i + 1 or (i, j) in skips:
                raise ValueRangeError(
                    f"skip edge {pair!r} must satisfy 0 <= src < dst <= {len(sizes) - 1}, not be a chain edge "
                    "(dst = src + 1) and not repeat"
                )
            skips.append((i, j))
        self.skips = skips
        _choice(self.feedback, ("tied", "untied"), "feedback")
        _choice(self.activation, tuple(ACTIVATIONS), "activation")
        _choice(self.nudge_placement, ("outside", "inside"), "nudge_placement")
        if not (_is_number(self.dt) and 0 < self.dt <= 1):
            raise ValueRangeError(f"dt must be in (0, 1], got {self.dt!r}")
        for name in ("transimpedance_ohms", "compliance_amperes"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueRangeError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        for name in ("read_noise", "init_scale"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueRangeError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        self.dac_bits = check_bits(self.dac_bits, "dac_bits")
        self.adc_bits = check_bits(self.adc_bits, "adc_bits")
        self.dac_range_volts = check_range(self.dac_range_volts, "dac_range_volts")
        self.adc_range_volts = check_range(self.adc_range_volts, "adc_range_volts")
        if not (_is_int(self.seed) and self.seed >= 0):
            raise ValueRangeError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.device, DeviceConfig):
            raise ValueRangeError(f"device must be a DeviceConfig, got {type(self.device).__name__}")
        self.device.validate()

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Chain edges first, in order, then the skips in configured order (docs/dynamics.md)."""
        return [(k, k + 1) for k in range(len(self.sizes) - 1)] + list(self.skips)

    @classmethod
    def query_keys(cls) -> set[str]:
        """Every key :meth:`from_query` understands (a launcher strips its own keys, e.g. ``transport``, first)."""
        return _query_keys()

    @classmethod
    def from_query(cls, params: dict[str, str]) -> "ArrayConfig":
        """Build a config from a ``sim://...?sizes=64,256,10&skips=0-2&device=ideal`` query (values as strings).

        Keys are the field names of ArrayConfig and DeviceConfig, plus ``device`` (the model), ``dac_range`` and
        ``adc_range`` (``low,high``). ``adc_bits=none`` (or 0) means ideal. Unknown keys and bad values raise
        :class:`ValueRangeError` naming them.
        """
        array_kw, device_kw = _parse_query(params)
        array_kw["device"] = DeviceConfig(**device_kw)
        return cls(**array_kw)


class ArrayPhysics:
    """An emulated neuron array with programmable synapses; see the module docstring and docs/dynamics.md."""

    def __init__(self, config: ArrayConfig) -> None:
        config.validate()
        self.config = config
        self.sizes = list(config.sizes)
        self.edges = config.edges
        self.untied = config.feedback == "untied"
        self._rho_ = ACTIVATIONS_INPLACE[config.activation]
        # non-input layers live side by side in one vector per step: one bias add and one activation for all
        self._starts = np.cumsum([0] + self.sizes[1:]).tolist()  # layer j >= 1 is [starts[j-1], starts[j])
        self._n_chain = len(self.sizes) - 1  # edges[:n_chain] are the chain edges (k, k + 1), in order
        # the compiled dynamics (kernels.relax): real devices whose effective weights hold still between writes
        self._compiled = not config.device.ideal and not config.device.drift_nu > 0
        self._offsets = np.cumsum([0] + self.sizes)  # layer k of the side-by-side state vector: [off[k], off[k + 1])
        self._src = np.array([i for i, _ in self.edges], dtype=np.int64)
        self._dst = np.array([j for _, j in self.edges], dtype=np.int64)
        self._act_code = ("sigmoid4", "hard_sigmoid", "tanh", "identity").index(config.activation)
        self._no_nudge = np.zeros(self.sizes[-1])
        root = np.random.SeedSequence(config.seed)
        init_seq, read_seq, train_seq, learn_seq, dev_seq = root.spawn(5)
        init_rng = np.random.default_rng(init_seq)
        self._rng_train = np.random.default_rng(train_seq)  # stochastic pulse trains (outer updates)
        self._learn_state = new_state(learn_seq)  # xoshiro256**: stochastic rounding of local updates (kernels.py)
        self._dac = Dac(config.dac_bits, config.dac_range_volts)
        self._adc = Adc(config.adc_bits, config.adc_range_volts, config.read_noise, np.random.default_rng(read_seq))
        dev_seeds = dev_seq.spawn(2 * len(self.edges))
        self._w: list[DeviceArray] = []
        self._b: list[DeviceArray | None] = []  # untied feedback matrices; None for tied or input edges
        for e, (i, j) in enumerate(self.edges):
            self._w.append(self._new_matrix((self.sizes[j], self.sizes[i]), init_rng, dev_seeds[2 * e]))
            has_b = self.untied and i >= 1
            self._b.append(self._new_matrix((self.sizes[i], self.sizes[j]), init_rng, dev_seeds[2 * e + 1]) if has_b else None)
        self._scale = {(e, fb): 1.0 for e in range(len(self.edges)) for fb in (False, True)}
        # effective matrices, kept until a write (refreshed in place at the devices written) or a scale change;
        # never kept under drift, where every step changes what the dynamics see
        self._cache: dict[tuple[int, bool], np.ndarray] = {}
        self._cacheable = not (config.device.drift_nu > 0 and not config.device.ideal)
        # input edges: (W, x, W @ x) -- the drive of a clamped input is constant while W and x are the same objects
        self._drive: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._scratch: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray]] = {}  # see _buffers
        self.clock = 0  # dynamics steps since construction (drift time base)
        self.counters: dict[str, int] = dict.fromkeys(
            ("steps", "pulse_commands", "pulses", "outer_commands", "coincidences", "program_commands",
             "local_updates", "resets", "power_cycles"), 0)
        self._power_on()
        if self._compiled:
            self._warm_kernels()

    def _warm_kernels(self) -> None:
        """Compile (first use on a machine, seconds) or load (numba's cache) the kernels for this board's argument
        types now, at power-on, rather than inside the first command a client is timing. Runs them for 0 steps
        with nothing fired: no state changes. A nudged phase that learns on fewer matrices (an eta of 0) has other
        types and compiles at its first use."""
        keys, kinds, rows, cols, coefs = self._learned(1.0, [1.0] * len(self.edges))  # every matrix learning
        flat = np.concatenate(self._states)
        kernels.relax(0, flat, flat.copy(), *self._dynamics_arguments(), flat.copy())
        kernels.relax_learn(0, flat.copy(), *self._dynamics_arguments(), self._learn_state, np.array(coefs),
                            np.array(kinds, dtype=np.int64), np.array(rows, dtype=np.int64),
                            np.array(cols, dtype=np.int64), *self._device_arguments(keys))
        none = np.zeros(0, dtype=np.int64)
        kernels.pulse_trains(*self._w[0].kernel_arrays(), none, none, *self._w[0].kernel_params())

    def _new_matrix(self, shape, rng, seed) -> DeviceArray:
        bound = self.config.init_scale / np.sqrt(shape[1])
        return DeviceArray(self.config.device, shape, rng.uniform(-bound, bound, size=shape), seed)

    def _power_on(self) -> None:
        """Volatile settings to their power-on values (conductances, scales and the clock are non-volatile)."""
        self._gain = [1.0] * len(self.edges)
        self._bias = [np.zeros(n) for n in self.sizes]
        self._bias_all = np.zeros(self._starts[-1])  # biases of layers 1.. side by side (see _next_states)
        self._eta = [0.0] * len(self.edges)
        self._learn_beta: float | None = None
        self._learning = False
        self._clear()

    # ------------------------------------------------------------------------------------------ topology, state
    def topology(self) -> dict:
        """``{"sizes": [4, 6, 3], "edges": [(0, 1), (1, 2), (0, 2)], "feedback": "tied", "activation": ...}``."""
        return {"sizes": list(self.sizes), "edges": list(self.edges), "feedback": self.config.feedback,
                "activation": self.config.activation}

    def reset(self) -> None:
        """States 0, phase HOLD, nudge off, input 0; weights, gains, scales, biases and learning settings kept."""
        self._clear()
        self.counters["resets"] += 1

    def _clear(self) -> None:
        self._states = [np.zeros(n) for n in self.sizes]
        self._phase = "HOLD"
        self._nudge: tuple[str, np.ndarray, float] | None = None  # ("current", R*I volts, 0) / ("target", y, beta)

    def power_cycle(self) -> None:
        """Everything volatile is lost (states, phase, input, nudge, gains, biases, learning); conductances and
        scales (the calibration of the conductance readout) are non-volatile."""
        self._power_on()
        self.counters["power_cycles"] += 1

    @property
    def phase(self) -> str:
        return self._phase

    def set_phase(self, phase: str) -> None:
        """FREE: dynamics without nudge; NUDGE: with nudge (and local learning if on); HOLD: states frozen."""
        self._phase = _choice(phase, PHASES, "phase")

    def set_input(self, volts: np.ndarray) -> None:
        """Clamp the input layer to ``volts`` (shape ``(n_0,)``) through the DAC; outside the DAC range is refused."""
        arr = _vector(volts, self.sizes[0], "input")
        self._states[0] = self._dac.convert(arr)

    def set_bias(self, layer: int, values: np.ndarray) -> None:
        """Held (not learned) bias of a non-input layer, volts, shape ``(n_layer,)``."""
        layer = _index(layer, len(self.sizes), "layer", low=1)
        self._bias[layer] = _vector(values, self.sizes[layer], f"bias of layer {layer}")
        self._bias_all[self._starts[layer - 1]:self._starts[layer]] = self._bias[layer]

    def bias(self, layer: int) -> np.ndarray:
        return self._bias[_index(layer, len(self.sizes), "layer", low=1)].copy()

    def set_nudge_current(self, amperes: np.ndarray) -> None:
        """Explicit nudge currents into the output nodes (amperes, ``|I| <= compliance``); leaves target mode."""
        arr = _vector(amperes, self.sizes[-1], "nudge current")
        limit = self.config.compliance_amperes
        if np.any(np.abs(arr) > limit):
            raise ValueRangeError(f"nudge current {float(np.abs(arr).max()):g} A exceeds the compliance {limit:g} A")
        self._nudge = ("current", arr * self.config.transimpedance_ohms, 0.0)

    def set_nudge_target(self, target: np.ndarray, beta: float) -> None:
        """Target mode: at every nudged step the board adds ``beta * (target - o_t)`` with its own state ``o_t``."""
        arr = _vector(target, self.sizes[-1], "nudge target")
        beta = _number(beta, "beta")
        self._nudge = ("target", arr, beta)

    def nudge_off(self) -> None:
        self._nudge = None

    def set_gain(self, edge: int, gamma: float) -> None:
        """Feedback gain gamma_e in [0, 1] (FRE feedback regulation; 1 = standard EP)."""
        edge = _index(edge, len(self.edges), "edge")
        gamma = _number(gamma, "feedback gain")
        if not 0 <= gamma <= 1:
            raise ValueRangeError(f"feedback gain must be in [0, 1], got {gamma!r}")
        self._gain[edge] = gamma

    def gain(self, edge: int) -> float:
        return self._gain[_index(edge, len(self.edges), "edge")]

    def set_scale(self, edge: int, scale: float, feedback: bool = False) -> None:
        """Readout scale of one matrix: effective W = scale * w_device (finite, > 0)."""
        key = self._key(edge, feedback)
        scale = _number(scale, "scale")
        if scale <= 0:
            raise ValueRangeError(f"scale must be > 0, got {scale!r}")
        self._scale[key] = scale
        self._written(key)

    def scale(self, edge: int, feedback: bool = False) -> float:
        return self._scale[self._key(edge, feedback)]

    def _key(self, edge: int, feedback: bool) -> tuple[int, bool]:
        edge = _index(edge, len(self.edges), "edge")
        if not isinstance(feedback, (bool, np.bool_)):
            raise ValueRangeError(f"feedback must be True or False, got {feedback!r}")
        if feedback and self._b[edge] is None:
            why = "the board is tied" if not self.untied else "edges out of the input have no feedback"
            raise ValueRangeError(f"edge {edge} has no feedback matrix: {why}")
        return edge, bool(feedback)

    def _device(self, key: tuple[int, bool]) -> DeviceArray:
        return self._b[key[0]] if key[1] else self._w[key[0]]

    def _effective(self, key: tuple[int, bool]) -> np.ndarray:
        """Effective matrix the dynamics multiply by (scale * read-visible device weights), float64. Cached (not
        under drift): callers must not modify it."""
        m = self._cache.get(key)
        if m is None:
            m = self._scale[key] * self._device(key).visible(self.clock)
            if self._cacheable:
                self._cache[key] = m
        return m

    def _written(self, key: tuple[int, bool], flat: np.ndarray | None = None) -> None:
        """Matrix ``key`` was written: refresh its cached effective matrix at the flat indices ``flat`` (the values a
        full re-read gives, elementwise) or, with ``flat=None``, drop it; the input drive through it is dropped."""
        if flat is not None and not flat.size:
            return
        if not key[1]:
            self._drive.pop(key[0], None)
        m = self._cache.get(key)
        if m is None:
            return
        if flat is None:
            device = self._device(key)
            if device.config.ideal:  # ideal reads are the weights: refresh in place, as scale * w
                np.multiply(self._scale[key], device.w, out=m)
            else:
                del self._cache[key]
        else:
            m.ravel()[flat] = self._scale[key] * self._device(key).visible_at(flat, self.clock)

    def _input_drive(self, edge: int, w: np.ndarray, x: np.ndarray) -> np.ndarray:
        """``w @ x`` for an edge out of the clamped input, computed once per (weights, input) pair (same value)."""
        kept = self._drive.get(edge)
        if kept is not None and kept[0] is w and kept[1] is x:
            return kept[2]
        drive = w @ x
        if self._cacheable:
            self._drive[edge] = (w, x, drive)
        return drive

    def read_state(self, layer: int | None = None) -> list[np.ndarray]:
        """States in volts through read noise and the ADC, float32: every layer (input first) or ``[layer]``."""
        if layer is None:
            return [self._adc.read(s) for s in self._states]
        return [self._adc.read(self._states[_index(layer, len(self.sizes), "layer")])]

    # ------------------------------------------------------------------------------------------------ dynamics
    def step(self, n: int = 1) -> None:
        """Run ``n`` synchronous steps of docs/dynamics.md in the current phase (HOLD: time passes, nothing moves)."""
        n = _index(n, MAX_STEPS + 1, "step count")
        learn = self._phase == "NUDGE" and self._learning
        beta = self._rule_beta() if learn and n else None
        if self._compiled and self._phase != "HOLD" and n:  # all n steps in one compiled call
            self._states = self._relax_learn(n, beta) if learn else self._relax(n)
            self.clock += n
            n_loop = 0
        else:
            n_loop = n if self._phase != "HOLD" else 0
        for _ in range(n_loop):
            new = self._next_states()
            if learn:
                self._local_update(self._states, new, beta)
            self._states = new
            self.clock += 1
        if self._phase == "HOLD":
            self.clock += n
        self.counters["steps"] += n

    def _next_states(self) -> list[np.ndarray]:
        """One synchronous step: compiled (:meth:`_relax`) on real devices, :meth:`_next_states_numpy` on ideal and
        drifting ones."""
        return self._relax(1) if self._compiled else self._next_states_numpy()

    def _relax(self, n: int) -> list[np.ndarray]:
        """``n`` steps by kernels.relax: the same rule as :meth:`_next_states_numpy`, summed in another order (the
        states agree to float64 round-off, tests/test_physics_fast.py). New state vectors; the old ones are kept."""
        flat = np.concatenate(self._states)
        out = np.empty_like(flat)
        kernels.relax(n, flat, out, *self._dynamics_arguments(), np.empty_like(flat) if n > 1 else out)
        return self._split(out)

    def _split(self, flat: np.ndarray) -> list[np.ndarray]:
        """The side-by-side state vector as per-layer views; the clamped input stays the same object (the numpy
        path's cached input drive is keyed on it)."""
        off = self._offsets
        return [self._states[0]] + [flat[off[k]:off[k + 1]] for k in range(1, len(self.sizes))]

    def _dynamics_arguments(self) -> tuple:
        """kernels.relax's arguments from ``off`` to ``inside``: topology, effective matrices (untied: the feedback
        ones too, the forward matrix standing in where an edge has none; tied: the forward ones twice, the kernels
        transpose them), gains, activation, dt and the nudge (kind 0 none, 1 fixed volts, 2 target mode)."""
        mats = tuple(self._effective((e, False)) for e in range(len(self.edges)))
        fbs = tuple(self._effective((e, True)) if self._b[e] is not None else mats[e]
                    for e in range(len(mats))) if self.untied else mats
        kind, values, beta = 0, self._no_nudge, 0.0
        if self._phase == "NUDGE" and self._nudge is not None:
            kind, values, beta = (1 if self._nudge[0] == "current" else 2), self._nudge[1], float(self._nudge[2])
        return (self._offsets, self._bias_all, self._src, self._dst, mats, fbs, np.array(self._gain), self.untied,
                self._act_code, float(self.config.dt), kind, values, beta, self.config.nudge_placement == "inside")

    def _next_states_numpy(self) -> list[np.ndarray]:
        """One synchronous step: u_k = b_k + sum of the edge terms into k, s'_k = rho(u_k) (+ nudge, leaky dt).

        Layers 1.. share one new vector (``out``; the new states are views of it). Each layer's terms are added
        in the order the rule lists them, bias after the first, so the floats are those of ``bias.copy()`` and
        ``+=`` per edge: the first term of layer k is the forward drive of chain edge k - 1 (chain edges come
        first, in order), then the bias, then the feedback and skip terms in edge order.
        """
        s, starts = self._states, self._starts
        out = np.empty(starts[-1])
        u = [out[:0]] + [out[starts[k - 1]:starts[k]] for k in range(1, len(starts))]
        weights = [self._effective((e, False)) for e in range(len(self.edges))]  # once per step (drift: a read)
        for e in range(self._n_chain):  # chain edge e = (e, e + 1)
            if e == 0:
                np.copyto(u[1], self._input_drive(0, weights[0], s[0]))
            else:
                np.matmul(weights[e], s[e], out=u[e + 1])
        out += self._bias_all
        for e, (i, j) in enumerate(self.edges):
            w = weights[e]
            if e >= self._n_chain:
                u[j] += self._input_drive(e, w, s[0]) if i == 0 else w @ s[i]
            if i >= 1:
                term = (self._effective((e, True)) if self.untied else w.T) @ s[j]
                if self._gain[e] != 1.0:  # gamma * x; x * 1.0 == x
                    term *= self._gain[e]
                u[i] += term
        nudge = self._nudge_volts() if self._phase == "NUDGE" else None
        inside = nudge is not None and self.config.nudge_placement == "inside"
        if inside:
            u[-1] += nudge
        self._rho_(out)
        if nudge is not None and not inside:
            u[-1] += nudge
        dt = self.config.dt
        if dt != 1.0:  # s + dt (target - s)
            old = np.concatenate(s[1:])
            out -= old
            out *= dt
            out += old
        return [s[0]] + u[1:]

    def _nudge_volts(self) -> np.ndarray | None:
        if self._nudge is None:
            return None
        kind, values, beta = self._nudge
        return values if kind == "current" else beta * (values - self._states[-1])

    # -------------------------------------------------------------------------------------------- plasticity
    def set_local_learning(self, enabled: bool, eta: list[float] | None = None, beta: float | None = None) -> None:
        """On-device C-EP (tied) / C-VF (untied) at every nudged step; eta per edge (>= 0), beta != 0.

        ``None`` keeps the current eta / beta. Without a beta of its own the rule uses the target mode's beta.
        """
        if not isinstance(enabled, (bool, np.bool_)):
            raise ValueRangeError(f"enabled must be True or False, got {enabled!r}")
        new_eta = self._eta if eta is None else _etas(eta, len(self.edges))
        new_beta = self._learn_beta if beta is None else _nonzero(beta, "learning beta")
        self._learning, self._eta, self._learn_beta = bool(enabled), new_eta, new_beta

    @property
    def local_learning(self) -> tuple[bool, list[float], float | None]:
        return self._learning, list(self._eta), self._learn_beta

    def _rule_beta(self) -> float:
        if self._learn_beta is not None:
            return self._learn_beta
        if self._nudge is not None and self._nudge[0] == "target" and self._nudge[2] != 0:
            return self._nudge[2]
        raise ValueRangeError("local learning needs a beta: set one with set_local_learning or use target mode")

    def _local_update(self, old: list[np.ndarray], new: list[np.ndarray], beta: float) -> None:
        """Apply one step's C-EP (tied) or C-VF (untied) increment to every edge with eta > 0."""
        if self._compiled:
            self._local_update_compiled(old, new, beta)
            return
        ideal = self.config.device.ideal
        for e, (i, j) in enumerate(self.edges):
            rate = self._eta[e] / beta
            if rate == 0:
                continue
            if self.untied:
                self._increment((e, False), rate, new[j] - old[j], old[i])
                if i >= 1:
                    self._increment((e, True), rate, new[i] - old[i], old[j])
            elif i == 0 and not ideal:
                # the input is clamped (new[0] is old[0]), so the tied increment is rank 1: rate * outer(ds_j, x)
                self._increment((e, False), rate, new[j] - old[j], old[0])
            else:  # rate * (outer(s'_j, s'_i) - outer(s_j, s_i)); the ideal model keeps this arithmetic on every edge
                self._increment((e, False), rate, new[j], new[i], old[j], old[i])
        self.counters["local_updates"] += 1

    def _learned(self, beta: float, eta: list[float] | None = None
                 ) -> tuple[list[tuple[int, bool]], list[int], list[int], list[int], list[float]]:
        """The matrices the local rule writes at this beta and eta (default: the board's): keys, kinds (0: rank 1
        ``outer(s'_R - s_R, s_C)``, 1: ``outer(s'_R, s'_C) - outer(s_R, s_C)``), row and column layers R, C, and
        pulses per unit of increment."""
        keys, kinds, rows, cols, coefs = [], [], [], [], []
        for e, (i, j) in enumerate(self.edges):
            rate = (self._eta if eta is None else eta)[e] / beta
            if rate == 0:
                continue
            if self.untied:  # C-VF: W_e learns outer(ds_j, s_i), B_e outer(ds_i, s_j)
                learned = [((e, False), 0, j, i)] + ([((e, True), 0, i, j)] if i >= 1 else [])
            else:  # tied C-EP; the input is clamped, so out of it the increment is rank 1: outer(ds_j, x)
                learned = [((e, False), 0 if i == 0 else 1, j, i)]
            for key, kind, r, c in learned:
                keys.append(key)
                kinds.append(kind)
                rows.append(r)
                cols.append(c)
                coefs.append(rate / (self._scale[key] * self._device(key).config.dw_min))
        return keys, kinds, rows, cols, coefs

    def _device_arguments(self, keys: list[tuple[int, bool]]) -> tuple:
        """The learned matrices' device arrays for kernels.local_step / relax_learn, from ``ws`` to ``write_sigma``
        (effective matrices flat; the cache holds them: no drift on compiled boards)."""
        devices = [self._device(key) for key in keys]
        arrays = [tuple(a) for a in zip(*(d.kernel_arrays() for d in devices))]
        model, gamma_up, gamma_down, c2c, _, sigma, _ = devices[0].kernel_params()
        return (*arrays, tuple(self._effective(key).ravel() for key in keys), np.array([self._scale[k] for k in keys]),
                tuple(d.c2c_state for d in devices), tuple(d.write_state for d in devices), model, gamma_up, gamma_down,
                c2c, sigma, MAX_PULSE_COUNT, THIN_BOUND)

    def _local_update_compiled(self, old: list[np.ndarray], new: list[np.ndarray], beta: float) -> None:
        """:meth:`_local_update` in one compiled call (kernels.local_step): every learned matrix rounded, fired and
        its cached effective weights refreshed."""
        keys, kinds, rows, cols, coefs = self._learned(beta)
        if keys:
            vectors = [(new[r] - old[r], old[c], _NO_VECTOR, _NO_VECTOR) if kind == 0 else (new[r], new[c], old[r], old[c])
                       for kind, r, c in zip(kinds, rows, cols)]
            self.counters["pulses"] += kernels.local_step(
                self._learn_state, np.array(coefs), np.array(kinds, dtype=np.int64),
                *(tuple(v) for v in zip(*vectors)), *self._device_arguments(keys))
        self.counters["local_updates"] += 1

    def _relax_learn(self, n: int, beta: float) -> list[np.ndarray]:
        """``n`` nudged steps with the local rule after each, in one compiled call (kernels.relax_learn): the
        states and draws of ``n`` times :meth:`_relax` (1) and :meth:`_local_update_compiled`."""
        keys, kinds, rows, cols, coefs = self._learned(beta)
        if not keys:  # every eta 0: nothing to learn
            self.counters["local_updates"] += n
            return self._relax(n)
        flat = np.concatenate(self._states)
        self.counters["pulses"] += kernels.relax_learn(
            n, flat, *self._dynamics_arguments(), self._learn_state, np.array(coefs), np.array(kinds, dtype=np.int64),
            np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64), *self._device_arguments(keys))
        self.counters["local_updates"] += n
        return self._split(flat)

    def _increment(
        self, key: tuple[int, bool], rate: float, a: np.ndarray, b: np.ndarray,
        c: np.ndarray | None = None, d: np.ndarray | None = None,
    ) -> None:
        """Effective-weight increment ``rate * (outer(a, b) - outer(c, d))`` (``rate * outer(a, b)`` without c, d)
        -> device: exact (ideal) or stochastically rounded pulses capped at 127.

        A rank-1 increment on real devices is rounded without forming the matrix (cost follows the pulses). Dense
        increments are built in two per-matrix buffers (no large temporaries), operation for operation the
        arithmetic of the rule written out (``rate * (np.outer(a, b) - np.outer(c, d))``), so ideal devices give
        the same floats as before.
        """
        device = self._device(key)
        scale, ideal = self._scale[key], device.config.ideal
        quantum = scale * device.config.dw_min  # effective weight of one nominal pulse
        if c is None and not ideal:
            self._fire(key, *round_outer(self._learn_state, rate / quantum, a, b, MAX_PULSE_COUNT))
            return
        delta, quanta = self._buffers(key)
        np.multiply.outer(a, b, out=delta)
        if c is not None:
            np.multiply.outer(c, d, out=quanta)
            np.subtract(delta, quanta, out=delta)
        np.multiply(delta, rate, out=delta)
        np.divide(delta, quantum, out=quanta)
        if not ideal:
            self._fire(key, *round_matrix(self._learn_state, quanta, MAX_PULSE_COUNT))
            return
        np.abs(quanta, out=quanta)
        self.counters["pulses"] += int(np.rint(quanta, out=quanta).sum())
        if scale != 1.0:  # x / 1.0 == x: skip the pass
            np.divide(delta, scale, out=delta)
        device.add_exact(delta)
        self._written(key)

    def _buffers(self, key: tuple[int, bool]) -> tuple[np.ndarray, np.ndarray]:
        """Two float64 scratch matrices of ``key``'s shape, kept for the array's life."""
        bufs = self._scratch.get(key)
        if bufs is None:
            shape = self._device(key).shape
            bufs = self._scratch[key] = (np.empty(shape), np.empty(shape))
        return bufs

    def _fire(self, key: tuple[int, bool], flat: np.ndarray, counts: np.ndarray) -> int:
        """Fire checked sparse counts (ascending flat indices, non-zero, |count| <= 127) into matrix ``key``;
        counts the pulses (those sent to stuck devices too, as the board cannot tell) and returns them."""
        if not flat.size:
            return 0
        moved = self._device(key).pulse_flat(flat, counts, self.clock)
        self._written(key, moved)
        fired = int(np.add.reduce(np.abs(counts)))
        self.counters["pulses"] += fired
        return fired

    def apply_pulses(self, edge: int, counts: np.ndarray, feedback: bool = False) -> int:
        """Fire signed pulse counts (|count| <= 127, integer, the matrix's shape); returns pulses fired."""
        key = self._key(edge, feedback)
        flat, values = _counts(counts, self._device(key).shape, MAX_PULSE_COUNT)
        self.counters["pulse_commands"] += 1
        return self._fire(key, flat, values)

    def apply_pulses_sparse(self, edge: int, index: np.ndarray, counts: np.ndarray, feedback: bool = False) -> int:
        """:meth:`apply_pulses` in sparse form: signed counts at flat (row-major) device indices, strictly
        increasing; zero counts allowed. Same physics and counters; the cost follows the devices touched."""
        key = self._key(edge, feedback)
        flat, values = _sparse_counts(index, counts, self._device(key).shape, MAX_PULSE_COUNT)
        self.counters["pulse_commands"] += 1
        return self._fire(key, flat, values)

    def apply_outer(self, edge: int, rows: np.ndarray, cols: np.ndarray, bit_length: int, feedback: bool = False) -> int:
        """Rank-1 update by stochastic pulse trains; returns the number of coincidences (pulses) fired.

        In each of ``bit_length`` slots row i fires with probability |rows_i| and column k with |cols_k|; every
        coincidence is one pulse of sign sign(rows_i cols_k). The expected change is
        ``bit_length * dw_min * outer(rows, cols)`` in device units.
        """
        key = self._key(edge, feedback)
        device = self._device(key)
        rows = _vector(rows, device.shape[0], "outer rows")
        cols = _vector(cols, device.shape[1], "outer cols")
        for name, v in (("rows", rows), ("cols", cols)):
            if np.any(np.abs(v) > 1):
                raise ValueRangeError(f"outer {name} must be in [-1, 1], got {float(np.abs(v).max()):g}")
        bit_length = _index(bit_length, 256, "bit length", low=1)
        row_fires = (self._rng_train.random((bit_length, rows.size)) < np.abs(rows)).astype(np.float32)
        col_fires = (self._rng_train.random((bit_length, cols.size)) < np.abs(cols)).astype(np.float32)
        # (n_rows, n_cols) coincidences, all of one sign per device; float32 counts <= 255 exactly, through BLAS
        coincidences = (row_fires.T @ col_fires).ravel()
        flat = np.flatnonzero(coincidences != 0)
        r, k = np.divmod(flat, cols.size)
        signs = (np.sign(rows[r]) * np.sign(cols[k])).astype(np.int64)  # +-1: a coincidence needs both non-zero
        fired = self._fire(key, flat, coincidences[flat].astype(np.int64) * signs)
        self.counters["outer_commands"] += 1
        self.counters["coincidences"] += fired
        return fired

    def read_weights(self, edge: int, feedback: bool = False) -> np.ndarray:
        """Effective weights (scale * read-visible device weight), float32, ``(n_dst, n_src)`` or transposed for B."""
        return self._effective(self._key(edge, feedback)).astype(np.float32)

    def program_weights(
        self, edge: int, target: np.ndarray, feedback: bool = False, tolerance: float = 0.01, max_iterations: int = 20
    ) -> float:
        """Write-verify: read, pulse towards the target, repeat until max error <= tolerance; returns that error.

        Targets are effective weights; non-ideal devices refuse targets outside ``scale * [w_min, w_max]``.
        """
        key = self._key(edge, feedback)
        device = self._device(key)
        target = _matrix(target, device.shape, "target weights")
        tolerance = _number(tolerance, "tolerance")
        if tolerance <= 0:
            raise ValueRangeError(f"tolerance must be > 0, got {tolerance!r}")
        max_iterations = _index(max_iterations, 1001, "max_iterations", low=1)
        scale, cfg = self._scale[key], device.config
        goal = target / scale
        if not cfg.ideal and (goal.max() > cfg.w_max or goal.min() < cfg.w_min):
            raise ValueRangeError(
                f"target weights [{target.min():g}, {target.max():g}] outside the programmable range "
                f"[{scale * cfg.w_min:g}, {scale * cfg.w_max:g}] (scale {scale:g})"
            )
        self.counters["program_commands"] += 1
        if cfg.ideal:
            device.set_exact(goal)
        else:
            # per-device step estimate, learnt from each device's measured response (slow devices get more pulses)
            step = np.full(device.shape, cfg.dw_min)
            read = device.visible(self.clock)
            for _ in range(max_iterations):
                error = goal - read
                if np.abs(error).max() * scale <= tolerance:
                    break
                outside = np.abs(error) * scale > tolerance / 2
                counts = np.clip(np.rint(error / step), -MAX_PULSE_COUNT, MAX_PULSE_COUNT) * outside
                counts = counts.astype(np.int64)
                device.pulse(counts, self.clock)
                self.counters["pulses"] += int(np.abs(counts).sum())
                before, read = read, device.visible(self.clock)
                moved = np.abs(counts) >= 4  # enough pulses for a usable estimate despite c2c noise
                measured = np.abs(read - before)[moved] / np.abs(counts[moved])
                step[moved] = np.clip(0.5 * step[moved] + 0.5 * measured, 0.02 * cfg.dw_min, 5 * cfg.dw_min)
        self._written(key)
        return float(np.abs(self._effective(key) - target).max())

    # ------------------------------------------------------------------------------------------ sample runner
    def train_sample(self, x: np.ndarray, target: np.ndarray, beta: float, t1: int, t2: int) -> np.ndarray:
        """One on-device learning sample: reset, clamp x, t1 free steps, read the output, then t2 nudged steps in
        target mode with the local rule (current eta; the rule's beta is this ``beta``). Ends in HOLD, nudge off.
        Returns the free-phase output read through the ADC, float32 ``(n_out,)``."""
        x = _vector(x, self.sizes[0], "input")
        self._dac.check(x)
        target = _vector(target, self.sizes[-1], "nudge target")
        beta = _nonzero(beta, "beta")
        t1 = _index(t1, MAX_STEPS + 1, "t1")
        t2 = _index(t2, MAX_STEPS + 1, "t2")
        saved = self._learning, self._learn_beta
        self.reset()
        self.set_input(x)
        self.set_phase("FREE")
        self.step(t1)
        free_out = self.read_state(len(self.sizes) - 1)[0]
        self.set_nudge_target(target, beta)
        self.set_phase("NUDGE")
        self._learning, self._learn_beta = True, beta
        try:
            self.step(t2)
        finally:
            self._learning, self._learn_beta = saved
            self.nudge_off()
            self.set_phase("HOLD")
        return free_out

    def infer(self, x: np.ndarray, t1: int) -> np.ndarray:
        """Reset, clamp x, ``t1`` free steps, read the output (ADC), then HOLD. float32 ``(n_out,)``."""
        x = _vector(x, self.sizes[0], "input")
        self._dac.check(x)
        t1 = _index(t1, MAX_STEPS + 1, "t1")
        self.reset()
        self.set_input(x)
        self.set_phase("FREE")
        self.step(t1)
        self.set_phase("HOLD")
        return self.read_state(len(self.sizes) - 1)[0]

    # ---------------------------------------------------------------------------------------------- records
    def describe(self) -> dict:
        """Device model, converters, neuron circuit and topology as a JSON-able dict (for *IDN-style snapshots)."""
        c = self.config
        topo = self.topology()
        topo["edges"] = [list(e) for e in topo["edges"]]
        return {
            "topology": topo,
            "device": asdict(c.device),
            "dac": self._dac.describe(),
            "adc": self._adc.describe(),
            "dt": c.dt,
            "nudge_placement": c.nudge_placement,
            "transimpedance_ohms": c.transimpedance_ohms,
            "compliance_amperes": c.compliance_amperes,
            "init_scale": c.init_scale,
            "seed": c.seed,
        }

    def state_dict(self) -> dict:
        """Deep copy of everything that can change (states, settings, devices, RNG streams, counters, clock):
        two equal state_dicts mean nothing was applied in between."""
        return copy.deepcopy({
            "states": self._states, "phase": self._phase, "nudge": self._nudge, "gain": self._gain,
            "bias": self._bias, "scale": self._scale, "eta": self._eta, "learn_beta": self._learn_beta,
            "learning": self._learning, "clock": self.clock, "counters": self.counters,
            "rng": [r.bit_generator.state for r in (self._rng_train, self._adc.rng)] + [self._learn_state.tolist()],
            "devices": [d.state() for d in self._w] + [d.state() for d in self._b if d is not None],
        })



# ------------------------------------------------------------------------------------- validation helpers
def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: object) -> bool:
    numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    return numeric and bool(np.isfinite(value))


def _choice(value: object, options: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueRangeError(f"{what} must be one of {', '.join(options)}, got {value!r}")
    return value


def _number(value: object, what: str) -> float:
    if not _is_number(value):
        raise ValueRangeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _nonzero(value: object, what: str) -> float:
    value = _number(value, what)
    if value == 0:
        raise ValueRangeError(f"{what} must be non-zero (the rule divides by it)")
    return value


def _index(value: object, stop: int, what: str, low: int = 0) -> int:
    if not _is_int(value) or not low <= int(value) < stop:
        raise ValueRangeError(f"{what} must be an integer in {low}..{stop - 1}, got {value!r}")
    return int(value)


def _matrix(values: object, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A finite real float64 array of exactly ``shape`` (a copy), or ValueRangeError quoting what was wrong."""
    try:
        arr = np.array(values)
    except (TypeError, ValueError) as e:
        raise ValueRangeError(f"{what} is not a numeric array: {e}") from e
    if arr.dtype.kind not in "iuf":
        raise ValueRangeError(f"{what} must be real numbers, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueRangeError(f"{what} must have shape {tuple(shape)}, got {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueRangeError(f"{what} contains NaN or infinity")
    return arr


def _vector(values: object, n: int, what: str) -> np.ndarray:
    return _matrix(values, (n,), what)


def _counts(counts: object, shape: tuple[int, int], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked dense pulse counts in sparse form: (ascending flat indices, non-zero int64 counts)."""
    arr = np.asarray(counts)
    if arr.dtype.kind not in "iu":
        raise ValueRangeError(f"pulse counts must be integers (int8), got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueRangeError(f"pulse counts must have shape {tuple(shape)}, got {arr.shape}")
    flat = np.flatnonzero(arr.ravel() != 0)  # on a boolean mask: several times faster than on int8
    values = arr.ravel()[flat].astype(np.int64)
    _check_cap(values, cap)
    return flat, values


def _sparse_counts(index: object, counts: object, shape: tuple[int, int], cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked sparse pulse counts: strictly increasing flat indices inside ``shape``, integer counts of the same
    length; returns them without the zero counts."""
    size = shape[0] * shape[1]
    idx, arr = np.asarray(index), np.asarray(counts)
    if idx.dtype.kind not in "iu" or arr.dtype.kind not in "iu":
        raise ValueRangeError(f"sparse pulse indices and counts must be integers, got dtypes {idx.dtype}, {arr.dtype}")
    if idx.ndim != 1 or arr.shape != idx.shape:
        raise ValueRangeError(
            f"sparse pulses need 1-d indices and counts of one length, got {idx.shape} and {arr.shape}")
    idx, arr = idx.astype(np.int64), arr.astype(np.int64)
    if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= size or bool(np.any(idx[1:] <= idx[:-1]))):
        raise ValueRangeError(
            f"sparse pulse indices must be strictly increasing in 0..{size - 1}, got {idx[:8].tolist()}")
    _check_cap(arr, cap)
    keep = arr != 0
    return idx[keep], arr[keep]


def _check_cap(values: np.ndarray, cap: int) -> None:
    worst = int(np.abs(values).max(initial=0))
    if worst > cap:
        raise ValueRangeError(f"pulse count {worst} exceeds {cap} per device per command")


def _etas(eta: object, n_edges: int) -> list[float]:
    values = list(eta) if isinstance(eta, (list, tuple, np.ndarray)) else None
    if values is None or len(values) != n_edges:
        raise ValueRangeError(f"eta must be a list of {n_edges} learning rates (one per edge), got {eta!r}")
    out = [_number(v, "eta") for v in values]
    if any(v < 0 for v in out):
        raise ValueRangeError(f"eta must be >= 0 per edge, got {out!r}")
    return out


# ------------------------------------------------------------------------------------------- sim:// queries
_ALIASES = {"device": "model", "dac_range": "dac_range_volts", "adc_range": "adc_range_volts"}
_STRINGS = {"feedback", "activation", "nudge_placement", "model"}


def _query_keys() -> set[str]:
    names = {f.name for f in fields(ArrayConfig)} | {f.name for f in fields(DeviceConfig)}
    return (names - {"device"}) | set(_ALIASES)


def _parse_value(key: str, text: str) -> object:
    if key in _STRINGS:
        return text
    if key == "sizes":
        return [int(v) for v in text.split(",")]
    if key == "skips":
        return [tuple(int(v) for v in pair.split("-", 1)) for pair in text.split(",") if pair] if text else []
    if key in ("dac_bits", "adc_bits"):
        return None if text.lower() in ("", "none", "0") else int(text)
    if key.endswith("_range_volts"):
        lo, hi = text.split(",")
        return (float(lo), float(hi))
    if key == "seed":
        return int(text)
    value = float(text)
    if not np.isfinite(value):
        raise ValueError("not finite")
    return value


def _parse_query(params: dict[str, str]) -> tuple[dict, dict]:
    """Split and parse a query into ArrayConfig and DeviceConfig keyword arguments."""
    device_fields = {f.name for f in fields(DeviceConfig)}
    array_kw: dict = {}
    device_kw: dict = {}
    for raw_key, raw in params.items():
        key = _ALIASES.get(raw_key, raw_key)
        if raw_key not in _query_keys():
            raise ValueRangeError(f"unknown sim:// parameter {raw_key!r}; known: {', '.join(sorted(_query_keys()))}")
        if isinstance(raw, (list, tuple)):
            if len(raw) != 1:
                raise ValueRangeError(f"sim:// parameter {raw_key!r} given {len(raw)} times: {raw!r}")
            raw = raw[0]
        try:
            value = _parse_value(key, str(raw).strip())
        except (TypeError, ValueError) as e:
            raise ValueRangeError(f"bad value {raw!r} for sim:// parameter {raw_key!r}: {e}") from e
        (device_kw if key in device_fields else array_kw)[key] = value
    if "sizes" not in array_kw:
        raise ValueRangeError("sim:// query needs sizes, e.g. sizes=64,256,10")
    return array_kw, device_kw
