"""Automation: the jobs, the re-adaptation sensor that closes the loop, the evaluation schedule."""

import json

import dagster as dg

from lifecycle_dagster.lib.configs import SFTAdapterConfig
from lifecycle_dagster.lib.stage import ATTEMPT_TAG, REASON_TAG

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all(),
    description="The whole lifecycle: scope, data, base model, adaptation, alignment, evaluation, "
    "compression.",
)
adaptation_job = dg.define_asset_job(
    "adaptation_job",
    selection=dg.AssetSelection.assets("sft_adapter").downstream(),
    description="Fine-tuning and everything downstream of it (what re-adaptation re-runs).",
)
evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("evaluation"),
    description="Re-evaluate the current models against the use case's thresholds.",
)

evaluation_schedule = dg.ScheduleDefinition(
    name="evaluation_schedule",
    job=evaluation_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-run evaluation every morning so drift in the eval data shows up.",
)

VERDICT_RUN_TAG = "lifecycle/verdict_run"


@dg.sensor(
    job=adaptation_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When evaluation falls short, request the next rung of the adaptation ladder.",
)
def readaptation_sensor(context: dg.SensorEvaluationContext):
    """Reads the latest evaluation verdict (metadata, not run status: a failed check does not fail
    a run) and requests one escalated adaptation run per failed verdict, up to the attempt cap."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    records = context.instance.fetch_materializations(dg.AssetKey("evaluation"), limit=1).records
    if not records:
        return dg.SkipReason("evaluation has never been materialized")
    record = records[0]
    if record.storage_id <= cursor.get("last_storage_id", -1):
        return dg.SkipReason(f"no new verdict since evaluation event {record.storage_id}")
    event = record.event_log_entry
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    cursor["last_storage_id"] = record.storage_id
    attempt = int(meta.get("attempt", 1))
    verdict = meta.get("verdict", "")
    if verdict == "pass":
        return dg.SensorResult(
            skip_reason=f"verdict pass at attempt {attempt}: nothing to do",
            cursor=json.dumps(cursor),
        )
    escalation = json.loads(meta["escalation"]) if meta.get("escalation") else None
    max_attempts = int(meta.get("max_attempts", 1))
    if escalation is None or escalation["attempt"] > max_attempts:
        return dg.SensorResult(
            skip_reason=f"verdict fail ({meta.get('failed_metrics', '')}) at attempt {attempt}; "
            f"the budget of {max_attempts} attempts is spent, no further run",
            cursor=json.dumps(cursor),
        )
    overrides = escalation["sft_adapter"]
    reason = (
        f"attempt {attempt} failed {meta.get('failed_metrics', '')} with "
        f"{meta.get('sft_method', '?')}; escalating to {json.dumps(overrides)}"
    )
    context.log.info(reason)
    request = dg.RunRequest(
        run_key=f"readapt-{record.storage_id}",
        run_config=dg.RunConfig(ops={"sft_adapter": SFTAdapterConfig(**overrides)}),
        tags={
            ATTEMPT_TAG: str(escalation["attempt"]),
            REASON_TAG: reason[:250],
            VERDICT_RUN_TAG: event.run_id,
        },
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps(cursor))
