"""Alignment of the fine-tuned model: GRPO or RLOO against the reward model, or offline DPO.

The policy starts from the SFT model (a LoRA adapter merged into the base). A fresh LoRA adapter is
trained on top; with the adapter disabled the same network is the frozen SFT reference, so the KL term
(``beta``) keeps the aligned model close to the SFT model. The result is saved merged, as safetensors.

A policy with a soft prompt baked into its vocabulary (prompt tuning) is aligned with its soft prompt
before every prompt, frozen (only the linear layers get LoRA), and never samples its tokens.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lifecycle_dagster.ml.progress import Log, Progress, hf_callback, trainer_kwargs
from lifecycle_dagster.ml.runtime import Runtime


@dataclass(frozen=True)
class AlignMethodConfig:
    method: Literal["grpo", "rloo", "dpo"] = "grpo"
    max_steps: int = 20
    learning_rate: float = 5e-4
    beta: float = 0.04
    batch_size: int = 8
    num_generations: int = 4
    max_completion_length: int = 24
    temperature: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    seed: int = 0


@dataclass
class AlignResult:
    path: Path
    method: str
    mean_kl: float | None
    reward_curve: list[tuple[int, float]] = field(default_factory=list)
    kl_curve: list[tuple[int, float]] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def reward_function(scorer):
    """A trl reward function (prompts, completions -> floats) backed by a RewardScorer."""

    def reward_model(prompts, completions, **_):
        return scorer(prompts, completions)

    return reward_model


def align(
    policy,
    tokenizer,
    out_dir: Path,
    config: AlignMethodConfig,
    runtime: Runtime,
    *,
    prompts: list[str] | None = None,
    pairs: list[dict] | None = None,
    scorer=None,
    log: Log | None = None,
) -> AlignResult:
    """Align ``policy`` (a merged causal LM) and save the merged result to ``out_dir``."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType

    from lifecycle_dagster.ml.sft import _quiet
    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    torch.manual_seed(config.seed)
    if prompts:
        prompts = with_soft_prompt(tokenizer, prompts)
    if pairs:
        prefixed = with_soft_prompt(tokenizer, [p["prompt"] for p in pairs])
        pairs = [{**p, "prompt": q} for p, q in zip(pairs, prefixed, strict=True)]
    suppressed = soft_prompt_ids(tokenizer)
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules="all-linear",
    )
    progress = Progress(config.method, config.max_steps, log)
    tokenizer.padding_side = "left"
    with tempfile.TemporaryDirectory(prefix="align-") as scratch:
        common = trainer_kwargs(
            output_dir=scratch,
            max_steps=config.max_steps,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            seed=config.seed,
            runtime=runtime,
            scheduler="constant",
        )
        if config.method == "dpo":
            from trl import DPOConfig, DPOTrainer

            if not pairs:
                raise ValueError("DPO needs preference pairs")
            args = DPOConfig(beta=max(config.beta, 1e-3), **common)
            trainer = DPOTrainer(
                model=policy,
                args=args,
                train_dataset=Dataset.from_list(pairs),
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[hf_callback(progress)],
            )
        else:
            if scorer is None or not prompts:
                raise ValueError(f"{config.method} needs prompts and a reward model")
            if config.method == "grpo":
                from trl import GRPOConfig as Cfg
                from trl import GRPOTrainer as Trainer
            else:
                from trl import RLOOConfig as Cfg
                from trl import RLOOTrainer as Trainer
            args = Cfg(
                num_generations=config.num_generations,
                max_completion_length=config.max_completion_length,
                temperature=config.temperature,
                beta=config.beta,
                generation_kwargs={"suppress_tokens": suppressed} if suppressed else None,
                **common,
            )
            trainer = Trainer(
                model=policy,
                reward_funcs=reward_function(scorer),
                args=args,
                train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[hf_callback(progress)],
            )
        _quiet(trainer)
        trainer.train()
        model = trainer.model
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    kl = progress.series("kl")
    reward_key = next(
        (
            k
            for k in ("reward", "rewards/reward_model/mean", "rewards/chosen")
            if progress.series(k)
        ),
        "reward",
    )
    return AlignResult(
        path=Path(out_dir),
        method=config.method,
        mean_kl=sum(v for _, v in kl) / len(kl) if kl else None,
        reward_curve=progress.series(reward_key),
        kl_curve=kl,
        loss_curve=progress.series("loss"),
        seconds=progress.elapsed,
    )
