"""The test oracle: every rule written the straightforward way (simple, obviously right, slow).

Each nudged step calls :meth:`eqprop_hil.engine.model.Network.step` (which recomputes the input projection
``x W_0^T`` from the current weights), computes every edge's dense ``mean(s_j s_i^T)`` and adds the difference to
the weights, exactly as the equations of docs/dynamics.md and REFERENCE.md sections 1-3 and 6 read. Nothing is
preallocated, nothing is telescoped. The fast engine (:class:`eqprop_hil.engine.rules.Learner`) must produce the
same weights to float tolerance (tests/test_engine_oracle.py) and is benchmarked against this class
(benchmarks/engine.py). Same interface as the engine's learner (``train_batch``, ``evaluate``, ``state_dict``), and
the same random-sign stream for a given seed.
"""

from __future__ import annotations

import torch

from eqprop_hil.engine.rules import BatchResult, LearnerBase, loss_and_pred, phi_grads
from eqprop_hil.protocols.errors import ValueRangeError


class ReferenceLearner(LearnerBase):
    """The straightforward implementation of every rule (EP, symmetric EP, C-EP, its eta -> 0 control, C-VF, FRE)."""

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
        self.samples_seen += x.shape[0]
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
        net, batch, scale = self.net, s[0].shape[0], self.rate_scale()
        g_prev = None if vector_field else phi_grads(net, s)
        for _ in range(self.cfg.t2):
            s_new = net.step(s, self.nudge_term(s, y, beta))
            if vector_field:  # post-synaptic change times pre-synaptic activity (REFERENCE.md section 3)
                for e, (i, j) in enumerate(net.edges):
                    c = self.lr[f"W{e}"] * scale / (beta * batch)
                    net.W[e].add_((s_new[j] - s[j]).T @ s[i], alpha=c)
                    if net.B[e] is not None:
                        net.B[e].add_((s_new[i] - s[i]).T @ s[j], alpha=c)
                if net.config.bias:
                    for k in range(1, len(s)):
                        net.b[k].add_((s_new[k] - s[k]).mean(dim=0), alpha=self.lr[f"b{k}"] * scale / beta)
            else:
                g_new = phi_grads(net, s_new)
                params = net.parameters()
                for k, g in g_new.items():
                    params[k].add_(g - g_prev[k], alpha=self.lr[k] * scale / beta)
                g_prev = g_new
            s = s_new

    def control_direction(self, s_free: list[torch.Tensor], y: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """C-EP's eta -> 0 control: run C-EP with eta * epsilon per step, undo those updates, and return the
        accumulated increment divided by epsilon, which the optimiser then applies once at the full rate."""
        eps, params, scale = self.cfg.control_epsilon, self.net.parameters(), self.rate_scale()
        saved = {k: p.clone() for k, p in params.items()}
        acc = {k: torch.zeros_like(p) for k, p in params.items() if k.startswith(("W", "b"))}
        g_prev, s = phi_grads(self.net, s_free), s_free
        for _ in range(self.cfg.t2):
            s = self.net.step(s, self.nudge_term(s, y, beta))
            g_new = phi_grads(self.net, s)
            for k, g in g_new.items():
                inc = (g - g_prev[k]) / beta  # the per-step C-EP direction (rate 1)
                acc[k] += inc
                params[k].add_(inc, alpha=self.lr[k] * eps * scale)
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

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """Free phase only (as on hardware)."""
        s = self.free(x)
        loss, pred = loss_and_pred(self.net, s, y)
        return BatchResult(float(loss.mean()), int((pred == y.argmax(dim=1)).sum()), pred)
