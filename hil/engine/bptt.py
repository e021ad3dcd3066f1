"""Backpropagation through time through the network's own recurrent dynamics: a baseline and the GDU oracle.

Two jobs share one trick. The free phase ``s_{t+1} = step(s_t, theta)`` is unrolled for ``T1`` steps from the zero
state with autograd, and the loss (:func:`eqprop_hil.engine.rules.loss_and_pred`) is taken on the final state ``s_T``.

- :class:`BPTTLearner` trains with the full gradient: the "exact gradient of the same dynamics" yardstick that
  EP, C-EP and C-VF approximate (REFERENCE.md section 5).
- :func:`bptt_oracle` gives the per-step gradients that the GDU property (C-EP paper, Theorem 1) compares with
  EP's per-step updates. REFERENCE.md defines ``G(k)``, the gradient when only the last ``k`` steps are
  differentiated (the state ``s_{T-k}`` detached), and the per-step gradient ``G(k+1) - G(k)``. That difference is
  exactly the gradient through the parameters *as used by step k+1 from the end* (the step that produces
  ``s_{T-k}``). So instead of ``k`` backward passes the oracle gives each of the last ``K`` steps its own leaf
  view of the parameters (``detach()``: same storage, no copy), and one backward pass returns every per-step
  gradient at once, plus the remainder through the earlier steps, plus ``dL/ds_{T-t}`` for the retained states.
  :func:`truncated_gradient` computes ``G(k)`` literally (detach, then backward), for checking the fast path.

Indexing used throughout: per-step entry ``t = 0 .. K-1`` is the step that produces ``s_{T-t}``, i.e. the
``t``-th step counted back from the end; it is what nudged step ``t`` of EP approximates (the first nudged step
mirrors the last free step). Losses are batch means, like EP's batch-mean updates; neuron gradients are
per-sample (``dL_b / ds_b``), like EP's per-sample state changes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from eqprop_hil.engine.model import Network
from eqprop_hil.engine.rules import BatchResult, Learner, RuleConfig, loss_and_pred
from eqprop_hil.protocols.errors import ValueRangeError


def bind(net: Network, params: dict[str, torch.Tensor]) -> Network:
    """A shallow copy of ``net`` whose named parameters are replaced by ``params`` (names of
    :meth:`Network.parameters`); topology, activation and config are shared, ``net`` itself is untouched.
    Tied feedback reads ``W`` itself, so a replaced ``W`` carries its feedback role too."""
    view = copy.copy(net)
    view.W = [params.get(f"W{e}", w) for e, w in enumerate(net.W)]
    view.B = [params.get(f"B{e}", b) if b is not None else None for e, b in enumerate(net.B)]
    view.b = [params.get(f"b{k}", b) if b is not None else None for k, b in enumerate(net.b)]
    view.Wf, view.bf = params.get("Wf", net.Wf), params.get("bf", net.bf)
    return view


def _leaves(net: Network) -> dict[str, torch.Tensor]:
    """Fresh autograd leaves sharing the parameters' storage (no copy)."""
    return {name: p.detach().requires_grad_() for name, p in net.parameters().items()}


def free_loss(net: Network, x: torch.Tensor, y: torch.Tensor, t1: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Unroll the free phase from zero (autograd follows whatever requires grad); batch-mean loss, prediction,
    final state."""
    s = net.relax(net.zero_state(x), t1)
    loss, pred = loss_and_pred(net, s, y)
    return loss.mean(), pred, s


# --------------------------------------------------------------------------------------------- the baseline
class BPTTLearner(Learner):
    """BPTT through the free phase, with the rule interface of :class:`eqprop_hil.engine.rules.Learner` (``train_batch``,
    ``evaluate``, ``state_dict``). Per-edge learning rates, SGD or Adam and checkpointing are Learner's own:
    the update is handed to :meth:`Learner.apply` as the descent direction ``-dL/dtheta``."""

    def __init__(self, net: Network, config: RuleConfig, seed: int = 0) -> None:
        super().__init__(net, config, seed=seed)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """dL/dtheta of the batch-mean loss after ``t1`` free steps; also the per-sample loss and prediction."""
        leaves = _leaves(self.net)
        with torch.enable_grad():
            s = bind(self.net, leaves).relax(self.net.zero_state(x), self.cfg.t1)
            loss, pred = loss_and_pred(self.net, s, y)
            grads = torch.autograd.grad(loss.mean(), list(leaves.values()), allow_unused=True)
        out = {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, grads)}
        return out, loss.detach(), pred

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """x (batch, n_0); y one-hot (batch, n_out). Loss and accuracy are those of the free phase before the update."""
        x, y = self._to_net(x), self._to_net(y)
        grads, loss, pred = self.gradient(x, y)
        with torch.no_grad():
            self.apply({k: -g for k, g in grads.items()})
        self.samples_seen += x.shape[0]
        return BatchResult(float(loss.mean()), int((pred == y.argmax(dim=1)).sum()), pred.cpu())


# --------------------------------------------------------------------------------------------- the oracle
@dataclass
class OracleResult:
    """Per-step BPTT gradients of one free phase (shapes in the comments; K = number of per-step entries)."""

    loss: float  # batch-mean loss at s_T
    total: dict[str, torch.Tensor]  # G(T1): the full gradient, same shape as each parameter
    truncated: dict[str, torch.Tensor]  # G(K): gradient through the last K steps (plus any direct readout term)
    per_step: dict[str, torch.Tensor]  # (K, *shape): entry t = G(t+1) - G(t)
    neuron: list[torch.Tensor | None]  # per layer (K, batch, n_k): entry t = dL_b/ds_{T-t}; None for the input
    state: list[torch.Tensor]  # the free state s_T (detached), per layer (batch, n_k)
    residual: float  # max |s_T - s_{T-1}| over the batch: how far the free phase is from its fixed point


def bptt_oracle(net: Network, x: torch.Tensor, y: torch.Tensor, t1: int, k: int) -> OracleResult:
    """Unroll ``t1`` free steps with autograd and return the per-step gradients of the last ``k`` steps
    (REFERENCE.md section 5), in one backward pass. Compute in float64 for the GDU check: the EP side divides
    state differences by a small beta."""
    if not 1 <= k <= t1:
        raise ValueRangeError(f"the oracle needs 1 <= k <= t1, got k = {k}, t1 = {t1}")
    early = _leaves(net)  # the parameters as used by steps 1 .. t1-k (and by the readout)
    late = [_leaves(net) for _ in range(k)]  # late[t]: as used by the step that produces s_{T-t}
    with torch.enable_grad():
        s = bind(net, early).relax(net.zero_state(x), t1 - k)
        kept: list[list[torch.Tensor]] = []  # kept[t] = s_{T-t}
        prev = s
        for t in reversed(range(k)):
            prev, s = s, bind(net, late[t]).step(s)
            kept.insert(0, s)
        loss_b, _ = loss_and_pred(bind(net, early), s, y)
        loss = loss_b.mean()
        names = list(early)
        n_layers = len(s)
        inputs = [early[n] for n in names] + [late[t][n] for t in range(k) for n in names]
        inputs += [kept[t][j] for t in range(k) for j in range(1, n_layers)]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [g.detach() if g is not None else torch.zeros_like(i) for g, i in zip(grads, inputs)]
    n_p = len(names)
    rest = dict(zip(names, grads[:n_p]))
    step_grads = grads[n_p : n_p + k * n_p]
    per_step = {n: torch.stack([step_grads[t * n_p + q] for t in range(k)]) for q, n in enumerate(names)}
    # The readout (FRE) uses theta directly at s_T: that term belongs to G(0), which sits in ``rest`` together with
    # the early steps; recover it from a loss on the detached final state.
    direct = _direct_gradient(net, [v.detach() for v in s], y) if net.Wf is not None else {}
    truncated = {n: per_step[n].sum(dim=0) + direct.get(n, 0.0) for n in names}
    total = {n: per_step[n].sum(dim=0) + rest[n] for n in names}
    batch = x.shape[0]
    neuron_flat = grads[n_p + k * n_p :]
    neuron: list[torch.Tensor | None] = [None] + [
        torch.stack([neuron_flat[t * (n_layers - 1) + (j - 1)] for t in range(k)]) * batch for j in range(1, n_layers)
    ]
    residual = max(float((a - b).detach().abs().max()) for a, b in zip(s[1:], prev[1:]))
    return OracleResult(float(loss.detach()), total, truncated, per_step, neuron, [v.detach() for v in s], residual)


def _direct_gradient(net: Network, s: list[torch.Tensor], y: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = _leaves(net)
    with torch.enable_grad():
        loss, _ = loss_and_pred(bind(net, leaves), s, y)
        grads = torch.autograd.grad(loss.mean(), list(leaves.values()), allow_unused=True)
    return {n: g.detach() for n, g in zip(leaves, grads) if g is not None}


def truncated_gradient(net: Network, x: torch.Tensor, y: torch.Tensor, t1: int, k: int) -> dict[str, torch.Tensor]:
    """G(k) by its definition: run the free phase, detach the state at step ``t1 - k``, differentiate the loss
    through the last ``k`` steps only. ``k`` backward passes of this give what :func:`bptt_oracle` gets from one."""
    if not 0 <= k <= t1:
        raise ValueRangeError(f"truncation needs 0 <= k <= t1, got k = {k}, t1 = {t1}")
    with torch.no_grad():
        s = net.relax(net.zero_state(x), t1 - k)
    leaves = _leaves(net)
    view = bind(net, leaves)
    with torch.enable_grad():
        s = view.relax([v.detach() for v in s], k)
        loss, _ = loss_and_pred(view, s, y)
        if not loss.requires_grad:  # k = 0 without a readout: the loss does not depend on theta, G(0) = 0
            return {n: torch.zeros_like(p) for n, p in leaves.items()}
        grads = torch.autograd.grad(loss.mean(), list(leaves.values()), allow_unused=True)
    return {n: (g.detach() if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, grads)}
