"""Scope: the use case, narrowly defined (task, data, model, methods, thresholds, budget)."""

import json
import shutil

import dagster as dg
import yaml

from lifecycle_dagster.lib.configs import UseCaseConfig
from lifecycle_dagster.lib.stage import (
    OWNERS,
    USE_CASES,
    json_md,
    md_table,
    stage,
    use_case_key,
)
from lifecycle_dagster.ml.usecase import load_use_case
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.asset(
    group_name="scope",
    partitions_def=USE_CASES,
    kinds={"yaml", "mlflow"},
    owners=OWNERS,
    code_version="1",
    description=__doc__,
)
def use_case(
    context: dg.AssetExecutionContext,
    config: UseCaseConfig,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """The resolved use case: the profile's base, the given file and overrides, validated."""
    overrides = yaml.safe_load(config.overrides) if config.overrides.strip() else None
    if overrides is not None and not isinstance(overrides, dict):
        raise dg.Failure("use_case: overrides must be a mapping")
    uc = load_use_case(
        config.use_case_file or None, profile=config.profile or None, overrides=overrides
    )
    key = use_case_key(context)
    if key and uc.name != key:
        raise dg.Failure(
            f"use_case: the use case is named '{uc.name}' but this run is for partition '{key}'; "
            f"launch partition '{uc.name}' (`lifecycle run` adds it) or rename the use case"
        )
    with stage(
        context,
        "use_case",
        artifact_store,
        mlflow_tracking,
        use_case=uc,
        params={
            "profile": config.profile,
            "base_model.source": uc.base_model.source,
            "adaptation.method": uc.adaptation.method,
            "alignment.method": uc.alignment.method,
        },
    ) as st:
        with artifact_store.write(st.target) as tmp:
            (tmp / "use_case.json").write_text(uc.to_json())
            (tmp / "sources.txt").write_text(
                "".join(
                    f"{split}: {getattr(uc.data, split)}\n"
                    for split in ("train", "eval", "preferences_train", "preferences_eval")
                )
            )
            if config.use_case_file:
                shutil.copy(config.use_case_file, tmp / "use_case.source.yaml")
        st.run.log_dict(json.loads(uc.to_json()), "use_case.json")
        thresholds = [
            {"metric": k, "threshold": v.describe()} for k, v in uc.evaluation.thresholds.items()
        ]
        return st.result(
            metadata={
                "name": uc.name,
                "task": uc.task.type,
                "profile": config.profile,
                "base_model_source": uc.base_model.source,
                "adaptation_method": uc.adaptation.method,
                "alignment_method": uc.alignment.method,
                "thresholds": dg.MetadataValue.md(md_table(thresholds) or "none"),
                "fingerprint": uc.fingerprint(),
                "resolved": json_md(json.loads(uc.to_json())),
            }
        )
