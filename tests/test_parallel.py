"""Strategy choice: ``auto`` follows an ``accelerate launch`` FSDP config; FSDP1 configs are refused."""

from __future__ import annotations

import argparse

import pytest

from coma.recipes import add_config_arguments, config_from_args
from coma.train.config import TrainSettings
from coma.train.match import MatchConfig
from coma.train.parallel import Parallel, resolve_strategy

FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(
    "setting, environ, strategy",
    [("auto", {}, "ddp"), ("auto", FSDP2_ENV, "fsdp"), ("auto", {"ACCELERATE_USE_FSDP": "false"}, "ddp"),
     ("ddp", FSDP2_ENV, "ddp"), ("fsdp", {}, "fsdp")],
)  # fmt: skip
def test_resolve_strategy(setting, environ, strategy):
    assert resolve_strategy(setting, environ) == strategy


def test_fsdp1_accelerate_config_is_refused():
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        resolve_strategy("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_unknown_strategy_names_the_choices():
    with pytest.raises(ValueError, match="auto, ddp, fsdp"):
        TrainSettings(strategy="zero3")


class RecordingShardedModel:
    """Stands for an FSDP2 module: records the gradient-sync switches."""

    def __init__(self) -> None:
        self.switches: list[bool] = []

    def set_requires_gradient_sync(self, requires: bool) -> None:
        self.switches.append(requires)


@pytest.mark.parametrize("defer, switches", [(True, [False, True]), (False, [])])
def test_fsdp_defers_the_gradient_sync_only_when_asked(defer, switches):
    model = RecordingShardedModel()
    parallel = Parallel(model, "fsdp", distributed=True, defer_sharded_sync=defer)  # type: ignore[arg-type]
    with parallel.no_sync():
        pass
    assert model.switches == switches


def test_fsdp_gradient_sync_flag_reaches_the_settings():
    assert TrainSettings().fsdp_defer_gradient_sync is True
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MatchConfig)
    args = parser.parse_args(["--fsdp-defer-gradient-sync", "false"])
    assert config_from_args(MatchConfig, args).train.fsdp_defer_gradient_sync is False
