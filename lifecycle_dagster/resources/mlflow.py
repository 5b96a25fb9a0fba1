"""MLflow tracking as a Dagster resource: one experiment per use case, one run per materialization.

Uses ``MlflowClient`` with explicit run ids, never the fluent global state, so concurrent steps and
tests with their own stores do not interfere.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from lifecycle_dagster import settings


class StageRun:
    """One MLflow run: params, metrics (with steps), artifacts; ``url`` for Dagster metadata."""

    def __init__(self, client, run_id: str, experiment_id: str, ui_url: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.url = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [
            Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:6000])
            for k, v in params.items()
        ]
        self._batch(params=items)

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._batch(metrics=[(k, v, step or 0) for k, v in metrics.items() if v is not None])

    def log_curve(self, name: str, points: list[tuple[int, float]]) -> None:
        self._batch(metrics=[(name, v, int(s)) for s, v in points])

    def _batch(self, metrics=(), params=(), tags=()) -> None:
        """One ``log_batch`` request per MLflow limit's worth (1000 metrics, 100 params or tags),
        instead of one request per value: what matters against a remote tracking server."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s)) for k, v, s in metrics]
        params, tags = list(params), list(tags)
        while metrics or params or tags:
            self.client.log_batch(
                self.run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100]
            )
            metrics, params, tags = metrics[1000:], params[100:], tags[100:]

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: list[dict], name: str) -> None:
        """Rows as an MLflow table (``name``.json), which the MLflow UI shows and compares."""
        import pandas as pd

        if rows:
            self.client.log_table(self.run_id, pd.DataFrame(rows), f"{Path(name).stem}.json")

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._batch(tags=[RunTag(k, str(v)) for k, v in tags.items()])


_READY: set[str] = set()  # sqlite stores this process has seen created


def ensure_store(uri: str) -> None:
    """Create (and migrate) a sqlite tracking store once, under a file lock: two runs starting
    at once on a fresh store would otherwise both run MLflow's schema migrations and one fails
    half way. Other backends (PostgreSQL) are migrated by their own deployment."""
    if not uri.startswith("sqlite:///") or uri in _READY:
        return
    import fcntl

    from mlflow.tracking import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)


class MlflowTracking(dg.ConfigurableResource):
    """Where stage runs are recorded. Defaults to a sqlite store under the state directory."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI; '' = sqlite in state dir."
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI.")

    def _uri(self) -> str:
        return self.tracking_uri or settings.mlflow_uri()

    def client(self):
        from mlflow.tracking import MlflowClient

        ensure_store(self._uri())
        return MlflowClient(tracking_uri=self._uri())

    def registry(self):
        from lifecycle_dagster.resources.registry import ModelRegistry

        ensure_store(self._uri())
        return ModelRegistry(self._uri())

    def experiment_id(self, name: str) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self._uri().startswith("sqlite:"):
            location = (settings.mlflow_artifacts() / name).as_uri()
        return client.create_experiment(name, artifact_location=location)

    @contextlib.contextmanager
    def stage_run(
        self, experiment: str, stage: str, tags: dict | None = None
    ) -> Iterator[StageRun]:
        """A run that ends FINISHED, or FAILED if the body raises."""
        client = self.client()
        exp_id = self.experiment_id(experiment)
        run = client.create_run(
            exp_id, run_name=stage, tags={"lifecycle.stage": stage, **(tags or {})}
        )
        stage_run = StageRun(client, run.info.run_id, exp_id, self.ui_url)
        try:
            yield stage_run
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        client.set_terminated(run.info.run_id, "FINISHED")

    def stage_run_id(self, experiment: str, dagster_run_id: str, stage: str) -> str | None:
        """The MLflow run one stage of one Dagster run recorded, if any."""
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs(
            [exp.experiment_id],
            f"tags.`dagster.run_id` = '{dagster_run_id}' and tags.`lifecycle.stage` = '{stage}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def runs(self, experiment: str) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], max_results=1000)
