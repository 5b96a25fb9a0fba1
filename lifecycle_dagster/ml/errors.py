"""Errors that name what was wrong with the user's input: the file, the line and the field."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

SHOWN = 20  # faults listed by InputErrors; the rest are counted


class InputError(ValueError):
    """A use-case, profile or data file the pipeline cannot accept.

    The message always starts with ``file:line`` (line omitted when the whole file is at fault;
    ``file:row N`` for a row of a table without lines, such as Parquet) and names the field, so
    that a person can go straight to the problem.
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        row: int | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.row = row
        self.field = field
        self.reason = message
        where = self.path
        if line is not None:
            where = f"{self.path}:{line}"
        elif row is not None:
            where = f"{self.path}:row {row}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


class InputErrors(InputError):
    """Every fault found in the input at once, one per line; the last line names a fault too."""

    def __init__(self, errors: Sequence[InputError]) -> None:
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(
            first.path, first.reason, line=first.line, field=first.field, row=first.row
        )
        lines = [str(e) for e in self.errors[:SHOWN]]
        if len(self.errors) > SHOWN:
            lines.insert(0, f"{len(self.errors)} faults, the first {SHOWN}:")
        elif len(self.errors) > 1:
            lines.insert(0, f"{len(self.errors)} faults:")
        self.args = ("\n".join(lines),)

    def __str__(self) -> str:
        return self.args[0]


def collect(errors: list[InputError]) -> None:
    """Raise the faults gathered (one as itself, several as ``InputErrors``), if any."""
    flat = [x for e in errors for x in (e.errors if isinstance(e, InputErrors) else [e])]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise InputErrors(flat)
