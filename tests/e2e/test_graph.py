"""The whole tiny lifecycle, materialized in a temporary Dagster instance with a temporary MLflow
store; then bad input, a second use case and prompt tuning. (The re-adaptation loop runs under the
real daemon in ``test_deployment.py``; the sensor's decisions are in ``tests/dagster``.)

Every scenario owns its use case, hence its partition (and its MLflow experiment and registered
models, both named after the use case): the read-only tests share the module's `lifecycle_run` of
dialogue_summarisation, which nothing else writes to, so each test passes alone and in any order."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lifecycle_dagster import settings
from lifecycle_dagster.definitions import defs
from lifecycle_dagster.ml.artifacts import verify
from lifecycle_dagster.resources.artifacts import records_of

UC = "dialogue_summarisation"  # the use case, hence the partition, of `lifecycle_run`
BAD_DATA = "summaries_bad_data"  # the bad-data scenario's own use case
ASSETS = [
    "use_case",
    "knowledge_index",
    "task_dataset",
    "preference_dataset",
    "base_model",
    "prompt_baseline",
    "sft_adapter",
    "reward_model",
    "aligned_model",
    "evaluation",
    "distilled_model",
    "onnx_model",
    "champion_model",
    "lifecycle_report",
]


@pytest.fixture(scope="module")
def definitions():
    return defs()


@pytest.fixture(scope="module")
def instance(tmp_path_factory):
    with dg.DagsterInstance.local_temp(
        str(tmp_path_factory.mktemp("dagster")), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        inst.add_dynamic_partitions("use_cases", [UC])
        yield inst


@pytest.fixture(scope="module")
def lifecycle_run(definitions, instance):
    job = definitions.resolve_job_def("lifecycle_job")
    result = job.execute_in_process(
        instance=instance,
        partition_key=UC,
        raise_on_error=False,
        run_config={"ops": {"use_case": {"config": {"profile": "tiny"}}}},
    )
    return result


def tiny_config(overrides: str = "{}", **config) -> dict:
    """Run config for the use_case asset on the tiny profile; ``overrides`` is written as YAML."""
    use_case = {"profile": "tiny", "overrides": yaml.safe_load(overrides), **config}
    return {"ops": {"use_case": {"config": use_case}}}


def latest(instance, asset: str, use_case: str = UC):
    return records_of(instance, asset, use_case, limit=1)[0]


def meta(instance, asset: str, use_case: str = UC) -> dict:
    record = latest(instance, asset, use_case)
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def latest_storage_id(instance, asset: str, use_case: str = UC) -> int:
    return latest(instance, asset, use_case).storage_id


def test_every_asset_materialized_and_every_check_passed(lifecycle_run):
    assert lifecycle_run.success
    done = {
        e.materialization.asset_key.to_user_string()
        for e in lifecycle_run.get_asset_materialization_events()
    }
    assert done == set(ASSETS)
    checks = {
        f"{c.asset_key.to_user_string()}:{c.check_name}": c.passed
        for c in lifecycle_run.get_asset_check_evaluations()
    }
    assert len(checks) == 14  # retrieval_finds_answers passes where there is no retrieval
    assert all(checks.values()), checks


def test_artifacts_are_complete_and_versioned(lifecycle_run, instance):
    for asset in ASSETS:
        materialization = latest(instance, asset).asset_materialization
        m = {k: v.value for k, v in materialization.metadata.items()}
        manifest = verify(Path(m["artifact_path"]))
        assert Path(m["artifact_path"]).parent == settings.artifacts_root() / UC / asset
        assert materialization.tags["dagster/data_version"] == manifest["version"]
        assert m["mlflow_run"].startswith("http://127.0.0.1:5000/#/experiments/")
    assert not list(settings.artifacts_root().rglob(".tmp-*"))


def test_evaluation_suite_scores_every_metric(lifecycle_run, instance, use_case):
    m = meta(instance, "evaluation")
    for metric in ("rouge1", "rouge2", "rouge_l", "bleu", "mean_reward", "perplexity", "harmless"):
        assert isinstance(m[metric], float), metric
        assert f"sft_{metric}" in m and f"base_{metric}" in m, metric
    assert 0 < m["bleu"] <= 1 and 0 <= m["harmless"] <= 1
    assert m["rouge1"] >= m["rouge_l"] >= m["rouge2"]
    assert m["format_ok"] > 0 and m["length_ok"] > 0
    assert m["suite"].startswith(use_case.evaluation.suite.version + "-")
    assert m["vs_champion"] == "no champion yet" and m["regressed"] is False
    rows = [
        json.loads(line)
        for line in (Path(m["artifact_path"]) / "per_example.jsonl").read_text().splitlines()
    ]
    aligned = [r for r in rows if r["model"] == "aligned"]
    assert len(aligned) == use_case.evaluation.max_examples
    assert {"rouge1", "rouge2", "rouge_l", "bleu", "harmless", "format_ok", "reward"} <= set(
        aligned[0]
    )


def test_stages_moved_metrics_the_right_way(lifecycle_run, instance):
    base = meta(instance, "base_model")
    assert base["pretrain_loss_end"] < base["pretrain_loss_start"]
    sft = meta(instance, "sft_adapter")
    assert sft["loss_end"] < sft["loss_start"]
    assert sft["rouge_l_after"] > meta(instance, "prompt_baseline")["best_rouge_l"]
    assert 0 < sft["trainable_fraction"] < 0.5
    assert meta(instance, "reward_model")["pairwise_accuracy"] >= 0.7
    summary = json.loads(
        (Path(meta(instance, "evaluation")["artifact_path"]) / "summary.json").read_text()
    )
    results = summary["results"]
    assert set(results) == {"base", "prompt_baseline", "sft", "aligned"}
    assert results["aligned"]["mean_reward"] >= results["sft"]["mean_reward"]
    # GRPO raised the reward it optimises; the attempt's candidate is whichever of the SFT and
    # the aligned model scored the better ROUGE-L, and evaluation scored that one.
    aligned = meta(instance, "aligned_model")
    assert aligned["reward_after"] > aligned["reward_before"]
    better = "aligned" if aligned["rouge_l_after"] >= aligned["rouge_l_before"] else "sft"
    assert aligned["candidate"] == better, aligned["candidate_reason"]
    assert results["aligned"]["rouge_l"] == pytest.approx(
        max(aligned["rouge_l_after"], aligned["rouge_l_before"]), abs=0.02
    )
    assert results["sft"]["rouge_l"] > results["base"]["rouge_l"]
    assert summary["passed"] is True
    assert "| model |" in meta(instance, "evaluation")["comparison"]


def test_adapter_and_aligned_model_load_and_generate(lifecycle_run, instance, runtime, use_case):
    from lifecycle_dagster.ml.data import format_prompt
    from lifecycle_dagster.ml.evaluate import generate
    from lifecycle_dagster.ml.models import load_causal_lm, load_tokenizer
    from lifecycle_dagster.ml.sft import load_sft

    base = Path(meta(instance, "base_model")["artifact_path"]) / "model"
    adapter = Path(meta(instance, "sft_adapter")["artifact_path"]) / "adapter"
    aligned = Path(meta(instance, "aligned_model")["artifact_path"]) / "model"
    prompt = [
        format_prompt(
            use_case,
            "#Person1#: Hi, I need a table for two on Friday at 7 pm.\n"
            "#Person2#: Certainly. Your name?\n#Person1#: Anna.",
        )
    ]
    loaded = (
        load_sft(base, adapter, runtime),
        (load_causal_lm(aligned, runtime), load_tokenizer(aligned)),
    )
    for model, tok in loaded:
        text = generate(model, tok, prompt, max_new_tokens=16)[0]
        assert len(text.split()) >= 3, text


def test_onnx_artifact_runs_in_onnxruntime_and_matches(lifecycle_run, instance, use_case):
    from lifecycle_dagster.ml.data import format_prompt
    from lifecycle_dagster.ml.models import load_tokenizer
    from lifecycle_dagster.ml.runtimes import GenaiGenerator

    m = meta(instance, "onnx_model")
    checks = {
        c.check_name: c.passed
        for c in lifecycle_run.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == "onnx_model"
    }
    assert checks == {
        "fp32_matches_pytorch": True,
        "kv_cache_in_use": True,
        "within_quality_budget": True,
    }
    assert m["selected_variant"] in {"fp32", "int8", "int4"}
    assert m["max_abs_logit_diff_fp32"] < 1e-3
    assert m["rouge_l_drop"] <= use_case.compression.max_metric_drop + 1e-9
    # Scored on the whole split (the evaluation scored its first 48), hence judged against the
    # fp32 export on the same 80 rows: fp32 loses nothing against itself.
    assert use_case.evaluation.max_examples < use_case.compression.eval_examples == 80
    assert m["scored_examples"] == 80 and m["judged_against"] == "fp32 on 80 eval rows"
    selected = json.loads((Path(m["artifact_path"]) / "selected.json").read_text())
    assert selected["reference_source"] == "fp32" and selected["examples"] == 80
    assert selected["variants"]["fp32"]["rouge_l_drop"] == 0.0
    fp32_score = selected["variants"]["fp32"]["rouge_l"]
    assert m["reference_rouge_l"] == pytest.approx(fp32_score, abs=1e-4)
    assert m["size_ratio"] > 1 and m["onnx_bytes"] < m["pytorch_bytes"]
    assert set(selected["variants"]) == {"fp32", "int8", "int4"}
    deploy = Path(m["deploy_path"])
    tok = load_tokenizer(Path(meta(instance, "aligned_model")["artifact_path"]) / "model")
    ids = tok(
        format_prompt(use_case, "#Person1#: My router is broken.\n#Person2#: Try restarting it."),
        add_special_tokens=False,
    )["input_ids"]
    tokens = GenaiGenerator(deploy, 1).generate(ids, 12)
    assert tokens and tok.decode(tokens).strip()


def test_registry_holds_candidate_and_champion(lifecycle_run, instance):
    from lifecycle_dagster.resources.registry import ModelRegistry

    registry = ModelRegistry(settings.mlflow_uri())
    onnx, aligned = meta(instance, "onnx_model"), meta(instance, "aligned_model")
    for name, version in (
        (onnx["registered_model"], onnx["registered_version"]),
        (aligned["registered_model"], aligned["registered_version"]),
    ):
        assert registry.aliases(name) == {"candidate": version, "champion": version}
        mv = registry.by_alias(name, "champion")
        assert mv.tags["dagster.run_id"] == lifecycle_run.run_id
        assert mv.tags["promotion"].endswith("first champion")
        assert "metric.rouge_l" in mv.tags
    assert meta(instance, "champion_model")["onnx_champion"] == onnx["registered_version"]
    # The ONNX artifact is promoted with the aligned model it was exported from.
    onnx_champion = registry.by_alias(onnx["registered_model"], "champion")
    assert onnx_champion.tags["promotion"] == (
        f"follows {aligned['registered_model']} v{aligned['registered_version']}: first champion"
    )


def test_serve_answers_with_the_champion(lifecycle_run, instance, tmp_path):
    """`lifecycle serve` loads the champion from the registry and answers an OpenAI client with
    what the evaluation of the deployed variant scored."""
    import socket
    import subprocess
    import sys
    import time

    import requests
    from openai import OpenAI

    from lifecycle_dagster.ml.compress import EVALUATED_FILE

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = Path(sys.executable).parent / "lifecycle"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(cli), "serve", "--profile", "tiny", "--port", str(port), "--no-tracing"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/ready", timeout=10).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # still starting
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.5)
        onnx = meta(instance, "onnx_model")
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        (card,) = client.models.list().data
        assert card.id == onnx["registered_model"]
        assert card.version == onnx["registered_version"]
        assert card.variant == onnx["selected_variant"]
        folder = Path(onnx["artifact_path"]) / onnx["selected_variant"]
        row = json.loads((folder / EVALUATED_FILE).read_text().splitlines()[0])
        answer = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": row["input"]}]
        )
        assert answer.choices[0].message.content == row["prediction"]
        assert answer.model_version == onnx["registered_version"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlflow_reads_as_attempts_with_stage_runs_nested(lifecycle_run):
    client = MlflowClient(settings.mlflow_uri())
    exp = client.get_experiment_by_name(UC)
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`dagster.run_id` = '{lifecycle_run.run_id}' and tags.`lifecycle.stage` != ''",
    )
    (attempt,) = [r for r in runs if r.data.tags["lifecycle.stage"] == "lifecycle_run"]
    by_stage = {r.data.tags["lifecycle.stage"]: r for r in runs if r is not attempt}
    assert sorted(by_stage) == sorted(ASSETS) and len(runs) == len(ASSETS) + 1
    for stage, run in by_stage.items():
        assert run.info.status == "FINISHED"
        assert "duration_s" in run.data.metrics, stage
        assert run.data.tags["dagster.asset_key"] == stage
        assert run.data.tags["mlflow.parentRunId"] == attempt.info.run_id, stage
    history = client.get_metric_history(by_stage["sft_adapter"].info.run_id, "train_loss")
    assert len(history) > 10 and history[-1].value < history[0].value
    assert by_stage["evaluation"].data.metrics["aligned.rouge_l"] > 0
    # The attempt's run holds every stage's figures and the verdict: attempts compare in one table.
    assert attempt.info.status == "FINISHED" and attempt.data.tags["lifecycle.attempt"] == "1"
    assert attempt.data.tags["verdict"] in ("pass", "fail", "escalate", "give_up")
    assert attempt.data.metrics["evaluation.rouge_l"] == pytest.approx(
        by_stage["evaluation"].data.metrics["rouge_l"]
    )
    assert "onnx_model.duration_s" in attempt.data.metrics


def test_mlflow_datasets_are_inputs_with_their_digests(lifecycle_run, instance):
    client = MlflowClient(settings.mlflow_uri())
    exp = client.get_experiment_by_name(UC)
    train = Path(meta(instance, "task_dataset")["artifact_path"]) / "train.jsonl"
    digest = verify(train.parent)["files"]["train.jsonl"]["sha256"][:16]
    for stage, context in [("task_dataset", "train"), ("sft_adapter", "train")]:
        (run,) = client.search_runs(
            [exp.experiment_id],
            f"tags.`dagster.run_id` = '{lifecycle_run.run_id}' "
            f"and tags.`lifecycle.stage` = '{stage}'",
        )
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs if i.tags}
        assert inputs[context].name == f"{UC}-train" and inputs[context].digest == digest
        assert json.loads(inputs[context].profile)["num_rows"] == len(
            train.read_text().splitlines()
        )
    (evaluation,) = client.search_runs(
        [exp.experiment_id],
        f"tags.`dagster.run_id` = '{lifecycle_run.run_id}' and tags.`lifecycle.stage` = 'evaluation'",
    )
    assert [i.dataset.name for i in evaluation.inputs.dataset_inputs] == [f"{UC}-eval"]


def test_mlflow_logged_models_carry_metrics_and_back_the_registry(lifecycle_run, instance):
    client = MlflowClient(settings.mlflow_uri())
    exp = client.get_experiment_by_name(UC)
    models = {
        m.name: m
        for m in client.search_logged_models(
            [exp.experiment_id],
            filter_string=f"tags.`dagster.run_id` = '{lifecycle_run.run_id}'",
        )
    }
    assert sorted(models) == sorted(
        f"{UC}-{k}" for k in ("base", "sft", "reward", "aligned", "onnx")
    )
    aligned = models[f"{UC}-aligned"]
    assert aligned.tags["artifact.path"] == str(
        Path(meta(instance, "aligned_model")["artifact_path"]) / "model"
    )
    assert {m.key for m in aligned.metrics} >= {"reward_after", "rouge_l_after"}
    sft = models[f"{UC}-sft"]
    assert {m.key for m in sft.metrics} >= {"loss_end", "rouge_l_after"}
    # The registry's versions point at the logged models.
    from lifecycle_dagster.resources.registry import ModelRegistry

    registry = ModelRegistry(settings.mlflow_uri())
    for kind, asset in [("aligned", "aligned_model"), ("onnx", "onnx_model")]:
        m = meta(instance, asset)
        version = registry.client.get_model_version(m["registered_model"], m["registered_version"])
        logged = models[f"{UC}-{kind}"]
        assert version.tags["logged_model_id"] == logged.model_id == m["mlflow_model_id"]
        assert {"name": m["registered_model"], "version": m["registered_version"]} in json.loads(
            client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]
        )


def test_every_evaluation_is_an_mlflow_genai_evaluation(lifecycle_run, instance):
    """The kind's scorers ran as MLflow code scorers over each model's generations: one
    evaluation run per model, per-example assessments, means equal to the stage's own."""
    client = MlflowClient(settings.mlflow_uri())
    exp = client.get_experiment_by_name(UC)
    m = meta(instance, "evaluation")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{m['mlflow_run_id']}'"
    )
    by_model = {r.data.tags["lifecycle.model"]: r for r in children}
    assert sorted(by_model) == ["aligned", "base", "prompt_baseline", "sft"]
    summary = json.loads((Path(m["artifact_path"]) / "summary.json").read_text())
    per_example = (Path(m["artifact_path"]) / "per_example.jsonl").read_text().splitlines()
    rows = len({json.loads(line)["id"] for line in per_example})
    for model, run in by_model.items():
        for metric in ("rouge_l", "rouge1", "format_ok"):
            assert run.data.metrics[f"{metric}/mean"] == pytest.approx(
                summary["results"][model][metric], abs=1e-3
            ), (model, metric)
        traces = client.search_traces(locations=[exp.experiment_id], run_id=run.info.run_id)
        assert len(traces) == rows
        names = {a.name for a in traces[0].info.assessments}
        assert {"rouge_l", "format_ok"} <= names
    # Linked to the logged model each scored.
    model = client.get_logged_model(meta(instance, "aligned_model")["mlflow_model_id"])
    assert "rouge_l/mean" in {x.key for x in model.metrics}


def test_best_prompt_template_is_in_the_prompt_registry(lifecycle_run, instance):
    uri = settings.mlflow_uri()
    m = meta(instance, "prompt_baseline")
    prompt = MlflowClient(uri, registry_uri=uri).load_prompt(f"prompts:/{UC}-prompt@best")
    assert m["prompt_registry"] == f"prompts:/{UC}-prompt/{prompt.version}"
    assert "{{input}}" in prompt.template
    assert float(prompt.tags["score"]) == pytest.approx(m["best_rouge_l"], abs=1e-6)
    assert prompt.tags["metric"] == "rouge_l"
    assert prompt.format(input="Customer: hi").count("Customer: hi") == 1


def test_bad_data_stops_the_run_before_training_and_keeps_last_good(
    definitions, instance, tmp_path, use_case
):
    """A use case of its own: good data first, then a file with a row missing its summary."""
    name = BAD_DATA
    instance.add_dynamic_partitions("use_cases", [name])
    job = definitions.resolve_job_def("lifecycle_job")
    good = job.execute_in_process(
        instance=instance,
        partition_key=name,
        asset_selection=[dg.AssetKey(k) for k in ("use_case", "task_dataset", "base_model")],
        run_config=tiny_config(f"{{name: {name}}}"),
    )
    assert good.success
    good_task = latest_storage_id(instance, "task_dataset", name)
    good_base = latest_storage_id(instance, "base_model", name)
    data = tmp_path / "data"
    shutil.copytree(use_case.data.train.parent, data)
    lines = (data / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    del row["summary"]
    lines[4] = json.dumps(row)
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    # And a pair whose responses are the same in the preference file.
    pairs = (data / "preferences_train.jsonl").read_text().splitlines()
    pair = json.loads(pairs[2])
    pairs[2] = json.dumps({**pair, "rejected": pair["chosen"]})
    (data / "preferences_train.jsonl").write_text("\n".join(pairs) + "\n")
    layer = tmp_path / "bad.yaml"
    layer.write_text(
        f"data:\n  train: {data / 'train.jsonl'}\n"
        f"  preferences_train: {data / 'preferences_train.jsonl'}\n"
    )
    result = job.execute_in_process(
        instance=instance,
        partition_key=name,
        raise_on_error=False,
        run_config=tiny_config(f"{{name: {name}}}", use_case_file=str(layer)),
    )
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    # Both data assets validate every file, and both refuse them, naming each fault.
    assert sorted(e.step_key for e in failures) == ["preference_dataset", "task_dataset"]
    for failure in failures:
        message = failure.event_specific_data.error.to_string()
        assert f"{data / 'train.jsonl'}:5: field 'summary': missing" in message
        assert f"{data / 'preferences_train.jsonl'}:3: field 'rejected': the same" in message
    ran = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert not ran & {"base_model", "sft_adapter", "reward_model", "aligned_model"}
    assert latest_storage_id(instance, "task_dataset", name) == good_task
    assert latest_storage_id(instance, "base_model", name) == good_base
    verify(Path(meta(instance, "task_dataset", name)["artifact_path"]))
    assert not list(settings.artifacts_root().rglob(".tmp-*"))


def test_a_second_use_case_is_a_partition_of_its_own(lifecycle_run, definitions, instance):
    """Two use cases in one deployment: each is a partition with its own artifacts and history,
    and a use case launched under another's partition is refused."""
    other = "meeting_minutes"
    instance.add_dynamic_partitions("use_cases", [other])
    before = {a: latest_storage_id(instance, a) for a in ("use_case", "task_dataset")}
    job = definitions.resolve_job_def("lifecycle_job")
    tiny = {"ops": {"use_case": {"config": {"profile": "tiny"}}}}
    wrong = job.execute_in_process(
        instance=instance,
        partition_key=other,
        asset_selection=[dg.AssetKey("use_case")],
        run_config=tiny,
        raise_on_error=False,
    )
    assert not wrong.success
    failure = next(e for e in wrong.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.to_string()
    assert f"named '{UC}'" in message and f"partition '{other}'" in message

    tiny["ops"]["use_case"]["config"]["overrides"] = {"name": other}
    job.execute_in_process(
        instance=instance,
        partition_key=other,
        asset_selection=[dg.AssetKey("use_case"), dg.AssetKey("task_dataset")],
        run_config=tiny,
    )
    m = meta(instance, "task_dataset", other)
    assert Path(m["artifact_path"]).parent == settings.artifacts_root() / other / "task_dataset"
    assert meta(instance, "use_case", other)["name"] == other
    # The first use case's history is untouched, and its consumers still resolve its artifacts.
    assert {a: latest_storage_id(instance, a) for a in before} == before
    assert meta(instance, "use_case")["name"] == UC


def test_an_existing_reward_model_is_reused_from_its_directory(
    lifecycle_run, definitions, instance
):
    """A use case of its own aligning against the first use case's reward model, read from a
    local directory: the same model ranks the same held-out pairs the same, and GRPO runs on it."""
    name = "reused_reward"
    instance.add_dynamic_partitions("use_cases", [name])
    trained = Path(meta(instance, "reward_model")["artifact_path"]) / "model"
    result = definitions.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance,
        partition_key=name,
        asset_selection=[dg.AssetKey(a) for a in ASSETS[: ASSETS.index("aligned_model") + 1]],
        run_config=tiny_config(
            f"{{name: {name}, reward: {{source: existing, path: '{trained}'}}}}"
        ),
    )
    assert result.success
    reused = meta(instance, "reward_model", name)
    assert reused["source"] == "existing" and str(trained) in reused["reward"]
    assert reused["pairwise_accuracy"] == pytest.approx(
        meta(instance, "reward_model")["pairwise_accuracy"]
    )
    assert reused["trusted"] == "yes"
    aligned = meta(instance, "aligned_model", name)
    assert aligned["reward_after"] > aligned["reward_before"]


def test_a_prompt_tuned_use_case_runs_through_alignment_export_and_serving(
    lifecycle_run, definitions, instance, use_case
):
    """Prompt tuning as the adaptation: the soft prompt is aligned with, evaluated, exported and
    served (thresholds at zero so that the export follows whatever the tiny model scores)."""
    from lifecycle_dagster.ml.data import format_prompt
    from lifecycle_dagster.ml.models import load_tokenizer
    from lifecycle_dagster.ml.soft_prompt import soft_prompt_ids
    from lifecycle_dagster.serving import ServedModel
    from lifecycle_dagster.serving.engine import Job, run

    name = "soft_prompt_summaries"
    instance.add_dynamic_partitions("use_cases", [name])
    overrides = (
        f"{{name: {name}, adaptation: {{method: prompt_tuning, num_virtual_tokens: 8, "
        "max_steps: 60, learning_rate: 0.03}, prompting: {shots: [0]}, reward: {max_steps: 40}, "
        "alignment: {max_steps: 6}, "
        "compression: {variants: [fp32, int4]}, evaluation: {max_examples: 16, "
        "thresholds: {rouge_l: {min: 0.0}, harmless: {min: 0.0}}}, "
        "readaptation: {ladder: [{adaptation: {method: lora, learning_rate: 0.003}}]}}"
    )
    result = definitions.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance,
        partition_key=name,
        raise_on_error=False,
        run_config=tiny_config(overrides),
    )
    assert result.success
    sft = meta(instance, "sft_adapter", name)
    assert sft["method"] == "prompt_tuning" and sft["num_virtual_tokens"] == 8
    assert sft["loss_end"] < sft["loss_start"] and sft["trainable_fraction"] < 0.01
    aligned = meta(instance, "aligned_model", name)
    assert aligned["soft_prompt_tokens"] == 8
    aligned_tok = load_tokenizer(Path(aligned["artifact_path"]) / "model")
    soft_ids = soft_prompt_ids(aligned_tok)
    assert len(soft_ids) == 8
    summary = json.loads(
        (Path(meta(instance, "evaluation", name)["artifact_path"]) / "summary.json").read_text()
    )
    assert summary["passed"] is True and set(summary["results"]) >= {"sft", "aligned"}
    onnx = meta(instance, "onnx_model", name)
    assert onnx["usable"] is True and onnx["max_abs_logit_diff_fp32"] < 1e-3
    served = ServedModel.from_artifact(Path(onnx["artifact_path"]), name, "1", "candidate")
    dialogue = "#Person1#: Is the bus late?\n#Person2#: Yes, ten minutes."
    prompt = served.chat_prompt([("user", dialogue)])
    (answer,) = run(served, [Job(served.encode(prompt, 12), 12, one_line=True)])
    plain = aligned_tok(format_prompt(use_case, dialogue), add_special_tokens=False)["input_ids"]
    assert answer.prompt_tokens == len(plain) + 8
    assert answer.completion_tokens > 0
    # The first use case is untouched: still LoRA, without a soft prompt.
    assert meta(instance, "sft_adapter")["method"] == "lora"
    assert meta(instance, "aligned_model")["soft_prompt_tokens"] == 0


def test_pruned_and_distilled_students_are_exported_and_weighed(definitions, instance):
    """A 4-block base: distilled_model prunes one block and distils a 2-block student, both move
    toward the aligned teacher; onnx_model exports them beside the teacher's variants, checks and
    scores them alike and shows the trade-off; the policy picks among all of them."""
    name = "summaries_students"
    instance.add_dynamic_partitions("use_cases", [name])
    overrides = (
        f"{{name: {name}, base_model: {{scratch: {{num_layers: 4}}}}, prompting: {{shots: [0]}}, "
        # The teacher as short as still makes one: the students are what this test is about.
        "adaptation: {max_steps: 60}, reward: {max_steps: 40}, alignment: {max_steps: 6}, "
        "distillation: {prune_layers: 1, heal_steps: 10, student_layers: 2, student_steps: 20, "
        "learning_rate: 0.002, examples: 48}, compression: {variants: [fp32, int4], "
        "policy: best_within_budget, max_metric_drop: 1.0, max_reward_drop_pct: 1000000}, "
        "evaluation: {max_examples: 16, thresholds: {rouge_l: {min: 0.0}, harmless: {min: 0.0}}}}"
    )
    result = definitions.resolve_job_def("lifecycle_job").execute_in_process(
        instance=instance,
        partition_key=name,
        raise_on_error=False,
        run_config=tiny_config(overrides),
    )
    assert result.success
    checks = {
        c.check_name: c.passed
        for c in result.get_asset_check_evaluations()
        if c.asset_key.to_user_string() == "distilled_model"
    }
    students = meta(instance, "distilled_model", name)
    kl = {
        n: (students[f"{n}.kl_before"], students[f"{n}.kl_after"]) for n in ("pruned", "distilled")
    }
    assert students["pruned.blocks"] == 3 and students["distilled.blocks"] == 2
    # Two blocks of four carry little of the teacher: distillation closes most of the gap.
    assert kl["distilled"][1] < 0.5 * kl["distilled"][0]
    # The check holds exactly when every student moved toward the teacher (one that training
    # moved away is saved untrained, and the check says so).
    assert checks == {"students_learn": all(after < before for before, after in kl.values())}
    assert "block_influence" in students and "loss_curves" in students
    onnx = meta(instance, "onnx_model", name)
    selected = json.loads((Path(onnx["artifact_path"]) / "selected.json").read_text())
    assert set(selected["variants"]) == {"fp32", "int4", "pruned_int4", "distilled_int4"}
    sizes = {n: row["MB"] for n, row in selected["variants"].items()}
    assert sizes["distilled_int4"] < sizes["pruned_int4"] < sizes["int4"] < sizes["fp32"]
    assert all(row["cache_ok"] for row in selected["variants"].values())
    assert selected["descriptions"]["pruned_int4"].startswith("the pruned student")
    # Every variant is within this generous budget: the policy weighs speed and size alone.
    assert all(row["within_budget"] for row in selected["variants"].values())
    gain = {n: (r["tok_s"] / selected["variants"]["fp32"]["tok_s"]) * (sizes["fp32"] / r["MB"])
            for n, r in selected["variants"].items()}  # fmt: skip
    assert gain[selected["variant"]] >= 0.95 * max(gain.values())  # MB is rounded to kB
    assert "tradeoff" in onnx
