"""Evaluate: base, prompt baseline, SFT and aligned models on the same held-out split."""

import json

import dagster as dg

from lifecycle_dagster.lib.stage import (
    OWNERS,
    attempt_of,
    md_table,
    stage,
    upstream,
    upstream_metadata,
)
from lifecycle_dagster.ml.data import eval_rows, prompts_for, read_rows, references
from lifecycle_dagster.ml.evaluate import RewardScorer, evaluate_model
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.sft import load_sft_model
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking

CANDIDATE = "aligned"


def next_escalation(uc, attempt: int, sft_meta: dict) -> dict | None:
    """The adaptation overrides of the next attempt on the use case's ladder, or None when spent."""
    ladder = uc.readaptation.ladder
    if attempt >= uc.readaptation.max_attempts or attempt - 1 >= len(ladder):
        return None
    step = ladder[attempt - 1].model_dump(exclude_none=True)
    factor = step.pop("max_steps_factor", None)
    if factor:
        step["max_steps"] = int((sft_meta.get("max_steps") or uc.adaptation.max_steps) * factor)
    return {"attempt": attempt + 1, "sft_adapter": step}


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "mlflow"},
    owners=OWNERS,
    code_version="1",
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
    ],
)
def evaluation(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """Every lifecycle stage's model on one eval split: ROUGE-L, mean reward, perplexity; verdict."""
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
        tok = load_tokenizer(base)
        refs = references(uc, evals)
        zero = prompts_for(uc, evals)
        few = prompts_for(uc, evals, train[:shots])
        base_model = load_causal_lm(base, runtime)
        candidates = {
            "base": (lambda: base_model, zero),
            "prompt_baseline": (lambda: base_model, few),
            "sft": (
                lambda: load_sft_model(
                    base, upstream(context, artifact_store, "sft_adapter") / "adapter", runtime
                ),
                zero,
            ),
            CANDIDATE: (
                lambda: load_causal_lm(
                    upstream(context, artifact_store, "aligned_model") / "model", runtime
                ),
                zero,
            ),
        }
        rows, per_example, results = [], [], {}
        for name, (load, prompts) in candidates.items():
            res = evaluate_model(
                load(),
                tok,
                prompts,
                refs,
                max_new_tokens=uc.evaluation.max_new_tokens,
                batch_size=uc.evaluation.batch_size,
                reward=scorer,
                ids=[r["id"] for r in evals],
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
        escalation = None if passed else next_escalation(uc, attempt, sft_meta)
        with artifact_store.write(st.target) as tmp:
            (tmp / "summary.json").write_text(
                json.dumps({"results": results, "verdicts": verdicts, "passed": passed}, indent=2)
            )
            (tmp / "per_example.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in per_example)
            )
        st.run.log_table(per_example, "per_example.jsonl")
        st.run.log_text(md_table(rows), "evaluation.md")
        st.run.set_tags({"verdict": "pass" if passed else "fail"})
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
                "max_attempts": uc.readaptation.max_attempts,
                "use_case_name": uc.name,
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
            ],
        )
