"""Smaller students of the aligned model, the compression that removes computation rather than
bits: depth pruning and distillation.

- Depth pruning drops the decoder blocks whose removal changes the hidden states least: a block's
  influence is one minus the mean cosine similarity of its input and output hidden states over the
  calibration tokens (ShortGPT's block influence). The pruned model is then healed by a short
  distillation.
- Distillation trains a student of fewer blocks (the teacher's, evenly spaced, first and last kept)
  on the teacher: the KL divergence to its logits (temperature ``T``, scaled by T^2) and the cross-
  entropy of its greedy answers, on the train prompts.

Both students are saved as full models beside the teacher's tokenizer and prompt format; the
compression stage exports them like any other variant and the policy chooses among all of them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lifecycle_dagster.ml.progress import Log, Progress
from lifecycle_dagster.ml.tunables import Tunables

STUDENTS_FILE = "students.json"
STUDENTS = ("pruned", "distilled")


class DistillConfig(Tunables):
    """Depth pruning and distillation (the use case's ``distillation`` section)."""

    prune_layers: int = Field(
        0,
        ge=0,
        description="Depth pruning: decoder blocks dropped, the least influential; 0: none.",
    )
    heal_steps: int = Field(20, ge=0, description="Depth pruning: distillation steps that heal.")
    student_layers: int = Field(
        0, ge=0, description="Distillation: the student's decoder blocks; 0: no student."
    )
    student_steps: int = Field(60, gt=0, description="Distillation: the student's steps.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (linear decay).")
    batch_size: int = Field(8, gt=0, description="Sequences per optimizer step.")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the KL term.")
    kl_weight: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Loss = w * T^2 * KL(teacher || student) + (1 - w) * cross-entropy of the "
        "teacher's answers.",
    )
    examples: int = Field(
        128, gt=0, description="Train prompts the teacher answers: the distillation data."
    )
    export: list[Literal["fp32", "int8", "int4"]] = Field(
        default_factory=lambda: ["int4"],
        description="ONNX variants each student is exported in.",
    )

    @model_validator(mode="after")
    def _students_smaller(self):
        if self.student_layers == 1:
            raise ValueError("student_layers: a student needs at least 2 blocks (or 0: none)")
        return self

    @property
    def enabled(self) -> bool:
        return self.prune_layers > 0 or self.student_layers > 0


@dataclass
class Student:
    name: str  # "pruned" or "distilled"
    path: Path
    kept: list[int]  # the teacher's blocks it keeps
    teacher_layers: int
    parameters: int
    steps: int
    kl_before: float  # held-out KL to the teacher before training
    kl_after: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    reverted: bool = False  # training raised its KL: saved untrained

    @property
    def learned(self) -> bool:
        return self.steps == 0 or self.kl_after < self.kl_before

    def row(self) -> dict:
        return {
            "student": self.name,
            "blocks": f"{len(self.kept)}/{self.teacher_layers}",
            "parameters_m": round(self.parameters / 1e6, 1),
            "steps": self.steps,
            "kl_before": round(self.kl_before, 4),
            "kl_after": round(self.kl_after, 4),
            "saved": "untrained (training raised its KL)" if self.reverted else "trained",
            "seconds": round(self.seconds, 1),
        }


@dataclass
class StudentsResult:
    teacher: str  # the teacher's identity: where the candidate is recorded
    influence: list[float]  # per teacher block
    students: dict[str, Student]

    def write(self, out: Path) -> None:
        record = {
            "teacher": str(self.teacher),
            "influence": self.influence,
            "students": {n: {**asdict(s), "path": s.path.name} for n, s in self.students.items()},
        }
        (Path(out) / STUDENTS_FILE).write_text(json.dumps(record, indent=2))


def read_students(folder: Path, teacher: str, log: Log | None = None) -> dict[str, Path]:
    """The student model folders a ``distilled_model`` artifact holds, when they are students of
    ``teacher`` (its identity); none otherwise (students of another candidate are not its)."""
    path = Path(folder) / STUDENTS_FILE
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    if record["teacher"] != str(teacher):
        if log and record["students"]:
            log(
                f"students of {record['teacher']}, not of {teacher}: left out until "
                "distilled_model runs for this candidate"
            )
        return {}
    return {n: Path(folder) / s["path"] for n, s in record["students"].items()}


def _layers(model):
    """The decoder's block list (Llama-style ``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: depth pruning needs a decoder with model.layers")
    return layers


def _batches(tokenizer, texts: list[str], batch_size: int, device, max_length: int = 512):
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        )
        yield enc.to(device)


def block_influence(model, tokenizer, texts: list[str], batch_size: int = 8) -> list[float]:
    """Each block's influence: 1 - the mean cosine similarity of its input and output hidden
    states over the real (unpadded) tokens of ``texts``."""
    import torch

    layers = _layers(model)
    sums = [0.0] * len(layers)
    count = 0
    captured: dict[int, tuple] = {}

    def hook(index):
        def fn(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            captured[index] = (hidden_in, hidden_out)

        return fn

    handles = [
        layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for enc in _batches(tokenizer, texts, batch_size, device):
                model(**enc)
                mask = enc["attention_mask"].bool()
                for i, (h_in, h_out) in captured.items():
                    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                    sums[i] += float(cos[mask].sum())
                count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(count, 1) for s in sums]


def keep_blocks(model, keep: list[int]):
    """``model`` with only the blocks ``keep`` (in order), re-indexed for the KV cache."""
    import torch

    layers = _layers(model)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new
    config = model.config
    types = getattr(config, "layer_types", None)
    if types:
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def evenly_spaced(total: int, n: int) -> list[int]:
    """``n`` of ``total`` block indices, evenly spaced, the first and the last among them."""
    if not 2 <= n < total:
        raise ValueError(f"a student of {n} blocks from a teacher of {total}")
    return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})


def least_influential(influence: list[float], drop: int) -> list[int]:
    """The blocks kept when the ``drop`` least influential ones go (never the first)."""
    if not 0 < drop < len(influence) - 1:
        raise ValueError(f"cannot drop {drop} of {len(influence)} blocks")
    order = sorted(range(1, len(influence)), key=lambda i: influence[i])
    return sorted(set(range(len(influence))) - set(order[:drop]))


def _sequences(tokenizer, pairs: list[tuple[str, str]], device, max_length: int = 512):
    """Right-padded prompt + answer (+ EOS) token ids, and a mask of the answer tokens."""
    import torch

    ids, answer = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seq = (p + c)[:max_length]
        ids.append(seq)
        answer.append(([0] * len(p) + [1] * len(c))[:max_length])
    width = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
    answer_mask = torch.tensor([a + [0] * (width - len(a)) for a in answer], device=device)
    return input_ids, attention, answer_mask


def _losses(student, teacher, batch, temperature: float):
    """Per-batch KL(teacher || student) at ``temperature`` and the cross-entropy of the answer
    tokens, both over the positions that predict an answer token."""
    import torch
    import torch.nn.functional as F

    input_ids, attention, answer = batch
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    s_logits = student(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    predicts = answer[:, 1:].bool()
    s, t = s_logits[predicts], t_logits[predicts]
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
        log_target=True, reduction="batchmean",
    )  # fmt: skip
    ce = F.cross_entropy(s, input_ids[:, 1:][predicts])
    return kl, ce


def held_out_kl(student, teacher, tokenizer, pairs, batch_size: int) -> float:
    """Mean KL(teacher || student) at temperature 1 on ``pairs`` (prompt, teacher's answer)."""
    import torch

    device = next(student.parameters()).device
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            kl, _ = _losses(student, teacher, _sequences(tokenizer, chunk, device), 1.0)
            total += float(kl) * len(chunk)
            n += len(chunk)
    return total / max(n, 1)


def distill(
    student,
    teacher,
    tokenizer,
    pairs: list[tuple[str, str]],
    config: DistillConfig,
    steps: int,
    *,
    log: Log | None = None,
    stage: str = "distill",
) -> list[dict]:
    """Train ``student`` on ``pairs`` (prompt, the teacher's answer) against ``teacher``:
    ``steps`` AdamW steps with linear decay. Returns the loss history."""
    import torch

    device = next(student.parameters()).device
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / max(steps, 1))
    progress = Progress(stage, steps, log)
    generator = torch.Generator().manual_seed(0)
    order: list[int] = []
    for step in range(1, steps + 1):
        if len(order) < config.batch_size:
            order += torch.randperm(len(pairs), generator=generator).tolist()
        chunk = [pairs[i] for i in order[: config.batch_size]]
        del order[: config.batch_size]
        kl, ce = _losses(student, teacher, _sequences(tokenizer, chunk, device), config.temperature)
        w = config.kl_weight
        loss = w * config.temperature**2 * kl + (1 - w) * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.update(step, loss=loss.item(), kl=kl.item(), ce=ce.item())
    student.eval()
    return progress.history


def make_students(
    teacher_dir: Path,
    teacher_id: str,
    out_dir: Path,
    train_prompts: list[str],
    held_out_prompts: list[str],
    config: DistillConfig,
    runtime,
    *,
    max_new_tokens: int,
    batch_size: int,
    log: Log | None = None,
) -> StudentsResult:
    """The teacher (``teacher_dir``, recorded as ``teacher_id``) answers ``config.examples`` train
    prompts; block influence is measured on
    those sequences; the pruned and/or distilled students (as ``config`` asks) are trained and
    saved under ``out_dir/<name>``. The teacher's answers to ``held_out_prompts`` (the eval split's,
    already generated by evaluation) measure each student's KL to it before and after training."""
    from lifecycle_dagster.ml.evaluate import generate
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    teacher, tok = load_causal_lm(teacher_dir, runtime), load_tokenizer(teacher_dir)

    def answered(prompts: list[str], what: str) -> list[tuple[str, str]]:
        answers = generate(
            teacher,
            tok,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            log=log,
            stage=f"distilled_model[teacher, {what}]",
        )
        pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if a.strip()]
        if not pairs:
            raise ValueError(f"distillation: the teacher answered none of the {what} prompts")
        return pairs

    pairs = answered(train_prompts[: config.examples], "train")
    held_out = answered(held_out_prompts, "eval")
    influence = block_influence(teacher, tok, [p + a for p, a in pairs], batch_size)
    total = len(influence)
    if log:
        shown = ", ".join(f"{i}:{v:.3f}" for i, v in enumerate(influence))
        log(f"distilled_model: block influence {shown}")
    plans = {}
    if config.prune_layers:
        plans["pruned"] = (least_influential(influence, config.prune_layers), config.heal_steps)
    if config.student_layers:
        plans["distilled"] = (evenly_spaced(total, config.student_layers), config.student_steps)
    students = {}
    for name, (keep, steps) in plans.items():
        start = time.monotonic()
        student = keep_blocks(load_causal_lm(teacher_dir, runtime, training=True), keep)
        before = held_out_kl(student, teacher, tok, held_out, batch_size)
        if log:
            log(f"distilled_model[{name}]: {len(keep)} of {total} blocks, held-out KL {before:.4f}")
        untrained = {k: v.detach().clone() for k, v in student.state_dict().items()}
        history = distill(
            student, teacher, tok, pairs, config, steps, log=log, stage=f"distilled_model[{name}]"
        )
        after = held_out_kl(student, teacher, tok, held_out, batch_size)
        reverted = steps > 0 and after > before
        if reverted:  # training moved it away from the teacher: the untrained student is kept
            student.load_state_dict(untrained)
            if log:
                log(
                    f"distilled_model[{name}]: WARNING training raised the held-out KL "
                    f"({before:.4f} -> {after:.4f}); the untrained student is kept"
                )
        del untrained
        folder = out_dir / name
        _save_beside_teacher(student, teacher_dir, folder)
        students[name] = Student(
            name=name,
            path=folder,
            kept=keep,
            teacher_layers=total,
            parameters=sum(p.numel() for p in student.parameters()),
            steps=steps,
            kl_before=before,
            kl_after=after,
            seconds=time.monotonic() - start,
            history=history,
            reverted=reverted,
        )
        if log and not reverted:
            log(f"distilled_model[{name}]: held-out KL {before:.4f} -> {after:.4f}")
        del student
    result = StudentsResult(teacher_id, influence, students)
    result.write(out_dir)
    return result


def _save_beside_teacher(student, teacher_dir: Path, folder: Path) -> None:
    """The student's weights (safetensors) with the teacher's tokenizer, generation config and
    prompt format."""
    if not math.isfinite(sum(p.detach().float().abs().sum().item() for p in student.parameters())):
        raise ValueError(f"{folder.name}: the student's weights are not finite (lower the rate)")
    from lifecycle_dagster.ml.models import save_beside

    save_beside(student, teacher_dir, folder)
