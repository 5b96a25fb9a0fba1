"""Automation: the jobs, the re-adaptation sensor that closes the loop, the evaluation schedule."""

import json
import time

import dagster as dg
from pydantic import ValidationError

from lifecycle_dagster import settings
from lifecycle_dagster.lib.configs import AlignedModelConfig, SFTAdapterConfig
from lifecycle_dagster.lib.data_changes import DATA_FILES, changed_datasets, materialized_use_case
from lifecycle_dagster.lib.partitions import (
    ATTEMPT_TAG,
    REASON_TAG,
    STARTED_TAG,
    USE_CASE_TAG,
    USE_CASES,
    VERDICT_RUN_TAG,
)
from lifecycle_dagster.ml.feedback import FeedbackStore
from lifecycle_dagster.ml.readaptation import Decision
from lifecycle_dagster.ml.tunables import given

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.all(),
    description="The whole lifecycle: scope, data, base model, adaptation, alignment, evaluation, "
    "compression.",
)
# What re-adaptation re-runs: fine-tuning and everything downstream of it (a definitions test
# holds this list to the graph). Named in each run's asset selection, so declarative automation
# knows the run updates these assets itself and does not re-request them for their parents'
# updates in the same run.
READAPTED = (
    "sft_adapter",
    "reward_model",
    "aligned_model",
    "evaluation",
    "distilled_model",
    "onnx_model",
    "champion_model",
    "lifecycle_report",
)
adaptation_job = dg.define_asset_job(
    "adaptation_job",
    selection=dg.AssetSelection.assets(*READAPTED),
    description="Fine-tuning and everything downstream of it (what re-adaptation re-runs).",
)
evaluation_job = dg.define_asset_job(
    "evaluation_job",
    selection=dg.AssetSelection.assets("evaluation"),
    description="Re-evaluate the current models against the use case's thresholds.",
)


# Declarative automation, running from the first deployment on: Dagster's implicit
# `default_automation_condition_sensor` starts STOPPED, so new data would stop at the dataset
# until someone found the toggle. This one evaluates every asset's condition (new data carries
# down the graph; a failed gate stops it) every 30 s.
lifecycle_automation = dg.AutomationConditionSensorDefinition(
    "lifecycle_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Runs what the assets' automation conditions ask for: a new dataset carries "
    "through prompting, SFT, alignment, evaluation, export and promotion; a failed gate stops it.",
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
    """What one evaluation verdict calls for: the decision evaluation recorded, as it stands now
    (``Decision.at``), in words, and the escalated run for the verdict's use case if any."""
    event = record.event_log_entry
    meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    use_case = record.partition_key
    if use_case is None:
        return "a verdict without a use case partition (an older deployment's): no run", None
    if "decision" not in meta:
        return f"{use_case}: a verdict recorded without a decision (an older version): no run", None
    try:
        decision = Decision.model_validate(meta["decision"]).at(now)
    except ValidationError as exc:  # one unreadable record never stalls the other use cases
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{use_case}: decision unreadable ({where}: {first['msg']}): no run", None
    if decision.verdict == "fail" and use_case not in partitions:
        return f"{use_case}: verdict fail, but the use case's partition was removed: no run", None
    if decision.next is None:
        return decision.summary(), None
    nxt = decision.next
    ops: dict = {"sft_adapter": SFTAdapterConfig(**given(nxt.adaptation))}
    if given(nxt.alignment):
        ops["aligned_model"] = AlignedModelConfig(**given(nxt.alignment))
    reason = decision.escalation_reason()
    request = dg.RunRequest(
        run_key=f"readapt-{record.storage_id}",
        asset_selection=[dg.AssetKey(a) for a in READAPTED],
        run_config=dg.RunConfig(ops=ops),
        tags={
            ATTEMPT_TAG: str(nxt.attempt),
            REASON_TAG: reason[:250],
            VERDICT_RUN_TAG: event.run_id,
            USE_CASE_TAG: use_case,
            STARTED_TAG: str(decision.started_at),
        },
        partition_key=use_case,
    )
    return decision.summary(), request


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


@dg.sensor(
    asset_selection=dg.AssetSelection.assets(*DATA_FILES, "knowledge_index"),
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A data file that differs from its latest snapshot re-materializes its dataset, "
    "retrieval documents that differ from its latest index the index and the task data; "
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


@dg.sensor(
    asset_selection=dg.AssetSelection.assets("preference_dataset"),
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Past a use case's `feedback.min_new` new ratings and preferences from the "
    "model's users, records a new version of `user_feedback` and re-runs the preference data "
    "with the pairs they make; the reward model, alignment, evaluation, export and promotion "
    "follow by declarative automation.",
)
def feedback_sensor(context: dg.SensorEvaluationContext):
    cursor = json.loads(context.cursor) if context.cursor else {}
    store = FeedbackStore(settings.feedback_url())
    events, requests, waiting = [], [], []
    for key in context.instance.get_dynamic_partitions(USE_CASES.name):
        uc = materialized_use_case(context.instance, key)
        if uc is None:
            continue
        new = store.count(uc.name, after_seq=cursor.get(key, 0))
        if new < uc.feedback.min_new:
            waiting.append(f"{key}: {new}/{uc.feedback.min_new} new")
            continue
        seq = store.latest_seq(uc.name)
        why = f"{new} new feedback from users (up to #{seq})"
        context.log.info(f"{key}: {why}")
        events.append(
            dg.AssetMaterialization(
                "user_feedback",
                partition=key,
                description=why,
                metadata={"new": new, "total": store.count(uc.name), "seq": seq},
            )
        )
        requests.append(
            dg.RunRequest(
                run_key=f"feedback-{key}-{seq}",
                asset_selection=[dg.AssetKey("preference_dataset")],
                partition_key=key,
                tags={REASON_TAG: why, USE_CASE_TAG: key},
            )
        )
        cursor[key] = seq
    if not requests:
        skip = "; ".join(waiting) or "no use case has been materialized"
        return dg.SensorResult(skip_reason=f"feedback: {skip}", cursor=json.dumps(cursor))
    return dg.SensorResult(run_requests=requests, asset_events=events, cursor=json.dumps(cursor))
