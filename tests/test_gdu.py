"""The GDU check: EP / C-EP per-step updates against minus the BPTT per-step gradients, and `hil gdu`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eqprop_hil.cli import main
from eqprop_hil.engine.gdu import agreement, angle_deg, measure, nudged_trajectory
from eqprop_hil.engine.model import Network, NetworkConfig
from eqprop_hil.engine.rules import Learner, RuleConfig


def _linear_net() -> Network:
    """rho = identity with small weights: the free phase contracts to its fixed point (float64 exact)."""
    cfg = NetworkConfig(sizes=[5, 6, 5, 4], activation="identity", init_gain=0.5, skips=[(0, 2)])
    return Network(cfg, seed=0, dtype=torch.float64)


def _batch(n_in: int = 5, n_out: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, n_in, generator=g, dtype=torch.float64)
    return x, torch.nn.functional.one_hot(torch.tensor([0, 2, 3]), n_out).to(torch.float64)


def test_linear_ep_matches_bptt_and_error_shrinks_with_beta():
    net, (x, y) = _linear_net(), _batch()
    coarse = measure(net, x, y, beta=0.02, t1=200, t2=8, eta=[0.0] * 4)
    fine = measure(net, x, y, beta=0.01, t1=200, t2=8, eta=[0.0] * 4)
    assert fine.settings["free_residual"] < 1e-12
    assert set(fine.layers) == {"W0", "W1", "W2", "W3", "b1", "b2", "b3"}
    for table in ("layers", "neurons"):
        for name, m in getattr(fine, table).items():
            ratio = m["rel_error_mean"] / getattr(coarse, table)[name]["rel_error_mean"]
            assert 0.4 < ratio < 0.6, (name, ratio)  # first order in beta
            assert m["rel_error_mean"] < 0.05 and m["angle_deg"] < 2.0, name
            assert m["sign_agreement"] > 0.95, name
    assert fine.angle_deg < 0.5 * coarse.angle_deg + 0.05
    tiny = measure(net, x, y, beta=1e-5, t1=200, t2=8, eta=[0.0] * 4)
    assert tiny.angle_deg < 1e-3
    assert max(m["rel_error_mean"] for m in tiny.layers.values()) < 1e-4


def test_cep_trajectory_is_learner_cep_and_tends_to_ep():
    net = Network(NetworkConfig(sizes=[5, 6, 4], activation="sigmoid4"), seed=3, dtype=torch.float64)
    x, y = _batch()
    eta = [0.02, 0.01]
    before = {k: v.clone() for k, v in net.parameters().items()}
    traj = nudged_trajectory(net, x, y, beta=0.1, t1=30, t2=6, eta=eta)
    assert all(torch.equal(before[k], v) for k, v in net.parameters().items())  # net untouched
    learner = Learner(net, RuleConfig(name="cep", t1=30, t2=6, beta=0.1, lr=eta))
    learner.train_batch(x, y)
    rate = {"W0": 0.02, "W1": 0.01, "b1": 0.02, "b2": 0.01}
    for k, p in net.parameters().items():
        assert torch.allclose(p, before[k] + rate[k] * traj.params[k].sum(dim=0), atol=1e-13), k
    net.load_parameters(before)
    ep = nudged_trajectory(net, x, y, beta=0.1, t1=30, t2=6, eta=[0.0, 0.0])
    slow = nudged_trajectory(net, x, y, beta=0.1, t1=30, t2=6, eta=[1e-7, 1e-7])
    for k in ep.params:
        scale = float(ep.params[k].abs().max())
        assert float((slow.params[k] - ep.params[k]).abs().max()) < 1e-5 * scale, k
        assert float((traj.params[k] - ep.params[k]).abs().max()) > 1e-4 * scale, k  # eta 0.02 visibly differs


def test_agreement_metrics_on_known_values():
    d = torch.tensor([[1.0, 2.0, -1.0], [1.0, 0.0, -1.0]])  # (K=2 steps, 3 components)
    same = agreement(d, d)
    assert same["rel_error_mean"] == 0.0 and same["sign_agreement"] == 1.0 and same["angle_deg"] < 1e-6
    opposite = agreement(-d, d)
    assert opposite["sign_agreement"] == 0.0 and abs(opposite["angle_deg"] - 180.0) < 1e-6
    assert abs(opposite["rel_error_mean"] - 2.0) < 1e-12
    g = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    m = agreement(g, d)
    # component 0: sqrt((1 + 1) / max(4, 2)); 1: sqrt(0 / 4) ... over sum_t: (0 + 0) / max(4, 4) = 0; 2: sqrt(2 / 2)
    expected = [math.sqrt(2 / 4), 0.0, 1.0]
    assert abs(m["rel_error_mean"] - sum(expected) / 3) < 1e-12
    assert abs(m["sign_agreement"] - 2 / 3) < 1e-12
    assert abs(angle_deg(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) - 45.0) < 1e-9
    zero = agreement(torch.zeros(2, 2), torch.zeros(2, 2))
    assert zero["n_compared"] == 0


def test_gdu_refuses_networks_it_does_not_cover():
    net = Network(NetworkConfig(sizes=[5, 6, 4], feedback="untied", psi_deg=30.0), seed=0, dtype=torch.float64)
    x, y = _batch()
    with pytest.raises(ValueError, match="tied networks"):
        nudged_trajectory(net, x, y, beta=0.1, t1=5, t2=3, eta=[0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative rates"):
        nudged_trajectory(_linear_net(), x, y, beta=0.1, t1=5, t2=3, eta=[0.0])


def _tiny_config(tmp_path) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text('[model]\nsizes = [12, 8, 4]\n[rule]\nt1 = 60\nt2 = 6\n[train]\nbatch_size = 2\n', encoding="utf-8")
    return str(path)


def test_hil_gdu_json_in_process(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    rc = main(["gdu", "--preset", "gdu-1h", "--config", _tiny_config(tmp_path), "--eta", "1e-4", "--json",
               "--plot", str(plot), "--seed", "4"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert 0.0 <= report["angle_deg"] < 30.0
    assert set(report["layers"]) == {"W0", "W1"} and report["layers"]["W1"]["edge"] == [1, 2]
    assert {"rel_error_mean", "rel_error_std", "sign_agreement", "angle_deg"} <= set(report["layers"]["W0"])
    assert report["beta"] == 0.01 and report["eta"] == [1e-4, 1e-4] and report["seed"] == 4
    assert report["rule"] == "cep" and report["activation"] == "tanh" and report["batch"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hil_gdu_table_and_bad_preset(tmp_path, capsys):
    rc = main(["gdu", "--config", _tiny_config(tmp_path), "--beta", "0.001", "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "overall" in out and "W0" in out and "s2" in out and "beta 0.001" in out
    assert main(["gdu", "--preset", "no-such-preset", "--no-plot"]) == 1
    assert "no-such-preset" in capsys.readouterr().err
