"""Align: a reward model from preference pairs, then reinforcement learning against it (trl)."""

import json
import shutil

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig
from lifecycle_dagster.lib.stage import (
    FOLLOWS_UPSTREAM,
    OWNERS,
    USE_CASES,
    stage,
    upstream,
)
from lifecycle_dagster.ml.align import AlignMethodConfig, align
from lifecycle_dagster.ml.data import (
    eval_rows,
    preference_records,
    prompts_for,
    read_rows,
    references,
)
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.reward import RewardMethodConfig, pairwise_accuracy, train_reward_model
from lifecycle_dagster.ml.sft import load_sft
from lifecycle_dagster.ml.soft_prompt import soft_tokens
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.asset(
    group_name="alignment",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "trl", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "preference_dataset"],
    pool="train",
)
def reward_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """A scalar reward model trained on the preference pairs (or an existing one, reused)."""
    with stage(context, "reward_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        prefs = upstream(context, artifact_store, "preference_dataset")
        train = preference_records(uc, read_rows(prefs / "preferences_train.jsonl"))
        held_out = preference_records(uc, read_rows(prefs / "preferences_eval.jsonl"))
        curve: list = []
        with artifact_store.write(st.target) as tmp:
            if uc.reward.source == "existing":
                st.log(f"reward_model: reusing {uc.reward.path}")
                shutil.copytree(uc.reward.path, tmp / "model")
            else:
                cfg = RewardMethodConfig(
                    max_steps=uc.reward.max_steps,
                    learning_rate=uc.reward.learning_rate,
                    batch_size=uc.reward.batch_size,
                    trainable_layers=uc.reward.trainable_layers,
                    seed=uc.reward.seed,
                )
                st.run.log_params(cfg.__dict__)
                base = model_dir_of(upstream(context, artifact_store, "base_model"))
                result = train_reward_model(base, train, tmp / "model", cfg, runtime, log=st.log)
                curve = result.loss_curve
            scorer = RewardScorer(tmp / "model", runtime)
            accuracy, margin = pairwise_accuracy(scorer, held_out)
            (tmp / "eval.json").write_text(
                json.dumps({"pairwise_accuracy": accuracy, "mean_margin": margin})
            )
        st.run.log_curve("train_loss", curve)
        meta = {
            "source": uc.reward.source,
            "held_out_pairs": len(held_out),
            "max_steps": uc.reward.max_steps if uc.reward.source == "train" else 0,
            "device": runtime.describe(),
        }
        if curve:
            meta["loss_curve"] = st.plot({"loss": curve}, "reward model loss", "reward_loss")
        return st.result(
            metrics={"pairwise_accuracy": accuracy, "mean_margin": margin}, metadata=meta
        )


@dg.asset(
    group_name="alignment",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "trl", "safetensors", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["sft_adapter", "reward_model", "task_dataset", "preference_dataset"],
    pool="train",
)
def aligned_model(
    context: dg.AssetExecutionContext,
    config: AlignedModelConfig,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """The SFT model aligned with the reward model (KL-regularised to the SFT reference), merged;
    a prompt-tuned model keeps its soft prompt as tokens in its vocabulary."""
    with stage(context, "aligned_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        a = uc.alignment
        method = AlignMethodConfig(
            method=config.method or a.method,
            max_steps=config.max_steps or a.max_steps,
            learning_rate=a.learning_rate,
            beta=a.beta if config.beta < 0 else config.beta,
            batch_size=a.batch_size,
            num_generations=a.num_generations,
            max_completion_length=a.max_completion_length,
            temperature=a.temperature,
            seed=a.seed,
        )
        st.run.log_params(method.__dict__)
        base = model_dir_of(upstream(context, artifact_store, "base_model"))
        sft_dir = upstream(context, artifact_store, "sft_adapter") / "adapter"
        reward_dir = upstream(context, artifact_store, "reward_model") / "model"
        data = upstream(context, artifact_store, "task_dataset")
        train = read_rows(data / "train.jsonl")
        evals = read_rows(data / "eval.jsonl")
        evals = eval_rows(uc, evals)
        prompts = prompts_for(uc, train)
        eval_prompts = prompts_for(uc, evals)
        refs = references(uc, evals)
        pairs = preference_records(
            uc,
            read_rows(
                upstream(context, artifact_store, "preference_dataset") / "preferences_train.jsonl"
            ),
        )
        scorer = RewardScorer(reward_dir, runtime)
        # The SFT model as one network (LoRA merged, a soft prompt baked into the vocabulary),
        # with the tokenizer that prompts it.
        policy, tok = load_sft(base, sft_dir, runtime, merge=True, training=True)
        soft_prompt = len(soft_tokens(tok))

        def score(model, tokenizer, label):
            return evaluate_model(
                model,
                tokenizer,
                eval_prompts,
                refs,
                max_new_tokens=uc.evaluation.max_new_tokens,
                batch_size=uc.evaluation.batch_size,
                reward=scorer,
                with_perplexity=False,
                log=st.log,
                stage=label,
            )

        before = score(policy, tok, "aligned_model[sft eval]")
        policy.train()
        with artifact_store.write(st.target) as tmp:
            result = align(
                policy,
                tok,
                tmp / "model",
                method,
                runtime,
                prompts=prompts,
                pairs=pairs,
                scorer=scorer,
                log=st.log,
            )
        aligned_dir = st.target / "model"
        after = score(
            load_causal_lm(aligned_dir, runtime), load_tokenizer(aligned_dir), "aligned_model[eval]"
        )
        st.run.log_curve("train_reward", result.reward_curve)
        st.run.log_curve("kl", result.kl_curve)
        st.run.log_curve("train_loss", result.loss_curve)
        curves = {"reward": result.reward_curve} if result.reward_curve else {}
        registered, version = st.register(
            "aligned",
            st.target,
            {"reward_after": after.mean_reward, "rouge_l_after": after.rouge_l},
        )
        return st.result(
            metrics={
                "reward_before": before.mean_reward,
                "reward_after": after.mean_reward,
                "rouge_l_before": before.rouge_l,
                "rouge_l_after": after.rouge_l,
                "mean_kl": result.mean_kl,
                "train_seconds": result.seconds,
            },
            metadata={
                "method": method.method,
                "beta": method.beta,
                "soft_prompt_tokens": soft_prompt,
                "registered_model": registered,
                "registered_version": version,
                "max_steps": method.max_steps,
                "device": runtime.describe(),
                **(
                    {
                        "reward_curve": st.plot(
                            curves, f"{method.method} training reward", "align_reward"
                        )
                    }
                    if curves
                    else {}
                ),
            },
        )
