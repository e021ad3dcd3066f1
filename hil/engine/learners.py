"""Pick the learner a run needs: a rule on the software engine, a baseline, or a rule on an instrument."""

from __future__ import annotations

from typing import Any

from eqprop_hil.config import ConfigError, RunConfig
from eqprop_hil.engine.model import Network


def build_learner(cfg: RunConfig) -> Any:
    """The learner for ``cfg`` on the software engine (``instrument.resource == "software"``)."""
    rule, seed = cfg.rule.name, cfg.train.seed
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
