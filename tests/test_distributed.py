"""torchrun's environment is read in one place (``distributed.torchrun_env``), without torch."""

from __future__ import annotations

import subprocess
import sys

from histoprism._core.distributed import rank_share, torchrun_env
from histoprism._core.progress import progress_bar


def test_plain_process_is_rank_0_of_1(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_env() == (0, 1, 0)
    assert rank_share([1, 2, 3]) == [1, 2, 3]


def test_torchrun_variables_reach_every_user(monkeypatch):
    monkeypatch.delenv("HISTOPRISM_QUIET", raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert torchrun_env() == (3, 4, 1)
    assert rank_share(list(range(10))) == [3, 7]
    assert progress_bar().disable  # silent off rank 0
    monkeypatch.setenv("RANK", "0")
    assert not progress_bar().disable


def test_cli_and_progress_do_not_load_torch():
    code = (
        "import sys, histoprism.cli, histoprism._core.progress, histoprism._core.distributed; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
