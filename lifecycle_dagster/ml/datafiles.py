"""Reading the data files a team already has: JSONL, CSV/TSV, Parquet, and directories written by
``datasets.save_to_disk``. Each row comes with where it is (a line of a text file, a row of a table)
so that every fault can name it; nothing here judges the values (``ml.data`` does)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lifecycle_dagster.ml.artifacts import file_sha256
from lifecycle_dagster.ml.errors import InputError
from lifecycle_dagster.ml.usecase_loader import read_text

FORMATS = ("jsonl", "csv", "tsv", "parquet", "arrow")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
EVAL_SPLITS = ("validation", "eval", "test")  # a DatasetDict's held-out split, in this order


@dataclass
class Located:
    """One raw row and where it is: ``line`` in a text file, else its 1-based ``row``."""

    row: dict
    line: int | None = None
    index: int | None = None

    def error(self, path: Path, message: str, field: str | None = None) -> InputError:
        return InputError(path, message, line=self.line, row=self.index, field=field)


@dataclass
class Table:
    """A data file read: its rows, its columns (where the format declares them) and the sha256 of
    what it was read from (a directory's files in name order), for the dataset's digest."""

    path: Path
    format: str
    rows: list[Located]
    columns: list[str] | None
    sha256: str


def detect_format(path: Path, given: str | None = None) -> str:
    """The format named in the use case, else the one the path says (suffix, or a ``save_to_disk``
    directory)."""
    if given:
        return given
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "arrow"
        raise InputError(path, "a directory, but not one written by datasets' save_to_disk")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            path,
            f"cannot tell the format from '{path.suffix or 'no suffix'}'; name it in data.format "
            f"({', '.join(FORMATS)})",
        )
    return fmt


def read_table(path: Path, fmt: str | None = None, split: str = "train") -> Table:
    """The rows of ``path``. ``split`` picks a split of a ``save_to_disk`` DatasetDict."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    fmt = detect_format(path, fmt)
    if fmt == "jsonl":
        return _jsonl(path)
    if fmt in ("csv", "tsv"):
        return _csv(path, "\t" if fmt == "tsv" else ",")
    if fmt == "parquet":
        return _parquet(path)
    return _arrow(path, split)


def _jsonl(path: Path) -> Table:
    text = read_text(path)
    rows = []
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
        rows.append(Located(row, line=lineno))
    return Table(path, "jsonl", rows, None, _digest(text))


def _csv(path: Path, delimiter: str) -> Table:
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise InputError(path, f"not valid CSV: {exc}", line=1) from None
    header = [h.strip() for h in header]
    seen: set[str] = set()
    for name in header:
        if not name:
            raise InputError(path, "a column without a name in the header", line=1)
        if name in seen:
            raise InputError(path, f"column '{name}' appears twice in the header", line=1)
        seen.add(name)
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(path, f"not valid CSV: {exc}", line=start) from None
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise InputError(
                path, f"{len(cells)} cells where the header has {len(header)} columns", line=start
            )
        rows.append(Located(dict(zip(header, cells, strict=True)), line=start))
    return Table(path, "csv" if delimiter == "," else "tsv", rows, header, _digest(text))


def _parquet(path: Path) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a readable Parquet file: {exc}") from None
    rows = [Located(r, index=i) for i, r in enumerate(table.to_pylist(), start=1)]
    return Table(path, "parquet", rows, table.column_names, file_sha256(path))


def _arrow(path: Path, split: str) -> Table:
    """A ``save_to_disk`` Dataset, or one split of a DatasetDict. Class labels read as their
    names."""
    from datasets import ClassLabel, DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise InputError(path, f"not a dataset written by save_to_disk: {exc}") from None
    if isinstance(data, DatasetDict):
        names = [split] if split != "eval" else [s for s in EVAL_SPLITS if s in data][:1]
        if not names or names[0] not in data:
            raise InputError(
                path, f"no '{split}' split in this DatasetDict (splits: {', '.join(data)})"
            )
        data = data[names[0]]
    labels = {n: f for n, f in data.features.items() if isinstance(f, ClassLabel)}
    rows = []
    for i, row in enumerate(data, start=1):
        for name, feature in labels.items():
            if isinstance(row.get(name), int) and row[name] >= 0:
                row[name] = feature.int2str(row[name])
        rows.append(Located(row, index=i))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".lock"):
        digest.update(f"{file.relative_to(path)}:{file_sha256(file)}\n".encode())
    return Table(path, "arrow", rows, list(data.column_names), digest.hexdigest())


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def has_split(path: Path, split: str) -> bool:
    """Whether ``path`` is a ``save_to_disk`` DatasetDict with ``split`` ("eval": a held-out one)."""
    path = Path(path)
    if not (path / "dataset_dict.json").exists():
        return False
    names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    return any(s in names for s in (EVAL_SPLITS if split == "eval" else (split,)))
