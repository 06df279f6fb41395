"""Tier 1: config validation lists every problem in one error."""

import pytest
from omegaconf import OmegaConf

from prefopt.config import ConfigError, Key, at_least, positive, validate_config

SPEC = {
    "output_dir": Key(str),
    "batch_size": Key(int, check=at_least(1)),
    "clip_grad_norm": Key((float, type(None)), default=None, check=positive),
    "compile": Key(bool, default=False),
    "loss": Key(component=True),
    "optimizer": Key(component=True),
}
BOUND = {"optimizer": ("params",)}


def cfg(**kw):
    base = {
        "output_dir": "/tmp/x",
        "batch_size": 4,
        "loss": {"_component_": "prefopt.loss.SimPOLoss", "beta": 2.0},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3},
    }
    base.update(kw)
    return OmegaConf.create({k: v for k, v in base.items() if v is not ...})


def test_valid_config_fills_defaults():
    v = validate_config(cfg(clip_grad_norm=1), SPEC, bound_args=BOUND)
    assert v["clip_grad_norm"] == 1.0 and isinstance(v["clip_grad_norm"], float)
    assert v["compile"] is False and v["batch_size"] == 4


def test_every_problem_in_one_error():
    bad = cfg(
        clip_grad_nrom=1.0,  # typo -> suggestion
        batch_size=0,  # out of range
        compile="yes",  # wrong type
        output_dir=...,  # missing
        loss={"_component_": "prefopt.loss.SimPOLoss", "betta": 2.0},  # bad component arg
        optimizer={"_component_": "torch.optim.NoSuchOpt"},
    )
    with pytest.raises(ConfigError) as e:
        validate_config(bad, SPEC, bound_args=BOUND)
    msg = str(e.value)
    assert msg.startswith("6 problem(s)")
    for needle in [
        "clip_grad_nrom: unknown config key (did you mean 'clip_grad_norm'?)",
        "batch_size: must be >= 1, got 0",
        "compile: expected bool, got str",
        "output_dir: missing required key",
        "loss.betta: not an argument of prefopt.loss.SimPOLoss (did you mean 'beta'?)",
        "optimizer._component_: cannot import 'torch.optim.NoSuchOpt'",
    ]:
        assert needle in msg, msg


def test_bool_is_not_an_int_and_bound_args_are_not_required():
    with pytest.raises(ConfigError, match="batch_size: expected int, got bool"):
        validate_config(cfg(batch_size=True), SPEC, bound_args=BOUND)
    # AdamW's required `params` is passed by the recipe: not reported missing
    validate_config(cfg(), SPEC, bound_args=BOUND)
    with pytest.raises(ConfigError, match="optimizer.params: required argument"):
        validate_config(cfg(), SPEC)
