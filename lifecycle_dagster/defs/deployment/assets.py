"""Deploy: the registry's champion. Every aligned model and ONNX artifact is registered as a
``candidate`` where it is made; this asset moves ``champion`` when the candidate passed evaluation and
its gates and beats the current champion on the use case's primary metric."""

import dagster as dg

from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES
from lifecycle_dagster.lib.results import champion_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.promotion import blocking_reason
from lifecycle_dagster.resources.artifacts import (
    USABLE_KEY,
    ArtifactStore,
    newest_metadata,
    upstream_metadata,
)
from lifecycle_dagster.resources.mlflow import MlflowTracking

user_feedback = dg.AssetSpec(
    "user_feedback",
    group_name="deployment",
    partitions_def=USE_CASES,
    kinds={"sql"},
    owners=OWNERS,
    description="What the deployed model's users say about its answers (`POST /v1/feedback` of "
    "`lifecycle serve`): ratings and preferences in the feedback store. `feedback_sensor` records "
    "a new version past the use case's `feedback.min_new` new pieces, and the preference data "
    "takes in the pairs they make.",
)


@dg.asset(
    group_name="deployment",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["evaluation", "onnx_model"],
)
def champion_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """The versions `lifecycle serve` loads: MLflow registry alias `champion` on the aligned model and
    on its ONNX artifact, moved only when the candidate passed and beats the current champion."""
    with stage(context, "champion_model", artifact_store, mlflow_tracking) as st:
        metric = st.use_case.primary_metric
        verdict = newest_metadata(context, "evaluation")
        onnx = upstream_metadata(context, "onnx_model")
        if not verdict.get("candidate_version") or not onnx.get("registered_version"):
            raise dg.Failure("champion_model: the candidate has no registered version to promote")
        registry = mlflow_tracking.registry()
        common = {
            "metric": metric,
            "passed": verdict.get("verdict") == "pass" and bool(onnx.get(USABLE_KEY)),
            "blocked": blocking_reason(verdict, onnx),
            "tags": {
                "evaluation.path": str(verdict.get("artifact_path", "")),
                "evaluation.suite": str(verdict.get("suite", "")),
            },
        }
        aligned = registry.promote(
            verdict["candidate_model"],
            verdict["candidate_version"],
            value=float(verdict[f"aligned_{metric}"]),
            **common,
        )
        # The ONNX artifact is promoted with the model it was exported from, never on its own.
        exported = registry.promote(
            onnx["registered_model"],
            onnx["registered_version"],
            value=float(onnx.get(f"onnx_{metric}", verdict[f"aligned_{metric}"])),
            follow=aligned,
            **common,
        )
        return champion_result(st, registry, [aligned, exported], onnx["registered_model"])
