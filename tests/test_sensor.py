"""The re-adaptation sensor on an ephemeral instance: escalate on shortfall, once, up to the cap."""

import json

import dagster as dg
import pytest

from lifecycle_dagster.defs.automation.automation import readaptation_sensor


def verdict(instance, *, passed: bool, attempt: int, escalation: dict | None, max_attempts=3):
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="evaluation",
            metadata={
                "verdict": "pass" if passed else "fail",
                "attempt": attempt,
                "failed_metrics": "" if passed else "rouge_l",
                "sft_method": "lora",
                "escalation": json.dumps(escalation) if escalation else "",
                "max_attempts": max_attempts,
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
        escalation={
            "attempt": 2,
            "sft_adapter": {"method": "lora", "lora_r": 16, "max_steps": 300},
        },
    )
    result, _ = tick(instance)
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.run_key.startswith("readapt-")
    assert request.tags["lifecycle/attempt"] == "2"
    assert "rouge_l" in request.tags["lifecycle/reason"]
    config = request.run_config["ops"]["sft_adapter"]["config"]
    assert config["method"] == "lora" and config["lora_r"] == 16 and config["max_steps"] == 300


def test_pass_requests_nothing(instance):
    verdict(instance, passed=True, attempt=1, escalation=None)
    result, _ = tick(instance)
    assert not result.run_requests
    assert "verdict pass" in result.skip_reason.skip_message


def test_same_verdict_twice_gives_one_run(instance):
    verdict(
        instance,
        passed=False,
        attempt=1,
        escalation={"attempt": 2, "sft_adapter": {"method": "full"}},
    )
    first, cursor = tick(instance)
    assert len(first.run_requests) == 1
    second, _ = tick(instance, cursor)
    assert isinstance(second, dg.SkipReason) and "no new verdict" in second.skip_message


def test_cap_holds_when_attempts_are_spent(instance):
    verdict(instance, passed=False, attempt=3, escalation=None, max_attempts=3)
    result, _ = tick(instance)
    assert not result.run_requests
    assert "budget of 3 attempts is spent" in result.skip_reason.skip_message


def test_cap_holds_even_if_an_escalation_is_offered_past_it(instance):
    verdict(
        instance,
        passed=False,
        attempt=2,
        max_attempts=2,
        escalation={"attempt": 3, "sft_adapter": {"method": "full"}},
    )
    result, _ = tick(instance)
    assert not result.run_requests


def test_next_escalation_walks_the_ladder(use_case):
    from lifecycle_dagster.defs.evaluation.assets import next_escalation

    first = next_escalation(use_case, 1, {"max_steps": 150})
    assert first == {
        "attempt": 2,
        "sft_adapter": {"method": "lora", "lora_r": 16, "max_steps": 300},
    }
    second = next_escalation(use_case, 2, {"max_steps": 300})
    assert second["attempt"] == 3 and second["sft_adapter"]["method"] == "full"
    assert next_escalation(use_case, 3, {}) is None
