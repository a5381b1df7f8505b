"""``benchmark.measure_process``: one way to time a child process and read its own peak memory
(used by ``histoprism benchmark`` and benchmarks/run.py)."""

from __future__ import annotations

import sys

from histoprism.workflows.benchmark import measure_process


def test_output_exit_code_and_own_peak_memory():
    code = (
        "import sys; b = bytearray(200 * 2**20); print('x' * 200_000); "
        "print('bad', file=sys.stderr); sys.exit(3)"
    )
    m = measure_process([sys.executable, "-c", code])
    assert m["returncode"] == 3 and not m["timed_out"]
    assert len(m["stdout"]) > 200_000  # more than a pipe holds: no stall
    assert m["stderr"].strip() == "bad"
    assert m["peak_rss_mb"] > 200  # the child's 200 MB, not this process's
    assert m["seconds"] > 0


def test_timeout_kills_the_child():
    m = measure_process([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert m["timed_out"] and m["returncode"] != 0
    assert m["seconds"] < 10
