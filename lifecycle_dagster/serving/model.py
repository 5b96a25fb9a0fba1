"""`lifecycle serve`: the champion ONNX artifact from the MLflow registry behind a small HTTP API.

    GET  /health     which registered model, version and variant is loaded
    POST /generate   {"input": "<task input>"} (formatted with the use case's prompt template)
                     or {"prompt": "<raw prompt>"}, optional "max_new_tokens"

Generation is greedy, in onnxruntime-genai (onnxruntime with the KV cache reused across steps);
requests are served one at a time (the generator uses every thread it was given). Bad requests get 4xx with a reason.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lifecycle_dagster.ml.compress import SERVING_FILE, selected_folder
from lifecycle_dagster.ml.evaluate import clean_completion
from lifecycle_dagster.ml.runtimes import GenaiGenerator
from lifecycle_dagster.resources.registry import CHAMPION, ModelRegistry, local_path

MAX_NEW_TOKENS = 256
MAX_INPUT_CHARS = 20_000


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(
        None, description="Task input, formatted with the use case's prompt template."
    )
    prompt: str | None = Field(None, description="A raw prompt, passed to the model as is.")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)

    @model_validator(mode="after")
    def _one_text(self):
        given = [k for k in ("input", "prompt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'input' or 'prompt'")
        text = getattr(self, given[0])
        if not text.strip():
            raise ValueError(f"'{given[0]}' is empty")
        if len(text) > MAX_INPUT_CHARS:
            raise ValueError(f"'{given[0]}' is longer than {MAX_INPUT_CHARS} characters")
        return self


class GenerateResponse(BaseModel):
    text: str
    completion_tokens: int
    prompt_tokens: int
    seconds: float
    model: str
    version: str
    variant: str


class RequestError(ValueError):
    """A request that is well-formed but cannot be served (e.g. longer than the context)."""


@dataclass
class ServedModel:
    name: str
    version: str
    alias: str
    variant: str
    folder: Path
    serving: dict
    generator: GenaiGenerator
    tokenizer: object

    @classmethod
    def from_registry(
        cls, tracking_uri: str, name: str, alias: str = CHAMPION, threads: int = 1
    ) -> ServedModel:
        registry = ModelRegistry(tracking_uri)
        version = registry.by_alias(name, alias)
        if version is None:
            raise LookupError(
                f"no version of registered model {name!r} has alias {alias!r} in {tracking_uri} "
                "(run the lifecycle until a candidate passes evaluation)"
            )
        return cls.from_artifact(
            local_path(version.source), name, str(version.version), alias, threads
        )

    @classmethod
    def from_artifact(
        cls, artifact: Path, name: str, version: str, alias: str, threads: int = 1
    ) -> ServedModel:
        from tokenizers import Tokenizer

        folder = selected_folder(artifact)
        generator = GenaiGenerator(folder, threads)
        return cls(
            name=name,
            version=version,
            alias=alias,
            variant=folder.name,
            folder=folder,
            serving=json.loads((Path(artifact) / SERVING_FILE).read_text()),
            generator=generator,
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
        )

    def prompt_for(self, request: GenerateRequest) -> str:
        """The text the model sees: the raw prompt or the use case's template around the input,
        after the model's soft prompt when it has one (prompt tuning)."""
        from lifecycle_dagster.ml.data import PromptFormat
        from lifecycle_dagster.ml.soft_prompt import with_soft_prompt

        prompt = request.prompt
        if prompt is None:
            fmt = PromptFormat(**self.serving.get("prompt_format", {}))
            prompt = fmt.prompt(
                [],
                self.serving["prompt_template"].format(
                    instruction=self.serving["instruction"], input=request.input
                ),
            )
        return with_soft_prompt(self.tokenizer, [prompt])[0]

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        prompt = self.prompt_for(request)
        max_new = request.max_new_tokens or int(self.serving.get("max_new_tokens", 32))
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if len(ids) + max_new > self.generator.context_length:
            raise RequestError(
                f"prompt is {len(ids)} tokens; with max_new_tokens {max_new} it exceeds the "
                f"model's context of {self.generator.context_length} tokens"
            )
        start = time.perf_counter()
        out = self.generator.generate(ids, max_new)
        seconds = time.perf_counter() - start
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return GenerateResponse(
            text=clean_completion(text) if request.input is not None else text.strip(),
            completion_tokens=len(out),
            prompt_tokens=len(ids),
            seconds=round(seconds, 4),
            model=self.name,
            version=self.version,
            variant=self.variant,
        )


def build_app(model: ServedModel):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from lifecycle_dagster.ml.soft_prompt import soft_tokens

    app = FastAPI(title="lifecycle serve", description=__doc__)
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        reasons = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            reasons.append(f"{where}: {msg}" if where else msg)
        return JSONResponse(status_code=422, content={"error": "; ".join(reasons)})

    @app.exception_handler(RequestError)
    async def _unservable(_request: Request, exc: RequestError):
        return JSONResponse(status_code=400, content={"error": str(exc)})

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "model": model.name,
            "version": model.version,
            "alias": model.alias,
            "variant": model.variant,
            "use_case": model.serving.get("use_case"),
            "context_length": model.generator.context_length,
            "soft_prompt_tokens": len(soft_tokens(model.tokenizer)),
        }

    @app.post("/generate", response_model=GenerateResponse)
    def generate(request: GenerateRequest) -> GenerateResponse:
        with lock:
            return model.generate(request)

    return app


def serve(model: ServedModel, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(build_app(model), host=host, port=port, log_level="info", access_log=True)
