"""New data re-runs adaptation: the data sensor notices a data file that differs from its latest
snapshot, and declarative automation carries the update down the graph (never past a failed
blocking check)."""

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.ml.usecase_loader import load_use_case

UC = "dialogue_summarisation"
DOWNSTREAM = [
    "prompt_baseline",
    "sft_adapter",
    "reward_model",
    "aligned_model",
    "evaluation",
    "onnx_model",
    "champion_model",
    "lifecycle_report",
]


@pytest.fixture
def instance():
    # In memory: the automation evaluations below read the event log thousands of times, which a
    # sqlite file per run makes ten times slower; nothing here needs the instance on disk.
    with dg.DagsterInstance.ephemeral() as inst:
        inst.add_dynamic_partitions("use_cases", [UC])
        yield inst


def test_changed_data_file_requests_its_dataset(tmp_path, instance):
    from lifecycle_dagster.defs.automation.automation import data_change_sensor

    uc = load_use_case(profile="tiny")
    data = tmp_path / "data"
    data.mkdir()
    for field in ("train", "eval", "preferences_train", "preferences_eval"):
        shutil.copy(getattr(uc.data, field), data / Path(getattr(uc.data, field)).name)
    overrides = {
        "data": {
            f: str(data / Path(getattr(uc.data, f)).name)
            for f in ("train", "eval", "preferences_train", "preferences_eval")
        }
    }
    d = defs()
    d.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance,
        partition_key=UC,
        asset_selection=[
            dg.AssetKey(k) for k in ("use_case", "task_dataset", "preference_dataset")
        ],
        run_config={"ops": {"use_case": {"config": {"profile": "tiny", "overrides": overrides}}}},
    )

    def tick(cursor=None):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=d)
        return data_change_sensor(ctx)

    unchanged = tick()
    assert not unchanged.run_requests
    assert "match their latest snapshots" in unchanged.skip_reason.skip_message

    train = data / Path(uc.data.train).name
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[:-1]) + "\n")  # one example fewer: new data
    changed = tick(unchanged.cursor)
    assert len(changed.run_requests) == 1
    request = changed.run_requests[0]
    assert request.asset_selection == [dg.AssetKey("task_dataset")]
    assert request.partition_key == UC
    assert "train.jsonl changed" in request.tags["lifecycle/reason"]


def test_a_changed_document_rebuilds_the_index_and_the_task_data(tmp_path, instance):
    """catalogue_qa: its documents match the index until one changes; then the index and the
    task data (whose rows carry the passages) are requested, the document folder named."""
    from lifecycle_dagster.defs.automation.automation import data_change_sensor

    uc = load_use_case(profile="tiny", use_case="catalogue_qa")
    docs = tmp_path / "docs"
    shutil.copytree(uc.retrieval.documents, docs)
    instance.add_dynamic_partitions("use_cases", ["catalogue_qa"])
    config = {"profile": "tiny", "use_case": "catalogue_qa"}
    config["overrides"] = {"retrieval": {"documents": str(docs)}}
    d = defs()
    d.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance,
        partition_key="catalogue_qa",
        asset_selection=[dg.AssetKey(k) for k in ("use_case", "knowledge_index", "task_dataset")],
        run_config={"ops": {"use_case": {"config": config}}},
    )

    def tick(cursor=None):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=d)
        return data_change_sensor(ctx)

    unchanged = tick()
    assert not unchanged.run_requests, unchanged.run_requests
    page = sorted(docs.glob("*.md"))[0]
    page.write_text(page.read_text().replace("Battery life", "Battery life (tested)"))
    changed = tick(unchanged.cursor)
    (request,) = [r for r in changed.run_requests if r.partition_key == "catalogue_qa"]
    assert request.asset_selection == [dg.AssetKey("knowledge_index"), dg.AssetKey("task_dataset")]
    assert "docs changed" in request.tags["lifecycle/reason"]


def _materialize(instance, key: str, checks: dict[str, bool] | None = None, uc: str = UC) -> None:
    """A materialization of ``key`` (partition ``uc``) and its check results, as one run would
    record them: each check names the materialization it judged, which is how the event log
    tells a partition's current check result from a stale one."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
    from dagster._core.storage.event_log.base import AssetRecordsFilter

    run_id = str(uuid.uuid4())

    def report(kind: DagsterEventType, data) -> None:
        instance.report_dagster_event(
            DagsterEvent(event_type_value=kind.value, event_specific_data=data, job_name="test"),
            run_id=run_id,
        )

    materialization = dg.AssetMaterialization(asset_key=key, partition=uc)
    report(DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(materialization))
    (record,) = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[uc]), limit=1
    ).records
    target = AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id, run_id=run_id, timestamp=record.timestamp
    )
    for name, passed in (checks or {}).items():
        evaluation = dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey(key),
            check_name=name,
            partition=uc,
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            target_materialization_data=target,
        )
        report(DagsterEventType.ASSET_CHECK_EVALUATION, evaluation)


def _blocking_checks(d) -> dict[str, dict[str, bool]]:
    """Each asset's blocking checks, all passing."""
    graph = d.resolve_asset_graph()
    return {
        key.to_user_string(): {
            c.name: True
            for c in graph.asset_check_keys
            if c.asset_key == key and graph.get_check_spec(c).blocking
        }
        for key in graph.get_all_asset_keys()
    }


def test_new_dataset_carries_down_the_graph_but_not_past_a_failed_gate(instance):
    d = defs()
    blocking = _blocking_checks(d)
    order = [
        "use_case",
        "task_dataset",
        "preference_dataset",
        "base_model",
        *DOWNSTREAM,
    ]
    for key in order:
        _materialize(instance, key, blocking[key])
    quiet = dg.evaluate_automation_conditions(defs=d, instance=instance)
    assert quiet.total_requested == 0

    _materialize(instance, "task_dataset", blocking["task_dataset"])
    result = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=quiet.cursor)
    requested = {k for k in DOWNSTREAM if result.get_num_requested(dg.AssetKey(k))}
    # Everything downstream follows, the reward model too (its pairs can hold the SFT model's
    # answers).
    assert requested == set(DOWNSTREAM)

    for key in DOWNSTREAM:
        _materialize(instance, key, blocking[key])
    settled = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=result.cursor)
    assert settled.total_requested == 0

    # A new aligned model that passes evaluation is exported and considered for promotion...
    _materialize(instance, "aligned_model")
    _materialize(instance, "evaluation", blocking["evaluation"])
    passing = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=settled.cursor)
    assert passing.get_num_requested(dg.AssetKey("onnx_model")) == 1
    assert passing.get_num_requested(dg.AssetKey("champion_model")) == 1
    for key in ("onnx_model", "champion_model", "lifecycle_report"):
        _materialize(instance, key, blocking[key])
    settled = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=passing.cursor)

    # ...one that fails its threshold gate is not: nothing past the gate is requested.
    _materialize(instance, "aligned_model")
    _materialize(instance, "evaluation", {**blocking["evaluation"], "meets_thresholds": False})
    gated = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=settled.cursor)
    for key in ("onnx_model", "champion_model", "lifecycle_report"):
        assert gated.get_num_requested(dg.AssetKey(key)) == 0, key


def test_one_use_cases_gate_neither_blocks_nor_opens_another_use_cases_graph(instance):
    """Two use cases write their datasets side by side; one dataset fails its blocking leakage
    check, the other passes, and the other's check lands last. Checks are judged per use case
    (partition): the passing use case's graph carries on, the failing one's stops at the gate,
    whichever order the results arrived in."""
    d = defs()
    blocking = _blocking_checks(d)
    other = "dialogue_intent"
    instance.add_dynamic_partitions("use_cases", [other])
    for uc in (UC, other):
        for key in ["use_case", "task_dataset", "preference_dataset", "base_model", *DOWNSTREAM]:
            _materialize(instance, key, blocking[key], uc=uc)
    quiet = dg.evaluate_automation_conditions(defs=d, instance=instance)
    assert quiet.total_requested == 0

    leaked = {**blocking["task_dataset"], "no_train_eval_leakage": False}
    _materialize(instance, "task_dataset", leaked, uc=UC)
    _materialize(instance, "task_dataset", blocking["task_dataset"], uc=other)
    result = dg.evaluate_automation_conditions(defs=d, instance=instance, cursor=quiet.cursor)
    requested = {
        key: {k for k in result.get_requested_partitions(dg.AssetKey(key))} for key in DOWNSTREAM
    }
    assert requested["prompt_baseline"] == {other}, requested
    assert all(UC not in partitions for partitions in requested.values()), requested
