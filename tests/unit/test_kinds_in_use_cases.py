"""Task kinds in use cases: the scope decides the metric, the reward and how data is read."""

import json

import pytest

from lifecycle_dagster.ml import catalogue, datagen
from lifecycle_dagster.ml.data import build_pairs, load_task_data
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.reward import describe_reward, load_reward
from lifecycle_dagster.ml.usecase import USECASES_DIR
from lifecycle_dagster.ml.usecase_loader import load_use_case

KIND_OF = {
    "dialogue_summarisation": ("summarisation", "rouge_l", "train"),
    "dialogue_intent": ("classification", "accuracy", "verifiable"),
    "dialogue_slots": ("extraction", "field_f1", "verifiable"),
    "dialogue_qa": ("question_answering", "token_f1", "verifiable"),
    "catalogue_qa": ("question_answering", "token_f1", "verifiable"),
}


@pytest.mark.parametrize("name", sorted(KIND_OF))
def test_every_packaged_use_case_loads_on_both_profiles_with_its_kind(name):
    kind, metric, reward = KIND_OF[name]
    scratch = {"base_model": {"source": "scratch", "path": None}}  # no GGUF needed here
    for profile in ("tiny", "demo"):
        uc = load_use_case(profile=profile, use_case=name, overrides=scratch)
        assert (uc.name, uc.kind.name, uc.primary_metric, uc.reward_source) == (
            name,
            kind,
            metric,
            reward,
        )
        # The profile's `primary` threshold lands on this kind's primary metric.
        assert uc.evaluation.thresholds[metric].min == {"tiny": 0.2, "demo": 0.6}[profile]
        assert set(uc.evaluation.thresholds) <= set(uc.metric_names)


def test_shipped_kind_data_is_what_the_generator_makes(tmp_path):
    for name, files in datagen.generate_kinds().items():
        for file, rows in files.items():
            shipped = (USECASES_DIR / name / "data" / file).read_text().splitlines()
            assert [json.loads(x) for x in shipped] == rows, f"{name}/{file}"
    files = catalogue.generate()
    for name, text in files.pop("docs").items():
        assert (USECASES_DIR / "catalogue_qa" / "docs" / name).read_text() == text, name
    for file, rows in files.items():
        shipped = (USECASES_DIR / "catalogue_qa" / "data" / file).read_text().splitlines()
        assert [json.loads(x) for x in shipped] == rows, f"catalogue_qa/{file}"


def _use_case_file(tmp_path, name, replace=None, **data_rows):
    """A copy of a packaged use case whose data (and text) can be replaced."""
    text = (USECASES_DIR / name / "usecase.yaml").read_text()
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    for split, rows in data_rows.items():
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    if data_rows:
        path = tmp_path / "usecase.yaml"
    else:
        text = text.replace("data/", str(USECASES_DIR / name / "data") + "/")
        path = tmp_path / "usecase.yaml"
    path.write_text(text)
    return path


def test_a_classification_without_labels_or_with_a_foreign_metric_is_refused(tmp_path):
    path = _use_case_file(
        tmp_path,
        "dialogue_intent",
        {
            "  labels: [restaurant booking,": "  labels: [only]\n  # ",
            "           flight change": "  # ",
        },
    )
    with pytest.raises(InputError, match="classification needs task.labels"):
        load_use_case(path)
    path = _use_case_file(tmp_path, "dialogue_intent", {"accuracy: {min": "rouge_l: {min"})
    with pytest.raises(InputError) as err:
        load_use_case(path)
    assert "evaluation.thresholds.rouge_l: 'rouge_l' is not a metric of classification" in str(
        err.value
    )
    path = _use_case_file(tmp_path, "dialogue_intent", {"type: classification": "type: ner"})
    with pytest.raises(InputError, match="'ner' is not a task kind; known: classification"):
        load_use_case(path)


def test_a_label_outside_the_set_names_file_line_and_field(tmp_path):
    rows = [{"id": f"r{i}", "dialogue": f"text {i}", "intent": "tech support"} for i in range(9)]
    bad = [*rows[:4], {"id": "r4", "dialogue": "text 4", "intent": "refund"}, *rows[5:]]
    path = _use_case_file(tmp_path, "dialogue_intent", train=bad, eval=rows)
    with pytest.raises(InputError) as err:
        load_task_data(load_use_case(path))
    assert err.value.line == 5 and err.value.field == "intent"
    assert "'refund' is not one of the labels" in str(err.value)


def test_extraction_targets_become_one_line_of_json_and_bad_ones_name_the_row(tmp_path):
    rows = [
        {"id": f"r{i}", "dialogue": f"d {i}", "slots": {"name": f"N{i}", "day": "Monday"}}
        for i in range(9)
    ]
    path = _use_case_file(tmp_path, "dialogue_slots", train=rows, eval=rows)
    data = load_task_data(load_use_case(path))
    assert data["train"].rows[0]["slots"] == '{"name": "N0", "day": "Monday", "time": null}'
    rows[2] = {"id": "r2", "dialogue": "d 2", "slots": {"city": "Oslo"}}
    _use_case_file(tmp_path, "dialogue_slots", train=rows, eval=rows)
    with pytest.raises(InputError) as err:
        load_task_data(load_use_case(path))
    assert (err.value.line, err.value.field) == (3, "slots")
    assert "'city' is not declared" in str(err.value)


def test_pairs_built_from_task_data_prefer_the_reference_over_another_rows():
    uc = load_use_case(profile="tiny", use_case="dialogue_intent")
    rows = load_task_data(uc)["train"].rows[:40]
    pairs = build_pairs(uc, rows, seed=0)
    assert len(pairs) == 40
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    assert [p["chosen"] for p in pairs] == [r["intent"] for r in rows]
    assert build_pairs(uc, rows, seed=0) == pairs  # seeded


def test_the_verifiable_reward_scores_against_the_reference(tmp_path):
    uc = load_use_case(profile="tiny", use_case="dialogue_slots")
    (tmp_path / "reward.json").write_text(json.dumps({"source": "verifiable", "model_weight": 0}))
    reward = load_reward(tmp_path, uc, runtime=None)
    ref = '{"name": "Ben", "day": "Monday", "time": null}'
    scores = reward(
        ["p"] * 3, ['{"name": "Ben", "day": "Monday"}', '{"name": "Ann"}', "no"], [ref] * 3
    )
    assert scores == [1.0, 0.0, -0.5]
    assert "extraction verifiable reward (field F1" in describe_reward(uc)


def test_both_preference_files_or_neither(tmp_path):
    path = _use_case_file(
        tmp_path,
        "dialogue_intent",
        {
            "  eval: data/eval.jsonl\n": "  eval: data/eval.jsonl\n  preferences_train: data/train.jsonl\n"
        },
    )
    with pytest.raises(InputError, match="give both preferences_train and preferences_eval"):
        load_use_case(path)


def test_a_later_layer_threshold_wins_over_the_profiles_primary():
    later = {"evaluation": {"thresholds": {"rouge_l": {"min": 0.0}}}}
    assert load_use_case(profile="tiny", overrides=later).evaluation.thresholds["rouge_l"].min == 0
    primary = {"evaluation": {"thresholds": {"primary": {"min": 0.5}}}}
    uc = load_use_case(profile="tiny", use_case="dialogue_qa", overrides=primary)
    assert uc.evaluation.thresholds["token_f1"].min == 0.5
