"""Align: the reward (a reward model, or the task kind's verifiable reward), then reinforcement
learning against it (trl)."""

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig
from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES
from lifecycle_dagster.lib.results import aligned_result, reward_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.feedback import feedback_used
from lifecycle_dagster.ml.models import model_dir_of
from lifecycle_dagster.ml.reward import (
    weak_reward,
)
from lifecycle_dagster.resources.artifacts import ArtifactStore, upstream_metadata
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.training import Training


@dg.asset(
    group_name="alignment",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "trl", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["base_model", "preference_dataset", "sft_adapter"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
)
def reward_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
    training: Training,
) -> dg.MaterializeResult:
    """Alignment's reward: a scalar reward model trained on the preference pairs, an existing one
    reused, or the task kind's verifiable reward (optionally mixed with a reward model)."""
    with stage(context, "reward_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        sft = artifact_store.upstream(context, "sft_adapter") / "adapter"
        prefs = artifact_store.upstream(context, "preference_dataset")
        st.run.log_params(
            {"reward.source": uc.reward_source, **uc.reward.model_dump(), **feedback_used(prefs)}
        )
        with st.write() as tmp:
            out = training.run(
                context,
                "reward_model",
                st.log,
                uc=uc,
                base=model_dir_of(artifact_store.upstream(context, "base_model")),
                prefs=prefs,
                sft=sft,
                out=tmp,
                compute=compute.request(uc.compute),
                # Resumable per SFT model.
                checkpoints=st.checkpoints(uc.reward.model_dump_json() + str(sft)),
            )
        weak = weak_reward(uc, out.outcome.pairwise_accuracy)
        return reward_result(st, out.outcome, out.held_out, out.device, weak, out.sampled)


@dg.asset(
    group_name="alignment",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"pytorch", "trl", "safetensors", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["sft_adapter", "reward_model", "task_dataset", "preference_dataset"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
)
def aligned_model(
    context: dg.AssetExecutionContext,
    config: AlignedModelConfig,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
    training: Training,
) -> dg.MaterializeResult:
    """The SFT model aligned with the reward model (KL-regularised to the SFT reference), merged;
    a prompt-tuned model keeps its soft prompt as tokens in its vocabulary."""
    with stage(context, "aligned_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        method = uc.alignment.updated(config)
        prefs = artifact_store.upstream(context, "preference_dataset")
        st.run.log_params({**method.model_dump(), **feedback_used(prefs)})
        reward_meta = upstream_metadata(context, "reward_model")
        sft = artifact_store.upstream(context, "sft_adapter") / "adapter"
        with st.write() as tmp:
            out = training.run(
                context,
                "aligned_model",
                st.log,
                uc=uc,
                base=model_dir_of(artifact_store.upstream(context, "base_model")),
                sft=sft,
                data=artifact_store.upstream(context, "task_dataset"),
                prefs=prefs,
                reward=artifact_store.upstream(context, "reward_model"),
                out=tmp,
                method=method,
                compute=compute.request(uc.compute),
                skip=weak_reward(uc, reward_meta.get("pairwise_accuracy")),
                checkpoints=st.checkpoints(method.model_dump_json() + str(sft)),
            )
        return aligned_result(st, out.outcome, method, out.device)
