"""Task kinds, registered by name: how a row becomes a prompt and a target, how a generation is parsed
into an answer, which metrics score it (one primary by default), its format check and the verifiable
reward it offers. Every stage scores through the use case's kind; none special-cases one.

A kind is one plain module here that builds a ``TaskKind`` and calls ``register``. The use case's
``task`` section (``TaskSpec``) is passed to every call, so a kind reads what it needs from it (the
label set of a classification, the fields of an extraction).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PerExample = dict[str, list[float]]
INVALID_REWARD = -0.5  # an answer the kind cannot parse at all


@dataclass
class Scores:
    """A kind's scores of a batch: per-example metrics (``format_ok`` among them), metrics only
    defined on the whole batch (macro-F1, corpus BLEU), tables for the UI (a confusion table), and
    the parsed answers (None where the generation could not be parsed)."""

    per_example: PerExample
    corpus: dict[str, float] = field(default_factory=dict)
    tables: dict[str, list[dict]] = field(default_factory=dict)
    answers: list[Any] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        n = max(1, len(next(iter(self.per_example.values()), [])))
        return {**{m: sum(v) / n for m, v in self.per_example.items()}, **self.corpus}


@dataclass(frozen=True)
class TaskKind:
    """One task kind. ``metrics`` are what ``score`` reports besides ``format_ok``; a use case's
    ``evaluation.primary_metric`` is one of them, ``primary`` when it says nothing."""

    name: str
    description: str
    metrics: tuple[str, ...]
    primary: str
    score: Callable[[Sequence[str], Sequence[str], Any], Scores]
    target_text: Callable[[Any, Any], str]
    reward_metric: str  # the verifiable reward: this per-example metric...
    reward_description: str
    invalid: str | None = None  # ...or INVALID_REWARD where this per-example check is 0
    check: Callable[[Any], None] = lambda task: None
    length_checked: bool = False  # the suite's min/max words apply (free text)

    def reward(self, completions: Sequence[str], references: Sequence[str], task) -> list[float]:
        """The verifiable reward of each completion against its reference, from ``score``."""
        per = self.score(completions, references, task).per_example
        valid = per[self.invalid] if self.invalid else [1.0] * len(completions)
        return [
            v if ok else INVALID_REWARD
            for v, ok in zip(per[self.reward_metric], valid, strict=True)
        ]


KINDS: dict[str, TaskKind] = {}


def register(kind: TaskKind) -> TaskKind:
    if kind.primary not in kind.metrics or kind.reward_metric not in kind.metrics:
        raise ValueError(f"{kind.name}: its primary and reward metrics must be among its metrics")
    KINDS[kind.name] = kind
    return kind


def get(name: str) -> TaskKind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(
            f"'{name}' is not a task kind; known: {', '.join(sorted(KINDS))}"
        ) from None


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """What is judged of a generation: its first line, stripped."""
    return str(text).strip().split("\n", 1)[0].strip()


from lifecycle_dagster.ml.tasks import (  # noqa: E402  (the kinds register themselves)
    classification,
    extraction,
    question_answering,
    summarisation,
)

__all__ = [
    "KINDS",
    "Scores",
    "TaskKind",
    "classification",
    "extraction",
    "get",
    "normalize_text",
    "question_answering",
    "register",
    "summarisation",
]
