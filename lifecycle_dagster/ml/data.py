"""Load and validate the use case's data files (JSONL, CSV, Parquet, ``save_to_disk``); every error
names the file, the line (or row) and the field, and every fault in every file is found at once."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lifecycle_dagster.ml.datafiles import has_split, read_table
from lifecycle_dagster.ml.errors import InputError, collect
from lifecycle_dagster.ml.retrieval import PASSAGES_FIELD, augment
from lifecycle_dagster.ml.tasks import normalize_text
from lifecycle_dagster.ml.usecase import UseCase

TASK_FIELDS = ("id",)  # plus the use case's input and target fields
PREFERENCE_FIELDS = ("id", "prompt", "chosen", "rejected")
MAX_FAULTS = 200  # per file; past this the file is plainly the wrong one


@dataclass
class Split:
    """One validated split: its rows, where each row was in its file (line or table row), the
    digest of what it was read from, and how it was split off when it shares a file."""

    path: Path
    rows: list[dict]
    sha256: str
    stats: dict = field(default_factory=dict)
    where: list[tuple[int | None, int | None]] = field(default_factory=list)  # (line, row)
    split: dict | None = None  # set when the pipeline split this file into train and eval

    def error(self, i: int, message: str, field: str | None = None) -> InputError:
        """An error naming row ``i`` of this split where it is in its file."""
        line, row = self.where[i] if i < len(self.where) else (None, None)
        return InputError(self.path, message, line=line, row=row, field=field)

    def subset(self, indices: list[int], split: dict | None = None) -> Split:
        rows = [self.rows[i] for i in indices]
        fields = [k for k in (rows[0] if rows else {}) if k != "id"]
        return Split(
            self.path,
            rows,
            self.sha256,
            _stats(rows, fields),
            [self.where[i] for i in indices],
            split,
        )


def _stats(rows: list[dict], fields: list[str]) -> dict:
    stats = {"rows": len(rows)}
    for name in fields:
        values = [len(r[name]) for r in rows] or [0]
        stats[f"{name}_chars_mean"] = round(sum(values) / len(values), 1)
        stats[f"{name}_chars_max"] = max(values)
    return stats


def load_rows(
    path: Path,
    fields: tuple[str, ...],
    *,
    max_chars: int,
    min_rows: int = 1,
    convert: dict[str, Callable[[object], str]] | None = None,
    columns: dict[str, str] | None = None,
    fmt: str | None = None,
    split: str = "train",
    check_rows: Callable[[dict], tuple[str, str] | None] | None = None,
    keep: tuple[str, ...] = (),
) -> Split:
    """Read a data file whose rows hold non-empty string ``fields``, each read from the column
    ``columns`` maps it to (else the column of its own name). A field in ``convert`` is first
    turned into its string by that function (a ``ValueError`` names the fault); ``check_rows``
    returns a ``(field, reason)`` for a row it refuses. Without an ``id`` column, a row's id is
    where it is in the file. Columns in ``keep`` are kept, as text, where a row has them.

    Refuses non-UTF-8 bytes, empty files, invalid JSON or CSV, missing columns, missing or mistyped
    fields, empty or over-long values, duplicate ids and duplicate rows; every fault in the file
    is raised together (``InputErrors``), each naming its line (or row) and field.
    """
    path = Path(path)
    table = read_table(path, fmt, split)
    columns = columns or {}

    def column(name: str) -> str:
        return columns.get(name, name)

    errors: list[InputError] = []
    present = table.columns
    if present is None:  # JSONL: the columns any row has
        present = list(dict.fromkeys(k for r in table.rows for k in r.row))
    generated_ids = "id" in fields and column("id") not in present
    if generated_ids and "id" in columns:
        errors.append(
            InputError(path, f"data.columns maps id to '{columns['id']}', no such column")
        )
    for name in fields:
        if name != "id" and table.columns is not None and column(name) not in present:
            mapped = f" (data.columns maps it to '{column(name)}')" if name in columns else ""
            line = 1 if table.format in ("csv", "tsv") else None
            errors.append(
                InputError(
                    path,
                    f"no such column{mapped}; columns: {', '.join(present)}",
                    line=line,
                    field=name,
                )
            )
    collect(errors)
    rows: list[dict] = []
    where: list[tuple[int | None, int | None]] = []
    ids: dict[str, str] = {}
    contents: dict[str, str] = {}
    for located in table.rows:
        if len(errors) >= MAX_FAULTS:
            break
        here = f"line {located.line}" if located.line else f"row {located.index}"
        row: dict = {}
        faults = []
        for name in fields:
            if name == "id" and generated_ids:
                row["id"] = f"{path.stem}-{located.line or located.index}"
                continue
            if column(name) not in located.row or located.row[column(name)] is None:
                faults.append(located.error(path, "missing", name))
                continue
            value = located.row[column(name)]
            if name in (convert or {}):
                try:
                    value = convert[name](value)
                except ValueError as exc:
                    faults.append(located.error(path, str(exc), name))
                    continue
            if name == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                kind = type(value).__name__
                faults.append(located.error(path, f"expected a string, got {kind}", name))
            elif not value.strip():
                faults.append(located.error(path, "empty", name))
            elif len(value) > max_chars:
                faults.append(
                    located.error(
                        path, f"{len(value)} characters, more than the {max_chars} allowed", name
                    )
                )
            row[name] = value
        for name in keep:  # optional columns, e.g. the document that answers a row
            if located.row.get(column(name)) is not None:
                row[name] = str(located.row[column(name)])
        if not faults and check_rows and (refused := check_rows(row)):
            faults.append(located.error(path, refused[1], refused[0]))
        if not faults and "id" in fields:
            if row["id"] in ids:
                faults.append(
                    located.error(
                        path, f"duplicate id '{row['id']}' (first on {ids[row['id']]})", "id"
                    )
                )
            else:
                ids[row["id"]] = here
            key = json.dumps([row[f] for f in fields if f != "id"])
            if key in contents:
                faults.append(
                    located.error(path, f"duplicate row (same content as {contents[key]})")
                )
            else:
                contents[key] = here
        errors.extend(faults)
        if not faults:
            rows.append(row)
            where.append((located.line, located.index))
    if not errors and len(rows) < min_rows:
        errors.append(InputError(path, f"{len(rows)} rows, fewer than the {min_rows} required"))
    collect(errors)
    return Split(
        path=path,
        rows=rows,
        sha256=table.sha256,
        stats=_stats(rows, [f for f in fields if f != "id"]),
        where=where,
    )


def load_jsonl(path: Path, fields: tuple[str, ...], **kwargs) -> Split:
    """``load_rows`` of a JSONL file."""
    return load_rows(path, fields, fmt="jsonl", **kwargs)


def split_off(split: Split, fraction: float, seed: int, stratify: str | None) -> dict[str, Split]:
    """Train and eval from one file: a seeded ``fraction`` held out, per label when ``stratify``
    names the label field (each label keeps its share; one seen once stays in train)."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(split.rows):
        groups.setdefault(row[stratify] if stratify else "", []).append(i)
    held: list[int] = []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        # Every label with two or more rows is in both splits; one seen once stays in train.
        take = min(max(round(len(members) * fraction), 1), len(members) - 1)
        held.extend(members[:take])
    held_set = set(held)
    info = {
        "from": str(split.path),
        "sha256": split.sha256,
        "eval_fraction": fraction,
        "seed": seed,
        "stratified_by": stratify,
    }
    train = [i for i in range(len(split.rows)) if i not in held_set]
    return {"train": split.subset(train, info), "eval": split.subset(sorted(held), info)}


def load_task_data(uc: UseCase) -> dict[str, Split]:
    """The train and eval splits; each target becomes the text the task kind trains on (a label of
    the declared set, one line of JSON with the declared fields). Without an eval file, the eval
    split is a save_to_disk DatasetDict's held-out split, or a seeded share of the train file
    (stratified by label for a classification). Every fault in either file is raised at once."""
    task, data = uc.task, uc.data
    fields = ("id", task.input_field, task.target_field)
    kwargs = {
        "max_chars": data.max_chars,
        "convert": {task.target_field: lambda value: uc.kind.target_text(value, task)},
        "columns": data.columns,
        "fmt": data.format,
        # the column naming the document that answers a row: retrieval's recall@k
        "keep": (uc.retrieval.document_field,)
        if uc.retrieval.enabled and uc.retrieval.document_field
        else (),
    }
    errors: list[InputError] = []
    splits: dict[str, Split] = {}
    sources = {"train": (data.train, "train"), "eval": (data.eval, "eval")}
    if data.eval is None and has_split(data.train, "eval"):
        sources["eval"] = (data.train, "eval")
    for name, (path, split) in sources.items():
        if path is None:
            continue
        try:
            splits[name] = load_rows(path, fields, min_rows=data.min_rows, split=split, **kwargs)
        except InputError as exc:
            errors.append(exc)
    collect(errors)
    if "eval" not in splits:
        stratify = task.target_field if uc.kind.name == "classification" else None
        splits = split_off(splits["train"], data.eval_fraction, data.split_seed, stratify)
        for name, split in splits.items():
            if len(split.rows) < data.min_rows:
                raise InputError(
                    data.train,
                    f"{len(split.rows)} {name} rows after holding out {data.eval_fraction:g} for "
                    f"eval, fewer than the {data.min_rows} required (data.min_rows)",
                )
    return splits


def load_preference_data(uc: UseCase) -> dict[str, Split]:
    """The preference files (every fault in both raised at once); chosen must differ from
    rejected."""

    def distinct(row: dict) -> tuple[str, str] | None:
        if normalize_text(row["chosen"]) == normalize_text(row["rejected"]):
            return "rejected", "the same response as chosen (a pair must differ)"
        return None

    errors: list[InputError] = []
    out: dict[str, Split] = {}
    for name in ("train", "eval"):
        try:
            out[name] = load_rows(
                getattr(uc.data, f"preferences_{name}"),
                PREFERENCE_FIELDS,
                max_chars=uc.data.max_chars,
                min_rows=uc.data.min_rows,
                # The mapping's prompt/chosen/rejected (the task files' id column is not theirs).
                columns={k: v for k, v in uc.data.columns.items() if k in PREFERENCE_FIELDS[1:]},
                fmt=uc.data.format,
                check_rows=distinct,
            )
        except InputError as exc:
            errors.append(exc)
    collect(errors)
    return out


def validate_data(uc: UseCase) -> tuple[dict[str, Split], dict[str, Split] | None]:
    """Every data file of the use case, validated together: the task splits and the preference
    files (None without them). Every fault in every file is raised at once, before any training."""
    errors: list[InputError] = []
    task = prefs = None
    try:
        task = load_task_data(uc)
    except InputError as exc:
        errors.append(exc)
    if uc.data.has_preferences:
        try:
            prefs = load_preference_data(uc)
        except InputError as exc:
            errors.append(exc)
    collect(errors)
    return task, prefs


def describe_split(split: Split) -> str:
    """How the eval split came about, for the UI."""
    info = split.split
    if not info:
        return f"its own file: {split.path.name}"
    by = f", stratified by {info['stratified_by']}" if info["stratified_by"] else ""
    return (
        f"held out of {Path(info['from']).name}: {info['eval_fraction']:g} of the rows, "
        f"seed {info['seed']}{by} (file sha256 {info['sha256'][:12]})"
    )


def check_token_lengths(uc: UseCase, splits: dict[str, Split], cache_dir: Path | None) -> dict:
    """Every row measured in tokens of the base model's tokenizer, prompt (in the model's prompt
    format) and answer together: a row longer than the model's context, or an eval prompt with
    no room left for ``evaluation.max_new_tokens``, is a fault naming its file, line and field.
    Rows longer than ``adaptation.max_length`` are counted (SFT cuts them). Returns what was
    measured, for the UI. A model pre-trained from scratch has no tokenizer yet: its byte-level
    tokens never outnumber the UTF-8 bytes, so the bytes are an upper bound."""
    from lifecycle_dagster.ml.models import source_tokenizer

    found = source_tokenizer(uc.base_model, cache_dir)
    if found is None and uc.base_model.source != "scratch":
        return {"token_check": "skipped: the hub model's tokenizer is not cached here"}
    context = found[1] if found else uc.base_model.scratch.context_length
    fmt = PromptFormat.of(uc, found[0]) if found else PLAIN

    def count(text: str) -> int:
        return (
            len(found[0](text, add_special_tokens=False)["input_ids"])
            if found
            else len(text.encode())
        )

    task, errors, longest, cut = uc.task, [], 0, 0
    for name, split in splits.items():
        for i, row in enumerate(split.rows):
            query = user_turn(uc, input_text(uc, row))
            prompt = count(fmt.prompt([], query))
            answer = count(fmt.completion(query, row[task.target_field]))
            need = prompt + max(answer, uc.evaluation.max_new_tokens if name == "eval" else 0)
            longest = max(longest, prompt + answer)
            cut += prompt + answer > uc.adaptation.max_length
            if found and context and need > context:
                errors.append(
                    split.error(
                        i,
                        f"{prompt} prompt tokens + {need - prompt} for the answer, more than the "
                        f"model's {context}-token context",
                        task.input_field,
                    )
                )
    collect(errors)
    return {
        "token_check": "tokens of the base model" if found else "UTF-8 bytes (upper bound)",
        "prompt_format": "chat template" if fmt.chat else "plain",
        "longest_tokens": longest,
        "context_length": context or 0,
        "rows_cut_in_sft": cut,
    }


def near_duplicates(a: list[dict], b: list[dict], key: str) -> list[str]:
    """Ids of rows of ``b`` whose ``key`` matches a row of ``a`` once normalised (case,
    punctuation, articles, spacing): near-duplicates an exact comparison misses."""
    seen = {normalize_text(row[key]) for row in a}
    return [str(row["id"]) for row in b if normalize_text(row[key]) in seen]


def build_pairs(uc: UseCase, rows: list[dict], seed: int = 0) -> list[dict]:
    """Preference pairs from task rows, for a use case without preference files: the reference is
    chosen over another row's reference (one with a different answer, picked with a fixed seed),
    so a reward model learns whether a response fits its input."""
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


PROMPT_FORMAT_FILE = "prompt_format.json"


@dataclass(frozen=True)
class PromptFormat:
    """How a query reaches the model: the use case's template as plain text, or, for a model with
    a chat template (an instruct model), that text as the user turn of the model's chat template,
    in-context examples as earlier user/assistant turns. Decided once from the base model's
    tokenizer and ``task.chat_template``, kept as JSON beside the model and the served artifact."""

    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None

    @property
    def chat(self) -> bool:
        return self.chat_template is not None

    @classmethod
    def of(cls, uc: UseCase, tokenizer) -> PromptFormat:
        """The format for ``uc`` on a model with ``tokenizer``: ``task.chat_template`` ``auto``
        uses the model's chat template when it has one, ``never`` never, ``always`` needs one."""
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        mode = uc.task.chat_template
        if mode == "always" and not template:
            raise ValueError(
                "task.chat_template is 'always' but the base model's tokenizer has no chat template"
            )
        if mode == "never" or not template:
            return cls()
        return cls(template, tokenizer.bos_token, tokenizer.eos_token)

    @classmethod
    def read(cls, folder: Path) -> PromptFormat:
        """The format recorded in a model artifact (plain where none is recorded)."""
        path = Path(folder) / PROMPT_FORMAT_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def write(self, folder: Path) -> None:
        (Path(folder) / PROMPT_FORMAT_FILE).write_text(json.dumps(asdict(self), indent=2))

    def _render(self, messages: list[dict], generation: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            [messages],
            chat_template=self.chat_template,
            add_generation_prompt=generation,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )
        return rendered[0]

    def prompt(self, turns: list[tuple[str, str]], query: str) -> str:
        """The text a model continues: earlier (query, answer) ``turns`` and then ``query``."""
        if not self.chat:
            shots = "".join(f"{q} {a}\n\n" for q, a in turns)
            return shots + query
        messages = [m for q, a in turns for m in _turn(q, a)]
        return self._render([*messages, {"role": "user", "content": query}], generation=True)

    def completion(self, query: str, answer: str) -> str:
        """What the model should write after ``prompt([], query)``: the answer, and in a chat the
        end of the assistant's turn as the template writes it."""
        if not self.chat:
            return " " + answer
        start = self.prompt([], query)
        full = self._render(_turn(query, answer), generation=False)
        if full.startswith(start):
            return full[len(start) :]
        return answer + (self.eos_token or "")

    def answer_of(self, text: str) -> str:
        """The answer in a completion written as ``completion`` writes it (or as a model
        generated it): the text before the end of the assistant's turn."""
        if self.chat:
            end = self.completion("q", "").strip()
            if end:
                text = text.split(end, 1)[0]
        return text.strip()


def _turn(query: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]


PLAIN = PromptFormat()


def user_turn(uc: UseCase, text: str) -> str:
    """The use case's template around one input (``{labels}``: a classification's label set)."""
    task = uc.task
    labels = ", ".join(task.labels)
    instruction = task.instruction.replace("{labels}", labels)
    template = task.prompt_template.replace("{labels}", labels)
    return template.format(instruction=instruction, input=text)


def input_text(uc: UseCase, row: dict, field: str | None = None) -> str:
    """A row's input (``field``, the task's input field by default; a preference pair's is
    ``prompt``) as the model reads it: with the passages retrieval found for it (the
    ``_passages`` the data assets wrote), written in as ``retrieval.template`` says."""
    text = row[field or uc.task.input_field]
    passages = row.get(PASSAGES_FIELD)
    if passages is None:
        return text
    return augment(uc.retrieval.template, text, passages)


def without_passages(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != PASSAGES_FIELD} for r in rows]


def format_prompt(
    uc: UseCase, text: str, examples: list[dict] | None = None, fmt: PromptFormat = PLAIN
) -> str:
    """The query for one input, with optional in-context examples (few-shot) before it, in the
    model's prompt format."""
    task = uc.task
    turns = [(user_turn(uc, input_text(uc, ex)), ex[task.target_field]) for ex in examples or []]
    return fmt.prompt(turns, user_turn(uc, text))


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file already validated (a dataset artifact)."""
    return [
        json.loads(line)
        for line in Path(path).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def sft_records(uc: UseCase, rows: list[dict], fmt: PromptFormat = PLAIN) -> list[dict]:
    """Prompt/completion records for supervised fine-tuning."""
    task = uc.task
    return [
        {
            "prompt": format_prompt(uc, input_text(uc, r), fmt=fmt),
            "completion": fmt.completion(user_turn(uc, input_text(uc, r)), r[task.target_field]),
        }
        for r in rows
    ]


def preference_records(uc: UseCase, rows: list[dict], fmt: PromptFormat = PLAIN) -> list[dict]:
    """Prompt/chosen/rejected records in the model's prompt format (reward model, DPO)."""
    return [
        {
            "prompt": format_prompt(uc, input_text(uc, r, "prompt"), fmt=fmt),
            "chosen": fmt.completion(user_turn(uc, input_text(uc, r, "prompt")), r["chosen"]),
            "rejected": fmt.completion(user_turn(uc, input_text(uc, r, "prompt")), r["rejected"]),
        }
        for r in rows
    ]


def eval_rows(uc: UseCase, rows: list[dict]) -> list[dict]:
    """The evaluation split as every stage scores it (capped at ``evaluation.max_examples``)."""
    return rows[: uc.evaluation.max_examples] if uc.evaluation.max_examples else rows


def prompts_for(
    uc: UseCase, rows: list[dict], examples: list[dict] | None = None, fmt: PromptFormat = PLAIN
) -> list[str]:
    return [format_prompt(uc, input_text(uc, r), examples, fmt) for r in rows]


def references(uc: UseCase, rows: list[dict]) -> list[str]:
    return [r[uc.task.target_field] for r in rows]


@dataclass
class EvalSplit:
    """The evaluation split as every stage scores it: the rows (capped at
    ``evaluation.max_examples``), their zero-shot prompts in the model's format, references and
    ids."""

    use_case: UseCase
    rows: list[dict]

    all_rows: list[dict] | None = None  # before the cap
    fmt: PromptFormat = PLAIN

    @classmethod
    def read(cls, uc: UseCase, path: Path, model: Path | None = None) -> EvalSplit:
        """The split from a dataset artifact's ``eval.jsonl`` (or that file itself), prompted in
        the format recorded in the ``model`` artifact (plain without one)."""
        path = Path(path)
        rows = read_rows(path / "eval.jsonl" if path.is_dir() else path)
        fmt = PromptFormat.read(model) if model is not None else PLAIN
        return cls(uc, eval_rows(uc, rows), rows, fmt)

    def first(self, n: int) -> EvalSplit:
        """The first ``n`` rows of the whole split (the cap does not apply)."""
        return EvalSplit(self.use_case, (self.all_rows or self.rows)[:n], fmt=self.fmt)

    @property
    def prompts(self) -> list[str]:
        return prompts_for(self.use_case, self.rows, fmt=self.fmt)

    @property
    def retrieved(self) -> bool:
        """Whether its rows carry the passages retrieval found for them."""
        return any(PASSAGES_FIELD in r for r in self.rows)

    def without_retrieval(self) -> EvalSplit:
        """The same rows, prompted without their passages."""
        rows = without_passages(self.rows)
        return EvalSplit(self.use_case, rows, without_passages(self.all_rows or rows), self.fmt)

    def prompts_with(self, examples: list[dict]) -> list[str]:
        """The prompts with in-context examples before each (few-shot)."""
        return prompts_for(self.use_case, self.rows, examples, self.fmt)

    @property
    def references(self) -> list[str]:
        return references(self.use_case, self.rows)

    @property
    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.rows]
