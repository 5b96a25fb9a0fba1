"""Compression: export every ONNX variant, prove it against PyTorch, score it on the eval split, and
pick the one the use case's policy asks for within the quality budget.

Three gates decide whether the artifact may ship:

- fp32 matches PyTorch: next-token logits within ``logits_atol`` on a fixed prompt set, every greedy
  token equal, decoded text equal.
- the KV cache is in use: for every variant, decoding step by step with the cache gives what a full
  recomputation gives (an export that drops or misaligns its cache fails).
- the chosen variant is within the quality budget: the use case's primary metric and mean reward on
  the eval split lose at most ``max_metric_drop`` and ``max_reward_drop_pct`` against the aligned
  model in PyTorch (on the evaluation's rows), or against the fp32 export, proven equal to it,
  when the variants are scored on more rows (``eval_examples``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lifecycle_dagster.ml.export import ExportConfig, describe, export_onnx, export_students
from lifecycle_dagster.ml.faithfulness import Faithfulness, verify_against_torch
from lifecycle_dagster.ml.progress import Log
from lifecycle_dagster.ml.retrieval import INDEX_DIR
from lifecycle_dagster.ml.runtimes import GenaiGenerator, OrtDecoder, generate_texts

SELECTED_FILE = "selected.json"
SERVING_FILE = "serving.json"
EVALUATED_FILE = "evaluated.jsonl"  # in each variant's folder: its greedy answers on the eval split


class CompressConfig(ExportConfig):
    """Compression: the export, the deployment policy, the quality budget and the faithfulness
    checks (the use case's ``compression`` section)."""

    policy: Literal["smallest", "fastest", "best_within_budget"] = Field(
        "smallest",
        description="Which variant within the quality budget is deployed: the smallest, the "
        "fastest, or best_within_budget (the best product of speed-up and size reduction "
        "against fp32).",
    )
    max_metric_drop: float = Field(
        0.01,
        ge=0,
        description="Quality budget: the primary metric lost against PyTorch (0.01 = 1 point).",
    )
    max_reward_drop_pct: float = Field(
        2.0, ge=0, description="Quality budget: percent of mean reward lost against PyTorch."
    )
    check_prompts: int = Field(4, gt=0, description="Eval prompts used by the faithfulness check.")
    logits_atol: float = Field(1e-3, gt=0, description="fp32 export: max |logit difference|.")
    max_new_tokens: int = Field(16, gt=0, description="Tokens per faithfulness-check prompt.")
    eval_examples: int | None = Field(
        None,
        gt=0,
        description="Eval rows every variant is scored on: the first N of the whole split, "
        "judged against the fp32 export (proven equal to PyTorch) on the same rows. None: the "
        "evaluation's rows (evaluation.max_examples), judged against its PyTorch scores. A "
        "1-point budget needs more rows than a quick evaluation scores.",
    )

    @model_validator(mode="before")
    @classmethod
    def _older_name(cls, data):
        """``max_rouge_l_drop``, the budget's name when every use case was a summarisation."""
        if isinstance(data, dict) and "max_rouge_l_drop" in data:
            data = dict(data)
            data.setdefault("max_metric_drop", data.pop("max_rouge_l_drop"))
        return data


@dataclass
class VariantReport:
    name: str
    bytes: int
    faithfulness: Faithfulness
    metric: str  # the use case's primary metric
    quality: float  # its mean on the eval split
    mean_reward: float | None
    tokens_per_s: float
    quality_drop: float
    reward_drop_pct: float | None
    within_budget: bool
    predictions: list[str] = field(default_factory=list)
    drop_ci: tuple[float, float] | None = None  # 95% interval of quality_drop, paired per example

    def row(self) -> dict:
        f = self.faithfulness
        return {
            "variant": self.name,
            "MB": round(self.bytes / 1e6, 3),
            self.metric: round(self.quality, 4),
            f"{self.metric}_drop": round(self.quality_drop, 4),
            "drop_95ci": f"[{self.drop_ci[0]:.4f}, {self.drop_ci[1]:.4f}]" if self.drop_ci else "-",
            "mean_reward": None if self.mean_reward is None else round(self.mean_reward, 4),
            "reward_drop_pct": None
            if self.reward_drop_pct is None
            else round(self.reward_drop_pct, 2),
            "tok_s": round(self.tokens_per_s, 1),
            "max_logit_diff": round(f.max_abs_logit_diff, 5),
            "token_agreement": round(f.token_agreement, 3),
            "cache_ok": f.cache_consistent,
            "within_budget": self.within_budget,
        }


@dataclass
class CompressionResult:
    path: Path
    variants: dict[str, VariantReport]
    selected: str | None
    policy: str
    metric: str
    reference: dict[str, float | None]
    fp32_matches: bool
    cache_in_use: bool
    export_seconds: dict[str, float]
    source_bytes: int = 0  # the PyTorch weights exported (safetensors)
    # what the drops are measured against: "pytorch" (the evaluation's scores of the aligned
    # model) or "fp32" (the fp32 export's, on the rows the variants were scored on)
    reference_source: str = "pytorch"
    examples: int = 0  # eval rows each variant was scored on

    @property
    def deployable(self) -> bool:
        return self.fp32_matches and self.cache_in_use and self.selected is not None

    def metrics(self) -> dict[str, float | None]:
        """The figures of the export: PyTorch's, fp32's faithfulness, and the deployed variant's
        size, speed and quality against PyTorch."""
        fp32, chosen = self.variants["fp32"], self.variants.get(self.selected or "")
        out = {
            "pytorch_bytes": self.source_bytes,
            "torch_tokens_per_s": fp32.faithfulness.torch_tokens_per_s,
            "max_abs_logit_diff_fp32": fp32.faithfulness.max_abs_logit_diff,
            f"reference_{self.metric}": self.reference[self.metric],
            "scored_examples": self.examples,
            "reference_mean_reward": self.reference.get("mean_reward"),
            **{f"export_seconds_{n}": s for n, s in self.export_seconds.items()},
        }
        if chosen:
            out |= {
                "onnx_bytes": chosen.bytes,
                "size_ratio": self.source_bytes / max(1, chosen.bytes),
                "ort_tokens_per_s": chosen.tokens_per_s,
                # Both rates on the same check prompts and token budget, batch 1.
                "speedup": chosen.faithfulness.ort_tokens_per_s
                / max(1e-9, chosen.faithfulness.torch_tokens_per_s),
                f"onnx_{self.metric}": chosen.quality,
                "onnx_mean_reward": chosen.mean_reward,
                f"{self.metric}_drop": chosen.quality_drop,
                "reward_drop_pct": chosen.reward_drop_pct,
            }
        return out


def quality_drop(
    reference: dict[str, float | None],
    metric: str,
    quality: float,
    reward: float | None,
    budget: CompressConfig,
    drop_ci: tuple[float, float] | None = None,
    pass_on: str = "estimate",
) -> tuple[float, float | None, bool]:
    """Points of ``metric`` lost, reward percent lost, and whether both are within the budget:
    the metric's drop judged on its estimate, or with ``pass_on`` "interval" on the top of its
    interval ``drop_ci`` (a variant whose drop may exceed the budget beyond noise is refused)."""
    drop = reference[metric] - quality
    judged = drop_ci[1] if pass_on == "interval" and drop_ci else drop
    ok = judged <= budget.max_metric_drop + 1e-9
    reward_drop = None
    ref_reward = reference.get("mean_reward")
    if ref_reward is not None and reward is not None:
        reward_drop = 100.0 * (ref_reward - reward) / max(abs(ref_reward), 1e-9)
        ok = ok and reward_drop <= budget.max_reward_drop_pct + 1e-9
    return drop, reward_drop, ok


def per_example_scores(uc, predictions, references, metric: str) -> list[float] | None:
    """Each prediction's ``metric`` (None for a metric only defined on the whole split)."""
    return uc.kind.score(predictions, references, uc.task).per_example.get(metric)


def drop_interval(
    drop: float, fp32: list[float] | None, variant: list[float] | None
) -> tuple[float, float] | None:
    """A 95% interval of a variant's ``drop``: the paired bootstrap of its per-example loss
    against the fp32 export (verified equal to PyTorch) on the same examples, centred on
    ``drop``."""
    from lifecycle_dagster.ml.suite import paired_bootstrap

    if not fp32 or not variant:
        return None
    paired = paired_bootstrap(dict(enumerate(fp32)), dict(enumerate(variant)), "drop")
    if paired is None:
        return None
    return drop + paired.low - paired.mean_diff, drop + paired.high - paired.mean_diff


def select_variant(reports: Sequence[VariantReport], policy: str) -> str | None:
    """The variant within the quality budget, its cache working, that ``policy`` asks for: the
    smallest, the fastest, or (``best_within_budget``) the one whose speed-up times size
    reduction against the largest variant is highest, the smaller quality loss breaking a tie.
    None if no variant fits."""
    fit = [r for r in reports if r.within_budget and r.faithfulness.cache_consistent]
    if not fit:
        return None
    if policy == "fastest":
        return min(fit, key=lambda r: (-r.tokens_per_s, r.bytes)).name
    if policy == "best_within_budget":
        largest = max(reports, key=lambda r: r.bytes)

        def gain(r: VariantReport) -> float:
            return (r.tokens_per_s / max(largest.tokens_per_s, 1e-9)) * (largest.bytes / r.bytes)

        return max(fit, key=lambda r: (round(gain(r), 6), -r.quality_drop)).name
    return min(fit, key=lambda r: (r.bytes, -r.tokens_per_s)).name


def compress(
    model_dir: Path,
    out_dir: Path,
    config: CompressConfig,
    *,
    runtime,
    max_new_tokens: int = 32,
    check_prompts: Sequence[str],
    split,
    reward: Callable[..., list[float]] | None = None,
    reference: dict[str, float | None] | None = None,
    serving: dict | None = None,
    students: dict[str, Path] | None = None,
    student_variants: Sequence[str] = ("int4",),
    calibration: Sequence[str] = (),
    prompts: Sequence[str] = (),
    log: Log | None = None,
) -> CompressionResult:
    """Export, verify, score on ``split`` (an ``EvalSplit``) with its use case's task kind, and
    select. ``reference`` holds the PyTorch model's primary metric and ``mean_reward`` on the same
    prompts (from evaluation); without it the fp32 export's scores on ``split`` are the reference.
    ``max_new_tokens`` bounds each eval-split generation. ``students`` (name -> a pruned or
    distilled model of the same tokenizer) are exported in ``student_variants`` too, checked
    against the same PyTorch model and scored alike, so the policy chooses among all of them.
    ``calibration`` (the train examples, prompt and answer) tunes the int4 export where the config
    asks (``int4_awq`` and ``int4_gptq`` on the first ``calibration_prompts``; ``lm_head_tokens``
    on all, with the tokens the variant writes after the train ``prompts``).
    Writes ``selected.json`` and ``serving.json`` (what a server needs) to ``out_dir``.
    """
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer

    uc = split.use_case
    metric = uc.text_metric
    exported = export_onnx(
        model_dir, out_dir, config, log=log, calibration=list(calibration), prompts=list(prompts)
    )
    if students:
        exported = export_students(
            students,
            list(student_variants),
            exported,
            config,
            log=log,
            calibration=list(calibration),
            prompts=list(prompts),
        )
    threads = runtime.ort_threads
    model, tok = load_causal_lm(model_dir, runtime), load_tokenizer(model_dir)
    scored: dict[str, tuple[Faithfulness, float, float | None, float, list[str]]] = {}
    torch_memo: dict = {}  # PyTorch's side of the checks, once for every variant
    for name, folder in exported.variants.items():
        generator = GenaiGenerator(folder, threads)
        faith = verify_against_torch(
            model,
            tok,
            OrtDecoder(folder, threads),
            list(check_prompts),
            max_new_tokens=config.max_new_tokens,
            variant=name,
            generator=generator,
            torch_memo=torch_memo,
        )
        preds, tps = generate_texts(
            generator,
            tok,
            split.prompts,
            max_new_tokens,
            log=log,
            stage=f"onnx[{name}]",
        )
        quality = uc.kind.score(preds, split.references, uc.task).means()[metric]
        mean_reward = None
        if reward is not None:
            rewards = reward(split.prompts, preds, split.references)
            mean_reward = sum(rewards) / max(1, len(rewards))
        scored[name] = (faith, quality, mean_reward, tps, preds)
        if log:
            log(
                f"onnx[{name}]: {exported.sizes[name] / 1e6:.1f} MB, {metric} {quality:.4f}, "
                f"{tps:.1f} tok/s, token agreement {faith.token_agreement:.2f}"
            )
    reference_source = "pytorch"
    if reference is None or reference.get(metric) is None:
        fp32 = scored["fp32"]
        reference, reference_source = {metric: fp32[1], "mean_reward": fp32[2]}, "fp32"
    reports = {}
    fp32_scores = per_example_scores(uc, scored["fp32"][4], split.references, metric)
    for name, (faith, quality, mean_reward, tps, preds) in scored.items():
        drop_ci = drop_interval(
            reference[metric] - quality,
            fp32_scores,
            per_example_scores(uc, preds, split.references, metric),
        )
        drop, reward_drop, ok = quality_drop(
            reference, metric, quality, mean_reward, config, drop_ci, uc.evaluation.pass_on
        )
        reports[name] = VariantReport(
            name=name,
            bytes=exported.sizes[name],
            faithfulness=faith,
            metric=metric,
            quality=quality,
            mean_reward=mean_reward,
            tokens_per_s=tps,
            quality_drop=drop,
            reward_drop_pct=reward_drop,
            within_budget=ok,
            predictions=preds,
            drop_ci=drop_ci,
        )
    fp32 = reports["fp32"].faithfulness
    result = CompressionResult(
        path=Path(out_dir),
        variants=reports,
        selected=select_variant(list(reports.values()), config.policy),
        policy=config.policy,
        metric=metric,
        reference=reference,
        fp32_matches=fp32.max_abs_logit_diff <= config.logits_atol
        and fp32.token_agreement == 1.0
        and fp32.text_equal == 1.0,
        cache_in_use=all(r.faithfulness.cache_consistent for r in reports.values()),
        export_seconds=exported.seconds,
        source_bytes=sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")),
        reference_source=reference_source,
        examples=len(split.rows),
    )
    (Path(out_dir) / SELECTED_FILE).write_text(
        json.dumps(
            {
                "variant": result.selected,
                "policy": result.policy,
                "metric": metric,
                "reference": reference,
                "reference_source": reference_source,
                "examples": len(split.rows),
                "variants": {n: r.row() for n, r in reports.items()},
                "descriptions": {n: describe(n) for n in reports},
            },
            indent=2,
        )
    )
    (Path(out_dir) / "faithfulness.json").write_text(
        json.dumps({n: asdict(r.faithfulness) for n, r in reports.items()}, indent=2, default=str)
    )
    field = uc.task.input_field
    for name, report in reports.items():  # what each variant answered, greedy, as evaluated
        with (Path(out_dir) / name / EVALUATED_FILE).open("w", encoding="utf-8") as out:
            for row, prediction in zip(split.rows, report.predictions, strict=True):
                record = {"id": row.get("id"), "input": row[field], "prediction": prediction}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
    if serving is not None:
        (Path(out_dir) / SERVING_FILE).write_text(json.dumps(serving, indent=2))
    return result


def scored_split(split, config: CompressConfig):
    """The rows every variant is scored on (an ``EvalSplit``): the evaluation's ``split``, or the
    first ``config.eval_examples`` of the whole split."""
    return split.first(config.eval_examples) if config.eval_examples else split


def serving_manifest(uc, source_model: Path, fmt=None, retrieval: dict | None = None) -> dict:
    """What a server needs beside the ONNX folder to prompt the model as the lifecycle trained it:
    the use case's template (labels filled in), the model's prompt format (a ``PromptFormat``:
    its chat template, if it is prompted through one) and, with ``retrieval`` (what the dataset's
    passages came from), how passages from the index the artifact carries (``INDEX_DIR``) enter
    each task input: the same template and count as in training."""
    labels = ", ".join(uc.task.labels)
    retrieval = retrieval or None
    if retrieval:
        retrieval = {
            "index": INDEX_DIR,
            "version": retrieval["index_version"],
            "top_k": retrieval["top_k"],
            "template": retrieval.get("template", uc.retrieval.template),
        }
    return {
        "retrieval": retrieval,
        "use_case": uc.name,
        "prompt_template": uc.task.prompt_template.replace("{labels}", labels),
        "instruction": uc.task.instruction.replace("{labels}", labels),
        "prompt_format": asdict(fmt) if fmt is not None else {},
        "max_new_tokens": uc.evaluation.max_new_tokens,
        "source_model": str(source_model),
    }


def selected_folder(artifact: Path) -> Path:
    """The folder of the variant chosen for deployment inside an ``onnx_model`` artifact."""
    artifact = Path(artifact)
    chosen = json.loads((artifact / SELECTED_FILE).read_text())["variant"]
    if chosen is None:
        raise ValueError(f"{artifact}: no variant was within the quality budget")
    return artifact / chosen
