"""`lifecycle serve`: the champion ONNX artifact from the MLflow registry, in the OpenAI wire
format applications already speak.

    POST /v1/chat/completions  a user message is a task input, in the use case's template
    POST /v1/completions       a raw prompt, continued as it is
    GET  /v1/models            the model served: name, registered version, variant
    POST /v1/feedback          a rating of a response, or a preference between two
    GET  /health  /ready       alive; a model is loaded
    GET  /metrics              Prometheus: requests, queue depth, time to first token, tokens/s

Greedy by default (the output evaluation scored); ``stream: true`` answers with server-sent
events ending in ``data: [DONE]``. Requests that arrive together are decoded together
(``serving/engine.py``); past ``max_queue`` waiting requests the answer is 429 with Retry-After.
With an API key (``LIFECYCLE_API_KEY``, required beyond loopback) every /v1 route needs it as a
Bearer token. Errors are OpenAI's ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lifecycle_dagster.serving.engine import Engine, Finish, Job, QueueFull, Sampling
from lifecycle_dagster.serving.model import RequestError, ServedModel
from lifecycle_dagster.serving.schemas import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    ChoiceMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FeedbackAck,
    FeedbackRequest,
    ModelCard,
    ModelList,
    Usage,
)

API_KEY_ENV = "LIFECYCLE_API_KEY"
RETRY_AFTER_S = 1
LOOPBACK = ("127.0.0.1", "localhost", "::1")

log = logging.getLogger("lifecycle.serve")


class Metrics:
    """The Prometheus series, in a registry of their own (one per app)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lifecycle_requests",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=self.registry,
        )
        queue = Gauge(
            "lifecycle_queue_depth", "Requests waiting for the engine.", registry=self.registry
        )
        queue.set_function(lambda: engine.depth)
        running = Gauge(
            "lifecycle_running", "Requests in the batch being decoded.", registry=self.registry
        )
        running.set_function(lambda: engine.running)
        cancelled = Gauge(
            "lifecycle_cancelled_requests",
            "Requests dropped, undecoded or part-decoded, because their client went away.",
            registry=self.registry,
        )
        cancelled.set_function(lambda: engine.cancelled)
        self.first_token = Histogram(
            "lifecycle_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens_per_s = Histogram(
            "lifecycle_tokens_per_second",
            "Generated tokens per second of one request, from arrival to its end.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
            registry=self.registry,
        )
        self.batch = Histogram(
            "lifecycle_batch_size",
            "Requests decoded together.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.tokens = Counter(
            "lifecycle_generated_tokens", "Tokens generated.", registry=self.registry
        )
        engine.on_batch = self.batch.observe

    def finished(self, finish: Finish, started: float) -> None:
        if finish.first_token_s is not None:
            self.first_token.observe(finish.first_token_s)
        seconds = time.perf_counter() - started
        if finish.completion_tokens and seconds > 0:
            self.tokens_per_s.observe(finish.completion_tokens / seconds)
        self.tokens.inc(finish.completion_tokens)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code
        self.headers = headers or {}


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class Served:
    """One request's prompt and what the engine needs for it."""

    kind: str  # "chat" or "completion"
    prompt: str
    job: Job
    # The task input when the request is one (a chat of one user message): what feedback on
    # the answer can turn into a preference pair.
    task_input: str | None = None
    response_id: str = ""

    def __post_init__(self):
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.response_id = self.response_id or f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Hooks:
    """What happens beside answering (both optional, neither may fail a request): a finished
    request is recorded (for feedback and tracing); feedback is stored."""

    on_answer: Callable[[Served, Finish, float], None] | None = None
    on_feedback: Callable[[FeedbackRequest, ServedModel], FeedbackAck] | None = None


def build_app(
    engine: Engine,
    api_key: str | None = None,
    hooks: Hooks | None = None,
):
    hooks = hooks or Hooks()
    app = FastAPI(title="lifecycle serve", description=__doc__, version="1")

    def openapi() -> dict:
        """The document, naming the one model this server serves where requests name it."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for name in ("ChatRequest", "CompletionRequest"):
                field = schema["components"]["schemas"][name]["properties"]["model"]
                field["enum"] = [engine.model.name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    metrics = Metrics(engine)
    app.state.metrics = metrics

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unknown"), str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        reasons = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            reasons.append(f"{where}: {msg}" if where else msg)
        body = error_body("; ".join(reasons), "invalid_request_error", "invalid_request")
        return JSONResponse(status_code=422, content=body)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return JSONResponse(
            status_code=exc.status,
            content=error_body(exc.message, exc.kind, exc.code),
            headers=exc.headers,
        )

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise ApiError(
                401,
                "a valid API key is required (Authorization: Bearer <key>)",
                "authentication_error",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )

    def current() -> ServedModel:
        return engine.model

    def check_model(name: str) -> ServedModel:
        model = current()
        if name != model.name:
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server serves {model.name!r}",
                "invalid_request_error",
                "model_not_found",
            )
        return model

    def job_for(request, model, prompt: str, max_tokens: int, one_line: bool) -> Job:
        return Job(
            ids=model.encode(prompt, max_tokens),
            max_tokens=max_tokens,
            prompt=prompt,
            encoded_by=model,
            sampling=Sampling(request.temperature, request.top_p, request.seed),
            stop=request.stops,
            one_line=one_line,
        )

    def prepare_chat(request: ChatRequest) -> Served:
        model = check_model(request.model)
        max_tokens = request.max_completion_tokens or request.max_tokens
        max_tokens = max_tokens or model.default_max_tokens
        try:
            prompt = model.chat_prompt([(m.role, m.content) for m in request.messages])
            job = job_for(request, model, prompt, max_tokens, one_line=True)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_prompt") from exc
        alone = len(request.messages) == 1  # one user message: a task input
        return Served("chat", prompt, job, request.messages[0].content if alone else None)

    def prepare_completion(request: CompletionRequest) -> Served:
        model = check_model(request.model)
        max_tokens = request.max_tokens or model.default_max_tokens
        try:
            prompt = model.with_soft_prompt(request.prompt)
            job = job_for(request, model, prompt, max_tokens, one_line=False)
        except RequestError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_prompt") from exc
        return Served("completion", prompt, job)

    def submit(served: Served) -> asyncio.Queue:
        """Hands the job to the engine; its text and end arrive on the returned queue."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = served.job
        job.on_text = lambda delta: loop.call_soon_threadsafe(events.put_nowait, ("text", delta))
        job.on_done = lambda fin: loop.call_soon_threadsafe(events.put_nowait, ("done", fin))
        job.on_error = lambda exc: loop.call_soon_threadsafe(events.put_nowait, ("error", exc))
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise ApiError(
                429,
                f"the server is busy: {exc}; retry after {RETRY_AFTER_S} s",
                "rate_limit_error",
                "queue_full",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from exc
        return events

    async def answered(served: Served, finish: Finish, started: float) -> None:
        """Metrics, and the answer recorded before it leaves (feedback may follow at once);
        recording never fails the request."""
        metrics.finished(finish, started)
        if hooks.on_answer is None:
            return
        try:
            await asyncio.to_thread(hooks.on_answer, served, finish, started)
        except Exception as exc:
            log.warning("recording response %s failed: %s", served.response_id, exc)

    def fingerprint(model: ServedModel) -> str:
        return f"{model.name}:{model.version}:{model.variant}"

    async def complete(request: Request, served: Served) -> Finish:
        """Waits for the whole answer; a client that goes away stops its decoding."""
        started = time.perf_counter()
        events = submit(served)
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        served.job.cancel()
                        raise ApiError(499, "client closed the request", "cancelled") from None
                    continue
                if kind == "done":
                    await answered(served, value, started)
                    return value
                if kind == "error":
                    raise ApiError(500, f"generation failed: {value}", "server_error")
        except asyncio.CancelledError:
            served.job.cancel()
            raise

    def usage(finish: Finish) -> Usage:
        return Usage(
            prompt_tokens=finish.prompt_tokens,
            completion_tokens=finish.completion_tokens,
            total_tokens=finish.prompt_tokens + finish.completion_tokens,
        )

    def stream(
        served: Served, chunk: Callable[[str | None, str | None], dict], with_usage: bool
    ) -> AsyncIterator[str]:
        started = time.perf_counter()
        events = submit(served)  # before the first byte: a full queue is still a 429
        return _events(served, events, started, chunk, with_usage)

    async def _events(served, events, started, chunk, with_usage) -> AsyncIterator[str]:
        model = current()
        head = {
            "id": served.response_id,
            "created": int(time.time()),
            "model": model.name,
            "system_fingerprint": fingerprint(model),
        }
        try:
            yield f"data: {json.dumps({**head, **chunk('', None)})}\n\n"
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield f"data: {json.dumps({**head, **chunk(value, None)})}\n\n"
                elif kind == "done":
                    await answered(served, value, started)
                    head["system_fingerprint"] = fingerprint(value.model)
                    head["model_version"] = value.model.version
                    yield f"data: {json.dumps({**head, **chunk(None, value.reason)})}\n\n"
                    if with_usage:
                        last = {**head, **chunk(None, None), "choices": []}
                        last["usage"] = usage(value).model_dump()
                        yield f"data: {json.dumps(last)}\n\n"
                    break
                else:
                    error = error_body(f"generation failed: {value}", "server_error")
                    yield f"data: {json.dumps(error)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the answer ended: nothing more is decoded for it
            served.job.cancel()

    def event_stream(body: AsyncIterator[str], served: Served):
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Request-Id": served.response_id},
        )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **current().describe()}

    @app.get("/ready")
    def ready():
        model = current()
        if model is None or not engine.thread.is_alive():
            return JSONResponse(status_code=503, content={"ready": False})
        return {"ready": True, "model": model.name, "version": model.version}

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)])
    def models() -> ModelList:
        model = current()
        return ModelList(
            data=[
                ModelCard(
                    id=model.name,
                    created=int(model.folder.stat().st_mtime),
                    version=model.version,
                    alias=model.alias,
                    variant=model.variant,
                    use_case=model.use_case,
                    retrieval_index=model.index_version,
                )
            ]
        )

    def chat_chunk(delta: str | None, reason: str | None) -> dict:
        content = {} if delta is None else {"content": delta}
        if delta == "":  # the first chunk says who speaks
            content = {"role": "assistant", "content": ""}
        return {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": content, "finish_reason": reason}],
        }

    def text_chunk(delta: str | None, reason: str | None) -> dict:
        return {
            "object": "text_completion",
            "choices": [{"index": 0, "text": delta or "", "finish_reason": reason}],
        }

    async def answer(body, request: Request, served: Served, chunk, response, choice):
        """The answer as events (``stream``) or as one ``response`` with ``choice(finish)``."""
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(stream(served, chunk, include), served)
        finish = await complete(request, served)
        return response(
            id=served.response_id,
            created=int(time.time()),
            model=finish.model.name,
            model_version=finish.model.version,
            system_fingerprint=fingerprint(finish.model),
            choices=[choice(finish)],
            usage=usage(finish),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatResponse,
        dependencies=[Depends(authorized)],
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat(body: ChatRequest, request: Request):
        def choice(finish: Finish) -> ChatChoice:
            message = ChoiceMessage(content=finish.text)
            return ChatChoice(message=message, finish_reason=finish.reason)

        served = prepare_chat(body)
        return await answer(body, request, served, chat_chunk, ChatResponse, choice)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        dependencies=[Depends(authorized)],
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def completions(body: CompletionRequest, request: Request):
        def choice(finish: Finish) -> CompletionChoice:
            return CompletionChoice(text=finish.text, finish_reason=finish.reason)

        served = prepare_completion(body)
        return await answer(body, request, served, text_chunk, CompletionResponse, choice)

    @app.post("/v1/feedback", response_model=FeedbackAck, dependencies=[Depends(authorized)])
    def feedback(body: FeedbackRequest) -> FeedbackAck:
        if hooks.on_feedback is None:
            raise ApiError(404, "this server keeps no feedback", "invalid_request_error")
        try:
            return hooks.on_feedback(body, current())
        except LookupError as exc:
            raise ApiError(404, str(exc), "invalid_request_error", "unknown_response") from exc
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_feedback") from exc

    return app
