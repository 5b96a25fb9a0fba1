"""The experiment's coordinates: one partition per use case, the run tags of an attempt, and the
automation condition every downstream asset follows. Light: sensors import it (no torch, no ml/)."""

import warnings

import dagster as dg

ATTEMPT_TAG = "lifecycle/attempt"
REASON_TAG = "lifecycle/reason"
PROFILE_TAG = "lifecycle/profile"
USE_CASE_TAG = "lifecycle/use_case"
STARTED_TAG = "lifecycle/started_at"  # epoch seconds attempt 1 of the experiment started
VERDICT_RUN_TAG = "lifecycle/verdict_run"  # the Dagster run whose failed verdict this escalates
OWNERS = ["team:ml-platform"]

# One partition per use case: each experiment keeps its own lineage and materialization history,
# and two use cases in one deployment never read each other's artifacts. A partition is added
# when a use case is first launched (`lifecycle run`, or "Add partition" in the UI); attempts
# within it are runs tagged with ATTEMPT_TAG.
USE_CASES = dg.DynamicPartitionsDefinition(name="use_cases")


def use_case_check(name: str, asset: str, **kwargs) -> dg.AssetCheckSpec:
    """A check of a use case's asset, recorded and judged per use case (partition). A check
    without partitions has one latest result for every use case: two use cases writing the same
    asset side by side then read each other's result, so one's failed gate could let the other's
    graph run on, and one's passed gate could stop the other's for good. (Partitioned checks are a
    Dagster preview: its warning is silenced here, the one place they are made.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(name, asset=asset, partitions_def=USE_CASES, **kwargs)


# Downstream of the data: re-run when an upstream asset is updated (new data, a new base model),
# never while one is missing or in progress, and never past an upstream blocking check that failed.
# Assets that need dynamic config (the escalated attempts) are launched by the re-adaptation sensor.
def follows_upstream(*ignoring: str) -> dg.AutomationCondition:
    """Re-run when an upstream asset (other than ``ignoring``) is updated, never while one is
    missing or in progress, and never past an upstream blocking check that failed."""
    updated = dg.AutomationCondition.any_deps_updated()
    if ignoring:
        updated = updated.ignore(dg.AssetSelection.assets(*ignoring))
    return (
        updated.since_last_handled()
        & ~dg.AutomationCondition.any_deps_missing()
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
        & dg.AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("follows upstream")


FOLLOWS_UPSTREAM = follows_upstream()
