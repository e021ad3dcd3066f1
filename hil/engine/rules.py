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

    def __post_init__(self) -> None:
        if self.t1 < 1 or self.t2 < 1:
            raise ValueRangeError(f"rule.t1 and rule.t2 must be >= 1, got {self.t1}, {self.t2}")
        if self.beta == 0.0:
            raise ValueRangeError("rule.beta must be non-zero (the updates divide by it)")
        if self.name in CONTINUAL and self.optimizer != "sgd":
            raise ValueRangeError(f"rule {self.name!r} updates at every nudged step with its own rate: use optimizer = 'sgd'")
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


class Learner:
    """Runs one rule on one network; holds the optimiser and the random-sign generator (both checkpointed)."""

    def __init__(self, net: Network, config: RuleConfig, *, seed: int = 0) -> None:
        self.net, self.cfg = net, config
        self.gen = torch.Generator().manual_seed(seed + 7919)
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

    # ---------------------------------------------------------------- phases
    def free(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.relax(self.net.zero_state(x), self.cfg.t1)

    def nudge_term(self, s: list[torch.Tensor], y: torch.Tensor, beta: float) -> torch.Tensor:
        """beta (y - o_t) for EP; for the FRE readout, beta_f W_f^T (y - p_t) into the top hidden layer."""
        if self.net.Wf is None:
            return beta * (y - s[-1])
        return beta * (y - self.net.output(s)) @ self.net.Wf

    def nudged(self, s: list[torch.Tensor], y: torch.Tensor, beta: float) -> list[torch.Tensor]:
        for _ in range(self.cfg.t2):
            s = self.net.step(s, self.nudge_term(s, y, beta))
        return s

    def draw_beta(self) -> float:
        if self.cfg.beta_sign == "random" and torch.rand((), generator=self.gen) < 0.5:
            return -self.cfg.beta
        return self.cfg.beta

    # ---------------------------------------------------------------- one minibatch
    @torch.no_grad()
    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """x (batch, n_0); y one-hot (batch, n_out)."""
        s_free = self.free(x)
        loss, pred = loss_and_pred(self.net, s_free, y)
        labels = y.argmax(dim=1)
        beta = self.draw_beta()
        name = self.cfg.name
        if name == "ep":
            self.apply(self.ep_direction(s_free, y, beta))
        elif name == "cep":
            self.continual(s_free, y, beta, vector_field=False)
        elif name == "cvf":
            self.continual(s_free, y, beta, vector_field=True)
        elif name == "cep-control":
            self.apply(self.control_direction(s_free, y, beta))
        elif name == "fre":
            self.apply(self.fre_direction(s_free, y, beta))
        else:
            raise ValueRangeError(f"unknown rule {name!r}")
        return BatchResult(float(loss.mean()), int((pred == labels).sum()), pred)

    # ---------------------------------------------------------------- directions
    def ep_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """(Phi(s^beta) - Phi(s^0)) / beta, or the symmetric (Phi(s^+) - Phi(s^-)) / (2 beta)."""
        s_pos = self.nudged(s_free, y, beta)
        if self.cfg.symmetric:
            s_neg, scale = self.nudged(s_free, y, -beta), 2.0 * beta
        else:
            s_neg, scale = s_free, beta
        g_pos, g_neg = phi_grads(self.net, s_pos), phi_grads(self.net, s_neg)
        return {k: (g_pos[k] - g_neg[k]) / scale for k in g_pos}

    def continual(self, s: list[torch.Tensor], y: torch.Tensor, beta: float, *, vector_field: bool) -> None:
        """C-EP / C-VF: after every nudged step, update every matrix; the next step uses the new weights."""
        net, batch = self.net, s[0].shape[0]
        g_prev = None if vector_field else phi_grads(net, s)
        for _ in range(self.cfg.t2):
            s_new = net.step(s, self.nudge_term(s, y, beta))
            if vector_field:  # post-synaptic change times pre-synaptic activity (REFERENCE.md section 3)
                for e, (i, j) in enumerate(net.edges):
                    c = self.lr[f"W{e}"] / (beta * batch)
                    net.W[e].add_((s_new[j] - s[j]).T @ s[i], alpha=c)
                    if net.B[e] is not None:
                        net.B[e].add_((s_new[i] - s[i]).T @ s[j], alpha=c)
                if net.config.bias:
                    for k in range(1, len(s)):
                        net.b[k].add_((s_new[k] - s[k]).mean(dim=0), alpha=self.lr[f"b{k}"] / beta)
            else:
                g_new = phi_grads(net, s_new)
                params = net.parameters()
                for k, g in g_new.items():
                    params[k].add_(g - g_prev[k], alpha=self.lr[k] / beta)
                g_prev = g_new
            s = s_new

    def control_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """C-EP's eta -> 0 control: run C-EP with eta * epsilon per step, undo those updates, and return the
        accumulated increment divided by epsilon, which the optimiser then applies once at the full rate.
        It must reproduce EP (the trajectory moves by O(epsilon) only)."""
        eps, params = self.cfg.control_epsilon, self.net.parameters()
        saved = {k: p.clone() for k, p in params.items()}
        acc = {k: torch.zeros_like(p) for k, p in params.items() if k.startswith(("W", "b"))}
        g_prev, s = phi_grads(self.net, s_free), s_free
        for _ in range(self.cfg.t2):
            s = self.net.step(s, self.nudge_term(s, y, beta))
            g_new = phi_grads(self.net, s)
            for k, g in g_new.items():
                inc = (g - g_prev[k]) / beta  # the per-step C-EP direction (rate 1)
                acc[k] += inc
                params[k].add_(inc, alpha=self.lr[k] * eps)
            g_prev = g_new
        for k, p in params.items():
            p.copy_(saved[k])
        return {k: v for k, v in acc.items() if k in g_prev}

    def fre_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """FRE-RNN: (s^nudged - s^free)(s^free)^T per edge, no 1/beta, no rho'; (y - p) s_top^T for the readout."""
        net, batch = self.net, s_free[0].shape[0]
        s_n = self.nudged(s_free, y, beta)
        d = {f"W{e}": (s_n[j] - s_free[j]).T @ s_free[i] / batch for e, (i, j) in enumerate(net.edges)}
        if net.config.bias:
            d.update({f"b{k}": (s_n[k] - s_free[k]).mean(dim=0) for k in range(1, len(s_free))})
        if net.Wf is not None:
            err = y - net.output(s_free)  # (batch, n_out)
            d["Wf"] = err.T @ s_free[-1] / batch
            if net.config.bias:
                d["bf"] = err.mean(dim=0)
        return d

    def apply(self, direction: dict[str, torch.Tensor]) -> None:
        """theta += lr * d (SGD), or Adam on the gradient -d."""
        params = self.net.parameters()
        if self.optim is None:
            for k, d in direction.items():
                params[k].add_(d, alpha=self.lr[k])
            return
        for k, p in params.items():
            p.grad = -direction[k] if k in direction else None
        self.optim.step()
        for p in params.values():
            p.grad = None

    # ---------------------------------------------------------------- evaluation and state
    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """Free phase only (as on hardware)."""
        s = self.free(x)
        loss, pred = loss_and_pred(self.net, s, y)
        return BatchResult(float(loss.mean()), int((pred == y.argmax(dim=1)).sum()), pred)

    def parameters_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.parameters().items()}

    def load_parameters_from_checkpoint(self, params: dict[str, torch.Tensor]) -> None:
        self.net.load_parameters(params)

    def state_dict(self) -> dict:
        return {
            "generator": self.gen.get_state(),
            "optimizer": self.optim.state_dict() if self.optim is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
        if self.optim is not None and state.get("optimizer") is not None:
            self.optim.load_state_dict(state["optimizer"])
