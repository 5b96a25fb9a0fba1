"""Deploy: the registry's champion. Every aligned model and ONNX artifact is registered as a
``candidate`` where it is made; this asset moves ``champion`` when the candidate passed evaluation and
its gates and beats the current champion on the use case's primary metric."""

import json
from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.stage import (
    FOLLOWS_UPSTREAM,
    OWNERS,
    USE_CASES,
    md_table,
    newest_metadata,
    stage,
    upstream_metadata,
)
from lifecycle_dagster.resources.artifacts import USABLE_KEY, ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.registry import CHAMPION


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
        metric = st.use_case.evaluation.primary_metric
        verdict = newest_metadata(context, "evaluation")
        onnx = upstream_metadata(context, "onnx_model")
        if not verdict.get("candidate_version") or not onnx.get("registered_version"):
            raise dg.Failure("champion_model: the candidate has no registered version to promote")
        passed = verdict.get("verdict") == "pass" and bool(onnx.get(USABLE_KEY))
        blocked = (
            f"regressed against the champion: {verdict.get('vs_champion')}"
            if verdict.get("regressed")
            else ""
        )
        evaluated = {
            "evaluation.path": str(verdict.get("artifact_path", "")),
            "evaluation.suite": str(verdict.get("suite", "")),
        }
        registry = mlflow_tracking.registry()
        if onnx.get("source_model") != str(Path(verdict["candidate_path"]) / "model"):
            blocked = blocked or "the ONNX artifact was exported from another candidate"
        aligned = registry.promote(
            verdict["candidate_model"],
            verdict["candidate_version"],
            metric=metric,
            value=float(verdict[f"aligned_{metric}"]),
            passed=passed,
            blocked=blocked,
            tags=evaluated,
        )
        # The ONNX artifact is promoted with the model it was exported from, never on its own.
        exported = registry.promote(
            onnx["registered_model"],
            onnx["registered_version"],
            metric=metric,
            value=float(onnx.get(f"onnx_{metric}", verdict[f"aligned_{metric}"])),
            passed=passed,
            blocked=blocked,
            tags=evaluated,
            follow=aligned,
        )
        decisions = [aligned, exported]
        rows = [
            {
                "model": d.name,
                "version": d.version,
                metric: round(d.value, 4),
                "champion_before": d.previous_version or "-",
                "promoted": d.promoted,
                "reason": d.reason,
                "champion_now": registry.aliases(d.name).get(CHAMPION, "-"),
            }
            for d in decisions
        ]
        for row in rows:
            st.log(
                f"champion_model: {row['model']} v{row['version']} "
                f"{'promoted' if row['promoted'] else 'not promoted'}: {row['reason']}"
            )
        with artifact_store.write(st.target) as tmp:
            (tmp / "promotion.json").write_text(json.dumps(rows, indent=2))
        st.run.log_text(md_table(rows), "promotion.md")
        st.run.set_tags({"promoted": str(any(d.promoted for d in decisions)).lower()})
        return st.result(
            metrics={"promoted": int(decisions[1].promoted)},
            metadata={
                "decisions": dg.MetadataValue.md(md_table(rows)),
                "onnx_champion": rows[1]["champion_now"],
                "aligned_champion": rows[0]["champion_now"],
                "registry": dg.MetadataValue.url(
                    f"{mlflow_tracking.ui_url}/#/models/{onnx['registered_model']}"
                ),
            },
        )
