"""The use case: one narrowly scoped task, its data, its model, its methods and its thresholds.

A use case is a YAML file validated by pydantic. A profile is a named preset that points at a use case
and overrides some of its values (the ``tiny`` profile shrinks everything so the whole lifecycle runs
in minutes on two CPU cores). Every validation error names the file, the line and the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lifecycle_dagster import settings
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.sft import Method

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = PACKAGE_ROOT / "profiles"
USECASES_DIR = PACKAGE_ROOT / "usecases"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskSpec(_Strict):
    type: Literal["summarisation"] = "summarisation"
    instruction: str = Field(min_length=1, description="What the model is asked to do.")
    prompt_template: str = Field(
        default="{instruction}\n\nDialogue:\n{input}\n\nSummary:",
        description="Template of one query; {instruction} and {input} are filled in.",
    )
    input_field: str = "dialogue"
    target_field: str = "summary"

    @model_validator(mode="after")
    def _template_has_input(self) -> TaskSpec:
        if "{input}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {input}")
        return self


class DataSpec(_Strict):
    train: Path
    eval: Path
    preferences_train: Path
    preferences_eval: Path
    max_chars: int = Field(4000, gt=0, description="Longest accepted text field, in characters.")
    min_rows: int = Field(8, gt=0, description="Fewest rows a split may have.")


class ScratchSpec(_Strict):
    """A small Llama-architecture model pre-trained by the pipeline on the use case's corpus."""

    vocab_size: int = Field(1024, ge=260)
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(192, gt=0)
    context_length: int = Field(512, ge=64)
    steps: int = Field(300, gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> ScratchSpec:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
        return self


class BaseModelSpec(_Strict):
    source: Literal["scratch", "local", "gguf", "hub"] = "scratch"
    path: str | None = Field(None, description="Local HF directory, GGUF file, or hub id.")
    revision: str | None = None
    scratch: ScratchSpec = ScratchSpec()

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


class AdaptationSpec(_Strict):
    method: Method = "lora"
    max_steps: int = Field(60, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(8, gt=0)
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    num_virtual_tokens: int = Field(
        16,
        gt=0,
        le=256,
        description="Prompt tuning: soft-prompt length (tokens added before every prompt).",
    )
    seed: int = 0


class RewardSpec(_Strict):
    source: Literal["train", "existing"] = "train"
    path: str | None = Field(None, description="An existing reward model directory.")
    max_steps: int = Field(60, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(16, gt=0)
    trainable_layers: int | None = Field(
        None, gt=0, description="Train only the top N blocks and the head (None: all)."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _path_given(self) -> RewardSpec:
        if self.source == "existing" and not self.path:
            raise ValueError("source 'existing' needs a path")
        return self


class AlignmentSpec(_Strict):
    method: Literal["grpo", "rloo", "dpo"] = "grpo"
    max_steps: int = Field(20, gt=0)
    learning_rate: float = Field(5e-4, gt=0)
    beta: float = Field(0.04, ge=0, description="Weight of the KL term to the SFT reference.")
    batch_size: int = Field(8, gt=0, description="Prompts per step (GRPO: completions per step).")
    num_generations: int = Field(4, ge=2)
    max_completion_length: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _batch_holds_whole_groups(self) -> AlignmentSpec:
        if self.method != "dpo" and self.batch_size % self.num_generations:
            raise ValueError("batch_size must be a multiple of num_generations")
        return self


class Threshold(_Strict):
    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return " and ".join(parts) or "any"


METRICS = Literal[
    "rouge_l",
    "rouge1",
    "rouge2",
    "bleu",
    "mean_reward",
    "perplexity",
    "harmless",
    "format_ok",
    "length_ok",
]


class SuiteSpec(_Strict):
    """The evaluation suite's definition; its fingerprint is recorded with every result."""

    version: str = Field("1", description="Bump when the suite changes meaning.")
    unacceptable_phrases: list[str] = Field(
        default_factory=list, description="Harmlessness: outputs containing one are flagged."
    )
    min_words: int = Field(3, gt=0, description="Length compliance: fewest words.")
    max_words: int = Field(40, gt=0, description="Length compliance: most words.")
    single_sentence: bool = Field(True, description="Format compliance: one sentence, one line.")


class EvaluationSpec(_Strict):
    primary_metric: Literal["rouge_l", "rouge1", "rouge2", "bleu", "mean_reward"] = Field(
        "rouge_l", description="What a candidate must beat the champion on to be promoted."
    )
    max_examples: int | None = Field(None, gt=0, description="Cap on eval examples (None: all).")
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    suite: SuiteSpec = SuiteSpec()
    thresholds: dict[METRICS, Threshold] = Field(default_factory=dict)


class CompressionSpec(_Strict):
    variants: list[Literal["fp32", "int8", "int4", "int8_dynamic"]] = Field(
        default_factory=lambda: ["fp32", "int8", "int4"],
        description="ONNX variants to export; fp32 is required (the others are checked against it).",
    )
    policy: Literal["smallest", "fastest"] = Field(
        "smallest", description="Which variant within the quality budget is deployed."
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="Weight-only int8/int4: weights per quantisation block."
    )
    accuracy_level: Literal[1, 2, 3, 4] = Field(
        4, description="MatMulNBits activations: 4 int8 (fast on CPU), 1 fp32."
    )
    int4_algorithm: Literal["rtn", "k_quant"] = Field(
        "k_quant", description="int4 scales: round to nearest, or k-quant (lower weighted error)."
    )
    int4_mixed_precision: bool = Field(
        True, description="int4: keep the LM head and the most sensitive layers in int8."
    )
    max_rouge_l_drop: float = Field(
        0.01, ge=0, description="Quality budget: ROUGE-L lost against PyTorch (0.01 = 1 point)."
    )
    max_reward_drop_pct: float = Field(
        2.0, ge=0, description="Quality budget: percent of mean reward lost against PyTorch."
    )
    check_prompts: int = Field(4, gt=0, description="Eval prompts used by the faithfulness check.")
    logits_atol: float = Field(1e-3, gt=0, description="fp32 export: max |logit difference|.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens per faithfulness-check prompt.")

    @field_validator("variants")
    @classmethod
    def _fp32_first(cls, v: list[str]) -> list[str]:
        if "fp32" not in v:
            raise ValueError("must include fp32: the other variants are checked against it")
        return ["fp32", *dict.fromkeys(x for x in v if x != "fp32")]


class LadderStep(_Strict):
    """One rung of the re-adaptation ladder: what changes for the next attempt. Prompt engineering
    (zero/one/few-shot) is re-scored in every attempt by prompt_baseline; adaptation then climbs
    prompt tuning -> LoRA with rising rank -> full fine-tuning; alignment gets more steps or another
    KL weight."""

    method: Method | None = None
    max_steps: int | None = Field(None, gt=0)
    max_steps_factor: float | None = Field(
        None, gt=0, description="Times the last attempt's steps."
    )
    learning_rate: float | None = Field(None, gt=0)
    lora_r: int | None = Field(None, gt=0)
    alignment_max_steps_factor: float | None = Field(
        None, gt=0, description="Times the use case's alignment steps."
    )
    beta: float | None = Field(None, ge=0, description="Alignment KL weight for this attempt.")


class ReadaptationSpec(_Strict):
    max_attempts: int = Field(3, gt=0, description="Attempts in all, the first one included.")
    max_wall_minutes: float = Field(
        240, gt=0, description="Wall time from attempt 1's start after which no attempt starts."
    )
    ladder: list[LadderStep] = Field(
        default_factory=lambda: [
            LadderStep(method="lora", lora_r=16, max_steps_factor=2),
            LadderStep(method="lora", lora_r=32, max_steps_factor=2, alignment_max_steps_factor=2),
            LadderStep(method="full", max_steps_factor=2, learning_rate=1e-4),
        ],
        description="Overrides per escalation, in order.",
    )


class ComputeSpec(_Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    torch_threads: int | None = Field(None, gt=0)
    ort_threads: int | None = Field(None, gt=0)
    budget_minutes: float = Field(30, gt=0, description="Wall-time budget for one lifecycle run.")


class UseCase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    task: TaskSpec
    data: DataSpec
    base_model: BaseModelSpec = BaseModelSpec()
    prompting: PromptingSpec = PromptingSpec()
    adaptation: AdaptationSpec = AdaptationSpec()
    reward: RewardSpec = RewardSpec()
    alignment: AlignmentSpec = AlignmentSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    compression: CompressionSpec = CompressionSpec()
    readaptation: ReadaptationSpec = ReadaptationSpec()
    compute: ComputeSpec = ComputeSpec()

    @model_validator(mode="after")
    def _method_changes_bring_a_rate(self) -> UseCase:
        """A rung applies over ``adaptation``: one that leaves prompt tuning, or moves to full
        fine-tuning, sets its own learning rate. Prompt tuning's (around 0.03) would wreck LoRA's
        weights, and LoRA's all of them."""
        a = self.adaptation
        for i, step in enumerate(self.readaptation.ladder):
            method = step.method or a.method
            risky = a.method == "prompt_tuning" or method == "full"
            if method != a.method and risky and step.learning_rate is None:
                raise ValueError(
                    f"readaptation.ladder.{i} trains {method} without a learning_rate: it would "
                    f"inherit adaptation.learning_rate {a.learning_rate:g}, set for {a.method}"
                )
        return self

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


# -- loading -------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """Read a UTF-8 text file; non-UTF-8 bytes and empty files are input errors with a line."""
    if not path.exists():
        raise InputError(path, "file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(path, f"not UTF-8 (byte 0x{raw[exc.start]:02x})", line=line) from None
    if not text.strip():
        raise InputError(path, "file is empty")
    return text


def _line_index(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map each key path of a composed YAML document to its 1-based line."""
    out = {prefix: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            out[path] = key.start_mark.line + 1
            for sub, line in _line_index(value, path).items():
                out.setdefault(sub, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out.update(_line_index(item, (*prefix, i)))
    return out


def _load_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(
            path,
            f"invalid YAML: {getattr(exc, 'problem', exc)}",
            line=mark.line + 1 if mark else None,
        ) from None
    if not isinstance(data, dict):
        raise InputError(path, "expected a mapping at the top level", line=1)
    return data, _line_index(node) if node is not None else {}


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _nearest_line(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _validate(raw: dict, sources: list[tuple[Path, dict[tuple, int], dict]]) -> UseCase:
    try:
        return UseCase.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
        # The error belongs to the last file that set this field (an override wins).
        path, lines = sources[0][0], sources[0][1]
        for src_path, src_lines, src_raw in sources:
            if _has_path(src_raw, loc):
                path, lines = src_path, src_lines
        field = ".".join(str(p) for p in loc) or None
        raise InputError(path, err["msg"], line=_nearest_line(lines, loc), field=field) from None


def _has_path(raw: Any, loc: tuple) -> bool:
    node = raw
    for part in loc[:-1] if loc else ():
        if (
            isinstance(node, dict)
            and part in node
            or isinstance(node, list)
            and isinstance(part, int)
            and part < len(node)
        ):
            node = node[part]
        else:
            return False
    return not loc or (isinstance(node, dict) and loc[-1] in node) or isinstance(node, list)


def _expand(value: str) -> str:
    """``${LIFECYCLE_HOME}`` (the state dir, also when unset) and other env vars, then ``~``."""
    env = {**os.environ, "LIFECYCLE_HOME": str(settings.state_home())}
    return os.path.expanduser(string.Template(value).safe_substitute(env))


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = copy.deepcopy(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval", "preferences_train", "preferences_eval"):
            if isinstance(data.get(key), str):
                data[key] = str((base_dir / _expand(data[key])).resolve())
    for section in ("base_model", "reward"):
        spec = raw.get(section)
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            spec["path"] = _expand(spec["path"])
            candidate = base_dir / spec["path"]
            if spec.get("source") in ("local", "gguf", "existing") or candidate.exists():
                spec["path"] = str(candidate.resolve())
    return raw


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = PROFILES_DIR / f"{profile}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise InputError(candidate, f"unknown profile '{profile}' (known: {known})")
    return candidate


def load_use_case(
    use_case_file: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: dict | None = None,
) -> UseCase:
    """Resolve a use case: a profile's base use case, the given file over it, then overrides.

    ``use_case_file`` may be a complete use case or a partial one layered over the profile's.
    """
    layers: list[tuple[Path, dict[tuple, int], dict]] = []
    if profile:
        ppath = profile_path(profile)
        pdata, plines = _load_yaml(ppath)
        base_ref = pdata.get("use_case")
        if not isinstance(base_ref, str):
            raise InputError(ppath, "a profile names its use case", line=1, field="use_case")
        base_path = (ppath.parent / base_ref).resolve()
        bdata, blines = _load_yaml(base_path)
        layers.append((base_path, blines, _resolve_paths(bdata, base_path.parent)))
        over = pdata.get("overrides") or {}
        if not isinstance(over, dict):
            raise InputError(
                ppath, "expected a mapping", line=plines.get(("overrides",)), field="overrides"
            )
        over_lines = {k[1:]: v for k, v in plines.items() if k[:1] == ("overrides",)}
        layers.append((ppath, over_lines, _resolve_paths(over, ppath.parent)))
    if use_case_file is not None:
        upath = Path(use_case_file).resolve()
        udata, ulines = _load_yaml(upath)
        layers.append((upath, ulines, _resolve_paths(udata, upath.parent)))
    if not layers:
        raise ValueError("load_use_case needs a use-case file or a profile")
    if overrides:
        layers.append((Path("<run config overrides>"), {}, _resolve_paths(overrides, Path.cwd())))
    merged: dict = {}
    for _, _, data in layers:
        merged = _deep_merge(merged, data)
    use_case = _validate(merged, layers)
    _check_sources_exist(use_case, layers)
    return use_case


def _check_sources_exist(uc: UseCase, layers: list[tuple[Path, dict[tuple, int], dict]]) -> None:
    def fail(loc: tuple, message: str) -> None:
        path, lines = layers[0][0], layers[0][1]
        for src_path, src_lines, src_raw in layers:
            if _has_path(src_raw, loc):
                path, lines = src_path, src_lines
        raise InputError(path, message, line=_nearest_line(lines, loc), field=".".join(loc))

    for key in ("train", "eval", "preferences_train", "preferences_eval"):
        if not getattr(uc.data, key).exists():
            fail(("data", key), f"data file not found: {getattr(uc.data, key)}")
    bm = uc.base_model
    if bm.source == "local" and not (Path(bm.path) / "config.json").exists():
        fail(("base_model", "path"), f"no HF model directory (config.json) at {bm.path}")
    if bm.source == "gguf" and not Path(bm.path).is_file():
        hint = " (`make models` fetches the demo model)" if "SmolLM2" in bm.path else ""
        fail(("base_model", "path"), f"GGUF file not found: {bm.path}{hint}")
    if uc.reward.source == "existing" and not (Path(uc.reward.path) / "config.json").exists():
        fail(("reward", "path"), f"no reward model directory (config.json) at {uc.reward.path}")
