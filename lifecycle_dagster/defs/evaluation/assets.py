"""Evaluate: base, prompt baseline, SFT and aligned models on the same held-out split."""

import json
import time

import dagster as dg

from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES, use_case_check
from lifecycle_dagster.lib.results import evaluation_result, genai_evaluation
from lifecycle_dagster.lib.stage import attempt_of, attempt_started_at, stage
from lifecycle_dagster.ml.data import EvalSplit, read_rows
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.promotion import compare_with_champion
from lifecycle_dagster.ml.readaptation import decide
from lifecycle_dagster.ml.retrieval import RETRIEVAL_FILE
from lifecycle_dagster.ml.reward import load_reward
from lifecycle_dagster.ml.sft import SFTMethodConfig, load_sft
from lifecycle_dagster.ml.verdict import CANDIDATE, Candidate, assess
from lifecycle_dagster.resources.artifacts import ArtifactStore, upstream_metadata
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.registry import registered_name

CHECKS = {
    "meets_thresholds": "The candidate meets every threshold of the use case.",
    "sft_beats_prompt_baseline": "Fine-tuning scores higher on the primary metric than prompting "
    "alone.",
    "alignment_keeps_reward": "The aligned model's mean reward is at least the SFT model's.",
    "no_regression_vs_champion": "On the primary metric the candidate is not worse than the "
    "registry's champion beyond noise (paired bootstrap, 95%); a regressed candidate is not "
    "promoted.",
}


def _candidates(context, store, uc, runtime, split) -> dict[str, Candidate]:
    """Each stage's model with the tokenizer that prompts it (a prompt-tuned model's carries its
    soft prompt), loaded when scored; the prompt baseline is the base model with its best shots."""
    base = model_dir_of(store.upstream(context, "base_model"))
    base_model = (load_causal_lm(base, runtime), load_tokenizer(base))
    train = read_rows(store.upstream(context, "task_dataset") / "train.jsonl")
    best = json.loads((store.upstream(context, "prompt_baseline") / "best.json").read_text())
    sft, aligned = (
        store.upstream(context, "sft_adapter"),
        store.upstream(context, "aligned_model"),
    )
    candidates = {
        "base": Candidate(lambda: base_model, split.prompts),
        # The base model again, its prompts a few times longer: its perplexity is the base's.
        "prompt_baseline": Candidate(
            lambda: base_model, split.prompts_with(train[: best["shots"]]), perplexity=False
        ),
        "sft": Candidate(
            lambda: load_sft(base, sft / "adapter", runtime, merge=True), split.prompts
        ),
        CANDIDATE: Candidate(
            lambda: (load_causal_lm(aligned / "model", runtime), load_tokenizer(aligned / "model")),
            split.prompts,
        ),
    }
    if split.retrieved:  # what retrieval buys: each model again, its prompts without passages
        plain = split.without_retrieval().prompts
        for name in ("base", "sft", CANDIDATE):
            candidates[f"{name}_without_retrieval"] = Candidate(
                candidates[name].load, plain, perplexity=False, retrieval=False
            )
    return candidates


def read_json(path) -> dict:
    """A JSON file an upstream artifact may hold (an older one may not: then {})."""
    return json.loads(path.read_text()) if path.exists() else {}


def trained_with(uc, sft_meta: dict) -> SFTMethodConfig:
    """The adaptation the current SFT weights were trained with (recorded by sft_adapter; an older
    record has only its method and steps)."""
    if "config" in sft_meta:
        return SFTMethodConfig.model_validate(sft_meta["config"])
    return uc.adaptation.updated({k: sft_meta[k] for k in ("method", "max_steps") if k in sft_meta})


@dg.asset(
    group_name="evaluation",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "mlflow"},
    owners=OWNERS,
    code_version="2",
    deps=[
        "base_model",
        "prompt_baseline",
        "sft_adapter",
        "reward_model",
        "aligned_model",
        "task_dataset",
    ],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
    check_specs=[
        use_case_check(name, asset="evaluation", blocking=name == "meets_thresholds", description=d)
        for name, d in CHECKS.items()
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """Every lifecycle stage's model on one eval split, scored by the use case's versioned suite
    (the task kind's metrics, mean reward, perplexity, harmlessness, format compliance); the
    verdict against the thresholds, and the comparison with the registry's champion."""
    with stage(context, "evaluation", artifact_store, mlflow_tracking) as st:
        uc, runtime = st.use_case, compute.runtime(st.use_case.compute)
        data = artifact_store.upstream(context, "task_dataset")
        split = EvalSplit.read(
            uc, data, model_dir_of(artifact_store.upstream(context, "base_model"))
        )
        result = assess(
            _candidates(context, artifact_store, uc, runtime, split),
            split,
            suite=uc.evaluation.suite,
            thresholds=uc.evaluation.thresholds,
            reward=load_reward(artifact_store.upstream(context, "reward_model"), uc, runtime),
            max_new_tokens=uc.evaluation.max_new_tokens,
            batch_size=uc.evaluation.batch_size,
            log=st.log,
            pass_on=uc.evaluation.pass_on,
        )
        sft_meta = upstream_metadata(context, "sft_adapter")
        decision = decide(
            uc,
            passed=result.passed,
            failed=result.failed,
            attempt=attempt_of(context),
            current=trained_with(uc, sft_meta),
            started_at=attempt_started_at(context),
            now=time.time(),
        )
        champion = mlflow_tracking.registry().champion(registered_name(uc.name, CANDIDATE))
        regression = compare_with_champion(
            champion, result.suite, uc.primary_metric, result.per_example
        )
        return evaluation_result(
            st,
            result,
            decision,
            regression,
            upstream_metadata(context, "aligned_model"),
            genai=genai_evaluation(st, result, split),
            retrieval=read_json(data / RETRIEVAL_FILE),
        )
