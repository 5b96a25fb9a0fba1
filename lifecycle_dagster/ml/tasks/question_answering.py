"""Question answering: a short answer scored with exact match and token F1 after SQuAD
normalisation (lower case, no punctuation, no articles); token F1 primary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from lifecycle_dagster.ml.tasks import Scores, TaskKind, first_line, normalize_text, register


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str], task=None) -> Scores:
    answers = [first_line(p) for p in predictions]
    return Scores(
        per_example={
            "exact_match": [exact_match(a, r) for a, r in zip(answers, references, strict=True)],
            "token_f1": [token_f1(a, r) for a, r in zip(answers, references, strict=True)],
            "format_ok": [float(bool(normalize_text(a))) for a in answers],
        },
        answers=answers,
    )


KIND = register(
    TaskKind(
        name="question_answering",
        description="A short answer to a question about the input.",
        metrics=("token_f1", "exact_match"),
        primary="token_f1",
        score=score,
        target_text=lambda value, task: str(value),
        reward_metric="token_f1",
        reward_description="token F1 against the reference answer",
        length_checked=True,
    )
)
