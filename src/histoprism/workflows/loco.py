"""``histoprism benchmark --protocol loco``: cancer types never seen in training.

For every cancer type T of the cohort's test split: train on the other types only (the cohort's
train / val slides of other types), then predict T's test slides four ways and evaluate them as
usual (``evaluate``, the cohort's own HVG lists):

- ``unknown-token``: the conditioned model with its trained 'Unknown' token (condition dropout);
- ``no-conditioning``: the ablation trained without any cancer type;
- ``nearest-type``: the conditioned model told the known type whose slides look closest
  (``cancer_type.CancerTypeClassifier.nearest``);
- ``inferred-type``: told the type a classifier of pooled embeddings infers, or 'Unknown' below
  ``cancer_type.MIN_CONFIDENCE`` (what ``predict --cancer auto`` does);

and, as the reference of what not seeing T costs, ``seen`` (the model trained on every type,
told T). Outputs in OUT: ``loco.csv`` / ``loco.md`` / ``loco.json`` (one row per held-out type
and strategy) and each fold's runs, predictions and EVAL directories under ``OUT/{type}/``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .._core import keys
from .._core.errors import InputError
from .._core.files import write_text_atomic
from .._core.progress import progress_bar
from ..evaluation.compare import pipe_table
from ..evaluation.evaluate import evaluate
from ..io.cohort import Cohort, Slide
from ..models.cancer_type import CancerTypeClassifier, fit_cancer_classifier

log = logging.getLogger(__name__)

STRATEGIES = ("seen", "unknown-token", "no-conditioning", "nearest-type", "inferred-type")
METRICS = ("hvg_micro", "gpc_hallmark_micro", "gpc_go_micro", "all_genes_micro")


def loco(
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    split: str | Path | None = None,
    cancers: list[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Leave-one-cancer-out benchmark; returns the table written to ``out/loco.csv``.

    ``cancers``: the held-out types (default: every type with test slides). ``epochs`` caps
    training of every model (default: the recipe's).
    """
    from ..training.api import train

    out, cohort = Path(out), Cohort(data, split_dir=split)
    test = cohort.ids("test")
    types = sorted({cohort.cancer(i) for i in test} - {keys.UNKNOWN_CANCER})
    for c in cancers or []:
        if c not in types:
            raise InputError(f"no test slide of cancer type '{c}' (have: {', '.join(types)})")
    types = cancers or types
    if len(types) < 2 and not cancers:
        raise InputError("leave-one-cancer-out needs test slides of at least two cancer types")
    fit = dict(epochs=epochs, seed=seed, progress=False)
    seen = train(data, encoder, out / "seen", split=split, **fit)
    rows = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("leave one cancer out", total=len(types), info="")
        for held_out in types:
            fold = out / held_out
            fold_split = _write_fold_split(cohort, held_out, fold / "split")
            runs = {
                "conditioned": train(data, encoder, fold / "histoprism", split=fold_split, **fit),
                "no-conditioning": train(
                    data,
                    encoder,
                    fold / "no-conditioning",
                    split=fold_split,
                    conditioning=False,
                    **fit,
                ),  # fmt: skip
            }
            ids = [i for i in test if cohort.cancer(i) == held_out]
            clf = _fold_classifier(cohort, encoder, fold_split)
            for strategy in STRATEGIES:
                run_dir = seen if strategy == "seen" else runs.get(strategy, runs["conditioned"])
                pred = fold / "pred" / strategy
                told = _predict_fold(run_dir, cohort, encoder, ids, pred, strategy, clf)
                metrics = evaluate(pred, cohort, fold / "eval" / strategy, samples=ids,
                                   progress=False)  # fmt: skip
                head = metrics["headline"]
                rows.append(
                    {
                        "held_out": held_out,
                        "strategy": strategy,
                        "n_slides": len(ids),
                        **{m: head.get(m) for m in METRICS},
                        "told": ", ".join(sorted(set(told))),
                    }
                )
            bar.update(task, advance=1, info=held_out)
    table = pd.DataFrame(rows)
    _write_tables(out, table)
    return table


def _write_fold_split(cohort: Cohort, held_out: str, split_dir: Path) -> Path:
    """train / val: the cohort's slides of every other type; test: the held-out type's."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for name in keys.SPLIT_NAMES:
        ids = [i for i in cohort.ids(name) if (cohort.cancer(i) == held_out) == (name == "test")]
        frame = pd.DataFrame(
            {keys.SPLIT_ID: ids, keys.META_CANCER: [cohort.cancer(i) for i in ids]}
        )
        write_text_atomic(split_dir / f"{name}_split.csv", frame.to_csv(index=False))
    return split_dir


def _fold_classifier(cohort: Cohort, encoder: str, split_dir: Path) -> CancerTypeClassifier:
    """The cancer-type classifier of the fold's training slides."""
    fold = Cohort(cohort.root, split_dir=split_dir)
    ids = fold.ids("train")
    features = [fold.slide(i, encoder, counts=False).features for i in ids]
    return fit_cancer_classifier(features, [fold.cancer(i) for i in ids])


def _told(slide: Slide, strategy: str, clf: CancerTypeClassifier) -> Slide:
    """The slide with the cancer type the strategy gives the model."""
    if strategy == "nearest-type":
        return replace(slide, cancer=clf.nearest(slide.features))
    if strategy == "inferred-type":
        return replace(slide, cancer=clf.code_for(slide.features))
    return slide  # seen: its own type; unknown-token / no-conditioning: unknown to the model


def _predict_fold(run_dir, cohort, encoder, ids, pred_dir, strategy, clf) -> list[str]:
    """Predict the held-out slides into ``pred_dir``; returns the codes the model was told."""
    from ..inference.predict import predict_slide
    from ..models.run import load

    run = load(run_dir)
    told = []
    for sid in ids:
        slide = _told(cohort.slide(sid, encoder), strategy, clf)
        predict_slide(run, slide, Path(pred_dir) / f"{sid}.h5ad", unknown_cancer=True)
        known = slide.cancer in run.vocab.codes
        told.append(slide.cancer if known else keys.UNKNOWN_CANCER)
    return told


def _write_tables(out: Path, table: pd.DataFrame) -> None:
    write_text_atomic(out / "loco.csv", table.to_csv(index=False))
    write_text_atomic(out / "loco.json", json.dumps(table.to_dict(orient="records"), indent=1))
    wide = table.pivot(index="strategy", columns="held_out", values="hvg_micro")
    wide = wide.reindex([s for s in STRATEGIES if s in wide.index])
    wide["mean"] = wide.mean(axis=1)
    gpc = table.groupby("strategy")["gpc_hallmark_micro"].mean().reindex(wide.index)
    wide["GPC Hallmark (mean)"] = gpc
    wide.index.name = "HVG-50 r on the held-out type"
    write_text_atomic(out / "loco.md", pipe_table(wide) + "\n")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric per strategy over the held-out types (rows in ``STRATEGIES`` order)."""
    means = table.groupby("strategy")[list(METRICS)].mean()
    return means.reindex([s for s in STRATEGIES if s in means.index]).astype(np.float64)
