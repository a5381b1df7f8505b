"""Sample ids and encoder names are names, never paths.

They become file names (``st/{id}.h5ad``, ``PRED/{id}.h5ad``, ``embeddings/{encoder}/``), so a
metadata row reading ``../../elsewhere/X`` or ``/abs/X`` must be refused where it enters, not
joined onto a directory. Leading dots are refused too: ``.{name}.{pid}.partial`` files are our
temporaries, and hidden files are skipped by the directory listings.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

MAX_NAME_LENGTH = 200  # file systems allow 255 bytes; the rest is for suffixes and temporaries
_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")


def name_problem(value: object) -> str | None:
    """Why ``value`` cannot be a sample id or encoder name, or None when it can."""
    if not isinstance(value, str):
        return f"is not text ({type(value).__name__})"
    if not value.strip():
        return "is empty"
    if value != value.strip():
        return f"'{value.strip()}' has leading or trailing spaces"
    if _FORBIDDEN.search(value):
        return f"{value!r} contains a path separator or a control character"
    if value.startswith("."):
        return f"'{value}' starts with a dot"
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} bytes"
    return None


def check_name(value: object, *, what: str, path: str | Path | None = None) -> str:
    """``value`` if it is a valid name, else InputError naming ``path`` and the problem.

    ``what`` says where the value came from, e.g. "sample id in row 3".
    """
    problem = name_problem(value)
    if problem is not None:
        raise InputError(f"{what} {problem}: ids are names, not paths", path)
    return str(value)


def child(directory: str | Path, name: str, suffix: str = "") -> Path:
    """``directory / (name + suffix)``, refusing any name that would land outside ``directory``."""
    check_name(name, what="name")
    path = Path(directory) / f"{name}{suffix}"
    if path.parent != Path(directory):
        raise InputError(f"'{name}{suffix}' would be written outside the directory", directory)
    return path
