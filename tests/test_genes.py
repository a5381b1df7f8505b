"""Gene ids, gene lists and gene sets: the bundled NCBI map, count harmonisation, file readers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from histoprism._core.errors import InputError
from histoprism.expression.genes import (
    GeneIdMap,
    GenePanel,
    harmonise_counts,
    read_gene_list,
    read_gmt,
)

A1BG, A2M, ERBB2, TP53 = "ENSG00000121410", "ENSG00000175899", "ENSG00000141736", "ENSG00000141510"


@pytest.fixture(scope="module")
def idmap() -> GeneIdMap:
    return GeneIdMap.bundled()


def test_symbols_to_ensembl(idmap):
    out = idmap.to_ensembl(["A1BG", "A2M", "TP53", "NOT_A_GENE"])
    assert out.dtype == object
    assert list(out) == [A1BG, A2M, TP53, None]


def test_unambiguous_alias_maps(idmap):
    assert list(idmap.to_ensembl(["HER2", "P53"])) == [ERBB2, TP53]
    assert list(idmap.to_symbol(["HER2"])) == ["ERBB2"]


def test_ensembl_version_stripped_and_passed_through(idmap):
    out = idmap.to_ensembl([f"{A1BG}.12", A2M, "ENSG99999999999.1"])
    assert list(out) == [A1BG, A2M, "ENSG99999999999"]


def test_round_trip_official_symbols(idmap):
    known = ["A1BG", "A2M", "TP53", "ERBB2", "GAPDH", "EPCAM", "KRT19", "CD74"]
    assert list(idmap.to_symbol(idmap.to_ensembl(known))) == known
    # nearly every official symbol with an Ensembl id comes back (shared ids are the exception)
    syms = np.array(list(idmap.symbol_to_ensembl))
    back = idmap.to_symbol(idmap.to_ensembl(syms))
    assert (back == syms).mean() > 0.99


def test_user_table_aliases(tmp_path):
    path = tmp_path / "ids.csv"
    pd.DataFrame(
        {
            "symbol": ["GA", "GB", "GC"],
            "ensembl_id": ["ENSG00000000001;ENSG00000000009", "ENSG00000000002", ""],
            "alias_symbol": ["X1;SHARED", "SHARED;GA;Y2", "Z3"],
        }
    ).to_csv(path, index=False)
    m = GeneIdMap.from_file(path)
    out = m.to_ensembl(["GA", "X1", "Y2", "SHARED", "GC", "Z3"])
    # SHARED names two genes; GA as an alias of GB is an official symbol; GC has no Ensembl id
    assert list(out) == ["ENSG00000000001", "ENSG00000000001", "ENSG00000000002", None, None, None]
    assert list(m.to_symbol(["ENSG00000000009.4", "ENSG00000000002"])) == ["GA", "GB"]


def test_user_table_missing_column(tmp_path):
    path = tmp_path / "ids.tsv"
    path.write_text("symbol\tgene_id\nGA\tENSG00000000001\n")
    with pytest.raises(InputError, match="ensembl_id"):
        GeneIdMap.from_file(path)


def test_harmonise_sums_raw_counts(idmap):
    names = ["A1BG", f"{A1BG}.3", "A2M", "NOT_A_GENE", "HER2"]
    dense = np.array([[1, 2, 3, 4, 5], [0, 7, 0, 1, 0], [6, 0, 0, 0, 9]], dtype=np.float32)
    X2, names2, report = harmonise_counts(sp.csr_matrix(dense), names, to="ensembl", idmap=idmap)
    assert list(names2) == [A1BG, A2M, ERBB2]
    expected = np.stack([dense[:, 0] + dense[:, 1], dense[:, 2], dense[:, 4]], axis=1)
    assert sp.issparse(X2) and X2.format == "csr"
    np.testing.assert_array_equal(X2.toarray(), expected)
    assert report == {"n_in": 5, "n_out": 3, "n_unmapped": 1, "n_merged": 1}


def test_harmonise_to_symbol(idmap):
    X = sp.csr_matrix(np.array([[1, 2, 3, 4]], dtype=np.float32))
    names = [A2M, "A2M", "my_probe", "ENSG00000000000"]
    X2, names2, report = harmonise_counts(X, names, to="symbol", idmap=idmap)
    # a name already a symbol-space name is kept as it is; an unknown Ensembl id is dropped
    assert list(names2) == ["A2M", "my_probe"] and X2.toarray().tolist() == [[3.0, 3.0]]
    assert report["n_unmapped"] == 1 and report["n_merged"] == 1


def test_harmonise_bad_space(idmap):
    with pytest.raises(InputError, match="gene id space"):
        harmonise_counts(sp.csr_matrix((1, 1)), ["A1BG"], to="entrez", idmap=idmap)


POOL = ["A1BG", A1BG, "A2M", f"{A2M}.2", "HER2", "ERBB2", "NOT_A_GENE", "XYZ_UNKNOWN"]


@settings(max_examples=50, deadline=None)
@given(
    picks=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=8),
    data=st.data(),
)
def test_harmonise_preserves_mapped_total(picks, data):
    idmap = GeneIdMap.bundled()
    dense = data.draw(arrays(np.int64, (4, len(picks)), elements=st.integers(0, 50)))
    names = [POOL[i] for i in picks]
    X2, names2, report = harmonise_counts(sp.csr_matrix(dense), names, to="ensembl", idmap=idmap)
    mapped = np.array([n not in ("NOT_A_GENE", "XYZ_UNKNOWN") for n in names])
    assert X2.sum() == dense[:, mapped].sum()
    np.testing.assert_array_equal(X2.sum(axis=1).A1, dense[:, mapped].sum(axis=1))
    assert len(set(names2)) == len(names2) == report["n_out"]
    assert report["n_out"] + report["n_merged"] + report["n_unmapped"] == len(names)


def test_read_gmt(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("SET_A\tdesc a\tA1BG\tA2M\tA1BG\n\nSET_B\thttp://x\tTP53\t\n")
    assert read_gmt(path) == {"SET_A": ["A1BG", "A2M"], "SET_B": ["TP53"]}
    bad = tmp_path / "bad.gmt"
    bad.write_text("ONLY_NAME\tdesc\n")
    with pytest.raises(InputError, match="line 1"):
        read_gmt(bad)


def test_gene_panel_duplicate():
    with pytest.raises(InputError, match="duplicate gene 'A2M'"):
        GenePanel(("A1BG", "A2M", "A2M"))
    panel = GenePanel(("A1BG", "A2M"))
    assert panel.locate(["A2M", "x"]).tolist() == [1, -1]


def test_read_gene_list_header_and_comments(tmp_path):
    path = tmp_path / "genes.csv"
    path.write_text('# my panel\ngene,score\nA1BG,1\n\n# a note\n"A2M",2\nTP53\n')
    assert read_gene_list(path) == ["A1BG", "A2M", "TP53"]
    with pytest.raises(InputError, match="not found"):
        read_gene_list(tmp_path / "missing.txt")


@pytest.mark.parametrize("name", ["gpc_hallmark", "gpc_go"])
@pytest.mark.parametrize("ids", ["symbols", "ensembl"])
def test_bundled_gmt_reads_the_same_split_on_any_whitespace(name, ids):
    """decoupler.pp.read_gmt and other readers split GMT lines on any whitespace: the description
    field must hold none, or its words become genes of every set."""
    from histoprism.expression.genes import data_path

    path = data_path("genesets", f"{name}.{ids}.gmt")
    ours = read_gmt(path)
    for line in path.read_text().splitlines():
        fields = line.split()
        assert fields[1].startswith("https://") and fields[2:] == ours[fields[0]]
