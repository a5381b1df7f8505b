"""Atomic writes, atomic directories, directory locks and the clean-up of killed runs' leftovers.

Outputs appear under their final name only when complete. Every temporary name is
``.{stem}.{pid}.partial{suffix}``, so that the next run can tell leftovers of dead processes
(``remove_partials``) from files another live process is still writing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError
from .storage import writing

try:  # POSIX only: on Windows directories are not locked (directory_lock is a no-op)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# .{stem}.{pid}.partial{suffix}: the temporary names of atomic_path and atomic_directory
_PARTIAL = re.compile(r"^\..*\.(?P<pid>\d+)\.partial(\..*)?$")


def partial_name(path: Path) -> Path:
    """This process's temporary sibling of ``path`` (the suffix kept: anndata, h5py dispatch on it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


def _remove(path: Path) -> None:
    """Remove a file or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` if the block succeeds.

    A crash or an exception leaves any previous ``path`` untouched and removes the partial file;
    a write that fails for lack of room is one ``storage.OutputError`` naming ``path``. The
    temporary name keeps the suffix so that libraries which dispatch on it (anndata, h5py) work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --- directories replaced as one unit ----------------------------------------------------------
def old_name(path: Path) -> Path:
    """Where ``replace_directory`` parks the previous ``path`` during a swap."""
    return path.with_name(f".{path.name}.old")


def complete_directory(path: str | Path) -> Path | None:
    """The complete copy of a directory written by ``atomic_directory``: ``path``, or the previous
    version parked by a swap that was killed between its two renames; None if neither exists.

    Read-only (several DDP ranks may look at once); the next swap tidies up.
    """
    path = Path(path)
    for candidate in (path, old_name(path)):
        if candidate.is_dir():
            return candidate
    return None


def settle_directory(path: str | Path) -> None:
    """Remove the previous version of ``path`` that a swap killed after its renames (before its
    clean-up) left parked; ``path`` is the complete one then."""
    path = Path(path)
    old = old_name(path)
    if path.is_dir() and old.exists():
        shutil.rmtree(old)


def replace_directory(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` in place of ``path`` (which may exist or not).

    Two renames, ``path`` -> ``.{name}.old`` then ``new`` -> ``path``, as a directory cannot be
    renamed onto a non-empty one. At every instant ``path`` or else ``.{name}.old`` is a complete
    version (``complete_directory``), whatever the instant a kill comes at.
    """
    old = old_name(path)
    settle_directory(path)
    if path.exists():
        os.replace(path, old)
    # (``path`` missing while ``.old`` exists: a swap was killed between its renames and ``.old``
    # is the complete version until the next rename)
    os.replace(new, path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh, empty temporary sibling of the directory ``path``; swap it in for ``path``
    if the block succeeds (``replace_directory``), so that readers find the whole old or the whole
    new content, never a mix. An exception leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    _remove(tmp)  # a leftover of an earlier process with this pid
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        _remove(tmp)


# --- leftovers of killed processes -------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this machine). Signal 0 checks without signalling."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:  # pragma: no cover - e.g. Windows' os.kill on a pid that is gone
        return False
    return True


def remove_partials(directory: str | Path) -> list[Path]:
    """Remove the temporary files and directories (``.{stem}.{pid}.partial{suffix}``) that dead
    processes left in ``directory`` (not its sub-directories); return what was removed.

    ``atomic_path`` removes its partial file after an exception, but a kill (SIGKILL, OOM, power)
    leaves it. A partial whose pid is alive belongs to a process still writing: kept.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        match = _PARTIAL.match(entry.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            _remove(entry)
            removed.append(entry)
    if removed:
        log.info("removed %d leftover(s) of killed runs in %s", len(removed), directory)
    return removed


# --- one writer per directory ------------------------------------------------------------------
@contextlib.contextmanager
def directory_lock(
    directory: str | Path, what: str = "", *, created: bool | None = None
) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the block, so that two
    processes never write into one run or output directory; yield the directory. ``what`` (e.g.
    "training"), with the pid, goes into the message of a process that finds the directory locked.

    ``flock`` on ``{directory}/.lock``, non-blocking: a second process (or a second lock in this
    one: the lock belongs to the open file) gets an InputError naming the holder's pid. The holder
    removes the file when it is done (and the directory it created, if a failed command leaves it
    empty; ``created``: whether this command made it, default whether it is missing now); a killed
    one leaves the file, and the kernel drops its lock.
    Without fcntl (Windows) or where the file system refuses locks, nothing is locked.
    """
    directory = Path(directory)
    created = not directory.exists() if created is None else created
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield directory
        return
    path = directory / LOCK_FILE
    fd, locked = _open_locked(path, directory)
    failed = False
    try:
        if locked:  # who holds it, for the message of whoever comes second
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}".strip().encode() + b"\n", 0)
        yield directory
    except BaseException:
        failed = True
        raise
    finally:
        if locked:  # unlinked while still held: a process that opened it finds it stale
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        if locked and failed and created:  # a failed command leaves no empty folder behind
            with contextlib.suppress(OSError):
                directory.rmdir()


def _open_locked(path: Path, directory: Path) -> tuple[int, bool]:
    """Open and lock ``path``; retried when the file locked was unlinked meanwhile by a holder
    that just finished (its lock then guards nothing)."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_lock(fd, directory)
            if not locked or _same_file(fd, path):
                return fd, locked
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise InputError("the directory lock keeps being replaced; retry", directory)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _try_lock(fd: int, directory: Path) -> bool:
    """Lock ``fd``; False where the file system cannot lock (logged), InputError if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            log.warning("%s: cannot lock (%s); not guarded against a second writer", directory, exc)
            return False
        # "{pid} {what}", written by the holder just after locking: may not be there yet
        pid, _, doing = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
        who = ", ".join([f"pid {pid}" if pid.isdigit() else "pid unknown"] + [doing] * bool(doing))
        raise InputError(
            f"another histoprism process ({who}) is writing into this directory; wait for it "
            "to finish or choose another output directory",
            directory,
        ) from None
    return True
