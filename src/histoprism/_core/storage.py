"""Room to write: checked before a large output is written, and one line when a write fails anyway.

HDF5 does not recover from a failed write: the file's metadata cache keeps failing to flush, h5py
prints an "Exception ignored" traceback for every object it frees, and the interpreter can
segfault at exit. So outputs whose size is known (a prediction is at least N x G numbers) are
checked against the free space and the process's file-size limit before the first byte, and a
write that fails all the same becomes an ``OutputError`` on which the CLI exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, first_line

NO_ROOM = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class OutputError(OSError):
    """An output could not be written: no space left, a file-size limit, an unwritable folder."""

    def __init__(self, problem: str, path: str | Path) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def output_dir(path: str | Path) -> Path:
    """Create ``path`` as the output folder (parents too) and check it is a writable directory;
    InputError naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a directory", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output directory ({first_line(exc)})", path) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError("output directory is not writable", path)
    return path


def check_room(path: str | Path, nbytes: int) -> None:
    """OutputError when a file of at least ``nbytes`` cannot be written at ``path``: less free
    space on its file system, or a smaller file-size limit (``ulimit -f``). ``nbytes`` is a
    lower bound (what is stored uncompressed), so that nothing that would fit is refused; a
    write that fails all the same is caught by ``writing``."""
    path = Path(path)
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and nbytes > limit:
        raise OutputError(
            f"needs at least {_mb(nbytes)} but the file-size limit (ulimit -f) is {_mb(limit)}",
            path,
        )
    existing = next(p for p in path.parents if p.exists())  # the folder may not be made yet
    free = shutil.disk_usage(existing).free
    if nbytes > free:
        raise OutputError(f"needs at least {_mb(nbytes)} but {_mb(free)} is free on its disk", path)


def is_no_room(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for lack of room (disk full, quota, file-size limit),
    as OSError, or as the message of HDF5's or safetensors' errors, which carries the errno."""
    if isinstance(exc, OSError) and exc.errno in NO_ROOM:
        return True
    text = str(exc)  # HDF5's "errno = 27,", Python's "[Errno 27]", Rust's "(os error 27)"
    return any(
        f"errno = {e}," in text or f"[Errno {e}]" in text or f"(os error {e})" in text
        for e in NO_ROOM
    )


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write inside the block into one ``OutputError`` line naming ``path``.

    h5py reports each of its objects that fails to close after a failed write through
    ``sys.excepthook`` and ``sys.unraisablehook`` (hundreds of tracebacks); within the block those
    reports are held back, dropped when the write failed for lack of room, passed on otherwise.
    """
    held: list[tuple] = []
    hooks = sys.excepthook, sys.unraisablehook
    sys.excepthook = lambda *exc_info: held.append(("except", exc_info))
    sys.unraisablehook = lambda unraisable: held.append(("unraisable", unraisable))
    try:
        yield
    except Exception as exc:  # OSError, h5py's RuntimeError, safetensors' SafetensorError ...
        if isinstance(exc, OutputError):
            raise
        if is_no_room(exc):
            held.clear()
            raise OutputError("no room to write (disk full or file-size limit)", path) from exc
        if isinstance(exc, PermissionError):
            raise OutputError("permission denied", path) from exc
        raise
    finally:
        sys.excepthook, sys.unraisablehook = hooks
        for kind, report in held:
            hooks[0](*report) if kind == "except" else hooks[1](report)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
