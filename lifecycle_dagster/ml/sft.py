"""Supervised fine-tuning with trl's SFTTrainer: LoRA, prompt tuning or full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator

from lifecycle_dagster.ml.distributed import is_main_process
from lifecycle_dagster.ml.progress import (
    Checkpoints,
    History,
    Log,
    Progress,
    hf_callback,
    loss_ends,
    resumed_step,
    trainer_kwargs,
    training_dir,
)
from lifecycle_dagster.ml.runtime import Runtime
from lifecycle_dagster.ml.tunables import Tunables

Method = Literal["prompt_tuning", "lora", "full"]
METHODS: tuple[str, ...] = get_args(Method)


class SFTMethodConfig(Tunables):
    """Supervised fine-tuning: the use case's ``adaptation`` section, a ladder rung's
    ``adaptation`` and the ``sft_adapter`` run config are this model or a partial update of it."""

    method: Method = Field(
        "lora",
        description="prompt_tuning (a soft prompt), lora (an adapter) or full (all weights).",
    )
    max_steps: int = Field(60, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate (linear decay).")
    batch_size: int = Field(8, gt=0, description="Examples per optimizer step.")
    lora_r: int = Field(8, gt=0, description="LoRA: rank of the adapter matrices.")
    lora_alpha: int | None = Field(
        None, gt=0, description="LoRA: scaling numerator (alpha / r); unset: 2 x lora_r."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA: dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="LoRA: module names to adapt; [all-linear] adapts every linear layer.",
    )
    num_virtual_tokens: int = Field(
        16,
        gt=0,
        le=256,
        description="Prompt tuning: soft-prompt length (tokens added before every prompt).",
    )
    max_length: int = Field(
        512, gt=0, description="Longest tokenized example; longer ones are cut."
    )
    seed: int = Field(0, description="Seed of initialisation and data order.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, v):
        return [v] if isinstance(v, str) else v

    @property
    def scaling_alpha(self) -> int:
        """The LoRA alpha in use: the one given, else twice the rank (so a rung that raises the rank
        keeps the adapter's scale)."""
        return self.lora_alpha or 2 * self.lora_r

    def needs_own_rate(self, previous: SFTMethodConfig) -> bool:
        """Whether moving from ``previous`` to this method makes the inherited learning rate an
        order of magnitude off: leaving prompt tuning (around 0.03 would wreck LoRA's weights), or
        moving to full fine-tuning (LoRA's rate would wreck all of them)."""
        risky = previous.method == "prompt_tuning" or self.method == "full"
        return self.method != previous.method and risky


@dataclass
class SFTResult:
    path: Path
    method: str
    is_adapter: bool
    trainable_parameters: int
    total_parameters: int
    loss_start: float
    loss_end: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0  # the checkpoint step training resumed from (0: from the start)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / max(1, self.total_parameters)


def peft_config_for(config: SFTMethodConfig, tokenizer, init_text: str = ""):
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if config.method == "lora":
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_r,
            lora_alpha=config.scaling_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear"
            if config.target_modules == ["all-linear"]
            else config.target_modules,
        )
    if config.method == "prompt_tuning":
        init = {"prompt_tuning_init": PromptTuningInit.RANDOM}
        if init_text:
            init = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": init_text,
                "tokenizer_name_or_path": tokenizer.name_or_path,
            }
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens, **init
        )
    return None


def train_sft(
    base_model: Path,
    records: list[dict],
    out_dir: Path,
    config: SFTMethodConfig,
    runtime: Runtime,
    log: Log | None = None,
    *,
    init_text: str = "",
    checkpoints: Checkpoints | None = None,
) -> SFTResult:
    """Fine-tune on prompt/completion records; writes an adapter (LoRA, prompt tuning) or a model.
    Prompt tuning starts from the embeddings of ``init_text`` (the task's instruction), else random.
    With ``checkpoints``, resumes from the last one an interrupted attempt left.

    Loss is on completion tokens only (trl's default for prompt-completion data).
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base_model, padding_side="right")
    model = load_causal_lm(base_model, runtime, training=True)
    model.train()
    total = sum(p.numel() for p in model.parameters())
    progress = Progress(f"sft[{config.method}]", config.max_steps, log)
    with training_dir(checkpoints, "sft-", progress.stage, log) as (output_dir, resume, save):
        args = SFTConfig(
            max_length=config.max_length,
            **trainer_kwargs(
                output_dir=output_dir,
                max_steps=config.max_steps,
                learning_rate=config.learning_rate,
                batch_size=config.batch_size,
                seed=config.seed,
                runtime=runtime,
                save=save,
            ),
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(records),
            processing_class=tokenizer,
            peft_config=peft_config_for(config, tokenizer, init_text),
            callbacks=[hf_callback(progress)],
        )
        _quiet(trainer)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train(resume_from_checkpoint=resume)
        history = History(trainer.state.log_history)
        trained = trainer.model
    trained.eval()
    if is_main_process():  # of several training processes, rank 0 writes the artifact
        trained.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    loss_start, loss_end = loss_ends(history)
    return SFTResult(
        path=Path(out_dir),
        method=config.method,
        is_adapter=config.method != "full",
        trainable_parameters=trainable,
        total_parameters=total,
        loss_start=loss_start,
        loss_end=loss_end,
        loss_curve=history.series("loss"),
        seconds=progress.elapsed,
        resumed_from=resumed_step(resume),
    )


def load_sft(
    base_model: Path, sft_dir: Path, runtime: Runtime, merge: bool = False, training: bool = False
):
    """The fine-tuned model and the tokenizer to prompt it with.

    LoRA: the base with the adapter on top (merged into the weights with ``merge``). Prompt
    tuning: the base with the soft prompt baked into its vocabulary (``ml.soft_prompt``), always,
    so that what is evaluated here is what alignment, the export and serving run. Full fine-tuning:
    the saved model.
    """
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer

    sft_dir = Path(sft_dir)
    tokenizer = load_tokenizer(sft_dir)
    peft_type = _peft_type(sft_dir)
    if peft_type == "PROMPT_TUNING":
        from lifecycle_dagster.ml.soft_prompt import bake_soft_prompt

        model = load_causal_lm(base_model, runtime, training=training)
        return bake_soft_prompt(model, tokenizer, sft_dir)
    if peft_type is not None:
        model = load_causal_lm(base_model, runtime, adapter=sft_dir, training=training)
        if merge and peft_type == "LORA":
            model = model.merge_and_unload()
        return model, tokenizer
    return load_causal_lm(sft_dir, runtime, training=training), tokenizer


def _peft_type(sft_dir: Path) -> str | None:
    """The adapter's peft type (LORA, PROMPT_TUNING), or None for a fully fine-tuned model."""
    import json

    config = Path(sft_dir) / "adapter_config.json"
    return json.loads(config.read_text()).get("peft_type") if config.exists() else None


def _quiet(trainer) -> None:
    """Progress goes through our own reporter; drop the trainer's print-every-log callback."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
