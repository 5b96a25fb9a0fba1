"""Resource bindings: local (state dir, sqlite MLflow) unless LIFECYCLE_ENV=production; with
LIFECYCLE_EXECUTOR=k8s, every step runs in its own Kubernetes pod."""

import os

import dagster as dg

from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.definitions
def resources() -> dg.Definitions:
    if os.environ.get("LIFECYCLE_ENV") == "production":
        bound = {
            "artifact_store": ArtifactStore(root=dg.EnvVar("LIFECYCLE_ARTIFACT_ROOT")),
            "mlflow_tracking": MlflowTracking(
                tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"), ui_url=dg.EnvVar("MLFLOW_UI_URL")
            ),
            "compute": Compute(),
        }
    else:
        bound = {
            "artifact_store": ArtifactStore(),
            "mlflow_tracking": MlflowTracking(),
            "compute": Compute(),
        }
    if os.environ.get("LIFECYCLE_EXECUTOR") == "k8s":
        # Each step in its own Kubernetes pod; heavy steps carry their GPU request
        # (lib/k8s.py). Needs the `deploy` extra.
        from dagster_k8s import k8s_job_executor

        return dg.Definitions(resources=bound, executor=k8s_job_executor)
    return dg.Definitions(resources=bound)
