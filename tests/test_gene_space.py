"""Symbol slides against an Ensembl panel (and back): counts summed per id before log1p."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoprism.cohort import Cohort, Slide
from histoprism.genes import GeneIdMap, GenePanel
from histoprism.tensors import slide_targets

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


def test_same_space_is_returned_unchanged():
    slide = _slide(["EGFR", "TP53"], [[1, 2]])
    assert slide.in_gene_space("symbol", IDMAP) is slide


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
    import anndata as ad

    from histoprism.evaluate import evaluate
    from histoprism.predict import predict
    from histoprism.train import train

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
