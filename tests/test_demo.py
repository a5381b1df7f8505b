"""The demo pipeline on a tiny cohort: every model row, the ceiling row, the tables on disk."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from histoprism.evaluation.compare import pipe_table
from histoprism.synthetic.world import tiny
from histoprism.workflows.demo import DEMO_MODELS, IMAGE_ENCODER, IMAGE_MODELS, run_demo


def test_demo_table_has_every_model_and_the_ceiling(tmp_path):
    table = run_demo(tmp_path, cohort=tiny(), models=DEMO_MODELS, epochs=1, progress=False)
    assert list(table.index) == [m.label for m in DEMO_MODELS] + [table.index[-1]]
    assert table.index[-1].startswith("ceiling")
    hvg = table["HVG-50 micro"].astype(float)
    assert hvg.notna().all() and (hvg.between(-1, 1)).all()
    # the ceiling is the expectation given what the images show: no trained model should beat it
    assert hvg.iloc[-1] > hvg.iloc[:-1].max()
    mse = table["MSE"].astype(float)  # ... nor make a smaller error
    assert mse.notna().all() and mse.iloc[-1] < mse.iloc[:-1].min()
    on_disk = pd.read_csv(tmp_path / "results.csv", index_col=0)
    assert list(on_disk.index) == list(table.index)
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n") == len(table) + 2 and "| HistoPrism |" in md
    for m in DEMO_MODELS:
        assert (tmp_path / "eval" / m.name / "metrics.json").exists()
        assert (tmp_path / "eval" / m.name / "report.html").exists()


def test_pipe_table_formats_floats_and_text():
    t = pd.DataFrame({"a": [0.12345, float("nan")], "b": ["7", "—"]}, index=["x", "y"])
    t.index.name = "model"
    lines = pipe_table(t).splitlines()
    assert lines[0] == "| model | a | b |"
    assert lines[2] == "| x | 0.123 | 7 |" and lines[3] == "| y | — | — |"


def test_demo_from_images_embeds_the_rendered_slides(tmp_path):
    cfg = replace(tiny(), n_slides=6)
    table = run_demo(tmp_path, cohort=cfg, epochs=2, progress=False, from_images=True)
    assert list(table.index) == [m.label for m in IMAGE_MODELS] + [
        "training mean (constant per gene)",
        table.index[-1],
    ]
    emb = sorted((tmp_path / "cohort" / "embeddings" / IMAGE_ENCODER).glob("*.h5"))
    assert len(emb) == 6 and not (tmp_path / "cohort" / "patches").exists()
    assert len(list((tmp_path / "cohort" / "wsis").glob("*.tif"))) == 6
    mse = table["MSE"].astype(float)
    assert mse.iloc[-1] < mse.iloc[-2]  # the ceiling beats the constant predictor
    assert table.loc["HistoPrism", "HVG-50 micro"] > 0  # the encoder carries signal
