"""What every lifecycle asset does around its ``ml/`` call: inputs, MLflow run, metadata."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg

from lifecycle_dagster import settings
from lifecycle_dagster.lib.partitions import ATTEMPT_TAG, REASON_TAG, STARTED_TAG, VERDICT_RUN_TAG
from lifecycle_dagster.lib.render import png_markdown, render_png
from lifecycle_dagster.ml.artifacts import read_manifest
from lifecycle_dagster.ml.objectstore import is_remote
from lifecycle_dagster.ml.progress import Checkpoints
from lifecycle_dagster.ml.usecase import UseCase
from lifecycle_dagster.resources.artifacts import (
    PATH_KEY,
    USABLE_KEY,
    ArtifactStore,
    upstream_metadata,
    use_case_key,
)
from lifecycle_dagster.resources.mlflow import ATTEMPT_STAGE, DatasetRef, MlflowTracking, StageRun
from lifecycle_dagster.resources.registry import registered_name


def attempt_of(context) -> int:
    """The re-adaptation attempt: the run's tag, else the attempt of the current SFT weights (a
    scheduled re-evaluation continues the ladder where it stands instead of restarting it)."""
    try:
        tag = context.run.tags.get(ATTEMPT_TAG)
    except AttributeError:
        return 1
    if tag is not None:
        return int(tag) if tag.isdigit() else 1
    if context.asset_key.to_user_string() == "sft_adapter":
        return 1
    return int(upstream_metadata(context, "sft_adapter").get("attempt", 1))


def attempt_started_at(context) -> float:
    """When attempt 1 of this experiment started (epoch seconds): carried in the run tags by the
    sensor, else this run's own start."""
    tag = context.run.tags.get(STARTED_TAG)
    if tag:
        return float(tag)
    record = context.instance.get_run_record_by_id(context.run.run_id)
    start = record.start_time if record and record.start_time else None
    return start or time.time()


def load_use_case(context, store: ArtifactStore) -> UseCase:
    return UseCase.model_validate_json(
        (store.upstream(context, "use_case") / "use_case.json").read_text()
    )


# Small files that describe a model, logged with its MLflow logged model (the weights stay in the
# artifact store): configs, the adapter's, the prompt format, the ONNX variant's.
DESCRIPTIVE_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "prompt_format.json",
    "genai_config.json",
)


@dataclass
class Stage:
    """One asset materialization: its log, its MLflow run, its artifact target and timings."""

    context: dg.AssetExecutionContext
    name: str
    use_case: UseCase
    run: StageRun
    attempt: StageRun  # the parent run of the whole lifecycle run
    target: Path
    tracking: MlflowTracking
    store: ArtifactStore
    started: float = field(default_factory=time.monotonic)
    model_id: str | None = None  # the MLflow logged model this stage produced, if any

    @property
    def attempt_no(self) -> int:
        return attempt_of(self.context)

    @property
    def metric(self) -> str:
        """The use case's primary metric: the one every stage reports first."""
        return self.use_case.primary_metric

    def write(self, extra: dict | None = None):
        """Write this stage's artifact: a temp dir, renamed into place with its manifest."""
        return self.store.write(self.target, extra)

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def checkpoints(self, settings_json: str) -> Checkpoints:
        """Where this step's trainer checkpoints go: one folder per run (a re-execution shares
        its root run's) and per training settings, so only the same training resumes there."""
        run = self.context.run
        digest = hashlib.sha256(settings_json.encode()).hexdigest()[:12]
        where = settings.checkpoints_root() / self.use_case.name / self.name
        prune_checkpoints(where, max_age_s=CHECKPOINT_MAX_AGE_S)
        return Checkpoints(
            where / f"{run.root_run_id or run.run_id}-{digest}",
            self.use_case.compute.checkpoint_steps,
        )

    def dataset(self, asset: str, filename: str) -> DatasetRef:
        """A file of an upstream asset's artifact (or this stage's own, once written) as an MLflow
        dataset named after the use case and the file, with the digest from its manifest."""
        root = self.target if asset == self.name else self.store.upstream(self.context, asset)
        path = root / filename
        digest = read_manifest(root)["files"][filename]["sha256"]
        with path.open() as f:
            first = f.readline()
            rows = (1 if first.strip() else 0) + sum(1 for line in f if line.strip())
        columns = list(json.loads(first)) if first.strip() else []
        name = f"{self.use_case.name}-{Path(filename).stem}"
        return DatasetRef(name, path, digest, rows, columns)

    def reads(self, attempt: bool = False, **files: tuple[str, str]) -> None:
        """Record the data files this stage read as MLflow dataset inputs, by context:
        ``reads(train=("task_dataset", "train.jsonl"))``; with ``attempt`` on the attempt's
        parent run too (the datasets themselves, once per lifecycle run)."""

        def record():
            datasets = {context: self.dataset(*where) for context, where in files.items()}
            self.run.log_datasets(datasets)
            if attempt:
                self.attempt.log_datasets(datasets)

        self.best_effort("dataset inputs", record)

    def best_effort(self, what: str, record, default=None):
        """MLflow records beyond the stage's run and metrics (dataset inputs, logged models, GenAI
        evaluations, prompt versions): one that cannot be written is a warning in the step's
        log, never a failed stage (the verdict and the artifact matter more)."""
        try:
            return record()
        except Exception as exc:
            self.context.log.warning(
                f"{self.name}: {what} not recorded in MLflow: {type(exc).__name__}: {exc}"
            )
            return default

    def log_model(self, name: str, path: Path, *, params: dict | None = None, **tags) -> str | None:
        """This stage's model as an MLflow logged model (``<use case>-<name>``): its parameters,
        where its weights are (``path``, in the artifact store) and its small descriptive files.
        The stage's metrics become the model's metrics."""
        files = [path / f for f in DESCRIPTIVE_FILES] + [self.target / "MANIFEST.json"]
        self.model_id = self.best_effort(
            "the logged model",
            lambda: self.run.log_model(
                f"{self.use_case.name}-{name}",
                params=params,
                tags={
                    "artifact.path": str(path),
                    "artifact.version": read_manifest(self.target)["version"],
                    "lifecycle.attempt": attempt_of(self.context),
                    "dagster.run_id": self.context.run.run_id,
                    **tags,
                },
                files=files,
            ),
        )
        return self.model_id

    def register(self, kind: str, source: Path, tags: dict | None = None) -> tuple[str, str]:
        """Register ``source`` (inside this stage's artifact) as a new version of the use case's
        ``kind`` model; the version becomes the ``candidate``. Returns (name, version)."""
        name = registered_name(self.use_case.name, kind)
        where = self.store.location(source)  # an object store's URI, else the local folder
        version = self.tracking.registry().register(
            name,
            where if is_remote(where) else source,
            run_id=self.run.run_id,
            model_id=self.model_id,
            tags={
                "dagster.run_id": self.context.run.run_id,
                "dagster.asset_key": self.context.asset_key.to_user_string(),
                "artifact.version": read_manifest(self.target)["version"],
                "lifecycle.attempt": attempt_of(self.context),
                **(tags or {}),
            },
            description=f"{self.use_case.name}: {kind} model ({self.use_case.description})".strip(),
        )
        self.log(f"{self.name}: registered {name} version {version} (alias candidate)")
        return name, version

    def plot(
        self, curves: dict[str, list[tuple[int, float]]], title: str, name: str
    ) -> dg.MetadataValue:
        """Render a curve plot once: an MLflow artifact (plots/NAME.png) and inline UI metadata."""
        return self.image(render_png(curves, title), title, name)

    def image(self, png: bytes, title: str, name: str) -> dg.MetadataValue:
        """Log PNG bytes to MLflow (plots/NAME.png) and return them as inline UI metadata."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(png)
            self.run.log_file(path, "plots")
        return dg.MetadataValue.md(png_markdown(png, title))

    def result(
        self,
        *,
        metrics: dict | None = None,
        metadata: dict | None = None,
        check_results: list | None = None,
    ) -> dg.MaterializeResult:
        """Record metrics in MLflow and build the materialization (path, URL, DataVersion)."""
        manifest = read_manifest(self.target)
        seconds = time.monotonic() - self.started
        metrics = {k: v for k, v in (metrics or {}).items() if v is not None}
        self.run.log_metrics({**metrics, "duration_s": seconds}, model_id=self.model_id)
        # The attempt's run carries every stage's figures, so attempts compare in one table.
        self.attempt.log_metrics({f"{self.name}.{k}": v for k, v in metrics.items()})
        self.attempt.log_metrics({f"{self.name}.duration_s": seconds})
        location = self.store.location(self.target)
        self.run.set_tags({"artifact.path": location, "artifact.version": manifest["version"]})
        meta: dict = {
            PATH_KEY: dg.MetadataValue.path(location),
            "mlflow_run": dg.MetadataValue.url(self.run.url),
            "mlflow_run_id": self.run.run_id,
            "artifact_version": manifest["version"],
            # The files the manifest lists: its own timestamp is not part of the artifact.
            "artifact_bytes": sum(f["bytes"] for f in manifest["files"].values()),
            "duration_s": round(seconds, 2),
            "attempt": attempt_of(self.context),
            "mlflow_attempt_run_id": self.attempt.run_id,
        }
        if self.model_id:
            meta["mlflow_model_id"] = self.model_id
        for key, value in metrics.items():
            meta[key] = float(value) if isinstance(value, float) else value
        meta.update(metadata or {})
        blocking_failed = [
            c.check_name
            for c in check_results or []
            if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR
        ]
        meta[USABLE_KEY] = not blocking_failed
        if blocking_failed:
            self.run.set_tags({"blocked_by": ", ".join(blocking_failed)})
        return dg.MaterializeResult(
            metadata=meta,
            check_results=check_results,
            data_version=dg.DataVersion(manifest["version"]),
        )


# Checkpoints of a run nobody re-executed within a week are of no use to anyone.
CHECKPOINT_MAX_AGE_S = 7 * 24 * 3600


def prune_checkpoints(where: Path, max_age_s: float) -> None:
    """Remove the checkpoint folders under ``where`` untouched for ``max_age_s``."""
    if not where.is_dir():
        return
    for folder in where.iterdir():
        try:
            if folder.is_dir() and time.time() - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except FileNotFoundError:
            continue


def check_registry_reach(store: ArtifactStore, mlflow: MlflowTracking) -> None:
    """An MLflow tracking server registers model versions by URI and refuses local paths: with
    one, artifacts must live where every pod and the server can name them (object storage).
    Checked as each stage opens, so a misconfigured deployment stops before any training."""
    remote_tracking = mlflow.uri.startswith(("http://", "https://", "databricks"))
    if remote_tracking and not store.on_object_storage:
        url = urlparse(mlflow.uri)  # named without any credentials its URI may carry
        server = f"{url.scheme}://{url.hostname or ''}" + (f":{url.port}" if url.port else "")
        raise dg.Failure(
            f"MLflow tracking server {server} cannot register model versions in a local "
            "artifact store; set LIFECYCLE_ARTIFACT_ROOT to object storage (s3://bucket/prefix), "
            "see deploy/README.md"
        )


@contextlib.contextmanager
def stage(
    context: dg.AssetExecutionContext,
    name: str,
    store: ArtifactStore,
    mlflow: MlflowTracking,
    use_case: UseCase | None = None,
    params: dict | None = None,
) -> Iterator[Stage]:
    """Open the MLflow run and the artifact target for one asset materialization."""
    check_registry_reach(store, mlflow)
    uc = use_case or load_use_case(context, store)
    tags = {
        "dagster.run_id": context.run.run_id,
        "dagster.job": context.job_name,
        "lifecycle.attempt": str(attempt_of(context)),
        "lifecycle.use_case": uc.name,
    }
    if reason := context.run.tags.get(REASON_TAG):
        tags["lifecycle.reason"] = reason
    if verdict_run := context.run.tags.get(VERDICT_RUN_TAG):
        # An escalated attempt: linked to the attempt whose failed verdict it answers.
        previous = mlflow.stage_run_id(uc.name, verdict_run, ATTEMPT_STAGE)
        if previous:
            tags["lifecycle.escalated_from"] = previous
    parent_id = mlflow.attempt_run(
        uc.name,
        context.run.run_id,
        create=opens_attempt(context),
        name=f"attempt {tags['lifecycle.attempt']} ({context.job_name} {context.run.run_id[:8]})",
        tags=tags,
    )
    tags["dagster.asset_key"] = context.asset_key.to_user_string()
    with mlflow.stage_run(uc.name, name, tags, parent_id=parent_id) as run:
        if params:
            run.log_params(params)
        context.log.info(f"{name}: MLflow run {run.url}")
        yield Stage(
            context=context,
            name=name,
            use_case=uc,
            run=run,
            attempt=StageRun(run.client, parent_id, run.experiment_id, mlflow.ui_url),
            target=store.target(name, context.run.run_id, use_case_key(context)),
            tracking=mlflow,
            store=store,
        )


def opens_attempt(context) -> bool:
    """Whether this step creates the run's MLflow parent run: the first (by name) of the assets
    the run executes that have no upstream among them. Every other step runs after one of them,
    or waits for the parent to appear (and should two ever create one, all use the oldest)."""
    layer = context.job_def.asset_layer
    selected = set(context.run.asset_selection or layer.selected_asset_keys)
    if steps := context.run.step_keys_to_execute:  # a re-execution runs only some of them
        selected = {k for k in selected if k.path[-1] in steps}
    graph = layer.asset_graph
    roots = [k for k in selected if not (set(graph.get(k).parent_keys) & selected)]
    return context.asset_key == min(roots, key=lambda k: k.to_user_string(), default=None)
