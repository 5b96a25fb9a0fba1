"""The OpenAI wire format, the part applications use: chat completions, completions, models; and
the server's own feedback endpoint. Unknown fields are refused with a message naming them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS = 512
MAX_CHARS = 20_000
MAX_STOPS = 4


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model's name (GET /v1/models).", max_length=200)
    max_tokens: int | None = Field(
        None, ge=1, le=MAX_TOKENS, description="Tokens to generate at most."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 (the default) is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOPS} stop strings.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request.")
    user: str | None = Field(None, max_length=200)

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        if any(not s or len(s) > 100 for s in stops):
            raise ValueError("a stop string has 1 to 100 characters")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CHARS)


class ChatRequest(_Request):
    messages: list[Message] = Field(
        min_length=1,
        max_length=64,
        description="A user message is a task input, formatted with the use case's template; "
        "earlier user/assistant pairs are in-context examples; a first system message replaces "
        "the use case's instruction.",
    )
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)

    @model_validator(mode="after")
    def _some_text(self):
        if not self.messages[-1].content.strip():
            raise ValueError("the last message is empty")
        return self


class CompletionRequest(_Request):
    prompt: str = Field(
        min_length=1, max_length=MAX_CHARS, description="A raw prompt, continued as it is."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChoiceMessage
    finish_reason: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str


class _Response(BaseModel):
    id: str
    created: int
    model: str
    # The registered version that answered, also in system_fingerprint (name:version:variant).
    model_version: str
    system_fingerprint: str
    usage: Usage


class ChatResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lifecycle"
    version: str
    alias: str
    variant: str
    use_case: str | None
    retrieval_index: str | None = None  # the index version prompts are augmented from


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(BaseModel):
    """A rating of one response, or a preference between two responses to the same prompt."""

    model_config = ConfigDict(extra="forbid")

    response_id: str | None = Field(None, max_length=100, description="The rated response.")
    rating: int | None = Field(None, ge=-1, le=1, description="+1 good, -1 bad, 0 neutral.")
    chosen_id: str | None = Field(None, max_length=100, description="The preferred response.")
    rejected_id: str | None = Field(None, max_length=100, description="The other response.")
    comment: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _one_kind(self):
        rating = self.response_id is not None or self.rating is not None
        preference = self.chosen_id is not None or self.rejected_id is not None
        if rating == preference:
            raise ValueError("give either response_id and rating, or chosen_id and rejected_id")
        if rating and (self.response_id is None or self.rating is None):
            raise ValueError("a rating needs both response_id and rating")
        if preference and (self.chosen_id is None or self.rejected_id is None):
            raise ValueError("a preference needs both chosen_id and rejected_id")
        if preference and self.chosen_id == self.rejected_id:
            raise ValueError("chosen_id and rejected_id are the same response")
        return self


class FeedbackAck(BaseModel):
    id: str
    kind: Literal["rating", "preference"]
    use_case: str
