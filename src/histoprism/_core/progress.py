"""Progress bars for long work (rich), silent off rank 0 and when HISTOPRISM_QUIET is set."""

from __future__ import annotations

import importlib.util
import os

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .distributed import torchrun_env  # torch-free: progress bars must not load torch


class _InfoColumn(ProgressColumn):
    """Free text a task may carry in its ``info`` field (losses, sample id)."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("info", "")))


def progress_bar(*, enabled: bool = True) -> Progress:
    """A rich Progress to use as a context manager; tasks may carry an ``info`` field."""
    quiet = os.environ.get("HISTOPRISM_QUIET") or torchrun_env()[0] != 0
    console = Console(stderr=True)
    # in a notebook rich draws through ipywidgets; without them it warns at every refresh
    if console.is_jupyter and importlib.util.find_spec("ipywidgets") is None:
        quiet = True
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        _InfoColumn(),
        console=console,
        disable=bool(quiet) or not enabled,
        transient=False,
    )
