"""Scoring a model: batched greedy generation scored by the use case's task kind, perplexity and
reward scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.suite import SuiteConfig
from lifecycle_dagster.ml.suite import score as suite_score


def clean_completion(text: str) -> str:
    """The first line of a completion: an answer is one line, what follows is not judged."""
    return tasks.first_line(text)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    log: Log | None = None,
    stage: str = "generate",
) -> list[str]:
    """Greedy completions, left-padded batches, longest prompts first so batches pad little. A
    model with a soft prompt in its vocabulary is prompted with it. Answers these weights already
    gave to these prompts are reused (``ml.generations``)."""
    import torch

    from lifecycle_dagster.ml import generations
    from lifecycle_dagster.ml.soft_prompt import with_soft_prompt

    tokenizer.padding_side = "left"
    prompts = with_soft_prompt(tokenizer, prompts)
    cache_key = generations.key(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    cached = generations.get(cache_key, len(prompts))
    if cached is not None:
        if log:
            log(f"{stage}: {len(prompts)} answers reused (same weights, same prompts)")
        return cached
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        with torch.no_grad():
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(
            gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(idx, texts, strict=True):
            out[i] = clean_completion(text)
        if log:
            log(f"{stage}: {min(start + batch_size, len(order))}/{len(order)} generated")
    generations.put(cache_key, out)
    return out


def perplexity(
    model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> float:
    """exp(mean NLL) of the reference completions given their prompts (completion tokens only)."""
    import torch

    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids, with_soft_prompt

    prompts = with_soft_prompt(tokenizer, prompts)
    soft = soft_prompt_ids(tokenizer)  # never generated: not part of the distribution either
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        ids, labels = [], []
        for p, t in zip(
            prompts[start : start + batch_size], targets[start : start + batch_size], strict=True
        ):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            t_ids = tokenizer(" " + t, add_special_tokens=False)["input_ids"]
            t_ids = t_ids + [tokenizer.eos_token_id]
            ids.append(p_ids + t_ids)
            labels.append([-100] * len(p_ids) + t_ids)
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attn).logits.float()
        if soft:
            logits[..., soft] = float("-inf")
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = lab[:, 1:]
        mask = tgt != -100
        nll = -logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total_nll += nll[mask].sum().item()
        total_tokens += int(mask.sum().item())
    return math.exp(total_nll / max(1, total_tokens))


def reward_text(fmt, eos: str, prompt: str, completion: str) -> str:
    """What a reward model trained by trl's RewardTrainer on ``preference_records`` read: the
    prompt, the completion's first line as ``fmt`` writes an answer, and EOS unless it ends with
    it (trl appends it so). ``completion`` may be raw or already formatted."""
    text = prompt + fmt.completion("q", clean_completion(fmt.answer_of(completion)))
    return text if text.endswith(eos) else text + eos


class RewardScorer:
    """Scores ``prompt + completion`` with a sequence-classification reward model.

    The text is built exactly as trl's RewardTrainer builds it in training (prompt, the completion
    in the prompt format the reward model was trained in, EOS unless the completion ends with it),
    so scores at evaluation and during alignment mean what they meant to the reward model. A
    completion may come raw (generated) or already formatted (a preference record); its first line
    is judged. A policy's soft prompt is not part of that text: the reward model judges the task
    prompt.
    """

    def __init__(self, path, runtime, batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification

        from lifecycle_dagster.ml.models import LOAD_KW, load_tokenizer

        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.model = (
            AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.float32, use_safetensors=True, **LOAD_KW
            )
            .to(runtime.device)
            .eval()
        )
        self.batch_size = batch_size
        from lifecycle_dagster.ml.data import PromptFormat

        self.fmt = PromptFormat.read(path)  # plain for a reward model that records none
        self._digest: str | None = None  # of its weights, taken once: it never trains here

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], references=None
    ) -> list[float]:
        from lifecycle_dagster.ml import generations
        from lifecycle_dagster.ml.soft_prompt import strip_soft_prompt

        eos = self.tokenizer.eos_token or ""
        texts = [
            reward_text(self.fmt, eos, strip_soft_prompt(p), c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        if self._digest is None:
            self._digest = generations.weights_digest(self.model)
        key = generations.scores_key(self._digest, texts, batch_size=self.batch_size)
        scores = generations.get(key, len(texts))
        if scores is None:
            scores = self._score(texts)
            generations.put(key, scores)
        return scores

    def _score(self, texts: list[str]) -> list[float]:
        import torch

        scores: list[float] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
                truncation=True,
                max_length=1024,
            ).to(device)
            with torch.no_grad():
                scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores


@dataclass
class EvalResult:
    metric: str  # the use case's primary metric
    primary: float  # its mean over the examples
    perplexity: float | None
    mean_reward: float | None
    predictions: list[str] = field(default_factory=list)
    per_example: list[dict] = field(default_factory=list)
    suite_metrics: dict[str, float] = field(default_factory=dict)
    suite: str = ""
    tables: dict[str, list[dict]] = field(default_factory=dict)  # the kind's (a confusion table)
    task_metrics: dict[str, float] = field(default_factory=dict)  # the kind's means (format_ok)

    def metrics(self) -> dict[str, float]:
        out = {**self.suite_metrics, self.metric: self.primary}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        if self.mean_reward is not None:
            out["mean_reward"] = self.mean_reward
        return out


def evaluate_model(
    model,
    tokenizer,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    task,
    metric: str,
    max_new_tokens: int,
    batch_size: int,
    reward: Callable[..., list[float]] | None = None,
    with_perplexity: bool = True,
    ids: Sequence[str] | None = None,
    suite: SuiteConfig | None = None,
    log: Log | None = None,
    stage: str = "evaluate",
) -> EvalResult:
    """Generate for every prompt and score with the task kind (``task.type``): its metrics, the
    primary ``metric``'s mean, reward, perplexity, and the whole evaluation suite (harmlessness,
    format and length compliance) when one is given."""
    preds = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        log=log,
        stage=stage,
    )
    rewards = reward(prompts, preds, references) if reward is not None else None
    ppl = (
        perplexity(model, tokenizer, prompts, references, batch_size=batch_size)
        if with_perplexity
        else None
    )
    ids = ids or [str(i) for i in range(len(prompts))]
    if suite is not None:
        scored = suite_score(preds, references, suite, task=task, ids=ids, rewards=rewards)
        rows, means, kind_scores = scored.per_example, scored.means, scored.task
    else:
        kind_scores = task.kind.score(preds, references, task)
        rows = [
            {
                "id": i,
                "prediction": p,
                "reference": r,
                **{m: round(v[k], 4) for m, v in kind_scores.per_example.items()},
                **({"reward": round(rewards[k], 4)} if rewards else {}),
            }
            for k, (i, p, r) in enumerate(zip(ids, preds, references, strict=True))
        ]
        means = kind_scores.means()
    mean_reward = sum(rewards) / len(rewards) if rewards else None
    if metric == "mean_reward" and mean_reward is None:  # scored without a reward: the kind's
        metric = task.kind.primary
    return EvalResult(
        metric=metric,
        primary=mean_reward if metric == "mean_reward" else means[metric],
        perplexity=ppl,
        mean_reward=mean_reward,
        predictions=preds,
        per_example=rows,
        suite_metrics=means if suite is not None else {},
        suite=suite.fingerprint(task.type) if suite is not None else "",
        tables=kind_scores.tables,
        task_metrics=kind_scores.means(),
    )


def score_split(
    model,
    tokenizer,
    split,
    *,
    max_new_tokens: int,
    batch_size: int,
    prompts: Sequence[str] | None = None,
    reward: Callable[..., list[float]] | None = None,
    suite: SuiteConfig | None = None,
    perplexity: bool = True,
    log: Log | None = None,
    stage: str = "evaluate",
) -> EvalResult:
    """``evaluate_model`` on an ``EvalSplit``: its zero-shot prompts (or ``prompts``, e.g. with
    in-context examples), its references and ids, its use case's task and primary metric;
    perplexity only with a suite (and ``perplexity``)."""
    uc = split.use_case
    return evaluate_model(
        model,
        tokenizer,
        split.prompts if prompts is None else prompts,
        split.references,
        task=uc.task,
        metric=uc.primary_metric,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        reward=reward,
        with_perplexity=suite is not None and perplexity,
        ids=split.ids,
        suite=suite,
        log=log,
        stage=stage,
    )
