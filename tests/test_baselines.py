"""eqprop_hil.engine.baselines: the backprop yardstick learns the digits, reproducibly, and refuses sizes that do not fit."""

from __future__ import annotations

import math

import pytest
import torch

from eqprop_hil.engine.baselines import BackpropLearner, FeedForward, train_backprop
from eqprop_hil.data import Dataset, load_dataset
from eqprop_hil.engine.model import ACTIVATIONS, NetworkConfig
from eqprop_hil.engine.rules import RuleConfig
from eqprop_hil.protocols.errors import ValueRangeError


@pytest.fixture(autouse=True)
def one_thread():
    """Batch-20 steps are per-operation overhead; on a shared 2-core box a second intra-op thread only contends."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def test_backprop_learns_the_digits(digits: Dataset) -> None:
    records = []
    h = train_backprop(
        digits, [64, 64, 10], activation="sigmoid4", epochs=8, lr=3e-3, batch_size=20, optimizer="adam",
        loss="cross_entropy", seed=0, progress=records.append,
    )
    assert h["final_test_accuracy"] >= 0.90, h["test_accuracy"]
    assert h["final_test_accuracy"] == h["test_accuracy"][-1]  # last epoch, not best
    assert h["epoch"] == list(range(1, 9)) and len(records) == 8
    assert records[-1] == {k: h[k][-1] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds")}
    assert h["train_loss"][-1] < 0.5 * h["train_loss"][0]
    assert h["config"]["sizes"] == [64, 64, 10]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_sgd_learns_with_every_activation(digits: Dataset, activation: str) -> None:
    h = train_backprop(digits, [64, 32, 10], activation=activation, epochs=3, lr=0.2, optimizer="sgd")
    assert all(math.isfinite(v) for v in h["train_loss"])
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert h["final_test_accuracy"] > 0.8  # chance is 0.1


@pytest.mark.parametrize("activation", ["sigmoid4", "tanh", "identity"])
def test_mse_on_rho_outputs_learns(digits: Dataset, activation: str) -> None:
    # (hard_sigmoid is left out: output units clipped at 0 get no gradient under MSE and stay dead)
    h = train_backprop(digits, [64, 32, 10], activation=activation, epochs=3, lr=1e-2, optimizer="adam", loss="mse")
    assert h["train_loss"][-1] < h["train_loss"][0] and h["final_test_accuracy"] > 0.85


def test_mse_loss_matches_its_definition(digits: Dataset) -> None:
    # epoch 1 of an SGD run with a vanishing rate reports the initial network's loss 0.5 ||rho(u) - y||^2
    h = train_backprop(digits, [64, 16, 10], activation="tanh", epochs=1, lr=1e-12, optimizer="sgd", loss="mse", seed=4)
    net = FeedForward([64, 16, 10], "tanh", seed=4)
    with torch.no_grad():
        o = torch.tanh(net(digits.x_train))
        expected = 0.5 * ((o - torch.nn.functional.one_hot(digits.y_train, 10)) ** 2).sum(dim=1).mean()
    assert h["train_loss"][0] == pytest.approx(float(expected), rel=1e-5)


def test_same_seed_same_curve_other_seed_other_curve(digits: Dataset) -> None:
    a = train_backprop(digits, [64, 16, 10], epochs=2, seed=3)
    b = train_backprop(digits, [64, 16, 10], epochs=2, seed=3)
    c = train_backprop(digits, [64, 16, 10], epochs=2, seed=4)
    assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]
    assert a["train_loss"] != c["train_loss"]


def test_biases_off_stay_zero(digits: Dataset) -> None:
    net = FeedForward([64, 8, 10], "sigmoid4", bias=False, seed=0)
    biases = [p for name, p in net.params.items() if name.startswith("b")]
    assert len(biases) == 2 and all(not b.requires_grad and float(b.abs().sum()) == 0.0 for b in biases)
    h = train_backprop(digits, [64, 8, 10], epochs=1, bias=False)
    assert h["config"]["bias"] is False and 0.0 <= h["final_test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": [784, 10, 10]}, r"do not fit digits: it has 64 features and 10 classes"),
        ({"sizes": [64, 10, 7]}, r"10 classes"),
        ({"sizes": [64]}, r"do not fit digits"),
        ({"activation": "relu"}, r"unknown activation 'relu'"),
        ({"loss": "hinge"}, r"unknown loss 'hinge'"),
        ({"optimizer": "rmsprop"}, r"unknown optimizer 'rmsprop'"),
        ({"lr": 0.0}, r"learning rates must be > 0"),
        ({"lr": [1e-3, 1e-3, 1e-3]}, r"3 rates for 2 edges"),
    ],
)
def test_bad_configuration_is_refused(digits: Dataset, kwargs: dict, message: str) -> None:
    args = {"sizes": [64, 8, 10], **kwargs}
    sizes = args.pop("sizes")
    with pytest.raises(ValueRangeError, match=message):
        train_backprop(digits, sizes, epochs=1, **args)


def test_skip_edges_feed_forward_as_documented() -> None:
    net = FeedForward([3, 4, 2], "tanh", edges=[(0, 1), (1, 2), (0, 2)], seed=1)
    x = torch.rand(5, 3)
    p = dict(net.params.items())
    h = torch.tanh(x @ p["W0"].T + p["b1"])
    expected = h @ p["W1"].T + x @ p["W2"].T + p["b2"]  # the output is the pre-activation u
    torch.testing.assert_close(net(x), expected)


def test_learner_from_configs_with_skip_and_per_edge_rates() -> None:
    model = NetworkConfig(sizes=[6, 5, 3], skips=[(0, 2)], activation="sigmoid4")
    learner = BackpropLearner(model, RuleConfig(name="bp", lr=[0.5, 0.5, 0.0 + 1e-9], optimizer="sgd"), seed=2)
    before = learner.parameters_for_checkpoint()
    x, y = torch.rand(8, 6), torch.nn.functional.one_hot(torch.arange(8) % 3, 3).float()
    r = learner.train_batch(x, y)
    after = learner.parameters_for_checkpoint()
    assert r.pred.shape == (8,) and 0 <= r.correct <= 8 and r.loss > 0
    assert float((after["W0"] - before["W0"]).abs().max()) > 1e-4  # learns at 0.5
    assert float((after["W2"] - before["W2"]).abs().max()) < 1e-8  # the skip edge at 1e-9
    assert set(after) == {"W0", "W1", "W2", "b1", "b2"}


def test_checkpoint_round_trip_continues_identically(digits: Dataset) -> None:
    model, rule = NetworkConfig(sizes=[64, 16, 10]), RuleConfig(name="bp", lr=3e-3, optimizer="adam")
    onehot = lambda y: torch.nn.functional.one_hot(y, 10).float()  # noqa: E731
    batches = list(digits.batches(20, epoch=0, seed=1))[:6]
    a = BackpropLearner(model, rule, seed=5)
    for _, x, y in batches[:3]:
        a.train_batch(x, onehot(y))
    params, state = a.parameters_for_checkpoint(), a.state_dict()
    b = BackpropLearner(model, rule, seed=99)  # different init: everything must come from the checkpoint
    b.load_parameters_from_checkpoint(params)
    b.load_state_dict(state)
    for _, x, y in batches[3:]:
        ra, rb = a.train_batch(x, onehot(y)), b.train_batch(x, onehot(y))
        assert ra.loss == rb.loss
    for name, value in a.parameters_for_checkpoint().items():
        assert torch.equal(value, b.parameters_for_checkpoint()[name])
    with pytest.raises(ValueRangeError, match="do not match"):
        b.load_parameters_from_checkpoint({"W0": params["W0"]})
    assert a.evaluate(digits.x_test, onehot(digits.y_test)).correct > 0
