"""Classification into a closed label set declared in the use case (``task.labels``).

A generation is parsed to a label (case and punctuation ignored: its whole first line, else the one
label that line names); an answer that names no label, or several, is
unparseable: it counts as wrong and is reported as a format failure. Accuracy (primary) and macro-F1,
with a confusion table. The prompt baseline can also score labels by log-probability
(``label_scores``), which needs no parsing at all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from lifecycle_dagster.ml.tasks import Scores, TaskKind, first_line, register

UNPARSED = "(unparsed)"


def _norm(text: str) -> str:
    return " ".join("".join(c if c.isalnum() else " " for c in str(text).lower()).split())


def parse(text: str, labels: Sequence[str]) -> str | None:
    """The label a generation names, or None."""
    line = _norm(first_line(text))
    by_norm = {_norm(label): label for label in labels}
    if line in by_norm:
        return by_norm[line]
    padded = f" {line} "
    named = [n for n in by_norm if f" {n} " in padded]
    named = [n for n in named if not any(n != m and f" {n} " in f" {m} " for m in named)]
    return by_norm[named[0]] if len(named) == 1 else None


def macro_f1(predicted: Sequence[str | None], gold: Sequence[str], labels: Sequence[str]) -> float:
    """Mean F1 over the labels that occur in the references or the answers."""
    scores = []
    for label in labels:
        tp = sum(p == g == label for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == label != g for p, g in zip(predicted, gold, strict=True))
        fn = sum(g == label != p for p, g in zip(predicted, gold, strict=True))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def confusion(predicted: Sequence[str | None], gold: Sequence[str], labels: Sequence[str]):
    """One row per reference label: how often each label (or nothing) was answered."""
    counts = Counter(zip(gold, [p or UNPARSED for p in predicted], strict=True))
    return [
        {"reference": g, **{p: counts[(g, p)] for p in (*labels, UNPARSED)}}
        for g in labels
        if any(counts[(g, p)] for p in (*labels, UNPARSED))
    ]


def score(predictions: Sequence[str], references: Sequence[str], task) -> Scores:
    answers = [parse(p, task.labels) for p in predictions]
    gold = [parse(r, task.labels) or r for r in references]
    return Scores(
        per_example={
            "accuracy": [float(a == g) for a, g in zip(answers, gold, strict=True)],
            "format_ok": [float(a is not None) for a in answers],
        },
        corpus={"macro_f1": macro_f1(answers, gold, task.labels)},
        tables={"confusion": confusion(answers, gold, task.labels)},
        answers=answers,
    )


def check(task) -> None:
    labels = list(task.labels or [])
    if len(labels) < 2:
        raise ValueError("classification needs task.labels: at least two labels")
    norms = [_norm(label) for label in labels]
    if "" in norms or len(set(norms)) != len(norms):
        raise ValueError(
            "task.labels must be non-empty and distinct (case and punctuation ignored)"
        )


def target_text(value, task) -> str:
    label = parse(str(value), task.labels)
    if label is None:
        raise ValueError(f"'{value}' is not one of the labels {', '.join(task.labels)}")
    return label


def label_scores(
    model, tokenizer, prompts: Sequence[str], labels: Sequence[str], *, batch_size: int = 16
) -> list[str]:
    """The likeliest label for each prompt: the sum of its tokens' log-probabilities after the
    prompt (lm-evaluation-harness's ``acc``); no generation, nothing to parse."""
    import torch

    from lifecycle_dagster.ml.soft_prompt import with_soft_prompt

    prompts = with_soft_prompt(tokenizer, list(prompts))
    device = next(model.parameters()).device
    label_ids = [tokenizer(" " + lab, add_special_tokens=False)["input_ids"] for lab in labels]
    pairs = [(i, k) for i in range(len(prompts)) for k in range(len(labels))]
    totals = [[0.0] * len(labels) for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs, spans = [], []
        for i, k in chunk:
            p_ids = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
            seqs.append(p_ids + label_ids[k])
            spans.append((len(p_ids), len(p_ids) + len(label_ids[k])))
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
        for row, ((i, k), (lo, hi)) in enumerate(zip(chunk, spans, strict=True)):
            positions = torch.arange(lo - 1, hi - 1, device=device)
            targets = ids[row, lo:hi]
            totals[i][k] = logp[row, positions, targets].sum().item()
    return [labels[max(range(len(labels)), key=lambda k: t[k])] for t in totals]


KIND = register(
    TaskKind(
        name="classification",
        description="One label from a closed set declared in the use case.",
        metrics=("accuracy", "macro_f1"),
        primary="accuracy",
        score=score,
        target_text=target_text,
        reward_metric="accuracy",
        reward_description="1 for the correct label, 0 for a wrong one, -0.5 for none",
        invalid="format_ok",
        check=check,
    )
)
