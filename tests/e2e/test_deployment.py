"""The production deployment on real components (see ``tests/servers.py``): PostgreSQL for Dagster
and MLflow, an `mlflow server`, artifacts on an S3-compatible server, and Dagster's code server,
daemon and webserver as separate processes with `deploy/dagster.yaml`. Runs are submitted over
GraphQL, as a platform team's clients would.

1. Two use cases (summarisation and classification, two partitions) submitted at once run side by
   side from the queue: every asset of each is materialized, each keeps to its own artifacts,
   registered models and champion; runs and events are in PostgreSQL, the MLflow records on the
   server, the artifacts on object storage with the registry pointing at them; no two training
   steps (the `train` pool, limit 1) ever overlap although the runs do.
2. The re-adaptation loop under the daemon: attempt 1 (ROUGE-L >= 0.6) falls short, its failed
   gate keeps the candidate from export and promotion, the sensor launches attempt 2 (LoRA r16,
   twice the steps) from the queue, it passes, and no further run follows.
3. New data, nobody launching a run: a changed train file is noticed by the data sensor, automation
   carries the new dataset down the graph, the run training the new adapter loses its processes
   (SIGKILL) halfway; the run is marked failed, retried from the failed step, training resumes from
   its last checkpoint, and the chain ends in a new evaluated candidate and a promotion decision.
4. The Dagster UI of the deployment in Chromium: asset graph, an asset's metadata and loss curve,
   its checks and a run's log render without errors (screenshots in ``.test-output/ui/``).
Every process the deployment started is stopped at the end."""

import json
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest
import requests
from mlflow.tracking import MlflowClient
from servers import BIN, Deployment, free_port, greedy_and_other

from lifecycle_dagster.definitions import defs
from lifecycle_dagster.lib.partitions import REASON_TAG
from lifecycle_dagster.ml.usecase_loader import load_use_case
from lifecycle_dagster.resources.artifacts import records_of
from lifecycle_dagster.resources.registry import ModelRegistry, registered_name

DEADLINE_S = 1800  # a bound, not a speed test: two runs share two loaded cores
# Cheap settings for the two concurrent runs: the test is about the deployment, not the models.
FAST = {
    "base_model": {"scratch": {"steps": 120}},
    "adaptation": {"max_steps": 60},
    "reward": {"max_steps": 20},
    "alignment": {"max_steps": 4},
    "evaluation": {
        "max_examples": 16,
        "thresholds": {"primary": {"min": 0.0}, "format_ok": {"min": 0.0}},
    },
    "prompting": {"shots": [0]},
    "compression": {"check_prompts": 2, "variants": ["fp32", "int8"]},
    "compute": {"checkpoint_steps": 10},
}
USE_CASES = {"dialogue_summarisation": "rouge_l", "dialogue_intent": "accuracy"}
# The re-adaptation loop gets a partition of its own (the use case under another name), so the
# champions of the runs above do not take part in its verdicts.
ESCALATED = "summarisation_escalation"
SHORTFALL = {
    "name": ESCALATED,
    "evaluation": {"thresholds": {"rouge_l": {"min": 0.6}}},
    # Adaptation as the tiny profile has it (the loop is about its rungs); the rest short.
    "prompting": {"shots": [0]},
    "reward": {"max_steps": 30},
    "alignment": {"max_steps": 6},
    "compression": {"check_prompts": 2, "variants": ["fp32", "int8"]},
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = Deployment(tmp_path_factory.mktemp("deployment"))
    try:
        yield d.start()
    finally:
        leftover = d.stop()
        assert not leftover, f"still running after SIGKILL: {leftover}"


@pytest.fixture(scope="module")
def instance(deployment):
    # The test reads the deployment's instance as any Dagster process would (DAGSTER_HOME with
    # deploy/dagster.yaml, credentials from the environment) and its artifacts as a pod would.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in deployment.env.items():
            if key.startswith(("DAGSTER_PG_", "AWS_", "MLFLOW_S3_")):
                mp.setenv(key, value)
        inst = dg.DagsterInstance.from_config(str(deployment.home))
        yield inst
        inst.dispose()


def submit(deployment, instance, partition: str, config: dict | None, job="lifecycle_job") -> str:
    """Launch ``job`` for ``partition`` over GraphQL (``config``: the use_case op's, if the job
    has that op), naming the assets it materializes as the UI's launch buttons do."""
    from dagster_graphql import DagsterGraphQLClient

    instance.add_dynamic_partitions("use_cases", [partition])  # what `lifecycle run` does first
    client = DagsterGraphQLClient("127.0.0.1", port_number=deployment.web_port)
    run_config = {"ops": {"use_case": {"config": {"profile": "tiny", **config}}}} if config else {}
    assets = defs().resolve_job_def(job).asset_layer.executable_asset_keys
    return client.submit_job_execution(
        job,
        run_config=run_config,
        asset_selection=sorted(k.to_user_string() for k in assets),
        tags={"lifecycle/profile": "tiny", "dagster/partition": partition},
    )


def own_data(deployment, use_case: str) -> dict:
    """Overrides pointing the use case at copies of its data files, which a test may change."""
    uc = load_use_case(profile="tiny", use_case=use_case)
    folder = deployment.root / "data" / use_case
    folder.mkdir(parents=True)
    data = {}
    for field, source in uc.data.files().items():
        data[field] = str(shutil.copy(source, folder / Path(source).name))
    return {"data": data}


@pytest.fixture(scope="module")
def two_runs(deployment, instance):
    started = time.monotonic()
    run_ids = {
        uc: submit(
            deployment,
            instance,
            uc,
            {"use_case": uc, "overrides": {**FAST, **own_data(deployment, uc)}},
        )
        for uc in USE_CASES
    }

    def finished():
        runs = [instance.get_run_by_id(r) for r in run_ids.values()]
        return all(r is not None and r.is_finished for r in runs) and runs

    runs = deployment.wait_for("both runs", finished, started + DEADLINE_S, every=5)
    print(f"\ndeployment: both runs ended {time.monotonic() - started:.0f} s after submission")
    for uc, run_id in run_ids.items():  # where the time went, for whoever reads the log
        stats = sorted(instance.get_run_step_stats(run_id), key=lambda s: s.start_time or 0)
        steps = {s.step_key: round((s.end_time or 0) - (s.start_time or 0)) for s in stats}
        print(f"deployment: {uc} step seconds {json.dumps(steps)}")
    return run_ids, runs


def test_two_use_cases_run_side_by_side_from_the_queue(deployment, instance, two_runs):
    run_ids, runs = two_runs
    for run in runs:
        assert run.status == dg.DagsterRunStatus.SUCCESS, deployment.logs()
    expected = set(defs().resolve_asset_graph().materializable_asset_keys)
    for uc, run_id in run_ids.items():
        events = instance.all_logs(run_id)
        done = {
            e.dagster_event.asset_key
            for e in events
            if e.is_dagster_event and e.asset_materialization
        }
        assert expected <= done, (uc, sorted(k.to_user_string() for k in expected - done))
        kinds = {e.dagster_event_type for e in events if e.is_dagster_event}
        assert dg.DagsterEventType.RUN_ENQUEUED in kinds  # through the queue, by the daemon
    first, second = (instance.get_run_stats(r) for r in run_ids.values())
    assert first.start_time < second.end_time and second.start_time < first.end_time  # overlap


def test_each_use_case_keeps_to_its_own_artifacts_on_object_storage(deployment, instance, two_runs):
    """Every artifact is an object under its use case's prefix with its manifest; evaluation
    judged that use case's candidate; each registered model has one version, the champion,
    whose source is that use case's object, and it resolves in a fresh cache."""
    import boto3

    from lifecycle_dagster.ml.objectstore import fetch

    s3, bucket = boto3.client("s3"), deployment.s3.bucket  # endpoint from the environment
    run_ids, _ = two_runs
    client = MlflowClient(deployment.mlflow_url)
    for uc, run_id in run_ids.items():
        prefix = f"s3://{bucket}/store/{uc}/"
        for asset in ("task_dataset", "sft_adapter", "aligned_model", "evaluation", "onnx_model"):
            # This run's materialization (automation may have added a later one, see below).
            records = records_of(instance, asset, uc, limit=10)
            record = next((r for r in records if r.run_id == run_id), None)
            assert record is not None, (uc, asset)
            meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            uri = str(meta["artifact_path"])
            assert uri.startswith(f"{prefix}{asset}/"), uri
            key = uri.removeprefix(f"s3://{bucket}/")
            s3.head_object(Bucket=bucket, Key=f"{key}/MANIFEST.json")
            if asset == "evaluation":
                assert USE_CASES[uc] in meta and str(meta["candidate_path"]).startswith(prefix)
        for kind in ("aligned", "onnx"):
            name = registered_name(uc, kind)
            versions = client.search_model_versions(f"name = '{name}'")
            champion = client.get_model_version_by_alias(name, "champion")
            assert champion.version in [v.version for v in versions]
            for v in versions:  # every version is this use case's own object
                assert v.source.startswith(f"{prefix}{kind}_model/"), v.source
        onnx = client.get_model_version_by_alias(registered_name(uc, "onnx"), "champion")
        local = fetch(onnx.source, deployment.root / "fresh-cache")
        assert (local / "MANIFEST.json").is_file()


def test_runs_events_and_mlflow_records_live_in_the_servers(deployment, two_runs):
    run_ids, _ = two_runs
    assert set(run_ids.values()) <= set(deployment.pg.psql("SELECT run_id FROM runs").split())
    ids = ", ".join(f"'{r}'" for r in run_ids.values())
    events = int(deployment.pg.psql(f"SELECT count(*) FROM event_logs WHERE run_id IN ({ids})"))
    assert events > 200
    client = MlflowClient(deployment.mlflow_url)
    for uc in USE_CASES:
        exp = client.get_experiment_by_name(uc)
        assert exp is not None, uc
        stages = {
            r.data.tags.get("lifecycle.stage") for r in client.search_runs([exp.experiment_id])
        }
        assert {
            "lifecycle_run",
            "sft_adapter",
            "aligned_model",
            "evaluation",
            "onnx_model",
        } <= stages
    # MLflow's own tables are in PostgreSQL too, in their own database.
    assert int(deployment.pg.psql("SELECT count(*) FROM runs", db="mlflow")) >= 20


def test_training_steps_never_overlap_across_runs(instance, two_runs):
    """The runs overlap; their `train` pool steps (limit 1) never do."""
    run_ids, _ = two_runs
    graph = defs().resolve_asset_graph()
    train = {
        k.to_user_string()
        for k in graph.materializable_asset_keys
        if graph.get(k).pools == {"train"}
    }
    spans = []
    for run_id in run_ids.values():
        starts = {}
        for e in instance.all_logs(run_id):
            if not e.is_dagster_event or e.step_key not in train:
                continue
            if e.dagster_event_type == dg.DagsterEventType.STEP_START:
                starts[e.step_key] = e.timestamp
            elif e.dagster_event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                spans.append((starts.pop(e.step_key), e.timestamp, f"{run_id[:8]}:{e.step_key}"))
    assert len(spans) == 2 * len(train), spans
    spans.sort()
    for (_, end, before), (start, _, after) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"{after} started {end - start:.1f} s before {before} ended"


def evaluations(instance) -> list[dict]:
    records = records_of(instance, "evaluation", ESCALATED, limit=20)
    out = []
    for r in sorted(records, key=lambda r: r.storage_id):
        meta = {k: v.value for k, v in r.event_log_entry.asset_materialization.metadata.items()}
        out.append({"run_id": r.run_id, **meta})
    return out


def sensor_ticks(instance, name: str) -> list:
    states = [s for s in instance.all_instigator_state() if s.instigator_name == name]
    if not states:
        return []
    return instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id, limit=10)


def test_daemon_escalates_a_shortfall_once_and_stops(deployment, instance, two_runs):
    deadline = time.monotonic() + DEADLINE_S
    first = submit(
        deployment,
        instance,
        ESCALATED,
        {"use_case": "dialogue_summarisation", "overrides": SHORTFALL},
    )

    # 1. Attempt 1 runs from the queue and evaluation records a failed verdict.
    def verdict_of_first():
        found = next((e for e in evaluations(instance) if e["run_id"] == first), None)
        run = instance.get_run_by_id(first)
        if found is None and run is not None and run.is_finished:
            pytest.fail(f"attempt 1 ended {run.status} without a verdict:\n{deployment.logs()}")
        return found

    failed = deployment.wait_for("the failed verdict of attempt 1", verdict_of_first, deadline)
    assert failed["verdict"] == "fail" and failed["attempt"] == 1
    assert "rouge_l" in failed["failed_metrics"]

    # 2. The daemon's sensor tick launches the escalated attempt, tagged with why.
    in_partition = dg.RunsFilter(tags={"dagster/partition": ESCALATED})

    def escalated():
        runs = instance.get_runs(
            dg.RunsFilter(tags={"dagster/partition": ESCALATED, "lifecycle/attempt": "2"})
        )
        return runs[0] if runs else None

    second = deployment.wait_for("the escalated run", escalated, deadline)
    assert second.job_name == "adaptation_job"
    assert second.tags["dagster/sensor_name"] == "readaptation_sensor"
    assert second.tags["lifecycle/verdict_run"] == first
    assert "attempt 1 failed rouge_l" in second.tags["lifecycle/reason"]
    assert second.run_config["ops"]["sft_adapter"]["config"]["lora_r"] == 16

    # 3. It passes.
    done = deployment.wait_for(
        "attempt 2 to finish",
        lambda: (r := instance.get_run_by_id(second.run_id)) and r.is_finished and r,
        deadline,
    )
    assert done.status == dg.DagsterRunStatus.SUCCESS, deployment.logs()
    passed = evaluations(instance)[-1]
    assert passed["run_id"] == second.run_id
    assert passed["verdict"] == "pass" and passed["attempt"] == 2
    # The failed gate kept attempt 1's candidate from export; attempt 2's was exported.
    exported = {r.run_id for r in records_of(instance, "onnx_model", ESCALATED, limit=20)}
    assert first not in exported and second.run_id in exported
    # In MLflow, attempt 2 is its own parent run, linked to the attempt whose verdict it answers.
    client = MlflowClient(deployment.mlflow_url)
    exp = client.get_experiment_by_name(ESCALATED).experiment_id
    query = f"tags.`dagster.run_id` = '{second.run_id}' and tags.`lifecycle.stage` = 'sft_adapter'"
    sft_run = client.search_runs([exp], query)[0]
    previous = client.get_run(sft_run.data.tags["lifecycle.escalated_from"])
    assert previous.data.tags["dagster.run_id"] == first
    assert previous.data.tags["lifecycle.stage"] == "lifecycle_run"
    attempt = client.get_run(sft_run.data.tags["mlflow.parentRunId"])
    assert attempt.data.tags["lifecycle.stage"] == "lifecycle_run"
    assert attempt.data.tags["lifecycle.attempt"] == "2"
    assert attempt.data.tags["lifecycle.escalated_from"] == previous.info.run_id

    # 4. No further run: the sensor ticks again and says why it skipped.
    def ticked_after_pass():
        ticks = sensor_ticks(instance, "readaptation_sensor")
        return next(
            (t for t in ticks if "verdict pass at attempt 2" in (t.skip_reason or "")), None
        )

    tick = deployment.wait_for("a sensor tick after the pass", ticked_after_pass, deadline)
    assert tick.status.value == "SKIPPED"
    runs = instance.get_runs(in_partition)
    attempts = [r for r in runs if r.job_name in ("lifecycle_job", "adaptation_job")]
    assert [r.run_id for r in attempts] == [second.run_id, first], [
        (r.job_name, r.tags) for r in runs
    ]
    # Runs name the assets they update (the sensor's request, the launch above), so automation
    # never re-requests an asset for a parent updated in the same run.
    others = [r for r in runs if r not in attempts]
    assert not others, [(r.job_name, r.tags, r.asset_selection) for r in others]
    # The timeline, for whoever reads the log (seconds after attempt 1 was submitted).
    records = {r.dagster_run.run_id: r for r in instance.get_run_records(in_partition)}
    t0 = records[first].create_timestamp.timestamp()
    timeline = {}
    for label, run_id in (("attempt 1", first), ("attempt 2", second.run_id)):
        r = records[run_id]
        timeline[f"{label} queued"] = r.create_timestamp.timestamp() - t0
        timeline[f"{label} started"] = r.start_time - t0
        timeline[f"{label} ended"] = r.end_time - t0
    timeline["skip tick"] = tick.timestamp - t0
    ordered = dict(sorted(timeline.items(), key=lambda x: x[1]))
    print(json.dumps({"timeline_s": {k: round(v, 1) for k, v in ordered.items()}}))


def runs_of(instance, partition: str, **tags) -> list:
    return instance.get_runs(dg.RunsFilter(tags={"dagster/partition": partition, **tags}))


def kill_tree(pid: int) -> list[str]:
    """SIGKILL a process and everything it started, as a lost node or an OOM kill would."""
    import psutil

    root = psutil.Process(pid)
    victims = [root, *root.children(recursive=True)]
    names = [" ".join(v.cmdline()[:3]) for v in victims]
    for v in victims:
        v.kill()
    psutil.wait_procs(victims, timeout=30)
    return names


def test_new_data_reaches_a_promotion_decision_through_a_killed_training(
    deployment, instance, two_runs
):
    """Nobody launches a run: the changed train file is noticed, the new dataset carried down the
    graph. The training of the new adapter is killed halfway and resumed by the retry."""
    import boto3

    uc = "dialogue_summarisation"
    deadline = time.monotonic() + DEADLINE_S
    t0 = time.time()
    train = deployment.root / "data" / uc / "train.jsonl"
    rows = train.read_text().splitlines()
    train.write_text("\n".join(rows[:-1]) + "\n")  # one example fewer: new data

    # 1. The data sensor re-materializes the dataset, saying why.
    def data_run():
        runs = runs_of(instance, uc, **{"dagster/sensor_name": "data_change_sensor"})
        return runs[0] if runs else None

    data = deployment.wait_for("the data sensor's run", data_run, deadline)
    assert "train.jsonl changed" in data.tags[REASON_TAG]
    assert data.asset_selection == {dg.AssetKey("task_dataset")}

    # 2. Automation requests the chain below it; its adapter training leaves checkpoints.
    def chain_run():
        runs = runs_of(instance, uc, **{"dagster/sensor_name": "lifecycle_automation"})
        return next((r for r in runs if dg.AssetKey("sft_adapter") in r.asset_selection), None)

    chain = deployment.wait_for("automation's run of the chain", chain_run, deadline)
    assert {"prompt_baseline", "sft_adapter", "evaluation"} <= {
        k.to_user_string() for k in chain.asset_selection
    }
    checkpoints = deployment.state / "checkpoints" / uc / "sft_adapter"

    def a_checkpoint():  # complete: the Trainer writes trainer_state.json last
        found = sorted(checkpoints.glob(f"{chain.run_id}-*/checkpoint-*/trainer_state.json"))
        return found[-1].parent if found else None

    first = deployment.wait_for("a training checkpoint", a_checkpoint, deadline, every=0.2)
    owner = json.loads((first.parent / "owner.json").read_text())

    # 3. The run's process is killed with the training process it started through Dagster Pipes,
    # as a lost node would take both; the run is marked failed and retried from the step. (A lost
    # training process alone is retried within the run: tests/e2e/test_pipes.py.)
    import psutil

    killed = kill_tree(psutil.Process(owner["pid"]).parent().pid)
    killed_at = time.time() - t0
    seen = int(first.name.split("-")[1])
    failed = deployment.wait_for(
        "the killed run to be marked failed",
        lambda: (r := instance.get_run_by_id(chain.run_id)) and r.is_finished and r,
        deadline,
    )
    assert failed.status == dg.DagsterRunStatus.FAILURE
    why = [e.message for e in instance.all_logs(chain.run_id) if e.message]
    assert any("terminated by signal 9 (SIGKILL)" in m for m in why), why[-5:]

    def retry_run():
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": chain.run_id}))
        return runs[0] if runs else None

    retry = deployment.wait_for("the retry", retry_run, deadline)
    assert retry.tags.get("dagster/retry_number") == "1"
    done = deployment.wait_for(
        "the retry to finish",
        lambda: (r := instance.get_run_by_id(retry.run_id)) and r.is_finished and r,
        deadline,
    )
    assert done.status == dg.DagsterRunStatus.SUCCESS, deployment.logs()

    # 4. Training resumed from the killed attempt's checkpoint; nothing of it was published.
    def meta(asset: str) -> dict:
        records = records_of(instance, asset, uc, limit=10)
        record = next((r for r in records if r.run_id == retry.run_id), None)
        assert record is not None, (asset, "not materialized by the retry")
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    sft = meta("sft_adapter")
    assert sft["resumed_from_step"] >= seen, sft["resumed_from_step"]
    assert not list(checkpoints.glob(f"{chain.run_id}-*"))  # trained: checkpoints removed
    s3, bucket = boto3.client("s3"), deployment.s3.bucket
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"store/{uc}/sft_adapter/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert not [k for k in keys if f"-{chain.run_id[:8]}/" in k], "the killed run published"
    assert any(f"-{retry.run_id[:8]}/MANIFEST.json" in k for k in keys)

    # 5. A new evaluated candidate, and a promotion decision on it (in the same run, or in the
    # next one automation asks for once the candidate passed its gate).
    evaluation = meta("evaluation")
    assert evaluation["verdict"] == "pass" and "rouge_l" in evaluation
    assert "rouge_l" in str(evaluation["vs_champion"])  # judged against the standing champion
    evaluated = next(r for r in records_of(instance, "evaluation", uc) if r.run_id == retry.run_id)

    def promotion():
        latest = records_of(instance, "champion_model", uc, limit=1)
        return latest[0] if latest and latest[0].storage_id > evaluated.storage_id else None

    decided = deployment.wait_for("the promotion decision", promotion, deadline)
    champion = decided.asset_materialization.metadata
    decisions = champion["decisions"].value.records
    assert decisions and all("promoted" in d.data for d in decisions)
    records = {r.dagster_run.run_id: r for r in instance.get_run_records()}
    timeline = {"train file changed": 0.0, "training killed": killed_at}
    for label, run_id in (("data run", data.run_id), ("chain", chain.run_id)):
        timeline[f"{label} started"] = records[run_id].start_time - t0
    timeline["retry started"] = records[retry.run_id].start_time - t0
    timeline["retry ended"] = records[retry.run_id].end_time - t0
    timeline["promotion decided"] = decided.event_log_entry.timestamp - t0
    ordered = dict(sorted(timeline.items(), key=lambda x: x[1]))
    print(
        json.dumps(
            {
                "killed": killed,
                "checkpoint_seen": seen,
                "resumed_from_step": sft["resumed_from_step"],
                "timeline_s": {k: round(v, 1) for k, v in ordered.items()},
            }
        )
    )


# Debian's Chromium (`.ci/run` installs it); Playwright's own browser download is never used.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UI_OUT = Path(__file__).resolve().parents[2] / ".test-output" / "ui"
BROKEN = ("Something went wrong", "An unexpected error", "Unexpected GraphQL error")


def test_the_dagster_ui_shows_the_lifecycle(deployment, two_runs):
    """Each page a person checks first, in a real browser: nothing but the deployment is
    reached, no script error, no error panel; the screenshots stay for whoever reviews."""
    from urllib.parse import urlparse

    from playwright.sync_api import expect, sync_playwright

    run_ids, _ = two_runs
    uc = "dialogue_summarisation"
    graph = defs().resolve_asset_graph()
    groups = sorted({graph.get(k).group_name for k in graph.materializable_asset_keys})
    UI_OUT.mkdir(parents=True, exist_ok=True)
    errors, elsewhere = [], []

    def only_loopback(route):
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        elsewhere.append(route.request.url)
        return route.abort()

    def console(msg):
        if msg.type == "error" and "Failed to load resource" not in msg.text:
            errors.append(f"console: {msg.text}")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            page.route("**/*", only_loopback)
            page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}"))
            page.on("console", console)

            def visit(path: str, shot: str, *expected: str) -> None:
                page.goto(f"{deployment.web_url}{path}", wait_until="domcontentloaded")
                for text in expected:  # a loaded machine takes its time over a run's events
                    expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=60_000)
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(UI_OUT / f"{shot}.png"), full_page=True)
                body = page.inner_text("body")
                assert not [b for b in BROKEN if b in body], (path, body[:2000])
                # The first-visit community dialog is off in the instance config (`nux`).
                assert "Join the Dagster community" not in body

            # The asset graph with every stage group.
            visit("/asset-groups", "1-asset-graph", *groups)
            # An asset's latest materialization: its metadata and its loss curve.
            visit(
                f"/assets/sft_adapter?view=events&partition={uc}",
                "2-sft-adapter-metadata",
                "loss_curve",
                "trainable_fraction",
            )
            row = page.locator("tr", has=page.get_by_text("loss_curve", exact=True)).first
            row.get_by_text("[Show Markdown]").click()
            plot = page.get_by_role("dialog").locator("img").first
            plot.wait_for()
            width, height = plot.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert width > 100 and height > 100, "the loss curve did not render"
            page.screenshot(path=str(UI_OUT / "2b-sft-loss-curve.png"))
            page.keyboard.press("Escape")
            # Its checks (evaluation's threshold gate).
            visit("/assets/evaluation?view=checks", "3-evaluation-checks", "meets_thresholds")
            # A run's log.
            run_id = run_ids[uc]
            visit(f"/runs/{run_id}", "4-run-log", "RUN_SUCCESS")
        finally:
            browser.close()
    assert not errors, errors
    print(f"\nUI screenshots in {UI_OUT}; requests kept from leaving the host: {len(elsewhere)}")


def test_a_postgresql_restart_during_a_run_leaves_the_instance_consistent(
    deployment, instance, two_runs
):
    """PostgreSQL restarts while a run evaluates: the run ends, cleanly, as a success or a failure
    that is retried; nothing is left in progress, every step that started ended, and the daemon
    and webserver carry on with the same database."""

    uc = "dialogue_intent"
    deadline = time.monotonic() + DEADLINE_S
    run_id = submit(deployment, instance, uc, None, job="evaluation_job")

    def evaluating():
        return instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)

    deployment.wait_for("evaluation to start", evaluating, deadline, every=0.5)
    time.sleep(2)
    started = time.monotonic()
    deployment.pg.pg_ctl("restart")
    restart_s = time.monotonic() - started

    def settled():
        runs = runs_of(instance, uc)
        ours = [r for r in runs if run_id in (r.run_id, r.tags.get("dagster/root_run_id"))]
        if any(not r.is_finished for r in runs):
            return None
        return ours

    ours = deployment.wait_for("every run of the use case to end", settled, deadline)
    outcome = {r.run_id[:8]: r.status.value for r in ours}
    last = max(ours, key=lambda r: int(r.tags.get("dagster/retry_number", "0")))
    assert last.status == dg.DagsterRunStatus.SUCCESS, (outcome, deployment.logs())
    for r in ours:
        events = [e for e in instance.all_logs(r.run_id) if e.is_dagster_event]
        kinds = [e.dagster_event_type for e in events]
        assert kinds.count(dg.DagsterEventType.RUN_START) == 1, (r.run_id, kinds)
        ends = {dg.DagsterEventType.RUN_SUCCESS, dg.DagsterEventType.RUN_FAILURE}
        assert sum(k in ends for k in kinds) == 1, (r.run_id, kinds)
        started_steps = {e.step_key for e in events if e.dagster_event.is_step_start}
        ended = {
            e.step_key
            for e in events
            if e.dagster_event.is_step_success or e.dagster_event.is_step_failure
        }
        if r.status == dg.DagsterRunStatus.SUCCESS:
            assert started_steps == ended, (r.run_id, started_steps - ended)
    # The instance carries on: daemons heartbeat again, the webserver answers from the database.
    deployment.wait_for(
        "healthy daemons",
        lambda: all(s.healthy for s in instance.get_daemon_statuses().values()),
        deadline,
    )
    # The webserver keeps one pooled connection per storage (Dagster's webserver engines have no
    # pre-ping): after a restart, the first query of each fails once ("server closed the
    # connection unexpectedly", a 500 in the UI) and the pool reconnects. Each answers
    # again within a few requests; the failures are counted, and bounded.
    queries = {
        "runs": "{ runsOrError(limit: 1) { __typename } }",
        "events": '{ assetOrError(assetKey: {path: ["evaluation"]}) '
        "{ ... on Asset { assetMaterializations(limit: 1) { runId } } } }",
        "daemons": "{ instance { daemonHealth { allDaemonStatuses { healthy } } } }",
    }
    failed = {}
    for name, query in queries.items():
        failed[name] = 0
        while True:
            reply = requests.post(
                f"{deployment.web_url}/graphql", json={"query": query}, timeout=60
            )
            if reply.ok and "errors" not in reply.json():
                break
            failed[name] += 1
            assert failed[name] <= 3, (name, reply.status_code, reply.text[:500])
    print(
        json.dumps(
            {
                "postgres_restart_s": round(restart_s, 1),
                "runs": outcome,
                "webserver_failed_requests": failed,
            }
        )
    )


def test_users_feedback_reaches_a_new_reward_model_and_candidate(deployment, instance, two_runs):
    """Users of the deployed champion rate its answers through `lifecycle serve`; nobody launches
    a run: the feedback sensor re-runs the preference data with the pairs the ratings make,
    automation re-trains the reward model on them and re-aligns, and the new candidate is
    evaluated. The reward model's MLflow run says how much feedback it used."""
    from openai import OpenAI

    from lifecycle_dagster.ml.data import read_rows

    uc = "dialogue_summarisation"
    name = registered_name(uc, "onnx")
    deadline = time.monotonic() + DEADLINE_S
    # Another scenario on this use case may still have automation's runs in flight.
    deployment.wait_for(
        "the use case to be idle",
        lambda: all(r.is_finished for r in runs_of(instance, uc)),
        deadline,
    )
    port = free_port()
    deployment.spawn(
        "model-server", [str(BIN / "lifecycle"), "serve", "--model", name, "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    deployment.wait_http("the model server", f"{url}/ready", 180)
    t0 = time.time()
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    champion = ModelRegistry(deployment.mlflow_url).by_alias(name, "champion").version
    rows = read_rows(deployment.root / "data" / uc / "train.jsonl")[:2]
    rated = []
    for row in rows:  # two answers to each of two training dialogues, one rated up, one down
        good, bad = greedy_and_other(client, name, row["dialogue"])
        for answer, rating in ((good, 1), (bad, -1)):
            ack = requests.post(
                f"{url}/v1/feedback", json={"response_id": answer.id, "rating": rating}, timeout=30
            )
            assert ack.status_code == 200, ack.text
            rated.append(answer.model_version)
    posted = time.time() - t0

    # 1. The feedback sensor records user_feedback and re-runs the preference data.
    def feedback_run():
        runs = runs_of(instance, uc, **{"dagster/sensor_name": "feedback_sensor"})
        return runs[0] if runs else None

    run = deployment.wait_for("the feedback sensor's run", feedback_run, deadline)
    assert set(rated) == {str(champion)}  # the answers name the version that gave them
    assert run.asset_selection == {dg.AssetKey("preference_dataset")}
    assert "4 new feedback" in run.tags[REASON_TAG]
    (seen,) = records_of(instance, "user_feedback", uc, limit=5)
    assert seen.asset_materialization.metadata["new"].value == 4

    def prefs():
        records = records_of(instance, "preference_dataset", uc, limit=5)
        return next((r for r in records if r.run_id == run.run_id), None)

    taken = deployment.wait_for("the preference data with the feedback", prefs, deadline)
    assert taken.asset_materialization.metadata["feedback_pairs"].value == 2

    # 2. Automation re-trains the reward model and re-aligns; the candidate is evaluated.
    def after(asset: str):
        def newer():
            records = records_of(instance, asset, uc, limit=5)
            return records[0] if records and records[0].storage_id > taken.storage_id else None

        return newer

    reward = deployment.wait_for("a new reward model", after("reward_model"), deadline)
    aligned = deployment.wait_for("a new aligned model", after("aligned_model"), deadline)
    evaluated = deployment.wait_for("the new candidate evaluated", after("evaluation"), deadline)
    assert evaluated.asset_materialization.metadata["verdict"].value in ("pass", "fail")
    assert run.run_id not in (reward.run_id, aligned.run_id)  # nobody launched them
    mlflow = MlflowClient(deployment.mlflow_url)
    exp = mlflow.get_experiment_by_name(uc).experiment_id
    query = f"tags.`dagster.run_id` = '{reward.run_id}' and tags.`lifecycle.stage` = 'reward_model'"
    (reward_run,) = mlflow.search_runs([exp], query)
    assert reward_run.data.params["feedback.pairs"] == "2"
    timeline = {
        "feedback posted": posted,
        "preference data": taken.event_log_entry.timestamp - t0,
        "reward model": reward.event_log_entry.timestamp - t0,
        "aligned model": aligned.event_log_entry.timestamp - t0,
        "evaluated": evaluated.event_log_entry.timestamp - t0,
    }
    print(json.dumps({"feedback_timeline_s": {k: round(v, 1) for k, v in timeline.items()}}))
