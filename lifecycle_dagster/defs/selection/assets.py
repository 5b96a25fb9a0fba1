"""Select: the foundation model, from a local directory, a GGUF file, a hub id, or pre-trained."""

import json

import dagster as dg

from lifecycle_dagster import settings
from lifecycle_dagster.lib.stage import (
    OWNERS,
    USE_CASES,
    stage,
    upstream,
)
from lifecycle_dagster.ml.data import read_rows
from lifecycle_dagster.ml.estimate import estimate, human_seconds
from lifecycle_dagster.ml.models import materialize_base_model
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
        data = upstream(context, artifact_store, "task_dataset")
        rows = read_rows(data / "train.jsonl")
        corpus = [r[uc.task.input_field] for r in rows] + [r[uc.task.target_field] for r in rows]
        st.run.log_params(
            {
                "source": uc.base_model.source,
                "path": uc.base_model.path or "",
                **(
                    {f"scratch.{k}": v for k, v in uc.base_model.scratch.model_dump().items()}
                    if uc.base_model.source == "scratch"
                    else {}
                ),
            }
        )
        with artifact_store.write(st.target) as tmp:
            result = materialize_base_model(
                uc.base_model,
                corpus,
                tmp / "model",
                runtime,
                log=st.log,
                cache_dir=settings.state_home() / "cache" / "models",
            )
        curve = result.pretrain.get("loss_curve", [])
        st.run.log_curve("pretrain_loss", curve)
        meta = {
            "source": uc.base_model.source,
            "architecture": result.architecture,
            "vocab_size": result.vocab_size,
            "context_length": result.context_length,
            "device": runtime.describe(),
        }
        config = json.loads((st.target / "model" / "config.json").read_text())
        feasible = estimate(
            result.parameters,
            device=runtime.device,
            hidden=config.get("hidden_size"),
            layers=config.get("num_hidden_layers"),
            lora_r=uc.adaptation.lora_r,
            virtual_tokens=uc.adaptation.num_virtual_tokens,
        )
        st.run.log_dict(feasible.as_dict(), "pretraining_feasibility.json")
        meta["pretraining_feasibility"] = dg.MetadataValue.md(feasible.markdown())
        meta["pretrain_estimate"] = human_seconds(feasible.pretrain_seconds)
        meta["compute_optimal_tokens"] = feasible.tokens
        meta["pretrain_flops"] = feasible.train_flops
        meta["full_finetune_gib"] = round(feasible.full_finetune_bytes / 2**30, 3)
        meta["lora_finetune_gib"] = round(feasible.lora_finetune_bytes / 2**30, 3)
        for key in ("gguf_sha256", "conversion"):
            if key in result.pretrain:
                meta[key] = result.pretrain[key]
        if curve:
            meta["pretrain_loss_curve"] = st.plot(
                {"loss": curve}, "pre-training loss", "pretrain_loss"
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
