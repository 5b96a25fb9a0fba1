"""Where training runs and how: the runtime's choices reach every trainer."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from lifecycle_dagster.ml.progress import trainer_kwargs
from lifecycle_dagster.ml.runtime import select_runtime
from lifecycle_dagster.ml.usecase import ComputeSpec


def test_activation_checkpointing_is_off_on_cpu_unless_asked_for():
    assert select_runtime("cpu").activation_checkpointing is False
    assert select_runtime("cpu", activation_checkpointing="on").activation_checkpointing is True
    assert select_runtime("cpu", activation_checkpointing="off").activation_checkpointing is False
    with pytest.raises(ValueError, match="compute.activation_checkpointing is 'yes'"):
        select_runtime("cpu", activation_checkpointing="yes")
    with pytest.raises(ValidationError, match="activation_checkpointing"):
        ComputeSpec(activation_checkpointing="yes")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trl_configs_take_the_runtimes_checkpointing_over_their_own_default(checkpointing):
    """trl turns activation checkpointing on by default (1.5x the time of a LoRA step on CPU)."""
    from trl import GRPOConfig, RewardConfig, SFTConfig

    runtime = dataclasses.replace(select_runtime("cpu"), activation_checkpointing=checkpointing)
    common = trainer_kwargs(
        output_dir="unused", max_steps=1, learning_rate=1e-4, batch_size=2, seed=0, runtime=runtime
    )
    for cls in (SFTConfig, RewardConfig, GRPOConfig):
        args = cls(**common) if cls is not GRPOConfig else cls(num_generations=2, **common)
        assert args.activation_checkpointing is checkpointing, cls.__name__
        assert args.gradient_checkpointing is checkpointing, cls.__name__  # what trl reads


def test_checkpointing_changes_memory_not_the_training(
    tmp_path, tiny_base, use_case, rows, runtime
):
    from lifecycle_dagster.ml.data import sft_records
    from lifecycle_dagster.ml.sft import SFTMethodConfig, train_sft

    records = sft_records(use_case, rows[0])
    config = SFTMethodConfig(method="lora", max_steps=4, learning_rate=3e-3)
    curves = {
        on: train_sft(
            tiny_base,
            records,
            tmp_path / str(on),
            config,
            dataclasses.replace(runtime, activation_checkpointing=on),
        ).loss_curve
        for on in (False, True)
    }
    losses = {on: [loss for _, loss in curve] for on, curve in curves.items()}
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
