"""Small panels: ``train --init RUN --genes PANEL`` refits the head of a pretrained HistoPrism."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from typer.testing import CliRunner

from histoprism._core import keys
from histoprism._core.errors import InputError
from histoprism.cli import app
from histoprism.inference.predict import predict
from histoprism.io.cohort import Cohort
from histoprism.io.rundir import load_run
from histoprism.models.run import load
from histoprism.training.adapt import adapt
from histoprism.training.api import train
from histoprism.training.data import TrainingData, load_training_data

ENCODER = "synthetic"


def _write_panel(path: Path, genes: list[str]) -> Path:
    path.write_text("\n".join(genes) + "\n")
    return path


@pytest.fixture(scope="module")
def panels(trained_runs, tmp_path_factory) -> dict:
    """Panel A: 30 genes of the pretrained panel; panel B: 10 of A and 10 genes absent from it."""
    root = tmp_path_factory.mktemp("panels")
    genes = load_run(trained_runs["histoprism"])[0]["genes"]
    a, b = genes[:30], genes[20:40]
    return dict(
        genes=genes,
        a=_write_panel(root / "a.txt", a),
        b=_write_panel(root / "b.txt", b),
        new_in_b=genes[30:40],
    )


@pytest.fixture(scope="module")
def data_b(tiny_cohort, panels) -> TrainingData:
    """The tiny cohort's training and validation slides with panel B."""
    return load_training_data(Cohort(tiny_cohort), ENCODER, genes=panels["b"])


@pytest.fixture(scope="module")
def adapted(tiny_cohort, trained_runs, panels, data_b, tmp_path_factory) -> dict[str, Path]:
    """Run A adapted from the full-panel run (``train``); run B adapted from A (``adapt``,
    10 genes A lacks)."""
    root = tmp_path_factory.mktemp("adapted")
    run_a = train(
        tiny_cohort, ENCODER, root / "a", init=trained_runs["histoprism"], genes=panels["a"],
        progress=False,
    )  # fmt: skip
    return dict(a=run_a, b=adapt(run_a, data_b, root / "b", progress=False))


def test_adapted_run_is_an_ordinary_histoprism_run(adapted, panels, trained_runs):
    config, tensors = load_run(adapted["a"])
    assert config["model"] == "histoprism"
    assert config["genes"] == Path(panels["a"]).read_text().split()
    assert config["model_config"]["n_genes"] == 30
    assert config["init_from"] == str(Path(trained_runs["histoprism"]).resolve())
    assert tensors["head_out.weight"].shape == (30, config["model_config"]["hidden"])
    pre = load_run(trained_runs["histoprism"])[1]
    # the trunk is the pretrained one, unchanged
    assert all((pre[k] == v).all() for k, v in tensors.items() if not k.startswith("head_out."))
    assert (Path(adapted["a"]) / keys.RUN_NOISE).exists()


def test_genes_absent_from_the_pretrained_panel_get_fitted(adapted, panels):
    config, tensors = load_run(adapted["b"])
    assert config["adapt"]["genes_new"] == 10
    rows = [config["genes"].index(g) for g in panels["new_in_b"]]
    assert (tensors["head_out.weight"][rows].abs().sum(1) > 0).all()
    assert np.isfinite(config["adapt"]["val_pearson"])


def test_predict_uses_the_adapted_run(adapted, tiny_cohort, panels, tmp_path):
    test_id = Cohort(tiny_cohort).ids("test")[0]
    written = predict(
        adapted["b"], tiny_cohort, ENCODER, tmp_path / "pred", samples=test_id, progress=False
    )
    assert written
    pred = ad.read_h5ad(written[0])
    assert list(pred.var_names) == Path(panels["b"]).read_text().split()
    assert np.isfinite(pred.X).all() and (pred.X >= 0).all()


def test_closed_form_head_is_numpy_ridge_on_the_hidden_features(adapted, data_b, tmp_path):
    alpha = 0.01
    init = load(adapted["a"])
    old_w = init.predictor.linear_head()[0].astype(np.float64)
    hid = {s.id: init.predictor.prepare(s).double().numpy() for s in data_b.train}
    for prior in ("zero", "pretrained"):
        run = adapt(adapted["a"], data_b, tmp_path / prior, alphas=(alpha,), priors=(prior,))
        assert load_run(run)[0]["adapt"]["prior"] == prior
        w, b = (t.astype(np.float64) for t in load(run).predictor.linear_head())
        for g, gene in enumerate(data_b.panel.genes):
            slides = [s for s in data_b.train if gene in s.genes]
            X = np.concatenate([hid[s.id] for s in slides])  # (n, H)
            y = np.concatenate([s.log1p_counts()[:, list(s.genes).index(gene)] for s in slides])
            Xc, yc = X - X.mean(0), y - y.mean()
            lam = alpha * np.trace(Xc.T @ Xc) / X.shape[1]
            w0 = old_w[init.panel.index[gene]] if gene in init.panel.index else 0.0
            w0 = w0 if prior == "pretrained" else 0.0
            want = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ yc + lam * w0)
            np.testing.assert_allclose(w[g], want, rtol=2e-3, atol=2e-5)
            np.testing.assert_allclose(b[g], y.mean() - X.mean(0) @ want, rtol=2e-3, atol=2e-4)


def test_fine_tuning_keeps_the_best_validation_epoch(trained_runs, data_b, tmp_path):
    run = adapt(trained_runs["histoprism"], data_b, tmp_path / "ft", epochs=2, progress=False)
    config = json.loads((Path(run) / keys.RUN_CONFIG).read_text())
    history = (Path(run) / keys.RUN_HISTORY).read_text().splitlines()
    assert len(history) == 1 + 3  # header, the closed form (epoch 0), two epochs
    r = [float(line.split(",")[2]) for line in history[1:]]
    assert config["best_epoch"] == int(np.argmax(r))
    assert config["adapt"]["val_pearson"] == pytest.approx(max(r))


def test_cli_train_init(tiny_cohort, trained_runs, panels, tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", "--data", str(tiny_cohort), "--encoder", ENCODER, "--out", str(tmp_path / "r"),
         "--init", str(trained_runs["histoprism"]), "--genes", str(panels["a"])],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "head refitted from" in result.stdout
    assert load_run(tmp_path / "r")[0]["genes"] == Path(panels["a"]).read_text().split()


def test_bad_inputs_are_refused(tiny_cohort, trained_runs, panels, tmp_path):
    def run(**kw):
        opts = dict(init=trained_runs["histoprism"], genes=panels["a"], progress=False)
        return train(tiny_cohort, kw.pop("encoder", ENCODER), tmp_path / "x", **{**opts, **kw})

    with pytest.raises(InputError, match="needs a HistoPrism run"):
        run(init=trained_runs["ridge"])
    with pytest.raises(InputError, match="trained on 'synthetic' embeddings"):
        run(encoder="uni")
    nowhere = _write_panel(tmp_path / "none.txt", ["NOT_A_GENE_1", "NOT_A_GENE_2"])
    with pytest.raises(InputError, match="measured in a training slide"):
        run(genes=nowhere)
    with pytest.raises(InputError, match="--model must be histoprism"):
        run(model="mlp")
    with pytest.raises(InputError, match="--resume"):
        run(resume=True)
    with pytest.raises(InputError, match="not a trained run"):
        run(init=tmp_path)


def test_cancer_classifier_of_an_adapted_run_knows_only_its_codes(
    cohort_copy, trained_runs, panels, tmp_path
):
    """A training slide of a code the pretrained run never saw: the adapted run keeps the
    pretrained vocabulary, and ``--cancer auto`` can only infer codes of that vocabulary."""
    from histoprism.models.cancer_type import CLASSIFIER_FILE, CancerTypeClassifier

    c = cohort_copy()
    sid = Cohort(c.root).ids("train")[0]
    c.set_cancer(sid, "NEWCODE")
    run = train(c.root, ENCODER, tmp_path / "r", init=trained_runs["histoprism"],
                genes=panels["a"], progress=False)  # fmt: skip
    known = set(load_run(run)[0]["cancers"])
    assert "NEWCODE" not in known
    codes = set(CancerTypeClassifier.load(run / CLASSIFIER_FILE).codes)
    assert codes and codes <= known


def test_prior_and_penalty_are_chosen_apart_for_new_genes(adapted):
    """Run B (10 genes absent from A): one choice per group, each the best of its own grid."""
    cfg = load_run(adapted["b"])[0]["adapt"]
    choices = {c["genes"]: c for c in cfg["choices"]}
    assert set(choices) == {"with a pretrained row", "new"}
    assert choices["new"]["n_genes"] == 10 and choices["with a pretrained row"]["n_genes"] == 10
    for label, choice in choices.items():
        scores = [g["val_pearson"] for g in cfg["grid"] if g["genes"] == label]
        assert len(scores) == 12  # 2 priors x 6 penalties
        assert choice["val_pearson"] == pytest.approx(max(scores))
    assert cfg["prior"] == choices["with a pretrained row"]["prior"]
