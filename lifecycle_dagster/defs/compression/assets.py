"""Compress: the aligned model exported to ONNX with KV cache in fp32, int8 and int4, each proven
against PyTorch and scored on the eval split; the use case's policy picks the one to deploy."""

from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.stage import (
    OWNERS,
    USE_CASES,
    follows_upstream,
    md_table,
    newest_metadata,
    stage,
    upstream,
)
from lifecycle_dagster.ml.compress import CompressConfig, QualityBudget, compress
from lifecycle_dagster.ml.data import eval_rows, prompts_for, read_rows, references
from lifecycle_dagster.ml.evaluate import RewardScorer
from lifecycle_dagster.ml.export import ExportConfig
from lifecycle_dagster.ml.runtime import select_runtime
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking

CHECKS = {
    "fp32_matches_pytorch": "fp32 export: next-token logits within the use case's tolerance on the "
    "check prompts, every greedy token and the decoded text equal to PyTorch's.",
    "kv_cache_in_use": "Every variant: decoding step by step with the KV cache gives the tokens and "
    "logits of a full recomputation (an export that silently drops its cache fails).",
    "within_quality_budget": "The deployed variant loses at most the budgeted ROUGE-L points and "
    "percent of mean reward on the eval split against the aligned model in PyTorch.",
}


@dg.asset(
    group_name="compression",
    partitions_def=USE_CASES,
    # A new aligned model is exported; a re-evaluation of the same one (the daily schedule) is not.
    automation_condition=follows_upstream("evaluation", "task_dataset", "reward_model"),
    kinds={"onnx", "mlflow"},
    owners=OWNERS,
    code_version="2",
    deps=["aligned_model", "evaluation", "task_dataset", "reward_model"],
    pool="train",
    check_specs=[
        dg.AssetCheckSpec(name, asset="onnx_model", blocking=True, description=text)
        for name, text in CHECKS.items()
    ],
)
def onnx_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """The deployable artifact: ONNX with KV cache run by onnxruntime, in the variant the use case's
    compression policy picks (smallest or fastest within the quality budget)."""
    with stage(context, "onnx_model", artifact_store, mlflow_tracking) as st:
        uc, c = st.use_case, st.use_case.compression
        # The comparison runs where onnxruntime runs: PyTorch on CPU in fp32.
        runtime = select_runtime("cpu", uc.compute.torch_threads, uc.compute.ort_threads)
        # Export exactly the candidate the newest evaluation passed, never a newer, unjudged one,
        # and nothing at all while the newest verdict is a failure.
        verdict = newest_metadata(context, "evaluation")
        if verdict.get("verdict") != "pass":
            raise dg.Failure(
                "onnx_model: no passing evaluation to export (latest verdict: "
                f"{verdict.get('verdict', 'none')}); the candidate below thresholds is not exported"
            )
        source = Path(verdict["candidate_path"]) / "model"
        evals = read_rows(upstream(context, artifact_store, "task_dataset") / "eval.jsonl")
        subset = eval_rows(uc, evals)
        config = CompressConfig(
            export=ExportConfig.from_spec(c),
            policy=c.policy,
            budget=QualityBudget(c.max_rouge_l_drop, c.max_reward_drop_pct),
            logits_atol=c.logits_atol,
            check_new_tokens=c.max_new_tokens,
            max_new_tokens=uc.evaluation.max_new_tokens,
            threads=runtime.ort_threads,
        )
        st.run.log_params({f"compression.{k}": v for k, v in c.model_dump().items()})
        with artifact_store.write(st.target) as tmp:
            result = compress(
                source,
                tmp,
                config,
                runtime=runtime,
                check_prompts=prompts_for(uc, evals[: c.check_prompts]),
                eval_prompts=prompts_for(uc, subset),
                eval_references=references(uc, subset),
                reward=RewardScorer(
                    upstream(context, artifact_store, "reward_model") / "model", runtime
                ),
                reference={
                    "rouge_l": verdict.get("aligned_rouge_l"),
                    "mean_reward": verdict.get("aligned_mean_reward"),
                },
                serving={
                    "use_case": uc.name,
                    "prompt_template": uc.task.prompt_template,
                    "instruction": uc.task.instruction,
                    "max_new_tokens": uc.evaluation.max_new_tokens,
                    "source_model": str(source),
                },
                log=st.log,
            )
        rows = [r.row() for r in result.variants.values()]
        st.run.log_text(md_table(rows), "variants.md")
        st.run.log_file(st.target / "selected.json")
        st.run.log_file(st.target / "faithfulness.json")
        st.run.log_table(
            [
                {"variant": n, "id": row["id"], "prediction": p}
                for n, r in result.variants.items()
                for row, p in zip(subset, r.predictions, strict=True)
            ],
            "predictions.jsonl",
        )
        for n, r in result.variants.items():
            st.run.log_metrics(
                {
                    f"{n}.{k}": v
                    for k, v in r.row().items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
        torch_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        fp32 = result.variants["fp32"]
        chosen = result.variants.get(result.selected or "", None)
        st.log(
            f"onnx_model: policy {c.policy}, deploying {result.selected or 'nothing'}"
            + (f" ({chosen.bytes / 1e6:.0f} MB, {chosen.tokens_per_s:.1f} tok/s)" if chosen else "")
        )
        metrics = {
            "pytorch_bytes": torch_bytes,
            "torch_tokens_per_s": fp32.faithfulness.torch_tokens_per_s,
            "max_abs_logit_diff_fp32": fp32.faithfulness.max_abs_logit_diff,
            "reference_rouge_l": result.reference["rouge_l"],
            "reference_mean_reward": result.reference.get("mean_reward"),
            **{f"export_seconds_{n}": s for n, s in result.export_seconds.items()},
        }
        if chosen:
            metrics |= {
                "onnx_bytes": chosen.bytes,
                "size_ratio": torch_bytes / max(1, chosen.bytes),
                "ort_tokens_per_s": chosen.tokens_per_s,
                # Both rates on the same check prompts and token budget, batch 1.
                "speedup": chosen.faithfulness.ort_tokens_per_s
                / max(1e-9, chosen.faithfulness.torch_tokens_per_s),
                "onnx_rouge_l": chosen.rouge_l,
                "onnx_mean_reward": chosen.mean_reward,
                "rouge_l_drop": chosen.rouge_l_drop,
                "reward_drop_pct": chosen.reward_drop_pct,
            }
        registered, version = st.register(
            "onnx",
            st.target,
            {
                "variant": result.selected or "none",
                "gates": "passed" if result.deployable else "failed",
                "source_model": str(source),
                **({"onnx_rouge_l": chosen.rouge_l, "bytes": chosen.bytes} if chosen else {}),
            },
        )
        budget = {
            "max_rouge_l_drop": c.max_rouge_l_drop,
            "max_reward_drop_pct": c.max_reward_drop_pct,
        }
        return st.result(
            metrics=metrics,
            metadata={
                "selected_variant": result.selected or "none",
                "policy": c.policy,
                "registered_model": registered,
                "registered_version": version,
                "source_model": str(source),
                "variants": dg.MetadataValue.md(md_table(rows)),
                "deploy_path": dg.MetadataValue.path(
                    str(st.target / result.selected) if result.selected else ""
                ),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="fp32_matches_pytorch",
                    passed=result.fp32_matches,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "logits_atol": c.logits_atol,
                        "max_abs_logit_diff": fp32.faithfulness.max_abs_logit_diff,
                        "token_agreement": fp32.faithfulness.token_agreement,
                        "text_equal": fp32.faithfulness.text_equal,
                        "prompts": c.check_prompts,
                    },
                ),
                dg.AssetCheckResult(
                    check_name="kv_cache_in_use",
                    passed=result.cache_in_use,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        n: r.faithfulness.cache_consistent for n, r in result.variants.items()
                    },
                ),
                dg.AssetCheckResult(
                    check_name="within_quality_budget",
                    passed=result.selected is not None,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        **budget,
                        "selected": result.selected or "none",
                        "within_budget": ", ".join(
                            n for n, r in result.variants.items() if r.within_budget
                        )
                        or "none",
                    },
                ),
            ],
        )
