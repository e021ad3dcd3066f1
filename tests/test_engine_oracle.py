"""The fast engine (hil/engine/rules.py + dynamics.py) against the straightforward oracle (hil/engine/reference.py):
the same weights after many batches, for every rule, with skip edges, feedback gains, untied feedback, leaky steps,
both nudge placements, a partial last batch and random beta signs. Plus the run settings the engine reads:
``[train] threads`` and ``[train] device``."""

from __future__ import annotations

import pytest
import torch

from eqprop_hil import config as c
from eqprop_hil.engine.learners import build_learner
from eqprop_hil.engine.model import Network, NetworkConfig
from eqprop_hil.engine.reference import ReferenceLearner
from eqprop_hil.engine.rules import Learner, RuleConfig

SKIPS = [(0, 2), (1, 3)]
GAINS = [1.0, 0.5, 0.8, 1.0, 0.3]  # chain (0,1), (1,2), (2,3), skips (0,2), (1,3)
RATES = [0.1, 0.2, 0.3, 0.4, 0.5]


def _data(n_in: int, n_out: int, batches: int, dtype: torch.dtype, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    for b in range(batches):
        size = 3 if b == batches - 1 else 6  # a partial last batch: a second set of engine buffers
        x = torch.rand(size, n_in, generator=g, dtype=dtype)
        y = torch.nn.functional.one_hot(torch.randint(n_out, (size,), generator=g), n_out).to(dtype)
        yield x, y


def _train_both(cfg: NetworkConfig, rule: RuleConfig, batches: int, dtype=torch.float64):
    nets = Network(cfg, seed=1, dtype=dtype), Network(cfg, seed=1, dtype=dtype)
    init = {k: v.clone() for k, v in nets[0].parameters().items()}
    fast, slow = Learner(nets[0], rule, seed=3), ReferenceLearner(nets[1], rule, seed=3)
    for x, y in _data(cfg.sizes[0], cfg.sizes[-1], batches, dtype):
        a, b = fast.train_batch(x, y), slow.train_batch(x, y)
        assert a.correct == b.correct and torch.equal(a.pred, b.pred)
        assert a.loss == pytest.approx(b.loss, rel=1e-9 if dtype == torch.float64 else 1e-4)
    x, y = next(_data(cfg.sizes[0], cfg.sizes[-1], 1, dtype, seed=9))
    assert torch.equal(fast.evaluate(x, y).pred, slow.evaluate(x, y).pred)
    return init, nets[0].parameters(), nets[1].parameters()


CASES = {
    "ep": (dict(), RuleConfig(name="ep", t1=12, t2=5, beta=0.2, lr=RATES)),
    "ep-symmetric": (dict(), RuleConfig(name="ep", t1=12, t2=5, beta=0.2, lr=RATES, symmetric=True)),
    "ep-random-sign-adam": (dict(), RuleConfig(name="ep", t1=12, t2=5, beta=0.2, lr=0.01, beta_sign="random",
                                               optimizer="adam")),
    "cep": (dict(), RuleConfig(name="cep", t1=12, t2=5, beta=0.2, lr=RATES)),
    "cep-random-sign-inside-leaky-tanh": (dict(nudge_placement="inside", dt=0.5, activation="tanh"),
                                          RuleConfig(name="cep", t1=12, t2=5, beta=0.2, lr=RATES, beta_sign="random")),
    "cep-hard-sigmoid-no-bias": (dict(activation="hard_sigmoid", bias=False),
                                 RuleConfig(name="cep", t1=12, t2=6, beta=0.3, lr=RATES)),
    "cep-control": (dict(), RuleConfig(name="cep-control", t1=12, t2=5, beta=0.2, lr=RATES)),
    "cvf-untied": (dict(feedback="untied", psi_deg=45.0),
                   RuleConfig(name="cvf", t1=12, t2=5, beta=0.2, lr=RATES, beta_sign="random")),
    "cvf-untied-identity-leaky": (dict(feedback="untied", psi_deg=90.0, activation="identity", dt=0.7),
                                  RuleConfig(name="cvf", t1=10, t2=4, beta=0.25, lr=[0.02] * 5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_equals_oracle_after_many_batches(case: str) -> None:
    model, rule = CASES[case]
    cfg = NetworkConfig(sizes=[6, 7, 5, 3], skips=SKIPS, gamma=GAINS, **model)
    init, fast, slow = _train_both(cfg, rule, batches=30)
    for k in slow:
        scale = float(slow[k].abs().max())
        assert float((fast[k] - slow[k]).abs().max()) <= 1e-9 * scale, k
    moved = max(float((slow[k] - init[k]).abs().max()) for k in slow)
    assert moved > 1e-2  # the rule really trained


def test_fre_engine_equals_oracle_with_skips_and_adam() -> None:
    cfg = NetworkConfig(sizes=[6, 7, 5, 4, 3], skips=[(0, 2), (1, 3)], activation="tanh", gamma=0.1, readout="softmax")
    rule = RuleConfig(name="fre", t1=10, t2=6, beta=0.1, lr=1e-2, lr_readout=1e-2, optimizer="adam")
    init, fast, slow = _train_both(cfg, rule, batches=30)
    for k in slow:
        assert float((fast[k] - slow[k]).abs().max()) <= 1e-9 * float(slow[k].abs().max()), k
    assert float((slow["W0"] - init["W0"]).abs().max()) > 1e-2


@pytest.mark.parametrize("rule", ["cep", "cvf"])
def test_float32_engine_is_as_accurate_as_the_float32_oracle(rule: str) -> None:
    """float32 on digit-sized input (784 inputs: where the telescoped input-edge form matters most). Both float32
    implementations are compared with the float64 oracle; the engine's rounding error must not exceed the oracle's
    own by more than a small factor (measured: the engine's is about half the oracle's)."""
    cfg = NetworkConfig(sizes=[784, 32, 10], feedback="untied" if rule == "cvf" else "tied")
    rcfg = RuleConfig(name=rule, t1=20, t2=8, beta=0.2, lr=[0.0056, 0.0028], beta_sign="random")
    runs = {}
    for name, cls, dtype in (("engine32", Learner, torch.float32), ("oracle32", ReferenceLearner, torch.float32),
                             ("oracle64", ReferenceLearner, torch.float64)):
        net = Network(cfg, seed=1, dtype=dtype)
        learner = cls(net, rcfg, seed=3)
        for x, y in _data(784, 10, 20, torch.float64):
            learner.train_batch(x.to(dtype), y.to(dtype))
        runs[name] = {k: v.double() for k, v in net.parameters().items()}
    init = Network(cfg, seed=1, dtype=torch.float64).parameters()
    truth = runs["oracle64"]
    for k in truth:
        change = float((truth[k] - init[k]).abs().max())
        err_engine = float((runs["engine32"][k] - truth[k]).abs().max())
        err_oracle = float((runs["oracle32"][k] - truth[k]).abs().max())
        assert err_engine <= 3.0 * err_oracle + 1e-6 * change, (k, err_engine, err_oracle)
        assert err_engine <= 1e-3 * change, k


def test_engine_state_buffers_do_not_grow_with_the_step_count() -> None:
    """The engine allocates its buffers per batch size, not per step: 10x the steps, the same tensors."""
    cfg = NetworkConfig(sizes=[6, 7, 3])
    sizes = []
    for t in (5, 50):
        learner = Learner(Network(cfg, seed=0), RuleConfig(name="cep", t1=t, t2=t, lr=0.01), seed=0)
        x, y = next(_data(6, 3, 2, torch.float32))
        learner.train_batch(x, y)
        dyn = learner.dynamics(x.shape[0])
        sizes.append(sum(t.numel() for name, v in vars(dyn).items() if isinstance(v, list)
                         for t in v if isinstance(t, torch.Tensor)))
    assert sizes[0] == sizes[1]


def test_threads_key_is_validated_and_applied() -> None:
    from eqprop_hil.session import apply_threads

    assert c.resolve("digits-cep").train.threads == 1
    with pytest.raises(c.ConfigError, match="train.threads"):
        c.resolve("digits-cep", None, {"train": {"threads": -2}})
    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device_key_is_validated() -> None:
    with pytest.raises(c.ConfigError, match="train.device"):
        c.resolve("digits-cep", None, {"train": {"device": "gpu0"}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_a_clear_config_error() -> None:
    cfg = c.resolve("digits-cep", None, {"train": {"device": "cuda"}})
    with pytest.raises(c.ConfigError, match="train.device = 'cuda'.*no usable CUDA device"):
        build_learner(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_equals_cpu_engine() -> None:
    cfg = NetworkConfig(sizes=[6, 7, 5, 3], skips=SKIPS, gamma=GAINS)
    rule = RuleConfig(name="cep", t1=12, t2=5, beta=0.2, lr=RATES)
    cpu, gpu = Network(cfg, seed=1, dtype=torch.float64), Network(cfg, seed=1, dtype=torch.float64, device="cuda")
    a, b = Learner(cpu, rule, seed=3), Learner(gpu, rule, seed=3)
    for x, y in _data(6, 3, 10, torch.float64):
        a.train_batch(x, y)
        b.train_batch(x, y)
    for k, v in cpu.parameters().items():
        assert torch.allclose(v, gpu.parameters()[k].cpu(), rtol=1e-9, atol=1e-12), k


def test_rate_half_life_engine_equals_oracle_and_halves_the_rate() -> None:
    cfg = NetworkConfig(sizes=[6, 7, 5, 3], skips=SKIPS, gamma=GAINS)
    rule = RuleConfig(name="cep", t1=12, t2=5, beta=0.2, lr=RATES, lr_half_life=30)
    _, fast, slow = _train_both(cfg, rule, batches=12)
    for k in slow:
        assert float((fast[k] - slow[k]).abs().max()) <= 1e-9 * float(slow[k].abs().max()), k
    learner = Learner(Network(cfg, seed=0), rule, seed=0)
    learner.samples_seen = 60
    assert learner.rate_scale() == pytest.approx(0.25)
    state = learner.state_dict()
    other = Learner(Network(cfg, seed=0), rule, seed=0)
    other.load_state_dict(state)
    assert other.samples_seen == 60
    with pytest.raises(c.ConfigError, match="lr_half_life"):
        c.resolve("digits-cep", None, {"rule": {"lr_half_life": -1}})
