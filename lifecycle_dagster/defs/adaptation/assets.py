"""Adapt: prompt engineering (zero/few-shot in-context learning), then fine-tuning (peft + trl)."""

import dagster as dg

from lifecycle_dagster.lib.configs import SFTAdapterConfig
from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES
from lifecycle_dagster.lib.results import prompt_baseline_result, sft_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.data import EvalSplit, read_rows
from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer, model_dir_of
from lifecycle_dagster.ml.prompting import score_prompting
from lifecycle_dagster.resources.artifacts import ArtifactStore, upstream_metadata
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.training import Training


@dg.asset(
    group_name="adaptation",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "task_dataset"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
)
def prompt_baseline(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """Prompt engineering: the base model with zero-, one- and few-shot prompts; no training."""
    with stage(context, "prompt_baseline", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        model_dir = model_dir_of(artifact_store.upstream(context, "base_model"))
        data = artifact_store.upstream(context, "task_dataset")
        result = score_prompting(
            load_causal_lm(model_dir, runtime),
            load_tokenizer(model_dir),
            EvalSplit.read(uc, data, model_dir),
            read_rows(data / "train.jsonl"),
            uc.prompting.shots,
            max_new_tokens=uc.prompting.max_new_tokens,
            batch_size=uc.evaluation.batch_size,
            log=st.log,
        )
        return prompt_baseline_result(st, result)


@dg.asset(
    group_name="adaptation",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "peft", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "task_dataset", "prompt_baseline"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
)
def sft_adapter(
    context: dg.AssetExecutionContext,
    config: SFTAdapterConfig,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
    training: Training,
) -> dg.MaterializeResult:
    """The adapted model: a soft prompt (prompt tuning), a LoRA adapter or fully fine-tuned
    weights. Evaluated as the later stages run it (a soft prompt baked into the vocabulary)."""
    with stage(context, "sft_adapter", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        method = uc.adaptation.updated(config)
        st.run.log_params({**method.model_dump(), "lora_alpha": method.scaling_alpha})
        with st.write() as tmp:
            out = training.run(
                context,
                "sft_adapter",
                st.log,
                uc=uc,
                base=model_dir_of(artifact_store.upstream(context, "base_model")),
                data=artifact_store.upstream(context, "task_dataset"),
                out=tmp,
                method=method,
                compute=compute.request(uc.compute),
                checkpoints=st.checkpoints(method.model_dump_json()),
            )
        before = upstream_metadata(context, "prompt_baseline").get(f"best_{out.after.metric}")
        return sft_result(st, out.result, method, out.after, before, out.device)
