"""The one EVAL reader (``evaldir.load_eval``): what it reads back, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.io.evaldir import load_eval
from histoprism.plotting.report import write_report


def _write_eval(d):
    (d / keys.EVAL_METRICS).write_text(json.dumps({"n_slides": 2, "headline": {"hvg_micro": 0.3}}))
    per_slide = pd.DataFrame(
        {keys.META_CANCER: ["NA", "IDC"], "hvg": [0.2, np.nan]},
        index=pd.Index(["001", "NA"], name=keys.SPLIT_ID),
    )
    per_slide.to_csv(d / keys.EVAL_PER_SLIDE)  # as evaluate writes it: NaN as an empty cell
    per_gene = pd.DataFrame({"gene": ["NAN", "TP53"], "mean_r": [0.1, np.nan], "pooled_r": 0.2})
    per_gene.to_csv(d / keys.EVAL_PER_GENE, index=False)
    per_pathway = pd.DataFrame(
        {
            "collection": ["hallmark"],
            "gene_set": ["NA"],
            "n_genes_in_panel": [3],
            "s_micro": [0.4],
            "s_macro": [np.nan],
        }
    )
    per_pathway.to_csv(d / keys.EVAL_PER_PATHWAY, index=False)
    return per_slide, per_gene, per_pathway


def test_round_trip_keeps_names_as_text(tmp_path):
    per_slide, per_gene, per_pathway = _write_eval(tmp_path)
    ev = load_eval("m", tmp_path, per_gene=True)
    assert ev.name == "m" and ev.metrics["headline"] == {"hvg_micro": 0.3}
    pd.testing.assert_frame_equal(ev.per_slide, per_slide)  # "NA", "001" stay text
    pd.testing.assert_frame_equal(ev.per_gene, per_gene)
    pd.testing.assert_frame_equal(ev.per_pathway, per_pathway)
    assert load_eval("m", tmp_path).per_gene is None  # only read when asked for
    (tmp_path / keys.EVAL_PER_GENE).unlink()
    load_eval("m", tmp_path)  # compare does not need per_gene.csv ...
    with pytest.raises(InputError, match=f"{keys.EVAL_PER_GENE} missing.*run evaluate first"):
        write_report(tmp_path)  # ... the report does


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (keys.EVAL_METRICS, "{not json"),
        (keys.EVAL_METRICS, "[1, 2]"),
        (keys.EVAL_PER_SLIDE, ""),
        (keys.EVAL_PER_SLIDE, "a,b\n1,2\n"),  # no sample_id column
        (keys.EVAL_PER_PATHWAY, "a,b\n1,2\n3,4,5\n"),
    ],
)
def test_broken_file_is_one_line_input_error(tmp_path, name, text):
    _write_eval(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=name) as err:
        load_eval("m", tmp_path)
    assert err.value.path == tmp_path
    assert "\n" not in str(err.value)
