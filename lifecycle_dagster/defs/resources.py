"""Resource bindings: local (state dir, sqlite MLflow) unless LIFECYCLE_ENV=production.

The executor every job runs with, LIFECYCLE_EXECUTOR: `multiprocess` (the default: a process per
step), `in_process` (the run's steps one after another in its own process: a small host, where a
process per step mostly re-imports torch) or `k8s` (a Kubernetes pod per step).

Where the heavy steps train, LIFECYCLE_TRAINING: `subprocess` (the default: a child process
through Dagster Pipes), `k8s` (a pod per step through Pipes, with its GPU request) or
`in_process` (the step's own process; what the test tiers use)."""

import os

import dagster as dg

from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.training import LAUNCHERS, Training


@dg.definitions
def resources() -> dg.Definitions:
    launcher = os.environ.get("LIFECYCLE_TRAINING") or "subprocess"
    if launcher not in LAUNCHERS:
        raise ValueError(f"LIFECYCLE_TRAINING={launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    training = Training(launcher=launcher)
    if os.environ.get("LIFECYCLE_ENV") == "production":
        bound = {
            "artifact_store": ArtifactStore(root=dg.EnvVar("LIFECYCLE_ARTIFACT_ROOT")),
            "mlflow_tracking": MlflowTracking(
                tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"), ui_url=dg.EnvVar("MLFLOW_UI_URL")
            ),
            "compute": Compute(),
            "training": training,
        }
    else:
        bound = {
            "artifact_store": ArtifactStore(),
            "mlflow_tracking": MlflowTracking(),
            "compute": Compute(),
            "training": training,
        }
    return dg.Definitions(resources=bound, executor=executor(os.environ.get("LIFECYCLE_EXECUTOR")))


def executor(name: str | None) -> dg.ExecutorDefinition:
    if name == "k8s":
        # Each step in its own Kubernetes pod; heavy steps carry their GPU request
        # (lib/k8s.py). Needs the `deploy` extra.
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name == "in_process":
        return dg.in_process_executor
    if name in (None, "", "multiprocess"):
        return dg.multi_or_in_process_executor  # run config may still pick in_process
    raise ValueError(
        f"LIFECYCLE_EXECUTOR={name!r}: expected multiprocess (the default), in_process or k8s"
    )
