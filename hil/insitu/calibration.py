"""The calibration file: what `hil calibrate` measured and `hil train --calibration FILE` uses.

A versioned JSON document (human-readable figures, fits and recommendations) plus an ``.npz`` sidecar with the
per-device arrays (step sizes up and down), loaded with ``allow_pickle=False``. Without a file, training uses
the instrument's nominal device parameters (its own description) and the default weight mapping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eqprop_hil.protocols.errors import EqpropError

FORMAT = "eqprop-hil-calibration"
VERSION = 1


class CalibrationError(EqpropError, ValueError):
    """A calibration file that is missing, of another format or version, or inconsistent with the instrument."""


@dataclass
class EdgeCalibration:
    """One matrix (edge ``edge``, forward or feedback) of the instrument."""

    edge: int
    feedback: bool
    scale: float  # effective weight = scale * device weight: the weight mapping (a calibration output)
    dw_up: float  # median step of one potentiating pulse, device units
    dw_down: float  # median step of one depressing pulse (positive number), device units
    w_max: float = math.inf  # median upper bound, device units
    w_min: float = -math.inf
    fit_r2: float = float("nan")  # goodness of the soft-bounds fit
    per_device: dict[str, np.ndarray] = field(default_factory=dict)  # "dw_up", "dw_down": (n_dst, n_src)

    def step_arrays(self, shape: tuple[int, int]) -> tuple[np.ndarray | float, np.ndarray | float]:
        """Per-device (or median) step sizes in *effective weight* units, for turning increments into pulses."""
        up = self.per_device.get("dw_up", self.dw_up)
        down = self.per_device.get("dw_down", self.dw_down)
        for name, arr in (("dw_up", up), ("dw_down", down)):
            if isinstance(arr, np.ndarray) and arr.shape != shape:
                raise CalibrationError(f"edge {self.edge}: {name} has shape {arr.shape}, the matrix is {shape}")
        return np.multiply(up, self.scale), np.multiply(down, self.scale)


@dataclass
class Calibration:
    instrument: dict[str, Any]  # identity of the instrument it was measured on
    topology: dict[str, Any]
    edges: list[EdgeCalibration]
    settle_steps: int = 0  # free steps to settle within settle_tolerance (0 = not measured)
    settle_tolerance: float = 1e-4
    recommended_gain: float | None = None  # FRE feedback gain from the sweep
    converters: dict[str, Any] = field(default_factory=dict)  # gain/offset per neuron, ADC/DAC figures
    report: dict[str, Any] = field(default_factory=dict)  # everything else measured (sweeps, fits, errors)

    def edge(self, e: int, feedback: bool = False) -> EdgeCalibration:
        for c in self.edges:
            if c.edge == e and c.feedback == feedback:
                return c
        raise CalibrationError(f"calibration has no entry for edge {e} ({'feedback' if feedback else 'forward'})")

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"e{c.edge}{'b' if c.feedback else 'f'}_{k}": v for c in self.edges for k, v in c.per_device.items()}
        sidecar = path.with_suffix(".npz")
        if arrays:
            np.savez_compressed(sidecar, **arrays)
        doc = {
            "format": FORMAT, "version": VERSION, "instrument": self.instrument, "topology": self.topology,
            "arrays": sidecar.name if arrays else None,
            "edges": [{k: v for k, v in asdict(c).items() if k != "per_device"} | {"per_device": sorted(c.per_device)} for c in self.edges],
            "settle_steps": self.settle_steps, "settle_tolerance": self.settle_tolerance,
            "recommended_gain": self.recommended_gain, "converters": self.converters, "report": self.report,
        }
        path.write_text(json.dumps(_finite(doc), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise CalibrationError(f"calibration file {str(path)!r} does not exist; run `hil calibrate` first") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationError(f"calibration file {str(path)!r} is not JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CalibrationError(f"{str(path)!r} is not an eqprop-hil calibration file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
        if doc.get("version") != VERSION:
            raise CalibrationError(f"{str(path)!r} has calibration version {doc.get('version')!r}; this code reads {VERSION}")
        arrays: dict[str, np.ndarray] = {}
        if doc.get("arrays"):
            sidecar = path.parent / doc["arrays"]
            try:
                with np.load(sidecar, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise CalibrationError(f"per-device arrays {str(sidecar)!r} unreadable: {e}") from e
        edges = []
        try:
            for d in doc["edges"]:
                names = d.pop("per_device", [])
                tag = f"e{d['edge']}{'b' if d['feedback'] else 'f'}_"
                per = {n: arrays[tag + n] for n in names}
                edges.append(EdgeCalibration(**{k: (math.nan if v is None else v) for k, v in d.items()}, per_device=per))
            return cls(
                instrument=doc["instrument"], topology=doc["topology"], edges=edges,
                settle_steps=int(doc.get("settle_steps", 0)), settle_tolerance=float(doc.get("settle_tolerance", 1e-4)),
                recommended_gain=doc.get("recommended_gain"), converters=doc.get("converters", {}),
                report=doc.get("report", {}),
            )
        except (KeyError, TypeError) as e:
            raise CalibrationError(f"calibration file {str(path)!r} is incomplete: {e!r}") from e

    def check_topology(self, topology: dict[str, Any]) -> None:
        mine = (list(self.topology.get("sizes", [])), [list(e) for e in self.topology.get("edges", [])])
        theirs = (list(topology["sizes"]), [list(e) for e in topology["edges"]])
        if mine != theirs:
            raise CalibrationError(f"calibration was measured on topology {mine}, the instrument has {theirs}")


def _finite(obj: Any) -> Any:
    """JSON has no infinities or NaN: store them as None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _finite(obj.item())
    return obj
