"""Each packaged task kind through the whole tiny lifecycle: the scope decides the metric every stage
reports, the reward alignment optimises (the kind's verifiable reward: none of these use cases has
preference files) and the quality budget of the ONNX artifact.

Each kind runs in its own partition of this module's instance. Thresholds are lowered to the
primary metric > 0 (a 150k-parameter model learns these tasks only partly in a few hundred steps);
the outcomes asserted are that training helped and that every figure is the kind's own."""

import json
from pathlib import Path

import dagster as dg
import pytest

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.resources.artifacts import records_of

EXAMPLES = 24  # evaluated per stage
KINDS = {
    "dialogue_intent": ("accuracy", {"format_ok": {"min": 0.0}}),
    "dialogue_slots": ("field_f1", {"json_valid": {"min": 0.0}}),
    "dialogue_qa": ("token_f1", {}),
}


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    with dg.DagsterInstance.local_temp(
        str(tmp_path_factory.mktemp("dagster")), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        inst.add_dynamic_partitions("use_cases", list(KINDS))
        yield inst


def run_kind(instance, name: str):
    metric, thresholds = KINDS[name]
    config = {
        "profile": "tiny",
        "use_case": name,
        "overrides": {
            "evaluation": {
                "max_examples": EXAMPLES,
                "thresholds": {"primary": {"min": 0.0}, **thresholds},
            },
            # Prompting, alignment and export as short as still shows them working: the kinds
            # differ in metrics and rewards, not in how many shots or steps they take.
            "prompting": {"shots": [0, 1]},
            "alignment": {"max_steps": 6},
            "compression": {"check_prompts": 2, "variants": ["fp32", "int8"]},
        },
    }
    return (
        defs()
        .resolve_job_def("lifecycle_job")
        .execute_in_process(
            instance=instance,
            partition_key=name,
            raise_on_error=False,
            run_config={"ops": {"use_case": {"config": config}}},
        )
    )


def meta(instance, asset: str, use_case: str) -> dict:
    record = records_of(instance, asset, use_case, limit=1)[0]
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_kind_runs_the_whole_lifecycle_on_its_own_metric(instance, name):
    metric = KINDS[name][0]
    result = run_kind(instance, name)
    assert result.success
    assert (
        len(result.get_asset_materialization_events()) == 13
    )  # every asset, distilled_model included
    m = {a: meta(instance, a, name) for a in ("prompt_baseline", "sft_adapter", "reward_model")}
    m |= {a: meta(instance, a, name) for a in ("aligned_model", "evaluation", "onnx_model")}
    # Fine-tuning beat prompting alone on the kind's primary metric.
    assert m["sft_adapter"][f"{metric}_after"] > m["prompt_baseline"][f"best_{metric}"]
    assert m["evaluation"]["primary_metric"] == metric
    assert m["evaluation"][metric] > 0
    # The reward is the kind's verifiable one: no reward model was trained.
    assert "verifiable reward" in m["reward_model"]["reward"]
    assert not (Path(m["reward_model"]["artifact_path"]) / "model").exists()
    assert m["aligned_model"]["reward_after"] is not None
    # The ONNX artifact's budget is a drop in the primary metric.
    selected = json.loads((Path(m["onnx_model"]["artifact_path"]) / "selected.json").read_text())
    assert selected["metric"] == metric
    assert f"onnx_{metric}" in m["onnx_model"] and f"{metric}_drop" in m["onnx_model"]
    # No stage of a kind that is not a summarisation names ROUGE.
    every_key = [k for a in m.values() for k in a] + list(meta(instance, "lifecycle_report", name))
    assert not [k for k in every_key if "rouge" in k.lower()]
    report = Path(meta(instance, "lifecycle_report", name)["artifact_path"]) / "lifecycle_report.md"
    assert f"{metric} " in report.read_text() and "ROUGE" not in report.read_text()


def test_classification_reports_label_scoring_and_a_confusion_table(instance):
    if not records_of(instance, "evaluation", "dialogue_intent", limit=1):
        assert run_kind(instance, "dialogue_intent").success
    prompt = meta(instance, "prompt_baseline", "dialogue_intent")
    strategies = {r.data["strategy"]: r.data for r in prompt["strategies"].records}
    assert "label-scoring" in strategies and strategies["label-scoring"]["accuracy"] >= 0
    confusion = meta(instance, "evaluation", "dialogue_intent")["confusion"].records
    assert {r.data["reference"] for r in confusion} <= {
        "restaurant booking",
        "late delivery",
        "doctor appointment",
        "tech support",
        "hotel reservation",
        "flight change",
        "library renewal",
    }
    assert sum(v for r in confusion for k, v in r.data.items() if k != "reference") == EXAMPLES
