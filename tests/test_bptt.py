"""BPTT through the recurrent dynamics: the oracle's per-step gradients and the BPTT baseline learner."""

from __future__ import annotations

import pytest
import torch

from eqprop_hil.engine.bptt import BPTTLearner, bptt_oracle, free_loss, truncated_gradient
from eqprop_hil.engine.model import Network, NetworkConfig
from eqprop_hil.engine.rules import RuleConfig



@pytest.fixture(autouse=True)
def float64_default():
    """These checks need float64; restore the default so other test modules are not affected."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _data(n_in: int, n_out: int, batch: int, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n_in, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(n_out, (batch,), generator=g), n_out).to(torch.float64)
    return x, y


def _net(**kw) -> Network:
    cfg = dict(sizes=[4, 5, 4, 3], activation="tanh", skips=[(0, 2)], init_gain=1.5)
    cfg.update(kw)
    return Network(NetworkConfig(**cfg), seed=1, dtype=torch.float64)


def _full_gradient(net: Network, x, y, t1: int) -> dict[str, torch.Tensor]:
    """Plain autograd on the whole unrolled free phase, parameters made leaves in place."""
    params = net.parameters()
    for p in params.values():
        p.requires_grad_(True)
    try:
        loss, _, _ = free_loss(net, x, y, t1)
        grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return dict(zip(params, grads))


@pytest.mark.parametrize("kw", [{}, {"readout": "softmax", "sizes": [4, 5, 4, 3]}, {"feedback": "untied", "psi_deg": 40.0}])
def test_oracle_total_is_the_full_autograd_gradient(kw):
    net = _net(**kw)
    x, y = _data(4, 3, batch=3)
    full = _full_gradient(net, x, y, t1=12)
    res = bptt_oracle(net, x, y, t1=12, k=5)
    assert set(res.total) == set(full)
    for name, g in full.items():
        assert torch.allclose(res.total[name], g, atol=1e-12), name
    assert any(float(g.abs().max()) > 1e-3 for g in full.values())


@pytest.mark.parametrize("readout", ["state", "softmax"])
def test_per_step_gradients_are_differences_of_truncated_gradients(readout):
    net = _net(readout=readout)
    x, y = _data(4, 3, batch=2)
    t1, k = 9, 6
    res = bptt_oracle(net, x, y, t1=t1, k=k)
    G = [truncated_gradient(net, x, y, t1, j) for j in range(k + 1)]
    for name in res.per_step:
        for t in range(k):
            assert torch.allclose(res.per_step[name][t], G[t + 1][name] - G[t][name], atol=1e-12), (name, t)
        assert torch.allclose(res.truncated[name], G[k][name], atol=1e-12)
    assert torch.allclose(truncated_gradient(net, x, y, t1, t1)["W0"], res.total["W0"], atol=1e-12)


def test_last_step_gradient_by_hand():
    """G(1): only the last step is differentiated; for o_T = tanh(W1 s1 + W2 x + b3) the loss 0.5 |o - y|^2 gives
    dL/dW1 = mean_b (delta s1_{T-1}^T) with delta = (o_T - y)(1 - o_T^2); hidden-layer parameters get nothing."""
    net = _net()
    x, y = _data(4, 3, batch=3)
    t1 = 7
    with torch.no_grad():
        s_prev = net.relax(net.zero_state(x), t1 - 1)
        s_T = net.step(s_prev)
    delta = (s_T[3] - y) * (1 - s_T[3] ** 2)  # (batch, 3)
    G1 = truncated_gradient(net, x, y, t1, 1)
    assert torch.allclose(G1["W2"], delta.T @ s_prev[2] / 3, atol=1e-12)  # edge (2, 3)
    assert torch.allclose(G1["b3"], delta.mean(dim=0), atol=1e-12)
    for name in ("W0", "W1", "W3", "b1", "b2"):  # W3 is the skip edge (0, 2): it feeds a hidden layer
        assert float(G1[name].abs().max()) == 0.0, name
    res = bptt_oracle(net, x, y, t1=t1, k=3)
    assert torch.allclose(res.per_step["W2"][0], G1["W2"], atol=1e-12)
    assert torch.allclose(res.neuron[3][0], s_T[3] - y, atol=1e-12)  # dL_b/ds_T, per sample
    assert float(res.neuron[1][0].abs().max()) == 0.0


def test_total_gradient_matches_finite_differences():
    net = _net(skips=[])
    x, y = _data(4, 3, batch=2)
    t1 = 10
    res = bptt_oracle(net, x, y, t1=t1, k=4)
    h = 1e-6
    for name, idx in (("W0", (2, 1)), ("W1", (0, 3)), ("W2", (1, 2)), ("b2", (3,))):
        p = net.parameters()[name]
        old = float(p[idx])
        with torch.no_grad():
            p[idx] = old + h
            up = float(free_loss(net, x, y, t1)[0])
            p[idx] = old - h
            down = float(free_loss(net, x, y, t1)[0])
            p[idx] = old
        assert abs((up - down) / (2 * h) - float(res.total[name][idx])) < 1e-7, name


def test_oracle_rejects_bad_truncation():
    net = _net()
    x, y = _data(4, 3, batch=1)
    with pytest.raises(ValueError, match="1 <= k <= t1"):
        bptt_oracle(net, x, y, t1=3, k=4)


def _tiny_problem():
    x, _ = _data(6, 3, batch=12, seed=11)
    labels = torch.arange(12) % 3
    x = x + 0.8 * torch.nn.functional.one_hot(labels, 6)[:, :6].to(torch.float64)
    return x, torch.nn.functional.one_hot(labels, 3).to(torch.float64)


@pytest.mark.parametrize("optimizer,lr", [("sgd", [0.2, 0.1]), ("adam", [0.02, 0.02])])
def test_bptt_learner_reduces_the_loss(optimizer, lr):
    net = Network(NetworkConfig(sizes=[6, 10, 3], activation="sigmoid4"), seed=2, dtype=torch.float64)
    learner = BPTTLearner(net, RuleConfig(name="bptt", t1=15, t2=1, lr=lr, optimizer=optimizer), seed=0)
    x, y = _tiny_problem()
    first = learner.evaluate(x, y).loss
    for _ in range(60):
        learner.train_batch(x, y)
    after = learner.evaluate(x, y)
    assert after.loss < 0.5 * first
    assert after.correct >= 10
    if optimizer == "adam":
        assert learner.state_dict()["optimizer"] is not None


def test_bptt_learner_uses_per_edge_rates():
    net = Network(NetworkConfig(sizes=[6, 10, 3], activation="tanh"), seed=2, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.parameters().items()}
    learner = BPTTLearner(net, RuleConfig(name="bptt", t1=10, t2=1, lr=[0.0, 0.1]), seed=0)
    x, y = _tiny_problem()
    grads, _, _ = learner.gradient(x, y)
    learner.train_batch(x, y)
    after = net.parameters()
    assert torch.equal(after["W0"], before["W0"]) and torch.equal(after["b1"], before["b1"])  # rate 0: input edge
    assert torch.allclose(after["W1"], before["W1"] - 0.1 * grads["W1"], atol=1e-14)
    assert float((after["W1"] - before["W1"]).abs().max()) > 0.0
