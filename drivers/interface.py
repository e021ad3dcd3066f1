"""The interface a neuron array must offer to be trained by `hil`.

No implementation lives here (as in Bluesky's ``eqprop_hil.protocols.py``): each capability is a small runtime-checkable
Protocol, combined by inheritance into :class:`NeuronArray`. Both drivers (`AnalogBoard` over VISA, `FpgaArray`
over serial) implement all of it; the trainer and the calibration code talk to hardware only through it.

Units: inputs and states in volts, nudge currents in amperes, times in seconds. Weights are *effective* weights,
the number the dynamics of ``docs/dynamics.md`` multiply by, i.e. ``scale_e * (G+ - G-) / G_ref``.
Matrices are addressed by edge index (see ``docs/dynamics.md``) and ``feedback=True`` for the separate feedback
matrix ``B_e`` of an untied board.
"""

from __future__ import annotations

from typing import Literal, Protocol, TypedDict, runtime_checkable

import numpy as np

Phase = Literal["FREE", "NUDGE", "HOLD"]


class Identity(TypedDict):
    """What ``*IDN?`` (or the FPGA's IDENTIFY opcode) says, split into its fields, plus the power-up identity."""

    vendor: str  # e.g. "EQPROP-HIL"
    model: str  # e.g. "ANALOG-EP-1"
    serial: str  # e.g. "SIM0001"
    firmware: str  # e.g. "0.1.0"
    protocol: int  # revision of the wire protocol the firmware speaks, e.g. 2 (the driver refuses others)
    instance: str  # 16 hex digits drawn at random at every power-up: a restarted or swapped board has another


class Topology(TypedDict):
    """The network the hardware is wired as (see docs/dynamics.md)."""

    sizes: list[int]  # neurons per layer, input first: [64, 256, 10]
    edges: list[tuple[int, int]]  # (src, dst) per edge, chain edges first: [(0, 1), (1, 2)]
    feedback: Literal["tied", "untied"]  # untied boards have a separate B_e per edge
    activation: str  # "sigmoid4", "hard_sigmoid", "tanh" or "identity"


class PulseResult(TypedDict):
    """What the instrument reports after applying a pulse command."""

    pulses: int  # total number of device pulses actually fired (sum of |counts|, or coincidences)


@runtime_checkable
class Described(Protocol):
    def identity(self) -> Identity:
        """Who the instrument is: ``{"vendor": "EQPROP-HIL", "model": "ANALOG-EP-1", ...}``."""

    def topology(self) -> Topology:
        """Layer sizes, edges and feedback kind: ``{"sizes": [64, 256, 10], "edges": [(0, 1), (1, 2)], ...}``."""

    def snapshot(self) -> dict:
        """Every setting, for run records: identity, topology, gains, scales, device model, converters, limits."""

    def describe(self) -> dict:
        """The instrument's own description of its physics (JSON), unlike ``snapshot`` which adds the host's view:
        ``{"device": {"model": "soft_bounds", "dw_min": 0.001, "w_max": 0.6, ...}, "dac": {...}, "adc": {...},
        "transimpedance_ohms": 10000.0, ...}``."""


@runtime_checkable
class Driven(Protocol):
    def reset(self) -> None:
        """Return to the power-on state of the dynamics: states 0, phase HOLD, nudge off. Weights are kept."""

    def set_input(self, volts: np.ndarray) -> None:
        """Drive the input layer, shape ``(n_0,)``, volts. Checked against the configured input range first."""

    def set_phase(self, phase: Phase) -> None:
        """FREE runs the dynamics without nudge, NUDGE with it, HOLD freezes the states (the safe phase)."""

    def set_nudge_current(self, amperes: np.ndarray) -> None:
        """Explicit nudge currents into the output neurons, shape ``(n_out,)``, amperes (within compliance)."""

    def set_nudge_target(self, target: np.ndarray, beta: float) -> None:
        """Target mode: the board applies ``beta * (target - o_t)`` itself at every nudged step."""

    def nudge_off(self) -> None:
        """Zero the nudge currents and leave target mode."""

    def set_feedback_gain(self, edge: int, gain: float) -> None:
        """FRE feedback regulation for one edge, 0..1 (1 = standard EP)."""

    def feedback_gain(self, edge: int) -> float:
        """The feedback gain of one edge as the instrument reports it."""

    def set_weight_scale(self, edge: int, scale: float, *, feedback: bool = False) -> None:
        """The weight mapping of one matrix: effective weight = scale * device weight (a calibration output)."""

    def weight_scale(self, edge: int, *, feedback: bool = False) -> float:
        """The weight mapping of one matrix as the instrument reports it."""

    def settle(self, steps: int) -> None:
        """Run ``steps`` steps of the dynamics in the current phase and return once they are done (*OPC?)."""

    def read_state(self, layer: int | None = None) -> list[np.ndarray]:
        """Settled states in volts: every layer (input first) or ``[state of layer]``."""


@runtime_checkable
class Plastic(Protocol):
    def apply_pulses(self, edge: int, counts: np.ndarray, *, feedback: bool = False) -> PulseResult:
        """Fire a signed number of pulses per device, int8 counts of the matrix's shape (+ potentiates)."""

    def apply_outer(
        self, edge: int, rows: np.ndarray, cols: np.ndarray, bit_length: int, *, feedback: bool = False
    ) -> PulseResult:
        """Rank-1 stochastic pulse trains: row i fires with probability |rows_i|, column k with |cols_k|,
        every coincidence is one pulse of sign sign(rows_i * cols_k); values in [-1, 1]. O(rows + cols) bytes."""

    def set_local_learning(self, enabled: bool, eta: list[float] | None = None, beta: float | None = None) -> None:
        """On-device C-EP (tied) or C-VF (untied): the board updates itself at every nudged step."""

    def read_weights(self, edge: int, *, feedback: bool = False) -> np.ndarray:
        """Effective weights of one matrix, float32, shape ``(n_dst, n_src)`` (``(n_src, n_dst)`` for feedback)."""

    def program_weights(
        self, edge: int, weights: np.ndarray, *, feedback: bool = False, tolerance: float = 0.01, max_iterations: int = 20
    ) -> float:
        """Write-verify programming; returns the residual max |W - target| the instrument reports."""


@runtime_checkable
class Fenced(Protocol):
    """Instance fencing: the driver binds to the board's power-up instance id when it opens, and every
    state-changing command carries that id, so a board that restarted (or was swapped) refuses it with
    :class:`~eqprop_hil.drivers.errors.InstanceChanged` even when a bridge hid the restart from the link."""

    def instance_id(self) -> str:
        """The instance id the board reports now (a fresh query): ``"9f2c4e1a07b3d5c8"``."""

    @property
    def bound_instance(self) -> str:
        """The instance id this driver fences its commands with (set at open, changed only by rebind)."""

    def rebind_instance(self) -> str:
        """Bind to the board's current instance and return its id. Call it only after the weights the run needs
        were re-programmed (or deliberately, for a fresh run); never to silence an InstanceChanged."""


@runtime_checkable
class NeuronArray(Described, Driven, Plastic, Fenced, Protocol):
    """Everything the trainer needs; usable as a context manager that closes the link (and leaves HOLD)."""

    def close(self) -> None:
        """Leave the instrument safe (HOLD, nudge off, inputs 0) and release the link."""

    def __enter__(self) -> "NeuronArray": ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class SampleRunner(Protocol):
    """Optional: one round trip per training sample (the FPGA's TRAIN_SAMPLE opcode, the board's LEARN:SAMPle).

    Differs from driving the phases by hand in that the instrument runs free phase, nudged phase and its local
    updates by itself; the controller only streams inputs and targets.
    """

    def train_sample(self, volts: np.ndarray, target: np.ndarray, beta: float, t1: int, t2: int) -> np.ndarray:
        """Run one local-learning sample; returns the output layer's free-phase state, volts, ``(n_out,)``."""

    def infer(self, volts: np.ndarray, t1: int) -> np.ndarray:
        """Reset states, clamp the input, run ``t1`` free steps; returns the output state, volts, ``(n_out,)``."""


class PulseUpdate(TypedDict, total=False):
    """One matrix's update inside a compound step (:meth:`StepRunner.step`). Either ``counts`` (matrix mode) or
    ``rows``/``cols``/``bit_length`` (outer mode)."""

    edge: int  # edge index
    feedback: bool  # True: the separate feedback matrix B_e of an untied board (default False)
    counts: np.ndarray  # int8 signed pulse counts of the matrix's shape; sent sparse (most are 0)
    rows: np.ndarray  # outer mode: row probabilities in [-1, 1], shape (n_dst,)
    cols: np.ndarray  # outer mode: column probabilities in [-1, 1], shape (n_src,)
    bit_length: int  # outer mode: length of the stochastic pulse trains


@runtime_checkable
class StepRunner(Protocol):
    """Optional: one round trip per nudged step (analog ``STEP:NUDGed?``-style compound command, FPGA STEP opcode).

    Differs from ``apply_pulses`` + ``settle`` + ``read_state`` in the number of round trips only: the board
    applies every update (checked against the limits first, all or none), counts it as ONE pulse command in its
    executed-command counter, runs ``steps`` steps in the current phase and returns the states. A repeated
    request (same request id / sequence number) is answered from the board's cache, never executed twice.
    """

    def step(self, updates: list[PulseUpdate], steps: int = 1) -> tuple[PulseResult, list[np.ndarray]]:
        """Apply ``updates`` (may be empty), settle ``steps`` steps, return (pulses fired, states of every layer
        in volts, input first)."""
