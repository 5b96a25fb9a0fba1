"""Align: the reward (a reward model, or the task kind's verifiable reward), then reinforcement
learning against it (trl)."""

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig
from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES
from lifecycle_dagster.lib.results import aligned_result, reward_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.align import align_and_score
from lifecycle_dagster.ml.data import (
    EvalSplit,
    PromptFormat,
    preference_records,
    prompts_for,
    read_rows,
    references,
)
from lifecycle_dagster.ml.models import model_dir_of
from lifecycle_dagster.ml.reward import (
    load_reward,
    reward_model_for,
    weak_reward,
    with_sft_rejections,
)
from lifecycle_dagster.ml.sft import load_sft
from lifecycle_dagster.resources.artifacts import ArtifactStore, upstream_metadata
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


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
) -> dg.MaterializeResult:
    """Alignment's reward: a scalar reward model trained on the preference pairs, an existing one
    reused, or the task kind's verifiable reward (optionally mixed with a reward model)."""
    with stage(context, "reward_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        prefs = artifact_store.upstream(context, "preference_dataset")
        base = model_dir_of(artifact_store.upstream(context, "base_model"))
        fmt = PromptFormat.read(base)
        sft = artifact_store.upstream(context, "sft_adapter") / "adapter"
        rows, sampled = with_sft_rejections(
            uc,
            {n: read_rows(prefs / f"preferences_{n}.jsonl") for n in ("train", "eval")},
            lambda: load_sft(base, sft, runtime, merge=True),
            fmt,
            max_new_tokens=uc.evaluation.max_new_tokens,
            batch_size=uc.evaluation.batch_size,
            log=st.log,
        )
        train = preference_records(uc, rows["train"], fmt)
        held_out = preference_records(uc, rows["eval"], fmt)
        st.run.log_params({"reward.source": uc.reward_source, **uc.reward.model_dump()})
        ckpt = st.checkpoints(uc.reward.model_dump_json() + str(sft))  # resumable per SFT model
        with st.write() as tmp:
            result = reward_model_for(uc, base, train, held_out, tmp, runtime, st.log, ckpt)
        weak = weak_reward(uc, result.pairwise_accuracy)
        return reward_result(st, result, len(held_out), runtime.describe(), weak, sampled)


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
) -> dg.MaterializeResult:
    """The SFT model aligned with the reward model (KL-regularised to the SFT reference), merged;
    a prompt-tuned model keeps its soft prompt as tokens in its vocabulary."""
    with stage(context, "aligned_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        method = uc.alignment.updated(config)
        st.run.log_params(method.model_dump())
        reward_meta = upstream_metadata(context, "reward_model")
        data = artifact_store.upstream(context, "task_dataset")
        prefs = artifact_store.upstream(context, "preference_dataset")
        rows = read_rows(data / "train.jsonl")
        base = model_dir_of(artifact_store.upstream(context, "base_model"))
        fmt = PromptFormat.read(base)
        # The SFT model as one network (LoRA merged, a soft prompt baked into the vocabulary), with
        # the tokenizer that prompts it.
        sft = artifact_store.upstream(context, "sft_adapter") / "adapter"
        policy, tok = load_sft(base, sft, runtime, merge=True, training=True)
        with st.write() as tmp:
            result = align_and_score(
                policy,
                tok,
                tmp / "model",
                method,
                runtime,
                prompts=prompts_for(uc, rows, fmt=fmt),
                references=references(uc, rows),
                pairs=preference_records(uc, read_rows(prefs / "preferences_train.jsonl"), fmt),
                scorer=load_reward(artifact_store.upstream(context, "reward_model"), uc, runtime),
                split=EvalSplit.read(uc, data, base),
                max_new_tokens=uc.evaluation.max_new_tokens,
                batch_size=uc.evaluation.batch_size,
                log=st.log,
                skip=weak_reward(uc, reward_meta.get("pairwise_accuracy")),
                checkpoints=st.checkpoints(method.model_dump_json() + str(sft)),
            )
            fmt.write(tmp / "model")  # the aligned model is prompted as its base was
        return aligned_result(st, result, method, runtime.describe())
