"""The heavy steps, each one function of a use case, artifact folders and settings that returns
its result: pre-training (or loading) the base model, fine-tuning, the reward model, alignment
and the ONNX export.

A step's arguments and result cross a process boundary as JSON (``encode``/``decode``, driven by
the function's type hints), so the same step runs in the run's own process, in a child process,
or in a pod of its own with a GPU (Dagster Pipes: ``lifecycle_dagster/pipes_step.py``), and hands
back the same result to the asset that records it. Paths are where the host running the step
sees the folders: the run's own filesystem, or a volume the run and the step pod share.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lifecycle_dagster.ml.align import AlignMethodConfig, AlignOutcome
from lifecycle_dagster.ml.compress import CompressionResult
from lifecycle_dagster.ml.distill import StudentsResult
from lifecycle_dagster.ml.evaluate import EvalResult
from lifecycle_dagster.ml.models import BaseModelResult
from lifecycle_dagster.ml.progress import Checkpoints, Log
from lifecycle_dagster.ml.reward import RewardOutcome
from lifecycle_dagster.ml.runtime import RuntimeRequest
from lifecycle_dagster.ml.sft import SFTMethodConfig, SFTResult
from lifecycle_dagster.ml.usecase import UseCase


@dataclasses.dataclass
class Trained:
    """A trained step's outcome and the device it ran on, as that host described it."""

    device: str


@dataclasses.dataclass
class BaseModelStep(Trained):
    result: BaseModelResult


@dataclasses.dataclass
class SFTStep(Trained):
    result: SFTResult
    after: EvalResult  # the adapted model on the eval split


@dataclasses.dataclass
class RewardStep(Trained):
    outcome: RewardOutcome
    held_out: int  # preference pairs it was ranked on
    sampled: int  # rejected answers that are the SFT model's


@dataclasses.dataclass
class AlignStep(Trained):
    outcome: AlignOutcome


def base_model(
    uc: UseCase, data: Path, out: Path, compute: RuntimeRequest, cache_dir: Path, log: Log
) -> BaseModelStep:
    """The use case's base model in ``out/model``: loaded from its source, or pre-trained from
    scratch on the task data, with its prompt format."""
    from lifecycle_dagster.ml.data import PromptFormat, read_rows
    from lifecycle_dagster.ml.models import load_tokenizer, materialize_base_model

    runtime = compute.resolve()
    log(f"base_model: source {uc.base_model.source} on {runtime.describe()}")
    rows = read_rows(data / "train.jsonl")
    corpus = [r[uc.task.input_field] for r in rows] + [r[uc.task.target_field] for r in rows]
    result = materialize_base_model(
        uc.base_model,
        corpus,
        out / "model",
        runtime,
        log=log,
        cache_dir=cache_dir,
        adaptation=uc.adaptation,
    )
    PromptFormat.of(uc, load_tokenizer(out / "model")).write(out / "model")
    return BaseModelStep(runtime.describe(), result)


def sft_adapter(
    uc: UseCase,
    base: Path,
    data: Path,
    out: Path,
    method: SFTMethodConfig,
    compute: RuntimeRequest,
    checkpoints: Checkpoints | None,
    log: Log,
) -> SFTStep:
    """Fine-tune ``base`` on the task data into ``out/adapter`` (``method``: prompt tuning, LoRA
    or full), then score it on the eval split as the later stages load it."""
    from lifecycle_dagster.ml.data import EvalSplit, PromptFormat, read_rows, sft_records
    from lifecycle_dagster.ml.distributed import fine_tune
    from lifecycle_dagster.ml.evaluate import score_split
    from lifecycle_dagster.ml.sft import load_sft

    runtime = compute.resolve()
    records = sft_records(uc, read_rows(data / "train.jsonl"), PromptFormat.read(base))
    log(f"sft_adapter: {method.method}, {method.max_steps} steps on {runtime.describe()}")
    result = fine_tune(
        base,
        records,
        out / "adapter",
        method,
        runtime,
        uc.compute.processes,
        log=log,
        init_text=uc.task.instruction,
        checkpoints=checkpoints,
    )
    (out / "sft.json").write_text(method.model_dump_json())
    # Merged, as alignment and evaluation load it: the same weights, answers generated once.
    model, tok = load_sft(base, out / "adapter", runtime, merge=True)
    after = score_split(
        model,
        tok,
        EvalSplit.read(uc, data, base),
        max_new_tokens=uc.evaluation.max_new_tokens,
        batch_size=uc.evaluation.batch_size,
        log=log,
        stage="sft_adapter[eval]",
    )
    return SFTStep(runtime.describe(), result, after)


def reward_model(
    uc: UseCase,
    base: Path,
    prefs: Path,
    sft: Path,
    out: Path,
    compute: RuntimeRequest,
    checkpoints: Checkpoints | None,
    log: Log,
) -> RewardStep:
    """Alignment's reward in ``out``: preference pairs (the SFT model's worse answers as rejected
    ones where the use case has no preference files), then the reward model trained on them,
    reused, or the task kind's verifiable reward, ranked on the held-out pairs."""
    from lifecycle_dagster.ml.data import PromptFormat, preference_records, read_rows
    from lifecycle_dagster.ml.reward import reward_model_for, with_sft_rejections
    from lifecycle_dagster.ml.sft import load_sft

    runtime = compute.resolve()
    fmt = PromptFormat.read(base)
    rows, sampled = with_sft_rejections(
        uc,
        {n: read_rows(prefs / f"preferences_{n}.jsonl") for n in ("train", "eval")},
        lambda: load_sft(base, sft, runtime, merge=True),
        fmt,
        max_new_tokens=uc.evaluation.max_new_tokens,
        batch_size=uc.evaluation.batch_size,
        train_pairs=uc.reward.max_steps * uc.reward.batch_size,
        log=log,
    )
    train = preference_records(uc, rows["train"], fmt)
    held_out = preference_records(uc, rows["eval"], fmt)
    outcome = reward_model_for(uc, base, train, held_out, out, runtime, log, checkpoints)
    return RewardStep(runtime.describe(), outcome, len(held_out), sampled)


def aligned_model(
    uc: UseCase,
    base: Path,
    sft: Path,
    data: Path,
    prefs: Path,
    reward: Path,
    out: Path,
    method: AlignMethodConfig,
    compute: RuntimeRequest,
    skip: str | None,
    checkpoints: Checkpoints | None,
    log: Log,
) -> AlignStep:
    """The SFT model (``sft``, on ``base``) aligned against the ``reward`` artifact into
    ``out/model``, scored before and after; ``skip`` (why) keeps the SFT model untrained."""
    from lifecycle_dagster.ml.align import align_and_score
    from lifecycle_dagster.ml.data import (
        EvalSplit,
        PromptFormat,
        preference_records,
        prompts_for,
        read_rows,
        references,
    )
    from lifecycle_dagster.ml.reward import load_reward
    from lifecycle_dagster.ml.sft import load_sft

    runtime = compute.resolve()
    rows = read_rows(data / "train.jsonl")
    fmt = PromptFormat.read(base)
    # The SFT model as one network (LoRA merged, a soft prompt baked into the vocabulary), with
    # the tokenizer that prompts it.
    policy, tok = load_sft(base, sft, runtime, merge=True, training=True)
    outcome = align_and_score(
        policy,
        tok,
        out / "model",
        method,
        runtime,
        prompts=prompts_for(uc, rows, fmt=fmt),
        references=references(uc, rows),
        pairs=preference_records(uc, read_rows(prefs / "preferences_train.jsonl"), fmt),
        scorer=load_reward(reward, uc, runtime),
        split=EvalSplit.read(uc, data, base),
        max_new_tokens=uc.evaluation.max_new_tokens,
        batch_size=uc.evaluation.batch_size,
        log=log,
        skip=skip,
        checkpoints=checkpoints,
    )
    fmt.write(out / "model")  # the aligned model is prompted as its base was
    return AlignStep(runtime.describe(), outcome)


@dataclasses.dataclass
class StudentsStep(Trained):
    result: StudentsResult


def distilled_model(
    uc: UseCase,
    teacher: Path,
    teacher_id: str,
    data: Path,
    out: Path,
    compute: RuntimeRequest,
    log: Log,
) -> StudentsStep:
    """The students of ``teacher`` (the candidate the evaluation passed, recorded as
    ``teacher_id``) the use case's ``distillation`` asks for, trained into ``out``: depth-pruned
    and healed, and distilled."""
    from lifecycle_dagster.ml.data import EvalSplit, PromptFormat, prompts_for, read_rows
    from lifecycle_dagster.ml.distill import StudentsResult, make_students

    runtime = compute.resolve()
    config = uc.distillation
    if not config.enabled:
        log("distilled_model: no students asked for (distillation.prune_layers, student_layers 0)")
        result = StudentsResult(teacher_id, [], {})
        result.write(out)
        return StudentsStep(runtime.describe(), result)
    log(f"distilled_model: students of {teacher.parent.name} on {runtime.describe()}")
    train = prompts_for(uc, read_rows(data / "train.jsonl"), fmt=PromptFormat.read(teacher))
    result = make_students(
        teacher,
        teacher_id,
        out,
        train,
        EvalSplit.read(uc, data, teacher).prompts,
        config,
        runtime,
        max_new_tokens=uc.evaluation.max_new_tokens,
        batch_size=uc.evaluation.batch_size,
        log=log,
    )
    return StudentsStep(runtime.describe(), result)


def onnx_model(
    uc: UseCase,
    source: Path,
    source_id: str,
    data: Path,
    reward: Path,
    students: Path | None,
    out: Path,
    reference: dict[str, float | None],
    log: Log,
) -> CompressionResult:
    """``source`` (the candidate the evaluation passed, recorded as ``source_id``) exported to
    ONNX in ``out`` in every variant, each proven against PyTorch and scored on the eval split;
    so are the pruned and distilled students in ``students`` (a ``distilled_model`` artifact).
    The comparison runs where onnxruntime runs: PyTorch on CPU in fp32. ``reference`` (the
    evaluation's PyTorch scores) holds for the evaluation's rows only: on others
    (``compression.eval_examples``) the fp32 export's scores are the reference."""
    from lifecycle_dagster.ml.compress import compress, scored_split, serving_manifest
    from lifecycle_dagster.ml.data import EvalSplit, prompts_for, read_rows, sft_records
    from lifecycle_dagster.ml.distill import read_students
    from lifecycle_dagster.ml.retrieval import INDEX_DIR, RETRIEVAL_FILE
    from lifecycle_dagster.ml.reward import load_reward
    from lifecycle_dagster.ml.runtime import select_runtime

    runtime = select_runtime("cpu", uc.compute.torch_threads, uc.compute.ort_threads)
    evaluated = EvalSplit.read(uc, data, source)
    split = scored_split(evaluated, uc.compression)
    if split.ids != evaluated.ids:
        reference = {}
    train = read_rows(data / "train.jsonl")
    retrieval = None
    if (data / INDEX_DIR).is_dir():  # the export carries the index its prompts were made from
        shutil.copytree(data / INDEX_DIR, Path(out) / INDEX_DIR)
        retrieval = json.loads((data / RETRIEVAL_FILE).read_text())
    return compress(
        source,
        out,
        uc.compression,
        runtime=runtime,
        max_new_tokens=uc.evaluation.max_new_tokens,
        check_prompts=split.first(uc.compression.check_prompts).prompts,
        split=split,
        reward=load_reward(reward, uc, runtime),
        reference=reference,
        serving=serving_manifest(uc, Path(source_id), split.fmt, retrieval),
        students=read_students(students, source_id, log) if students else {},
        student_variants=uc.distillation.export,
        # train prompts with their reference answers: the tokens a served model reads and writes
        calibration=[r["prompt"] + r["completion"] for r in sft_records(uc, train, fmt=split.fmt)],
        prompts=prompts_for(uc, train, fmt=split.fmt),
        log=log,
    )


STEPS: dict[str, Callable] = {
    f.__name__: f
    for f in (base_model, sft_adapter, reward_model, aligned_model, distilled_model, onnx_model)
}


def encode_args(name: str, **kwargs) -> dict:
    """A step's arguments (all but ``log``) as JSON, checked against its signature here, before
    anything is launched."""
    params = set(inspect.signature(STEPS[name]).parameters) - {"log"}
    if set(kwargs) != params:
        raise TypeError(f"step {name}: arguments {sorted(kwargs)}, expected {sorted(params)}")
    return {k: encode(v) for k, v in kwargs.items()}


# Deprecations one library hits in another's API, which no setting of ours changes: the step's
# log keeps to what a user can act on.
LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def call(name: str, args: dict, log: Log) -> Any:
    """Run step ``name`` with JSON ``args``; its result as JSON."""
    fn = STEPS[name]
    hints = typing.get_type_hints(fn)
    with warnings.catch_warnings():
        for message in LIBRARY_DEPRECATIONS:  # peft reads the model's old name for it
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        return encode(fn(**{k: decode(v, hints[k]) for k, v in args.items()}, log=log))


def result_of(name: str, value: Any) -> Any:
    """A step's JSON result as the dataclass its function returns."""
    return decode(value, typing.get_type_hints(STEPS[name])["return"])


def encode(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, list | tuple):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        (kind,) = [a for a in args if a is not type(None)]  # X | None
        return decode(value, kind)
    if hint is Path:
        return Path(value)
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return hint.model_validate(value)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = [f for f in dataclasses.fields(hint) if f.init and f.name in value]
        return hint(**{f.name: decode(value[f.name], hints[f.name]) for f in fields})
    if origin is list:
        return [decode(v, args[0]) for v in value]
    if origin is tuple:
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else args
        return tuple(decode(v, k) for v, k in zip(value, kinds, strict=True))
    if origin is dict:
        return {k: decode(v, args[1]) for k, v in value.items()}
    return value
