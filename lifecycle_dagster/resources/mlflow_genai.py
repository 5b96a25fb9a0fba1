"""MLflow's GenAI side: every evaluation as an MLflow evaluation run with per-example assessments,
and the prompt baseline's best template in the prompt registry.

The evaluation suite's per-example metrics (the task kind's, harmlessness, length) run as MLflow
GenAI code scorers over the generations the evaluation already made (no second generation pass):
one evaluation run per scored model, nested under the stage's run and linked to that model's MLflow
logged model and to the eval dataset, so the MLflow UI compares models and attempts example by
example. These MLflow entry points use its fluent state: the store is set right before each call
and the active run and model are cleared after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

from lifecycle_dagster.resources.mlflow import DatasetRef, StageRun

EXPECTED = "expected_response"  # MLflow's name for the reference answer in ``expectations``
BEST_ALIAS = "best"  # the prompt version with the best score so far


def suite_scorers(task, suite, sample: tuple[str, str]) -> list:
    """The suite's per-example metrics as MLflow code scorers: the task kind's (``format_ok``
    among them), harmlessness and, for free text, length. Each scores one generation against its
    reference with the suite's own ``score``, so its mean is the evaluation's figure. Metrics only
    defined on a whole batch (macro-F1, corpus BLEU) stay in the stage's run metrics."""
    from mlflow.genai.scorers import scorer

    from lifecycle_dagster.ml.suite import score as suite_score

    def one(output: str, reference: str):
        return suite_score([output], [reference], suite, task=task)

    probe = one(*sample)
    names = [m for m in probe.means if m not in probe.task.corpus]

    def make(metric: str):
        @scorer(name=metric)
        def score(outputs, expectations) -> float:
            return float(one(str(outputs), expectations[EXPECTED]).per_example[0][metric])

        return score

    return [make(m) for m in names]


# While MLflow evaluates: no progress bar of its own, and one worker. The code scorers are cheap;
# MLflow's default of 10 concurrent workers, each writing traces and assessments, exhausts the
# tracking store's connection pool (sqlite: 5 + 10 overflow, 30 s waits) and loses the traces.
# Trace ids come from a generator of their own: OpenTelemetry's default draws them from Python's
# global ``random``, which training seeds (``set_seed``), so a rerun of the same use case reached
# evaluation in the same random state, drew the first run's trace ids and left its own run with
# none (the tracer is started inside ``_fluent``, so the setting takes effect there).
EVAL_ENV = {
    "TQDM_DISABLE": "1",
    "MLFLOW_GENAI_EVAL_MAX_WORKERS": "1",
    "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS": "1",
    "MLFLOW_TRACE_USE_ISOLATED_RANDOM_ID_GENERATOR": "true",
}


def _restore_env(saved: Mapping[str, str | None]) -> None:
    import os

    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import io
    import os

    saved = {k: os.environ.get(k) for k in EVAL_ENV}
    os.environ.update(EVAL_ENV)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        _restore_env(saved)


FLUENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def _fluent(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent state pointed at ``uri`` and the experiment for the body, and put back as
    it was after it: the store, the experiment, the environment variables MLflow sets with them
    (``settings.mlflow_uri()`` and child processes read ``MLFLOW_TRACKING_URI``) and the tracer,
    which exports to the store it was started with."""
    import os

    import mlflow
    from mlflow.tracing.provider import reset as reset_tracing
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in FLUENT_ENV}
    saved = (
        tracking_utils._tracking_uri,
        registry_utils._registry_uri,
        fluent._active_experiment_id,
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    reset_tracing()  # the tracer keeps the store it started with: traces go to this one
    try:
        yield
    finally:
        mlflow.flush_trace_async_logging()  # traces land in this store, not the next
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.clear_active_model()
        (
            tracking_utils._tracking_uri,
            registry_utils._registry_uri,
            fluent._active_experiment_id,
        ) = saved
        _restore_env(saved_env)
        reset_tracing()


def evaluate_models(
    uri: str,
    stage: StageRun,
    rows: Sequence[dict],
    inputs: Mapping[str, str],
    task,
    suite,
    *,
    model_ids: Mapping[str, str | None],
    dataset: DatasetRef,
    tags: Mapping[str, str],
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, dict[str, float]]:
    """One MLflow GenAI evaluation run per model in ``rows`` (the per-example table: ``model``,
    ``id``, ``prediction``, ``reference``), scored by the suite's code scorers. Returns each
    model's scorer means (``<metric>/mean``) as MLflow computed them."""
    import mlflow

    if not rows:
        return {}
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    first = rows[0]
    scorers = suite_scorers(task, suite, (first["prediction"], first["reference"]))
    means = {}
    with _fluent(uri, stage.experiment_id):
        for model, items in by_model.items():
            run = stage.client.create_run(
                stage.experiment_id,
                run_name=f"evaluate {model}",
                tags={**tags, "mlflow.parentRunId": stage.run_id, "lifecycle.model": model},
            )
            StageRun(stage.client, run.info.run_id, stage.experiment_id, "").log_datasets(
                {"eval": dataset}
            )
            data = [
                {
                    "inputs": {"id": r["id"], "input": inputs.get(r["id"], "")},
                    "outputs": r["prediction"],
                    "expectations": {EXPECTED: r["reference"]},
                }
                for r in items
            ]
            # MLflow's own progress bar and banner would interleave with the step's log lines.
            with mlflow.start_run(run_id=run.info.run_id), _quiet():
                result = mlflow.genai.evaluate(
                    data=data, scorers=scorers, model_id=model_ids.get(model)
                )
            means[model] = {k: float(v) for k, v in result.metrics.items()}
            traces = len(
                stage.client.search_traces(
                    locations=[stage.experiment_id], run_id=run.info.run_id, max_results=1000
                )
            )
            log(
                f"evaluation: MLflow GenAI evaluation of {model}: {len(items)} examples, "
                f"{traces} traces with assessments, {len(scorers)} code scorers "
                f"({', '.join(s.name for s in scorers)})"
                + ("" if traces == len(items) else " (WARNING: traces missing, see MLflow's log)")
            )
            mlflow.clear_active_model()
    return means


def register_best_prompt(
    uri: str,
    stage: StageRun,
    name: str,
    template: str,
    *,
    metric: str,
    score: float,
    message: str,
    tags: Mapping[str, str],
) -> tuple[int, bool]:
    """A new version of prompt ``name`` (``{{input}}`` where the task input goes) with its score
    as tags, linked to the stage's run; alias ``best`` moves to it when it scores at least as well
    as the version behind ``best`` on the same metric. Returns (version, whether it is best)."""
    import mlflow.genai
    from mlflow.exceptions import MlflowException

    with _fluent(uri, stage.experiment_id):
        version = mlflow.genai.register_prompt(
            name,
            template.replace("{input}", "{{input}}"),
            commit_message=message,
            tags={**tags, "metric": metric, "score": f"{score:.6f}"},
        )
        try:
            current = mlflow.genai.load_prompt(f"prompts:/{name}@{BEST_ALIAS}")
        except MlflowException:  # no version has the alias yet
            current = None
        best = current is None or (
            current.tags.get("metric") != metric
            or float(current.tags.get("score", "-inf")) <= score
        )
        if best:
            mlflow.genai.set_prompt_alias(name, BEST_ALIAS, version.version)
        stage.client.link_prompt_version_to_run(stage.run_id, version)
    return int(version.version), best
