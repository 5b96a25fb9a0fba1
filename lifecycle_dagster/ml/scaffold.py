"""A use case drafted from a data file (``lifecycle init``): its columns read, the task kind guessed
(or given), the labels of a classification and the fields of an extraction collected, and a
commented YAML written that ``lifecycle run --config`` accepts as it is. Thresholds are left to the
person, with a comment saying what each metric means."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle_dagster.ml import tasks
from lifecycle_dagster.ml.datafiles import read_table
from lifecycle_dagster.ml.errors import InputError

ID_NAME = re.compile(r"(^|[^a-z])(id|key|#|no|number|uuid)([^a-z]|$)", re.IGNORECASE)
LABEL_NAME = re.compile(r"label|class|category|intent|queue|topic|sentiment|type", re.IGNORECASE)
INSTRUCTIONS = {
    "classification": "Which category fits this text? Answer with one of: {labels}.",
    "extraction": "Extract {fields} from the text as one JSON object.",
    "question_answering": "Answer in a few words.",
    "summarisation": "Summarise the text in one sentence.",
}
MAX_LABELS = 50


@dataclass
class Column:
    name: str
    values: list

    @property
    def texts(self) -> list[str]:
        return [v for v in self.values if isinstance(v, str) and v.strip()]

    @property
    def distinct(self) -> int:
        return len({json.dumps(v, sort_keys=True, default=str) for v in self.values})

    @property
    def mean_words(self) -> float:
        texts = self.texts
        return sum(len(t.split()) for t in texts) / max(1, len(texts))

    @property
    def objects(self) -> list[dict] | None:
        """The values as JSON objects, when every one is (or parses to) one."""
        out = []
        for v in self.values:
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    return None
            if not isinstance(v, dict):
                return None
            out.append(v)
        return out or None


@dataclass
class Draft:
    """What ``init`` found in the file, and the use case it proposes."""

    path: Path
    format: str
    rows: int
    kind: str
    input: str
    target: str
    id: str | None
    labels: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)
    why: str = ""


def draft(path: Path, kind: str | None = None) -> Draft:
    """Read ``path`` and propose a use case for it: the target column (JSON objects: an
    extraction; a small set of repeated values: a classification; short answers: question
    answering; else a summarisation), the longest text column as the input, a unique short
    column named like an id as the id."""
    path = Path(path)
    table = read_table(path)
    if not table.rows:
        raise InputError(path, "no rows")
    names = table.columns or list(dict.fromkeys(k for r in table.rows for k in r.row))
    cols = {n: Column(n, [r.row.get(n) for r in table.rows]) for n in names}
    n = len(table.rows)
    id_col = next(
        (
            c.name
            for c in cols.values()
            if ID_NAME.search(c.name) and c.distinct == n and c.mean_words <= 3
        ),
        None,
    )
    rest = [c for c in cols.values() if c.name != id_col]
    if len(rest) < 2:
        raise InputError(path, f"needs an input and a target column; found {', '.join(names)}")
    if kind is not None:
        tasks.get(kind)  # a known kind
    target, why = _target(path, rest, n, kind)
    kind = kind or why[0]
    texts = [c for c in rest if c is not target and c.texts]
    if not texts:
        raise InputError(path, f"no text column to use as the input besides '{target.name}'")
    source = max(texts, key=lambda c: c.mean_words)
    out = Draft(
        path=path,
        format=table.format,
        rows=n,
        kind=kind,
        input=source.name,
        target=target.name,
        id=id_col,
        unused=[c.name for c in rest if c not in (target, source)],
        why=why[1],
    )
    if kind == "classification":
        counts: dict[str, int] = {}
        for v in target.values:
            counts[str(v)] = counts.get(str(v), 0) + 1
        if len(counts) > MAX_LABELS:
            raise InputError(
                path,
                f"column '{target.name}' has {len(counts)} distinct values, too many labels for a "
                f"classification (at most {MAX_LABELS})",
            )
        out.labels = sorted(counts, key=lambda k: (-counts[k], k))
    if kind == "extraction":
        objects = target.objects
        if objects is None:
            raise InputError(path, f"column '{target.name}' does not hold JSON objects throughout")
        out.fields = _fields(objects)
    return out


def _target(
    path: Path, columns: list[Column], n: int, kind: str | None
) -> tuple[Column, tuple[str, str]]:
    """The column to predict, and (kind, why)."""
    objects = [c for c in columns if c.objects]
    labelled = [c for c in columns if 1 < c.distinct <= min(MAX_LABELS, n // 2) and c.texts]
    labelled.sort(key=lambda c: (not LABEL_NAME.search(c.name), c.distinct))
    if kind in (None, "extraction") and objects:
        return objects[0], ("extraction", f"'{objects[0].name}' holds JSON objects")
    if kind in (None, "classification") and labelled:
        c = labelled[0]
        return c, ("classification", f"'{c.name}' takes {c.distinct} values over {n} rows")
    texts = sorted((c for c in columns if c.texts), key=lambda c: c.mean_words)
    if not texts:
        raise InputError(path, "no text column to predict")
    shortest = texts[0]
    if kind == "question_answering" or (kind is None and shortest.mean_words <= 6):
        return shortest, (
            "question_answering",
            f"'{shortest.name}' holds short answers ({shortest.mean_words:.1f} words on average)",
        )
    return shortest, (
        "summarisation",
        f"'{shortest.name}' is the shorter text ({shortest.mean_words:.1f} words on average)",
    )


def _fields(objects: list[dict]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for obj in objects:
        for key, value in obj.items():
            if value is None or key in kinds:
                continue
            if isinstance(value, bool):
                kinds[key] = "boolean"
            elif isinstance(value, int):
                kinds[key] = "integer"
            elif isinstance(value, float):
                kinds[key] = "number"
            elif isinstance(value, list):
                kinds[key] = "list"
            else:
                kinds[key] = "string"
    for obj in objects:  # a key only ever null is still a field
        for key in obj:
            kinds.setdefault(key, "string")
    return kinds


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def render(d: Draft, name: str, data_path: str) -> str:
    """The use case as commented YAML."""
    kind = tasks.get(d.kind)
    instruction = INSTRUCTIONS[d.kind].replace("{fields}", ", ".join(d.fields))
    lines = [
        f"# Use case drafted by `lifecycle init` from {d.path.name} ({d.format}, {d.rows} rows).",
        f"# Task kind: {d.kind}, because {d.why}. Check every value, then:",
        "#   lifecycle validate <this file> --profile tiny",
        "#   lifecycle run --profile tiny --config <this file>",
        f"name: {name}",
        f"description: {_q(f'{kind.description} Drafted from {d.path.name}.')}",
        "task:",
        f"  type: {d.kind}  # one of: {', '.join(sorted(tasks.KINDS))}",
        f"  instruction: {_q(instruction)}",
        '  prompt_template: "{instruction}\\n\\n{input}\\n\\nAnswer:"',
        "  chat_template: auto  # instruct models get the template as the user turn of their chat",
    ]
    if d.labels:
        lines.append(f"  labels: [{', '.join(_q(v) for v in d.labels)}]  # by frequency")
    if d.fields:
        lines.append("  fields:  # name: string, number, integer, boolean or list")
        lines += [f"    {_q(k)}: {v}" for k, v in d.fields.items()]
    lines += [
        "data:",
        f"  train: {_q(data_path)}",
        "  # eval: held-out file; without one, eval_fraction of train is held out (seeded"
        + (", per label)" if d.kind == "classification" else ")"),
        "  eval_fraction: 0.2",
        "  split_seed: 0",
        "  columns:  # field: the column of the file holding it",
        f"    input: {_q(d.input)}",
        f"    target: {_q(d.target)}",
    ]
    if d.id:
        lines.append(f"    id: {_q(d.id)}")
    else:
        lines.append("    # id: no id column found; rows are named by their line")
    if d.unused:
        lines.append(f"  # not used: {', '.join(d.unused)}")
    lines += [
        "base_model:",
        "  source: scratch  # or gguf / local (a directory with safetensors) / hub, with a path",
        "evaluation:",
        f"  # primary_metric: {kind.primary}  (the kind's; metrics: {', '.join(kind.metrics)})",
        "  thresholds: {}  # set the bar the candidate must meet, e.g.",
        f"  #   {kind.primary}: {{min: 0.8}}",
        "  #   format_ok: {min: 0.95}",
        "",
    ]
    return "\n".join(lines)
