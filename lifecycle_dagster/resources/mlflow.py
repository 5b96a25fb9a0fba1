"""MLflow tracking as a Dagster resource: one experiment per use case; in it one parent run per
lifecycle run (an attempt), with one nested run per materialization.

Uses ``MlflowClient`` with explicit run ids, never the fluent global state, so concurrent steps and
tests with their own stores do not interfere. (MLflow's GenAI evaluation and prompt registry only
have fluent entry points: ``resources/mlflow_genai.py`` sets the store right before each call.)
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from lifecycle_dagster import settings

ATTEMPT_STAGE = "lifecycle_run"  # the ``lifecycle.stage`` tag of an attempt's parent run
SETTLE_S = 1.0  # how long after creating an attempt run a step looks for an older one


@dataclass(frozen=True)
class DatasetRef:
    """A data file an MLflow run read: shown in the run's Dataset column with its digest."""

    name: str  # e.g. "dialogue_intent-train"
    path: Path
    digest: str  # the file's sha256 (first 16 hex digits shown)
    rows: int
    columns: Sequence[str] = ()

    def entity(self):
        from mlflow.entities import Dataset
        from mlflow.types import ColSpec, Schema

        schema = Schema([ColSpec("string", c) for c in self.columns]) if self.columns else None
        return Dataset(
            name=self.name,
            digest=self.digest[:16],
            source_type="local",
            source=json.dumps({"uri": self.path.resolve().as_uri()}),
            schema=json.dumps({"mlflow_colspec": schema.to_dict()}) if schema else None,
            profile=json.dumps({"num_rows": self.rows, "sha256": self.digest}),
        )


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

    def log_metrics(
        self,
        metrics: dict,
        step: int | None = None,
        *,
        model_id: str | None = None,
        dataset: DatasetRef | None = None,
    ) -> None:
        """Metrics of this run; with ``model_id`` (and ``dataset``) they are also the logged
        model's metrics, on that dataset, in MLflow's model view."""
        link = {"model_id": model_id}
        if dataset is not None:
            link |= {"dataset_name": dataset.name, "dataset_digest": dataset.digest[:16]}
        self._batch(
            metrics=[(k, v, step or 0) for k, v in metrics.items() if v is not None],
            link=link if model_id else None,
        )

    def log_datasets(self, datasets: dict[str, DatasetRef]) -> None:
        """The data files this stage read, as MLflow dataset inputs: ``{context: dataset}`` with
        a context such as ``train``, ``eval`` or ``preferences_train``."""
        from mlflow.entities import DatasetInput, InputTag

        self.client.log_inputs(
            self.run_id,
            datasets=[
                DatasetInput(ref.entity(), [InputTag("mlflow.data.context", context)])
                for context, ref in datasets.items()
            ],
        )

    def log_model(
        self,
        name: str,
        *,
        params: dict | None = None,
        tags: dict | None = None,
        files: Sequence[Path] = (),
        model_type: str = "",
    ) -> str:
        """An MLflow logged model this run produced: its parameters, its tags (where its weights
        are: the artifact store, not copied into MLflow) and small descriptive ``files`` (configs,
        the manifest). Returns its model id; metrics logged with it show on the model."""
        from mlflow.entities import LoggedModelOutput

        model = self.client.create_logged_model(
            self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            params={k: str(v)[:6000] for k, v in (params or {}).items()},
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_type=model_type or None,
        )
        for path in files:
            if path.is_file():
                self.client.log_model_artifact(model.model_id, str(path))
        self.client.finalize_logged_model(model.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id

    def log_curve(self, name: str, points: list[tuple[int, float]]) -> None:
        self._batch(metrics=[(name, v, int(s)) for s, v in points])

    def _batch(self, metrics=(), params=(), tags=(), link: dict | None = None) -> None:
        """One ``log_batch`` request per MLflow limit's worth (1000 metrics, 100 params or tags),
        instead of one request per value: what matters against a remote tracking server."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, int(s), **(link or {})) for k, v, s in metrics]
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
    # A sqlite file needs no connection pool: MLflow's default (5 + 10 overflow, 30 s waits) runs
    # dry in a long-lived process that records many runs and traces, and loses traces.
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
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


def settle(client, experiment_id: str, parent_id: str) -> None:
    """The attempt's status from its stage runs: FAILED once any failed (``failed_stage`` says
    which), RUNNING while any runs, else FINISHED. Each stage settles it after its own status is
    written, so the last one to end leaves the right status, whatever the order."""
    children = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=1000
    )
    status = {r.info.status for r in children}
    failed = [
        r.data.tags.get("lifecycle.stage", "?") for r in children if r.info.status == "FAILED"
    ]
    if failed:
        client.set_tag(parent_id, "failed_stage", ", ".join(sorted(failed)))
        client.set_terminated(parent_id, "FAILED")
    elif "RUNNING" in status:
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, "FINISHED")


class MlflowTracking(dg.ConfigurableResource):
    """Where stage runs are recorded. Defaults to a sqlite store under the state directory."""

    tracking_uri: str = Field(
        default="", description="MLflow tracking URI; '' = sqlite in state dir."
    )
    ui_url: str = Field(default="http://127.0.0.1:5000", description="Base URL of the MLflow UI.")

    def _uri(self) -> str:
        return self.tracking_uri or settings.mlflow_uri()

    @property
    def uri(self) -> str:
        """The tracking (and registry) store this resource records to."""
        return self._uri()

    def client(self):
        from mlflow.tracking import MlflowClient

        ensure_store(self._uri())
        return MlflowClient(tracking_uri=self._uri(), registry_uri=self._uri())

    def registry(self):
        from lifecycle_dagster.resources.registry import ModelRegistry

        ensure_store(self._uri())
        return ModelRegistry(self._uri())

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client()
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self._uri().startswith("sqlite:"):
            location = (settings.mlflow_artifacts() / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a step running beside this one
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def attempt_run(
        self,
        experiment: str,
        dagster_run_id: str,
        *,
        create: bool,
        name: str,
        tags: dict,
        wait_s: float = 120.0,
    ) -> str:
        """The parent run of one lifecycle run (one Dagster run: an attempt), which every stage
        run nests under. Exactly one step of a Dagster run creates it (``create``: the first
        asset of the run's selection); the others find it, waiting for it when they start at the
        same time. Its tags say the attempt, the use case and the attempt it escalates from."""
        deadline = time.monotonic() + (0 if create else wait_s)
        while (found := self.stage_run_id(experiment, dagster_run_id, ATTEMPT_STAGE)) is None:
            if create or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if found is not None:
            return found
        client = self.client()
        run = client.create_run(
            self.experiment_id(experiment),
            run_name=name,
            tags={"lifecycle.stage": ATTEMPT_STAGE, "dagster.run_id": dagster_run_id, **tags},
        )
        # Two steps that both created one (the opener never came): all settle on the oldest,
        # looked up once the other's run, created at about the same time, is surely stored.
        time.sleep(SETTLE_S)
        oldest = self.stage_run_id(experiment, dagster_run_id, ATTEMPT_STAGE)
        if oldest != run.info.run_id:
            client.delete_run(run.info.run_id)
        return oldest or run.info.run_id

    @contextlib.contextmanager
    def stage_run(
        self,
        experiment: str,
        stage: str,
        tags: dict | None = None,
        parent_id: str | None = None,
    ) -> Iterator[StageRun]:
        """A run that ends FINISHED, or FAILED if the body raises; nested under ``parent_id``
        (the attempt), which is RUNNING while a stage runs and ends as its latest stage did."""
        client = self.client()
        exp_id = self.experiment_id(experiment)
        tags = {"lifecycle.stage": stage, **(tags or {})}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = client.create_run(exp_id, run_name=stage, tags=tags)
        stage_run = StageRun(client, run.info.run_id, exp_id, self.ui_url)
        if parent_id:
            settle(client, exp_id, parent_id)
        try:
            yield stage_run
        except BaseException:
            client.set_terminated(run.info.run_id, "FAILED")
            if parent_id:
                settle(client, exp_id, parent_id)
            raise
        client.set_terminated(run.info.run_id, "FINISHED")
        if parent_id:
            settle(client, exp_id, parent_id)

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
            order_by=["attributes.start_time ASC", "attributes.run_id ASC"],
        )
        return runs[0].info.run_id if runs else None

    def runs(self, experiment: str) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], max_results=1000)
