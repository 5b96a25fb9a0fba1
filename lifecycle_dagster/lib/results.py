"""What an asset records of an ``ml/`` result: its artifact files, MLflow records, UI metadata and
check results. One function per result kind, so that asset bodies stay short and the shapes a person
reads (tables, verdicts, decisions) are made in one place."""

from __future__ import annotations

import json

import dagster as dg

from lifecycle_dagster.lib.render import md_table, render_bars, render_tradeoff, table
from lifecycle_dagster.lib.stage import Stage
from lifecycle_dagster.ml.models import model_dir_of
from lifecycle_dagster.ml.readaptation import Decision
from lifecycle_dagster.ml.verdict import CANDIDATE, Assessment
from lifecycle_dagster.resources.artifacts import upstream_metadata


def check(name: str, passed: bool, metadata: dict, blocking: bool = False) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def genai_evaluation(st: Stage, result: Assessment, split) -> dict[str, dict[str, float]]:
    """Every scored model's generations as an MLflow GenAI evaluation run (the suite's code
    scorers, per-example assessments), linked to the model's MLflow logged model: the base model,
    the SFT model and the aligned candidate (the prompt baseline's run has no model: its figures
    are the base model's prompted, not the base model's own)."""
    from lifecycle_dagster.resources.mlflow_genai import evaluate_models

    ids = {
        a: upstream_metadata(st.context, a).get("mlflow_model_id")
        for a in ("base_model", "sft_adapter", "aligned_model")
    }
    field = st.use_case.task.input_field
    return st.best_effort(
        "the GenAI evaluation",
        lambda: evaluate_models(
            st.tracking.uri,
            st.run,
            result.per_example,
            {r["id"]: str(r.get(field, "")) for r in split.rows},
            st.use_case.task,
            st.use_case.evaluation.suite,
            model_ids={
                "base": ids["base_model"],
                "prompt_baseline": None,  # the base model's own figures stay its own
                "sft": ids["sft_adapter"],
                CANDIDATE: ids["aligned_model"],
            },
            dataset=st.dataset("task_dataset", "eval.jsonl"),
            tags={"dagster.run_id": st.context.run.run_id, "lifecycle.attempt": str(st.attempt_no)},
            log=st.log,
        ),
        {},
    )


def retrieval_gains(result: Assessment, retrieval: dict | None) -> list[dict]:
    """Per model: the primary metric with its passages and without, and the groundedness of its
    answers (empty without retrieval)."""
    if not retrieval:
        return []
    m, rows = result.metric, []
    for name, metrics in result.results.items():
        without = result.results.get(f"{name}_without_retrieval")
        if without is None:
            continue
        rows.append(
            {
                "model": name,
                f"{m}_with_retrieval": round(metrics[m], 4),
                f"{m}_without": round(without[m], 4),
                "gain": round(metrics[m] - without[m], 4),
                "groundedness": round(metrics["groundedness"], 4)
                if metrics.get("groundedness") is not None
                else None,
            }
        )
    return rows


def retrieval_metadata(result: Assessment, retrieval: dict | None) -> dict:
    if not retrieval:
        return {}
    recall = retrieval.get("recall_at_k", {}).get("eval")
    return {
        "retrieval": dg.MetadataValue.md(md_table(retrieval_gains(result, retrieval))),
        "retrieval_index_version": retrieval.get("index_version", ""),
        "retrieval_top_k": retrieval.get("top_k", 0),
        **({"eval_recall_at_k": recall} if recall is not None else {}),
    }


def evaluation_result(
    st: Stage,
    result: Assessment,
    decision: Decision,
    regression: dict,
    candidate: dict,
    genai: dict | None = None,
    retrieval: dict | None = None,
) -> dg.MaterializeResult:
    """The evaluation's artifact (summary, per-example table), its MLflow run, the verdict, the
    re-adaptation decision the sensor reads, and the four checks; with ``retrieval`` (what the
    dataset's passages came from), what retrieval bought each model."""
    st.reads(eval=("task_dataset", "eval.jsonl"))
    with st.write() as tmp:
        summary = {
            "suite": result.suite,
            "results": result.results,
            "verdicts": result.verdicts,
            "passed": result.passed,
            "regression": regression,
            "retrieval": retrieval_gains(result, retrieval),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "per_example.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in result.per_example)
        )
    st.run.log_metrics(
        {f"{name}.{k}": v for name, metrics in result.results.items() for k, v in metrics.items()}
    )
    st.run.log_table(result.per_example, "per_example.jsonl")
    st.run.log_text(md_table(result.rows), "evaluation.md")
    verdict = {"verdict": decision.verdict, "suite": result.suite, "primary_metric": result.metric}
    st.run.set_tags(verdict)
    st.attempt.set_tags(verdict)
    failed = f" ({', '.join(result.failed)})" if result.failed else ""
    st.log(
        f"evaluation: verdict {decision.verdict}{failed} at attempt {decision.attempt}; {decision.reason}"
    )
    warnings = result.warnings()
    return st.result(
        metrics=result.flat_metrics(),
        metadata={
            "verdict": decision.verdict,
            "candidate_path": dg.MetadataValue.path(str(candidate.get("artifact_path", ""))),
            "candidate_model": candidate.get("registered_model", ""),
            "candidate_version": candidate.get("registered_version", ""),
            "failed_metrics": ", ".join(result.failed),
            "sft_method": decision.method,
            "decision": dg.MetadataValue.json(decision.model_dump(mode="json")),
            "readaptation": decision.reason,
            "use_case_name": decision.use_case,
            "suite": result.suite,
            "primary_metric": st.use_case.primary_metric,
            "regressed": regression["regressed"],
            "vs_champion": regression["summary"],
            "comparison": dg.MetadataValue.md(md_table(result.rows)),
            "mlflow_genai": dg.MetadataValue.json(genai or {}),
            "thresholds": table(result.verdicts) if result.verdicts else "none set",
            **retrieval_metadata(result, retrieval),
            **{name: table(rows) for name, rows in result.tables.items() if rows},
        },
        check_results=[
            check(
                "meets_thresholds",
                result.passed,
                {
                    "failed": ", ".join(result.failed) or "none",
                    "shortfall": result.shortfall(),
                    "attempt": decision.attempt,
                },
                blocking=True,
            ),
            *(check(name, ok, meta) for name, (ok, meta) in warnings.items()),
            check("no_regression_vs_champion", not regression["regressed"], regression),
        ],
    )


def onnx_result(st: Stage, result, source, split) -> dg.MaterializeResult:
    """The ONNX artifact: every variant's row, the deployed one's figures, its registry version and
    the three blocking gates."""
    st.reads(eval=("task_dataset", "eval.jsonl"))
    c = st.use_case.compression
    rows = [r.row() for r in result.variants.values()]
    st.run.log_text(md_table(rows), "variants.md")
    st.run.log_file(st.target / "selected.json")
    st.run.log_file(st.target / "faithfulness.json")
    st.run.log_table(
        [
            {"variant": n, "id": row["id"], "prediction": p}
            for n, r in result.variants.items()
            for row, p in zip(split.rows, r.predictions, strict=True)
        ],
        "predictions.jsonl",
    )
    st.run.log_metrics(
        {
            f"{n}.{k}": v
            for n, r in result.variants.items()
            for k, v in r.row().items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    )
    fp32, chosen = result.variants["fp32"], result.variants.get(result.selected or "")
    st.log(
        f"onnx_model: policy {c.policy}, deploying {result.selected or 'nothing'}"
        + (f" ({chosen.bytes / 1e6:.0f} MB, {chosen.tokens_per_s:.1f} tok/s)" if chosen else "")
    )
    if chosen is not None:
        st.log_model(
            "onnx",
            st.target / (result.selected or ""),
            params={"variant": result.selected, "policy": c.policy, "bytes": chosen.bytes},
            source_model=str(source),
        )
    registered, version = st.register(
        "onnx",
        st.target,
        {
            "variant": result.selected or "none",
            "gates": "passed" if result.deployable else "failed",
            "source_model": str(source),
            **({f"onnx_{chosen.metric}": chosen.quality, "bytes": chosen.bytes} if chosen else {}),
        },
    )
    against = "the aligned model (PyTorch)" if result.reference_source == "pytorch" else "fp32"
    budget = {
        "max_metric_drop": c.max_metric_drop,
        "max_reward_drop_pct": c.max_reward_drop_pct,
        "judged_against": f"{against} on {result.examples} eval rows",
    }
    within = ", ".join(n for n, r in result.variants.items() if r.within_budget) or "none"
    points = {
        n: {
            "MB": r.bytes / 1e6,
            "tok_s": r.tokens_per_s,
            "drop": r.quality_drop,
            "ok": r.within_budget,
        }
        for n, r in result.variants.items()
    }
    tradeoff = st.image(
        render_tradeoff(points, f"size, speed and {result.metric} lost", result.selected),
        "trade-off",
        "tradeoff",
    )
    return st.result(
        metrics=result.metrics(),
        metadata={
            "selected_variant": result.selected or "none",
            "policy": c.policy,
            "judged_against": budget["judged_against"],
            "registered_model": registered,
            "registered_version": version,
            "source_model": str(source),
            "variants": table(rows),
            "tradeoff": tradeoff,
            "deploy_path": dg.MetadataValue.path(
                str(st.target / result.selected) if result.selected else ""
            ),
        },
        check_results=[
            check(
                "fp32_matches_pytorch",
                result.fp32_matches,
                {
                    "logits_atol": c.logits_atol,
                    "max_abs_logit_diff": fp32.faithfulness.max_abs_logit_diff,
                    "token_agreement": fp32.faithfulness.token_agreement,
                    "text_equal": fp32.faithfulness.text_equal,
                    "prompts": c.check_prompts,
                },
                blocking=True,
            ),
            check(
                "kv_cache_in_use",
                result.cache_in_use,
                {n: r.faithfulness.cache_consistent for n, r in result.variants.items()},
                blocking=True,
            ),
            check(
                "within_quality_budget",
                result.selected is not None,
                {**budget, "selected": result.selected or "none", "within_budget": within},
                blocking=True,
            ),
        ],
    )


def sft_result(st: Stage, result, method, after, before, device: str) -> dg.MaterializeResult:
    """The adapted model: loss curve, what was trained, and the primary metric before and after."""
    st.reads(train=("task_dataset", "train.jsonl"), eval=("task_dataset", "eval.jsonl"))
    st.run.log_curve("train_loss", result.loss_curve)
    shape = (
        {"num_virtual_tokens": method.num_virtual_tokens}
        if method.method == "prompt_tuning"
        else {"lora_r": method.lora_r}
    )
    st.log_model("sft", st.target / "adapter", params=method.model_dump(), method=method.method)
    return st.result(
        metrics={
            "loss_start": result.loss_start,
            "loss_end": result.loss_end,
            "trainable_fraction": result.trainable_fraction,
            "trainable_parameters": result.trainable_parameters,
            f"{after.metric}_before": before,
            f"{after.metric}_after": after.primary,
            "train_seconds": result.seconds,
        },
        metadata={
            "method": method.method,
            "max_steps": method.max_steps,
            **shape,
            **({"lora_alpha": method.scaling_alpha} if method.method == "lora" else {}),
            "config": dg.MetadataValue.json(method.model_dump(mode="json")),
            "is_adapter": result.is_adapter,
            "device": device,
            # > 0: an interrupted attempt's checkpoint at that step was resumed.
            "resumed_from_step": result.resumed_from,
            "loss_curve": st.plot(
                {"loss": result.loss_curve}, f"SFT loss ({method.method})", "sft_loss"
            ),
        },
    )


def prompt_baseline_result(st: Stage, result) -> dg.MaterializeResult:
    """Each prompting strategy's score (plotted by shot count in MLflow) and the best template."""
    best = result.best
    st.reads(train=("task_dataset", "train.jsonl"), eval=("task_dataset", "eval.jsonl"))
    with st.write() as tmp:
        (tmp / "results.json").write_text(json.dumps(result.strategies, indent=2))
        (tmp / "best_template.txt").write_text(result.template)
        (tmp / "best.json").write_text(json.dumps({"shots": best["shots"]}))
    metric = result.metric
    for r in result.strategies:
        if r["shots"] is not None:
            st.run.log_metrics({metric: r[metric]}, step=r["shots"])
    st.run.log_metrics({f"{metric}_{r['strategy']}": r[metric] for r in result.strategies})
    st.run.log_text(result.template, "best_template.txt")
    rows = [{k: v for k, v in r.items() if k != "shots"} for r in result.strategies]
    prompt = register_prompt(st, result)
    return st.result(
        metrics={
            f"best_{metric}": best[metric],
            f"zero_shot_{metric}": result.zero_shot,
            "best_shots": best["shots"],
        },
        metadata={
            "strategies": table(rows),
            "best_strategy": best["strategy"],
            "best_template": dg.MetadataValue.md(f"```\n{result.template[-1500:]}\n```"),
            **prompt,
        },
    )


def register_prompt(st: Stage, result) -> dict:
    """The best template in MLflow's prompt registry as ``<use case>-prompt``, with its score;
    alias ``best`` follows the best-scoring version."""
    from lifecycle_dagster.resources.mlflow_genai import register_best_prompt

    best, metric = result.best, result.metric
    name = f"{st.use_case.name}-prompt"
    registered = st.best_effort(
        "the prompt version",
        lambda: register_best_prompt(
            st.tracking.uri,
            st.run,
            name,
            result.template,
            metric=metric,
            score=best[metric],
            message=f"prompt_baseline: {best['strategy']}, {metric} {best[metric]:.4f}",
            tags={
                "strategy": best["strategy"],
                "shots": str(best["shots"]),
                "dagster.run_id": st.context.run.run_id,
                "base_model": st.use_case.base_model.source,
            },
        ),
    )
    if registered is None:
        return {}
    version, is_best = registered
    st.log(
        f"prompt_baseline: prompt {name} version {version}" + (" (alias best)" if is_best else "")
    )
    return {"prompt_registry": f"prompts:/{name}/{version}", "prompt_is_best": is_best}


def reward_result(
    st: Stage, outcome, held_out: int, device: str, weak: str | None, sampled: int = 0
) -> dg.MaterializeResult:
    """The reward model: where it came from, its loss curve, its held-out ranking and whether it
    is strong enough to align against."""
    st.reads(
        preferences_train=("preference_dataset", "preferences_train.jsonl"),
        preferences_eval=("preference_dataset", "preferences_eval.jsonl"),
    )
    st.run.log_curve("train_loss", outcome.loss_curve)
    if weak:
        st.log(f"reward_model: WARNING too weak to trust: {weak}; alignment will be skipped")
    meta = {
        "trusted": "no: " + weak if weak else "yes",
        "rejected_from_sft": sampled,
        "source": outcome.source,
        "reward": outcome.description,
        "held_out_pairs": held_out,
        "max_steps": outcome.max_steps,
        "device": device,
    }
    if outcome.loss_curve:
        meta["loss_curve"] = st.plot(
            {"loss": outcome.loss_curve}, "reward model loss", "reward_loss"
        )
    if (st.target / "model").is_dir():  # a verifiable reward alone is not a model
        st.log_model("reward", st.target / "model", params={"source": outcome.source})
    return st.result(
        metrics={
            "pairwise_accuracy": outcome.pairwise_accuracy,
            "mean_margin": outcome.mean_margin,
        },
        metadata=meta,
    )


def aligned_result(st: Stage, outcome, method, device: str) -> dg.MaterializeResult:
    """The aligned model: registered as the use case's candidate, with reward and the primary metric
    before and after, the KL to the SFT reference and the training curves."""
    st.reads(train=("task_dataset", "train.jsonl"), eval=("task_dataset", "eval.jsonl"))
    result, before, after = outcome.result, outcome.before, outcome.after
    st.run.log_curve("train_reward", result.reward_curve)
    st.run.log_curve("kl", result.kl_curve)
    st.run.log_curve("train_loss", result.loss_curve)
    st.log_model("aligned", st.target / "model", params=method.model_dump(), candidate=outcome.kept)
    registered, version = st.register(
        "aligned",
        st.target,
        {"reward_after": after.mean_reward, f"{after.metric}_after": after.primary},
    )
    meta = {
        "candidate": outcome.kept,
        "candidate_reason": outcome.reason,
        "method": method.method,
        "beta": method.beta,
        "soft_prompt_tokens": outcome.soft_prompt_tokens,
        "registered_model": registered,
        "registered_version": version,
        "max_steps": method.max_steps,
        "config": dg.MetadataValue.json(method.model_dump(mode="json")),
        "device": device,
    }
    if result.reward_curve:
        meta["reward_curve"] = st.plot(
            {"reward": result.reward_curve}, f"{method.method} training reward", "align_reward"
        )
    return st.result(
        metrics={
            "reward_before": before.mean_reward,
            "reward_after": after.mean_reward,
            f"{before.metric}_before": before.primary,
            f"{after.metric}_after": after.primary,
            "mean_kl": result.mean_kl,
            "train_seconds": result.seconds,
        },
        metadata=meta,
    )


def champion_result(st: Stage, registry, decisions: list, onnx_model: str) -> dg.MaterializeResult:
    """The promotion decisions (aligned model, then its ONNX artifact) and where champion stands."""
    metric = decisions[0].metric
    rows = [
        {
            "model": d.name,
            "version": d.version,
            metric: round(d.value, 4),
            "champion_before": d.previous_version or "-",
            "promoted": d.promoted,
            "reason": d.reason,
            "champion_now": registry.aliases(d.name).get("champion", "-"),
        }
        for d in decisions
    ]
    for row in rows:
        st.log(
            f"champion_model: {row['model']} v{row['version']} "
            f"{'promoted' if row['promoted'] else 'not promoted'}: {row['reason']}"
        )
    with st.write() as tmp:
        (tmp / "promotion.json").write_text(json.dumps(rows, indent=2))
    st.run.log_text(md_table(rows), "promotion.md")
    st.run.set_tags({"promoted": str(any(d.promoted for d in decisions)).lower()})
    return st.result(
        metrics={"promoted": int(decisions[-1].promoted)},
        metadata={
            "decisions": table(rows),
            "onnx_champion": rows[-1]["champion_now"],
            "aligned_champion": rows[0]["champion_now"],
            "registry": dg.MetadataValue.url(f"{st.tracking.ui_url}/#/models/{onnx_model}"),
        },
    )


def base_model_result(st: Stage, result, device: str) -> dg.MaterializeResult:
    """The base model: its shape, its pre-training curve (when pre-trained here), and what
    pre-training and fine-tuning a model of its size would cost on this machine."""
    from lifecycle_dagster.ml.estimate import human_seconds

    uc, feasible = st.use_case, result.feasibility
    curve = result.pretrain.get("loss_curve", [])
    st.run.log_curve("pretrain_loss", curve)
    st.run.log_dict(feasible.as_dict(), "pretraining_feasibility.json")
    meta = {
        "source": uc.base_model.source,
        "architecture": result.architecture,
        "vocab_size": result.vocab_size,
        "context_length": result.context_length,
        "device": device,
        "pretraining_feasibility": dg.MetadataValue.md(feasible.markdown()),
        "pretrain_estimate": human_seconds(feasible.pretrain_seconds),
        "compute_optimal_tokens": feasible.tokens,
        "pretrain_flops": feasible.train_flops,
        "full_finetune_gib": round(feasible.full_finetune_bytes / 2**30, 3),
        "lora_finetune_gib": round(feasible.lora_finetune_bytes / 2**30, 3),
        **{k: result.pretrain[k] for k in ("gguf_sha256", "conversion") if k in result.pretrain},
    }
    if curve:
        meta["pretrain_loss_curve"] = st.plot({"loss": curve}, "pre-training loss", "pretrain_loss")
    st.log_model(
        "base",
        model_dir_of(st.target),
        params={"architecture": result.architecture, "parameters": result.parameters},
        source=uc.base_model.source,
    )
    return st.result(
        metrics={
            "parameters": result.parameters,
            "pretrain_loss_start": result.pretrain.get("loss_start"),
            "pretrain_loss_end": result.pretrain.get("loss_end"),
            "pretrain_tokens": result.pretrain.get("tokens_seen"),
        },
        metadata=meta,
    )


def use_case_result(st: Stage, profile: str, source_file: str | None) -> dg.MaterializeResult:
    """The resolved use case as JSON (with the data files it names and the YAML it came from)."""
    import shutil

    uc = st.use_case
    with st.write() as tmp:
        (tmp / "use_case.json").write_text(uc.to_json())
        (tmp / "sources.txt").write_text(
            "".join(
                f"{split}: {getattr(uc.data, split)}\n"
                for split in ("train", "eval", "preferences_train", "preferences_eval")
            )
        )
        if source_file:
            shutil.copy(source_file, tmp / "use_case.source.yaml")
    resolved = uc.model_dump(mode="json")
    st.run.log_dict(resolved, "use_case.json")
    thresholds = [
        {"metric": k, "threshold": v.describe()} for k, v in uc.evaluation.thresholds.items()
    ]
    return st.result(
        metadata={
            "name": uc.name,
            "task": uc.task.type,
            "primary_metric": uc.primary_metric,
            "profile": profile,
            "base_model_source": uc.base_model.source,
            "adaptation_method": uc.adaptation.method,
            "alignment_method": uc.alignment.method,
            "thresholds": table(thresholds) if thresholds else "none",
            "fingerprint": uc.fingerprint(),
            "resolved": dg.MetadataValue.json(resolved),
        }
    )


def students_result(st: Stage, step) -> dg.MaterializeResult:
    """The pruned and distilled students: which blocks each keeps, its held-out KL to the teacher
    before and after training, the block influence and the loss curves."""
    result = step.result
    config = st.use_case.distillation
    rows = [s.row() for s in result.students.values()]
    st.run.log_params({f"distillation.{k}": v for k, v in config.model_dump().items()})
    for name, student in result.students.items():
        st.run.log_curve(f"{name}.loss", [(h["step"], h["loss"]) for h in student.history])
    meta: dict = {
        "students": table(rows)
        if rows
        else "none: distillation.prune_layers and student_layers are 0",
        "device": step.device,
    }
    if result.influence:
        influence = {str(i): v for i, v in enumerate(result.influence)}
        meta["block_influence"] = st.image(
            render_bars({"block influence (1 - cos in/out)": influence}, "block influence"),
            "block influence",
            "block_influence",
        )
        curves = {
            n: [(h["step"], h["loss"]) for h in s.history] for n, s in result.students.items()
        }
        meta["loss_curves"] = st.plot(curves, "distillation loss", "distillation_loss")
    metrics = {
        f"{n}.{k}": v
        for n, s in result.students.items()
        for k, v in (("kl_before", s.kl_before), ("kl_after", s.kl_after), ("blocks", len(s.kept)))
    }
    learned = {n: s.learned for n, s in result.students.items()}
    return st.result(
        metrics=metrics,
        metadata=meta,
        check_results=[
            check(
                "students_learn",
                all(learned.values()),
                {
                    **{
                        f"{n}_kl": f"{s.kl_before:.4f} -> {s.kl_after:.4f}"
                        for n, s in result.students.items()
                    },
                    "students": ", ".join(learned) or "none",
                },
            )
        ],
    )
