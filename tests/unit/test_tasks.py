"""Task kinds: parsers, metrics and rewards on hand-written examples with known answers."""

from types import SimpleNamespace

import pytest

from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.tasks import classification, extraction, question_answering

LABELS = SimpleNamespace(labels=["billing", "technical support", "delivery"], fields={})
FIELDS = SimpleNamespace(labels=[], fields={"name": "string", "day": "string", "count": "integer"})


def test_registry_names_every_kind_and_refuses_an_unknown_one():
    assert set(tasks.KINDS) == {
        "summarisation",
        "classification",
        "extraction",
        "question_answering",
    }
    for kind in tasks.KINDS.values():
        assert kind.primary in kind.metrics
    with pytest.raises(ValueError, match="'ner' is not a task kind; known: classification"):
        tasks.get("ner")


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("billing", "billing"),
        ("  Billing.\nmore text", "billing"),
        ("Technical Support!", "technical support"),
        ("delivery - the parcel is late", "delivery"),
        ("The answer is delivery", "delivery"),
        ("billing or delivery", None),  # names two labels
        ("I am not sure", None),
        ("", None),
    ],
)
def test_classification_parses_a_generation_to_a_label(text, label):
    assert classification.parse(text, LABELS.labels) == label


def test_classification_scores_accuracy_macro_f1_and_counts_unparsed_as_wrong():
    preds = ["billing", "delivery", "no idea", "technical support"]
    refs = ["billing", "billing", "delivery", "technical support"]
    s = tasks.get("classification").score(preds, refs, LABELS)
    assert s.per_example["accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert s.per_example["format_ok"] == [1.0, 1.0, 0.0, 1.0]
    # billing: tp1 fn1 -> 2/3; delivery: fp1 fn1 -> 0; technical support: 1 -> mean 5/9
    assert s.corpus["macro_f1"] == pytest.approx(5 / 9)
    rows = {r["reference"]: r for r in s.tables["confusion"]}
    assert rows["billing"]["billing"] == 1 and rows["billing"]["delivery"] == 1
    assert rows["delivery"][classification.UNPARSED] == 1
    assert s.means()["accuracy"] == 0.5


def test_classification_reward_and_checks():
    assert classification.KIND.reward(["billing", "delivery", "??"], ["billing"] * 3, LABELS) == [
        1.0,
        0.0,
        -0.5,
    ]
    with pytest.raises(ValueError, match="at least two labels"):
        classification.check(SimpleNamespace(labels=["only"]))
    with pytest.raises(ValueError, match="distinct"):
        classification.check(SimpleNamespace(labels=["Yes", "yes!"]))
    with pytest.raises(ValueError, match="'refund' is not one of the labels"):
        classification.target_text("refund", LABELS)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ('{"name": "Anna", "day": "Monday"}', {"name": "Anna", "day": "Monday"}),
        ('Sure: {"name": "Anna"} done', {"name": "Anna"}),
        ('{"name": "Anna", "day": ', None),  # truncated
        ("[1, 2]", None),
        ("no json here", None),
        ("{'name': 'Anna'}", None),  # not JSON
    ],
)
def test_extraction_parses_the_first_json_object_or_nothing(text, parsed):
    assert extraction.parse(text) == parsed


def test_extraction_field_scores_after_normalisation_and_invalid_json_is_a_format_failure():
    ref = '{"name": "Anna", "day": "Monday", "count": 3}'
    preds = [
        '{"name": "anna", "day": "Monday.", "count": "3"}',  # all right after normalisation
        '{"name": "Anna", "day": "Tuesday"}',  # 1 of 2 answered right, 1 of 3 recalled
        '{"name": "Anna", "day": "Monday", "count": 3, "city": "Oslo"}',  # a spurious field
        '{"name": "Anna", "day": ',  # invalid JSON
    ]
    s = tasks.get("extraction").score(preds, [ref] * 4, FIELDS)
    assert s.per_example["field_precision"] == pytest.approx([1.0, 0.5, 0.75, 0.0])
    assert s.per_example["field_recall"] == pytest.approx([1.0, 1 / 3, 1.0, 0.0])
    assert s.per_example["field_f1"][1] == pytest.approx(0.4)
    assert s.per_example["json_valid"] == [1.0, 1.0, 1.0, 0.0]
    assert s.per_example["format_ok"] == [1.0, 1.0, 0.0, 0.0]
    assert extraction.KIND.reward(preds[::3], [ref] * 2, FIELDS) == [1.0, -0.5]


def test_extraction_targets_and_fields_are_checked():
    assert extraction.target_text({"day": "Monday", "name": "Ben"}, FIELDS) == (
        '{"name": "Ben", "day": "Monday", "count": null}'
    )
    with pytest.raises(ValueError, match="'city' is not declared"):
        extraction.target_text('{"city": "Oslo"}', FIELDS)
    with pytest.raises(ValueError, match="'count': 'many' is not a integer"):
        extraction.target_text({"count": "many"}, FIELDS)
    with pytest.raises(ValueError, match="task.fields.when: 'date' is not one of"):
        extraction.check(SimpleNamespace(fields={"when": "date"}))


@pytest.mark.parametrize(
    ("pred", "ref", "em", "f1"),
    [
        ("The Eiffel Tower", "eiffel tower", 1.0, 1.0),
        ("on Monday at 3 pm", "Monday", 0.0, 1 / 3),
        ("Tuesday", "Monday", 0.0, 0.0),
        ("", "Monday", 0.0, 0.0),
        ("Monday.\nBecause the dialogue says so", "monday", 1.0, 1.0),
    ],
)
def test_question_answering_exact_match_and_token_f1(pred, ref, em, f1):
    s = tasks.get("question_answering").score([pred], [ref], None)
    assert s.per_example["exact_match"] == [em]
    assert s.per_example["token_f1"][0] == pytest.approx(f1)
    assert question_answering.KIND.reward([pred], [ref], None) == pytest.approx([f1])


def test_summarisation_scores_rouge_and_bleu_and_checks_the_sentence():
    s = tasks.get("summarisation").score(
        ["Anna books a table for two.", "anna books"], ["Anna books a table for two."] * 2
    )
    assert s.per_example["rouge_l"][0] == pytest.approx(1.0)
    assert 0 < s.per_example["rouge_l"][1] < 1
    assert s.per_example["format_ok"] == [1.0, 0.0]
    assert s.corpus["bleu_corpus"] > 0
