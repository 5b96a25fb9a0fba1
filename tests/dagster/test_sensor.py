"""The re-adaptation sensor on an ephemeral instance: escalate on shortfall, once, up to the cap."""

import time

import dagster as dg
import pytest

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.defs.automation.automation import readaptation_sensor
from lifecycle_dagster.ml.readaptation import Decision, Escalation
from lifecycle_dagster.ml.usecase import AdaptationUpdate, AlignmentUpdate

UC = "dialogue_summarisation"


def verdict(
    instance,
    *,
    passed: bool,
    attempt: int,
    escalate: dict | None = None,
    max_attempts=3,
    use_case=UC,
    started_minutes_ago: float = 1.0,
):
    """Record an evaluation verdict as the evaluation asset does: its decision, typed.
    ``escalate`` is the next attempt's adaptation update (None: no next attempt)."""
    nxt = None
    if escalate is not None:
        nxt = Escalation(
            attempt=attempt + 1,
            adaptation=AdaptationUpdate(**escalate),
            alignment=AlignmentUpdate(),
        )
    decision = Decision(
        use_case=use_case or UC,
        verdict="pass" if passed else "fail",
        attempt=attempt,
        failed=[] if passed else ["rouge_l"],
        method="lora",
        max_attempts=max_attempts,
        max_wall_minutes=240,
        started_at=time.time() - 60 * started_minutes_ago,
        next=nxt,
        reason=f"budget spent: {attempt} of {max_attempts} attempts made"
        if nxt is None and not passed
        else "",
    )
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="evaluation",
            partition=use_case,
            metadata={
                "verdict": decision.verdict,
                "attempt": attempt,
                "decision": dg.MetadataValue.json(decision.model_dump(mode="json")),
            },
        )
    )


def tick(instance, cursor=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor)
    result = readaptation_sensor(ctx)
    return result, ctx.cursor if result is None or not hasattr(
        result, "cursor"
    ) or result.cursor is None else result.cursor


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        inst.add_dynamic_partitions("use_cases", [UC, "support_triage"])
        yield inst


def test_no_evaluation_yet_skips(instance):
    result = readaptation_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(result, dg.SkipReason)
    assert "never been materialized" in result.skip_message


def test_shortfall_requests_the_escalated_run(instance):
    verdict(
        instance,
        passed=False,
        attempt=1,
        escalate={"method": "lora", "lora_r": 16, "max_steps": 300},
    )
    result, _ = tick(instance)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.run_key.startswith("readapt-")
    # The run names what it updates, so automation ignores parent updates made by the run itself.
    job = defs().resolve_job_def("adaptation_job")
    assert set(request.asset_selection) == job.asset_layer.executable_asset_keys
    assert request.partition_key == UC and request.tags["lifecycle/use_case"] == UC
    assert request.tags["lifecycle/attempt"] == "2"
    assert "rouge_l" in request.tags["lifecycle/reason"]
    config = request.run_config["ops"]["sft_adapter"]["config"]
    assert config["method"] == "lora" and config["lora_r"] == 16 and config["max_steps"] == 300


def test_pass_requests_nothing(instance):
    verdict(instance, passed=True, attempt=1)
    result, _ = tick(instance)
    assert not result.run_requests
    assert "verdict pass" in result.skip_reason.skip_message


def test_same_verdict_twice_gives_one_run(instance):
    verdict(
        instance,
        passed=False,
        attempt=1,
        escalate={"method": "full"},
    )
    first, cursor = tick(instance)
    assert len(first.run_requests) == 1
    second, _ = tick(instance, cursor)
    assert isinstance(second, dg.SkipReason) and "no new verdict" in second.skip_message


def test_each_use_case_gets_its_own_decision(instance):
    """Two use cases in one deployment: each newest verdict is decided in its own partition, and
    an older verdict of the same use case is superseded by its newer one."""
    escalate = {"method": "full"}
    verdict(instance, passed=False, attempt=1, escalate=escalate, use_case="support_triage")
    verdict(instance, passed=False, attempt=1, escalate=escalate)
    verdict(instance, passed=True, attempt=2, use_case="support_triage")
    result, cursor = tick(instance)
    assert [(r.partition_key, r.tags["lifecycle/attempt"]) for r in result.run_requests] == [
        (UC, "2")
    ]
    nothing, _ = tick(instance, cursor)
    assert "no new verdict" in nothing.skip_message
    assert "support_triage: verdict pass at attempt 2" in nothing.skip_message
    assert f"{UC}: attempt 1 failed rouge_l" in nothing.skip_message


def test_the_daemon_accepts_the_request_for_the_use_cases_partition(instance):
    """Through the sensor definition, as the daemon runs it: Dagster resolves the partition."""
    from lifecycle_dagster.definitions import defs

    verdict(instance, passed=False, attempt=1, escalate={})
    ctx = dg.build_sensor_context(instance=instance, definitions=defs())
    with dg.partition_loading_context(dynamic_partitions_store=instance):
        data = readaptation_sensor.evaluate_tick(ctx)
    assert [r.partition_key for r in data.run_requests] == [UC]


@pytest.mark.parametrize(
    "use_case, why",
    [
        (None, "without a use case partition"),
        ("removed_use_case", "partition was removed"),
    ],
)
def test_a_verdict_without_a_live_partition_launches_nothing(instance, use_case, why):
    escalate = {"method": "full"}
    verdict(instance, passed=False, attempt=1, escalate=escalate, use_case=use_case)
    result, cursor = tick(instance)
    assert not result.run_requests and why in result.skip_reason.skip_message
    # The cursor moved on: the next use case's verdict is decided, not blocked behind it.
    verdict(instance, passed=False, attempt=1, escalate=escalate)
    after, _ = tick(instance, cursor)
    assert [r.partition_key for r in after.run_requests] == [UC]


def test_a_verdict_read_past_the_wall_time_budget_launches_nothing(instance):
    escalate = {"method": "full"}
    verdict(instance, passed=False, attempt=1, escalate=escalate, started_minutes_ago=300)
    result, _ = tick(instance)
    assert not result.run_requests
    assert "wall-time budget spent: 300 of 240 minutes" in result.skip_reason.skip_message
    verdict(instance, passed=False, attempt=1, escalate=escalate, started_minutes_ago=5)
    assert len(tick(instance)[0].run_requests) == 1


def test_cap_holds_when_attempts_are_spent(instance):
    verdict(instance, passed=False, attempt=3, max_attempts=3)
    result, _ = tick(instance)
    assert not result.run_requests
    assert "budget spent: 3 of 3 attempts made: no further run" in result.skip_reason.skip_message


def test_cap_holds_even_if_an_escalation_is_offered_past_it(instance):
    verdict(
        instance,
        passed=False,
        attempt=2,
        max_attempts=2,
        escalate={"method": "full"},
    )
    result, _ = tick(instance)
    assert not result.run_requests


def test_a_verdict_recorded_before_typed_decisions_launches_nothing(instance):
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="evaluation",
            partition=UC,
            metadata={"verdict": "fail", "attempt": 1, "escalation": '{"attempt": 2}'},
        )
    )
    result, _ = tick(instance)
    assert not result.run_requests
    assert "recorded without a decision" in result.skip_reason.skip_message


def test_an_unreadable_decision_launches_nothing_and_blocks_no_one(instance):
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="evaluation",
            partition="support_triage",
            metadata={"verdict": "fail", "attempt": 1, "decision": dg.MetadataValue.json({})},
        )
    )
    verdict(instance, passed=False, attempt=1, escalate={"method": "full"})
    result, _ = tick(instance)
    assert [r.partition_key for r in result.run_requests] == [UC]
