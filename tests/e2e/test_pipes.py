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
STEPS = ["sft_adapter"]  # LoRA fine-tuning (the deployment test runs every step through Pipes)
UPSTREAM = ["use_case", "task_dataset", "preference_dataset", "base_model", "prompt_baseline"]


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


def materializations(runs, asset: str) -> tuple[dict, dict]:
    """The asset's metadata from the in-process run and from the Pipes run, in that order."""
    instance, *results = runs
    by_run = {r.run_id: r for r in records_of(instance, asset, UC, limit=20)}
    return tuple(
        {k: v.value for k, v in by_run[r.run_id].asset_materialization.metadata.items()}
        for r in results
    )


@pytest.mark.parametrize("asset", STEPS)
def test_a_step_through_pipes_records_what_it_records_in_process(runs, asset):
    here, piped = materializations(runs, asset)
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


def test_a_lost_training_process_is_run_again_and_resumes(runs):
    """SIGKILL to the step's process mid-training (the OOM killer, a preempted node): the step is
    run again once in the same run and resumes from the lost attempt's last checkpoint."""
    import json
    import threading
    import time

    import psutil

    instance, _, _ = runs
    root = settings.checkpoints_root() / UC / "sft_adapter"
    before = set(root.glob("*"))
    seen: dict = {}

    def kill_mid_training():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = sorted(root.glob("*/checkpoint-*/trainer_state.json"))
            new = [p for p in done if p.parents[1] not in before]
            if new:
                owner = json.loads((new[-1].parents[1] / "owner.json").read_text())
                seen["step"] = int(new[-1].parent.name.split("-")[1])
                psutil.Process(owner["pid"]).kill()
                return
            time.sleep(0.2)

    # Checkpoints every 5 of 40 steps: a use case of its own settings, materialized first.
    overrides = {"compute": {"checkpoint_steps": 5}, "adaptation": {"max_steps": 40}}
    config = {"profile": "tiny", "use_case": UC, "overrides": overrides}
    assert run(
        instance, "in_process", ["use_case"], {"ops": {"use_case": {"config": config}}}
    ).success
    killer = threading.Thread(target=kill_mid_training, daemon=True)
    killer.start()
    result = run(instance, "subprocess", ["sft_adapter"])
    killer.join(timeout=10)
    assert "step" in seen, "no checkpoint was written to kill after"
    assert result.success
    events = [e.event_type_value for e in result.all_events if e.step_key == "sft_adapter"]
    assert events.count("STEP_UP_FOR_RETRY") == 1 and events[-1] == "STEP_SUCCESS"
    meta = {
        k: v.value
        for k, v in result.asset_materializations_for_node("sft_adapter")[0].metadata.items()
    }
    assert meta["resumed_from_step"] >= seen["step"]
    print(
        json.dumps(
            {"killed_after_checkpoint": seen["step"], "resumed_from": meta["resumed_from_step"]}
        )
    )
    assert set(root.glob("*")) == before  # trained: its checkpoints removed
