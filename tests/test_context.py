"""Organ and technology context (``ModelConfig.context_fields``), as STPath conditions on them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from histoprism.io.cohort import Cohort
from histoprism.io.rundir import load_run
from histoprism.models.inputs import CancerVocabulary, input_options, to_tensors
from histoprism.models.network import HistoPrism, ModelConfig
from histoprism.models.run import load
from histoprism.training.api import train

ENCODER = "synthetic"


@pytest.fixture(scope="module")
def context_run(tiny_cohort, tmp_path_factory):
    recipe = {"preset": "default", "model": {"context_fields": ["organ", "technology"]}}
    out = tmp_path_factory.mktemp("context") / "run"
    return train(tiny_cohort, ENCODER, out, epochs=3, config=recipe, progress=False)


def test_config_checks_fields_and_reads_json_lists():
    cfg = ModelConfig(in_dim=8, n_genes=3, context_fields=["organ"], organs=["Breast", "Unknown"])
    assert cfg.context_fields == ("organ",) and cfg.organs == ("Breast", "Unknown")
    with pytest.raises(ValueError, match="context_fields"):
        ModelConfig(in_dim=8, n_genes=3, context_fields=("tissue",))
    with pytest.raises(ValueError, match="vocabulary"):
        HistoPrism(ModelConfig(in_dim=8, n_genes=3, context_fields=("organ",)))
    with pytest.raises(ValueError, match="conditioning"):
        HistoPrism(replace(cfg, conditioning=False))


def test_a_fresh_context_vector_changes_nothing_and_is_required():
    torch.manual_seed(0)
    plain = ModelConfig(in_dim=8, n_genes=5, hidden=16, n_heads=2, dropout=0.0, attn_dropout=0.0)
    ctx = replace(plain, context_fields=("organ",), organs=("Breast", "Lung", "Unknown"))
    a = HistoPrism(plain).eval()
    with torch.no_grad():  # a trained conditioning branch (a fresh one's output layer is zero)
        a.condition.out.weight.normal_()
    b = HistoPrism(ctx).eval()
    b.load_state_dict(a.state_dict(), strict=False)  # all but organ.weight, which starts at zero
    x, cond = torch.randn(1, 30, 8), torch.tensor([0])
    with torch.no_grad():
        torch.testing.assert_close(b(x, cond, organ=torch.tensor([1])), a(x, cond))
        with pytest.raises(ValueError, match="organ"):
            b(x, cond)
        b.organ.weight[1] = 1.0
        assert not torch.allclose(b(x, cond, organ=torch.tensor([1])), a(x, cond))


def test_training_fills_the_vocabularies_from_the_metadata(context_run, tiny_cohort):
    cfg = ModelConfig(**load_run(context_run)[0]["model_config"])
    cohort = Cohort(tiny_cohort)
    organs = {str(cohort.metadata.at[i, "organ"]) for i in cohort.ids("train") + cohort.ids("val")}
    assert set(cfg.organs) == organs | {"Unknown"} and cfg.organs[-1] == "Unknown"
    assert set(cfg.technologies) >= {"Visium", "Unknown"}


def test_prediction_reads_the_slide_organ_and_maps_unseen_values_to_unknown(
    context_run, tiny_cohort, cohort_copy
):
    run = load(context_run)
    cfg = run.predictor.model.cfg
    sid = Cohort(tiny_cohort).ids("test")[0]
    slide = Cohort(tiny_cohort).slide(sid, ENCODER)
    t = to_tensors(slide, vocab=run.vocab, **input_options(cfg))
    assert cfg.organs[t.context["organ"]] == slide.meta["organ"]
    unseen = replace(slide, meta={**slide.meta, "organ": "Pancreas"})
    u = to_tensors(unseen, vocab=run.vocab, **input_options(cfg))
    assert u.context["organ"] == CancerVocabulary(cfg.organs).unknown
    before = run.predictor.predict_genes(run.predictor.prepare(slide), slice(None))
    after = run.predictor.predict_genes(run.predictor.prepare(unseen), slice(None))
    assert not np.allclose(before, after)  # the trained organ vector is used
