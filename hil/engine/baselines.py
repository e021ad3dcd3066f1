"""Backprop on the feedforward counterpart of a layered network: the yardstick EP, C-EP, C-VF and FRE are judged by.

The counterpart has the same layer sizes, skip edges and activation ``rho`` as the recurrent network, but computes
each layer once from the layers below (no feedback, no settling) and learns by ordinary backprop. It answers "how
well could these sizes do with exact gradients?", so an EP result within a point or so of it shows that the
learning rule, not the architecture, is what is being measured. (BPTT through the recurrent dynamics: hil/engine/bptt.py.)

Output convention, matching the recurrent network's output neurons:
- ``loss="mse"``: the output is ``o = rho(u)`` and the loss ``0.5 * ||o - y||^2`` with ``y`` one-hot, summed over
  output neurons and averaged over the batch (REFERENCE.md section 1); the prediction is ``argmax o``.
- ``loss="cross_entropy"``: the output pre-activations ``u`` are the logits of a softmax (no ``rho`` on the output);
  the prediction is ``argmax u``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from eqprop_hil.data import Dataset
from eqprop_hil.engine.model import ACTIVATIONS, Activation, NetworkConfig
from eqprop_hil.engine.rules import BatchResult, RuleConfig
from eqprop_hil.protocols.errors import ValueRangeError

Loss = Literal["mse", "cross_entropy"]
ProgressCallback = Callable[[dict], None]


class FeedForward(torch.nn.Module):
    """Layers computed in order: ``u_j = sum_{e=(i,j)} W_e s_i + b_j``, ``s_j = rho(u_j)`` for hidden layers.

    ``edges`` are ``(i, j)`` pairs with ``i < j`` (chain first, as in docs/dynamics.md); parameters are named as
    in :class:`eqprop_hil.engine.model.Network` (``W{edge}``, ``b{layer}``). Weights are uniform in ``+-gain/sqrt(fan_in)``
    (``init="uniform"``) or ``+-gain*sqrt(6/(fan_in+fan_out))`` (``"xavier"``), biases uniform in
    ``+-1/sqrt(fan_in)`` of the chain edge; all drawn from a generator seeded with ``seed``.
    """

    def __init__(
        self,
        sizes: list[int],
        activation: str,
        *,
        edges: list[tuple[int, int]] | None = None,
        bias: bool = True,
        init: str = "uniform",
        init_gain: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueRangeError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueRangeError(f"sizes must list at least an input and an output layer of positive sizes: {sizes}")
        self.sizes, self.rho = list(sizes), ACTIVATIONS[activation]
        self.edges = list(edges) if edges is not None else [(k, k + 1) for k in range(len(sizes) - 1)]
        g = torch.Generator().manual_seed(seed)
        self.params = torch.nn.ParameterDict()
        for e, (i, j) in enumerate(self.edges):
            fan_in, fan_out = sizes[i], sizes[j]
            bound = init_gain * (math.sqrt(6.0 / (fan_in + fan_out)) if init == "xavier" else 1.0 / math.sqrt(fan_in))
            self.params[f"W{e}"] = torch.nn.Parameter((torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound)
        for k in range(1, len(sizes)):
            b = (torch.rand(sizes[k], generator=g) * 2 - 1) / math.sqrt(sizes[k - 1])
            self.params[f"b{k}"] = torch.nn.Parameter(b if bias else torch.zeros(sizes[k]), requires_grad=bias)
        self.incoming = [[(e, i) for e, (i, j) in enumerate(self.edges) if j == k] for k in range(len(sizes))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Output pre-activation ``u``, (batch, sizes[-1]), from the input x (batch, sizes[0])."""
        s = [x]
        last = len(self.sizes) - 1
        for k in range(1, len(self.sizes)):
            u = self.params[f"b{k}"].expand(x.shape[0], -1)
            for e, i in self.incoming[k]:
                u = torch.addmm(u, s[i], self.params[f"W{e}"].T)  # (batch, n_k)
            s.append(u if k == last else self.rho(u))
        return s[-1]


class BackpropLearner:
    """The feedforward counterpart of ``model`` trained by backprop, with the learner interface of hil/train.py.

    Uses ``model.sizes``, skips, activation, bias and init; the recurrent settings (gamma, feedback, dt, nudge)
    have no feedforward meaning and are ignored. From ``rule``: ``lr`` (one per edge, a layer's bias at the rate
    of the chain edge feeding it), ``optimizer`` and ``lr_half_life``. ``y`` is one-hot (batch, n_out) throughout.
    """

    def __init__(self, model: NetworkConfig, rule: RuleConfig, *, seed: int = 0, loss: Loss = "cross_entropy") -> None:
        if loss not in ("mse", "cross_entropy"):
            raise ValueRangeError(f"unknown loss {loss!r}; known: mse, cross_entropy")
        if rule.optimizer not in ("sgd", "adam"):
            raise ValueRangeError(f"unknown optimizer {rule.optimizer!r}; known: sgd, adam")
        self.loss_name = loss
        self.net = FeedForward(
            model.sizes, model.activation, edges=model.edges(), bias=model.bias, init=model.init,
            init_gain=model.init_gain, seed=seed,
        )
        lrs = rule.edge_lrs(len(self.net.edges))
        rates = {f"W{e}": lrs[e] for e in range(len(lrs))}
        rates.update({f"b{k}": lrs[k - 1] for k in range(1, len(model.sizes))})
        groups = [{"params": [p], "lr": rates[n], "base_lr": rates[n]} for n, p in self.net.params.items() if p.requires_grad]
        self.half_life, self.samples_seen = rule.lr_half_life, 0
        if any(not r > 0 for r in rates.values()):
            raise ValueRangeError(f"backprop learning rates must be > 0, got {lrs}")
        self.optim = torch.optim.Adam(groups) if rule.optimizer == "adam" else torch.optim.SGD(groups)

    def _loss_and_pred(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-mean loss and the argmax prediction (batch,)."""
        u = self.net(x)  # (batch, n_out)
        if self.loss_name == "cross_entropy":
            return -(y * F.log_softmax(u, dim=1)).sum(dim=1).mean(), u.argmax(dim=1)
        o = self.net.rho(u)  # the output neurons pass through rho, as in the recurrent network
        return 0.5 * ((o - y) ** 2).sum(dim=1).mean(), o.argmax(dim=1)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        """One optimiser step; the loss and accuracy reported are those before the step."""
        loss, pred = self._loss_and_pred(x, y)
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.half_life:  # the rate schedule of RuleConfig.lr_half_life, as for the EP rules
            for group in self.optim.param_groups:
                group["lr"] = group["base_lr"] * 0.5 ** (self.samples_seen / self.half_life)
        self.optim.step()
        self.samples_seen += x.shape[0]
        return BatchResult(float(loss.detach()), int((pred == y.argmax(dim=1)).sum()), pred)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> BatchResult:
        loss, pred = self._loss_and_pred(x, y)
        return BatchResult(float(loss), int((pred == y.argmax(dim=1)).sum()), pred)

    def parameters_for_checkpoint(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.params.items()}

    def load_parameters_from_checkpoint(self, params: dict[str, torch.Tensor]) -> None:
        mine = dict(self.net.params.items())
        if set(params) != set(mine):
            raise ValueRangeError(f"checkpoint parameters {sorted(params)} do not match this network's {sorted(mine)}")
        with torch.no_grad():
            for name, value in params.items():
                if tuple(value.shape) != tuple(mine[name].shape):
                    raise ValueRangeError(f"{name}: shape {tuple(value.shape)} != {tuple(mine[name].shape)}")
                mine[name].copy_(value)

    def state_dict(self) -> dict:
        # a snapshot, not live references
        return {"optimizer": copy.deepcopy(self.optim.state_dict()), "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state["optimizer"])
        self.samples_seen = int(state.get("samples_seen", 0))


def _accuracy(learner: BackpropLearner, x: torch.Tensor, y: torch.Tensor, n_classes: int, chunk: int = 4096) -> float:
    """Fraction of correct predictions, in chunks so a 60,000-sample set never needs one huge matmul."""
    hits = sum(
        learner.evaluate(x[i : i + chunk], F.one_hot(y[i : i + chunk], n_classes).to(x.dtype)).correct
        for i in range(0, len(x), chunk)
    )
    return hits / max(len(x), 1)


def train_backprop(
    dataset: Dataset,
    sizes: list[int],
    *,
    activation: Activation = "sigmoid4",
    epochs: int = 10,
    lr: float | list[float] = 1e-3,
    batch_size: int = 20,
    optimizer: Literal["sgd", "adam"] = "adam",
    loss: Loss = "cross_entropy",
    seed: int = 0,
    bias: bool = True,
    progress: ProgressCallback | None = None,
) -> dict:
    """Train the feedforward counterpart of ``sizes`` by minibatch backprop and return its learning curve.

    Returns ``{"epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds"}``, each a list with one entry
    per epoch, plus ``"final_test_accuracy"`` (last epoch, not best) and ``"config"``. Accuracies are fractions in
    [0, 1]; ``train_loss`` is the mean minibatch loss during the epoch (each measured before its step); the
    accuracies are measured on the whole train and test sets after the epoch; ``seconds`` is the epoch's wall
    time. ``progress`` receives each epoch's record (the same keys, scalars) as soon as it is known. The data
    order is ``dataset.order(epoch, seed)``, so the same seed gives the same curve.
    """
    if sizes[0] != dataset.n_features or sizes[-1] != dataset.n_classes:
        raise ValueRangeError(
            f"sizes {sizes} do not fit {dataset.name}: it has {dataset.n_features} features and "
            f"{dataset.n_classes} classes"
        )
    if epochs < 0 or batch_size < 1:
        raise ValueRangeError(f"need epochs >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    if optimizer not in ("sgd", "adam"):  # checked here too: RuleConfig does not validate its Literal
        raise ValueRangeError(f"unknown optimizer {optimizer!r}; known: sgd, adam")
    model = NetworkConfig(sizes=list(sizes), activation=activation, bias=bias)
    learner = BackpropLearner(model, RuleConfig(name="bp", lr=lr, optimizer=optimizer), seed=seed, loss=loss)
    history: dict[str, list] = {k: [] for k in ("epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds")}
    for epoch in range(epochs):
        t0 = time.perf_counter()
        total, seen = 0.0, 0
        for _, xb, yb in dataset.batches(batch_size, epoch=epoch, seed=seed):
            result = learner.train_batch(xb, F.one_hot(yb, dataset.n_classes).to(xb.dtype))
            total += result.loss * len(yb)
            seen += len(yb)
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "train_accuracy": _accuracy(learner, dataset.x_train, dataset.y_train, dataset.n_classes),
            "test_accuracy": _accuracy(learner, dataset.x_test, dataset.y_test, dataset.n_classes),
            "seconds": time.perf_counter() - t0,
        }
        for key, value in record.items():
            history[key].append(value)
        if progress is not None:
            progress(record)
    history["final_test_accuracy"] = (
        history["test_accuracy"][-1] if epochs else _accuracy(learner, dataset.x_test, dataset.y_test, dataset.n_classes)
    )
    history["config"] = {
        "dataset": dataset.name, "sizes": list(sizes), "activation": activation, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "optimizer": optimizer, "loss": loss, "seed": seed, "bias": bias,
    }
    return history
