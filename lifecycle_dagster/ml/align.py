"""Alignment of the fine-tuned model: GRPO or RLOO against the reward model, or offline DPO.

The policy starts from the SFT model (a LoRA adapter merged into the base). A fresh LoRA adapter is
trained on top; with the adapter disabled the same network is the frozen SFT reference, so the KL term
(``beta``) keeps the aligned model close to the SFT model. The result is saved merged, as safetensors.

A policy with a soft prompt baked into its vocabulary (prompt tuning) is aligned with its soft prompt
before every prompt, frozen (only the linear layers get LoRA), and never samples its tokens.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lifecycle_dagster.ml.evaluate import EvalResult
from lifecycle_dagster.ml.progress import (
    Checkpoints,
    History,
    Log,
    Progress,
    hf_callback,
    resumed_step,
    trainer_kwargs,
    training_dir,
)
from lifecycle_dagster.ml.runtime import Runtime
from lifecycle_dagster.ml.tunables import Tunables


class AlignMethodConfig(Tunables):
    """Alignment against the reward model: the use case's ``alignment`` section, a ladder rung's
    ``alignment`` and the ``aligned_model`` run config are this model or a partial update of it."""

    method: Literal["grpo", "rloo", "dpo"] = Field(
        "grpo",
        description="grpo or rloo (online, against the reward model) or dpo (offline pairs).",
    )
    max_steps: int = Field(20, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(5e-4, gt=0, description="Learning rate (constant).")
    beta: float = Field(0.04, ge=0, description="Weight of the KL term to the SFT reference.")
    batch_size: int = Field(8, gt=0, description="Prompts per step (GRPO: completions per step).")
    num_generations: int = Field(4, ge=2, description="GRPO/RLOO: completions per prompt.")
    max_completion_length: int = Field(24, gt=0, description="GRPO/RLOO: tokens per completion.")
    temperature: float = Field(1.0, gt=0, description="GRPO/RLOO: sampling temperature.")
    lora_r: int = Field(16, gt=0, description="Rank of the LoRA adapter alignment trains.")
    lora_alpha: int = Field(32, gt=0, description="Scaling numerator of that adapter.")
    seed: int = Field(0, description="Seed of initialisation, data order and sampling.")

    @model_validator(mode="after")
    def _batch_holds_whole_groups(self) -> AlignMethodConfig:
        if self.method != "dpo" and self.batch_size % self.num_generations:
            raise ValueError("batch_size must be a multiple of num_generations")
        return self


@dataclass
class AlignResult:
    path: Path
    method: str
    mean_kl: float | None
    reward_curve: list[tuple[int, float]] = field(default_factory=list)
    kl_curve: list[tuple[int, float]] = field(default_factory=list)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0  # the checkpoint step training resumed from (0: from the start)


def reward_function(scorer):
    """A trl reward function backed by a reward ``(prompts, completions, references) -> floats``;
    trl passes the dataset's ``reference`` column along."""

    def reward(prompts, completions, reference=None, **_):
        return scorer(prompts, completions, reference)

    return reward


def align(
    policy,
    tokenizer,
    out_dir: Path,
    config: AlignMethodConfig,
    runtime: Runtime,
    *,
    prompts: list[str] | None = None,
    references: list[str] | None = None,
    pairs: list[dict] | None = None,
    scorer=None,
    log: Log | None = None,
    checkpoints: Checkpoints | None = None,
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
    with training_dir(checkpoints, "align-", config.method, log) as (output_dir, resume, save):
        common = trainer_kwargs(
            output_dir=output_dir,
            save=save,
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
                train_dataset=Dataset.from_list(
                    [
                        {"prompt": p, "reference": r}
                        for p, r in zip(prompts, references or [""] * len(prompts), strict=True)
                    ]
                ),
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=[hf_callback(progress)],
            )
        _quiet(trainer)
        trainer.train(resume_from_checkpoint=resume)
        history = History(trainer.state.log_history)
        model = trainer.model
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    kl = history.series("kl")
    reward_key = next(
        (
            k
            for k in (
                "reward",
                "rewards/reward/mean",
                "rewards/reward_model/mean",
                "rewards/chosen",
            )
            if history.series(k)
        ),
        "reward",
    )
    return AlignResult(
        path=Path(out_dir),
        method=config.method,
        mean_kl=sum(v for _, v in kl) / len(kl) if kl else None,
        reward_curve=history.series(reward_key),
        kl_curve=kl,
        loss_curve=history.series("loss"),
        seconds=progress.elapsed,
        resumed_from=resumed_step(resume),
    )


@dataclass
class AlignOutcome:
    """Alignment and the aligned model scored on the eval split before and after."""

    result: AlignResult
    before: EvalResult  # the SFT policy's
    after: EvalResult  # the aligned model's (the SFT policy's when skipped)
    soft_prompt_tokens: int
    kept: str = "aligned"  # the attempt's candidate saved in out_dir: "aligned" or "sft"
    reason: str = ""  # why


def better_of(before, after) -> tuple[str, str]:
    """Which of the SFT model (``before``) and the aligned one (``after``), both scored on the eval
    split, is the attempt's candidate: the better on the primary metric, the aligned one on a tie
    unless it lowered the reward."""
    m = after.metric
    gained = after.primary - before.primary
    reward_kept = (after.mean_reward or 0.0) >= (before.mean_reward or 0.0)
    if gained > 0 or (gained == 0 and reward_kept):
        return (
            "aligned",
            f"alignment kept or raised {m} ({before.primary:.4f} -> {after.primary:.4f})",
        )
    what = (
        f"{m} {before.primary:.4f} -> {after.primary:.4f}"
        if gained
        else (f"reward {before.mean_reward:.4f} -> {after.mean_reward:.4f} at equal {m}")
    )
    return "sft", f"alignment lowered {what}: the SFT model is the attempt's candidate"


def align_and_score(
    policy,
    tokenizer,
    out_dir: Path,
    config: AlignMethodConfig,
    runtime: Runtime,
    *,
    prompts: list[str],
    references: list[str],
    pairs: list[dict],
    scorer,
    split,
    max_new_tokens: int,
    batch_size: int,
    log: Log | None = None,
    skip: str | None = None,
    checkpoints: Checkpoints | None = None,
) -> AlignOutcome:
    """Score the SFT ``policy`` on ``split`` (an ``EvalSplit``) with the reward, align it and
    score the aligned model the way the later stages load it; save the better of the two
    (``better_of``) to ``out_dir``, the attempt's candidate. With ``skip`` (why: a reward model
    too weak to trust) nothing is trained and the SFT model is the candidate."""
    from lifecycle_dagster.ml.evaluate import score_split
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
    from lifecycle_dagster.ml.soft_prompt import soft_tokens

    def score(model, tok, label):
        return score_split(
            model,
            tok,
            split,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            reward=scorer,
            log=log,
            stage=label,
        )

    soft = len(soft_tokens(tokenizer))
    policy.eval()  # scored as evaluation scores it (its answers are reused from the SFT stage's)
    before = score(policy, tokenizer, "aligned_model[sft eval]")
    out_dir = Path(out_dir)
    if skip:
        if log:
            log(f"aligned_model: alignment skipped: {skip}")
        policy.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        skipped = AlignResult(path=out_dir, method="skipped", mean_kl=None)
        return AlignOutcome(skipped, before, before, soft, "sft", f"alignment skipped: {skip}")
    # The SFT model as it is now, kept in case alignment makes it worse.
    sft_copy = out_dir.parent / f".{out_dir.name}-sft"
    policy.save_pretrained(sft_copy, safe_serialization=True)
    tokenizer.save_pretrained(sft_copy)
    policy.train()
    result = align(
        policy,
        tokenizer,
        out_dir,
        config,
        runtime,
        prompts=prompts,
        references=references,
        pairs=pairs,
        scorer=scorer,
        log=log,
        checkpoints=checkpoints,
    )
    after = score(load_causal_lm(out_dir, runtime), load_tokenizer(out_dir), "aligned_model[eval]")
    kept, reason = better_of(before, after)
    if kept == "sft":
        shutil.rmtree(out_dir)
        os.replace(sft_copy, out_dir)
    else:
        shutil.rmtree(sft_copy)
    if log:
        log(f"aligned_model: {reason}")
    return AlignOutcome(result, before, after, soft, kept, reason)
