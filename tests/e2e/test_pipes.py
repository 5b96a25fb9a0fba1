"""Heavy steps through Dagster Pipes: a child process per step (the default launcher) gives the
asset what training in the run's own process gives, the same metadata, MLflow records and
losses; the step's progress lines reach the run's log; a step that fails says why.

Owns its use case (dialogue_intent on the tiny profile), its Dagster instance and its state."""

import os

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from lifecycle_dagster import settings
from lifecycle_dagster.definitions import defs
from lifecycle_dagster.ml.runtime import RuntimeRequest
from lifecycle_dagster.ml.usecase_loader import load_use_case
from lifecycle_dagster.resources.artifacts import records_of
from lifecycle_dagster.resources.training import Training

UC = "dialogue_intent"
STEPS = ["base_model", "sft_adapter"]  # pre-training from scratch, then LoRA fine-tuning
UPSTREAM = ["use_case", "task_dataset", "preference_dataset", "prompt_baseline"]


def run(instance, launcher: str, selection: list[str], run_config: dict | None = None):
    os.environ["LIFECYCLE_TRAINING"] = launcher  # read where the resources are bound
    try:
        job = defs().resolve_job_def("lifecycle_job")
        return job.execute_in_process(
            instance=instance,
            partition_key=UC,
            asset_selection=[dg.AssetKey(a) for a in selection],
            run_config=run_config or {},
            raise_on_error=False,
        )
    finally:
        os.environ["LIFECYCLE_TRAINING"] = "in_process"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with dg.DagsterInstance.local_temp(
        str(tmp_path_factory.mktemp("dagster")), overrides={"telemetry": {"enabled": False}}
    ) as instance:
        instance.add_dynamic_partitions("use_cases", [UC])
        config = {"ops": {"use_case": {"config": {"profile": "tiny", "use_case": UC}}}}
        here = run(instance, "in_process", UPSTREAM + STEPS, config)
        assert here.success
        piped = run(instance, "subprocess", STEPS)
        assert piped.success
        yield instance, here, piped


def materializations(instance, asset: str) -> tuple[dict, dict]:
    """The asset's metadata from the in-process run and from the Pipes run, in that order."""
    newest, previous = records_of(instance, asset, UC, limit=2)
    return tuple(
        {k: v.value for k, v in r.asset_materialization.metadata.items()}
        for r in (previous, newest)
    )


@pytest.mark.parametrize("asset", STEPS)
def test_a_step_through_pipes_records_what_it_records_in_process(runs, asset):
    instance, _, _ = runs
    here, piped = materializations(instance, asset)
    assert set(piped) == set(here)
    # Training is deterministic on CPU, so where it ran leaves every figure alone but the times.
    numbers = [
        k
        for k, v in here.items()
        if isinstance(v, int | float) and not any(t in k for t in ("seconds", "duration"))
    ]
    assert any(k.endswith("loss_end") for k in numbers), sorted(here)
    for key in numbers:
        assert piped[key] == pytest.approx(here[key], rel=1e-5, abs=1e-6), key
    client = MlflowClient(settings.mlflow_uri())
    a, b = (client.get_run(m["mlflow_run_id"]) for m in (here, piped))
    assert a.info.run_id != b.info.run_id
    assert a.data.params == b.data.params
    assert set(a.data.metrics) == set(b.data.metrics)
    (end,) = [k for k in b.data.metrics if k.endswith("loss_end")]
    assert b.data.metrics[end] < b.data.metrics[end.replace("_end", "_start")]  # it trained


def test_the_step_ran_in_a_child_process_whose_progress_reached_the_run_log(runs):
    instance, here, piped = runs
    lines = [e.user_message for e in instance.all_logs(piped.run_id)]
    assert any(line.startswith("sft_adapter: lora,") for line in lines)
    assert any(line.startswith("sft") and "loss" in line for line in lines), lines  # progress
    # The Pipes session, opened and closed by the external process, is in the run's log.
    assert any("[pipes]" in line for line in lines), lines[-20:]
    assert not any("[pipes]" in e.user_message for e in instance.all_logs(here.run_id))


def test_a_failing_step_names_its_cause(tmp_path):
    uc = load_use_case(profile="tiny", use_case=UC)
    empty = tmp_path / "data"  # a task dataset without its files
    empty.mkdir()

    @dg.asset
    def pretrained(context: dg.AssetExecutionContext) -> None:
        Training(launcher="subprocess").run(
            context,
            "base_model",
            context.log.info,
            uc=uc,
            data=empty,
            out=tmp_path / "out",
            compute=RuntimeRequest(),
            cache_dir=tmp_path / "cache",
        )

    result = dg.materialize([pretrained], raise_on_error=False)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    error = failure.step_failure_data.error
    causes = []
    while error is not None:
        causes.append(error.message)
        error = error.cause
    assert "StepFailed: step base_model: " in causes[-1]
    assert str(empty / "train.jsonl") in causes[-1]  # the step's own error, naming the file
    assert not (tmp_path / "out" / "model").exists()
