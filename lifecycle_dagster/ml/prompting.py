"""Prompt engineering: the base model with zero-, one- and few-shot prompts; no training."""

from __future__ import annotations

from dataclasses import dataclass

from lifecycle_dagster.ml.data import EvalSplit, format_prompt
from lifecycle_dagster.ml.evaluate import score_split
from lifecycle_dagster.ml.progress import Log


@dataclass
class PromptingResult:
    strategies: list[dict]  # one per shot count: strategy, shots, rouge_l, an example
    template: str  # the best strategy's prompt, with "{input}" where the task input goes

    @property
    def best(self) -> dict:
        return max(self.strategies, key=lambda r: r["rouge_l"])

    @property
    def zero_shot(self) -> float | None:
        return next((r["rouge_l"] for r in self.strategies if r["shots"] == 0), None)


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
                "rouge_l": res.rouge_l,
                "example": res.predictions[0][:80] if res.predictions else "",
            }
        )
    best = max(strategies, key=lambda r: r["rouge_l"])
    template = format_prompt(split.use_case, "{input}", examples[: best["shots"]])
    return PromptingResult(strategies, template)
