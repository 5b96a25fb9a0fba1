"""Scope: the use case, narrowly defined (task, data, model, methods, thresholds, budget)."""

import dagster as dg

from lifecycle_dagster.lib.configs import UseCaseConfig
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES
from lifecycle_dagster.lib.results import use_case_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.usecase_loader import load_use_case
from lifecycle_dagster.resources.artifacts import ArtifactStore, use_case_key
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
    uc = load_use_case(
        config.use_case_file or None,
        profile=config.profile or None,
        use_case=config.use_case or None,
        overrides=config.overrides or None,
    )
    key = use_case_key(context)
    if key and uc.name != key:
        raise dg.Failure(
            f"use_case: the use case is named '{uc.name}' but this run is for partition '{key}'; "
            f"launch partition '{uc.name}' (`lifecycle run` adds it) or rename the use case"
        )
    params = {
        "profile": config.profile,
        "base_model.source": uc.base_model.source,
        "adaptation.method": uc.adaptation.method,
        "alignment.method": uc.alignment.method,
    }
    with stage(
        context, "use_case", artifact_store, mlflow_tracking, use_case=uc, params=params
    ) as st:
        return use_case_result(st, config.profile, config.use_case_file)
