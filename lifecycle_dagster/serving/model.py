"""The model a server runs: one registered version of a use case's ONNX artifact, loaded into
onnxruntime-genai, with what it needs to prompt it as the lifecycle trained it (``serving.json``:
the use case's template and the model's prompt format; with retrieval, the index the artifact
carries, searched for every request's task input)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lifecycle_dagster.ml.compress import SERVING_FILE, selected_folder
from lifecycle_dagster.ml.runtimes import GenaiGenerator
from lifecycle_dagster.resources.registry import CHAMPION, ModelRegistry, local_path


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
    retriever: object = None  # ml.retrieval.Retriever over the artifact's index, with retrieval

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
        serving = json.loads((Path(artifact) / SERVING_FILE).read_text())
        retriever = None
        if serving.get("retrieval"):
            from lifecycle_dagster.ml.retrieval import Retriever

            retriever = Retriever(Path(artifact) / serving["retrieval"]["index"])
        return cls(
            name=name,
            version=version,
            alias=alias,
            variant=folder.name,
            folder=folder,
            serving=serving,
            generator=GenaiGenerator(folder, threads),
            tokenizer=Tokenizer.from_file(str(folder / "tokenizer.json")),
            retriever=retriever,
        )

    @property
    def use_case(self) -> str | None:
        return self.serving.get("use_case")

    @property
    def index_version(self) -> str | None:
        return self.retriever.version if self.retriever is not None else None

    def with_passages(self, text: str) -> str:
        """A task input with the passages the index finds for it, as the lifecycle trained and
        evaluated the model on them (unchanged without retrieval)."""
        if self.retriever is None:
            return text
        from lifecycle_dagster.ml.retrieval import augment, passages_for

        spec = self.serving["retrieval"]
        return augment(spec["template"], text, passages_for(self.retriever, text, spec["top_k"]))

    @property
    def default_max_tokens(self) -> int:
        return int(self.serving.get("max_new_tokens", 32))

    def task_turn(self, text: str, instruction: str | None = None) -> str:
        """The use case's template around one task input (``instruction``: a system message's,
        in place of the use case's own)."""
        return self.serving["prompt_template"].format(
            instruction=self.serving["instruction"] if instruction is None else instruction,
            input=text,
        )

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        """A chat as the lifecycle prompts the model: each user message is a task input in the
        use case's template, earlier user/assistant pairs are in-context examples (as few-shot
        prompting has them), a leading system message replaces the instruction. One user message
        gives exactly the prompt evaluation scored."""
        from lifecycle_dagster.ml.data import PromptFormat

        instruction = None
        if messages and messages[0][0] == "system":
            instruction, messages = messages[0][1], messages[1:]
        roles = [role for role, _ in messages]
        if (
            not roles
            or roles[-1] != "user"
            or roles[:-1] != ["user", "assistant"] * (len(roles) // 2)
        ):
            raise RequestError(
                "messages: an optional system message, then user and assistant messages "
                "alternating, ending with a user message"
            )
        last = len(messages) - 1  # the query gets passages; earlier turns are examples as given
        turn = [
            self.task_turn(self.with_passages(text) if i == last else text, instruction)
            if role == "user"
            else text
            for i, (role, text) in enumerate(messages)
        ]
        fmt = PromptFormat(**self.serving.get("prompt_format", {}))
        return self.with_soft_prompt(
            fmt.prompt(list(zip(turn[:-1:2], turn[1::2], strict=True)), turn[-1])
        )

    def with_soft_prompt(self, prompt: str) -> str:
        """The prompt after the model's soft prompt, when it has one (prompt tuning)."""
        from lifecycle_dagster.ml.soft_prompt import with_soft_prompt

        return with_soft_prompt(self.tokenizer, [prompt])[0]

    def encode(self, prompt: str, max_tokens: int) -> list[int]:
        """Token ids of ``prompt``; refused when they and ``max_tokens`` exceed the context."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) + max_tokens > self.generator.context_length:
            raise RequestError(
                f"the prompt is {len(ids)} tokens; with max_tokens {max_tokens} it exceeds the "
                f"model's context of {self.generator.context_length} tokens"
            )
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def describe(self) -> dict:
        from lifecycle_dagster.ml.soft_prompt import soft_tokens

        return {
            "model": self.name,
            "version": self.version,
            "alias": self.alias,
            "variant": self.variant,
            "use_case": self.use_case,
            "context_length": self.generator.context_length,
            "soft_prompt_tokens": len(soft_tokens(self.tokenizer)),
            "retrieval_index": self.index_version,
        }
