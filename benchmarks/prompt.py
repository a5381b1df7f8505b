"""Measured spots as a prompt (``predict --prompt-fraction``): Pearson r on the unmeasured spots.

Four built-in worlds (``histoprism.synthetic.world``): the built-in generator and three drawn by
``draw_world``, of which 1001 and 1002 were never used to choose anything. Per world: HistoPrism trained with the default recipe, then a prompt head fitted on
its training slides (``train --init RUN --prompt``). On each held-out test slide, for measured
fractions 0, 1, 5 and 20 % (3 draws of measured spots each), the unmeasured spots are scored by:

- image only: the trained HistoPrism, no measured spot used;
- prompt: the same model corrected by the measured spots (the fitted head);
- prompt, unfitted: the head before training (distance kernel, gain 0.5), an ablation;
- kNN imputation: each spot gets the inverse-distance-weighted mean of its 6 nearest measured
  spots' log1p counts (no image);
- ridge on the measured spots: a ridge of log1p counts on the embeddings fitted on the slide's
  measured spots alone (penalty 1 x the mean eigenvalue), as a user with a few measured spots
  and no pretrained model would.

Score: mean per-gene Pearson r over (slide, gene) pairs, all measured genes and the 50 most
variable training genes (HVG-50); r of a gene needs >= 2 unmeasured spots with variance.

    python benchmarks/prompt.py            # prints the table, writes benchmarks/prompt.json
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

from histoprism.expression.correlation import pearson_per_gene
from histoprism.io.cohort import Cohort
from histoprism.models.inputs import slide_targets
from histoprism.models.prompt import measured_spots, prompted_predictor
from histoprism.models.run import load
from histoprism.synthetic.cohort import SyntheticConfig, draw_world, make_cohort
from histoprism.training.api import train

ENCODER = "synthetic"
SMALL = dict(spots=(300, 600), targeted_fraction=0.0)
WORLDS = {  # the prompt head's design was chosen on the first two; the last two never looked at
    "built-in (small)": SyntheticConfig(
        n_slides=24, n_cancers=2, n_genes=500, embed_dim=128, seed=11, **SMALL
    ),
    "drawn 7": replace(draw_world(7, n_slides=24, n_genes=500), **SMALL),
    "drawn 1001 (held out)": replace(draw_world(1001, n_slides=24, n_genes=500), **SMALL),
    "drawn 1002 (held out)": replace(draw_world(1002, n_slides=24, n_genes=500), **SMALL),
}
FRACTIONS = (0.0, 0.01, 0.05, 0.2)
DRAWS = 3
KNN = 6
RIDGE_ALPHA = 1.0
EPOCHS = 40
OUT = Path(__file__).with_name("prompt.json")


def knn_imputation(coords: np.ndarray, measured: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, G) log1p -> (U, G): inverse-distance mean of the ``KNN`` nearest measured spots."""
    where = np.flatnonzero(measured)
    k = min(KNN, len(where))
    d, i = cKDTree(coords[where]).query(coords[~measured], k=k)
    d, i = d.reshape(-1, k), i.reshape(-1, k)
    w = 1.0 / np.maximum(d, 1e-6)
    w /= w.sum(1, keepdims=True)
    return np.einsum("uk,ukg->ug", w, y[where][i])


def ridge_on_measured(x: np.ndarray, measured: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ridge of y on x fitted on the measured spots (dual form: M can be < D) -> (U, G)."""
    xm, ym = x[measured], y[measured]
    mx, my = xm.mean(0), ym.mean(0)
    xc = xm - mx
    K = xc @ xc.T  # (M, M)
    lam = RIDGE_ALPHA * max(np.trace(K) / max(len(K), 1), 1e-12)
    a = np.linalg.solve(K + lam * np.eye(len(K)), ym - my)  # (M, G)
    return (x[~measured] - mx) @ (xc.T @ a) + my


def mean_r(pred: np.ndarray, truth: np.ndarray, genes: np.ndarray) -> float:
    r = pearson_per_gene(pred[:, genes], truth[:, genes])
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def hvg_columns(cohort: Cohort, panel, n: int = 50) -> np.ndarray:
    """Panel columns of the n genes of highest pooled variance over the training slides."""
    s1, s2, cnt = (np.zeros(len(panel)) for _ in range(3))
    for sid in cohort.ids("train"):
        y, cols = slide_targets(cohort.slide(sid, ENCODER), panel)
        s1[cols] += y.sum(0)
        s2[cols] += (y.astype(np.float64) ** 2).sum(0)
        cnt[cols] += len(y)
    var = s2 / np.maximum(cnt, 1) - (s1 / np.maximum(cnt, 1)) ** 2
    return np.argsort(-var)[:n]


def run_world(name: str, cfg: SyntheticConfig, root: Path) -> list[dict]:
    data = make_cohort(root / "cohort", config=cfg)
    t0 = time.perf_counter()
    run = train(data, ENCODER, root / "run", epochs=EPOCHS, progress=False)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    prun = train(data, ENCODER, root / "prompt", init=run, prompt=True, progress=False)
    t_prompt = time.perf_counter() - t0
    base = load(prun)
    fitted = {"prompt": base}
    unfitted = load(prun)
    cohort = Cohort(data)
    hvg = hvg_columns(cohort, base.panel)
    records = []
    for sid in cohort.ids("test"):
        slide = cohort.slide(sid, ENCODER)
        y_m, cols = slide_targets(slide, base.panel)  # (N, G_m)
        y = np.zeros((slide.n_spots, len(base.panel)), dtype=np.float32)
        y[:, cols] = y_m
        genes_all = cols
        genes_hvg = np.intersect1d(hvg, cols)
        for fraction in FRACTIONS:
            for draw in range(DRAWS if fraction > 0 else 1):
                measured = measured_spots(slide.n_spots, fraction, seed=draw, slide_id=sid)
                u = ~measured
                preds = {}
                image = base.predictor.predict_genes(
                    base.predictor.prepare(slide), slice(None)
                ).clip(min=0)
                preds["image only"] = image[u]
                for label, run_obj, fresh in (
                    ("prompt", fitted["prompt"], False),
                    ("prompt, unfitted", unfitted, True),
                ):
                    p = prompted_predictor(run_obj, fraction, seed=draw)
                    if fresh:
                        p.head.load_state_dict(_fresh_state(p.head))
                    prepared = p.prepare(slide)
                    assert (prepared.mask == measured).all()
                    preds[label] = p.predict_genes(prepared, slice(None)).clip(min=0)[u]
                if fraction > 0:
                    coords = slide.coords_um
                    preds["kNN imputation"] = knn_imputation(coords, measured, y)
                    if measured.sum() >= 2:
                        preds["ridge on measured spots"] = ridge_on_measured(
                            slide.features.astype(np.float64), measured, y.astype(np.float64)
                        )
                if fraction == 0:
                    assert np.array_equal(preds["prompt"], preds["image only"])
                for model, pred in preds.items():
                    records.append(
                        dict(
                            world=name,
                            sample_id=sid,
                            fraction=fraction,
                            draw=draw,
                            model=model,
                            n_measured=int(measured.sum()),
                            n_spots=int(slide.n_spots),
                            r_all=mean_r(pred, y[u], genes_all),
                            r_hvg50=mean_r(pred, y[u], genes_hvg),
                            train_seconds=t_train,
                            prompt_fit_seconds=t_prompt,
                        )
                    )
    return records


def _fresh_state(head) -> dict:
    """The state of a head as ``fit_prompt`` starts it (same seed)."""
    from histoprism.models.prompt import PromptHead

    torch.manual_seed(0)
    fresh = PromptHead(head.query.in_features, len(head.gain_logit), head.query.out_features,
                       head.neighbours)  # fmt: skip
    return fresh.state_dict()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(WORLDS.items()):
            records += run_world(name, cfg, Path(tmp) / f"w{i}")
    import pandas as pd

    df = pd.DataFrame(records)
    table = (
        df.groupby(["world", "model", "fraction"])[["r_hvg50", "r_all"]]
        .mean()
        .unstack("fraction")
        .round(3)
    )
    print(table.to_string())
    OUT.write_text(json.dumps(dict(records=records, argv=sys.argv), indent=1) + "\n")
    print(f"-> {OUT}")


if __name__ == "__main__":
    main()
