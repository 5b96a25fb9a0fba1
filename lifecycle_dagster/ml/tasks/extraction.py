"""Extraction: the answer is a JSON object with the fields the use case declares (``task.fields``,
name -> string, number, integer, boolean or list).

Invalid JSON is a format failure scored zero, never a crash. Field values are compared after
normalisation (strings: SQuAD normalisation; numbers as numbers; lists as sets); field-level
precision, recall and F1 per example, F1 primary, and the rate of valid JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lifecycle_dagster.ml.tasks import Scores, TaskKind, normalize_text, register

FIELD_TYPES = ("string", "number", "integer", "boolean", "list")


def parse(text: str) -> dict | None:
    """The first JSON object in ``text``, or None."""
    text = str(text)
    start = text.find("{")
    if start < 0:
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def normalize(value, kind: str):
    """A field value as it is compared; None when it is empty or does not fit the type."""
    if value is None or value == "" or value == []:
        return None
    if kind in ("number", "integer"):
        try:
            return float(str(value).replace(",", ""))
        except ValueError:
            return None
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        return {"true": True, "yes": True, "false": False, "no": False}.get(str(value).lower())
    if kind == "list":
        items = value if isinstance(value, list) else str(value).split(",")
        return tuple(sorted({normalize_text(v) for v in items if normalize_text(v)})) or None
    return normalize_text(value) or None


def field_scores(predicted: dict | None, reference: dict, fields: dict[str, str]) -> dict:
    """Precision, recall and F1 over the fields of one example (a key outside ``fields`` counts as
    a wrong answer)."""
    if predicted is None:
        return {"field_precision": 0.0, "field_recall": 0.0, "field_f1": 0.0}
    gold = {k: normalize(reference.get(k), t) for k, t in fields.items()}
    gold = {k: v for k, v in gold.items() if v is not None}
    answered = {k: normalize(v, fields.get(k, "string")) for k, v in predicted.items()}
    answered = {k: v for k, v in answered.items() if v is not None}
    correct = sum(1 for k, v in answered.items() if k in fields and gold.get(k) == v)
    precision = correct / len(answered) if answered else float(not gold)
    recall = correct / len(gold) if gold else float(not answered)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"field_precision": precision, "field_recall": recall, "field_f1": f1}


def score(predictions: Sequence[str], references: Sequence[str], task) -> Scores:
    answers = [parse(p) for p in predictions]
    per: dict[str, list[float]] = {
        m: [] for m in ("field_f1", "field_precision", "field_recall", "json_valid", "format_ok")
    }
    for answer, ref in zip(answers, references, strict=True):
        for m, v in field_scores(answer, parse(ref) or {}, task.fields).items():
            per[m].append(v)
        per["json_valid"].append(float(answer is not None))
        per["format_ok"].append(float(answer is not None and set(answer) <= set(task.fields)))
    return Scores(per_example=per, answers=answers)


def check(task) -> None:
    fields = dict(task.fields or {})
    if not fields:
        raise ValueError("extraction needs task.fields: field name -> type")
    bad = {k: v for k, v in fields.items() if v not in FIELD_TYPES}
    if bad:
        name, kind = next(iter(bad.items()))
        raise ValueError(f"task.fields.{name}: '{kind}' is not one of {', '.join(FIELD_TYPES)}")


def target_text(value, task) -> str:
    """The reference as one line of JSON with the declared fields in order (a JSON string in a CSV
    cell, or an object in JSONL)."""
    obj = value if isinstance(value, dict) else parse(value)
    if obj is None:
        raise ValueError("expected a JSON object")
    unknown = sorted(set(obj) - set(task.fields))
    if unknown:
        raise ValueError(f"field '{unknown[0]}' is not declared in task.fields")
    for name, kind in task.fields.items():
        if obj.get(name) not in (None, "") and normalize(obj[name], kind) is None:
            raise ValueError(f"field '{name}': {obj[name]!r} is not a {kind}")
    return json.dumps({k: obj.get(k) for k in task.fields}, ensure_ascii=False)


KIND = register(
    TaskKind(
        name="extraction",
        description="A JSON object with the fields the use case declares.",
        metrics=("field_f1", "field_precision", "field_recall", "json_valid"),
        primary="field_f1",
        score=score,
        target_text=target_text,
        reward_metric="field_f1",
        reward_description="field F1, -0.5 for an answer that is not a JSON object",
        invalid="json_valid",
        check=check,
    )
)
