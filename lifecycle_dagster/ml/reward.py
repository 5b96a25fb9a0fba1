"""Reward modelling with trl's RewardTrainer: a scalar head scoring prompt + response."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from lifecycle_dagster.ml.progress import (
    Checkpoints,
    History,
    Log,
    Progress,
    hf_callback,
    loss_ends,
    resumed_step,
    trainer_kwargs,
    training_dir,
)
from lifecycle_dagster.ml.runtime import Runtime
from lifecycle_dagster.ml.tunables import Tunables


class RewardMethodConfig(Tunables):
    """Reward-model training (trl's RewardTrainer, Bradley-Terry pairwise loss)."""

    max_steps: int = Field(60, gt=0, description="Optimizer steps.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    batch_size: int = Field(16, gt=0, description="Preference pairs per step.")
    max_length: int = Field(512, gt=0, description="Longest tokenized prompt + response.")
    trainable_layers: int | None = Field(
        None, gt=0, description="Train only the top N blocks, the norm and the head (unset: all)."
    )
    seed: int = Field(0, description="Seed of the head's initialisation and data order.")


@dataclass
class RewardResult:
    path: Path
    loss_start: float
    loss_end: float
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0  # the checkpoint step training resumed from (0: from the start)


def train_reward_model(
    base_model: Path,
    pairs: list[dict],
    out_dir: Path,
    config: RewardMethodConfig,
    runtime: Runtime,
    log: Log | None = None,
    checkpoints: Checkpoints | None = None,
) -> RewardResult:
    """Train on ``{"prompt", "chosen", "rejected"}`` records (Bradley-Terry pairwise loss); with
    ``checkpoints``, resume from the last one an interrupted attempt left."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from lifecycle_dagster.ml.models import LOAD_KW, load_tokenizer
    from lifecycle_dagster.ml.sft import _quiet

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(base_model, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, dtype=torch.float32, use_safetensors=True, **LOAD_KW
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.trainable_layers is not None:
        freeze_lower_layers(model, config.trainable_layers)
    progress = Progress("reward", config.max_steps, log)
    with training_dir(checkpoints, "reward-", "reward", log) as (output_dir, resume, save):
        args = RewardConfig(
            max_length=config.max_length,
            **trainer_kwargs(
                output_dir=output_dir,
                save=save,
                max_steps=config.max_steps,
                learning_rate=config.learning_rate,
                batch_size=config.batch_size,
                seed=config.seed,
                runtime=runtime,
            ),
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tokenizer,
            callbacks=[hf_callback(progress)],
        )
        _quiet(trainer)
        trainer.train(resume_from_checkpoint=resume)
        history = History(trainer.state.log_history)
    trainer.model.eval()
    trainer.model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    loss_start, loss_end = loss_ends(history)
    return RewardResult(
        path=Path(out_dir),
        loss_start=loss_start,
        loss_end=loss_end,
        loss_curve=history.series("loss"),
        seconds=progress.elapsed,
        resumed_from=resumed_step(resume),
    )


def pairwise_accuracy(scorer, pairs: list[dict]) -> tuple[float, float]:
    """Share of held-out pairs where chosen outscores rejected, and the mean margin."""
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer(prompts, [p["chosen"] for p in pairs])
    rejected = scorer(prompts, [p["rejected"] for p in pairs])
    wins = [c > r for c, r in zip(chosen, rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return sum(wins) / len(wins), sum(margins) / len(margins)


def freeze_lower_layers(model, trainable_layers: int) -> int:
    """Train only the top ``trainable_layers`` blocks, the final norm and the score head.

    Backward then stops early, which makes reward modelling several times cheaper on CPU; the lower
    blocks keep the pretrained features. Returns the number of trainable parameters.
    """
    backbone = getattr(model, model.base_model_prefix)
    blocks = backbone.layers
    keep = set(range(max(0, len(blocks) - trainable_layers), len(blocks)))
    for param in model.parameters():
        param.requires_grad = False
    for i in keep:
        for param in blocks[i].parameters():
            param.requires_grad = True
    for param in backbone.norm.parameters():
        param.requires_grad = True
    for param in model.score.parameters():
        param.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class RewardOutcome:
    """Alignment's reward in ``out_dir`` (``reward.json``, and the reward model in ``model/`` when
    there is one) and how well its model ranks held-out pairs."""

    source: str
    description: str
    max_steps: int
    pairwise_accuracy: float | None
    mean_margin: float | None
    loss_curve: list[tuple[int, float]] = field(default_factory=list)


REWARD_FILE = "reward.json"


def describe_reward(uc) -> str:
    """Which reward alignment optimises, in words (the report and the UI say it)."""
    source, spec = uc.reward_source, uc.reward
    if source == "existing":
        return f"an existing reward model ({spec.path})"
    if source == "train":
        pairs = (
            "preference files"
            if uc.data.has_preferences
            else "pairs built from the task data (the reference over the SFT model's worse "
            "answer, else over another row's reference)"
        )
        return f"a reward model trained on {pairs}"
    text = f"the {uc.kind.name} verifiable reward ({uc.kind.reward_description})"
    if spec.model_weight:
        text += f" + {spec.model_weight:g} x the reward model at {spec.path}"
    return text


def with_sft_rejections(
    uc,
    rows: dict[str, list[dict]],
    load_sft,
    fmt,
    *,
    max_new_tokens: int,
    batch_size: int,
    train_pairs: int | None = None,
    log=None,
) -> tuple[dict[str, list[dict]], int]:
    """Pairs built from the task data (no preference files, a reward model to train) with the
    SFT model's answer as the rejected response wherever it scores worse than the reference on
    the primary metric; elsewhere (the SFT model already answers as the reference does) the
    other row's reference stays. ``load_sft`` gives the model and tokenizer, loaded only when
    needed. Only the first ``train_pairs`` train pairs are built (what the reward model's steps
    consume: no answer is generated for a pair it never reads). Returns the pairs and how many
    rejections are the SFT model's."""
    from lifecycle_dagster.ml.data import format_prompt, input_text
    from lifecycle_dagster.ml.evaluate import generate
    from lifecycle_dagster.ml.tasks import normalize_text

    if uc.reward_source != "train" or uc.data.has_preferences:
        return rows, 0
    if train_pairs is not None and train_pairs < len(rows["train"]):
        rows = {**rows, "train": rows["train"][:train_pairs]}
        if log:
            log(f"reward_model: {train_pairs} train pairs, what {uc.reward.max_steps} steps read")
    model, tokenizer = load_sft()
    out, sampled = {}, 0
    for name, pairs in rows.items():
        answers = generate(
            model,
            tokenizer,
            [format_prompt(uc, input_text(uc, r, "prompt"), fmt=fmt) for r in pairs],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            log=log,
            stage=f"reward_model[sft answers, {name}]",
        )
        per = uc.kind.score(answers, [r["chosen"] for r in pairs], uc.task).per_example
        scores = per.get(uc.text_metric) or per[uc.kind.reward_metric]
        out[name] = []
        for row, answer, score in zip(pairs, answers, scores, strict=True):
            worse = answer.strip() and score < 1.0
            if worse and normalize_text(answer) != normalize_text(row["chosen"]):
                out[name].append({**row, "rejected": answer})
                sampled += 1
            else:
                out[name].append(row)
    if log:
        total = sum(len(v) for v in rows.values())
        log(f"reward_model: {sampled} of {total} rejected responses are the SFT model's answers")
    return out, sampled


def weak_reward(uc, accuracy: float | None) -> str | None:
    """Why the reward model is too weak to align against (its held-out pairwise accuracy under
    ``reward.min_pairwise_accuracy``), or None."""
    floor = uc.reward.min_pairwise_accuracy
    if accuracy is None or floor is None or accuracy >= floor:
        return None
    return (
        f"the reward model ranks {accuracy:.0%} of held-out pairs right, under the "
        f"{floor:.0%} reward.min_pairwise_accuracy asks"
    )


def reward_model_for(
    uc,
    base_model: Path,
    train: list[dict],
    held_out: list[dict],
    out_dir: Path,
    runtime: Runtime,
    log: Log | None = None,
    checkpoints: Checkpoints | None = None,
) -> RewardOutcome:
    """Alignment's reward for use case ``uc`` (``uc.reward_source``) in ``out_dir``: a reward model
    trained on ``train`` or copied from ``reward.path`` into ``out_dir/model``, and
    ``reward.json`` saying how rewards are computed; then the model's ranking of ``held_out``."""
    import json
    import shutil

    from lifecycle_dagster.ml.data import PromptFormat
    from lifecycle_dagster.ml.evaluate import RewardScorer

    spec, source, out_dir = uc.reward, uc.reward_source, Path(out_dir)
    curve: list = []
    if source == "train":
        curve = train_reward_model(
            base_model, train, out_dir / "model", spec, runtime, log, checkpoints
        ).loss_curve
        # Trained on the base model's prompt format: it scores completions written in it.
        PromptFormat.read(base_model).write(out_dir / "model")
    elif spec.path:
        if log:
            log(f"reward_model: reusing {spec.path}")
        shutil.copytree(spec.path, out_dir / "model")
    description = describe_reward(uc)
    accuracy = margin = None
    if (out_dir / "model").exists():
        accuracy, margin = pairwise_accuracy(RewardScorer(out_dir / "model", runtime), held_out)
    info = {
        "source": source,
        "description": description,
        "kind": uc.kind.name,
        "model_weight": spec.model_weight if source == "verifiable" else 1.0,
        "pairwise_accuracy": accuracy,
        "mean_margin": margin,
    }
    (out_dir / REWARD_FILE).write_text(json.dumps(info, indent=2))
    return RewardOutcome(
        source=source,
        description=description,
        max_steps=spec.max_steps if source == "train" else 0,
        pairwise_accuracy=accuracy,
        mean_margin=margin,
        loss_curve=curve,
    )


def load_reward(artifact: Path, uc, runtime: Runtime):
    """The reward a ``reward_model`` artifact describes, as ``(prompts, completions, references)
    -> floats``: the reward model's score, the task kind's verifiable reward, or their mix."""
    import json

    from lifecycle_dagster.ml.evaluate import RewardScorer

    artifact = Path(artifact)
    info_file = artifact / REWARD_FILE
    info = json.loads(info_file.read_text()) if info_file.exists() else {"source": "train"}
    model = RewardScorer(artifact / "model", runtime) if (artifact / "model").exists() else None
    if info["source"] != "verifiable":
        return model
    kind, task, weight = uc.kind, uc.task, float(info.get("model_weight") or 0.0)

    def reward(prompts, completions, references):
        scores = kind.reward(list(completions), list(references), task)
        if model is not None and weight:
            extra = model(prompts, completions)
            scores = [s + weight * m for s, m in zip(scores, extra, strict=True)]
        return scores

    return reward
