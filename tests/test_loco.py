"""Cancer types never seen in training: the slide-level cancer-type classifier, ``predict
--cancer``, and the leave-one-cancer-out protocol (``loco``)."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.models.cancer_type import (
    CLASSIFIER_FILE,
    CancerTypeClassifier,
    fit_cancer_classifier,
    slide_descriptor,
)
from histoprism.workflows.loco import STRATEGIES, loco

ENCODER = "synthetic"


def _slides(rng, centre, n_slides=6, dim=8):
    return [rng.normal(centre, 1.0, size=(rng.integers(20, 40), dim)) for _ in range(n_slides)]


def test_classifier_tells_apart_types_that_look_different(tmp_path):
    rng = np.random.default_rng(0)
    a, b, c = _slides(rng, 0.0), _slides(rng, 3.0), _slides(rng, -3.0)
    clf = fit_cancer_classifier(a + b + c, ["A"] * 6 + ["B"] * 6 + ["C"] * 6)
    for centre, code in ((0.0, "A"), (3.0, "B"), (-3.0, "C")):
        fresh = _slides(rng, centre, n_slides=2)
        for s in fresh:
            assert clf.infer(s)[0] == code and clf.nearest(s) == code
            assert sum(clf.probabilities(s).values()) == pytest.approx(1.0)
    loaded = CancerTypeClassifier.load(clf.save(tmp_path / "c.safetensors"))
    assert loaded.codes == ("A", "B", "C")
    assert loaded.probabilities(a[0]) == pytest.approx(clf.probabilities(a[0]))


def test_two_type_probabilities_are_scikit_learns():
    rng = np.random.default_rng(1)
    a, b = _slides(rng, 0.0), _slides(rng, 0.7)
    clf = fit_cancer_classifier(a + b, ["A"] * 6 + ["B"] * 6)
    X = np.stack([slide_descriptor(s) for s in a + b])
    Z = (X - clf.mean) / clf.scale
    ref = LogisticRegression(max_iter=2000).fit(Z, ["A"] * 6 + ["B"] * 6)
    probe = a[1]
    expected = ref.predict_proba(((slide_descriptor(probe) - clf.mean) / clf.scale)[None])[0]
    assert [clf.probabilities(probe)[k] for k in ("A", "B")] == pytest.approx(expected, abs=1e-9)


def test_one_known_type_is_certain_and_wrong_dimension_refused():
    rng = np.random.default_rng(2)
    clf = fit_cancer_classifier(_slides(rng, 0.0, n_slides=3), ["A"] * 3)
    assert clf.infer(rng.normal(size=(10, 8))) == ("A", 1.0)
    with pytest.raises(InputError, match="dimension 4"):
        clf.infer(rng.normal(size=(10, 4)))


def test_predict_with_a_given_or_inferred_cancer_type(
    tiny_cohort, trained_runs, cohort_copy, tmp_path, caplog
):
    run = trained_runs["histoprism"]
    assert (run / CLASSIFIER_FILE).exists()
    cohort = Cohort(tiny_cohort)
    sid = cohort.ids("test")[0]
    predict(run, tiny_cohort, ENCODER, tmp_path / "given", samples=sid, cancer="COAD",
            progress=False)  # fmt: skip
    given = ad.read_h5ad(tmp_path / "given" / f"{sid}.h5ad")
    assert (given.obs[keys.OBS_CANCER] == "COAD").all()
    predict(run, tiny_cohort, ENCODER, tmp_path / "auto", samples="all", cancer="auto",
            progress=False)  # fmt: skip
    told = {
        i: ad.read_h5ad(tmp_path / "auto" / f"{i}.h5ad").obs[keys.OBS_CANCER].iloc[0]
        for i in cohort.ids()
    }
    # the synthetic types differ in their embeddings: the training slides are recognised
    train = cohort.ids("train")
    assert sum(told[i] == cohort.cancer(i) for i in train) >= len(train) - 1
    # a code the model never saw: one warning line naming it, the 'Unknown' token
    with caplog.at_level("WARNING"):
        predict(run, tiny_cohort, ENCODER, tmp_path / "unk", samples=sid, cancer="MESO",
                unknown_cancer=True, progress=False)  # fmt: skip
    assert any("'MESO'" in r.getMessage() and "Unknown" in r.getMessage() for r in caplog.records)
    run_copy = cohort_copy().root / "run"
    shutil.copytree(run, run_copy)
    (run_copy / CLASSIFIER_FILE).unlink()
    with pytest.raises(InputError, match="no cancer-type classifier"):
        predict(run_copy, tiny_cohort, ENCODER, tmp_path / "x", samples=sid, cancer="auto",
                progress=False)  # fmt: skip


def test_leave_one_cancer_out(tiny_cohort, tmp_path):
    table = loco(tiny_cohort, ENCODER, tmp_path, epochs=2, progress=False)
    cohort = Cohort(tiny_cohort)
    types = sorted({cohort.cancer(i) for i in cohort.ids("test")})
    assert list(table["strategy"]) == list(STRATEGIES) * len(types)
    assert sorted(table["held_out"].unique()) == types
    for held_out in types:
        split = tmp_path / held_out / "split"
        for name in ("train", "val"):
            ids = pd.read_csv(split / f"{name}_split.csv")[keys.SPLIT_ID]
            assert held_out not in {cohort.cancer(i) for i in ids}
        rows = table[table["held_out"] == held_out].set_index("strategy")
        assert rows.loc["seen", "told"] == held_out
        assert rows.loc["unknown-token", "told"] == keys.UNKNOWN_CANCER
        assert held_out not in rows.loc["nearest-type", "told"].split(", ")
        assert np.isfinite(rows["gpc_hallmark_micro"].astype(float)).all()
    md = (tmp_path / "loco.md").read_text()
    assert "unknown-token" in md and "mean" in md
    assert len(pd.read_csv(tmp_path / "loco.csv")) == len(table)
