"""Checks on an HDF5 file's declared sizes, made before any array is read.

A few-KB file can declare a (1e9, 1536) dataset (chunked, never written) that h5py, or anndata
on top of it, would try to allocate in full. Real arrays of this field compress little (float
features ~1.1x, sparse counts ~3x), so a dataset that declares a thousand times more bytes than
it stores is damaged or forged.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError, first_line

MAX_COMPRESSION = 1_000  # declared bytes per stored byte
SMALL_DATASET_BYTES = 64 * 2**20  # below this a dataset is never refused for its size
MAX_DATASET_BYTES = 64 * 2**30  # no one slide's array is this large
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
    if not sys.platform.startswith("linux"):  # pragma: no cover - Windows, macOS
        problem = _walk(path)
        if problem:
            raise InputError(problem, path)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: walk, report, leave without running the parent's exit handlers
        code = 1
        try:
            os.close(read_end)
            _cap_memory(CHECK_MEMORY_BYTES)
            problem = _walk(path)
            os.write(write_end, (problem or "").encode("utf-8", "replace")[:4000])
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    status = _wait(pid, timeout_s)
    with os.fdopen(read_end, "rb") as pipe:
        problem = pipe.read().decode("utf-8", "replace") if status == 0 else ""
    if status is None:
        raise InputError(
            f"reading it did not finish in {timeout_s:.0f} s (damaged HDF5 structure)", path
        )
    if status < 0:
        raise InputError(
            f"reading it crashes the HDF5 library (signal {-status}): the file is damaged", path
        )
    if status > 0:
        raise InputError("cannot read as HDF5 (the structure check failed)", path)
    if problem:
        raise InputError(problem, path)


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


def _wait(pid: int, timeout_s: float) -> int | None:
    """The child's exit code (negative: the signal that ended it), None after killing it at the
    timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


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
