"""The run configs of sft_adapter and aligned_model are partial updates of the methods' own
declarations: every field travels, with the declaration's description, and a rung's update reaches
the trainer's config unchanged through the run request."""

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig, SFTAdapterConfig
from lifecycle_dagster.ml.align import AlignMethodConfig
from lifecycle_dagster.ml.readaptation import next_attempt
from lifecycle_dagster.ml.sft import SFTMethodConfig
from lifecycle_dagster.ml.tunables import given
from lifecycle_dagster.ml.usecase import LadderStep


def test_every_declared_field_travels_with_its_description():
    for run_config, declaration in (
        (SFTAdapterConfig, SFTMethodConfig),
        (AlignedModelConfig, AlignMethodConfig),
    ):
        assert set(run_config.model_fields) == set(declaration.model_fields)
        for name, info in run_config.model_fields.items():
            assert info.default is None
            assert info.description.startswith(declaration.model_fields[name].description)


def test_a_rung_reaches_the_trainer_config_through_the_run_request(use_case):
    ladder = [
        LadderStep(
            adaptation={"method": "lora", "lora_r": 32, "target_modules": ["q_proj", "v_proj"]},
            alignment={"beta": 0.2},
        )
    ]
    uc = use_case.model_copy(
        update={"readaptation": use_case.readaptation.model_copy(update={"ladder": ladder})}
    )
    esc, _ = next_attempt(uc, 1, uc.adaptation, elapsed_minutes=0)
    run_config = dg.RunConfig(
        ops={
            "sft_adapter": SFTAdapterConfig(**given(esc.adaptation)),
            "aligned_model": AlignedModelConfig(**given(esc.alignment)),
        }
    ).to_config_dict()
    sft = SFTAdapterConfig(**run_config["ops"]["sft_adapter"]["config"])
    trained = uc.adaptation.updated(sft)
    assert trained.lora_r == 32 and trained.target_modules == ["q_proj", "v_proj"]
    assert trained.scaling_alpha == 64  # alpha unset: twice the rank
    aligned = uc.alignment.updated(
        AlignedModelConfig(**run_config["ops"]["aligned_model"]["config"])
    )
    assert aligned.beta == 0.2 and aligned.max_steps == uc.alignment.max_steps
