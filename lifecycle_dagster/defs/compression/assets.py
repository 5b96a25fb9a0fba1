"""Compress: the aligned model's pruned and distilled students, then the model and its students
exported to ONNX with KV cache (fp32, int8, int4), each proven against PyTorch and scored on the
eval split; the use case's policy picks the one to deploy."""

from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES, follows_upstream, use_case_check
from lifecycle_dagster.lib.results import onnx_result, students_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.compress import scored_split
from lifecycle_dagster.ml.data import EvalSplit
from lifecycle_dagster.resources.artifacts import ArtifactStore, newest_metadata, resolve
from lifecycle_dagster.resources.compute import Compute
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


def passed_candidate(context, asset: str) -> tuple[dict, str, Path]:
    """The newest evaluation's verdict, and the candidate it passed: where it is recorded (its
    identity, checked at promotion) and where this pod reads it (fetched from object storage
    when the store is there). Never a newer, unjudged candidate; nothing while the newest verdict
    is a failure."""
    verdict = newest_metadata(context, "evaluation")
    if verdict.get("verdict") != "pass":
        raise dg.Failure(
            f"{asset}: no passing evaluation to compress (latest verdict: "
            f"{verdict.get('verdict', 'none')}); the candidate below thresholds is not compressed"
        )
    return (
        verdict,
        f"{verdict['candidate_path']}/model",
        resolve(verdict["candidate_path"]) / "model",
    )


@dg.asset(
    group_name="compression",
    partitions_def=USE_CASES,
    automation_condition=follows_upstream("evaluation", "task_dataset"),
    kinds={"pytorch", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["aligned_model", "evaluation", "task_dataset"],
    pool="train",
    op_tags=training_op_tags(),
    check_specs=[
        use_case_check(
            "students_learn",
            asset="distilled_model",
            description="Every student ends closer to the teacher than it began: its KL "
            "divergence to the teacher's next-token distribution on the eval prompts fell.",
        )
    ],
)
def distilled_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
    training: Training,
) -> dg.MaterializeResult:
    """Smaller students of the candidate the evaluation passed: depth-pruned (the least
    influential blocks dropped, healed by distillation) and distilled (fewer blocks, trained on
    its logits), as the use case's ``distillation`` asks. onnx_model exports them as variants."""
    with stage(context, "distilled_model", artifact_store, mlflow_tracking) as st:
        _, teacher_id, teacher = passed_candidate(context, "distilled_model")
        with st.write() as tmp:
            step = training.run(
                context,
                "distilled_model",
                st.log,
                uc=st.use_case,
                teacher=teacher,
                teacher_id=teacher_id,
                data=artifact_store.upstream(context, "task_dataset"),
                out=tmp,
                compute=compute.request(st.use_case.compute),
            )
        return students_result(st, step)


@dg.asset(
    group_name="compression",
    partitions_def=USE_CASES,
    # A new aligned model is exported; a re-evaluation of the same one (the daily schedule) is not.
    automation_condition=follows_upstream("evaluation", "task_dataset", "reward_model"),
    kinds={"onnx", "mlflow"},
    owners=OWNERS,
    code_version="2",
    deps=["aligned_model", "evaluation", "task_dataset", "reward_model", "distilled_model"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
    check_specs=[
        use_case_check(name, asset="onnx_model", blocking=True, description=text)
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
    compression policy picks among the model's variants and its students' (smallest, fastest or
    best within the quality budget)."""
    with stage(context, "onnx_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        verdict, source_id, source = passed_candidate(context, "onnx_model")
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
                students=artifact_store.upstream(context, "distilled_model"),
                out=tmp,
                reference={
                    uc.primary_metric: verdict.get(f"aligned_{uc.primary_metric}"),
                    "mean_reward": verdict.get("aligned_mean_reward"),
                },
            )
        split = scored_split(EvalSplit.read(uc, data, source), uc.compression)
        return onnx_result(st, result, source_id, split)
