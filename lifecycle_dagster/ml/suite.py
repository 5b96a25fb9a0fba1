"""The evaluation suite: the task metrics, safety and format checks every candidate is scored on.

A suite is versioned: its ``fingerprint`` hashes the version, the metric definitions and the
lexicon, so results from different suites are never compared as if they were the same measurement
(the regression check refuses to). Per-example scores are kept for paired comparisons.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field

from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.tunables import Tunables

# What the suite computes, per example and as a mean; bump SUITE_CODE when a definition changes.
SUITE_CODE = "1"


class SuiteConfig(Tunables):
    """The evaluation suite's definition; its fingerprint is recorded with every result."""

    version: str = Field("1", description="Bump when the suite changes meaning.")
    unacceptable_phrases: list[str] = Field(
        default_factory=list, description="Harmlessness: outputs containing one are flagged."
    )
    min_words: int = Field(3, gt=0, description="Length compliance: fewest words.")
    max_words: int = Field(40, gt=0, description="Length compliance: most words.")
    single_sentence: bool = Field(True, description="Format compliance: one sentence, one line.")

    def fingerprint(self, kind: str = "summarisation") -> str:
        """The suite's version and a hash of its definition. The task kind joins the hash for kinds
        other than summarisation, whose fingerprints predate kinds and stay comparable."""
        definition = {
            "version": self.version,
            "unacceptable": list(self.unacceptable_phrases),
            "min_words": self.min_words,
            "max_words": self.max_words,
            "single_sentence": self.single_sentence,
        }
        if kind != "summarisation":
            definition["kind"] = kind
        payload = json.dumps({"code": SUITE_CODE, **definition}, sort_keys=True)
        return f"{self.version}-{hashlib.sha256(payload.encode()).hexdigest()[:8]}"


@dataclass
class SuiteResult:
    fingerprint: str
    means: dict[str, float]
    per_example: list[dict] = field(default_factory=list)
    task: tasks.Scores | None = None  # the kind's own scores (its tables among them)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def unacceptable_phrases(text: str, lexicon: Sequence[str]) -> list[str]:
    """The lexicon's phrases found in ``text`` as whole words (case and punctuation ignored)."""
    words = f" {_words(text)} "
    return [p for p in lexicon if _words(p) and f" {_words(p)} " in words]


def score(
    predictions: Sequence[str],
    references: Sequence[str],
    config: SuiteConfig,
    *,
    task,
    ids: Sequence[str] | None = None,
    rewards: Sequence[float] | None = None,
) -> SuiteResult:
    """Every metric of the suite, per example and as means (compliance metrics as rates): the task
    kind's metrics (``task.type``), harmlessness, format (the kind's, and one line when
    ``single_sentence``) and, for free-text kinds, length."""
    kind = task.kind
    scored = kind.score(predictions, references, task)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(predictions))]
    rows = []
    for i, pred in enumerate(predictions):
        words = len(pred.split())
        flagged = unacceptable_phrases(pred, config.unacceptable_phrases)
        single = "\n" not in pred.strip() and len(re.findall(r"[.!?](\s|$)", pred.strip())) <= 1
        row = {
            "id": ids[i],
            "prediction": pred,
            "reference": references[i],
            **{m: round(v[i], 4) for m, v in scored.per_example.items()},
            "harmless": int(not flagged),
            "flagged": ", ".join(flagged),
        }
        row["format_ok"] = int(row["format_ok"] and (single or not config.single_sentence))
        if kind.length_checked:
            row["words"] = words
            row["length_ok"] = int(config.min_words <= words <= config.max_words)
        if rewards is not None:
            row["reward"] = round(float(rewards[i]), 4)
        rows.append(row)
    n = max(1, len(rows))
    per_example = [*scored.per_example, "harmless", *(["length_ok"] if kind.length_checked else [])]
    means = {m: sum(r[m] for r in rows) / n for m in per_example}
    means.update(scored.corpus)
    return SuiteResult(config.fingerprint(kind.name), means, rows, scored)


@dataclass
class PairedComparison:
    metric: str
    examples: int
    mean_diff: float  # candidate - champion
    low: float  # 95% bootstrap interval of the mean difference
    high: float

    @property
    def worse_beyond_noise(self) -> bool:
        return self.high < 0

    def describe(self) -> str:
        return (
            f"{self.metric} {self.mean_diff:+.4f} against the champion over {self.examples} "
            f"examples (95% CI {self.low:+.4f} .. {self.high:+.4f})"
        )


def bootstrap_interval(
    values: Sequence[float], *, samples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """A 95% bootstrap interval of the mean of ``values`` (seeded: the same values give the same
    interval); None for fewer than two."""
    n = len(values)
    if n < 2:
        return None
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def paired_bootstrap(
    candidate: dict[str, float],
    champion: dict[str, float],
    metric: str,
    *,
    samples: int = 2000,
    seed: int = 0,
) -> PairedComparison | None:
    """Mean per-example difference on the examples both were scored on, with a 95% bootstrap
    interval; None when they share no example."""
    common = sorted(set(candidate) & set(champion))
    if not common:
        return None
    diffs = [candidate[k] - champion[k] for k in common]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return PairedComparison(
        metric=metric,
        examples=n,
        mean_diff=sum(diffs) / n,
        low=means[int(0.025 * samples)],
        high=means[int(0.975 * samples) - 1],
    )


def per_example_metric(rows: Sequence[dict], metric: str, model: str) -> dict[str, float]:
    """``{example id: score}`` of one model's rows in a per-example table (``mean_reward`` is the
    per-example ``reward``)."""
    key = "reward" if metric == "mean_reward" else metric
    return {str(r["id"]): float(r[key]) for r in rows if r.get("model") == model and key in r}
