"""The model server: the champion of a use case in the OpenAI wire format (``api.py``), decoded
in batches by one engine thread (``engine.py``), every answer traced to MLflow (``tracing.py``)
and kept with its feedback (``ml/feedback.py``), the champion followed as its alias moves."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from lifecycle_dagster.serving.api import API_KEY_ENV, LOOPBACK, Hooks, Served, build_app
from lifecycle_dagster.serving.engine import Engine, Finish
from lifecycle_dagster.serving.model import RequestError, ServedModel
from lifecycle_dagster.serving.schemas import FeedbackAck, FeedbackRequest

__all__ = ["API_KEY_ENV", "LOOPBACK", "RequestError", "ServedModel", "Server", "build_app"]

log = logging.getLogger("lifecycle.serve")


class ChampionWatcher:
    """Follows the registry's alias: when it points at another version, that version is loaded
    beside the serving one and handed to the engine, which switches between batches."""

    def __init__(self, engine: Engine, tracking_uri: str, every_s: float = 10.0, threads: int = 1):
        self.engine = engine
        self.tracking_uri = tracking_uri
        self.every_s = every_s
        self.threads = threads
        self.stopping = threading.Event()
        self.swaps: list[tuple[str, str]] = []
        self.thread = threading.Thread(target=self._loop, name="champion-watcher", daemon=True)

    def start(self) -> ChampionWatcher:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        from lifecycle_dagster.resources.registry import ModelRegistry, local_path

        registry = ModelRegistry(self.tracking_uri)
        while not self.stopping.wait(self.every_s):
            serving = self.engine.next_model or self.engine.model
            try:
                version = registry.by_alias(serving.name, serving.alias)
                if version is None or str(version.version) == serving.version:
                    continue
                log.info(
                    "%s: alias %s moved from version %s to %s; loading it",
                    serving.name,
                    serving.alias,
                    serving.version,
                    version.version,
                )
                model = ServedModel.from_artifact(
                    local_path(version.source),
                    serving.name,
                    str(version.version),
                    serving.alias,
                    self.threads,
                )
            except Exception as exc:  # the registry or the artifact is away: keep serving
                log.warning("%s: could not follow alias %s: %s", serving.name, serving.alias, exc)
                continue
            self.engine.swap(model)
            self.swaps.append((serving.version, model.version))
            log.info("%s: version %s serves from the next batch on", model.name, model.version)


@dataclass
class Server:
    """Everything a serving process runs, built from a loaded model and settings."""

    engine: Engine
    app: object
    tracer: object | None
    watcher: ChampionWatcher | None
    store: object | None

    @classmethod
    def build(
        cls,
        model: ServedModel,
        *,
        tracking_uri: str | None = None,
        tracing: bool = True,
        feedback_url: str | None = None,
        api_key: str | None = None,
        max_batch: int = 16,
        max_queue: int = 64,
        follow_s: float | None = 10.0,
        threads: int = 1,
    ) -> Server:
        from lifecycle_dagster.ml.feedback import FeedbackStore, Response
        from lifecycle_dagster.serving.tracing import Tracer

        engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
        store = FeedbackStore(feedback_url) if feedback_url else None
        experiment = model.use_case or model.name
        tracer = Tracer(tracking_uri, experiment, store) if tracking_uri and tracing else None

        def record(served: Served, finish: Finish, started: float) -> None:
            ended = time.time()
            began = ended - (time.perf_counter() - started)
            response = Response(
                id=served.response_id,
                use_case=finish.model.use_case or finish.model.name,
                model=finish.model.name,
                version=finish.model.version,
                kind=served.kind,
                task_input=served.task_input,
                prompt=served.prompt,
                completion=finish.text,
            )
            if store is not None:
                store.record_response(response)  # before the answer leaves: feedback finds it
            if tracer is not None:
                tracer.answer(response, finish, began, ended)

        def feedback(body: FeedbackRequest, _model: ServedModel) -> FeedbackAck:
            if body.response_id is not None:
                got = store.add_rating(body.response_id, body.rating, body.comment)
                if tracer is not None:
                    tracer.rating(body.response_id, body.rating, body.comment)
            else:
                got = store.add_preference(body.chosen_id, body.rejected_id, body.comment)
                if tracer is not None:
                    tracer.preference(body.chosen_id, body.rejected_id, body.comment)
            return FeedbackAck(id=got.id, kind=got.kind, use_case=got.use_case)

        hooks = Hooks(
            on_answer=record if (store or tracer) else None,
            on_feedback=feedback if store is not None else None,
        )
        app = build_app(engine, api_key=api_key, hooks=hooks)
        watcher = None
        if follow_s and tracking_uri:
            watcher = ChampionWatcher(engine, tracking_uri, follow_s, threads)
        return cls(engine, app, tracer, watcher, store)

    def start(self) -> Server:
        self.engine.start()
        if self.tracer is not None:
            self.tracer.start()
        if self.watcher is not None:
            self.watcher.start()
        return self

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.stop()
        if self.tracer is not None:
            self.tracer.stop()

    def run(self, host: str = "127.0.0.1", port: int = 8000) -> None:
        import uvicorn

        self.start()
        try:
            uvicorn.run(self.app, host=host, port=port, log_level="info", access_log=True)
        finally:
            self.stop()
