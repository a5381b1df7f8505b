"""``histoprism demo``: built-in cohort -> train -> predict -> evaluate -> one comparison table."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .._core import keys
from .._core.files import write_text_atomic
from ..evaluation.compare import pipe_table
from ..evaluation.evaluate import evaluate
from ..expression.correlation import squared_error
from ..expression.genes import harmonise_counts, looks_like_ensembl
from ..inference.predict import predict
from ..io.cohort import Cohort, align_by_barcode, file_gene_ids, truth_counts
from ..io.prediction import read_prediction
from ..io.readers.st import read_st
from ..models.registry import VARIANTS, Variant
from ..synthetic.cohort import SyntheticConfig, make_cohort
from ..training.api import train

log = logging.getLogger(__name__)

ENCODER = "synthetic"
# Sized so that the whole demo runs in under 5 minutes on 2 CPU cores.
DEMO_COHORT = SyntheticConfig(
    n_slides=24, n_cancers=3, spots=(250, 650), n_genes=2000, split=(0.55, 0.15, 0.3)
)
DEMO_EPOCHS = 25  # the cosine schedule spans these; the full recipe trains up to 60
IMAGE_ENCODER = "stain-texture"  # `demo --from-images`: the built-in weights-free encoder


DEMO_MODELS = tuple(VARIANTS[n] for n in ("histoprism", "no-conditioning", "ridge-knn", "ridge"))
IMAGE_MODELS = tuple(VARIANTS[n] for n in ("histoprism", "ridge-knn"))
COLUMNS = {  # headline metric -> column of the demo table
    k: keys.HEADLINE_METRICS[k][0]
    for k in (
        "hvg_micro",
        "hvg_macro",
        "gpc_hallmark_micro",
        "gpc_hallmark_macro",
        "gpc_go_micro",
        "gpc_go_macro",
        "all_genes_micro",
    )
}


def run_demo(
    out: str | Path,
    *,
    cohort: SyntheticConfig = DEMO_COHORT,
    models: tuple[Variant, ...] = DEMO_MODELS,
    epochs: int | None = None,
    progress: bool = True,
    from_images: bool = False,
) -> pd.DataFrame:
    """Generate the cohort in ``out/cohort``, fit every model, score the test slides.

    With ``from_images`` the cohort also gets H&E-like whole-slide images, and the embeddings
    come from them: ``extract`` with the weights-free ``stain-texture`` encoder on the images,
    then the same train -> predict -> evaluate, with a training-mean predictor as the floor.

    Returns one row per model plus the attainable ceiling (test split, ``--hvg train``), and
    writes it to ``out/results.csv`` and ``out/results.md``.
    """
    out, epochs = Path(out), epochs or DEMO_EPOCHS
    encoder = ENCODER
    if from_images:
        from ..images.extract import extract

        cohort, encoder = replace(cohort, images=True, image_patches=False), IMAGE_ENCODER
        models = IMAGE_MODELS if models is DEMO_MODELS else models
    data = make_cohort(out / "cohort", config=cohort)
    if from_images:
        t0 = time.perf_counter()
        extract(data, encoder, source="wsi")
        log.info("extracted %s embeddings in %.0f s", encoder, time.perf_counter() - t0)
    c = Cohort(data)
    rows = []
    for m in models:
        t0 = time.perf_counter()
        run = train(
            data, encoder, out / "runs" / m.name, epochs=epochs, progress=progress,
            **m.train_options(),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        pred = out / "pred" / m.name
        predict(run, data, encoder, pred, progress=progress)
        metrics = evaluate(pred, c, out / "eval" / m.name, progress=progress)
        rows.append(_row(m.label, metrics, seconds, mse=_test_mse(pred, c)))
    if from_images:
        rows.append(
            _row("training mean (constant per gene)", {"headline": {}}, None, mse=_mean_mse(c))
        )
    ceiling = evaluate(data / keys.CEILING_DIR, c, out / "eval" / "ceiling", progress=progress)
    rows.append(
        _row(
            "ceiling (what the images can show)",
            ceiling,
            None,
            mse=_test_mse(data / keys.CEILING_DIR, c),
        )
    )
    table = pd.DataFrame(rows).set_index("model")
    table.to_csv(out / "results.csv")
    write_text_atomic(out / "results.md", pipe_table(table))
    return table


def _row(name: str, metrics: dict, seconds: float | None, *, mse: float | None = None) -> dict:
    head = metrics["headline"]
    row = {"model": name}
    row.update({label: head.get(key) for key, label in COLUMNS.items()})
    row["MSE"] = mse
    row["train s"] = "—" if seconds is None else f"{seconds:.0f}"
    return row


def _test_mse(pred_dir: Path, cohort: Cohort) -> float:
    """Mean squared error of log1p(counts) over every test spot and measured predicted gene.

    Pearson r cannot rank a constant predictor (it is undefined), so the demo also states the
    error, where the training mean is a real floor.
    """
    total, n = 0.0, 0
    for sid in cohort.ids("test"):
        pred = read_prediction(Path(pred_dir) / f"{sid}.h5ad")
        truth, guess = _matched(cohort, sid, pred.obs_names, pd.Index(pred.var_names))
        se, k = squared_error(np.asarray(pred.X)[guess[0]], truth, guess[1])
        total, n = total + se, n + k
    return total / max(n, 1)


def _mean_mse(cohort: Cohort) -> float:
    """The same error for predicting every spot with the training spots' mean log1p per gene."""
    sums: pd.Series | None = None
    counts: pd.Series | None = None
    for sid in cohort.ids("train"):
        st = read_st(cohort.st_path(sid))
        space = "ensembl" if looks_like_ensembl(st.var_names) else "symbol"
        x, names, _ = harmonise_counts(st.X, st.var_names, to=space, gene_ids=file_gene_ids(st))
        names = pd.Index(names.astype(str))
        s = pd.Series(np.asarray(x.log1p().sum(axis=0)).ravel(), index=names)
        c = pd.Series(float(st.n_obs), index=names)
        sums = s if sums is None else sums.add(s, fill_value=0.0)
        counts = c if counts is None else counts.add(c, fill_value=0.0)
    mean = sums / counts
    total, n = 0.0, 0
    for sid in cohort.ids("test"):
        truth, guess = _matched(cohort, sid, None, mean.index)
        se, k = squared_error(np.broadcast_to(mean.to_numpy()[guess[1]], truth.shape), truth)
        total, n = total + se, n + k
    return total / max(n, 1)


def _matched(cohort: Cohort, sid: str, barcodes, genes: pd.Index):
    """log1p truth (M, K) of the spots ``barcodes`` (None: all) and genes ``genes`` the slide
    measured, and the (rows, columns) of those spots and genes in the caller's arrays."""
    st = read_st(cohort.st_path(sid))
    if barcodes is None:
        r = st_rows = np.arange(st.n_obs)
    else:
        r, st_rows = align_by_barcode(barcodes, st.obs_names)
    counts, g = truth_counts(st, genes)  # the evaluator's truth: same genes, same rule
    return np.log1p(counts[st_rows].toarray()), (r, g)
