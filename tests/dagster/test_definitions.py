"""The code location loads and holds every expected asset, check, job, sensor and schedule."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from lifecycle_dagster.definitions import defs

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_ASSETS = {
    "use_case": "scope",
    "knowledge_index": "data",
    "task_dataset": "data",
    "preference_dataset": "data",
    "base_model": "selection",
    "prompt_baseline": "adaptation",
    "sft_adapter": "adaptation",
    "reward_model": "alignment",
    "aligned_model": "alignment",
    "evaluation": "evaluation",
    "distilled_model": "compression",
    "onnx_model": "compression",
    "champion_model": "deployment",
    "user_feedback": "deployment",  # external: what the model server's users said
    "lifecycle_report": "reporting",
}
EXPECTED_CHECKS = {
    ("task_dataset", "no_train_eval_leakage"),
    ("task_dataset", "no_near_duplicates"),
    ("task_dataset", "retrieval_finds_answers"),
    ("preference_dataset", "pairs_are_distinct"),
    ("preference_dataset", "no_task_eval_in_pairs"),
    ("preference_dataset", "no_train_eval_leakage"),
    ("evaluation", "meets_thresholds"),
    ("evaluation", "sft_beats_prompt_baseline"),
    ("evaluation", "alignment_keeps_reward"),
    ("evaluation", "no_regression_vs_champion"),
    ("distilled_model", "students_learn"),
    ("onnx_model", "fp32_matches_pytorch"),
    ("onnx_model", "kv_cache_in_use"),
    ("onnx_model", "within_quality_budget"),
}


def test_assets_groups_and_lineage():
    d = defs()
    graph = d.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == set(EXPECTED_ASSETS)
    for key, group in EXPECTED_ASSETS.items():
        node = graph.get(dg.AssetKey(key))
        assert node.group_name == group, key
        assert node.description, key
    # Lineage runs from the datasets all the way to the ONNX artifact.
    upstream = graph.get(dg.AssetKey("onnx_model")).parent_keys
    assert {dg.AssetKey("aligned_model"), dg.AssetKey("distilled_model")} <= upstream
    ancestors = graph.upstream_key_iterator(dg.AssetKey("onnx_model"))
    assert {
        "knowledge_index",  # the passages every stage's prompts carry
        "task_dataset",
        "preference_dataset",
        "base_model",
        "sft_adapter",
        "reward_model",
    } <= {k.to_user_string() for k in ancestors}
    # Feedback from the deployed model's users flows back into the reward data.
    feedback = graph.get(dg.AssetKey("user_feedback"))
    assert not feedback.is_materializable
    assert dg.AssetKey("preference_dataset") in feedback.child_keys
    heavy = {k for k in EXPECTED_ASSETS if graph.get(dg.AssetKey(k)).pools == {"train"}}
    assert {
        "base_model",
        "sft_adapter",
        "reward_model",
        "aligned_model",
        "distilled_model",
    } <= heavy


def test_checks_jobs_sensor_schedule():
    d = defs()
    checks = {
        (k.asset_key.to_user_string(), k.name) for k in d.resolve_asset_graph().asset_check_keys
    }
    assert checks == EXPECTED_CHECKS
    blocking = {
        spec.key.name
        for a in d.assets
        if hasattr(a, "check_specs")
        for spec in a.check_specs
        if spec.blocking
    }
    assert {
        "meets_thresholds",
        "fp32_matches_pytorch",
        "kv_cache_in_use",
        "within_quality_budget",
    } <= blocking
    jobs = {j.name for j in d.resolve_all_job_defs()}
    assert {"lifecycle_job", "adaptation_job", "evaluation_job"} <= jobs
    sensors = {s.name: s for s in d.sensors}
    assert sorted(sensors) == [
        "data_change_sensor",
        "feedback_sensor",
        "lifecycle_automation",
        "readaptation_sensor",
    ]
    # Every sensor runs from the first deployment on; nothing waits for a toggle in the UI.
    assert {s.default_status for s in sensors.values()} == {dg.DefaultSensorStatus.RUNNING}
    # Dagster's own automation sensor (STOPPED by default) has nothing left to target.
    repo = d.get_repository_def()
    assert "default_automation_condition_sensor" not in {s.name for s in repo.sensor_defs}
    automated = {
        k
        for k in d.resolve_asset_graph().materializable_asset_keys
        if d.resolve_asset_graph().get(k).automation_condition is not None
    }
    assert automated and automated <= set(
        sensors["lifecycle_automation"].asset_selection.resolve(d.resolve_asset_graph())
    )
    assert [s.name for s in d.schedules] == ["evaluation_schedule"]
    adaptation = d.resolve_job_def("adaptation_job")
    assert {k.to_user_string() for k in adaptation.asset_layer.executable_asset_keys} == {
        "sft_adapter",
        "reward_model",  # its pairs can hold the SFT model's answers
        "aligned_model",
        "evaluation",
        "distilled_model",
        "onnx_model",
        "champion_model",
        "lifecycle_report",
    }
    # ... which is all of fine-tuning's downstream: a new stage below it is re-run too.
    downstream = dg.AssetSelection.assets("sft_adapter").downstream()
    assert (
        downstream.resolve(d.resolve_asset_graph()) == adaptation.asset_layer.executable_asset_keys
    )


def test_dagster_cli_validates_the_workspace_with_the_project_instance(tmp_path):
    """`dagster definitions validate` on workspace.yaml, with dagster.yaml as the instance."""
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


def test_project_instance_config_is_what_the_docs_promise(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_monitoring_enabled
        assert instance.global_op_concurrency_default_limit == 1
