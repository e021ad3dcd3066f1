"""Pick the learner a run needs: a rule on the software engine, a baseline, or a rule on an instrument."""

from __future__ import annotations

from typing import Any

from eqprop_hil.config import ConfigError, RunConfig
from eqprop_hil.engine.model import Network


def check_device(device: str) -> None:
    """Refuse a CUDA device that this torch cannot use, before anything is built (a clear error, not a crash
    half-way through the first batch)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {device!r} but this torch has no usable CUDA device "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                              "use device = 'cpu' or install a CUDA build of torch on a machine with a GPU")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {device!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")


def build_learner(cfg: RunConfig) -> Any:
    """The learner for ``cfg`` on the software engine (``instrument.resource == "software"``)."""
    rule, seed = cfg.rule.name, cfg.train.seed
    check_device(cfg.train.device)
    if rule == "bp":
        from eqprop_hil.engine.baselines import BackpropLearner

        return BackpropLearner(cfg.model, cfg.rule, seed=seed)
    net = Network(cfg.model, seed=seed, device=cfg.train.device)
    if rule == "bptt":
        from eqprop_hil.engine.bptt import BPTTLearner

        return BPTTLearner(net, cfg.rule, seed=seed)
    if rule == "fre" and cfg.model.readout != "softmax":
        raise ConfigError("rule 'fre' needs model.readout = 'softmax' (FRE-RNN's readout outside the core)")
    if cfg.model.feedback == "untied" and rule not in ("cvf", "bptt"):
        raise ConfigError(f"untied feedback needs rule 'cvf' (got {rule!r}): EP and C-EP assume B = W^T")
    if rule == "cvf" and cfg.model.feedback != "untied":
        raise ConfigError("rule 'cvf' needs model.feedback = 'untied'")
    from eqprop_hil.engine.rules import Learner

    return Learner(net, cfg.rule, seed=seed)
