"""The model server as applications use it: `lifecycle serve` on 127.0.0.1, called with the
`openai` client, over the tiny model's ONNX export registered in MLflow (fp32 as version 1, int8
as version 2). Greedy answers equal what evaluation scored; requests that arrive together are
decoded together; a full queue answers 429, a client that goes away stops its decoding; the API
key; schemathesis finds no 5xx; the champion moves under streaming traffic; every answer is an
MLflow trace and feedback on it is stored durably and shows as an assessment."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from servers import free_port, greedy_and_other, in_process

from lifecycle_dagster.ml.compress import EVALUATED_FILE, SELECTED_FILE
from lifecycle_dagster.ml.data import EvalSplit, format_prompt
from lifecycle_dagster.ml.tasks import first_line

NAME = "summaries-onnx"
CLI = Path(sys.executable).parent / "lifecycle"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_base, use_case, rows, runtime):
    """The tiny model exported once (fp32 and int8, evaluated on 8 eval rows); a second
    artifact is the same export with int8 selected."""
    from lifecycle_dagster.ml.compress import CompressConfig, compress, serving_manifest

    evals = rows[1][:8]
    out = tmp_path_factory.mktemp("served") / "v1"
    out.mkdir()
    compress(
        tiny_base,
        out,
        CompressConfig(variants=["fp32", "int8"], max_metric_drop=1.0, policy="fastest"),
        runtime=runtime,
        max_new_tokens=use_case.evaluation.max_new_tokens,
        check_prompts=[format_prompt(use_case, evals[0]["dialogue"])],
        split=EvalSplit(use_case, evals),
        serving=serving_manifest(use_case, tiny_base),
    )
    selected = json.loads((out / SELECTED_FILE).read_text())
    selected["variant"] = "fp32"
    (out / SELECTED_FILE).write_text(json.dumps(selected))
    v2 = out.parent / "v2"
    shutil.copytree(out, v2)
    (v2 / SELECTED_FILE).write_text(json.dumps({**selected, "variant": "int8"}))
    return out, v2


def register(uri: str, name: str, *sources: Path) -> list[str]:
    from lifecycle_dagster.resources.registry import CHAMPION, ModelRegistry

    registry = ModelRegistry(uri)
    versions = [registry.register(name, str(s), run_id=None, tags={}) for s in sources]
    registry.client.set_registered_model_alias(name, CHAMPION, versions[0])
    return versions


class Serve:
    """`lifecycle serve` in a process of its own, on a free loopback port."""

    def __init__(self, home: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        self.env = {
            **os.environ,
            "LIFECYCLE_HOME": str(home),
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
            "LIFECYCLE_FEEDBACK_URL": f"sqlite:///{home / 'feedback.db'}",
            **(env or {}),
        }
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(CLI), "serve", "--port", str(self.port), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if requests.get(f"{self.url}/ready", timeout=10).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # still starting
                pass
            assert time.monotonic() < deadline, f"not ready in 120 s:\n{self.log.read_text()}"
            time.sleep(0.3)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_home")


@pytest.fixture(scope="module")
def server(home, exported):
    register(f"sqlite:///{home / 'mlflow.db'}", NAME, *exported)
    srv = Serve(home, "--model", NAME, "--follow-s", "0")
    yield srv
    srv.stop()


def evaluated(artifact: Path, variant: str = "fp32") -> list[dict]:
    lines = (artifact / variant / EVALUATED_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_the_openai_client_gets_what_evaluation_scored(server, exported, use_case):
    client = server.client()
    (card,) = client.models.list().data
    assert card.id == NAME and card.version == "1" and card.variant == "fp32"
    for row in evaluated(exported[0])[:4]:
        messages = [{"role": "user", "content": row["input"]}]
        chat = client.chat.completions.create(model=NAME, messages=messages)
        assert chat.choices[0].message.content == row["prediction"], row
        assert chat.model == NAME and chat.model_version == "1"
        assert chat.system_fingerprint == f"{NAME}:1:fp32"
        assert chat.usage.completion_tokens > 0 and chat.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model=NAME, messages=messages, stream=True)
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == row["prediction"]
        assert chunks[-1].choices[0].finish_reason == "stop"
        # The raw prompt, continued as it is: its first line is the same answer.
        prompt = format_prompt(use_case, row["input"])
        done = client.completions.create(model=NAME, prompt=prompt)
        assert first_line(done.choices[0].text) == row["prediction"]
        pieces = client.completions.create(model=NAME, prompt=prompt, stream=True)
        assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text


def test_requests_that_arrive_together_are_decoded_together(server, exported):
    client = server.client()
    rows = evaluated(exported[0])
    before = server.metrics()

    def ask(row):
        messages = [{"role": "user", "content": row["input"]}]
        return client.chat.completions.create(model=NAME, messages=messages)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, rows))
    # Padded into one batch, each answer is still the one evaluated alone.
    assert [a.choices[0].message.content for a in answers] == [r["prediction"] for r in rows]
    after = server.metrics()
    batches = after["lifecycle_batch_size_count"] - before.get("lifecycle_batch_size_count", 0)
    alone = after['lifecycle_batch_size_bucket{le="1.0"}'] - before.get(
        'lifecycle_batch_size_bucket{le="1.0"}', 0
    )
    assert batches < len(rows) and alone < batches, (batches, alone)
    assert after['lifecycle_requests_total{route="/v1/chat/completions",status="200"}'] >= 8


def test_bad_requests_get_errors_that_name_the_cause(server):
    import openai

    client = server.client()
    user = [{"role": "user", "content": "#Person1#: Hello?"}]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=user)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="word " * 3000)
    with pytest.raises(openai.BadRequestError, match="ending with a user message"):
        client.chat.completions.create(
            model=NAME, messages=[*user, {"role": "assistant", "content": "x"}]
        )
    cases = {
        "max_tokens": ({"max_tokens": 0}, "max_tokens"),
        "temperature": ({"temperature": 9}, "temperature"),
        "unknown": ({"frequency_penalty": 0.5}, "frequency_penalty"),
        "n": ({"n": 2}, "n"),
    }
    for case, (extra, named) in cases.items():
        body = {"model": NAME, "messages": user, **extra}
        r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 422, (case, r.text)
        assert named in r.json()["error"]["message"], (case, r.text)
    r = requests.post(f"{server.url}/v1/chat/completions", data="not json", timeout=30)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error"


def test_every_answer_is_traced_and_feedback_is_kept_and_assessed(tmp_path, exported):
    """Answers are MLflow traces; a rating and a preference are acknowledged only once stored
    (the server is then SIGKILLed: nothing acknowledged is lost) and show on the traces."""
    from mlflow import MlflowClient

    from lifecycle_dagster.ml.feedback import FeedbackStore

    register(f"sqlite:///{tmp_path / 'mlflow.db'}", NAME, exported[0])
    server = Serve(tmp_path, "--model", NAME, "--follow-s", "0")
    try:
        client = server.client()
        row = evaluated(exported[0])[0]
        greedy, sampled = greedy_and_other(client, NAME, row["input"])
        ack = requests.post(
            f"{server.url}/v1/feedback",
            json={"response_id": greedy.id, "rating": 1, "comment": "accurate"},
            timeout=30,
        )
        assert ack.status_code == 200, ack.text
        pref = requests.post(
            f"{server.url}/v1/feedback",
            json={"chosen_id": greedy.id, "rejected_id": sampled.id},
            timeout=30,
        ).json()
        assert pref["kind"] == "preference" and pref["use_case"] == "dialogue_summarisation"
        unknown = requests.post(
            f"{server.url}/v1/feedback",
            json={"response_id": "chatcmpl-nope", "rating": 1},
            timeout=30,
        )
        assert unknown.status_code == 404 and "chatcmpl-nope" in unknown.json()["error"]["message"]

        uri = server.env["MLFLOW_TRACKING_URI"]
        mlflow = MlflowClient(uri)
        exp = mlflow.get_experiment_by_name("dialogue_summarisation")

        def assessed():
            traces = mlflow.search_traces(
                locations=[exp.experiment_id],
                filter_string=f"tags.`lifecycle.response_id` = '{greedy.id}'",
            )
            if traces and {a.name for a in traces[0].info.assessments} >= {
                "user_rating",
                "user_preference",
            }:
                return traces[0]
            return None

        deadline = time.monotonic() + 60
        while (trace := assessed()) is None:
            assert time.monotonic() < deadline, "no assessed trace within 60 s"
            time.sleep(1)
        assert trace.info.tags["lifecycle.model_version"] == "1"
        assert json.loads(trace.info.response_preview or '""') or trace.data.spans
        rating = next(a for a in trace.info.assessments if a.name == "user_rating")
        assert rating.feedback.value == 1 and rating.source.source_type == "HUMAN"

        # Acknowledged means stored: kill the server outright and read the store.
        server.stop(signal.SIGKILL)
        store = FeedbackStore(server.env["LIFECYCLE_FEEDBACK_URL"])
        assert store.count("dialogue_summarisation") == 2
        (pair,) = store.preference_pairs("dialogue_summarisation")
        assert pair["prompt"] == row["input"]
        assert pair["chosen"] == greedy.choices[0].message.content
        assert pair["rejected"] == sampled.choices[0].message.content
    finally:
        server.stop()


def test_the_champion_moves_under_streaming_traffic(home, exported):
    """Version 2 becomes the champion while clients stream: no request fails, and the answers
    after the switch name version 2."""
    from lifecycle_dagster.resources.registry import CHAMPION, ModelRegistry

    uri = f"sqlite:///{home / 'mlflow.db'}"
    name = "swap-onnx"
    versions = register(uri, name, *exported)
    srv = Serve(home, "--model", name, "--follow-s", "0.5", "--no-tracing")
    try:
        client = srv.client()
        prompt = "#Person1#: Is the bus late?\n#Person2#: Yes, ten minutes."
        seen, failures, stop = [], [], threading.Event()

        def stream_forever():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    chunks = list(
                        client.chat.completions.create(
                            model=name,
                            messages=[{"role": "user", "content": prompt}],
                            stream=True,
                        )
                    )
                    version = chunks[-1].system_fingerprint.split(":")[1]
                    seen.append((started, time.monotonic(), version))
                except Exception as exc:
                    failures.append(repr(exc))

        threads = [threading.Thread(target=stream_forever) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(2)
        ModelRegistry(uri).client.set_registered_model_alias(name, CHAMPION, versions[1])
        deadline = time.monotonic() + 60
        while not seen or seen[-1][2] != versions[1]:
            assert time.monotonic() < deadline, f"still {seen[-1:]} 60 s after the move"
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not failures, failures[:3]
        # A request in flight at the switch ends on the version it started on; one that starts
        # after an answer named version 2 is answered by version 2, and never the other way.
        first_new = min(start for start, _, v in seen if v == versions[1])
        new_seen = min(end for _, end, v in seen if v == versions[1])
        assert {v for _, end, v in seen if end < first_new} == {versions[0]}
        assert {v for start, _, v in seen if start > new_seen} == {versions[1]}
        assert requests.get(f"{srv.url}/health", timeout=10).json()["variant"] == "int8"
    finally:
        srv.stop()


def test_beyond_loopback_the_server_needs_an_api_key(home, exported, server):
    env = {**server.env}
    env.pop("LIFECYCLE_API_KEY", None)
    refused = subprocess.run(
        [str(CLI), "serve", "--model", NAME, "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "LIFECYCLE_API_KEY" in refused.stderr.strip().splitlines()[-1]
    key = "k-" + os.urandom(8).hex()
    srv = Serve(home, "--model", NAME, "--no-tracing", env={"LIFECYCLE_API_KEY": key})
    try:
        user = {"model": NAME, "messages": [{"role": "user", "content": "#Person1#: Hi."}]}
        url = f"{srv.url}/v1/chat/completions"
        assert requests.post(url, json=user, timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert requests.post(url, json=user, headers=wrong, timeout=30).status_code == 401
        ok = requests.post(url, json=user, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert ok.status_code == 200, ok.text
        assert requests.get(f"{srv.url}/health", timeout=10).ok  # probes need no key
        assert key not in srv.log.read_text()  # never logged
    finally:
        srv.stop()


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Generated requests against the server's own OpenAPI document: none answered with 5xx."""
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--request-timeout",
            "30",
            "--max-failures",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (generated, passed) = re.search(r"(\d+) generated, (\d+) passed", done.stdout).groups()
    assert int(generated) == int(passed) > 100, done.stdout[-2000:]


def test_a_full_queue_answers_429_and_a_client_gone_is_not_decoded(exported):
    """The engine is held back so that requests wait: a streaming client that goes away while
    its request waits has it dropped, one more waiting request fills the queue, the next gets
    429 with Retry-After; once the engine runs, only the waiting request is decoded."""
    from lifecycle_dagster.serving import ServedModel, build_app
    from lifecycle_dagster.serving.engine import Engine

    model = ServedModel.from_artifact(exported[0], NAME, "1", "champion")
    engine = Engine(model, max_batch=4, max_queue=1)  # not started yet
    app = build_app(engine)
    body = {"model": NAME, "prompt": "#Person1#: Is the bus late?", "max_tokens": 16}
    with in_process(app) as url:
        with requests.post(
            f"{url}/v1/completions", json={**body, "stream": True}, stream=True, timeout=30
        ) as r:
            assert r.status_code == 200 and next(r.iter_lines()).startswith(b"data: ")
            (gone,) = list(engine.waiting)
        deadline = time.monotonic() + 10
        while not gone.cancelled.is_set():
            assert time.monotonic() < deadline, "the closed stream's request was not cancelled"
            time.sleep(0.05)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(requests.post, f"{url}/v1/completions", json=body, timeout=60)
            while not any(not j.cancelled.is_set() for j in engine.waiting):
                time.sleep(0.05)
            busy = requests.post(f"{url}/v1/completions", json=body, timeout=30)
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
            engine.start()
            done = waiting.result()
        assert done.status_code == 200, done.text
        tokens = done.json()["usage"]["completion_tokens"]
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert "lifecycle_cancelled_requests 1.0" in metrics
        assert f"lifecycle_generated_tokens_total {float(tokens)}" in metrics
    engine.stop()


def test_tracing_that_cannot_write_never_fails_a_request(exported, tmp_path, monkeypatch):
    """The tracking server is unreachable: every request is still answered, at once, while the
    tracer's thread retries its writes in vain."""
    import mlflow
    from openai import OpenAI

    from lifecycle_dagster.serving import ServedModel, Server

    # The tracer sets this process's MLflow tracking URI and settings, as a serving process
    # wants; here they are put back afterwards, for the tests that follow in this process.
    for var in (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    ):
        monkeypatch.delenv(var, raising=False)
    model = ServedModel.from_artifact(exported[0], NAME, "1", "champion")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = Server.build(
        model, tracking_uri=down, feedback_url=f"sqlite:///{tmp_path / 'fb.db'}", follow_s=None
    ).start()
    try:
        with in_process(server.app) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
            for row in evaluated(exported[0])[:3]:
                messages = [{"role": "user", "content": row["input"]}]
                started = time.monotonic()
                answer = client.chat.completions.create(model=NAME, messages=messages)
                assert answer.choices[0].message.content == row["prediction"]
                assert time.monotonic() - started < 5  # the tracer's retries are not waited for
            assert server.tracer.written == 0
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)
