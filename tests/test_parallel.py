"""Strategy choice: ``auto`` follows an ``accelerate launch`` FSDP config; FSDP1 configs are refused."""

from __future__ import annotations

import pytest

from coma.train.config import TrainSettings
from coma.train.parallel import resolve_strategy

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
