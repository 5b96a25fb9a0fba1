"""Compress: the aligned model exported to ONNX with KV cache, quantised, verified against PyTorch."""

import json
from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.stage import OWNERS, md_table, stage, upstream, upstream_metadata
from lifecycle_dagster.ml.data import eval_rows, prompts_for, read_rows, references
from lifecycle_dagster.ml.evaluate import rouge_l
from lifecycle_dagster.ml.export import (
    ExportConfig,
    OrtDecoder,
    export_onnx,
    faithful,
    generate_texts,
    verify_against_torch,
)
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
from lifecycle_dagster.ml.runtime import select_runtime
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.asset(
    group_name="compression",
    kinds={"onnx", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["aligned_model", "evaluation", "task_dataset"],
    pool="train",
    check_specs=[
        dg.AssetCheckSpec(
            "onnx_matches_pytorch",
            asset="onnx_model",
            blocking=True,
            description="fp32 logits within tolerance, KV cache consistent, deployed variant's "
            "greedy tokens agree with PyTorch.",
        )
    ],
)
def onnx_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """The deployable artifact: ONNX with KV cache (fp32 and int8), run by onnxruntime."""
    with stage(context, "onnx_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        # The comparison runs where onnxruntime runs: PyTorch on CPU in fp32.
        runtime = select_runtime("cpu", uc.compute.torch_threads, uc.compute.ort_threads)
        # Export exactly the candidate that evaluation passed, never a newer, unjudged one.
        verdict = upstream_metadata(context, "evaluation")
        if verdict.get("verdict") != "pass":
            raise dg.Failure(
                "onnx_model: no passing evaluation to export (latest verdict: "
                f"{verdict.get('verdict', 'none')}); the candidate below thresholds is not exported"
            )
        source = Path(verdict["candidate_path"]) / "model"
        c = uc.compression
        with artifact_store.write(st.target) as tmp:
            result = export_onnx(source, tmp, ExportConfig(quantization=c.quantization), log=st.log)
            evals = read_rows(upstream(context, artifact_store, "task_dataset") / "eval.jsonl")
            prompts = prompts_for(uc, evals[: c.check_prompts])
            model, tok = load_causal_lm(source, runtime), load_tokenizer(source)
            checks = {
                name: verify_against_torch(
                    model,
                    tok,
                    OrtDecoder(path, runtime.ort_threads),
                    prompts,
                    max_new_tokens=c.max_new_tokens,
                    variant=name,
                )
                for name, path in result.variants.items()
            }
            (tmp / "selected.json").write_text(json.dumps({"variant": result.selected}))
            (tmp / "faithfulness.json").write_text(
                json.dumps({k: v.__dict__ for k, v in checks.items()}, indent=2, default=str)
            )
            # Task quality of the deployed variant on the evaluation split, against PyTorch's.
            subset = eval_rows(uc, evals)
            preds, _ = generate_texts(
                OrtDecoder(result.variants[result.selected], runtime.ort_threads),
                tok,
                prompts_for(uc, subset),
                uc.evaluation.max_new_tokens,
                log=st.log,
                stage=f"onnx_model[{result.selected} eval]",
            )
            onnx_rouge = sum(rouge_l(preds, references(uc, subset))) / len(subset)
        torch_rouge = upstream_metadata(context, "evaluation").get("aligned_rouge_l")
        fp32, chosen = checks["fp32"], checks[result.selected]
        passed = faithful(
            checks,
            result.selected,
            logits_atol=c.logits_atol,
            min_token_agreement=c.min_token_agreement,
        )
        rows = [
            {
                "variant": n,
                "bytes": result.sizes[n],
                "max_logit_diff": ch.max_abs_logit_diff,
                "token_agreement": ch.token_agreement,
                "text_equal": ch.text_equal,
                "cache_ok": ch.cache_consistent,
                "ort_tok_s": round(ch.ort_tokens_per_s, 1),
                "torch_tok_s": round(ch.torch_tokens_per_s, 1),
            }
            for n, ch in checks.items()
        ]
        st.run.log_text(md_table(rows), "faithfulness.md")
        st.run.log_file(st.target / "faithfulness.json")
        torch_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        return st.result(
            metrics={
                "onnx_bytes": result.sizes[result.selected],
                "pytorch_bytes": torch_bytes,
                "size_ratio": torch_bytes / max(1, result.sizes[result.selected]),
                "ort_tokens_per_s": chosen.ort_tokens_per_s,
                "torch_tokens_per_s": chosen.torch_tokens_per_s,
                "speedup": chosen.ort_tokens_per_s / max(1e-9, chosen.torch_tokens_per_s),
                "max_abs_logit_diff_fp32": fp32.max_abs_logit_diff,
                "token_agreement": chosen.token_agreement,
                "export_seconds": result.seconds,
                "onnx_rouge_l": onnx_rouge,
                "torch_rouge_l": torch_rouge,
                "rouge_l_delta": onnx_rouge - torch_rouge if torch_rouge is not None else None,
            },
            metadata={
                "selected_variant": result.selected,
                "variants": dg.MetadataValue.md(md_table(rows)),
                "deploy_path": dg.MetadataValue.path(str(st.target / result.selected)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="onnx_matches_pytorch",
                    passed=passed,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "logits_atol": c.logits_atol,
                        "max_abs_logit_diff_fp32": fp32.max_abs_logit_diff,
                        "token_agreement": chosen.token_agreement,
                        "min_token_agreement": c.min_token_agreement,
                        "cache_consistent": all(ch.cache_consistent for ch in checks.values()),
                    },
                )
            ],
        )
