"""The production deployment on real components (see ``deployment_stack.py``): PostgreSQL for Dagster
and MLflow, an `mlflow server`, and Dagster's code server, daemon and webserver as separate
processes with `deploy/dagster.yaml`.

Two use cases are submitted at once over GraphQL, as a platform team's clients would: both run
to the end from the queue, every asset of each is materialized, runs and events live in
PostgreSQL, the MLflow records reach the server, and no two training steps (the `train` pool,
limit 1) ever overlap, although the two runs do."""

import time

import dagster as dg
import pytest
from deployment_stack import Deployment
from mlflow.tracking import MlflowClient

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.ml.usecase_loader import load_use_case

USE_CASES = ("dialogue_summarisation", "dialogue_intent")
DEADLINE_S = 900


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        yield d.start()
    finally:
        leftover = d.stop()
        assert not leftover, f"still running 60 s after SIGTERM: {leftover}"


@pytest.fixture(scope="module")
def instance(deployment):
    # The test reads the deployment's instance as any Dagster process would: DAGSTER_HOME with
    # deploy/dagster.yaml, PostgreSQL credentials from the environment.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in deployment.env.items():
            if key.startswith("DAGSTER_PG_"):
                mp.setenv(key, value)
        inst = dg.DagsterInstance.from_config(str(deployment.home))
        yield inst
        inst.dispose()


def submit(deployment, instance, use_case: str) -> str:
    from dagster_graphql import DagsterGraphQLClient

    instance.add_dynamic_partitions("use_cases", [use_case])  # what `lifecycle run` does first
    client = DagsterGraphQLClient("127.0.0.1", port_number=deployment.web_port)
    return client.submit_job_execution(
        "lifecycle_job",
        run_config={
            "ops": {"use_case": {"config": {"profile": "tiny", "use_case": use_case}}},
            # Steps in the run's own process: on 2 cores a process per step would mostly measure
            # imports. The queue, the daemon, the pools and the stores are the deployment's.
            "execution": {"config": {"in_process": {}}},
        },
        tags={"lifecycle/profile": "tiny", "dagster/partition": use_case},
    )


@pytest.fixture(scope="module")
def two_runs(deployment, instance):
    started = time.monotonic()
    run_ids = {uc: submit(deployment, instance, uc) for uc in USE_CASES}
    deadline = started + DEADLINE_S

    def finished():
        runs = [instance.get_run_by_id(r) for r in run_ids.values()]
        return all(r is not None and r.is_finished for r in runs) and runs

    runs = deployment.wait_for("both runs to finish", finished, deadline, every=5)
    timeline = {uc: time.monotonic() - started for uc in USE_CASES}
    print(f"\ndeployment: both runs finished in {max(timeline.values()):.0f} s after submission")
    return run_ids, runs


def test_both_use_cases_run_to_the_end_from_the_queue(deployment, instance, two_runs):
    run_ids, runs = two_runs
    for run in runs:
        assert run.status == dg.DagsterRunStatus.SUCCESS, deployment.logs()
    graph = defs().resolve_asset_graph()
    expected = {k for k in graph.materializable_asset_keys}
    for uc, run_id in run_ids.items():
        done = {
            e.asset_key
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        }
        assert expected <= done, (uc, sorted(k.to_user_string() for k in expected - done))
        # The run went through the queue and the daemon launched it.
        events = {e.dagster_event_type for e in instance.all_logs(run_id)}
        assert dg.DagsterEventType.RUN_ENQUEUED in events


def test_runs_and_events_are_stored_in_postgresql(deployment, instance, two_runs):
    run_ids, _ = two_runs
    stored = deployment.pg.psql("SELECT run_id FROM runs").split()
    assert set(run_ids.values()) <= set(stored)
    ids = ", ".join(f"'{r}'" for r in run_ids.values())
    events = int(deployment.pg.psql(f"SELECT count(*) FROM event_logs WHERE run_id IN ({ids})"))
    assert events > 100
    assert (
        deployment.pg.psql(
            "SELECT count(*) FROM asset_keys WHERE asset_key LIKE '%champion_model%'"
        )
        == "1"
    )


def test_mlflow_records_reach_the_tracking_server(deployment, two_runs):
    client = MlflowClient(deployment.mlflow_url)
    for uc in USE_CASES:
        name = load_use_case(use_case=uc, profile="tiny").name
        exp = client.get_experiment_by_name(name)
        assert exp is not None, name
        runs = client.search_runs([exp.experiment_id])
        stages = {r.data.tags.get("lifecycle.stage") for r in runs}
        assert {"lifecycle_run", "sft_adapter", "aligned_model", "evaluation"} <= stages
    # MLflow's own tables are in PostgreSQL too.
    assert int(deployment.pg.psql("SELECT count(*) FROM runs", db="mlflow")) >= 2 * 10


def test_training_steps_never_overlap_across_runs(instance, two_runs):
    """The runs overlap, their `train` pool steps (limit 1) never do."""
    run_ids, _ = two_runs
    graph = defs().resolve_asset_graph()
    train = {
        k.to_user_string()
        for k in graph.materializable_asset_keys
        if graph.get(k).pools == {"train"}
    }
    spans, runs = [], []
    for run_id in run_ids.values():
        starts, times = {}, []
        for e in instance.all_logs(run_id):
            if not e.is_dagster_event:
                continue
            times.append(e.timestamp)
            step = e.step_key
            if step in train and e.dagster_event_type == dg.DagsterEventType.STEP_START:
                starts[step] = e.timestamp
            elif step in starts and e.dagster_event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                spans.append((starts.pop(step), e.timestamp, f"{run_id[:8]}:{step}"))
        runs.append((min(times), max(times)))
    assert len(spans) >= 2 * len({"base_model", "sft_adapter", "aligned_model"})
    (a0, a1), (b0, b1) = runs
    assert a0 < b1 and b0 < a1, "the two runs did not run at the same time"
    spans.sort()
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:], strict=False):
        assert s1 >= e0, f"{n1} started {e0 - s1:.1f} s before {n0} ended"
