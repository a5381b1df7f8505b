"""`histoprism extract` on the synthetic cohort with images: WSI and HEST-patch sources, resume
after a crash, rank sharding, virtual spots for unsequenced slides, and the CLI."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.cli import app
from histoprism.images import extract as extract_mod
from histoprism.images.extract import extract
from histoprism.io.cohort import Cohort
from histoprism.io.readers.st import read_st
from histoprism.io.readers.wsi import open_wsi
from histoprism.synthetic.cohort import make_cohort, tiny

ENCODER = "stain-texture"


@pytest.fixture(scope="module")
def image_cohort(tmp_path_factory) -> Path:
    """4 imaged slides of the tiny config (2 cancers), embedded once from the images."""
    root = make_cohort(
        tmp_path_factory.mktemp("imaged"), config=replace(tiny(), n_slides=4, images=True)
    )
    extract(root, ENCODER, source="wsi")
    return root


def _copy(src: Path, dst: Path, *, embeddings: bool = False) -> Path:
    ignore = None if embeddings else shutil.ignore_patterns(keys.EMBEDDINGS_DIR, keys.CEILING_DIR)
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def _read(path: Path) -> dict:
    with h5py.File(path) as h5:
        return {k: h5[k][...] for k in h5} | {"attrs": dict(h5.attrs)}


def test_wsi_embeddings_align_with_the_counts(image_cohort):
    cohort = Cohort(image_cohort)
    for sid in cohort.ids():
        got = _read(image_cohort / keys.EMBEDDINGS_DIR / ENCODER / f"{sid}.h5")
        assert got["features"].shape[1] == 64 and np.isfinite(got["features"]).all()
        assert got["attrs"][keys.H5_ATTR_ENCODER] == ENCODER
        assert got["attrs"]["source"] == "wsi"
        slide = cohort.slide(sid, ENCODER)  # aligned by barcode with st/{id}.h5ad
        assert slide.n_spots == len(got["barcodes"])
        # coordinates written are the spots' own centres (level-0 px)
        synth = cohort.slide(sid, "synthetic")
        order = pd.Index(synth.barcodes).get_indexer(slide.barcodes)
        np.testing.assert_allclose(slide.coords, synth.coords[order])


def test_patch_and_wsi_sources_agree(image_cohort, tmp_path):
    root = _copy(image_cohort, tmp_path / "c")
    extract(root, ENCODER, source="patches")
    sid = Cohort(root).ids()[0]
    a = _read(root / keys.EMBEDDINGS_DIR / ENCODER / f"{sid}.h5")
    b = _read(image_cohort / keys.EMBEDDINGS_DIR / ENCODER / f"{sid}.h5")
    assert a["attrs"]["source"] == "patches"
    order = pd.Index(b["barcodes"]).get_indexer(a["barcodes"])
    assert (order >= 0).all()
    np.testing.assert_allclose(a["coords"], b["coords"][order], atol=1e-6)
    # same pixels (the patches were cut from the same rendering; the TIFF adds JPEG noise)
    fa, fb = a["features"], b["features"][order]
    varying = fa.std(axis=0) > 1e-6
    r = [np.corrcoef(fa[:, j], fb[:, j])[0, 1] for j in np.flatnonzero(varying)]
    assert np.median(r) > 0.95


def test_restart_after_a_crash_redoes_only_unfinished_slides(image_cohort, tmp_path, monkeypatch):
    root = _copy(image_cohort, tmp_path / "c")
    real, calls = extract_mod.extract_slide, []

    def crash_on_third(cohort, sample_id, *args, **kwargs):
        calls.append(sample_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(cohort, sample_id, *args, **kwargs)

    monkeypatch.setattr(extract_mod, "extract_slide", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(root, ENCODER, source="patches")
    out = root / keys.EMBEDDINGS_DIR / ENCODER
    done = sorted(p.name for p in out.glob("*.h5"))
    assert len(done) == 2 and not list(out.glob(".*partial*"))
    stamps = {p: os.stat(out / p).st_mtime_ns for p in done}
    monkeypatch.setattr(extract_mod, "extract_slide", real)
    # a SIGKILL leaves the temporary file of the slide in progress: never read, removed on restart
    killed = out / f".{calls[2]}.999.partial.h5"
    killed.write_bytes(b"half an HDF5 file")
    records = extract(root, ENCODER, source="patches")
    assert not killed.exists()
    assert sorted(r.source for r in records) == ["patches", "patches", "skipped", "skipped"]
    assert all(os.stat(out / p).st_mtime_ns == t for p, t in stamps.items())
    assert len(list(out.glob("*.h5"))) == 4


def test_ranks_share_the_slides(image_cohort, tmp_path, monkeypatch):
    root = _copy(image_cohort, tmp_path / "c")
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        seen.append({r.sample_id for r in extract(root, ENCODER, source="patches")})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 4
    assert len(seen[0]) == len(seen[1]) == 2


def test_unsequenced_slide_gets_virtual_spots_on_its_tissue(image_cohort, tmp_path):
    root = _copy(image_cohort, tmp_path / "c")
    sid = Cohort(root).ids()[0]
    spots = read_st(root / keys.ST_DIR / f"{sid}.h5ad").obsm["spatial"]
    (root / keys.ST_DIR / f"{sid}.h5ad").unlink()
    (root / keys.PATCHES_DIR / f"{sid}.h5").unlink()
    extract(root, ENCODER, samples=sid)
    got = _read(root / keys.EMBEDDINGS_DIR / ENCODER / f"{sid}.h5")
    grid = got["coords"]
    assert len(grid) > 0.3 * len(spots)  # tissue found...
    # ... and only there: every virtual spot lies within a spot pitch (200 px) of a real one
    d = np.sqrt(((grid[:, None, :] - spots[None, :, :]) ** 2).sum(-1)).min(axis=1)
    assert np.quantile(d, 0.95) < 200
    slide = Cohort(root).slide(sid, ENCODER, counts=False)
    assert slide.counts is None and slide.n_spots == len(grid)


def test_tissue_grid_is_hexagonal_at_the_pitch(image_cohort):
    with open_wsi(Cohort(image_cohort).wsi_path(Cohort(image_cohort).ids()[0])) as wsi:
        xy = extract_mod.tissue_grid(wsi, pitch_um=100.0)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(np.median(d[:, 1]), 200.0, rtol=0.01)  # 100 µm at 0.5 µm/px


def test_bad_inputs_are_one_line_errors(image_cohort, tmp_path):
    root = _copy(image_cohort, tmp_path / "c")
    with pytest.raises(InputError, match="unknown encoder|not-an-encoder"):
        extract(root, "not-an-encoder")
    with pytest.raises(InputError, match=r"sample\(s\) not in metadata: nope"):
        extract(root, ENCODER, samples="nope")
    sid = Cohort(root).ids()[0]
    (root / keys.PATCHES_DIR / f"{sid}.h5").unlink()
    (root / keys.WSI_DIR / f"{sid}.tif").unlink()
    with pytest.raises(InputError, match=f"'{sid}' has neither patches"):
        extract(root, ENCODER, samples=sid)


def test_cli_extract_summary_and_error(image_cohort, tmp_path):
    root = _copy(image_cohort, tmp_path / "c", embeddings=True)
    runner = CliRunner()
    res = runner.invoke(app, ["extract", "--data", str(root), "--encoder", ENCODER])
    assert res.exit_code == 0, res.output
    assert "extracted 0 slides" in res.output and "4 already done" in res.output
    res = runner.invoke(app, ["extract", "--data", str(root), "--encoder", "nope"])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
