"""Each packaged task kind through the whole tiny lifecycle: the scope decides the metric every stage
reports, the reward alignment optimises (the kind's verifiable reward: none of these use cases has
preference files) and the quality budget of the ONNX artifact. The question answering runs as
catalogue_qa, whose questions are answered from a document collection: its retrieval reaches
every stage's prompts and the model server's.

Each kind runs in its own partition of this module's instance. Thresholds are lowered to the
primary metric > 0 (a 150k-parameter model learns these tasks only partly in a few hundred steps);
the outcomes asserted are that training helped and that every figure is the kind's own."""

import json
from pathlib import Path

import dagster as dg
import pytest
import requests

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.resources.artifacts import records_of

EXAMPLES = 24  # evaluated per stage
KINDS = {
    "dialogue_intent": ("accuracy", {"format_ok": {"min": 0.0}}),
    "dialogue_slots": ("field_f1", {"json_valid": {"min": 0.0}}),
    "catalogue_qa": ("token_f1", {}),  # question answering, with retrieval
}


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    with dg.DagsterInstance.local_temp(
        str(tmp_path_factory.mktemp("dagster")), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        inst.add_dynamic_partitions("use_cases", list(KINDS))
        yield inst


RESULTS: dict = {}  # one run per kind, whichever test asks first


def run_kind(instance, name: str):
    if name not in RESULTS:
        RESULTS[name] = _run_kind(instance, name)
    return RESULTS[name]


def _run_kind(instance, name: str):
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
        len(result.get_asset_materialization_events()) == 14
    )  # every asset, knowledge_index and distilled_model included
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


def test_retrieval_reaches_every_stage_and_the_served_model(instance):
    """catalogue_qa: the index of its 60 documents, the passages in every row and so in the
    prompts of prompting, fine-tuning and evaluation, each model scored with and without them,
    and the exported artifact's server retrieving from the same index version per request."""
    from servers import in_process

    from lifecycle_dagster.ml.data import preference_records, prompts_for, read_rows, sft_records
    from lifecycle_dagster.ml.retrieval import PASSAGES_FIELD
    from lifecycle_dagster.ml.usecase_loader import load_use_case
    from lifecycle_dagster.serving import ServedModel, build_app
    from lifecycle_dagster.serving.engine import Engine

    name = "catalogue_qa"
    assert run_kind(instance, name).success
    index = meta(instance, "knowledge_index", name)
    assert index["documents"] == 60 and index["chunks"] >= 60 and index["index_bytes"] > 0
    data = meta(instance, "task_dataset", name)
    assert data["retrieval"] == index["index_version"]
    assert data["eval_recall_at_k"] >= 0.9  # BM25 finds the product page for most questions
    rows = read_rows(Path(data["artifact_path"]) / "eval.jsonl")
    assert all(len(r[PASSAGES_FIELD]) == 2 for r in rows)
    passage = rows[0][PASSAGES_FIELD][0]["text"]
    uc = load_use_case(profile="tiny", use_case=name)
    assert passage in prompts_for(uc, rows[:1])[0]  # prompting and evaluation
    assert passage in sft_records(uc, rows[:1])[0]["prompt"]  # fine-tuning and alignment
    pairs = read_rows(
        Path(meta(instance, "preference_dataset", name)["artifact_path"])
        / "preferences_train.jsonl"
    )
    pair_passage = pairs[0][PASSAGES_FIELD][0]["text"]
    assert pair_passage in preference_records(uc, pairs[:1])[0]["prompt"]  # reward model, DPO
    evaluation = meta(instance, "evaluation", name)
    for model in ("base", "sft", "aligned"):
        assert f"{model}_without_retrieval_token_f1" in evaluation, sorted(evaluation)
        assert 0 <= evaluation[f"{model}_groundedness"] <= 1
    assert evaluation["eval_recall_at_k"] == data["eval_recall_at_k"]
    assert "token_f1_with_retrieval" in evaluation["retrieval"]
    # The server: the same index version, the same passages in the prompt it decodes.
    artifact = Path(meta(instance, "onnx_model", name)["artifact_path"])
    served = ServedModel.from_artifact(artifact, name, "1", "champion")
    assert served.index_version == index["index_version"]
    assert passage in served.chat_prompt([("user", rows[0]["question"])])
    engine = Engine(served).start()
    try:
        with in_process(build_app(engine)) as url:
            card = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]
            assert card["retrieval_index"] == index["index_version"]
            body = {"model": name, "messages": [{"role": "user", "content": rows[0]["question"]}]}
            answer = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert answer.status_code == 200, answer.text
    finally:
        engine.stop()
