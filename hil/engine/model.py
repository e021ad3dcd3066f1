"""The layered recurrent network of docs/dynamics.md, vectorised over the batch: the software twin of the hardware.

One class holds the parameters and one synchronous step; the learning rules (hil/engine/rules.py) drive it. States are a
list of tensors, one per layer, each ``(batch, n_k)``; ``s[0]`` is the clamped input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from eqprop_hil.protocols.errors import ValueRangeError

Activation = Literal["sigmoid4", "hard_sigmoid", "tanh", "identity"]

ACTIVATIONS = {
    "sigmoid4": lambda u: torch.sigmoid(4.0 * (u - 0.5)),  # C-EP default, states in (0, 1)
    "hard_sigmoid": lambda u: u.clamp(0.0, 1.0),
    "tanh": torch.tanh,
    "identity": lambda u: u,
}


@dataclass
class NetworkConfig:
    """Shape and physics of the network; one TOML table ``[model]``."""

    sizes: list[int]  # neurons per layer, input first; with readout="softmax" the last entry is the readout
    skips: list[tuple[int, int]] = field(default_factory=list)  # extra edges (src, dst), src < dst
    activation: Activation = "sigmoid4"
    gamma: float | list[float] = 1.0  # feedback gain per edge (1 = EP, < 1 = FRE feedback regulation)
    feedback: Literal["tied", "untied"] = "tied"
    psi_deg: float = 0.0  # untied only: initial angle between B and W^T (sign flips with p = (1 - cos psi) / 2)
    bias: bool = True
    init: Literal["uniform", "xavier"] = "uniform"  # uniform: +-gain/sqrt(fan_in) (torch Linear's default)
    init_gain: float = 1.0
    dt: float = 1.0  # 1 = discrete-time steps; < 1 = leaky integration
    nudge_placement: Literal["outside", "inside"] = "outside"
    readout: Literal["state", "softmax"] = "state"  # softmax: FRE-RNN readout outside the recurrent core

    def __post_init__(self) -> None:
        self.sizes = [int(n) for n in self.sizes]
        self.skips = [tuple(int(v) for v in e) for e in self.skips]  # type: ignore[misc]
        if len(self.sizes) < 2 or min(self.sizes) < 1:
            raise ValueRangeError(f"model.sizes needs at least two positive layer sizes, got {self.sizes}")
        if self.readout == "softmax" and len(self.sizes) < 3:
            raise ValueRangeError("a softmax readout needs at least one hidden layer (sizes like [64, 256, 10])")
        n_core = self.n_core
        for i, j in self.skips:
            if not (0 <= i < j < n_core) or j == i + 1:
                raise ValueRangeError(
                    f"skip edge ({i}, {j}) must join two layers of the recurrent core (0..{n_core - 1}) "
                    "with src < dst - 1 (chain edges always exist)"
                )
        if len(set(self.skips)) != len(self.skips):
            raise ValueRangeError(f"duplicate skip edges in {self.skips}")
        gammas = self.gammas()
        if any(not 0.0 <= g <= 1.0 for g in gammas):
            raise ValueRangeError(f"feedback gains must lie in [0, 1], got {gammas}")
        if self.activation not in ACTIVATIONS:
            raise ValueRangeError(f"unknown activation {self.activation!r}; choose from {sorted(ACTIVATIONS)}")
        if not 0.0 < self.dt <= 1.0:
            raise ValueRangeError(f"dt must be in (0, 1], got {self.dt}")
        if not 0.0 <= self.psi_deg <= 180.0:
            raise ValueRangeError(f"psi_deg must be in [0, 180], got {self.psi_deg}")

    @property
    def n_core(self) -> int:
        """Layers that take part in the dynamics (the softmax readout does not)."""
        return len(self.sizes) - (1 if self.readout == "softmax" else 0)

    def edges(self) -> list[tuple[int, int]]:
        """Chain edges first, then skips: the edge index used everywhere (docs/dynamics.md)."""
        return [(k, k + 1) for k in range(self.n_core - 1)] + list(self.skips)

    def gammas(self) -> list[float]:
        n = len(self.edges())
        if isinstance(self.gamma, (int, float)):
            return [float(self.gamma)] * n
        if len(self.gamma) != n:
            raise ValueRangeError(f"model.gamma has {len(self.gamma)} entries for {n} edges {self.edges()}")
        return [float(g) for g in self.gamma]


class Network:
    """Parameters and dynamics. Plain tensors (no nn.Module): the rules update them in place, autograd is used
    only by the BPTT oracle, which asks for ``requires_grad`` itself."""

    def __init__(
        self,
        config: NetworkConfig,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.sizes = config.sizes[: config.n_core]  # dynamic layers, input first
        self.edges = config.edges()
        self.gamma = config.gammas()
        self.rho = ACTIVATIONS[config.activation]
        gen = torch.Generator().manual_seed(seed)
        self.W = [self._init((self.sizes[j], self.sizes[i]), self.sizes[i], gen) for i, j in self.edges]
        # Feedback matrices of untied networks, shape (n_src, n_dst); None for tied edges and input edges.
        self.B: list[torch.Tensor | None] = [None] * len(self.edges)
        if config.feedback == "untied":
            flip_p = (1.0 - math.cos(math.radians(config.psi_deg))) / 2.0
            for e, (i, _) in enumerate(self.edges):
                if i >= 1:
                    sign = torch.where(torch.rand(self.W[e].T.shape, generator=gen) < flip_p, -1.0, 1.0)
                    self.B[e] = (self.W[e].T * sign.to(self.dtype)).contiguous().to(self.device)
        # Biases per layer (index 0, the input, has none). Zero and never learned when bias = False.
        self.b: list[torch.Tensor | None] = [None] + [
            self._init((n,), self._fan_in(k), gen) if config.bias else torch.zeros(n, dtype=dtype, device=self.device)
            for k, n in enumerate(self.sizes) if k >= 1
        ]
        # The FRE readout p = softmax(W_f s_top + b_f), outside the core.
        self.Wf: torch.Tensor | None = None
        self.bf: torch.Tensor | None = None
        if config.readout == "softmax":
            n_top, n_out = self.sizes[-1], config.sizes[-1]
            self.Wf = self._init((n_out, n_top), n_top, gen)
            self.bf = self._init((n_out,), n_top, gen) if config.bias else torch.zeros(n_out, dtype=dtype, device=self.device)
        # Per layer: incoming edges (e, src) and outgoing edges with feedback (e, dst).
        self.into = [[(e, i) for e, (i, j) in enumerate(self.edges) if j == k] for k in range(len(self.sizes))]
        self.back = [[(e, j) for e, (i, j) in enumerate(self.edges) if i == k and k >= 1] for k in range(len(self.sizes))]

    def _fan_in(self, k: int) -> int:
        return sum(self.sizes[i] for i, j in self.edges if j == k)

    def _init(self, shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        if cfg.init == "xavier" and len(shape) == 2:
            bound = cfg.init_gain * math.sqrt(6.0 / (shape[0] + shape[1]))
        else:
            bound = cfg.init_gain / math.sqrt(fan_in)
        t = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        return t.to(dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ dynamics
    def zero_state(self, x: torch.Tensor) -> list[torch.Tensor]:
        """States at rest: the input clamped, every other layer 0. ``x``: (batch, n_0)."""
        batch = x.shape[0]
        return [x] + [torch.zeros(batch, n, dtype=self.dtype, device=self.device) for n in self.sizes[1:]]

    def preactivation(self, s: list[torch.Tensor], k: int) -> torch.Tensor:
        """u_k = sum W s_src + sum gamma F s_dst + b_k, (batch, n_k)."""
        u = self.b[k].expand(s[k].shape[0], -1) if self.b[k] is not None else 0.0
        for e, i in self.into[k]:
            u = u + s[i] @ self.W[e].T
        for e, j in self.back[k]:
            if self.gamma[e] == 0.0:
                continue
            fb = s[j] @ self.W[e] if self.B[e] is None else s[j] @ self.B[e].T
            u = u + self.gamma[e] * fb
        return u

    def step(self, s: list[torch.Tensor], nudge: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One synchronous step from ``s`` (a new list; the input is carried over).

        ``nudge`` (batch, n_top) is the additive term the caller computed from the current state, e.g.
        ``beta * (y - o_t)``; it goes outside rho or inside per ``nudge_placement`` (always inside for the FRE
        readout, where it is an error current into the top hidden layer).
        """
        top = len(self.sizes) - 1
        inside = self.config.nudge_placement == "inside" or self.config.readout == "softmax"
        new = [s[0]]
        for k in range(1, len(self.sizes)):
            u = self.preactivation(s, k)
            if nudge is not None and k == top and inside:
                u = u + nudge
            target = self.rho(u)
            if nudge is not None and k == top and not inside:
                target = target + nudge
            new.append(target if self.config.dt == 1.0 else s[k] + self.config.dt * (target - s[k]))
        return new

    def relax(self, s: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        for _ in range(steps):
            s = self.step(s)
        return s

    @torch.no_grad()
    def settle_steps(self, x: torch.Tensor, *, tol: float = 1e-4, max_steps: int = 1000) -> torch.Tensor:
        """Per sample, (batch,) long: free steps from rest until max |s_{t+1} - s_t| < tol (``max_steps`` if never);
        the figure behind FRE's feedback regulation (fast, stable settling)."""
        s = self.zero_state(x)
        steps = torch.full((x.shape[0],), max_steps, dtype=torch.long)
        pending = torch.ones(x.shape[0], dtype=torch.bool)
        for t in range(1, max_steps + 1):
            new = self.step(s)
            change = torch.stack([(a - b).abs().amax(dim=1) for a, b in zip(new[1:], s[1:])]).amax(dim=0)
            hit = pending & (change < tol)
            steps[hit] = t
            pending &= ~hit
            s = new
            if not bool(pending.any()):
                break
        return steps

    # ------------------------------------------------------------------ readout
    def output(self, s: list[torch.Tensor]) -> torch.Tensor:
        """What the prediction is read from: the output layer, or the softmax readout's probabilities."""
        if self.Wf is None:
            return s[-1]
        return torch.softmax(s[-1] @ self.Wf.T + self.bf, dim=1)

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by a stable name (for checkpoints, comparisons and the oracle)."""
        out = {f"W{e}": w for e, w in enumerate(self.W)}
        out.update({f"B{e}": b for e, b in enumerate(self.B) if b is not None})
        if self.config.bias:
            out.update({f"b{k}": b for k, b in enumerate(self.b) if b is not None})
        if self.Wf is not None:
            out["Wf"] = self.Wf
            out["bf"] = self.bf
        return out

    def load_parameters(self, params: dict[str, torch.Tensor]) -> None:
        """Copy values in place (shapes must match), e.g. weights read back from an instrument."""
        mine = self.parameters()
        unknown = set(params) - set(mine)
        if unknown:
            raise ValueRangeError(f"unknown parameters {sorted(unknown)}; this network has {sorted(mine)}")
        for name, value in params.items():
            if tuple(value.shape) != tuple(mine[name].shape):
                raise ValueRangeError(f"{name}: shape {tuple(value.shape)} != {tuple(mine[name].shape)}")
            mine[name].copy_(value.to(mine[name]))

    def angle_feedback_deg(self) -> float:
        """Angle between all feedback matrices B and W^T together (C-VF's psi); 0 for tied networks."""
        pairs = [(self.B[e], self.W[e].T) for e in range(len(self.edges)) if self.B[e] is not None]
        if not pairs:
            return 0.0
        b = torch.cat([p.flatten() for p, _ in pairs])
        w = torch.cat([q.flatten() for _, q in pairs])
        cos = torch.dot(b, w) / (b.norm() * w.norm())
        return math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))
