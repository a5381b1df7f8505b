"""Symbol slides against an Ensembl panel (and back): counts summed per id before log1p."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histoprism._core.errors import InputError
from histoprism.expression.genes import GeneIdMap, GenePanel, panel_counts
from histoprism.io.cohort import Cohort, Slide
from histoprism.models.inputs import slide_targets

ENCODER = "synthetic"  # embedding folder of the synthetic cohort
IDMAP = GeneIdMap.from_table(
    pd.DataFrame(
        {
            "symbol": ["EGFR", "TP53", "MYC"],
            "ensembl_id": ["ENSG00000146648", "ENSG00000141510", "ENSG00000136997"],
            "alias_symbol": ["ERBB1", "P53", ""],
        }
    )
)


def _slide(genes, counts, gene_ids=None) -> Slide:
    counts = np.asarray(counts, dtype=np.float32)
    n = counts.shape[0]
    return Slide(
        id="s",
        cancer="IDC",
        barcodes=np.array([f"b{i}" for i in range(n)]),
        features=np.zeros((n, 2), np.float32),
        coords=np.zeros((n, 2)),
        genes=np.array(genes),
        counts=sp.csr_matrix(np.asarray(counts, dtype=np.float32)),
        gene_ids=None if gene_ids is None else np.array(gene_ids),
    )


def test_symbols_to_ensembl_sum_raw_counts_before_log1p():
    slide = _slide(["EGFR", "ERBB1", "TP53", "NOTAGENE"], [[1, 2, 5, 7], [0, 3, 1, 1]])
    out = slide.in_gene_space("ensembl", IDMAP)
    assert list(out.genes) == ["ENSG00000146648", "ENSG00000141510"]
    np.testing.assert_array_equal(out.counts.toarray(), [[3, 5], [3, 1]])  # EGFR + its alias
    panel = GenePanel(("ENSG00000141510", "ENSG00000146648", "ENSG00000136997"))
    y, cols = slide_targets(out, panel)
    np.testing.assert_allclose(y[:, cols == 1][:, 0], np.log1p([3, 3]))  # log1p of the sum


def test_file_gene_ids_win_over_the_map_and_versions_are_stripped():
    slide = _slide(["EGFR", "FOO"], [[1, 2]], gene_ids=["ENSG00000146648.17", "ENSG00000999999.1"])
    out = slide.in_gene_space("ensembl", IDMAP)
    assert list(out.genes) == ["ENSG00000146648", "ENSG00000999999"]  # FOO kept via its own id


def test_same_space_keeps_names_and_sums_duplicates():
    slide = _slide(["EGFR", "TP53", "EGFR", "MY_PROBE"], [[1, 2, 3, 4]])
    out = slide.in_gene_space("symbol", IDMAP)
    assert list(out.genes) == ["EGFR", "TP53", "MY_PROBE"]  # unknown names survive
    np.testing.assert_array_equal(out.counts.toarray(), [[4, 2, 4]])


def test_versioned_ensembl_slide_in_ensembl_space_loses_versions():
    slide = _slide(["ENSG00000146648.17", "ENSG00000141510.2", "ENSG00000146648.18"], [[1, 2, 3]])
    out = slide.in_gene_space("ensembl", IDMAP)
    assert list(out.genes) == ["ENSG00000146648", "ENSG00000141510"]
    np.testing.assert_array_equal(out.counts.toarray(), [[4, 2]])


@pytest.mark.parametrize(
    ("genes", "gene_ids"),
    [
        (["EGFR", "TP53", "ERBB1", "NOTAGENE"], None),  # HEST-1k: symbols only, offline map
        (["EGFR", "TP53", "ERBB1", "NOTAGENE"], ["ENSG00000146648.3", "ENSG00000141510", "ENSG00000146648", ""]),
        (["ENSG00000146648.1", "ENSG00000141510.9", "ENSG00000146648.2", "ENSG00000000000"], None),
    ],
)  # fmt: skip
def test_panel_counts_for_an_ensembl_panel(genes, gene_ids):
    """Whatever the file names its genes by, the truth for an Ensembl panel is the same matrix:
    EGFR summed with its alias (raw counts), in panel order, genes the panel lacks dropped."""
    X = sp.csr_matrix(np.array([[1, 2, 3, 4], [5, 0, 1, 0]], dtype=np.float32))
    panel = ["ENSG00000136997", "ENSG00000141510", "ENSG00000146648"]  # MYC, TP53, EGFR
    counts, cols = panel_counts(X, genes, panel, gene_ids=gene_ids, idmap=IDMAP)
    assert cols.tolist() == [1, 2]  # MYC is not measured
    np.testing.assert_array_equal(counts.toarray(), [[2, 4], [0, 6]])


def test_panel_counts_refuses_a_panel_with_duplicates():
    with pytest.raises(InputError, match="duplicate gene 'EGFR'"):
        panel_counts(sp.csr_matrix((1, 1)), ["EGFR"], ["EGFR", "EGFR"], idmap=IDMAP)


def test_ensembl_to_symbols():
    slide = _slide(["ENSG00000146648", "ENSG00000136997.3"], [[4, 6]])
    out = slide.in_gene_space("symbol", IDMAP)
    assert list(out.genes) == ["EGFR", "MYC"]


def test_tiny_cohort_slide_keeps_its_ensembl_ids(tiny_cohort):
    cohort = Cohort(tiny_cohort)
    slide = cohort.slide(cohort.ids("train")[0], ENCODER)
    assert slide.gene_ids is not None and len(slide.gene_ids) == len(slide.genes)
    out = slide.in_gene_space("ensembl")
    assert all(g.startswith("ENSG") for g in out.genes)
    # every measured count lands on some id: nothing is lost for genes the file names
    assert (
        out.counts.sum()
        == slide.counts[:, np.char.startswith(slide.gene_ids.astype(str), "ENS")].sum()
    )


def test_train_predict_evaluate_with_an_ensembl_panel_on_symbol_slides(tiny_cohort, tmp_path):
    from histoprism.evaluation.evaluate import evaluate
    from histoprism.inference.predict import predict
    from histoprism.training.api import train

    st = ad.read_h5ad(tiny_cohort / "st" / f"{Cohort(tiny_cohort).ids('train')[0]}.h5ad")
    assert not st.var_names[0].startswith("ENSG")  # the slides name genes by symbol
    panel = list(st.var["gene_ids"][:120])
    (tmp_path / "panel.txt").write_text("\n".join(panel) + "\n")
    run = train(
        tiny_cohort, ENCODER, tmp_path / "run", model="ridge", genes=tmp_path / "panel.txt",
        progress=False,
    )  # fmt: skip
    predict(run, tiny_cohort, ENCODER, tmp_path / "pred", progress=False)
    sid = Cohort(tiny_cohort).ids("test")[0]
    pred = ad.read_h5ad(tmp_path / "pred" / f"{sid}.h5ad")
    assert list(pred.var_names) == panel
    metrics = evaluate(tmp_path / "pred", Cohort(tiny_cohort), tmp_path / "eval", progress=False)
    assert 0.0 < metrics["headline"]["all_genes_micro"] < 1.0  # genes matched through gene_ids


def test_paper_protocol_on_symbol_only_slides_scores_as_in_symbol_space(cohort_copy, tmp_path):
    """HEST-1k's counts name genes by symbol with no ``var['gene_ids']``; the paper trains an
    Ensembl panel on them. Train, predict and evaluate must map genes the same way, and the same
    predictions renamed to symbols must score the same."""
    from histoprism.evaluation.evaluate import evaluate
    from histoprism.inference.predict import predict
    from histoprism.training.api import train

    cc = cohort_copy()
    cohort = Cohort(cc.root)
    idmap = GeneIdMap.bundled()
    for sid in cohort.ids():
        st = ad.read_h5ad(cc.st_path(sid))
        if "gene_ids" in st.var:
            del st.var["gene_ids"]
        st.write_h5ad(cc.st_path(sid))
    st = ad.read_h5ad(cc.st_path(cohort.ids("train")[0]))
    symbols = list(st.var_names)
    ens = idmap.to_ensembl(symbols)
    # panel genes whose symbol <-> Ensembl map is one to one, so the two scorings can agree
    back = idmap.to_symbol([e or "" for e in ens])
    pairs = [(s, e) for s, e, b in zip(symbols, ens, back, strict=True) if e and b == s][:150]
    assert len(pairs) >= 100
    (tmp_path / "panel.txt").write_text("\n".join(e for _, e in pairs) + "\n")
    run = train(
        cc.root, ENCODER, tmp_path / "run", model="ridge", genes=tmp_path / "panel.txt",
        progress=False,
    )  # fmt: skip
    predict(run, cc.root, ENCODER, tmp_path / "pred", progress=False)
    for name, col in (("hvg_ens.txt", 1), ("hvg_sym.txt", 0)):  # the same 50 genes, two namings
        (tmp_path / name).write_text("\n".join(p[col] for p in pairs[::3][:50]) + "\n")
    ens_metrics = evaluate(
        tmp_path / "pred", cohort, tmp_path / "eval", hvg=str(tmp_path / "hvg_ens.txt"),
        progress=False,
    )  # fmt: skip
    to_symbol = dict((e, s) for s, e in pairs)
    (tmp_path / "pred_sym").mkdir()
    for path in (tmp_path / "pred").glob("*.h5ad"):
        pred = ad.read_h5ad(path)
        pred.var_names = [to_symbol[g] for g in pred.var_names]
        pred.write_h5ad(tmp_path / "pred_sym" / path.name)
    sym_metrics = evaluate(
        tmp_path / "pred_sym", cohort, tmp_path / "eval_sym", hvg=str(tmp_path / "hvg_sym.txt"),
        progress=False,
    )  # fmt: skip
    head, ref = ens_metrics["headline"], sym_metrics["headline"]
    compared = [k for k in ref if k.startswith(("hvg_", "all_genes_")) and ref[k] is not None]
    assert {"hvg_macro", "all_genes_micro"} <= set(compared)
    assert head["all_genes_micro"] > 0.05 and head["hvg_macro"] > 0.05  # finite and learnt
    for key in compared:
        assert head[key] == pytest.approx(ref[key], abs=1e-6), key
