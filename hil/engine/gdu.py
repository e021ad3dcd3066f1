"""The GDU check: do EP's and C-EP's per-step updates follow minus the per-step BPTT gradients?

C-EP paper, Theorem 1 (REFERENCE.md sections 2 and 5): after a converged free phase, for small beta and eta,
- the normalised neuron updates ``(s_{t+1} - s_t) / beta`` of nudged step ``t`` equal ``-dL/ds_{T-t}``, and
- the normalised parameter updates, ``(Phi_theta(s_{t+1}) - Phi_theta(s_t)) / beta`` for EP (eta = 0) or
  ``(theta_{t+1} - theta_t) / eta`` for C-EP (the weights really move by eta per step), equal ``-(G(t+1) - G(t))``,
  the gradient through the ``t+1``-th last free step (:func:`eqprop_hil.engine.bptt.bptt_oracle`).

:func:`measure` runs both sides on the same network and input and returns the agreement metrics of REFERENCE.md
section 5, per parameter and per neuron layer. Everything is computed in float64 (the updates divide state
differences by a small beta; float32 rounding alone would show up as disagreement). The match is exact as beta,
eta -> 0 for rho = identity; for tanh, whose dynamics ``rho(dPhi/ds)`` are not an exact gradient field, it is
approximate in the hidden layers (section 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from eqprop_hil.engine.bptt import bind, bptt_oracle
from eqprop_hil.engine.model import Network
from eqprop_hil.engine.rules import phi_grads
from eqprop_hil.protocols.errors import ValueRangeError


@dataclass
class Trajectory:
    """Per-step normalised updates of one nudged phase (K = t2 steps)."""

    params: dict[str, torch.Tensor]  # (K, *shape): (theta_{t+1} - theta_t) / eta, or the EP increment for eta = 0
    neuron: list[torch.Tensor | None]  # per layer (K, batch, n_k): (s_{t+1} - s_t) / beta; None for the input


def nudged_trajectory(
    net: Network, x: torch.Tensor, y: torch.Tensor, *, beta: float, t1: int, t2: int, eta: list[float]
) -> Trajectory:
    """Free phase from zero, then ``t2`` nudged steps recording the per-step updates.

    ``eta`` holds one rate per edge (input edge first); a layer's bias moves at the rate of its incoming chain
    edge, as in :class:`eqprop_hil.engine.rules.Learner`. With all rates 0 this is EP's per-step increment
    ``(Phi_theta(s_{t+1}) - Phi_theta(s_t)) / beta``; otherwise C-EP: the step from ``s_t`` uses ``theta_t``, then
    ``theta_{t+1} = theta_t + eta * increment``, and the recorded update is the actual ``(theta_{t+1} - theta_t) / eta``.
    ``net`` is not modified (C-EP moves a copy of its parameters).
    """
    if beta == 0.0:
        raise ValueRangeError("beta must be non-zero: the updates divide by it")
    if len(eta) != len(net.edges) or any(not e >= 0.0 for e in eta):
        raise ValueRangeError(f"eta needs {len(net.edges)} non-negative rates (one per edge), got {eta}")
    if net.Wf is not None or any(b is not None for b in net.B):
        raise ValueRangeError("the GDU check covers tied networks with the output as a state layer (EP / C-EP)")
    rates = {f"W{e}": r for e, r in enumerate(eta)}
    rates.update({f"b{k}": eta[k - 1] for k in range(1, len(net.sizes))})
    view = bind(net, {k: p.detach().clone() for k, p in net.parameters().items()})
    params = view.parameters()
    with torch.no_grad():
        s = view.relax(view.zero_state(x), t1)
        g_prev = phi_grads(view, s)
        steps: dict[str, list[torch.Tensor]] = {k: [] for k in g_prev}
        neuron: list[list[torch.Tensor]] = [[] for _ in s]
        for _ in range(t2):
            s_new = view.step(s, beta * (y - s[-1]))
            g_new = phi_grads(view, s_new)
            for k, g in g_new.items():
                inc = (g - g_prev[k]) / beta
                if rates[k] > 0.0:
                    before = params[k].clone()
                    params[k].add_(inc, alpha=rates[k])
                    inc = (params[k] - before) / rates[k]
                steps[k].append(inc)
            for j in range(1, len(s)):
                neuron[j].append((s_new[j] - s[j]) / beta)
            s, g_prev = s_new, g_new
    return Trajectory(
        {k: torch.stack(v) for k, v in steps.items()},
        [None] + [torch.stack(v) for v in neuron[1:]],
    )


# ------------------------------------------------------------------------------------------------ metrics
def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two flattened tensors, degrees (90 when either is zero)."""
    a, b = a.flatten().double(), b.flatten().double()
    den = float(a.norm() * b.norm())
    if den == 0.0:
        return 90.0
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b) / den))))


def agreement(update: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Metrics of REFERENCE.md section 5 for one parameter (or neuron layer); both ``(K, *shape)``, ``target`` is
    minus the per-step BPTT gradient.

    - ``rel_error_mean`` / ``rel_error_std``: over components, ``sqrt(sum_t (g_t - d_t)^2 / max(sum_t g_t^2,
      sum_t d_t^2))`` (components where both are identically zero are left out; ``n_compared`` counts the rest);
    - ``sign_agreement``: fraction of components where sign(total update) = sign(total target);
    - ``angle_deg``: between the flattened totals (sums over the steps).
    """
    g, d = update.double(), target.double()
    num = ((g - d) ** 2).sum(dim=0).flatten()
    den = torch.maximum((g**2).sum(dim=0), (d**2).sum(dim=0)).flatten()
    ok = den > 0
    rel = torch.sqrt(num[ok] / den[ok])
    g_tot, d_tot = g.sum(dim=0), d.sum(dim=0)
    return {
        "rel_error_mean": float(rel.mean()) if rel.numel() else 0.0,
        "rel_error_std": float(rel.std(unbiased=False)) if rel.numel() else 0.0,
        "sign_agreement": float((torch.sign(g_tot) == torch.sign(d_tot)).double().mean()),
        "angle_deg": angle_deg(g_tot, d_tot),
        "n_compared": int(ok.sum()),
    }


@dataclass
class GduReport:
    """Everything :func:`measure` found; ``to_dict`` is the JSON of ``hil gdu --json``."""

    angle_deg: float  # overall angle, all parameters concatenated
    layers: dict[str, dict]  # per parameter name (W0, W1, b1, ...)
    neurons: dict[str, dict]  # per neuron layer ("s1", "s2", ...)
    settings: dict
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=dict)  # name -> (update, target)

    def to_dict(self) -> dict:
        return {"angle_deg": self.angle_deg, "layers": self.layers, "neurons": self.neurons, **self.settings}


def measure(
    net: Network, x: torch.Tensor, y: torch.Tensor, *, beta: float, t1: int, t2: int, eta: list[float]
) -> GduReport:
    """Compare the nudged phase's per-step updates with minus the BPTT per-step gradients of the same free phase.
    ``net`` is copied to float64 first; it is not modified."""
    net64 = bind(net, {k: p.detach().to(torch.float64) for k, p in net.parameters().items()})
    net64.dtype = torch.float64
    if not net.config.bias:
        net64.b = [None] + [b.detach().to(torch.float64) for b in net.b[1:]]
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    oracle = bptt_oracle(net64, x64, y64, t1, t2)
    traj = nudged_trajectory(net64, x64, y64, beta=beta, t1=t1, t2=t2, eta=eta)
    layers, curves = {}, {}
    for name, upd in traj.params.items():
        target = -oracle.per_step[name]
        layers[name] = agreement(upd, target)
        if name.startswith("W"):
            layers[name]["edge"] = list(net.edges[int(name[1:])])
        curves[name] = (upd, target)
    neurons = {}
    for j in range(1, len(net.sizes)):
        upd, target = traj.neuron[j], -oracle.neuron[j]
        neurons[f"s{j}"] = agreement(upd, target)
        curves[f"s{j}"] = (upd, target)
    names = list(traj.params)
    total_u = torch.cat([traj.params[n].sum(dim=0).flatten() for n in names])
    total_t = torch.cat([-oracle.per_step[n].sum(dim=0).flatten() for n in names])
    settings = {
        "beta": beta, "eta": list(eta), "eta_over_beta": max(eta) / abs(beta), "t1": t1, "t2": t2,
        "sizes": list(net.sizes), "activation": net.config.activation, "batch": int(x.shape[0]),
        "dtype": "float64", "free_residual": oracle.residual, "loss": oracle.loss,
    }
    return GduReport(angle_deg(total_u, total_t), layers, neurons, settings, curves)


def plot_curves(report: GduReport, path: str, *, per_panel: int = 3) -> str:
    """Per-step curves, one panel per parameter and neuron layer: the update (solid) against minus the BPTT
    gradient (dashed, same colour) for the ``per_panel`` components with the largest total target (the ones the
    eye can judge; tiny components are all noise)."""
    from eqprop_hil.runs.plots import new_figure, save_figure

    names = list(report.curves)
    ncols = 2
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = new_figure(ncols, nrows, width_in=4.5, height_in=3.0)
    axes = axes if isinstance(axes, list) else [axes]
    colors = ["C0", "C1", "C2", "C3", "C4"]
    for ax, name in zip(axes, names):
        upd, target = report.curves[name]
        u, d = upd.reshape(upd.shape[0], -1), target.reshape(target.shape[0], -1)
        pick = d.sum(dim=0).abs().topk(min(per_panel, d.shape[1])).indices
        steps = range(u.shape[0])
        for c, idx in enumerate(pick.tolist()):
            col = colors[c % len(colors)]
            ax.plot(steps, u[:, idx].numpy(), color=col, lw=1.5)
            ax.plot(steps, d[:, idx].numpy(), color=col, lw=1.5, ls="--")
        info = report.layers.get(name) or report.neurons.get(name)
        ax.set_title(f"{name}: angle {info['angle_deg']:.1f} deg", fontsize=9)
        ax.set_xlabel("nudged step t")
        ax.set_ylabel("per-step change (neurons)" if name in report.neurons else "per-step update")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    st = report.settings
    rule = "EP" if st.get("rule") == "ep" else "C-EP"
    axes[0].legend(handles=[Line2D([], [], color="k", lw=1.5, label=f"{rule} update"),
                            Line2D([], [], color="k", lw=1.5, ls="--", label="-BPTT gradient")],
                   fontsize=7, loc="best", title=f"{per_panel} largest components", title_fontsize=7)
    sizes = "-".join(map(str, st.get("sizes", [])))
    fig.suptitle(
        f"GDU check {st.get('preset', '')} {sizes} {st.get('activation', '')}: {rule} updates vs -BPTT gradients\n"
        f"beta {st['beta']}, eta/beta {st['eta_over_beta']:.3g}, T1 {st.get('t1')}, T2 {st.get('t2')}, "
        f"seed {st.get('seed')}; overall angle {report.angle_deg:.2f} deg",
        fontsize=9,
    )
    return str(save_figure(fig, path))
