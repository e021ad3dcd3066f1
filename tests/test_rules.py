"""The learning rules against values computed by hand and by an independent, loop-based numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eqprop_hil.engine.model import Network, NetworkConfig
from eqprop_hil.engine.rules import Learner, RuleConfig

F64 = torch.float64


def rho_np(name: str, u: np.ndarray) -> np.ndarray:
    return {
        "sigmoid4": lambda v: 1.0 / (1.0 + np.exp(-4.0 * (v - 0.5))),
        "tanh": np.tanh,
        "identity": lambda v: v,
        "hard_sigmoid": lambda v: np.clip(v, 0.0, 1.0),
    }[name](u)


class Ref:
    """A deliberately plain numpy re-implementation of docs/dynamics.md (loops over edges, one sample at a time
    averaged afterwards) to check the vectorised engine against."""

    def __init__(self, net: Network) -> None:
        self.cfg = net.config
        self.edges = list(net.edges)
        self.gamma = list(net.gamma)
        self.W = [w.detach().numpy().copy() for w in net.W]
        self.B = [None if b is None else b.detach().numpy().copy() for b in net.B]
        self.b = [None] + [b.detach().numpy().copy() for b in net.b[1:]]
        self.Wf = None if net.Wf is None else net.Wf.detach().numpy().copy()
        self.bf = None if net.bf is None else net.bf.detach().numpy().copy()
        self.sizes = list(net.sizes)

    def step(self, s: list[np.ndarray], nudge: np.ndarray | None) -> list[np.ndarray]:
        out = [s[0]]
        top = len(s) - 1
        inside = self.cfg.nudge_placement == "inside" or self.cfg.readout == "softmax"
        for k in range(1, len(s)):
            u = self.b[k].copy()
            for e, (i, j) in enumerate(self.edges):
                if j == k:
                    u = u + self.W[e] @ s[i]
                if i == k and i >= 1:
                    F = self.W[e].T if self.B[e] is None else self.B[e]
                    u = u + self.gamma[e] * (F @ s[j])
            if nudge is not None and k == top and inside:
                u = u + nudge
            t = rho_np(self.cfg.activation, u)
            if nudge is not None and k == top and not inside:
                t = t + nudge
            out.append(s[k] + self.cfg.dt * (t - s[k]))
        return out

    def readout(self, s):
        z = self.Wf @ s[-1] + self.bf
        z = np.exp(z - z.max())
        return z / z.sum()

    def nudge(self, s, y, beta):
        if self.Wf is None:
            return beta * (y - s[-1])
        return beta * self.Wf.T @ (y - self.readout(s))

    def free(self, x, t1):
        s = [x] + [np.zeros(n) for n in self.sizes[1:]]
        for _ in range(t1):
            s = self.step(s, None)
        return s


def tiny(activation="sigmoid4", **kw) -> NetworkConfig:
    return NetworkConfig(sizes=[3, 4, 3, 2], skips=[(0, 2), (1, 3)], activation=activation, gamma=[1.0, 0.5, 0.8, 1.0, 0.3], **kw)


def batch(seed=0, n=3, n_in=3, n_out=2):
    g = np.random.default_rng(seed)
    x = g.uniform(0, 1, (n, n_in))
    y = np.eye(n_out)[g.integers(0, n_out, n)]
    return x, y


def test_one_step_by_hand() -> None:
    """A 1-1-1 linear chain worked on paper: W01 = 2, W12 = 3, b1 = 0.5, b2 = -1, gamma = 0.5.
    From s = (x=1, h=0.2, o=0.4): h' = 2*1 + 0.5*3*0.4 + 0.5 = 3.1 ; o' = 3*0.2 - 1 = -0.4;
    with nudge beta (y - o) = 0.1 * (1 - 0.4) = 0.06 outside rho: o' = -0.34."""
    net = Network(NetworkConfig(sizes=[1, 1, 1], activation="identity", gamma=0.5), dtype=torch.float64)
    net.load_parameters({"W0": torch.tensor([[2.0]]), "W1": torch.tensor([[3.0]]), "b1": torch.tensor([0.5]), "b2": torch.tensor([-1.0])})
    s = [torch.tensor([[1.0]], dtype=F64), torch.tensor([[0.2]], dtype=F64), torch.tensor([[0.4]], dtype=F64)]
    new = net.step(s)
    assert new[1].item() == pytest.approx(3.1) and new[2].item() == pytest.approx(-0.4)
    nudged = net.step(s, 0.1 * (torch.tensor([[1.0]], dtype=F64) - s[2]))
    assert nudged[2].item() == pytest.approx(-0.34)


@pytest.mark.parametrize("feedback", ["tied", "untied"])
@pytest.mark.parametrize("placement", ["outside", "inside"])
@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_step_matches_reference(feedback, placement, dt) -> None:
    cfg = tiny(feedback=feedback, psi_deg=60.0 if feedback == "untied" else 0.0, nudge_placement=placement, dt=dt)
    net = Network(cfg, seed=3, dtype=torch.float64)
    ref = Ref(net)
    x, y = batch()
    s = net.zero_state(torch.tensor(x))
    rs = [[x[b]] + [np.zeros(n) for n in net.sizes[1:]] for b in range(len(x))]
    for t in range(6):
        nudge = 0.3 * (torch.tensor(y) - s[-1]) if t >= 3 else None
        s = net.step(s, nudge)
        rs = [ref.step(r, ref.nudge(r, y[b], 0.3) if t >= 3 else None) for b, r in enumerate(rs)]
    for k in range(1, len(s)):
        np.testing.assert_allclose(s[k].numpy(), np.stack([r[k] for r in rs]), rtol=1e-12, atol=1e-12)


def ref_phi(ref: Ref, states: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    g = {f"W{e}": np.mean([np.outer(s[j], s[i]) for s in states], axis=0) for e, (i, j) in enumerate(ref.edges)}
    g.update({f"b{k}": np.mean([s[k] for s in states], axis=0) for k in range(1, len(ref.sizes))})
    return g


def run_rule(cfg: NetworkConfig, rule: RuleConfig, seed=1):
    net = Network(cfg, seed=seed, dtype=torch.float64)
    ref = Ref(net)
    before = {k: v.clone() for k, v in net.parameters().items()}
    x, y = batch(seed)
    Learner(net, rule, seed=0).train_batch(torch.tensor(x), torch.tensor(y))
    after = net.parameters()
    return ref, before, after, x, y


def test_ep_update_matches_reference() -> None:
    rule = RuleConfig(name="ep", t1=12, t2=5, beta=0.2, lr=[0.1, 0.2, 0.3, 0.4, 0.5])
    ref, before, after, x, y = run_rule(tiny(), rule)
    free = [ref.free(x[b], rule.t1) for b in range(len(x))]
    nudged = []
    for b, s in enumerate(free):
        for _ in range(rule.t2):
            s = ref.step(s, ref.nudge(s, y[b], rule.beta))
        nudged.append(s)
    g0, gb = ref_phi(ref, free), ref_phi(ref, nudged)
    lrs = rule.edge_lrs(5)
    for e in range(5):
        expected = before[f"W{e}"].numpy() + lrs[e] * (gb[f"W{e}"] - g0[f"W{e}"]) / rule.beta
        np.testing.assert_allclose(after[f"W{e}"].numpy(), expected, rtol=1e-10, atol=1e-12)
    # the bias of layer k learns at the rate of the chain edge feeding it
    for k in (1, 2, 3):
        expected = before[f"b{k}"].numpy() + lrs[k - 1] * (gb[f"b{k}"] - g0[f"b{k}"]) / rule.beta
        np.testing.assert_allclose(after[f"b{k}"].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_symmetric_ep_matches_reference() -> None:
    rule = RuleConfig(name="ep", t1=10, t2=4, beta=0.3, lr=0.05, symmetric=True)
    ref, before, after, x, y = run_rule(tiny(), rule)
    free = [ref.free(x[b], rule.t1) for b in range(len(x))]

    def nudged(sign):
        out = []
        for b, s in enumerate(free):
            for _ in range(rule.t2):
                s = ref.step(s, ref.nudge(s, y[b], sign * rule.beta))
            out.append(s)
        return ref_phi(ref, out)

    gp, gm = nudged(1.0), nudged(-1.0)
    expected = before["W1"].numpy() + 0.05 * (gp["W1"] - gm["W1"]) / (2 * rule.beta)
    np.testing.assert_allclose(after["W1"].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_cep_updates_at_every_step_with_current_weights() -> None:
    rule = RuleConfig(name="cep", t1=12, t2=5, beta=0.2, lr=[0.3, 0.2, 0.1, 0.4, 0.5])
    cfg = tiny()
    ref, before, after, x, y = run_rule(cfg, rule)
    lrs = rule.edge_lrs(5)
    states = [ref.free(x[b], rule.t1) for b in range(len(x))]
    for _ in range(rule.t2):
        new = [ref.step(s, ref.nudge(s, y[b], rule.beta)) for b, s in enumerate(states)]
        g_old, g_new = ref_phi(ref, states), ref_phi(ref, new)
        for e in range(5):  # the reference's own weights move, so its next step uses them
            ref.W[e] = ref.W[e] + lrs[e] / rule.beta * (g_new[f"W{e}"] - g_old[f"W{e}"])
        for k in (1, 2, 3):
            ref.b[k] = ref.b[k] + lrs[k - 1] / rule.beta * (g_new[f"b{k}"] - g_old[f"b{k}"])
        states = new
    for e in range(5):
        np.testing.assert_allclose(after[f"W{e}"].numpy(), ref.W[e], rtol=1e-10, atol=1e-12)
    for k in (1, 2, 3):
        np.testing.assert_allclose(after[f"b{k}"].numpy(), ref.b[k], rtol=1e-10, atol=1e-12)
    # and C-EP is not EP: the moving weights changed the trajectory
    ep_ref, _, ep_after, _, _ = run_rule(cfg, RuleConfig(name="ep", t1=12, t2=5, beta=0.2, lr=[0.3, 0.2, 0.1, 0.4, 0.5]))
    assert not np.allclose(ep_after["W0"].numpy(), after["W0"].numpy(), rtol=0, atol=1e-9)


def test_cvf_updates_post_times_pre() -> None:
    cfg = tiny(feedback="untied", psi_deg=45.0)
    rule = RuleConfig(name="cvf", t1=10, t2=4, beta=0.25, lr=[0.2, 0.1, 0.05, 0.3, 0.1])
    ref, before, after, x, y = run_rule(cfg, rule)
    lrs = rule.edge_lrs(5)
    states = [ref.free(x[b], rule.t1) for b in range(len(x))]
    for _ in range(rule.t2):
        new = [ref.step(s, ref.nudge(s, y[b], rule.beta)) for b, s in enumerate(states)]
        for e, (i, j) in enumerate(ref.edges):
            c = lrs[e] / rule.beta
            dW = np.mean([np.outer(n[j] - s[j], s[i]) for s, n in zip(states, new)], axis=0)
            ref.W[e] = ref.W[e] + c * dW
            if ref.B[e] is not None:
                dB = np.mean([np.outer(n[i] - s[i], s[j]) for s, n in zip(states, new)], axis=0)
                ref.B[e] = ref.B[e] + c * dB
        for k in (1, 2, 3):
            ref.b[k] = ref.b[k] + lrs[k - 1] / rule.beta * np.mean([n[k] - s[k] for s, n in zip(states, new)], axis=0)
        states = new
    for e in range(5):
        np.testing.assert_allclose(after[f"W{e}"].numpy(), ref.W[e], rtol=1e-10, atol=1e-12)
        if ref.B[e] is not None:
            np.testing.assert_allclose(after[f"B{e}"].numpy(), ref.B[e], rtol=1e-10, atol=1e-12)


def test_cep_control_reproduces_ep() -> None:
    """C-EP's eta -> 0 control (tiny per-step updates, undone, then applied once at full rate) equals EP."""
    cfg = tiny()
    lr = [0.3, 0.2, 0.1, 0.4, 0.5]
    _, _, ep_after, _, _ = run_rule(cfg, RuleConfig(name="ep", t1=12, t2=6, beta=0.2, lr=lr))
    _, _, ctl_after, _, _ = run_rule(cfg, RuleConfig(name="cep-control", t1=12, t2=6, beta=0.2, lr=lr, control_epsilon=1e-9))
    for k in ep_after:
        np.testing.assert_allclose(ctl_after[k].numpy(), ep_after[k].numpy(), rtol=1e-8, atol=1e-10)


def test_fre_rule_matches_reference() -> None:
    cfg = NetworkConfig(sizes=[3, 5, 4, 2], skips=[(0, 2)], activation="tanh", gamma=0.1, readout="softmax")
    rule = RuleConfig(name="fre", t1=8, t2=4, beta=0.1, lr=[0.1, 0.2, 0.3], lr_readout=0.05, optimizer="sgd")
    ref, before, after, x, y = run_rule(cfg, rule)
    free = [ref.free(x[b], rule.t1) for b in range(len(x))]
    nudged = []
    for b, s in enumerate(free):
        for _ in range(rule.t2):
            s = ref.step(s, ref.nudge(s, y[b], rule.beta))
        nudged.append(s)
    for e, (i, j) in enumerate(ref.edges):
        d = np.mean([np.outer(n[j] - f[j], f[i]) for f, n in zip(free, nudged)], axis=0)
        np.testing.assert_allclose(after[f"W{e}"].numpy(), before[f"W{e}"].numpy() + rule.lr[e] * d, rtol=1e-10, atol=1e-12)
    dWf = np.mean([np.outer(y[b] - ref.readout(f), f[-1]) for b, f in enumerate(free)], axis=0)
    np.testing.assert_allclose(after["Wf"].numpy(), before["Wf"].numpy() + 0.05 * dWf, rtol=1e-10, atol=1e-12)


def test_adam_applies_minus_direction_as_gradient() -> None:
    cfg = tiny()
    net = Network(cfg, seed=2, dtype=torch.float64)
    learner = Learner(net, RuleConfig(name="ep", t1=6, t2=3, beta=0.2, lr=0.01, optimizer="adam"))
    twin = {k: v.clone().requires_grad_(False) for k, v in net.parameters().items()}
    x, y = batch(4)
    d = learner.ep_direction(learner.free(torch.tensor(x)), torch.tensor(y), 0.2)
    learner.apply(d)
    opt = torch.optim.Adam([twin[k] for k in twin], lr=0.01)
    for k in twin:
        twin[k].grad = -d[k]
    opt.step()
    for k, v in net.parameters().items():
        np.testing.assert_allclose(v.numpy(), twin[k].numpy(), rtol=1e-12)
        assert not torch.equal(v, twin[k] + 1)  # the update did something (sanity)


def test_random_beta_sign_is_seeded_and_takes_both_signs() -> None:
    net = Network(tiny(), seed=0, dtype=torch.float64)
    a = Learner(net, RuleConfig(name="ep", beta=0.2, beta_sign="random"), seed=5)
    b = Learner(net, RuleConfig(name="ep", beta=0.2, beta_sign="random"), seed=5)
    sa, sb = [a.draw_beta() for _ in range(64)], [b.draw_beta() for _ in range(64)]
    assert sa == sb and set(sa) == {0.2, -0.2}


def test_untied_initial_angle_follows_psi() -> None:
    cfg = NetworkConfig(sizes=[20, 200, 200, 10], feedback="untied", psi_deg=60.0)
    net = Network(cfg, seed=0)
    # sign flips with p = (1 - cos psi)/2 give E[cos] = cos psi, for large matrices
    assert net.angle_feedback_deg() == pytest.approx(60.0, abs=3.0)
    assert Network(NetworkConfig(sizes=[4, 5, 3], feedback="untied", psi_deg=0.0)).angle_feedback_deg() == pytest.approx(0.0, abs=1e-4)
