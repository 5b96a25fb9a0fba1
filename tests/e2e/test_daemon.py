"""The re-adaptation loop in a running deployment: `dagster dev` (webserver + daemon) on a temporary
DAGSTER_HOME with the project's dagster.yaml, the sensor on, attempt 1 submitted over GraphQL.

Attempt 1 (tiny profile, ROUGE-L >= 0.6) falls short; the daemon's sensor tick launches attempt 2
(LoRA r16, twice the steps) from the queue; it passes; no further run follows. Every process the
test started is stopped.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import requests

from lifecycle_dagster.resources.artifacts import records_of

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 600
OVERRIDES = {"evaluation": {"thresholds": {"rouge_l": {"min": 0.6}}}}
UC = "dialogue_summarisation"  # the use case, hence the partition


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluations(instance) -> list[dict]:
    records = records_of(instance, "evaluation", UC, limit=20)
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


def wait_for(what: str, predicate, proc, deadline: float, log: Path):
    while True:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited while waiting for {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(2)


@pytest.fixture
def deployment(tmp_path):
    home = tmp_path / "dagster"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    state = tmp_path / "state"
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "LIFECYCLE_HOME": str(state)}
    log = tmp_path / "dagster-dev.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: dev, webserver, daemon, code server
        )
    try:
        yield {"home": home, "port": port, "proc": proc, "log": log}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        # Every process of the deployment (webserver, daemon, code server, run workers) is gone.
        leftover = group_members(proc.pid)
        give_up = time.monotonic() + 30
        while leftover and time.monotonic() < give_up:
            time.sleep(0.5)
            leftover = group_members(proc.pid)
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
        assert not leftover, f"still running 30 s after SIGTERM: {leftover}"


def wait_for_webserver(deployment, deadline: float) -> None:
    port = deployment["port"]

    def up():
        try:
            return requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok
        except requests.ConnectionError:
            return False

    wait_for("the webserver", up, deployment["proc"], deadline, deployment["log"])


def group_members(pgid: int) -> list[str]:
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=,args=", "-g", str(pgid)], capture_output=True, text=True
    ).stdout
    # Zombies are gone already; they only wait for their parent to read their status.
    return [line.strip() for line in out.splitlines() if line.split()[1:2] != ["Z"]]


def test_daemon_escalates_a_shortfall_once_and_stops(deployment):
    from dagster_graphql import DagsterGraphQLClient

    proc, log, port = deployment["proc"], deployment["log"], deployment["port"]
    deadline = time.monotonic() + DEADLINE_S
    wait_for_webserver(deployment, deadline)
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    instance = dg.DagsterInstance.from_config(str(deployment["home"]))
    instance.add_dynamic_partitions("use_cases", [UC])  # what `lifecycle run` does first
    first = client.submit_job_execution(
        "lifecycle_job",
        run_config={"ops": {"use_case": {"config": {"profile": "tiny", "overrides": OVERRIDES}}}},
        tags={"lifecycle/profile": "tiny", "dagster/partition": UC},
    )

    # 1. Attempt 1 runs from the queue and evaluation records a failed verdict.
    def verdict_of_first():
        found = next((e for e in evaluations(instance) if e["run_id"] == first), None)
        run = instance.get_run_by_id(first)
        if found is None and run is not None and run.is_finished:
            pytest.fail(
                f"attempt 1 ended {run.status} without a verdict:\n{log.read_text()[-6000:]}"
            )
        return found

    failed = wait_for("the failed verdict of attempt 1", verdict_of_first, proc, deadline, log)
    assert failed["verdict"] == "fail" and failed["attempt"] == 1
    assert "rouge_l" in failed["failed_metrics"]

    # 2. The daemon's sensor tick launches the escalated attempt, tagged with why.
    def escalated():
        runs = instance.get_runs(dg.RunsFilter(tags={"lifecycle/attempt": "2"}))
        return runs[0] if runs else None

    second = wait_for("the escalated run", escalated, proc, deadline, log)
    assert second.job_name == "adaptation_job"
    assert second.tags["dagster/sensor_name"] == "readaptation_sensor"
    assert second.tags["lifecycle/verdict_run"] == first
    assert second.tags["dagster/partition"] == UC
    assert "attempt 1 failed rouge_l" in second.tags["lifecycle/reason"]
    sft = second.run_config["ops"]["sft_adapter"]["config"]
    assert sft["lora_r"] == 16

    # 3. It passes.
    done = wait_for(
        "attempt 2 to finish",
        lambda: (r := instance.get_run_by_id(second.run_id)) and r.is_finished and r,
        proc,
        deadline,
        log,
    )
    assert done.status == dg.DagsterRunStatus.SUCCESS, log.read_text()[-4000:]
    passed = evaluations(instance)[-1]
    assert passed["run_id"] == second.run_id
    assert passed["verdict"] == "pass" and passed["attempt"] == 2

    # 4. No further run: the sensor ticks again and says why it skipped.
    def ticked_after_pass():
        ticks = sensor_ticks(instance, "readaptation_sensor")
        return next(
            (t for t in ticks if "verdict pass at attempt 2" in (t.skip_reason or "")), None
        )

    tick = wait_for("a sensor tick after the pass", ticked_after_pass, proc, deadline, log)
    assert tick.status.value == "SKIPPED"
    runs = instance.get_runs()
    assert len(runs) == 2, [(r.job_name, r.tags) for r in runs]
    # The timeline, for whoever reads the log (seconds after attempt 1 was submitted).
    records = {r.dagster_run.run_id: r for r in instance.get_run_records()}
    t0 = records[first].create_timestamp.timestamp()
    timeline = {}
    for label, run_id in (("attempt 1", first), ("attempt 2", second.run_id)):
        r = records[run_id]
        timeline[f"{label} queued"] = r.create_timestamp.timestamp() - t0
        timeline[f"{label} started"] = r.start_time - t0
        timeline[f"{label} ended"] = r.end_time - t0
    timeline["skip tick"] = tick.timestamp - t0
    print(
        json.dumps(
            {
                "runs": [r.job_name for r in runs],
                "timeline_s": {
                    k: round(v, 1) for k, v in sorted(timeline.items(), key=lambda x: x[1])
                },
                "skip": tick.skip_reason,
            }
        )
    )


FAST = {
    "adaptation": {"max_steps": 60},
    "reward": {"max_steps": 20},
    "alignment": {"max_steps": 4},
    "evaluation": {
        "max_examples": 16,
        "thresholds": {"primary": {"min": 0.0}, "format_ok": {"min": 0.0}},
    },
    "prompting": {"shots": [0]},
    "compression": {"check_prompts": 2, "variants": ["fp32", "int8"]},
}


def test_two_use_cases_launched_at_once_keep_to_their_own_artifacts(deployment):
    """Two partitions (a summarisation and a classification) submitted together run side by side
    under the daemon; every artifact, registered model and champion is each use case's own."""
    from dagster_graphql import DagsterGraphQLClient

    from lifecycle_dagster.resources.registry import registered_name

    proc, log, port = deployment["proc"], deployment["log"], deployment["port"]
    deadline = time.monotonic() + DEADLINE_S
    wait_for_webserver(deployment, deadline)
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    instance = dg.DagsterInstance.from_config(str(deployment["home"]))
    names = {UC: None, "dialogue_intent": "dialogue_intent"}
    instance.add_dynamic_partitions("use_cases", list(names))
    runs = {}
    for name, packaged in names.items():
        config = {
            "profile": "tiny",
            "overrides": FAST,
            **({"use_case": packaged} if packaged else {}),
        }
        runs[name] = client.submit_job_execution(
            "lifecycle_job",
            # One process per run (not per step): the test is about the two runs, not step isolation.
            run_config={
                "ops": {"use_case": {"config": config}},
                "execution": {"config": {"in_process": {}}},
            },
            tags={"lifecycle/profile": "tiny", "dagster/partition": name},
        )

    def both_finished():
        found = [instance.get_run_by_id(r) for r in runs.values()]
        return all(r is not None and r.is_finished for r in found) and found

    finished = wait_for("both runs", both_finished, proc, deadline, log)
    for run in finished:
        assert run.status == dg.DagsterRunStatus.SUCCESS, log.read_text()[-4000:]
    stats = {n: instance.get_run_stats(r) for n, r in runs.items()}
    first, second = stats.values()
    assert first.start_time < second.end_time and second.start_time < first.end_time  # overlap

    state = deployment["home"].parent / "state"
    metric = {UC: "rouge_l", "dialogue_intent": "accuracy"}
    for name, run_id in runs.items():
        for asset in ("task_dataset", "sft_adapter", "aligned_model", "evaluation", "onnx_model"):
            record = records_of(instance, asset, name, limit=1)[0]
            assert record.run_id == run_id
            meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            path = Path(str(meta["artifact_path"]))
            assert path.parent == state / "artifacts" / name / asset
        evaluation = records_of(instance, "evaluation", name, limit=1)[0]
        meta = {k: v.value for k, v in evaluation.asset_materialization.metadata.items()}
        assert metric[name] in meta and str(meta["candidate_path"]).startswith(
            str(state / "artifacts" / name)
        )
    client_ml = mlflow.tracking.MlflowClient(f"sqlite:///{state / 'mlflow.db'}")
    for name in runs:
        for kind in ("aligned", "onnx"):
            versions = client_ml.search_model_versions(f"name = '{registered_name(name, kind)}'")
            champion = client_ml.get_model_version_by_alias(registered_name(name, kind), "champion")
            assert [v.version for v in versions] == [champion.version]  # one run, one version
            assert f"/artifacts/{name}/" in champion.source  # its own artifact, not the other's
