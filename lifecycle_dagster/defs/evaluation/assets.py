"""Evaluate: base, prompt baseline, SFT and aligned models on the same held-out split."""

import json
import time
from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.stage import (
    FOLLOWS_UPSTREAM,
    OWNERS,
    STARTED_TAG,
    USE_CASES,
    attempt_of,
    md_table,
    stage,
    upstream,
    upstream_metadata,
)
from lifecycle_dagster.ml.data import eval_rows, prompts_for, read_rows, references
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.sft import load_sft
from lifecycle_dagster.ml.suite import from_spec, paired_bootstrap, per_example_metric
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.registry import CHAMPION, ModelRegistry, registered_name

CANDIDATE = "aligned"


def next_escalation(
    uc, attempt: int, sft_meta: dict, elapsed_minutes: float
) -> tuple[dict | None, str]:
    """The overrides of the next attempt on the use case's ladder, or None with the reason the
    budget (attempts, ladder rungs or wall time) is spent."""
    r = uc.readaptation
    if attempt >= r.max_attempts:
        return None, f"budget spent: {attempt} of {r.max_attempts} attempts made"
    if attempt - 1 >= len(r.ladder):
        return None, f"ladder exhausted: all {len(r.ladder)} rungs tried"
    if elapsed_minutes >= r.max_wall_minutes:
        return None, (
            f"wall-time budget spent: {elapsed_minutes:.0f} of {r.max_wall_minutes:g} minutes "
            "since attempt 1 started"
        )
    step = r.ladder[attempt - 1].model_dump(exclude_none=True)
    factor = step.pop("max_steps_factor", None)
    if factor:
        step["max_steps"] = int((sft_meta.get("max_steps") or uc.adaptation.max_steps) * factor)
    aligned = {}
    if align_factor := step.pop("alignment_max_steps_factor", None):
        aligned["max_steps"] = int(uc.alignment.max_steps * align_factor)
    if (beta := step.pop("beta", None)) is not None:
        aligned["beta"] = beta
    escalation = {"attempt": attempt + 1, "sft_adapter": step}
    if aligned:
        escalation["aligned_model"] = aligned
    return escalation, f"attempt {attempt + 1} of {r.max_attempts} next: {json.dumps(escalation)}"


def attempt_started_at(context) -> float:
    """When attempt 1 of this experiment started (epoch seconds): carried in the run tags by the
    sensor, else this run's own start."""
    tag = context.run.tags.get(STARTED_TAG)
    if tag:
        return float(tag)
    record = context.instance.get_run_record_by_id(context.run.run_id)
    start = record.start_time if record and record.start_time else None
    return start or time.time()


def compare_with_champion(
    registry: ModelRegistry, use_case: str, suite: str, metric: str, rows: list[dict]
) -> dict:
    """The candidate against the registry's champion, example by example, when both were scored
    by the same suite; ``regressed`` when it is worse beyond noise."""
    out = {"regressed": False, "champion_version": None, "summary": "", "mean_diff": None}
    champion = registry.by_alias(registered_name(use_case, "aligned"), CHAMPION)
    if champion is None:
        out["summary"] = "no champion yet"
        return out
    out["champion_version"] = str(champion.version)
    table = Path(champion.tags.get("evaluation.path", "")) / "per_example.jsonl"
    if champion.tags.get("evaluation.suite") != suite or not table.is_file():
        out["summary"] = (
            f"champion v{champion.version} was scored by suite "
            f"{champion.tags.get('evaluation.suite', 'unknown')}, not {suite}: not comparable"
        )
        return out
    theirs = per_example_metric(read_rows(table), metric, CANDIDATE)
    cmp = paired_bootstrap(per_example_metric(rows, metric, CANDIDATE), theirs, metric)
    if cmp is None:
        out["summary"] = f"champion v{champion.version} shares no eval example: not comparable"
        return out
    out.update(
        regressed=cmp.worse_beyond_noise,
        summary=f"v{champion.version}: {cmp.describe()}",
        mean_diff=cmp.mean_diff,
        ci_low=cmp.low,
        ci_high=cmp.high,
    )
    return out


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
    check_specs=[
        dg.AssetCheckSpec(
            "meets_thresholds",
            asset="evaluation",
            blocking=True,
            description="The candidate meets every threshold of the use case.",
        ),
        dg.AssetCheckSpec(
            "sft_beats_prompt_baseline",
            asset="evaluation",
            description="Fine-tuning scores a higher ROUGE-L than prompting alone.",
        ),
        dg.AssetCheckSpec(
            "alignment_keeps_reward",
            asset="evaluation",
            description="The aligned model's mean reward is at least the SFT model's.",
        ),
        dg.AssetCheckSpec(
            "no_regression_vs_champion",
            asset="evaluation",
            description="On the primary metric the candidate is not worse than the registry's "
            "champion beyond noise (paired bootstrap, 95%); a regressed candidate is not promoted.",
        ),
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """Every lifecycle stage's model on one eval split, scored by the use case's versioned suite
    (ROUGE-1/2/L, BLEU, mean reward, perplexity, harmlessness, format and length compliance); the
    verdict against the thresholds, and the comparison with the registry's champion."""
    with stage(context, "evaluation", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        base = model_dir_of(upstream(context, artifact_store, "base_model"))
        data = upstream(context, artifact_store, "task_dataset")
        train, evals = read_rows(data / "train.jsonl"), read_rows(data / "eval.jsonl")
        evals = eval_rows(uc, evals)
        shots = json.loads(
            (upstream(context, artifact_store, "prompt_baseline") / "best.json").read_text()
        )["shots"]
        scorer = RewardScorer(upstream(context, artifact_store, "reward_model") / "model", runtime)
        suite = from_spec(uc.evaluation.suite)
        refs = references(uc, evals)
        zero = prompts_for(uc, evals)
        few = prompts_for(uc, evals, train[:shots])
        base_model = (load_causal_lm(base, runtime), load_tokenizer(base))
        aligned = upstream(context, artifact_store, "aligned_model") / "model"
        # Each candidate with the tokenizer that prompts it (a prompt-tuned model's carries its
        # soft prompt).
        candidates = {
            "base": (lambda: base_model, zero),
            "prompt_baseline": (lambda: base_model, few),
            "sft": (
                lambda: load_sft(
                    base, upstream(context, artifact_store, "sft_adapter") / "adapter", runtime
                ),
                zero,
            ),
            CANDIDATE: (
                lambda: (load_causal_lm(aligned, runtime), load_tokenizer(aligned)),
                zero,
            ),
        }
        rows, per_example, results = [], [], {}
        for name, (load, prompts) in candidates.items():
            model, tok = load()
            res = evaluate_model(
                model,
                tok,
                prompts,
                refs,
                max_new_tokens=uc.evaluation.max_new_tokens,
                batch_size=uc.evaluation.batch_size,
                reward=scorer,
                ids=[r["id"] for r in evals],
                suite=suite,
                log=st.log,
                stage=f"evaluation[{name}]",
            )
            results[name] = res.metrics()
            rows.append({"model": name, **{k: round(v, 4) for k, v in res.metrics().items()}})
            per_example += [{"model": name, **row} for row in res.per_example]
            st.run.log_metrics({f"{name}.{k}": v for k, v in res.metrics().items()})
        cand = results[CANDIDATE]
        verdicts = [
            {
                "metric": m,
                "value": round(cand[m], 4),
                "threshold": t.describe(),
                "passed": t.holds(cand[m]),
            }
            for m, t in uc.evaluation.thresholds.items()
        ]
        passed = all(v["passed"] for v in verdicts)
        attempt = attempt_of(context)
        sft_meta = upstream_metadata(context, "sft_adapter")
        aligned_meta = upstream_metadata(context, "aligned_model")
        started = attempt_started_at(context)
        if passed:
            escalation, readaptation = None, f"verdict pass at attempt {attempt}: nothing to do"
        else:
            escalation, readaptation = next_escalation(
                uc, attempt, sft_meta, (time.time() - started) / 60
            )
        primary = uc.evaluation.primary_metric
        regression = compare_with_champion(
            mlflow_tracking.registry(), uc.name, suite.fingerprint(), primary, per_example
        )
        with artifact_store.write(st.target) as tmp:
            (tmp / "summary.json").write_text(
                json.dumps(
                    {
                        "suite": suite.fingerprint(),
                        "results": results,
                        "verdicts": verdicts,
                        "passed": passed,
                        "regression": regression,
                    },
                    indent=2,
                )
            )
            (tmp / "per_example.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in per_example)
            )
        st.run.log_table(per_example, "per_example.jsonl")
        st.run.log_text(md_table(rows), "evaluation.md")
        st.run.set_tags({"verdict": "pass" if passed else "fail", "suite": suite.fingerprint()})
        failed = [v["metric"] for v in verdicts if not v["passed"]]
        sft_r, pb_r = results["sft"]["rouge_l"], results["prompt_baseline"]["rouge_l"]
        sft_w, al_w = results["sft"]["mean_reward"], results[CANDIDATE]["mean_reward"]
        st.log(f"evaluation: verdict {'pass' if passed else 'fail ' + ', '.join(failed)}")
        return st.result(
            metrics={
                **cand,
                **{f"{m}_{k}": v for m, res in results.items() for k, v in res.items()},
                "passed": int(passed),
            },
            metadata={
                "verdict": "pass" if passed else "fail",
                "candidate_path": dg.MetadataValue.path(
                    str(upstream(context, artifact_store, "aligned_model"))
                ),
                "candidate_model": aligned_meta.get("registered_model", ""),
                "candidate_version": aligned_meta.get("registered_version", ""),
                "failed_metrics": ", ".join(failed),
                "sft_method": sft_meta.get("method", ""),
                "escalation": json.dumps(escalation) if escalation else "",
                "readaptation": readaptation,
                "attempt_started_at": started,
                "max_wall_minutes": uc.readaptation.max_wall_minutes,
                "max_attempts": uc.readaptation.max_attempts,
                "use_case_name": uc.name,
                "suite": suite.fingerprint(),
                "primary_metric": primary,
                "regressed": regression["regressed"],
                "vs_champion": regression["summary"],
                "comparison": dg.MetadataValue.md(md_table(rows)),
                "thresholds": dg.MetadataValue.md(md_table(verdicts) or "none set"),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="meets_thresholds",
                    passed=passed,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"failed": ", ".join(failed) or "none", "attempt": attempt},
                ),
                dg.AssetCheckResult(
                    check_name="sft_beats_prompt_baseline",
                    passed=sft_r > pb_r,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"sft_rouge_l": sft_r, "prompt_rouge_l": pb_r},
                ),
                dg.AssetCheckResult(
                    check_name="alignment_keeps_reward",
                    passed=al_w >= sft_w,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"sft_reward": sft_w, "aligned_reward": al_w},
                ),
                dg.AssetCheckResult(
                    check_name="no_regression_vs_champion",
                    passed=not regression["regressed"],
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={k: v for k, v in regression.items() if v is not None},
                ),
            ],
        )
