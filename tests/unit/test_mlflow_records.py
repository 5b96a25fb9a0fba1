"""What MLflow records, on a temporary sqlite store: the evaluation suite as GenAI code scorers
with per-example assessments, the prompt registry's best version, and one attempt run per
lifecycle run even when its first steps start at once."""

import json
import os
import threading
import time

import pytest

from lifecycle_dagster.ml.usecase_loader import load_use_case
from lifecycle_dagster.resources.mlflow import ATTEMPT_STAGE, DatasetRef, MlflowTracking, StageRun
from lifecycle_dagster.resources.mlflow_genai import (
    evaluate_models,
    register_best_prompt,
    suite_scorers,
)


@pytest.fixture
def tracking(tmp_path):
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def stage_run(tracking, experiment="uc") -> StageRun:
    client = tracking.client()
    exp = tracking.experiment_id(experiment)
    run = client.create_run(exp, run_name="evaluation", tags={"lifecycle.stage": "evaluation"})
    return StageRun(client, run.info.run_id, exp, tracking.ui_url)


@pytest.mark.parametrize(
    ("use_case", "output", "reference", "expected"),
    [
        ("dialogue_intent", "late delivery", "late delivery", {"accuracy": 1.0, "format_ok": 1}),
        ("dialogue_intent", "I cannot tell", "late delivery", {"accuracy": 0.0, "format_ok": 0}),
        (
            "dialogue_slots",
            '{"name": "Yara", "day": "Thursday", "time": null}',
            json.dumps({"name": "Yara", "day": "Thursday", "time": "4 pm"}),
            {"json_valid": 1.0, "field_f1": 0.8},
        ),
        ("dialogue_slots", "Yara on Thursday", '{"name": "Yara"}', {"json_valid": 0.0}),
        ("dialogue_qa", "The Thursday.", "thursday", {"exact_match": 1.0, "token_f1": 1.0}),
    ],
)
def test_suite_scorers_score_one_generation_as_the_suite_does(
    use_case, output, reference, expected
):
    uc = load_use_case(use_case=use_case, profile="tiny")
    scorers = {s.name: s for s in suite_scorers(uc.task, uc.evaluation.suite, ("x", reference))}
    assert "harmless" in scorers and "format_ok" in scorers
    for name, value in expected.items():
        got = scorers[name](outputs=output, expectations={"expected_response": reference})
        assert got == pytest.approx(value, abs=1e-3), name


def test_every_model_is_an_mlflow_evaluation_run_with_per_example_assessments(tracking, tmp_path):
    uc = load_use_case(use_case="dialogue_intent", profile="tiny")
    parent = stage_run(tracking)
    model = parent.log_model("uc-sft", params={"method": "lora"})
    data = tmp_path / "eval.jsonl"
    data.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n')
    dataset = DatasetRef("uc-eval", data, "ab" * 32, 3, ["id"])
    gold = ["late delivery", "tech support", "late delivery"]
    outputs = {"base": ["no idea", "tech support", "hello"], "sft": gold}
    rows = [
        {"model": m, "id": i, "prediction": p, "reference": g}
        for m, preds in outputs.items()
        for i, p, g in zip("abc", preds, gold, strict=True)
    ]
    means = evaluate_models(
        tracking.uri,
        parent,
        rows,
        {"a": "dialogue a", "b": "dialogue b", "c": "dialogue c"},
        uc.task,
        uc.evaluation.suite,
        model_ids={"base": None, "sft": model},
        dataset=dataset,
        tags={"dagster.run_id": "r1"},
    )
    assert means["base"]["accuracy/mean"] == pytest.approx(1 / 3)
    assert means["sft"]["accuracy/mean"] == pytest.approx(1.0)
    client = tracking.client()
    children = client.search_runs(
        [parent.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
    )
    by_model = {r.data.tags["lifecycle.model"]: r for r in children}
    assert sorted(by_model) == ["base", "sft"]
    # The eval split by name and file digest (MLflow also logs the scored table it built).
    inputs = {i.dataset.name: i.dataset for i in by_model["base"].inputs.dataset_inputs}
    assert inputs["uc-eval"].digest == "ab" * 8
    traces = client.search_traces(
        locations=[parent.experiment_id], run_id=by_model["base"].info.run_id
    )
    assert len(traces) == 3
    per_example = sorted(
        a.value for t in traces for a in t.info.assessments if a.name == "accuracy"
    )
    assert per_example == [0.0, 0.0, 1.0]
    logged = client.get_logged_model(model)
    assert logged.metrics and {m.key for m in logged.metrics} >= {"accuracy/mean"}


def test_prompt_registry_keeps_best_on_the_best_scoring_version(tracking):
    run = stage_run(tracking)

    def register(score: float):
        return register_best_prompt(
            tracking.uri,
            run,
            "uc-prompt",
            "Classify.\n\nDialogue:\n{input}\n\nIntent:",
            metric="accuracy",
            score=score,
            message=f"accuracy {score}",
            tags={"shots": "3"},
        )

    assert register(0.5) == (1, True)
    assert register(0.4) == (2, False)
    assert register(0.7) == (3, True)
    best = tracking.client().load_prompt("prompts:/uc-prompt@best")
    assert best.version == 3 and best.tags["score"] == "0.700000"
    assert best.format(input="#Person1#: hi") == (
        "Classify.\n\nDialogue:\n#Person1#: hi\n\nIntent:"
    )
    # The run that made it lists it; single braces (a JSON example in a few-shot prompt) stay.
    assert "uc-prompt" in tracking.client().get_run(run.run_id).data.tags["mlflow.linkedPrompts"]
    register_best_prompt(
        tracking.uri,
        run,
        "uc-json",
        'Example: {"name": "Yara", "day": null}\n{input}\nJSON:',
        metric="field_f1",
        score=0.5,
        message="m",
        tags={},
    )
    json_prompt = tracking.client().load_prompt("prompts:/uc-json@best")
    assert json_prompt.format(input="hi") == 'Example: {"name": "Yara", "day": null}\nhi\nJSON:'
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent state is put back


def test_one_attempt_run_when_steps_start_at_once(tracking):
    """The step that opens the attempt and one that starts beside it (and looks first) end up
    under the same parent run."""
    found: list[str] = []

    def waiter():
        found.append(
            tracking.attempt_run("uc", "dagster-1", create=False, name="attempt 1", tags={})
        )

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(1.0)
    opened = tracking.attempt_run("uc", "dagster-1", create=True, name="attempt 1", tags={})
    thread.join(timeout=30)
    assert found == [opened]
    again = tracking.attempt_run("uc", "dagster-1", create=True, name="attempt 1", tags={})
    assert again == opened
    runs = tracking.client().search_runs(
        [tracking.experiment_id("uc")], f"tags.`lifecycle.stage` = '{ATTEMPT_STAGE}'"
    )
    assert [r.info.run_id for r in runs] == [opened]
    with tracking.stage_run("uc", "sft_adapter", parent_id=opened) as stage:
        assert tracking.client().get_run(opened).info.status == "RUNNING"
    assert tracking.client().get_run(stage.run_id).data.tags["mlflow.parentRunId"] == opened
    assert tracking.client().get_run(opened).info.status == "FINISHED"
    with pytest.raises(RuntimeError), tracking.stage_run("uc", "evaluation", parent_id=opened):
        raise RuntimeError("boom")
    failed = tracking.client().get_run(opened)
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "evaluation"
    with tracking.stage_run("uc", "onnx_model", parent_id=opened):  # a branch that goes on
        pass
    assert tracking.client().get_run(opened).info.status == "FAILED"


def test_steps_that_each_created_an_attempt_settle_on_the_oldest(tracking):
    """Should the opener never come (a step re-executed alone), two steps waiting in vain both
    create one: each then uses the oldest and the other is deleted."""
    got: list[str] = []

    def step():
        got.append(
            tracking.attempt_run("uc", "d-2", create=False, name="attempt", tags={}, wait_s=0.5)
        )

    threads = [threading.Thread(target=step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(got) == 2 and got[0] == got[1]
    live = tracking.client().search_runs(
        [tracking.experiment_id("uc")], f"tags.`lifecycle.stage` = '{ATTEMPT_STAGE}'"
    )
    assert [r.info.run_id for r in live] == [got[0]]


def test_traces_go_to_the_experiment_and_store_evaluated_in(tmp_path):
    """One process, several use cases (experiments) and stores (a code server, this test
    session): each evaluation's traces land in its own experiment of its own store, whatever
    the process traced before."""
    uc = load_use_case(use_case="dialogue_qa", profile="tiny")
    data = tmp_path / "eval.jsonl"
    data.write_text('{"id": "a"}\n')
    rows = [{"model": "sft", "id": "a", "prediction": "Thursday", "reference": "thursday"}]
    stores = [MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / f'{n}.db'}") for n in "ab"]
    where = [(stores[0], "uc1"), (stores[0], "uc2"), (stores[1], "uc1"), (stores[0], "uc1")]
    for tracking, experiment in where:
        evaluate_models(
            tracking.uri,
            stage_run(tracking, experiment),
            rows,
            {"a": "q"},
            uc.task,
            uc.evaluation.suite,
            model_ids={},
            dataset=DatasetRef("uc-eval", data, "cd" * 32, 1),
            tags={},
        )
    counts = [
        len(t.client().search_traces(locations=[t.experiment_id(e)]))
        for t, e in [(stores[0], "uc1"), (stores[0], "uc2"), (stores[1], "uc1")]
    ]
    assert counts == [2, 1, 1]


def test_traces_of_a_rerun_after_the_same_seed_are_their_own(tracking, tmp_path):
    """Training seeds Python's ``random`` (``transformers.set_seed``), so a rerun reaches the
    evaluation with the random state the first run had: its traces must still be new ones,
    linked to the new run, not collide with the first run's trace ids."""
    import random

    uc = load_use_case(use_case="dialogue_qa", profile="tiny")
    data = tmp_path / "eval.jsonl"
    data.write_text('{"id": "a"}\n{"id": "b"}\n')
    rows = [
        {"model": "sft", "id": i, "prediction": "Thursday", "reference": "thursday"} for i in "ab"
    ]
    runs = []
    for _ in range(2):
        random.seed(42)
        parent = stage_run(tracking)
        evaluate_models(
            tracking.uri,
            parent,
            rows,
            {"a": "q", "b": "q"},
            uc.task,
            uc.evaluation.suite,
            model_ids={},
            dataset=DatasetRef("uc-eval", data, "cd" * 32, 2),
            tags={},
        )
        runs.append(parent)
    client = tracking.client()
    ids = []
    for parent in runs:
        (child,) = client.search_runs(
            [parent.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
        )
        traces = client.search_traces(locations=[parent.experiment_id], run_id=child.info.run_id)
        assert len(traces) == 2, parent.run_id
        assert {t.info.request_metadata.get("mlflow.sourceRun") for t in traces} == {
            child.info.run_id
        }
        ids += [t.info.trace_id for t in traces]
    assert len(set(ids)) == 4
