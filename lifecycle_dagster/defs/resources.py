"""Resource bindings: local (state dir, sqlite MLflow) unless LIFECYCLE_ENV=production."""

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
    return dg.Definitions(resources=bound)
