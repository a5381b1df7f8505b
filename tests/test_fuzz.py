"""Fuzzed inputs, in-process: every reader either reads a mutated file into a result that passes
its format's invariants, or refuses it with ``InputError``; nothing else escapes.

The mutations, readers and invariants are those of ``benchmarks/fuzz.py`` (imported from there);
that script reads 10,000 of them in worker processes with timeouts and a memory cap. Here a few
hundred run in this process under an address-space cap (a size-bomb dataset must not take the
machine's memory). Hypothesis is derandomized: ``make test`` reads the same inputs every time.
A failure prints the command that rebuilds the input and shows its traceback.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "fuzz.py"
SEED = 0  # the script's --seed: case i of a format is rng([SEED, i]), as in the script
# examples per format (~400 in all, ~12 s on an idle 2-core machine): a prediction costs ~1 s,
# an h5ad or embedding read ~0.2 s (its HDF5 check runs in a forked child), the others ~0.03 s
EXAMPLES = {"h5ad": 20, "embeddings_h5": 20, "authors": 20, "predict": 2, "run": 40}
DEFAULT_EXAMPLES = 50


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("histoprism_fuzz", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    with fuzz.quiet():
        return fuzz.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def readers(seeds):
    return fuzz._readers(seeds)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_cases")


def test_seeds_read_cleanly(seeds, readers, work):
    """Unmutated, every seed passes its invariants (else the fuzz counts would mean nothing)."""
    with fuzz.quiet():
        assert fuzz.check_seeds(seeds, work, readers) == {}


def _check_case(fmt: str, index: int, seeds, readers, work: Path) -> None:
    rng = np.random.default_rng([SEED, index])
    assert fuzz.choose_format(rng, (fmt,)) == fmt  # the same draws as the script's case
    case = work / f"{fmt}{index}"
    try:
        with fuzz.quiet(), fuzz.memory_cap(4.0):
            result = fuzz.run_case(fmt, seeds, case, rng, readers)
    finally:
        shutil.rmtree(case, ignore_errors=True)
    assert result.outcome in ("ok", "clean"), (
        f"{fmt} case {index} ({result.mutation}): {result.outcome} {result.exc_type}: "
        f"{result.message}\n{result.origin}\n{result.traceback}\n"
        f"replay: python benchmarks/fuzz.py --seed {SEED} --formats {fmt} --replay {index}"
    )


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_mutated_input_reads_or_is_refused(fmt, seeds, readers, work):
    @settings(
        max_examples=EXAMPLES.get(fmt, DEFAULT_EXAMPLES),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],  # an index is a seed: nothing to shrink, one failure is enough
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(index=st.integers(0, 2**31 - 1))
    def check(index: int) -> None:
        _check_case(fmt, index, seeds, readers, work)

    check()
