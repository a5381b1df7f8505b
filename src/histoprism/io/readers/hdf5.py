"""Checks on an HDF5 file's declared sizes, made before any array is read.

A few-KB file can declare a (1e9, 1536) dataset (chunked, never written) that h5py, or anndata
on top of it, would try to allocate in full. Real arrays of this field compress little (float
features ~1.1x, sparse counts ~3x), so a dataset that declares a thousand times more bytes than
it stores is damaged or forged.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import resource
import select
import signal
import sys
from pathlib import Path

import h5py
import numpy as np

from ..._core.errors import InputError, first_line

MAX_COMPRESSION = 1_000  # declared bytes per stored byte
SMALL_DATASET_BYTES = 64 * 2**20  # below this a dataset is never refused for its size
MAX_DATASET_BYTES = 64 * 2**30  # no one slide's array is this large
FINGERPRINT_BYTES = 4 * 2**20  # bytes hashed to tell versions of a file apart
CHECK_TIMEOUT_S = 10.0  # the structure walk of a healthy file takes well under a second
CHECK_MEMORY_BYTES = 2 * 2**30  # what the walking child may map beyond its parent's mappings


def check_declared_size(ds: h5py.Dataset, path: Path) -> None:
    """InputError when ``ds`` declares more bytes than the file plausibly holds for it."""
    shape = ds.shape or ()
    declared = int(np.prod(shape, dtype=np.float64)) * ds.dtype.itemsize
    if declared <= SMALL_DATASET_BYTES:
        return
    stored = ds.id.get_storage_size()
    if declared > MAX_DATASET_BYTES or declared > MAX_COMPRESSION * max(stored, 1):
        raise InputError(
            f"'{ds.name}' declares shape {shape} ({declared / 2**30:.1f} GiB) but stores "
            f"{stored / 2**20:.1f} MiB: damaged or not written",
            path,
        )


def positive_attribute(value, name: str, path: Path) -> float:
    """A file attribute that must be one finite positive number (a patch size, a pixel size);
    InputError naming the attribute and the file for text, arrays of several values, NaN, <= 0."""
    try:
        x = float(np.asarray(value).item())
    except (TypeError, ValueError):  # text, an array of several values ...
        x = math.nan
    if not (math.isfinite(x) and x > 0):
        raise InputError(f"attribute {name} is {value!r}, expected a positive number", path)
    return x


def check_file(path: Path, *, timeout_s: float = CHECK_TIMEOUT_S) -> None:
    """Walk the HDF5 file ``path`` (every object, every attribute, declared sizes, one element
    of every dataset) and raise InputError naming it if it is damaged.

    A damaged file can crash the HDF5 C library (a segfault on a flipped byte in an attribute
    message) or loop forever in it; neither can be caught in this process. So the walk runs in a
    forked child, under a memory cap, and a crash, a hang past ``timeout_s`` or an exception
    there becomes one line here. Off Linux (no fork on Windows; on macOS a forked child of a
    threaded process may crash by itself) it runs in this process.
    """
    problem = _verdict(str(path), _version(Path(path)), timeout_s)
    if problem:
        raise InputError(problem, path)


def _version(path: Path) -> tuple:
    """What tells two versions of a file apart: inode, size, mtime, and a hash of its bytes
    (all of them up to FINGERPRINT_BYTES, else the first and last half of that): mtimes are
    coarse (a rewrite within a few ms keeps one), slides are large."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        if stat.st_size <= FINGERPRINT_BYTES:
            digest.update(f.read())
        else:
            digest.update(f.read(FINGERPRINT_BYTES // 2))
            f.seek(-FINGERPRINT_BYTES // 2, os.SEEK_END)
            digest.update(f.read())
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, digest.hexdigest()


@functools.lru_cache(maxsize=4096)
def _verdict(path: str, version: tuple, timeout_s: float) -> str | None:
    """The problem of the file (or None), once per version of it (``_version``): a training
    run reads each slide's files many times, and each walk costs a fork."""
    if not sys.platform.startswith("linux"):  # pragma: no cover - Windows, macOS
        return _walk(Path(path))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: walk, report, leave without running the parent's exit handlers
        code = 1
        try:
            os.close(read_end)
            _cap_memory(CHECK_MEMORY_BYTES)
            problem = _walk(Path(path))
            os.write(write_end, (problem or "").encode("utf-8", "replace")[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    status, problem = _wait(pid, read_end, timeout_s)
    if status is None:
        return f"reading it did not finish in {timeout_s:.0f} s (damaged HDF5 structure)"
    if status < 0:
        return f"reading it crashes the HDF5 library (signal {-status}): the file is damaged"
    if status > 0:
        return "cannot read as HDF5 (the structure check failed)"
    return problem or None


def _cap_memory(extra: int) -> None:
    """Let this (forked) process map at most ``extra`` bytes beyond what it maps now, so that a
    forged attribute size fails with MemoryError instead of exhausting the machine."""
    try:
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux: no cap
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = mapped + extra if hard == resource.RLIM_INFINITY else min(mapped + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _wait(pid: int, read_end: int, timeout_s: float) -> tuple[int | None, str]:
    """(the child's exit code, negative for the signal that ended it, or None after killing it
    at the timeout; what it wrote). The pipe wakes us as soon as the child writes or dies."""
    with os.fdopen(read_end, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], timeout_s)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, ""
        message = pipe.read().decode("utf-8", "replace")  # to EOF: the child has exited
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, message if code == 0 else ""


def _walk(path: Path) -> str | None:
    """The problem of the file, or None: every object and attribute read, declared sizes
    checked, one element of each non-empty dataset read (its chunk index is walked)."""
    try:
        with h5py.File(path, "r") as h5:
            objects: list = [h5]
            h5.visititems(lambda _, obj: objects.append(obj))
            for obj in objects:
                for name in obj.attrs:
                    obj.attrs[name]
                if isinstance(obj, h5py.Dataset):
                    check_declared_size(obj, path)
                    if obj.size and obj.shape:
                        obj[(0,) * len(obj.shape)]
    except InputError as exc:
        return exc.problem
    except MemoryError:
        return "an attribute or dataset declares more memory than a slide's file can hold"
    except Exception as exc:  # OSError, RuntimeError, KeyError ... from a damaged file
        return f"cannot read as HDF5 ({first_line(exc)})"
    return None
