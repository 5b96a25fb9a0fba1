"""Summarisation: free text against a reference summary; ROUGE-1/2/L and BLEU, ROUGE-L primary."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lifecycle_dagster.ml.tasks import Scores, TaskKind, register

ROUGE_TYPES = {"rouge1": "rouge1", "rouge2": "rouge2", "rouge_l": "rougeL"}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str] = tuple(ROUGE_TYPES),
) -> dict[str, list[float]]:
    """ROUGE F1 per example (rouge_score, Porter stemming): the project's one ROUGE."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([ROUGE_TYPES[m] for m in metrics], use_stemmer=True)
    out: dict[str, list[float]] = {m: [] for m in metrics}
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)
        for m in metrics:
            out[m].append(s[ROUGE_TYPES[m]].fmeasure)
    return out


def bleu_scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, list[float]]:
    """Corpus BLEU (sacrebleu, 0-100) and sentence BLEU per example, both on a 0-1 scale."""
    import sacrebleu

    corpus = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100
    sentence = [
        sacrebleu.sentence_bleu(p, [r]).score / 100
        for p, r in zip(predictions, references, strict=True)
    ]
    return corpus, sentence


def well_formed(text: str) -> bool:
    """Non-empty and ends like a sentence."""
    return bool(text.strip()) and bool(_SENTENCE_END.search(text.strip()))


def score(predictions: Sequence[str], references: Sequence[str], task=None) -> Scores:
    rouge = rouge_scores(predictions, references)
    corpus_bleu, bleu = bleu_scores(predictions, references)
    return Scores(
        per_example={
            **rouge,
            "bleu": bleu,
            "format_ok": [float(well_formed(p)) for p in predictions],
        },
        corpus={"bleu_corpus": corpus_bleu},
        answers=[p.strip() for p in predictions],
    )


KIND = register(
    TaskKind(
        name="summarisation",
        description="Free text against a reference summary.",
        metrics=("rouge_l", "rouge1", "rouge2", "bleu"),
        primary="rouge_l",
        score=score,
        target_text=lambda value, task: str(value),
        reward_metric="rouge_l",
        reward_description="ROUGE-L F1 against the reference",
        length_checked=True,
    )
)
