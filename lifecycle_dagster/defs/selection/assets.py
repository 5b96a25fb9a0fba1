"""Select: the foundation model, from a local directory, a GGUF file, a hub id, or pre-trained."""

import dagster as dg

from lifecycle_dagster import settings
from lifecycle_dagster.lib.k8s import training_op_tags
from lifecycle_dagster.lib.partitions import OWNERS, USE_CASES
from lifecycle_dagster.lib.results import base_model_result
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.compute import Compute
from lifecycle_dagster.resources.mlflow import MlflowTracking
from lifecycle_dagster.resources.training import Training


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
    training: Training,
) -> dg.MaterializeResult:
    """The foundation model (safetensors + tokenizer) every later stage starts from."""
    with stage(context, "base_model", artifact_store, mlflow_tracking) as st:
        uc = st.use_case
        scratch = uc.base_model.scratch.model_dump() if uc.base_model.source == "scratch" else {}
        st.run.log_params(
            {
                "source": uc.base_model.source,
                "path": uc.base_model.path or "",
                **{f"scratch.{k}": v for k, v in scratch.items()},
            }
        )
        with st.write() as tmp:
            out = training.run(
                context,
                "base_model",
                st.log,
                uc=uc,
                data=artifact_store.upstream(context, "task_dataset"),
                out=tmp,
                compute=compute.request(uc.compute),
                cache_dir=settings.state_home() / "cache" / "models",
            )
        return base_model_result(st, out.result, out.device)
