"""Learning rules on the software network: EP, C-EP, C-EP's eta -> 0 control, C-VF and FRE-RNN.

Every rule computes a *descent direction* ``d`` per parameter (``d`` approximates ``-dL/dtheta``) and either
applies it once at the end of the nudged phase (EP, the control, FRE) through an optimiser, or at every nudged
step with its per-edge rate (C-EP, C-VF), where the next step already uses the new weights.
Equations: docs/dynamics.md and REFERENCE.md sections 1-3 and 6. Shapes: states ``(batch, n_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from eqprop_hil.engine.dynamics import Dynamics
from eqprop_hil.engine.model import Network
from eqprop_hil.protocols.errors import ValueRangeError

Rule = Literal["ep", "cep", "cep-control", "cvf", "fre", "bp", "bptt"]  # bp, bptt: baselines (hil/engine/baselines.py, hil/engine/bptt.py)
CONTINUAL = ("cep", "cvf")


@dataclass
class RuleConfig:
    """Hyperparameters of a rule; one TOML table ``[rule]``."""

    name: Rule = "cep"
    t1: int = 40  # free-phase steps
    t2: int = 15  # nudged-phase steps
    beta: float = 0.2  # nudge strength (beta_f for FRE)
    beta_sign: Literal["fixed", "random"] = "fixed"  # random: the sign of beta is drawn per minibatch (p = 0.5)
    symmetric: bool = False  # EP only: +beta and -beta phases, update (Phi(+) - Phi(-)) / (2 beta)
    lr: list[float] | float = 0.01  # per edge (input edge first); the C-EP/C-VF per-step eta
    lr_readout: float = 1e-3  # FRE readout
    optimizer: Literal["sgd", "adam"] = "sgd"  # EP, the control and FRE; C-EP/C-VF are per-step SGD by nature
    control_epsilon: float = 1e-6  # cep-control: the tiny fraction of eta applied per step, then undone
    # > 0: every rate (C-EP's per-step eta included) decays smoothly, halving every this many training samples:
    # large early steps, small late ones, so the last epochs average out the noise of the per-sample updates.
    # 0 = constant rates (the papers' setting).
    lr_half_life: int = 0

    def __post_init__(self) -> None:
        if self.t1 < 1 or self.t2 < 1:
            raise ValueRangeError(f"rule.t1 and rule.t2 must be >= 1, got {self.t1}, {self.t2}")
        if self.beta == 0.0:
            raise ValueRangeError("rule.beta must be non-zero (the updates divide by it)")
        if self.name in CONTINUAL and self.optimizer != "sgd":
            raise ValueRangeError(f"rule {self.name!r} updates at every nudged step with its own rate: use optimizer = 'sgd'")
        if self.lr_half_life < 0:
            raise ValueRangeError(f"rule.lr_half_life = {self.lr_half_life}: must be >= 0 samples (0 = constant rates)")
        if self.symmetric and self.name != "ep":
            raise ValueRangeError("symmetric nudging is implemented for rule 'ep' only")
        lrs = [self.lr] if isinstance(self.lr, (int, float)) else list(self.lr)
        if any(not (v >= 0.0) for v in lrs):
            raise ValueRangeError(f"learning rates must be >= 0, got {lrs}")

    def edge_lrs(self, n_edges: int) -> list[float]:
        if isinstance(self.lr, (int, float)):
            return [float(self.lr)] * n_edges
        if len(self.lr) != n_edges:
            raise ValueRangeError(f"rule.lr has {len(self.lr)} rates for {n_edges} edges (one per edge, input first)")
        return [float(v) for v in self.lr]


@dataclass
class BatchResult:
    loss: float  # mean over the batch of the free-phase loss
    correct: int  # free-phase predictions equal to the label
    pred: torch.Tensor  # (batch,) predicted class


def loss_and_pred(net: Network, s: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss (MSE 0.5 |o - y|^2, or cross-entropy for the softmax readout) and the argmax prediction."""
    out = net.output(s)
    if net.Wf is None:
        loss = 0.5 * ((out - y) ** 2).sum(dim=1)
    else:
        loss = -(y * torch.log(out.clamp_min(1e-12))).sum(dim=1)
    return loss, out.argmax(dim=1)


def phi_grads(net: Network, s: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """dPhi/dtheta at ``s``, batch-averaged: ``mean(s_j s_i^T)`` per edge, ``mean(s_k)`` per bias."""
    batch = s[0].shape[0]
    g = {f"W{e}": s[j].T @ s[i] / batch for e, (i, j) in enumerate(net.edges)}
    if net.config.bias:
        g.update({f"b{k}": s[k].mean(dim=0) for k in range(1, len(s))})
    return g


class LearnerBase:
    """What every learner of a rule shares: per-parameter rates, the optimiser, the random-sign generator (both
    checkpointed), applying a direction. The engine (:class:`Learner`) and the oracle
    (:class:`eqprop_hil.engine.reference.ReferenceLearner`) differ only in how they run the phases."""

    def __init__(self, net: Network, config: RuleConfig, *, seed: int = 0) -> None:
        self.net, self.cfg = net, config
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.samples_seen = 0  # training samples so far: the clock of the rate schedule (checkpointed)
        lrs = config.edge_lrs(len(net.edges))
        self.lr = {f"W{e}": lrs[e] for e in range(len(net.edges))}
        self.lr.update({f"B{e}": lrs[e] for e in range(len(net.edges)) if net.B[e] is not None})
        # A layer's bias learns at the rate of the chain edge that feeds it.
        self.lr.update({f"b{k}": lrs[k - 1] for k in range(1, len(net.sizes))})
        self.lr.update({"Wf": config.lr_readout, "bf": config.lr_readout})
        self.base_lr = dict(self.lr)
        params = net.parameters()
        if config.name not in CONTINUAL and config.optimizer == "adam":
            groups = [{"params": [p], "lr": self.lr[name], "name": name} for name, p in params.items()]
            self.optim: torch.optim.Optimizer | None = torch.optim.Adam(groups)
        else:
            self.optim = None

    def set_rate_scale(self, factor: float) -> None:
        """Every rate at ``factor`` times its configured value (the loop's schedule, train.lr_final)."""
        self.lr = {k: v * factor for k, v in self.base_lr.items()}
        if self.optim is not None:
            for group in self.optim.param_groups:
                group["lr"] = self.lr[group["name"]]

    def draw_beta(self) -> float:
        if self.cfg.beta_sign == "random" and torch.rand((), generator=self.gen) < 0.5:
            return -self.cfg.beta
        return self.cfg.beta

    def rate_scale(self) -> float:
        """Factor on every rate now: 0.5 ** (samples seen / ``lr_half_life``), or 1 for constant rates."""
        half_life = self.cfg.lr_half_life
        return 0.5 ** (self.samples_seen / half_life) if half_life else 1.0

    def apply(self, direction: dict[str, torch.Tensor]) -> None:
        """theta += lr * d (SGD), or Adam on the gradient -d (rates times :meth:`rate_scale`)."""
        params, scale = self.net.parameters(), self.rate_scale()
        if self.optim is None:
            for k, d in direction.items():
                params[k].add_(d, alpha=self.lr[k] * scale)
            return
        for group in self.optim.param_groups:
            group["lr"] = self.lr[group["name"]] * scale
        for k, p in params.items():
            p.grad = -direction[k] if k in direction else None
        self.optim.step()
        for p in params.values():
            p.grad = None

    def parameters_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.parameters().items()}

    def load_parameters_from_checkpoint(self, params: dict[str, torch.Tensor]) -> None:
        self.net.load_parameters(params)

    def state_dict(self) -> dict:
        return {
            "generator": self.gen.get_state(),
            "optimizer": self.optim.state_dict() if self.optim is not None else None,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        self.samples_seen = int(state.get("samples_seen", 0))
        if self.optim is not None and state.get("optimizer") is not None:
            self.optim.load_state_dict(state["optimizer"])


class Learner(LearnerBase):
    """Runs one rule on one network with the fused engine (hil/engine/dynamics.py); same updates as the oracle
    (hil/engine/reference.py) to float rounding, several times faster (benchmarks/engine.py)."""

    _CACHE = 3  # batch sizes kept (training batch, last partial batch, evaluation chunk)

    def __init__(self, net: Network, config: RuleConfig, *, seed: int = 0) -> None:
        super().__init__(net, config, seed=seed)
        self._dyn: dict[int, Dynamics] = {}

    def dynamics(self, batch: int) -> Dynamics:
        """The preallocated buffers for this batch size (a few sizes are kept)."""
        dyn = self._dyn.pop(batch, None)
        if dyn is None:
            if len(self._dyn) >= self._CACHE:
                self._dyn.pop(next(iter(self._dyn)))
            dyn = Dynamics(self.net, batch)
        self._dyn[batch] = dyn  # most recently used last
        return dyn

    def _to_net(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.net.device, dtype=self.net.dtype)

    # ---------------------------------------------------------------- phases
    def free(self, x: torch.Tensor) -> list[torch.Tensor]:
        """T1 steps from rest; the state (buffers) stays valid through the nudged phase of the same batch."""
        x = self._to_net(x)
        dyn = self.dynamics(x.shape[0])
        dyn.load_input(x)
        return dyn.run(None, self.cfg.t1, out=dyn.free_state)

    def _dyn_for(self, s: list[torch.Tensor]) -> Dynamics:
        dyn = self.dynamics(s[0].shape[0])
        if s[0] is not dyn.x:  # a state that did not come from this learner's free phase
            dyn.load_input(s[0])
        return dyn

    def nudge_term(self, s: list[torch.Tensor], y: torch.Tensor, beta: float) -> torch.Tensor:
        """beta (y - o_t) for EP; for the FRE readout, beta_f W_f^T (y - p_t) into the top hidden layer."""
        if self.net.Wf is None:
            return beta * (y - s[-1])
        return beta * (y - self.net.output(s)) @ self.net.Wf

    def nudged(self, s: list[torch.Tensor], y: torch.Tensor, beta: float) -> list[torch.Tensor]:
        """T2 nudged steps from ``s`` with fixed weights (the result is a buffer: copy it to keep it)."""
        return self._dyn_for(s).run(s, self.cfg.t2, y=self._to_net(y), beta=beta)

    # ---------------------------------------------------------------- one minibatch
    @torch.no_grad()
    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """x (batch, n_0); y one-hot (batch, n_out)."""
        x, y = self._to_net(x), self._to_net(y)
        s_free = self.free(x)
        loss, pred = loss_and_pred(self.net, s_free, y)
        labels = y.argmax(dim=1)
        beta = self.draw_beta()
        name = self.cfg.name
        if name == "ep":
            self.apply(self.ep_direction(s_free, y, beta))
        elif name in CONTINUAL:
            self.continual(s_free, y, beta, vector_field=name == "cvf")
        elif name == "cep-control":
            self.apply(self.control_direction(s_free, y, beta))
        elif name == "fre":
            self.apply(self.fre_direction(s_free, y, beta))
        else:
            raise ValueRangeError(f"unknown rule {name!r}")
        self.samples_seen += x.shape[0]
        return BatchResult(float(loss.mean()), int((pred == labels).sum()), pred.cpu())

    # ---------------------------------------------------------------- directions
    def _phi_difference(self, s_pos: list[torch.Tensor], s_neg: list[torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
        """(dPhi/dtheta(s_pos) - dPhi/dtheta(s_neg)) / scale, batch-averaged; an edge leaving the (shared) clamped
        input as one product (s_j^+ - s_j^-)^T x."""
        net, batch = self.net, s_pos[0].shape[0]
        c = 1.0 / (scale * batch)
        d: dict[str, torch.Tensor] = {}
        for e, (i, j) in enumerate(net.edges):
            if i == 0:
                d[f"W{e}"] = torch.mm((s_pos[j] - s_neg[j]).t(), s_pos[0]).mul_(c)
            else:
                d[f"W{e}"] = torch.mm(s_pos[j].t(), s_pos[i]).mul_(c).addmm_(s_neg[j].t(), s_neg[i], alpha=-c)
        if net.config.bias:
            d.update({f"b{k}": (s_pos[k] - s_neg[k]).sum(dim=0).mul_(c) for k in range(1, len(s_pos))})
        return d

    def ep_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """(Phi(s^beta) - Phi(s^0)) / beta, or the symmetric (Phi(s^+) - Phi(s^-)) / (2 beta)."""
        s_pos = self.nudged(s_free, y, beta)
        if self.cfg.symmetric:
            s_pos = [t.clone() for t in s_pos]  # the second phase reuses the buffers
            s_neg, scale = self.nudged(s_free, y, -beta), 2.0 * beta
        else:
            s_neg, scale = s_free, beta
        return self._phi_difference(s_pos, s_neg, scale)

    def continual(self, s: list[torch.Tensor], y: torch.Tensor, beta: float, *, vector_field: bool,
                  rate_scale: float = 1.0) -> list[torch.Tensor]:
        """C-EP / C-VF: after every nudged step every parameter moves and the next step uses the new values
        (input edges and biases through the telescoped form, see hil/engine/dynamics.py). Returns s_K."""
        scale = rate_scale * self.rate_scale()
        rates = {k: v * scale for k, v in self.lr.items()}
        return self._dyn_for(s).run(s, self.cfg.t2, y=self._to_net(y), beta=beta,
                                    continual="cvf" if vector_field else "cep", rates=rates)

    def control_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """C-EP's eta -> 0 control: run C-EP with eta * epsilon per step, undo those updates, and return the
        accumulated increment divided by epsilon, which the optimiser then applies once at the full rate.
        The per-step increments telescope, so the accumulated increment is (Phi(s_K) - Phi(s_0)) / beta on the
        slightly perturbed trajectory. It must reproduce EP (the trajectory moves by O(epsilon) only)."""
        params = self.net.parameters()
        saved = {k: p.clone() for k, p in params.items()}
        s_k = self.continual(s_free, y, beta, vector_field=False, rate_scale=self.cfg.control_epsilon)
        for k, p in params.items():
            p.copy_(saved[k])
        return self._phi_difference(s_k, s_free, beta)

    def fre_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """FRE-RNN: (s^nudged - s^free)(s^free)^T per edge, no 1/beta, no rho'; (y - p) s_top^T for the readout."""
        net, batch = self.net, s_free[0].shape[0]
        y = self._to_net(y)
        err = y - net.output(s_free)  # (batch, n_out), from the free state before the nudged phase
        s_n = self.nudged(s_free, y, beta)
        d = {f"W{e}": torch.mm((s_n[j] - s_free[j]).t(), s_free[i]).div_(batch) for e, (i, j) in enumerate(net.edges)}
        if net.config.bias:
            d.update({f"b{k}": (s_n[k] - s_free[k]).mean(dim=0) for k in range(1, len(s_free))})
        if net.Wf is not None:
            d["Wf"] = torch.mm(err.t(), s_free[-1]).div_(batch)
            if net.config.bias:
                d["bf"] = err.mean(dim=0)
        return d

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """Free phase only (as on hardware)."""
        y = self._to_net(y)
        s = self.free(x)
        loss, pred = loss_and_pred(self.net, s, y)
        return BatchResult(float(loss.mean()), int((pred == y.argmax(dim=1)).sum()), pred.cpu())
