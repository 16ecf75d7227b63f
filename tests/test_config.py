"""TrainingConfig validation and the errors module's messages."""

from __future__ import annotations

import pytest

from autopar.config import TrainingConfig
from autopar.errors import ConfigError, InfeasibleError


def test_defaults_are_mixed_precision_adam():
    cfg = TrainingConfig()
    assert cfg.dtype_bytes == 2 and cfg.mixed_precision
    assert cfg.optimizer_state_bytes == 12  # fp32 master + momentum + variance (ZeRO paper)


def test_fp32_sgd_keeps_no_extra_state():
    assert TrainingConfig(dtype="fp32", optimizer="sgd").optimizer_state_bytes == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"global_batch": 0}, "global_batch"),
        ({"seq_len": -4}, "seq_len"),
        ({"dtype": "int8"}, "dtype"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"memory_headroom": 1.5}, "memory_headroom"),
    ],
)
def test_bad_fields_name_themselves(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        TrainingConfig(**kwargs)
    assert info.value.field == field


def test_unknown_choice_lists_the_allowed_values():
    with pytest.raises(ConfigError, match="allowed: bf16, fp16, fp32"):
        TrainingConfig(dtype="fp8")


def test_config_is_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        TrainingConfig(512)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TrainingConfig().global_batch = 3  # type: ignore[misc]


def test_infeasible_error_states_need_capacity_and_remedies():
    err = InfeasibleError(
        "gpt3-175b does not fit",
        needed_bytes=120 * 1024**3,
        available_bytes=80 * 1024**3,
        suggestions=["use 16 hosts", "enable ZeRO-3"],
    )
    text = str(err)
    assert "120.0 GiB" in text and "80.0 GiB" in text and "enable ZeRO-3" in text
