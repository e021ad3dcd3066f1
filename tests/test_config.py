"""Strict configuration: every preset builds; typos, wrong types and out-of-range values name the key."""

from __future__ import annotations

import pytest

from eqprop_hil import config as c


@pytest.mark.parametrize("name", c.preset_names())
def test_every_preset_builds(name: str) -> None:
    cfg = c.resolve(name)
    assert cfg.name == name
    assert len(cfg.rule.edge_lrs(len(cfg.model.edges()))) == len(cfg.model.edges())


def test_paper_hyperparameters_are_the_published_ones() -> None:
    cep = c.resolve("cep-1h")
    assert (cep.model.sizes, cep.rule.t1, cep.rule.t2, cep.rule.beta, cep.rule.lr) == ([784, 512, 10], 40, 15, 0.2, [0.0056, 0.0028])
    ep2 = c.resolve("ep-2h")
    assert (ep2.rule.t1, ep2.rule.t2, ep2.rule.beta, ep2.rule.lr, ep2.train.epochs) == (100, 20, 0.5, [0.2, 0.05, 0.005], 50)
    cvf2 = c.resolve("cvf-2h")
    assert (cvf2.rule.beta, cvf2.rule.beta_sign, cvf2.model.feedback) == (0.35, "random", "untied")


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"rule": {"lernrate": 0.1}}, "lernrate"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"rule": {"name": "sgd"}}, "rule.name"),
        ({"model": {"gamma": 1.5}}, "feedback gains"),
        ({"model": {"skips": [[2, 1]]}}, "skip edge"),
        ({"rule": {"beta": 0.0}}, "beta"),
        ({"rule": {"lr": [0.1]}}, None),  # caught when the learner maps rates to edges
        ({"instrument": {"update_mode": "teleport"}}, "instrument.update_mode"),
        ({"bogus": {}}, "bogus"),
        ({"train": {"epochs": 0}}, "epochs"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(override: dict, needle: str | None) -> None:
    if needle is None:
        cfg = c.resolve("digits-cep", overrides=override)
        with pytest.raises(c.ValueRangeError, match="rule.lr has 1 rates for 2 edges"):
            cfg.rule.edge_lrs(len(cfg.model.edges()))
        return
    with pytest.raises(c.ConfigError, match=needle.replace(".", r"\.")):
        c.resolve("digits-cep", overrides=override)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(c.ConfigError, match="digits-cep"):
        c.resolve("no-such-preset")


def test_file_overrides_preset_and_bad_toml_is_named(tmp_path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text('[rule]\nbeta = 0.3\n[train]\nepochs = 2\n')
    cfg = c.resolve("digits-ep", str(f))
    assert (cfg.rule.beta, cfg.train.epochs, cfg.rule.t1) == (0.3, 2, 30)
    f.write_text("[rule\nbeta = ")
    with pytest.raises(c.ConfigError, match="not valid TOML"):
        c.resolve(None, str(f))
