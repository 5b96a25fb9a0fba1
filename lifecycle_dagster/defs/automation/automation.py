"""Automation: the jobs, the re-adaptation sensor that closes the loop, the evaluation schedule."""

import json
import time
from pathlib import Path

import dagster as dg

from lifecycle_dagster.lib.configs import AlignedModelConfig, SFTAdapterConfig
from lifecycle_dagster.lib.stage import (
    ATTEMPT_TAG,
    REASON_TAG,
    STARTED_TAG,
    USE_CASE_TAG,
    USE_CASES,
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


@dg.schedule(
    job=evaluation_job,
    cron_schedule="0 6 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-run evaluation of every use case each morning so drift in the eval data shows "
    "up.",
)
def evaluation_schedule(context: dg.ScheduleEvaluationContext):
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    evaluated = context.instance.get_materialized_partitions(dg.AssetKey("evaluation"))
    keys = [k for k in context.instance.get_dynamic_partitions(USE_CASES.name) if k in evaluated]
    if not keys:
        return dg.SkipReason("no use case has been evaluated yet")
    return [dg.RunRequest(run_key=f"{key}-{day}", partition_key=key) for key in keys]


def readaptation_request(
    record, partitions: set[str], now: float
) -> tuple[str, dg.RunRequest | None]:
    """What one evaluation verdict calls for: a decision in words, and the escalated run (partition
    = the verdict's use case) when the ladder and the budget allow one."""
    event = record.event_log_entry
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    use_case = record.partition_key
    attempt = int(meta.get("attempt", 1))
    if use_case is None:
        return "a verdict without a use case partition (an older deployment's): no run", None
    if meta.get("verdict", "") == "pass":
        return f"{use_case}: verdict pass at attempt {attempt}: nothing to do", None
    if use_case not in partitions:
        return f"{use_case}: verdict fail, but the use case's partition was removed: no run", None
    escalation = json.loads(meta["escalation"]) if meta.get("escalation") else None
    max_attempts = int(meta.get("max_attempts", 1))
    started, max_minutes = meta.get("attempt_started_at"), meta.get("max_wall_minutes")
    if escalation is not None and escalation["attempt"] > max_attempts:
        escalation = None  # never past the cap, whatever the verdict offered
        meta["readaptation"] = f"budget spent: {attempt} of {max_attempts} attempts made"
    elif escalation is not None and started and max_minutes:
        elapsed = (now - float(started)) / 60
        if elapsed > float(max_minutes):  # a verdict read late (the daemon was down) is stale
            escalation = None
            meta["readaptation"] = (
                f"wall-time budget spent: {elapsed:.0f} of {float(max_minutes):.0f} minutes "
                "since attempt 1"
            )
    if escalation is None:
        return (
            f"{use_case}: verdict fail ({meta.get('failed_metrics', '')}) at attempt {attempt}; "
            f"{meta.get('readaptation') or 'no escalation'}: no further run"
        ), None
    reason = (
        f"attempt {attempt} failed {meta.get('failed_metrics', '')} with "
        f"{meta.get('sft_method', '?')}; escalating to {json.dumps(escalation['sft_adapter'])}"
        + (
            f", alignment {json.dumps(escalation['aligned_model'])}"
            if "aligned_model" in escalation
            else ""
        )
    )
    ops: dict = {"sft_adapter": SFTAdapterConfig(**escalation["sft_adapter"])}
    if "aligned_model" in escalation:
        ops["aligned_model"] = AlignedModelConfig(**escalation["aligned_model"])
    tags = {
        ATTEMPT_TAG: str(escalation["attempt"]),
        REASON_TAG: reason[:250],
        VERDICT_RUN_TAG: event.run_id,
        USE_CASE_TAG: use_case,
    }
    if meta.get("attempt_started_at"):
        tags[STARTED_TAG] = str(meta["attempt_started_at"])
    request = dg.RunRequest(
        run_key=f"readapt-{record.storage_id}",
        run_config=dg.RunConfig(ops=ops),
        tags=tags,
        partition_key=record.partition_key,
    )
    return f"{use_case}: {reason}; launched attempt {escalation['attempt']}", request


@dg.sensor(
    job=adaptation_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When evaluation falls short, request the next rung of the adaptation ladder.",
)
def readaptation_sensor(context: dg.SensorEvaluationContext):
    """Reads the evaluation verdicts recorded since the last tick (metadata, not run status: a
    failed check does not fail a run), the newest per use case, and requests one escalated
    adaptation run per failed verdict, within the use case's budget of attempts and wall time.
    Every decision is in the tick: a run with its reason in the tags, or a skip reason saying
    why not, per use case."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    decisions: dict = cursor.get("decisions", {})
    after = cursor.get("last_storage_id")
    records, page = [], None
    while True:  # every verdict since the cursor, oldest first, in pages
        result = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("evaluation"), after_storage_id=after),
            limit=200,
            cursor=page,
            ascending=True,
        )
        records += result.records
        if not result.has_more:
            break
        page = result.cursor
    if not records:
        if after is None:
            return dg.SkipReason("evaluation has never been materialized")
        return dg.SkipReason(
            f"no new verdict since evaluation event {after}: " + "; ".join(decisions.values())
        )
    newest = {r.partition_key: r for r in records}  # the last one per use case wins
    requests = []
    partitions = set(context.instance.get_dynamic_partitions(USE_CASES.name))
    for record in newest.values():
        decision, request = readaptation_request(record, partitions, time.time())
        decisions[record.partition_key or ""] = decision
        if request is None:
            (context.log.info if "verdict pass" in decision else context.log.warning)(decision)
        else:
            context.log.info(decision)
            requests.append(request)
    cursor = {"last_storage_id": records[-1].storage_id, "decisions": decisions}
    if not requests:
        return dg.SensorResult(
            skip_reason="; ".join(decisions[r.partition_key or ""] for r in newest.values()),
            cursor=json.dumps(cursor),
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))


# The files each dataset asset snapshots: use-case data field -> file name inside the artifact.
DATA_FILES = {
    "task_dataset": {"train": "train.jsonl", "eval": "eval.jsonl"},
    "preference_dataset": {
        "preferences_train": "preferences_train.jsonl",
        "preferences_eval": "preferences_eval.jsonl",
    },
}


def changed_datasets(
    instance: dg.DagsterInstance, hashes: dict, use_case: str
) -> tuple[list[str], list[str]]:
    """Dataset assets of ``use_case`` (a partition) whose source files no longer match their
    latest snapshot, and why.

    ``hashes`` caches file digests by (size, mtime) so a tick re-reads only files that moved."""
    uc_record = select_record(instance, "use_case", use_case=use_case)
    try:
        path = Path(str(uc_record.asset_materialization.metadata["artifact_path"].value))
        uc = UseCase.model_validate_json((path / "use_case.json").read_text())
    except (AttributeError, KeyError, OSError, ValueError):
        return [], []
    changed, why = [], []
    for asset, files in DATA_FILES.items():
        record = select_record(instance, asset, use_case=use_case)
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
    requests = []
    for key in context.instance.get_dynamic_partitions(USE_CASES.name):
        changed, why = changed_datasets(context.instance, hashes, key)
        if not changed:
            continue
        reason = "; ".join(why)
        context.log.info(f"{key}: new data: {reason}")
        requests.append(
            dg.RunRequest(
                run_key=f"data-{key}-{'-'.join(sorted(why))}"[:200],
                asset_selection=[dg.AssetKey(a) for a in changed],
                partition_key=key,
                tags={REASON_TAG: f"new data: {reason}"[:250], USE_CASE_TAG: key},
            )
        )
    cursor["hashes"] = dict(list(hashes.items())[-64:])
    if not requests:
        return dg.SensorResult(
            skip_reason="data files match their latest snapshots", cursor=json.dumps(cursor)
        )
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))
