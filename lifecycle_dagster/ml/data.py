"""Load and validate the use case's JSONL data files; every error names the file, line and field."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.usecase import UseCase
from lifecycle_dagster.ml.usecase_loader import read_text

TASK_FIELDS = ("id",)  # plus the use case's input and target fields
PREFERENCE_FIELDS = ("id", "prompt", "chosen", "rejected")


@dataclass
class Split:
    """One validated data file."""

    path: Path
    rows: list[dict]
    sha256: str
    stats: dict = field(default_factory=dict)


def load_jsonl(
    path: Path,
    fields: tuple[str, ...],
    *,
    max_chars: int,
    min_rows: int = 1,
    convert: dict[str, Callable[[object], str]] | None = None,
) -> Split:
    """Read a JSONL file whose rows are objects with non-empty string ``fields``; a field in
    ``convert`` is first turned into its string by that function (a ``ValueError`` names the fault).

    Rejects non-UTF-8 bytes, empty files, invalid JSON lines, missing or mistyped fields, empty or
    over-long values, and duplicate ids or duplicate rows, each with the line and field at fault.
    """
    path = Path(path)
    text = read_text(path)
    rows: list[dict] = []
    ids: dict[str, int] = {}
    contents: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                path, f"invalid JSON: {exc.msg} (column {exc.colno})", line=lineno
            ) from None
        if not isinstance(row, dict):
            raise InputError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
        for name in fields:
            if name not in row:
                raise InputError(path, "missing", line=lineno, field=name)
            if name in (convert or {}):
                try:
                    row[name] = convert[name](row[name])
                except ValueError as exc:
                    raise InputError(path, str(exc), line=lineno, field=name) from None
            value = row[name]
            if not isinstance(value, str):
                raise InputError(
                    path, f"expected a string, got {type(value).__name__}", line=lineno, field=name
                )
            if not value.strip():
                raise InputError(path, "empty", line=lineno, field=name)
            if len(value) > max_chars:
                raise InputError(
                    path,
                    f"{len(value)} characters, more than the {max_chars} allowed",
                    line=lineno,
                    field=name,
                )
        if row["id"] in ids:
            raise InputError(
                path,
                f"duplicate id '{row['id']}' (first on line {ids[row['id']]})",
                line=lineno,
                field="id",
            )
        ids[row["id"]] = lineno
        key = json.dumps([row[f] for f in fields if f != "id"])
        if key in contents:
            raise InputError(
                path, f"duplicate row (same content as line {contents[key]})", line=lineno
            )
        contents[key] = lineno
        rows.append({name: row[name] for name in fields})
    if len(rows) < min_rows:
        raise InputError(path, f"{len(rows)} rows, fewer than the {min_rows} required")
    lengths = {name: [len(r[name]) for r in rows] for name in fields if name != "id"}
    stats = {"rows": len(rows)}
    for name, values in lengths.items():
        stats[f"{name}_chars_mean"] = round(sum(values) / len(values), 1)
        stats[f"{name}_chars_max"] = max(values)
    return Split(
        path=path, rows=rows, sha256=hashlib.sha256(text.encode()).hexdigest(), stats=stats
    )


def load_task_data(uc: UseCase) -> dict[str, Split]:
    """The train and eval splits; each target becomes the text the task kind trains on (a label of
    the declared set, one line of JSON with the declared fields)."""
    task = uc.task
    fields = ("id", task.input_field, task.target_field)
    convert = {task.target_field: lambda value: uc.kind.target_text(value, task)}
    return {
        name: load_jsonl(
            getattr(uc.data, name),
            fields,
            max_chars=uc.data.max_chars,
            min_rows=uc.data.min_rows,
            convert=convert,
        )
        for name in ("train", "eval")
    }


def load_preference_data(uc: UseCase) -> dict[str, Split]:
    return {
        name: load_jsonl(
            getattr(uc.data, f"preferences_{name}"),
            PREFERENCE_FIELDS,
            max_chars=uc.data.max_chars,
            min_rows=uc.data.min_rows,
        )
        for name in ("train", "eval")
    }


def build_pairs(uc: UseCase, rows: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs from task rows, for a use case without preference files: the reference is
    chosen over another row's reference (one with a different answer, picked with a fixed seed),
    so a reward model learns whether a response fits its input."""
    import random

    task = uc.task
    rng = random.Random(seed)
    targets = [r[task.target_field] for r in rows]
    pairs = []
    for row in rows:
        others = [t for t in targets if t != row[task.target_field]]
        if not others:
            continue
        pairs.append(
            {
                "id": str(row["id"]),
                "prompt": row[task.input_field],
                "chosen": row[task.target_field],
                "rejected": rng.choice(others),
            }
        )
    return pairs


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows as JSONL (a dataset artifact's file)."""
    Path(path).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )


def overlap(a: list[dict], b: list[dict], key: str) -> int:
    """Rows of ``b`` whose ``key`` also occurs in ``a`` (train/eval leakage)."""
    seen = {row[key] for row in a}
    return sum(1 for row in b if row[key] in seen)


def format_prompt(uc: UseCase, text: str, examples: list[dict] | None = None) -> str:
    """The query for one input, with optional in-context examples (few-shot) before it. ``{labels}``
    in the instruction or template is the classification's label set."""
    task = uc.task
    labels = ", ".join(task.labels)
    instruction = task.instruction.replace("{labels}", labels)
    template = task.prompt_template.replace("{labels}", labels)
    shots = ""
    for ex in examples or []:
        shots += template.format(instruction=instruction, input=ex[task.input_field])
        shots += f" {ex[task.target_field]}\n\n"
    return shots + template.format(instruction=instruction, input=text)


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file already validated (a dataset artifact)."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def sft_records(uc: UseCase, rows: list[dict]) -> list[dict]:
    """Prompt/completion records for supervised fine-tuning."""
    return [
        {
            "prompt": format_prompt(uc, r[uc.task.input_field]),
            "completion": " " + r[uc.task.target_field],
        }
        for r in rows
    ]


def preference_records(uc: UseCase, rows: list[dict]) -> list[dict]:
    """Prompt/chosen/rejected records in the task's prompt format (reward model, DPO)."""
    return [
        {
            "prompt": format_prompt(uc, r["prompt"]),
            "chosen": " " + r["chosen"],
            "rejected": " " + r["rejected"],
        }
        for r in rows
    ]


def eval_rows(uc: UseCase, rows: list[dict]) -> list[dict]:
    """The evaluation split as every stage scores it (capped at ``evaluation.max_examples``)."""
    return rows[: uc.evaluation.max_examples] if uc.evaluation.max_examples else rows


def prompts_for(uc: UseCase, rows: list[dict], examples: list[dict] | None = None) -> list[str]:
    return [format_prompt(uc, r[uc.task.input_field], examples) for r in rows]


def references(uc: UseCase, rows: list[dict]) -> list[str]:
    return [r[uc.task.target_field] for r in rows]


@dataclass
class EvalSplit:
    """The evaluation split as every stage scores it: the rows (capped at
    ``evaluation.max_examples``), their zero-shot prompts, references and ids."""

    use_case: UseCase
    rows: list[dict]

    all_rows: list[dict] | None = None  # before the cap

    @classmethod
    def read(cls, uc: UseCase, path: Path) -> EvalSplit:
        """The split from a dataset artifact's ``eval.jsonl`` (or that file itself)."""
        path = Path(path)
        rows = read_rows(path / "eval.jsonl" if path.is_dir() else path)
        return cls(uc, eval_rows(uc, rows), rows)

    def first(self, n: int) -> EvalSplit:
        """The first ``n`` rows of the whole split (the cap does not apply)."""
        return EvalSplit(self.use_case, (self.all_rows or self.rows)[:n])

    @property
    def prompts(self) -> list[str]:
        return prompts_for(self.use_case, self.rows)

    def prompts_with(self, examples: list[dict]) -> list[str]:
        """The prompts with in-context examples before each (few-shot)."""
        return prompts_for(self.use_case, self.rows, examples)

    @property
    def references(self) -> list[str]:
        return references(self.use_case, self.rows)

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.rows]
