"""Readers and the cohort: alignment by barcode or position, cancer codes, splits, bad input."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from histoprism._core.errors import InputError
from histoprism.io.cohort import Cohort, align_spots
from histoprism.io.readers import EmbeddingFile, read_embeddings, read_st


def write_st(path, barcodes, genes, counts, xy):
    a = ad.AnnData(
        X=sp.csr_matrix(np.asarray(counts, dtype=np.float32)),
        obs=pd.DataFrame(index=pd.Index(barcodes)),
        var=pd.DataFrame(index=pd.Index(genes)),
    )
    a.obsm["spatial"] = np.asarray(xy, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    a.write_h5ad(path)


def write_emb(path, features, coords=None, barcodes=None, **attrs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["features"] = np.asarray(features, dtype=np.float32)
        if coords is not None:
            f["coords"] = np.asarray(coords)
            f["coords"].attrs.update(attrs)
        if barcodes is not None:
            f["barcodes"] = np.array([b.encode() for b in barcodes])


def small_cohort(root, *, n=6, codes=("IDC", "", "COAD"), emb_order=None):
    rng = np.random.default_rng(0)
    ids = [f"S{i}" for i in range(len(codes))]
    pd.DataFrame(
        {"id": ids, "oncotree_code": list(codes), "patient": ["p0", "p0", "p1"][: len(ids)]}
    ).to_csv(root / "metadata.csv", index=False)
    for sid in ids:
        bc = [f"{sid}-BC{i}" for i in range(n)]
        xy = np.stack([np.arange(n) * 200, np.zeros(n)], 1)
        write_st(root / "st" / f"{sid}.h5ad", bc, ["A", "B", "C"], rng.poisson(3, (n, 3)), xy)
        order = emb_order if emb_order is not None else rng.permutation(n)
        feats = np.arange(n)[:, None] * np.ones((1, 4))  # row value = spot number
        write_emb(
            root / "embeddings" / "enc" / f"{sid}.h5",
            feats[order],
            xy[order],
            [bc[i] for i in order],
        )
    return ids


def test_slide_rows_align_across_files(tmp_path):
    small_cohort(tmp_path)
    s = Cohort(tmp_path).slide("S0", "enc")
    spot = np.array([int(b.split("BC")[1]) for b in s.barcodes])
    np.testing.assert_array_equal(s.features[:, 0], spot)  # embedding i belongs to barcode i
    np.testing.assert_array_equal(s.coords[:, 0], spot * 200)
    assert s.counts.shape == (6, 3) and list(s.genes) == ["A", "B", "C"]


def test_empty_cancer_code_is_filled_from_split_else_unknown(tmp_path):
    small_cohort(tmp_path)
    assert Cohort(tmp_path).cancer("S1") == "Unknown"
    (tmp_path / "splits").mkdir()
    pd.DataFrame({"sample_id": ["S0", "S1"], "oncotree_code_filled": ["IDC", "Healthy"]}).to_csv(
        tmp_path / "splits" / "train_split.csv", index=False
    )
    pd.DataFrame({"sample_id": ["S2"]}).to_csv(tmp_path / "splits" / "test_split.csv", index=False)
    c = Cohort(tmp_path)
    assert c.cancer("S1") == "Healthy" and c.cancer("S0") == "IDC"
    assert c.ids("train") == ["S0", "S1"] and c.ids("test") == ["S2"]


def test_default_split_keeps_patients_together(tmp_path):
    small_cohort(tmp_path, codes=("IDC",) * 3)
    c = Cohort(tmp_path)
    where = {i: name for name, ids in c.splits.items() for i in ids}
    assert where["S0"] == where["S1"]  # both belong to patient p0
    assert sorted(where) == ["S0", "S1", "S2"]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 30),
    seed=st.integers(0, 10_000),
    extra=st.integers(0, 5),
    missing=st.integers(0, 5),
)
def test_barcode_alignment_any_order_subset_superset(n, seed, extra, missing):
    rng = np.random.default_rng(seed)
    st_bc = np.array([f"B{i}" for i in range(n)])
    keep = rng.permutation(n)[: max(1, n - missing)]
    emb_bc = np.concatenate([st_bc[keep], [f"X{i}" for i in range(extra)]])
    perm = rng.permutation(len(emb_bc))
    emb = EmbeddingFile(
        np.zeros((len(perm), 2), np.float32), np.zeros((len(perm), 2)), emb_bc[perm], None
    )
    al = align_spots(st_bc, np.zeros((n, 2)), emb)
    np.testing.assert_array_equal(st_bc[al.st_rows], emb_bc[perm][al.emb_rows])
    assert al.st_unmatched == n - len(keep) and al.emb_unmatched == extra
    assert np.all(np.diff(al.st_rows) > 0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), jitter=st.floats(0, 90))
def test_position_alignment_within_half_spot(seed, jitter):
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(5), np.arange(4)), -1).reshape(-1, 2) * 200.0
    perm = rng.permutation(len(grid))
    angle = rng.uniform(0, 2 * np.pi, len(grid))
    moved = grid[perm] + jitter * np.stack([np.cos(angle), np.sin(angle)], 1)
    emb = EmbeddingFile(np.zeros((len(grid), 2), np.float32), moved, None, None)
    al = align_spots(np.array([str(i) for i in range(len(grid))]), grid, emb)
    np.testing.assert_array_equal(perm[al.emb_rows], al.st_rows)
    assert al.by == "position" and al.st_unmatched == 0


def test_trident_top_left_corner_shifted_to_centre(tmp_path):
    p = tmp_path / "t.h5"
    write_emb(p, np.ones((2, 3)), coords=np.array([[0, 0], [224, 0]]), patch_size_level0=224)
    e = read_embeddings(p)
    np.testing.assert_allclose(e.coords, [[112, 112], [336, 112]])
    assert e.barcodes is None


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.__setitem__(0, np.nan), "NaN"),
        (lambda f: f.__setitem__(1, np.inf), "NaN/inf"),
    ],
)
def test_non_finite_embeddings_rejected_naming_file(tmp_path, mutate, message):
    feats = np.ones((3, 4))
    mutate(feats)
    p = tmp_path / "bad.h5"
    write_emb(p, feats, np.zeros((3, 2)), ["a", "b", "c"])
    with pytest.raises(InputError, match=message) as e:
        read_embeddings(p)
    assert "bad.h5" in str(e.value)


def test_duplicate_barcodes_and_genes_rejected(tmp_path):
    p = tmp_path / "dup.h5ad"
    write_st(p, ["a", "b"], ["G", "H"], np.ones((2, 2)), np.zeros((2, 2)))
    a = ad.read_h5ad(p)
    a.var_names = ["G", "G"]
    a.write_h5ad(p)
    with pytest.raises(InputError, match="duplicate gene"):
        read_st(p)
    e = tmp_path / "dup.h5"
    write_emb(e, np.ones((2, 2)), np.zeros((2, 2)), ["a", "a"])
    with pytest.raises(InputError, match="duplicate barcode"):
        read_embeddings(e)


def test_no_common_barcode_is_an_error(tmp_path):
    small_cohort(tmp_path)
    write_emb(tmp_path / "embeddings/enc/S0.h5", np.ones((2, 4)), np.zeros((2, 2)), ["zz1", "zz2"])
    with pytest.raises(InputError, match="no barcode of the embeddings matches"):
        Cohort(tmp_path).slide("S0", "enc")


def test_missing_files_named(tmp_path):
    with pytest.raises(InputError, match="cohort directory not found"):
        Cohort(tmp_path / "nope")
    with pytest.raises(InputError, match="metadata"):
        Cohort(tmp_path)
    small_cohort(tmp_path)
    (tmp_path / "embeddings/enc/S2.h5").unlink()
    with pytest.raises(InputError, match="S2.h5: embedding file not found"):
        Cohort(tmp_path).slide("S2", "enc")


def test_negative_counts_and_empty_slide_rejected(tmp_path):
    p = tmp_path / "neg.h5ad"
    write_st(p, ["a"], ["G"], [[-1]], [[0, 0]])
    with pytest.raises(InputError, match="non-negative"):
        read_st(p)
    a = ad.AnnData(X=sp.csr_matrix((0, 2), dtype=np.float32), var=pd.DataFrame(index=["G", "H"]))
    a.obsm["spatial"] = np.zeros((0, 2))
    a.write_h5ad(tmp_path / "empty.h5ad")
    with pytest.raises(InputError, match="no spots"):
        read_st(tmp_path / "empty.h5ad")


def test_histoprism_repository_pt_embeddings_are_found_and_aligned(tmp_path):
    import torch

    small_cohort(tmp_path)
    h5 = tmp_path / "embeddings/enc/S0.h5"
    ref = Cohort(tmp_path).slide("S0", "enc")
    h5.unlink()
    rows = {str(b): torch.full((4,), float(i)) for i, b in enumerate(reversed(ref.barcodes))}
    torch.save(rows, tmp_path / "embeddings/enc/S0_embeddings.pt")
    c = Cohort(tmp_path)
    assert c.embedding_path("S0", "enc").name == "S0_embeddings.pt" and "S0" in c.available_ids()
    s = c.slide("S0", "enc")
    np.testing.assert_array_equal(s.barcodes, ref.barcodes)
    np.testing.assert_array_equal(s.features[:, 0], np.arange(ref.n_spots)[::-1])
