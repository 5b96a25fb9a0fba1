"""Automation: the jobs, the re-adaptation sensor that closes the loop, the evaluation schedule."""

import json
from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig, SFTAdapterConfig
from lifecycle_dagster.lib.stage import (
    ATTEMPT_TAG,
    REASON_TAG,
    STARTED_TAG,
    USE_CASE_TAG,
    VERDICT_RUN_TAG,
)
from lifecycle_dagster.ml.artifacts import file_sha256, read_manifest
from lifecycle_dagster.ml.usecase import UseCase
from lifecycle_dagster.resources.artifacts import select_record

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


@dg.sensor(
    job=adaptation_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When evaluation falls short, request the next rung of the adaptation ladder.",
)
def readaptation_sensor(context: dg.SensorEvaluationContext):
    """Reads the latest evaluation verdict (metadata, not run status: a failed check does not fail
    a run) and requests one escalated adaptation run per failed verdict, within the use case's
    budget of attempts and wall time. Every decision is in the tick: a run with its reason in the
    tags, or a skip reason saying why not."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    records = context.instance.fetch_materializations(dg.AssetKey("evaluation"), limit=1).records
    if not records:
        return dg.SkipReason("evaluation has never been materialized")
    record = records[0]
    if record.storage_id <= cursor.get("last_storage_id", -1):
        return dg.SkipReason(
            f"no new verdict since evaluation event {record.storage_id} "
            f"(run {record.run_id[:8]}): {cursor.get('last_decision', '')}"
        )
    event = record.event_log_entry
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    cursor["last_storage_id"] = record.storage_id
    attempt = int(meta.get("attempt", 1))
    verdict = meta.get("verdict", "")
    if verdict == "pass":
        decision = f"verdict pass at attempt {attempt}: nothing to do"
        cursor["last_decision"] = decision
        return dg.SensorResult(skip_reason=decision, cursor=json.dumps(cursor))
    escalation = json.loads(meta["escalation"]) if meta.get("escalation") else None
    max_attempts = int(meta.get("max_attempts", 1))
    if escalation is not None and escalation["attempt"] > max_attempts:
        escalation = None  # never past the cap, whatever the verdict offered
        meta["readaptation"] = f"budget spent: {attempt} of {max_attempts} attempts made"
    if escalation is None:
        decision = (
            f"verdict fail ({meta.get('failed_metrics', '')}) at attempt {attempt}; "
            f"{meta.get('readaptation') or 'no escalation'}: no further run"
        )
        cursor["last_decision"] = decision
        context.log.warning(decision)
        return dg.SensorResult(skip_reason=decision, cursor=json.dumps(cursor))
    reason = (
        f"attempt {attempt} failed {meta.get('failed_metrics', '')} with "
        f"{meta.get('sft_method', '?')}; escalating to {json.dumps(escalation['sft_adapter'])}"
        + (
            f", alignment {json.dumps(escalation['aligned_model'])}"
            if "aligned_model" in escalation
            else ""
        )
    )
    cursor["last_decision"] = f"launched attempt {escalation['attempt']}"
    context.log.info(reason)
    ops: dict = {"sft_adapter": SFTAdapterConfig(**escalation["sft_adapter"])}
    if "aligned_model" in escalation:
        ops["aligned_model"] = AlignedModelConfig(**escalation["aligned_model"])
    tags = {
        ATTEMPT_TAG: str(escalation["attempt"]),
        REASON_TAG: reason[:250],
        VERDICT_RUN_TAG: event.run_id,
    }
    if meta.get("attempt_started_at"):
        tags[STARTED_TAG] = str(meta["attempt_started_at"])
    if meta.get("use_case_name"):
        tags[USE_CASE_TAG] = str(meta["use_case_name"])
    request = dg.RunRequest(
        run_key=f"readapt-{record.storage_id}",
        run_config=dg.RunConfig(ops=ops),
        tags=tags,
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps(cursor))


# The files each dataset asset snapshots: use-case data field -> file name inside the artifact.
DATA_FILES = {
    "task_dataset": {"train": "train.jsonl", "eval": "eval.jsonl"},
    "preference_dataset": {
        "preferences_train": "preferences_train.jsonl",
        "preferences_eval": "preferences_eval.jsonl",
    },
}


def changed_datasets(instance: dg.DagsterInstance, hashes: dict) -> tuple[list[str], list[str]]:
    """Dataset assets whose source files no longer match their latest snapshot, and why.

    ``hashes`` caches file digests by (size, mtime) so a tick re-reads only files that moved."""
    use_case = select_record(instance, "use_case")
    try:
        path = Path(str(use_case.asset_materialization.metadata["artifact_path"].value))
        uc = UseCase.model_validate_json((path / "use_case.json").read_text())
    except (AttributeError, KeyError, OSError, ValueError):
        return [], []
    changed, why = [], []
    for asset, files in DATA_FILES.items():
        record = select_record(instance, asset)
        try:
            snapshot = Path(str(record.asset_materialization.metadata["artifact_path"].value))
            manifest = read_manifest(snapshot)["files"]
        except (AttributeError, KeyError, OSError, ValueError):
            continue  # never materialized, or its snapshot is gone: nothing to compare with
        for field, name in files.items():
            source = Path(getattr(uc.data, field))
            if not source.is_file() or name not in manifest:
                continue
            stat = source.stat()
            key = f"{source}:{stat.st_size}:{stat.st_mtime_ns}"
            digest = hashes.get(key) or file_sha256(source)
            hashes[key] = digest
            if digest != manifest[name]["sha256"]:
                changed.append(asset)
                why.append(
                    f"{source.name} changed (sha256 {digest[:12]}, snapshot {record.storage_id})"
                )
                break
    return changed, why


@dg.sensor(
    asset_selection=dg.AssetSelection.assets(*DATA_FILES),
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A data file that differs from its latest snapshot re-materializes its dataset; "
    "adaptation and everything downstream follow by declarative automation.",
)
def data_change_sensor(context: dg.SensorEvaluationContext):
    cursor = json.loads(context.cursor) if context.cursor else {}
    hashes = cursor.get("hashes", {})
    changed, why = changed_datasets(context.instance, hashes)
    cursor["hashes"] = dict(list(hashes.items())[-32:])
    if not changed:
        return dg.SensorResult(
            skip_reason="data files match their latest snapshots", cursor=json.dumps(cursor)
        )
    reason = "; ".join(why)
    context.log.info(f"new data: {reason}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"data-{'-'.join(sorted(why))}"[:200],
                asset_selection=[dg.AssetKey(a) for a in changed],
                tags={REASON_TAG: f"new data: {reason}"[:250]},
            )
        ],
        cursor=json.dumps(cursor),
    )
