"""Real-data import: Space Ranger / Visium HD outs/ folders written exactly as 10x lays them out
(HDF5 v3 matrix, the three tissue-position variants, scalefactors) -> HEST-format st/{id}.h5ad
and a metadata row, loadable by ``Cohort.slide``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.cli import app
from histoprism.io.cohort import Cohort
from histoprism.io.importer import import_sample
from histoprism.io.readers import read_spaceranger, read_st, read_visium_hd
from histoprism.io.readers.spaceranger import POSITION_COLUMNS
from histoprism.synthetic.spaceranger import write_matrix_h5, write_positions, write_spaceranger

ENCODER = "uni"

# features (rows of the 10x matrix): GENEB twice (two Ensembl ids), one antibody to drop
FEATURES = [
    ("ENSG0001", "GENEA", "Gene Expression"),
    ("ENSG0002", "GENEB", "Gene Expression"),
    ("CD3_TotalSeqB", "CD3", "Antibody Capture"),
    ("ENSG0003", "GENEB", "Gene Expression"),
    ("ENSG0004", "GENEC", "Gene Expression"),
]
BARCODES = ["AAACAAGTATCTCCCA-1", "AAACACCAATAACTGC-1", "AAACAGAGCGACTCCT-1", "AAACAGCTTTCAGAAG-1"]
# counts, features x barcodes (10x orientation)
COUNTS = np.array(
    [
        [1, 0, 3, 2],
        [0, 5, 1, 0],
        [9, 9, 9, 9],
        [2, 1, 0, 4],
        [0, 0, 7, 1],
    ],
    dtype=np.int32,
)
# barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
POSITIONS = [
    ("AAACAAGTATCTCCCA-1", 1, 50, 102, 8000, 1500),
    ("AAACACCAATAACTGC-1", 1, 59, 19, 9200, 400),
    ("AAACAGAGCGACTCCT-1", 1, 14, 94, 2900, 1400),
    ("AAACAGCTTTCAGAAG-1", 0, 43, 9, 7000, 250),  # out of tissue
    ("AAACATTTCCCGGATT-1", 0, 61, 97, 9500, 1450),  # a spot with no counts (not in matrix)
]
COLUMNS = list(POSITION_COLUMNS)
SCALEFACTORS = {
    "spot_diameter_fullres": 89.4,
    "tissue_hires_scalef": 0.15,
    "fiducial_diameter_fullres": 144.5,
    "tissue_lowres_scalef": 0.045,
}


def make_outs(root: Path, variant: str = "csv") -> Path:
    write_matrix_h5(root / "filtered_feature_bc_matrix.h5", COUNTS, BARCODES, FEATURES)
    write_positions(root / "spatial", pd.DataFrame(POSITIONS, columns=COLUMNS), variant)
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(SCALEFACTORS))
    return root


def make_hd_outs(root: Path, bin_um: int = 8) -> Path:
    bins = root / "binned_outputs" / f"square_{bin_um:03d}um"
    make_outs(bins, "parquet")
    return root


def check_hest(adata: ad.AnnData) -> None:
    """Counts, summing of GENEB, antibody dropped, in-tissue only, coordinates."""
    assert list(adata.obs_names) == BARCODES[:3]
    assert list(adata.var_names) == ["GENEA", "GENEB", "GENEC"]
    assert list(adata.var[keys.VAR_GENE_IDS]) == ["ENSG0001", "ENSG0002;ENSG0003", "ENSG0004"]
    assert sp.isspmatrix_csr(adata.X) or isinstance(adata.X, sp.csr_array)
    assert adata.X.dtype == np.float32
    expected = np.stack([COUNTS[0], COUNTS[1] + COUNTS[3], COUNTS[4]], axis=1)[:3]
    np.testing.assert_array_equal(adata.X.toarray(), expected)
    assert (adata.obs["in_tissue"] == 1).all()
    pos = pd.DataFrame(POSITIONS, columns=COLUMNS).set_index("barcode").loc[BARCODES[:3]]
    for col in COLUMNS[2:]:
        np.testing.assert_array_equal(adata.obs[col].to_numpy(), pos[col].to_numpy())
    xy = adata.obsm[keys.OBSM_SPATIAL]
    assert xy.dtype == np.int64
    np.testing.assert_array_equal(xy[:, 0], pos["pxl_col_in_fullres"].to_numpy())
    np.testing.assert_array_equal(xy[:, 1], pos["pxl_row_in_fullres"].to_numpy())
    assert adata.uns["spatial"]["ST"]["scalefactors"]["spot_diameter_fullres"] == 89.4


VARIANTS = [
    "csv",
    "list",
    "parquet",
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_spaceranger_position_variants(tmp_path, variant):
    check_hest(read_spaceranger(make_outs(tmp_path / "outs", variant)))


def test_read_visium_hd(tmp_path):
    outs = make_hd_outs(tmp_path / "outs", bin_um=16)
    check_hest(read_visium_hd(outs, bin_um=16))
    with pytest.raises(InputError, match="square_008um"):
        read_visium_hd(outs)  # 8 µm bins not present


def write_embeddings(path: Path, barcodes, coords) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        h5.create_dataset(keys.H5_FEATURES, data=rng.normal(size=(len(barcodes), 8)))
        h5.create_dataset(keys.H5_COORDS, data=np.asarray(coords, dtype=np.float64))
        h5.create_dataset(keys.H5_BARCODES, data=np.array(barcodes, dtype="S"))


@pytest.mark.parametrize("fmt", ["spaceranger", "visium-hd"])
def test_import_writes_st_and_metadata_and_loads_in_cohort(tmp_path, fmt):
    src = make_outs(tmp_path / "outs") if fmt == "spaceranger" else make_hd_outs(tmp_path / "hd")
    data = tmp_path / "cohort"
    data.mkdir()
    # an existing metadata table: its rows and extra columns survive
    pd.DataFrame(
        {"id": ["OLD1"], "oncotree_code": ["IDC"], "organ": ["Breast"], "patient": ["p1"]}
    ).to_csv(data / "metadata.csv", index=False)
    wsi = tmp_path / "slide.tif"
    wsi.write_bytes(b"II*\0")
    path = import_sample(fmt, src, data, "S1", oncotree_code="LUAD", image=wsi)
    assert path == data / keys.ST_DIR / "S1.h5ad"
    check_hest(ad.read_h5ad(path))
    read_st(path)  # validates
    md = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(md["id"]) == ["OLD1", "S1"]
    assert md.loc[0, "organ"] == "Breast" and md.loc[0, "oncotree_code"] == "IDC"
    row = md.set_index("id").loc["S1"]
    assert row["oncotree_code"] == "LUAD"
    assert row["st_technology"] == ("Visium" if fmt == "spaceranger" else "Visium HD")
    assert row["spots_under_tissue"] == "3" and row["nb_genes"] == "3"
    assert row["wsi_path"] == str(wsi.resolve())
    assert not list((data / keys.ST_DIR).glob(".*partial*"))

    # embeddings with matching barcodes (other order, plus one extra) -> an aligned slide
    emb_bc = [BARCODES[2], BARCODES[0], "EXTRA-1", BARCODES[1]]
    write_embeddings(data / keys.EMBEDDINGS_DIR / ENCODER / "S1.h5", emb_bc, np.zeros((4, 2)))
    slide = Cohort(data).slide("S1", ENCODER)
    assert slide.cancer == "LUAD"
    assert list(slide.barcodes) == BARCODES[:3]
    assert list(slide.genes) == ["GENEA", "GENEB", "GENEC"]
    assert slide.counts[0, 1] == COUNTS[1, 0] + COUNTS[3, 0]
    np.testing.assert_array_equal(slide.coords, [[1500, 8000], [400, 9200], [1400, 2900]])

    # re-import updates the row instead of adding one; the code is kept when not given
    import_sample(fmt, src, data, "S1")
    md = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(md["id"]) == ["OLD1", "S1"]
    assert md.set_index("id").loc["S1", "oncotree_code"] == "LUAD"


def test_import_hest_creates_metadata(tmp_path):
    adata = read_spaceranger(make_outs(tmp_path / "outs"))
    src = tmp_path / "TENX1.h5ad"
    adata.write_h5ad(src)
    data = tmp_path / "cohort"
    path = import_sample("hest", src, data, "TENX1", oncotree_code="COAD")
    check_hest(ad.read_h5ad(path))
    md = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    assert md.to_dict("records") == [
        {"id": "TENX1", "oncotree_code": "COAD", "spots_under_tissue": "3", "nb_genes": "3"}
    ]


def test_import_bad_input(tmp_path):
    data = tmp_path / "cohort"
    with pytest.raises(InputError, match="unknown format"):
        import_sample("xenium", tmp_path, data, "S1")
    with pytest.raises(InputError, match="not found"):
        import_sample("spaceranger", tmp_path / "nope", data, "S1")
    with pytest.raises(InputError, match="not found"):
        import_sample("hest", tmp_path / "nope.h5ad", data, "S1")
    outs = make_outs(tmp_path / "outs")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InputError, match="filtered_feature_bc_matrix.h5"):
        import_sample("spaceranger", outs, data, "S1")
    assert not (data / keys.ST_DIR / "S1.h5ad").exists()
    assert not (data / "metadata.csv").exists()


def invoke(*args):
    return CliRunner(env={"COLUMNS": "160"}).invoke(app, [str(a) for a in args])


def test_cli_import(tmp_path):
    outs = make_outs(tmp_path / "outs")
    data = tmp_path / "cohort"
    result = invoke(
        "import", "--format", "spaceranger", "--src", outs, "--data", data, "--id", "S1",
        "--oncotree-code", "IDC",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "3 spots, 3 genes" in lines[0], result.stdout
    assert (data / keys.ST_DIR / "S1.h5ad").exists()
    help_text = invoke("import", "--help").stdout
    for flag in ("--format", "--src", "--data", "--id", "--oncotree-code", "--image", "--bin-um"):
        assert flag in help_text


@pytest.mark.parametrize("problem", ["missing_h5", "barcode_without_position"])
def test_cli_import_bad_input_one_line(tmp_path, problem):
    outs = make_outs(tmp_path / "outs")
    if problem == "missing_h5":
        (outs / "filtered_feature_bc_matrix.h5").unlink()
        expect = "filtered_feature_bc_matrix.h5"
    else:
        shutil.rmtree(outs / "spatial")
        positions = pd.DataFrame(POSITIONS[1:], columns=COLUMNS)  # first barcode has no position
        write_positions(outs / "spatial", positions)
        expect = "tissue_positions.csv"
    result = invoke(
        "import", "--format", "spaceranger", "--src", outs, "--data", tmp_path / "c", "--id", "S1"
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], result.stderr
    if problem == "barcode_without_position":
        assert BARCODES[0] in lines[0]


def test_a_synthetic_slide_written_as_spaceranger_reads_back_the_same(tiny_cohort, tmp_path):
    """write_spaceranger (the tutorials' Space Ranger folder) round-trips through the reader."""
    sid = Cohort(tiny_cohort).ids("test")[0]
    st = read_st(tiny_cohort / "st" / f"{sid}.h5ad")
    back = read_spaceranger(write_spaceranger(st, tmp_path / "outs"))
    assert back.n_obs == (st.obs["in_tissue"] == 1).sum() and back.n_vars == st.n_vars
    back = back[:, st.var_names]
    kept = st[back.obs_names]
    np.testing.assert_array_equal(back.X.toarray(), kept.X.toarray())
    np.testing.assert_array_equal(back.obsm["spatial"], np.rint(kept.obsm["spatial"]))
    assert (back.var["gene_ids"] == st.var["gene_ids"]).all()
