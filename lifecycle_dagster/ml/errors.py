"""Errors that name what was wrong with the user's input: the file, the line and the field."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A use-case, profile or data file the pipeline cannot accept.

    The message always starts with ``file:line`` (line omitted when the whole file is at fault) and
    names the field, so that a person can go straight to the problem.
    """

    def __init__(
        self, path: str | Path, message: str, *, line: int | None = None, field: str | None = None
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
