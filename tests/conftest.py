"""Session fixtures: one tiny synthetic cohort and one tiny run of each model kind, built once.

Tests must not write into ``tiny_cohort`` or ``trained_runs``; to break a file, take a copy with
the ``cohort_copy`` factory (it copies what a cohort needs, not the synthetic ``ceiling/``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import netguard
import numpy as np
import pandas as pd
import pytest
import torch

# huggingface_hub reads this when imported: no user-agent telemetry (its agent registry is
# fetched from huggingface.co whatever HF_ENDPOINT says)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from histoprism._core import keys  # noqa: E402
from histoprism.synthetic.cohort import make_cohort, tiny  # noqa: E402

# --- no network: the package opens none unless asked, and no test asks beyond 127.0.0.1 --------
NETWORK_GUARD = Path(tempfile.mkdtemp(prefix="histoprism-netguard-"))
NETWORK_LOG = NETWORK_GUARD / "attempts.log"
netguard.install_everywhere(NETWORK_GUARD, NETWORK_LOG)


def pytest_sessionfinish(session, exitstatus):
    """Any attempt, in any process, fails the run, even one a library caught and swallowed."""
    tried = netguard.attempts(NETWORK_LOG)
    if tried:
        print("\nnetwork access attempted during the tests:", *tried, sep="\n  ", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(NETWORK_GUARD, ignore_errors=True)


ENCODER = "synthetic"  # embedding folder of the synthetic cohort
EPOCHS = 3  # training epochs of the tiny HistoPrism and MLP runs
RUN_KINDS = ("histoprism", "ridge", "ridge-knn", "mlp")


@pytest.fixture(scope="session", autouse=True)
def _quiet_single_threaded():
    """No progress bars; one torch thread (the tiny tensors here run 10x slower on two threads
    that share two busy cores with other processes)."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISTOPRISM_QUIET", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """8 slides (IDC, COAD; one targeted 100-gene slide in train), 80-200 spots, 300 genes, 32-d."""
    return make_cohort(tmp_path_factory.mktemp("tiny_cohort"), config=tiny())


@pytest.fixture(scope="session")
def trained_runs(tiny_cohort, tmp_path_factory) -> dict[str, Path]:
    """Run directory per model kind, trained on ``tiny_cohort`` with seed 0."""
    from histoprism.training.api import train

    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for kind in RUN_KINDS:
        epochs = EPOCHS if kind in ("histoprism", "mlp") else None
        runs[kind] = train(
            tiny_cohort, ENCODER, root / kind, model=kind, epochs=epochs, seed=0, progress=False
        )
    return runs


class CohortCopy:
    """A writable copy of a cohort with helpers that break one file at a time."""

    def __init__(self, src: Path, dst: Path):
        self.root = Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns(keys.CEILING_DIR)))

    def st_path(self, sid: str) -> Path:
        return self.root / keys.ST_DIR / f"{sid}.h5ad"

    def emb_path(self, sid: str, encoder: str = ENCODER) -> Path:
        return self.root / keys.EMBEDDINGS_DIR / encoder / f"{sid}.h5"

    def set_cancer(self, sid: str, code: str) -> None:
        path = self.root / keys.METADATA_FILES[0]
        md = pd.read_csv(path, dtype=str)
        md.loc[md[keys.META_ID] == sid, keys.META_CANCER] = code
        md.to_csv(path, index=False)

    def edit_embedding(self, sid: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Replace the slide's features by ``fn(features)`` (rows may be dropped: coords and
        barcodes keep the first rows)."""
        path = self.emb_path(sid)
        with h5py.File(path, "r") as f:
            data = {k: f[k][...] for k in f}
        feats = np.asarray(fn(data[keys.H5_FEATURES].copy()), dtype=np.float32)
        data[keys.H5_FEATURES] = feats
        for k in (keys.H5_COORDS, keys.H5_BARCODES):
            data[k] = data[k][: len(feats)]
        with h5py.File(path, "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v)

    def edit_st(self, sid: str, fn: Callable[[ad.AnnData], ad.AnnData]) -> None:
        path = self.st_path(sid)
        fn(ad.read_h5ad(path)).write_h5ad(path)


@pytest.fixture
def cohort_copy(tiny_cohort, tmp_path) -> Callable[[], CohortCopy]:
    """Factory of writable copies of ``tiny_cohort`` under this test's ``tmp_path``."""
    made = []

    def make() -> CohortCopy:
        made.append(CohortCopy(tiny_cohort, tmp_path / f"cohort{len(made)}"))
        return made[-1]

    return make


def assert_report_tables(page: str, collections=("hallmark", "go")) -> None:
    """The per-model report shows every table: overview, headline, per cancer, per slide, and
    one per-pathway table per gene-set collection."""
    ids = ["overview", "headline", "per-cancer", "per-slide"]
    ids += [f"per-pathway-{c}" for c in collections]
    missing = [t for t in ids if f'id="{t}"' not in page]
    assert not missing, f"report lacks tables {missing}"
