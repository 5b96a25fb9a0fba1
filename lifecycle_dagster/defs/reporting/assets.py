"""Report: the lifecycle's phases as measured in this run, beside their typical cost."""

import dagster as dg

from lifecycle_dagster.lib.stage import (
    FOLLOWS_UPSTREAM,
    OWNERS,
    USE_CASES,
    render_bars,
    stage,
    upstream_metadata,
)
from lifecycle_dagster.ml.report import PHASES, build_report
from lifecycle_dagster.resources.artifacts import ArtifactStore
from lifecycle_dagster.resources.mlflow import MlflowTracking

SOURCES = sorted({a for p in PHASES for a in p.assets})


@dg.asset(
    group_name="reporting",
    partitions_def=USE_CASES,
    automation_condition=FOLLOWS_UPSTREAM,
    kinds={"markdown", "mlflow"},
    owners=OWNERS,
    code_version="1",
    deps=SOURCES,
)
def lifecycle_report(
    context: dg.AssetExecutionContext,
    artifact_store: ArtifactStore,
    mlflow_tracking: MlflowTracking,
) -> dg.MaterializeResult:
    """Each lifecycle phase: measured time, what was customised, objective and compute, beside
    the typical range (pre-training days to months; fine-tuning and RLHF minutes to hours)."""
    with stage(context, "lifecycle_report", artifact_store, mlflow_tracking) as st:
        meta = {asset: upstream_metadata(context, asset) for asset in SOURCES}
        markdown, rows = build_report(meta)
        evaluation = meta.get("evaluation", {})
        comparison = evaluation.get("comparison", "")
        onnx = meta.get("onnx_model", {})
        body = (
            f"# Lifecycle report: {st.use_case.name}\n\n{markdown}\n\n"
            f"## Evaluation on the held-out split\n\n{comparison}\n"
        )
        if onnx:
            body += (
                f"\nONNX ({onnx.get('selected_variant')}): ROUGE-L "
                f"{onnx.get('onnx_rouge_l', float('nan')):.4f} against PyTorch "
                f"{onnx.get('reference_rouge_l', float('nan')):.4f}; "
                f"{onnx.get('size_ratio', 0):.1f}x smaller, "
                f"{onnx.get('speedup', 0):.1f}x decode speed.\n"
            )
        durations = {r["phase"]: r["seconds"] for r in rows}
        scores = {}
        for key, label in (
            ("base", "base"),
            ("prompt_baseline", "prompt"),
            ("sft", "SFT"),
            ("aligned", "aligned"),
        ):
            value = evaluation.get(f"{key}_rouge_l")
            if value is not None:
                scores[label] = value
        if onnx.get("onnx_rouge_l") is not None:
            scores["ONNX"] = onnx["onnx_rouge_l"]
        png = render_bars(
            {"wall time per phase (s)": durations, "ROUGE-L per stage": scores},
            f"lifecycle: {st.use_case.name}",
        )
        plot = st.image(png, "lifecycle", "lifecycle_report")
        with artifact_store.write(st.target) as tmp:
            (tmp / "lifecycle_report.md").write_text(body)
            (tmp / "lifecycle_report.png").write_bytes(png)
        st.run.log_file(st.target / "lifecycle_report.md")
        return st.result(
            metrics={
                "seconds_" + "_".join(r["phase"].replace("-", " ").split()[:2]): r["seconds"]
                for r in rows
            },
            metadata={
                "report": dg.MetadataValue.md(body),
                "plot": plot,
                "total_seconds": round(sum(durations.values()), 1),
            },
        )
