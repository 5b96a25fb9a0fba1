"""Adapt: prompt engineering (zero/few-shot in-context learning), then fine-tuning (peft + trl)."""

import json

import dagster as dg

from lifecycle_dagster.lib.configs import SFTAdapterConfig
from lifecycle_dagster.lib.stage import (
    FOLLOWS_UPSTREAM,
    OWNERS,
    USE_CASES,
    md_table,
    stage,
    upstream,
    upstream_metadata,
)
from lifecycle_dagster.ml.data import (
    eval_rows,
    format_prompt,
    prompts_for,
    read_rows,
    references,
    sft_records,
)
from lifecycle_dagster.ml.evaluate import evaluate_model
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.sft import METHODS, SFTMethodConfig, load_sft, train_sft
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.asset(
    group_name="adaptation",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "task_dataset"],
    pool="train",
)
def prompt_baseline(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """Prompt engineering: the base model with zero-, one- and few-shot prompts; no training."""
    with stage(context, "prompt_baseline", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        model_dir = model_dir_of(upstream(context, artifact_store, "base_model"))
        data = upstream(context, artifact_store, "task_dataset")
        train, evals = (
            read_rows(data / "train.jsonl"),
            eval_rows(uc, read_rows(data / "eval.jsonl")),
        )
        model, tok = load_causal_lm(model_dir, runtime), load_tokenizer(model_dir)
        refs = references(uc, evals)
        results = []
        for k in uc.prompting.shots:
            shots = train[:k]
            prompts = prompts_for(uc, evals, shots)
            res = evaluate_model(
                model,
                tok,
                prompts,
                refs,
                max_new_tokens=uc.prompting.max_new_tokens,
                batch_size=uc.evaluation.batch_size,
                with_perplexity=False,
                log=st.log,
                stage=f"prompt_baseline[{k}-shot]",
            )
            results.append(
                {
                    "strategy": f"{k}-shot",
                    "shots": k,
                    "rouge_l": res.rouge_l,
                    "example": res.predictions[0][:80] if res.predictions else "",
                }
            )
            st.run.log_metrics({"rouge_l": res.rouge_l}, step=k)
            st.run.log_metrics({f"rouge_l_{k}shot": res.rouge_l})
        best = max(results, key=lambda r: r["rouge_l"])
        template = format_prompt(uc, "{input}", train[: best["shots"]])
        with artifact_store.write(st.target) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2))
            (tmp / "best_template.txt").write_text(template)
            (tmp / "best.json").write_text(json.dumps({"shots": best["shots"]}))
        st.run.log_text(template, "best_template.txt")
        zero = next((r["rouge_l"] for r in results if r["shots"] == 0), None)
        return st.result(
            metrics={
                "best_rouge_l": best["rouge_l"],
                "zero_shot_rouge_l": zero,
                "best_shots": best["shots"],
            },
            metadata={
                "strategies": dg.MetadataValue.md(
                    md_table([{k: v for k, v in r.items() if k != "shots"} for r in results])
                ),
                "best_strategy": best["strategy"],
                "best_template": dg.MetadataValue.md(f"```\n{template[-1500:]}\n```"),
            },
        )


def sft_method_config(uc, config: SFTAdapterConfig) -> SFTMethodConfig:
    a = uc.adaptation
    if config.method and config.method not in METHODS:
        raise dg.Failure(
            f"sft_adapter: unknown method {config.method!r}; one of {', '.join(METHODS)}"
        )
    lora_r = config.lora_r or a.lora_r
    return SFTMethodConfig(
        method=config.method or a.method,
        max_steps=config.max_steps or a.max_steps,
        learning_rate=config.learning_rate or a.learning_rate,
        batch_size=a.batch_size,
        lora_r=lora_r,
        lora_alpha=max(a.lora_alpha, 2 * lora_r) if config.lora_r else a.lora_alpha,
        lora_dropout=a.lora_dropout,
        target_modules=a.target_modules,
        num_virtual_tokens=a.num_virtual_tokens,
        init_text=uc.task.instruction,
        seed=a.seed,
    )


@dg.asset(
    group_name="adaptation",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "peft", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "task_dataset", "prompt_baseline"],
    pool="train",
)
def sft_adapter(
    context: dg.AssetExecutionContext,
    config: SFTAdapterConfig,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """The adapted model: a soft prompt (prompt tuning), a LoRA adapter or fully fine-tuned
    weights. Evaluated as the later stages run it (a soft prompt baked into the vocabulary)."""
    with stage(context, "sft_adapter", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        method = sft_method_config(uc, config)
        st.run.log_params({k: v for k, v in method.__dict__.items()})
        model_dir = model_dir_of(upstream(context, artifact_store, "base_model"))
        data = upstream(context, artifact_store, "task_dataset")
        records = sft_records(uc, read_rows(data / "train.jsonl"))
        evals = eval_rows(uc, read_rows(data / "eval.jsonl"))
        st.log(f"sft_adapter: {method.method}, {method.max_steps} steps on {runtime.describe()}")
        with artifact_store.write(st.target) as tmp:
            result = train_sft(model_dir, records, tmp / "adapter", method, runtime, log=st.log)
            (tmp / "sft.json").write_text(
                json.dumps({"method": method.method, "config": method.__dict__}, default=str)
            )
        st.run.log_curve("train_loss", result.loss_curve)
        model, tok = load_sft(model_dir, st.target / "adapter", runtime)
        after = evaluate_model(
            model,
            tok,
            prompts_for(uc, evals),
            references(uc, evals),
            max_new_tokens=uc.evaluation.max_new_tokens,
            batch_size=uc.evaluation.batch_size,
            with_perplexity=False,
            log=st.log,
            stage="sft_adapter[eval]",
        )
        before = upstream_metadata(context, "prompt_baseline").get("best_rouge_l")
        return st.result(
            metrics={
                "loss_start": result.loss_start,
                "loss_end": result.loss_end,
                "trainable_fraction": result.trainable_fraction,
                "trainable_parameters": result.trainable_parameters,
                "rouge_l_before": before,
                "rouge_l_after": after.rouge_l,
                "train_seconds": result.seconds,
            },
            metadata={
                "method": method.method,
                "max_steps": method.max_steps,
                **(
                    {"num_virtual_tokens": method.num_virtual_tokens}
                    if method.method == "prompt_tuning"
                    else {"lora_r": method.lora_r}
                ),
                "is_adapter": result.is_adapter,
                "device": runtime.describe(),
                "loss_curve": st.plot(
                    {"loss": result.loss_curve}, f"SFT loss ({method.method})", "sft_loss"
                ),
            },
        )
