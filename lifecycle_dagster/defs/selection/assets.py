"""Select: the foundation model, from a local directory, a GGUF file, a hub id, or pre-trained."""

import dagster as dg

from lifecycle_dagster import settings
from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES
from lifecycle_dagster.lib.results import base_model_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.data import PromptFormat, read_rows
from lifecycle_dagster.ml.models import load_tokenizer, materialize_base_model
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking


@dg.asset(
    group_name="selection",
    partitions_def=USE_CASES,
    kinds={"pytorch", "safetensors", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=["use_case", "task_dataset"],
    pool="train",
    op_tags=training_op_tags(),  # its pod on Kubernetes: GPU limit, placement, secrets
)
def base_model(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    """The foundation model (safetensors + tokenizer) every later stage starts from."""
    with stage(context, "base_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        runtime = compute.runtime(uc.compute)
        st.log(f"base_model: source {uc.base_model.source} on {runtime.describe()}")
        data = artifact_store.upstream(context, "task_dataset")
        rows = read_rows(data / "train.jsonl")
        corpus = [r[uc.task.input_field] for r in rows] + [r[uc.task.target_field] for r in rows]
        scratch = uc.base_model.scratch.model_dump() if uc.base_model.source == "scratch" else {}
        st.run.log_params(
            {
                "source": uc.base_model.source,
                "path": uc.base_model.path or "",
                **{f"scratch.{k}": v for k, v in scratch.items()},
            }
        )
        with st.write() as tmp:
            result = materialize_base_model(
                uc.base_model,
                corpus,
                tmp / "model",
                runtime,
                log=st.log,
                cache_dir=settings.state_home() / "cache" / "models",
                adaptation=uc.adaptation,
            )
            PromptFormat.of(uc, load_tokenizer(tmp / "model")).write(tmp / "model")
        return base_model_result(st, result, runtime)
