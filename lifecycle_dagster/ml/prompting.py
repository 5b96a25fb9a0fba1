"""Prompt engineering: the base model with zero-, one- and few-shot prompts; no training. A
classification is also scored by label likelihood (the likeliest label by log-probability, nothing
generated), reported beside the generating strategies."""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle_dagster.ml.data import EvalSplit, format_prompt
from lifecycle_dagster.ml.evaluate import score_split
from lifecycle_dagster.ml.progress import Log


@dataclass
class PromptingResult:
    metric: str  # the use case's primary metric
    strategies: list[dict]  # one per strategy: strategy, shots, <metric>, an example
    template: str  # the best strategy's prompt, with "{input}" where the task input goes

    @property
    def best(self) -> dict:
        """The best strategy that generates (what a deployed model would do)."""
        return max(
            (r for r in self.strategies if r["shots"] is not None), key=lambda r: r[self.metric]
        )

    @property
    def zero_shot(self) -> float | None:
        return next((r[self.metric] for r in self.strategies if r["shots"] == 0), None)


def score_prompting(
    model,
    tokenizer,
    split: EvalSplit,
    examples: list[dict],
    shots: list[int],
    *,
    max_new_tokens: int,
    batch_size: int,
    log: Log | None = None,
) -> PromptingResult:
    """Score each shot count on ``split``, the in-context examples taken from ``examples`` in order."""
    uc = split.use_case
    strategies = []
    for k in shots:
        res = score_split(
            model,
            tokenizer,
            split,
            prompts=split.prompts_with(examples[:k]),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            log=log,
            stage=f"prompt_baseline[{k}-shot]",
        )
        strategies.append(
            {
                "strategy": f"{k}-shot",
                "shots": k,
                res.metric: res.primary,
                "format_ok": res.task_metrics.get("format_ok"),
                "example": res.predictions[0][:80] if res.predictions else "",
            }
        )
    metric = res.metric
    if uc.kind.name == "classification":
        strategies.append(label_scoring(model, tokenizer, split, metric, batch_size, log))
    best = max((r for r in strategies if r["shots"] is not None), key=lambda r: r[metric])
    template = format_prompt(uc, "{input}", examples[: best["shots"]], split.fmt)
    return PromptingResult(metric, strategies, template)


def label_scoring(model, tokenizer, split: EvalSplit, metric: str, batch_size: int, log) -> dict:
    """Zero-shot classification by the likeliest label: the row of the label-scoring strategy."""
    from lifecycle_dagster.ml.tasks.classification import label_scores

    uc = split.use_case
    answers = label_scores(model, tokenizer, split.prompts, uc.task.labels, batch_size=batch_size)
    means = uc.kind.score(answers, split.references, uc.task).means()
    if log:
        log(f"prompt_baseline[label scoring]: {metric} {means[metric]:.4f}")
    return {
        "strategy": "label-scoring",
        "shots": None,
        metric: means[metric],
        "format_ok": 1.0,
        "example": answers[0] if answers else "",
    }
