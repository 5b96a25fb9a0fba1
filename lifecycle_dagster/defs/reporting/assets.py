"""Report: the lifecycle's phases as measured in this run, beside their typical cost."""

import dagster as dg

from lifecycle_dagster.lib.partitions import FOLLOWS_UPSTREAM, OWNERS, USE_CASES
from lifecycle_dagster.lib.render import render_bars
from lifecycle_dagster.lib.stage import stage
from lifecycle_dagster.ml.report import PHASES, build_report, report_body
from lifecycle_dagster.resources.artifacts import ArtifactStore, upstream_metadata
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
        body, panels = report_body(st.use_case.name, markdown, rows, meta)
        png = render_bars(panels, f"lifecycle: {st.use_case.name}")
        plot = st.image(png, "lifecycle", "lifecycle_report")
        with st.write() as tmp:
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
                "total_seconds": round(sum(r["seconds"] for r in rows), 1),
            },
        )
