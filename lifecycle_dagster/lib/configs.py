"""Run-config classes shared by assets, the CLI and the re-adaptation sensor."""

import dagster as dg
from pydantic import Field


class UseCaseConfig(dg.Config):
    profile: str = Field(default="tiny", description="Named preset (lifecycle_dagster/profiles).")
    use_case_file: str = Field(
        default="", description="A use-case YAML, complete or layered over the profile's."
    )
    overrides: str = Field(default="", description="YAML/JSON mapping applied last.")


class SFTAdapterConfig(dg.Config):
    """Overrides of the use case's adaptation settings (the re-adaptation sensor sets these)."""

    method: str = Field(default="", description="prompt_tuning, lora or full; '' = use case's.")
    max_steps: int = Field(default=0, description="Training steps; 0 = use case's.")
    learning_rate: float = Field(default=0.0, description="0 = use case's.")
    lora_r: int = Field(default=0, description="LoRA rank; 0 = use case's.")


class AlignedModelConfig(dg.Config):
    """Overrides of the use case's alignment settings (the re-adaptation sensor sets these)."""

    method: str = Field(default="", description="grpo, rloo or dpo; '' = use case's.")
    max_steps: int = Field(default=0, description="0 = use case's.")
    beta: float = Field(default=-1.0, description="KL weight; negative = use case's.")
