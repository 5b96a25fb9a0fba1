"""The engine: one thread owns the model and decodes every request. Requests that arrive together
(those waiting when a batch starts, up to ``max_batch``, with the same sampling settings) are
decoded together in one onnxruntime-genai generator, their prompts padded to one length. Each
request's tokens go back as text as they come; a cancelled request stops being decoded. A new
model (the champion moved) takes over between batches, so no request in flight is dropped.

Plain threads and callbacks: the HTTP layer (``serving/api.py``) bridges them to asyncio."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lifecycle_dagster.serving.model import ServedModel

log = logging.getLogger("lifecycle.serve")


class QueueFull(RuntimeError):
    """More requests wait than the server accepts: the client should retry later."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. Temperature 0 (the default) is greedy: the output the
    evaluation scored. Requests batch together only with equal settings."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def search_options(self) -> dict:
        if self.greedy:
            return {"do_sample": False}
        options = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            options["random_seed"] = self.seed
        return options

    def key(self) -> tuple:
        return ("greedy",) if self.greedy else (self.temperature, self.top_p, self.seed)


@dataclass
class Finish:
    """How a request ended: ``stop`` (end of sequence, a stop string, the end of the answer's
    line) or ``length`` (max_tokens)."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    model: ServedModel
    seconds: float
    first_token_s: float | None
    batch_size: int


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    # The prompt and the model whose tokenizer made ``ids``: a request that waited through a
    # switch of version is encoded again by the new one.
    prompt: str | None = None
    encoded_by: ServedModel | None = None
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    # The use case's answer is one line (what evaluation judges): leading blank space is not
    # part of it and it ends at the first newline after it.
    one_line: bool = False
    # Called from the engine thread: on_text(delta) as text is decided, then on_done(Finish)
    # or on_error(exception); never after cancel().
    on_text: Callable[[str], None] = lambda delta: None
    on_done: Callable[[Finish], None] = lambda finish: None
    on_error: Callable[[BaseException], None] = lambda exc: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled.set()


class Decoding:
    """One request's text as its tokens come: what may be sent so far, and whether it ended."""

    def __init__(self, job: Job, model: ServedModel):
        self.job, self.model = job, model
        self.tokens: list[int] = []
        self.sent = 0
        self.text = ""
        self.reason: str | None = None
        self.first_token_s: float | None = None
        self.hold = max((len(s) for s in job.stop), default=1) - 1

    def add(self, token: int) -> str:
        """Takes one token; returns the new text that is certain (a stop string may still cut
        what follows; a half-decoded character waits for its next byte)."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.job.enqueued
        if token in self.model.generator.eos:
            self.reason = "stop"
            return self.flush()
        self.tokens.append(token)
        text = self.model.decode(self.tokens)
        if self.job.one_line:
            text = text.lstrip()
            if "\n" in text:
                text, self.reason = text.split("\n", 1)[0], "stop"
        for stop in self.job.stop:
            if stop and (at := text.find(stop)) >= 0:
                text, self.reason = text[:at], "stop"
        if self.reason is None and len(self.tokens) >= self.job.max_tokens:
            self.reason = "length"
        self.text = text
        if self.reason is not None:
            return self.flush()
        certain = len(text) - self.hold
        if text.endswith("\ufffd"):
            certain = min(certain, len(text) - 1)
        if self.job.one_line:  # blank space at the end may yet be the end of the line
            certain = min(certain, len(text.rstrip()))
        return self._take(certain)

    def flush(self) -> str:
        if self.job.one_line:
            self.text = self.text.rstrip()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


class Engine:
    def __init__(self, model: ServedModel, max_batch: int = 16, max_queue: int = 64):
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.next_model: ServedModel | None = None
        self.stopping = False
        self.running = 0  # requests in the batch being decoded
        self.cancelled = 0  # requests dropped because their client went away
        self.on_batch: Callable[[int], None] = lambda size: None
        self.thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> None:
        with self.cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are waiting (at most {self.max_queue})"
                )
            self.waiting.append(job)
            self.cond.notify()

    def _drop_cancelled(self) -> None:
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            self.cancelled += 1

    def swap(self, model: ServedModel) -> None:
        """Serve ``model`` from the next batch on; the batch in flight ends on the current one."""
        with self.cond:
            self.next_model = model
            self.cond.notify()

    def _take_batch(self) -> list[Job]:
        with self.cond:
            while not self.waiting and not self.stopping:
                self.cond.wait(timeout=1.0)
            if self.next_model is not None:
                self.model, self.next_model = self.next_model, None
            self._drop_cancelled()
            batch: list[Job] = []
            key = None
            for job in list(self.waiting):
                if key is None:
                    key = job.sampling.key()
                if job.sampling.key() == key and len(batch) < self.max_batch:
                    batch.append(job)
                    self.waiting.remove(job)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while not self.stopping:
            batch = self._take_batch()
            if not batch:
                continue
            model = self.model
            try:
                self._decode(model, batch)
            except Exception as exc:  # one bad batch must not stop the server
                log.exception("decoding a batch of %d failed", len(batch))
                for job in batch:
                    if not job.cancelled.is_set():
                        job.on_error(exc)
            finally:
                self.running = 0

    def _decode(self, model: ServedModel, batch: list[Job]) -> None:
        self.on_batch(len(batch))
        decode(model, batch)
        self.cancelled += sum(job.cancelled.is_set() and not job.finished for job in batch)


def decode(model: ServedModel, batch: list[Job]) -> None:
    """Decodes ``batch`` together in this thread, calling each job back as it goes."""
    import numpy as np

    for job in list(batch):
        if job.encoded_by is not None and job.encoded_by is not model:
            try:
                job.ids, job.encoded_by = model.encode(job.prompt, job.max_tokens), model
            except ValueError as exc:  # e.g. too long for the new version's context
                batch.remove(job)
                job.on_error(exc)
    if not batch:
        return
    og = model.generator.og
    start = time.perf_counter()
    width = max(len(job.ids) for job in batch)
    pad = model.generator.pad_token_id
    ids = np.full((len(batch), width), pad, dtype=np.int32)
    # Right-padded: onnxruntime-genai masks the padding and continues each prompt from its own
    # last token, so every answer is the one the prompt gets alone (left padding shifts the
    # positions of the shorter prompts and changes their answers).
    for row, job in enumerate(batch):
        ids[row, : len(job.ids)] = job.ids
    params = og.GeneratorParams(model.generator.model)
    params.set_search_options(
        max_length=width + max(job.max_tokens for job in batch),
        batch_size=len(batch),
        **batch[0].sampling.search_options(),
    )
    generator = og.Generator(model.generator.model, params)
    generator.append_tokens(ids)
    states = [Decoding(job, model) for job in batch]
    live = set(range(len(batch)))
    while live and not generator.is_done():
        generator.generate_next_token()
        tokens = generator.get_next_tokens()
        for row in list(live):
            state = states[row]
            if state.job.cancelled.is_set():
                live.discard(row)
                continue
            delta = state.add(int(tokens[row]))
            if delta:
                state.job.on_text(delta)
            if state.reason is not None:
                live.discard(row)
                _done(state, start, len(batch))
    for row in live:  # the generator ended (max_length) before the request did
        state = states[row]
        state.reason = state.reason or "length"
        state.job.on_text(state.flush())
        _done(state, start, len(batch))
    del generator


def _done(state: Decoding, start: float, size: int) -> None:
    job = state.job
    if job.cancelled.is_set():
        return
    job.finished = True
    job.on_done(
        Finish(
            reason=state.reason or "length",
            text=state.text,
            prompt_tokens=len(job.ids),
            completion_tokens=len(state.tokens),
            model=state.model,
            seconds=time.perf_counter() - start,
            first_token_s=state.first_token_s,
            batch_size=size,
        )
    )


def run(model: ServedModel, jobs: list[Job]) -> list[Finish]:
    """Decodes ``jobs`` together, here and now (a test, a notebook): how each ended."""
    finished: dict[int, Finish] = {}
    for i, job in enumerate(jobs):
        job.on_done = lambda finish, i=i: finished.__setitem__(i, finish)
    decode(model, jobs)
    return [finished[i] for i in range(len(jobs))]
