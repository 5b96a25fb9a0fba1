"""Every answered request as an MLflow 3 trace in the use case's experiment (prompt, answer,
latency, tokens, model version), and every piece of feedback as an assessment on the trace of the
response it is about: what a team reads in MLflow's GenAI views.

A thread of its own writes them from a bounded queue: a slow or unreachable tracking server
never delays or fails a request; what cannot be queued or written is counted and logged."""

from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger("lifecycle.serve")


class Tracer:
    def __init__(self, tracking_uri: str, experiment: str, store=None, max_pending: int = 1000):
        self.tracking_uri = tracking_uri
        self.store = store  # a FeedbackStore: keeps each response's trace id across restarts
        self.experiment = experiment
        self.pending: queue.Queue = queue.Queue(maxsize=max_pending)
        self.trace_of: dict[str, str] = {}  # response id -> trace id
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._experiment_id: str | None = None
        self.thread = threading.Thread(target=self._loop, name="tracer", daemon=True)

    def start(self) -> Tracer:
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.pending.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout=timeout)

    def _put(self, item: tuple) -> None:
        try:
            self.pending.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning(
                    "tracing: %d traces dropped (the tracking server is behind)", self.dropped
                )

    def answer(self, response, finish, started_wall: float, ended_wall: float) -> None:
        """Queue one answered request (``response``: a ``ml.feedback.Response``)."""
        self._put(("answer", response, finish, started_wall, ended_wall))

    def rating(self, response_id: str, rating: int, comment: str | None) -> None:
        self._put(("feedback", response_id, "user_rating", rating, comment, {}))

    def preference(self, chosen_id: str, rejected_id: str, comment: str | None) -> None:
        self._put(("feedback", chosen_id, "user_preference", True, comment, {"over": rejected_id}))
        self._put(
            ("feedback", rejected_id, "user_preference", False, comment, {"under": chosen_id})
        )

    def _loop(self) -> None:
        # This thread is the asynchronous part: each trace is stored before the next item (an
        # assessment of it, say) is written.
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
        # A tracking server that is down costs a few seconds a write, not minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        import mlflow

        # MLflow exports traces to the process's tracking URI: a serving process has one store.
        mlflow.set_tracking_uri(self.tracking_uri)
        while (item := self.pending.get()) is not None:
            try:
                if item[0] == "answer":
                    self._trace(*item[1:])
                else:
                    self._assess(*item[1:])
                self.written += 1
            except Exception as exc:  # never the request's problem
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    log.warning("tracing: %d writes failed, the latest: %s", self.failed, exc)

    def _client(self):
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri)
        if self._experiment_id is None:
            exp = client.get_experiment_by_name(self.experiment)
            self._experiment_id = (
                exp.experiment_id if exp else client.create_experiment(self.experiment)
            )
        return client

    def _trace(self, response, finish, started_wall: float, ended_wall: float) -> None:
        client = self._client()
        tags = {
            "lifecycle.response_id": response.id,
            "lifecycle.use_case": response.use_case,
            "lifecycle.model": response.model,
            "lifecycle.model_version": response.version,
        }
        span = client.start_trace(
            name=f"serve.{response.kind}",
            span_type="LLM",
            inputs={"prompt": response.prompt, "task_input": response.task_input},
            attributes={"model": response.model, "model_version": response.version},
            tags=tags,
            experiment_id=self._experiment_id,
            start_time_ns=int(started_wall * 1e9),
        )
        client.end_trace(
            span.trace_id,
            outputs={"text": response.completion, "finish_reason": finish.reason},
            attributes={
                "prompt_tokens": finish.prompt_tokens,
                "completion_tokens": finish.completion_tokens,
                "latency_s": round(ended_wall - started_wall, 4),
                "first_token_s": round(finish.first_token_s or 0.0, 4),
                "batch_size": finish.batch_size,
                "variant": finish.model.variant,
            },
            end_time_ns=int(ended_wall * 1e9),
        )
        self.trace_of[response.id] = span.trace_id
        if self.store is not None:
            self.store.set_trace(response.id, span.trace_id)

    def _assess(self, response_id: str, name: str, value, comment, metadata: dict) -> None:
        import mlflow
        from mlflow.entities import AssessmentSource

        trace_id = self.trace_of.get(response_id)
        if trace_id is None and self.store is not None:
            trace_id = self.store.response(response_id).trace_id
        if trace_id is None:
            raise LookupError(f"no trace of response {response_id} (written before a restart?)")
        mlflow.log_feedback(
            trace_id=trace_id,
            name=name,
            value=value,
            source=AssessmentSource(source_type="HUMAN", source_id="lifecycle-serve"),
            rationale=comment,
            metadata={"response_id": response_id, **metadata},
        )
