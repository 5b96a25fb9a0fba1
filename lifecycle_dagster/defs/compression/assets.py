"""Compress: the aligned model exported to ONNX with KV cache in fp32, int8 and int4, each proven
against PyTorch and scored on the eval split; the use case's policy picks the one to deploy."""

import dagster as dg

from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES, follows_upstream
from lifecycle_dagster.lib.results import onnx_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.data import EvalSplit
from lifecycle_dagster.resources.artifacts import ArtifactStore, newest_metadata, resolve
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.training import Training

CHECKS = {
    "fp32_matches_pytorch": "fp32 export: next-token logits within the use case's tolerance on the "
    "check prompts, every greedy token and the decoded text equal to PyTorch's.",
    "kv_cache_in_use": "Every variant: decoding step by step with the KV cache gives the tokens and "
    "logits of a full recomputation (an export that silently drops its cache fails).",
    "within_quality_budget": "The deployed variant loses at most the budgeted points of the "
    "primary metric and percent of mean reward on the eval split against the aligned model in PyTorch.",
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
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
    check_specs=[
        dg.AssetCheckSpec(name, asset="onnx_model", blocking=True, description=text)
        for name, text in CHECKS.items()
    ],
)
def onnx_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    training: Training,
) -> dg.MaterializeResult:
    """The deployable artifact: ONNX with KV cache run by onnxruntime, in the variant the use case's
    compression policy picks (smallest or fastest within the quality budget)."""
    with stage(context, "onnx_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        # Export exactly the candidate the newest evaluation passed, never a newer, unjudged one,
        # and nothing at all while the newest verdict is a failure.
        verdict = newest_metadata(context, "evaluation")
        if verdict.get("verdict") != "pass":
            raise dg.Failure(
                "onnx_model: no passing evaluation to export (latest verdict: "
                f"{verdict.get('verdict', 'none')}); the candidate below thresholds is not exported"
            )
        # Where the candidate is recorded (its identity, checked at promotion) and where it is
        # read (this pod's copy, fetched from object storage when the store is there).
        source_id = f"{verdict['candidate_path']}/model"
        source = resolve(verdict["candidate_path"]) / "model"
        data = artifact_store.upstream(context, "task_dataset")
        st.run.log_params({f"compression.{k}": v for k, v in uc.compression.model_dump().items()})
        with st.write() as tmp:
            result = training.run(
                context,
                "onnx_model",
                st.log,
                uc=uc,
                source=source,
                source_id=source_id,
                data=data,
                reward=artifact_store.upstream(context, "reward_model"),
                out=tmp,
                reference={
                    uc.primary_metric: verdict.get(f"aligned_{uc.primary_metric}"),
                    "mean_reward": verdict.get("aligned_mean_reward"),
                },
            )
        return onnx_result(st, result, source_id, EvalSplit.read(uc, data, source))
