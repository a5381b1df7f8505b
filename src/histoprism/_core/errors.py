"""The one exception type for bad user input.

The CLI prints its message as a single line and exits non-zero; library users catch it like any
``ValueError``. Messages name the file and the problem.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad input: a missing file, misaligned barcodes, NaN embeddings, an unknown cancer code ..."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its type name when it has none): what
    an ``InputError`` quotes, so that the CLI's error stays one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
