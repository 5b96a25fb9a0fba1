"""The use case: one narrowly scoped task, its data, its model, its methods and its thresholds.

The schema is made of the methods' own configs (``SFTMethodConfig``, ``AlignMethodConfig``,
``RewardMethodConfig``, ``CompressConfig``, ``SuiteConfig``, ``PretrainConfig``): each tunable is
declared once, where the method that uses it lives. A ladder rung holds partial updates of those same
configs. Reading YAML files (profiles, layers, overrides) with ``file:line: field`` errors is
``ml.usecase_loader``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.align import AlignMethodConfig
from lifecycle_dagster.ml.compress import CompressConfig
from lifecycle_dagster.ml.distill import DistillConfig
from lifecycle_dagster.ml.pretrain import PretrainConfig
from lifecycle_dagster.ml.retrieval import RetrievalSpec
from lifecycle_dagster.ml.reward import RewardMethodConfig
from lifecycle_dagster.ml.sft import SFTMethodConfig
from lifecycle_dagster.ml.suite import SuiteConfig
from lifecycle_dagster.ml.tasks import KINDS

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PACKAGE_ROOT / "profiles"
USECASES_DIR = PACKAGE_ROOT / "usecases"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    """What the model is asked to do. ``type`` names a task kind (``ml.tasks``): how answers are
    parsed and scored, which metric is primary, which verifiable reward it offers."""

    type: str = Field("summarisation", description="The task kind: " + ", ".join(sorted(KINDS)))
    instruction: str = Field(min_length=1, description="What the model is asked to do.")
    prompt_template: str = Field(
        default="{instruction}\n\n{input}\n\nAnswer:",
        description="Template of one query; {instruction}, {input} and {labels} are filled in.",
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Prompt through the model's chat template, the filled-in template being the "
        "user turn: auto (when the model has one, as instruct models do), always, never.",
    )
    input_field: str = Field("input", description="The column the model reads.")
    target_field: str = Field("target", description="The column it should answer.")
    labels: list[str] = Field(
        default_factory=list, description="classification: the closed label set."
    )
    fields: dict[str, Literal["string", "number", "integer", "boolean", "list"]] = Field(
        default_factory=dict, description="extraction: the answer's fields and their types."
    )

    @model_validator(mode="after")
    def _fits_its_kind(self) -> TaskSpec:
        if "{input}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {input}")
        kind = tasks.get(self.type)
        kind.check(self)
        if self.labels and kind.name != "classification":
            raise ValueError(f"labels are for classification, not {kind.name}")
        if self.fields and kind.name != "extraction":
            raise ValueError(f"fields are for extraction, not {kind.name}")
        return self

    @property
    def kind(self) -> tasks.TaskKind:
        return tasks.get(self.type)


class DataSpec(_Strict):
    """The data files: JSONL, CSV/TSV, Parquet or a ``datasets.save_to_disk`` directory (the format
    told by the name unless ``format`` says it). Without an eval file the pipeline holds out a
    seeded share of the train file (per label for a classification), or takes a DatasetDict's
    validation/test split."""

    train: Path = Field(description="Task examples: a file, or a save_to_disk directory.")
    eval: Path | None = Field(None, description="Held-out task examples (None: split from train).")
    format: Literal["jsonl", "csv", "tsv", "parquet", "arrow"] | None = Field(
        None, description="The files' format (None: from each file's suffix)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Field -> the column holding it, e.g. {input: 'Customer message', id: "
        "ticket}; fields are id, the task's input and target fields, prompt, chosen, rejected.",
    )
    eval_fraction: float = Field(
        0.2, gt=0, lt=1, description="Without an eval file: the share of train held out."
    )
    split_seed: int = Field(0, description="Without an eval file: the seed of the split.")
    preferences_train: Path | None = Field(
        None, description="Preference pairs (id, prompt, chosen, rejected); optional."
    )
    preferences_eval: Path | None = Field(None, description="Held-out preference pairs.")
    max_chars: int = Field(4000, gt=0, description="Longest accepted text field, in characters.")
    min_rows: int = Field(8, gt=0, description="Fewest rows a split may have.")

    @model_validator(mode="after")
    def _pairs_together(self) -> DataSpec:
        if (self.preferences_train is None) != (self.preferences_eval is None):
            raise ValueError("give both preferences_train and preferences_eval, or neither")
        return self

    @property
    def has_preferences(self) -> bool:
        return self.preferences_train is not None

    def files(self) -> dict[str, Path]:
        """The data files the use case names, by field."""
        names = ("train", "eval", "preferences_train", "preferences_eval")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


class BaseModelSpec(_Strict):
    source: Literal["scratch", "local", "gguf", "hub"] = "scratch"
    path: str | None = Field(None, description="Local HF directory, GGUF file, or hub id.")
    revision: str | None = None
    scratch: PretrainConfig = PretrainConfig()

    @model_validator(mode="after")
    def _path_given(self) -> BaseModelSpec:
        if self.source != "scratch" and not self.path:
            raise ValueError(f"source '{self.source}' needs a path")
        return self


class PromptingSpec(_Strict):
    shots: list[int] = Field(default_factory=lambda: [0, 1, 3], min_length=1)
    max_new_tokens: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _shots_in_range(self) -> PromptingSpec:
        if any(k < 0 or k > 16 for k in self.shots):
            raise ValueError("shots must be between 0 and 16")
        return self


class RewardSpec(RewardMethodConfig):
    """Where alignment's reward comes from (the training tunables are ``RewardMethodConfig``'s):

    - ``train``: a reward model trained on preference pairs: the use case's preference files, or,
      without them, pairs built from the task data (the reference chosen over another row's);
    - ``existing``: a reward model reused from a local directory (``path``);
    - ``verifiable``: the task kind's verifiable reward (a correct label, field F1, token F1),
      plus ``model_weight`` times the score of the reward model at ``path`` when one is given.

    Unset, it is ``train`` when the use case has preference files or is a summarisation, and
    ``verifiable`` otherwise (see ``UseCase.reward_source``)."""

    source: Literal["train", "existing", "verifiable"] | None = Field(
        None, description="train, existing or verifiable (unset: chosen from the data given)."
    )
    path: str | None = Field(None, description="An existing reward model directory.")
    model_weight: float = Field(
        0.0, ge=0, description="verifiable: weight of the reward model at path, mixed in."
    )
    min_pairwise_accuracy: float | None = Field(
        0.6,
        ge=0,
        le=1,
        description="A reward model ranking fewer held-out pairs right than this is too weak to "
        "trust: alignment against it is skipped and the SFT model is the candidate (None: any).",
    )

    @model_validator(mode="after")
    def _path_given(self) -> RewardSpec:
        if self.source == "existing" and not self.path:
            raise ValueError("source 'existing' needs a path")
        if self.model_weight and not self.path:
            raise ValueError("model_weight needs the path of a reward model to mix in")
        return self


class Threshold(_Strict):
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def holds_over(self, low: float, high: float) -> bool:
        """Whether the whole interval ``[low, high]`` is on the right side."""
        return (self.min is None or low >= self.min) and (self.max is None or high <= self.max)

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts) or "any"


# Metrics every kind reports besides its own (``length_ok`` only for free-text kinds).
GENERAL_METRICS = ("mean_reward", "perplexity", "harmless", "format_ok")


class EvaluationSpec(_Strict):
    primary_metric: str | None = Field(
        None,
        description="What every stage optimises and a candidate must beat the champion on: one "
        "of the task kind's metrics, or mean_reward (None: the kind's primary metric).",
    )
    max_examples: int | None = Field(None, gt=0, description="Cap on eval examples (None: all).")
    pass_on: Literal["estimate", "interval"] = Field(
        "estimate",
        description="How a threshold is judged: on the mean over the eval examples, or on its "
        "95% bootstrap interval (the whole interval must meet it, so noise cannot pass a "
        "candidate that falls short). The interval is reported either way.",
    )
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    suite: SuiteConfig = SuiteConfig()
    thresholds: dict[str, Threshold] = Field(default_factory=dict)


AdaptationUpdate = SFTMethodConfig.partial("AdaptationUpdate")
AlignmentUpdate = AlignMethodConfig.partial("AlignmentUpdate")


class LadderStep(_Strict):
    """One rung of the re-adaptation ladder: partial updates of the use case's ``adaptation`` and
    ``alignment`` for the next attempt. Prompt engineering (zero/one/few-shot) is re-scored in every
    attempt by prompt_baseline; adaptation then climbs prompt tuning -> LoRA with rising rank -> full
    fine-tuning; alignment gets more steps or another KL weight."""

    adaptation: AdaptationUpdate = Field(
        default_factory=AdaptationUpdate, description="Applied over the use case's adaptation."
    )
    max_steps_factor: float | None = Field(
        None, gt=0, description="Adaptation steps: times the last attempt's."
    )
    alignment: AlignmentUpdate = Field(
        default_factory=AlignmentUpdate, description="Applied over the use case's alignment."
    )
    alignment_max_steps_factor: float | None = Field(
        None, gt=0, description="Alignment steps: times the use case's."
    )

    @model_validator(mode="before")
    @classmethod
    def _flat_rung(cls, data):
        """A flat rung (``{method, lora_r, max_steps, learning_rate, beta}``, the format before
        rungs held partial updates, still in older use cases and artifacts) reads as nested."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in ("method", "max_steps", "learning_rate", "lora_r") if k in data}
        beta = {"beta": data["beta"]} if "beta" in data else {}
        if not flat and not beta:
            return data
        rest = {k: v for k, v in data.items() if k not in {*flat, "beta"}}
        return {
            **rest,
            "adaptation": {**rest.get("adaptation", {}), **flat},
            "alignment": {**rest.get("alignment", {}), **beta},
        }


class ReadaptationSpec(_Strict):
    max_attempts: int = Field(3, gt=0, description="Attempts in all, the first one included.")
    max_wall_minutes: float = Field(
        240, gt=0, description="Wall time from attempt 1's start after which no attempt starts."
    )
    ladder: list[LadderStep] = Field(
        default_factory=lambda: [
            LadderStep(adaptation={"method": "lora", "lora_r": 16}, max_steps_factor=2),
            LadderStep(
                adaptation={"method": "lora", "lora_r": 32},
                max_steps_factor=2,
                alignment_max_steps_factor=2,
            ),
            LadderStep(adaptation={"method": "full", "learning_rate": 1e-4}, max_steps_factor=2),
        ],
        description="Overrides per escalation, in order.",
    )


class ComputeSpec(_Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    torch_threads: int | None = Field(None, gt=0)
    ort_threads: int | None = Field(None, gt=0)
    budget_minutes: float = Field(30, gt=0, description="Wall-time budget for one lifecycle run.")
    processes: int = Field(
        1,
        ge=1,
        description="Fine-tuning processes (torchrun): one per GPU, or CPU processes over gloo; "
        "each step's batch is split between them.",
    )
    activation_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Training recomputes activations in the backward pass instead of keeping "
        "them: less memory, more compute (1.5x the time of a LoRA step on CPU). auto: on for "
        "CUDA and MPS, off on CPU.",
    )
    checkpoint_steps: int = Field(
        50,
        ge=0,
        description="Training (fine-tuning, reward model, alignment) saves a resumable "
        "checkpoint every N steps (0: none); a re-execution of a run whose training was killed "
        "resumes from the last one.",
    )


class FeedbackSpec(_Strict):
    min_new: int = Field(
        20,
        gt=0,
        description="New feedback from the model's users (ratings and preferences) after which "
        "the feedback sensor re-runs the preference data; automation then re-trains the reward "
        "model and re-runs alignment, evaluation, export and promotion.",
    )
    use: bool = Field(
        True,
        description="Merge the preference pairs users' feedback makes into the reward model's "
        "training pairs.",
    )


class UseCase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    task: TaskSpec
    data: DataSpec
    base_model: BaseModelSpec = BaseModelSpec()
    prompting: PromptingSpec = PromptingSpec()
    adaptation: SFTMethodConfig = SFTMethodConfig()
    reward: RewardSpec = RewardSpec()
    alignment: AlignMethodConfig = AlignMethodConfig()
    evaluation: EvaluationSpec = EvaluationSpec()
    compression: CompressConfig = CompressConfig()
    distillation: DistillConfig = DistillConfig()
    retrieval: RetrievalSpec = RetrievalSpec()
    readaptation: ReadaptationSpec = ReadaptationSpec()
    compute: ComputeSpec = ComputeSpec()
    feedback: FeedbackSpec = FeedbackSpec()

    @property
    def kind(self) -> tasks.TaskKind:
        return self.task.kind

    @property
    def reward_source(self) -> str:
        """Where alignment's reward comes from: the use case's choice, else ``train`` (on its
        preference files, or on pairs built from the task data for a summarisation, which has no
        verifiable reward worth optimising) or the kind's ``verifiable`` reward."""
        if self.reward.source:
            return self.reward.source
        if self.data.has_preferences or self.kind.name == "summarisation":
            return "train"
        return "verifiable"

    @property
    def primary_metric(self) -> str:
        """The metric every stage reports first and decisions rest on."""
        return self.evaluation.primary_metric or self.kind.primary

    @property
    def text_metric(self) -> str:
        """The primary metric where only texts are scored: the kind's when it is mean_reward."""
        return self.kind.primary if self.primary_metric == "mean_reward" else self.primary_metric

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Every metric an evaluation of this use case reports."""
        extra = ("length_ok",) if self.kind.length_checked else ()
        return (*self.kind.metrics, *GENERAL_METRICS, *extra)

    @model_validator(mode="after")
    def _metrics_exist(self) -> UseCase:
        """The primary metric and every threshold name a metric this task kind reports."""
        primary = (*self.kind.metrics, "mean_reward")
        named = [("evaluation.primary_metric", self.evaluation.primary_metric, primary)] + [
            (f"evaluation.thresholds.{m}", m, self.metric_names) for m in self.evaluation.thresholds
        ]
        for where, metric, known in named:
            if metric is not None and metric not in known:
                raise ValueError(
                    f"{where}: '{metric}' is not a metric of {self.kind.name}; "
                    f"known: {', '.join(known)}"
                )
        return self

    @model_validator(mode="after")
    def _chat_template_possible(self) -> UseCase:
        if self.task.chat_template == "always" and self.base_model.source == "scratch":
            raise ValueError(
                "task.chat_template: 'always' needs a model with a chat template; one pre-trained "
                "from scratch has none"
            )
        return self

    @model_validator(mode="after")
    def _rungs_apply(self) -> UseCase:
        """Every rung applies over ``adaptation`` and ``alignment`` into a valid config, and one that
        changes the method where the inherited learning rate would be wrong brings its own."""
        for i, step in enumerate(self.readaptation.ladder):
            try:
                adaptation = self.adaptation.updated(step.adaptation)
                self.alignment.updated(step.alignment)
            except ValueError as exc:
                raise ValueError(f"readaptation.ladder.{i} does not apply: {exc}") from None
            if adaptation.needs_own_rate(self.adaptation) and step.adaptation.learning_rate is None:
                raise ValueError(
                    f"readaptation.ladder.{i} trains {adaptation.method} without a learning_rate: "
                    f"it would inherit adaptation.learning_rate {self.adaptation.learning_rate:g}, "
                    f"set for {self.adaptation.method}"
                )
        return self

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)
