"""Feedback closes the loop: past the use case's `feedback.min_new` new ratings, the feedback
sensor records a new version of `user_feedback` and re-runs the preference data, which takes in
the pairs the feedback makes (declarative automation carries it on: tests/dagster/
test_data_trigger.py shows the chain below the preference data)."""

import dagster as dg

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.ml.data import read_rows
from lifecycle_dagster.ml.feedback import FeedbackStore, Response
from lifecycle_dagster.ml.usecase_loader import load_use_case

UC = "dialogue_summarisation"


def test_feedback_past_the_threshold_reruns_the_preference_data(tmp_path, monkeypatch):
    from lifecycle_dagster.defs.automation.automation import feedback_sensor

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    monkeypatch.setenv("LIFECYCLE_FEEDBACK_URL", url)
    uc = load_use_case(profile="tiny")
    assert uc.feedback.min_new == 4
    d = defs()
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("use_cases", [UC])
        job = d.resolve_job_def("lifecycle_job")
        config = {"ops": {"use_case": {"config": {"profile": "tiny"}}}}
        keys = [dg.AssetKey(k) for k in ("use_case", "preference_dataset")]
        job.execute_in_process(
            instance=instance, partition_key=UC, asset_selection=keys, run_config=config
        )

        def tick(cursor=None):
            return feedback_sensor(
                dg.build_sensor_context(instance=instance, cursor=cursor, definitions=d)
            )

        # Users rate two answers to each of two training dialogues (never an eval input: the
        # leakage check would stop them), one good and one bad each.
        store = FeedbackStore(url)
        dialogues = [r["dialogue"] for r in read_rows(uc.data.train)[:2]]
        for i, dialogue in enumerate(dialogues):
            for verdict, text in ((1, f"A faithful summary {i}."), (-1, f"Nonsense {i}.")):
                rid = f"chatcmpl-{i}-{verdict}"
                store.record_response(Response(rid, uc.name, "m", "1", "chat", dialogue, "p", text))
                if (i, verdict) != (1, -1):
                    store.add_rating(rid, verdict)
        waiting = tick()
        assert not waiting.run_requests and not waiting.asset_events
        assert f"{UC}: 3/4 new" in waiting.skip_reason.skip_message

        store.add_rating("chatcmpl-1--1", -1)
        due = tick(waiting.cursor)
        (request,) = due.run_requests
        assert request.asset_selection == [dg.AssetKey("preference_dataset")]
        assert request.partition_key == UC
        assert "4 new feedback" in request.tags["lifecycle/reason"]
        (event,) = due.asset_events
        assert event.asset_key == dg.AssetKey("user_feedback") and event.partition == UC
        assert event.metadata["new"].value == 4
        assert not tick(due.cursor).run_requests  # nothing new since

        before = instance.get_latest_materialization_event(dg.AssetKey("preference_dataset"))
        before = before.asset_materialization.metadata
        result = job.execute_in_process(
            instance=instance,
            partition_key=UC,
            asset_selection=[dg.AssetKey("preference_dataset")],
            run_config=config,
        )
        assert result.success
        after = result.asset_materializations_for_node("preference_dataset")[0].metadata
        assert after["feedback_pairs"].value == 2
        assert after["train_pairs"].value == before["train_pairs"].value + 2
        assert after["feedback_seq"].value == 4
        checks = result.get_asset_check_evaluations()
        assert checks and all(c.passed for c in checks)
