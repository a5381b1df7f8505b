"""``histoprism demo``: built-in cohort -> train -> predict -> evaluate -> one comparison table."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import keys
from .cohort import Cohort
from .compare import pipe_table
from .evaluate import evaluate
from .io import write_text_atomic
from .predict import predict
from .synthetic import SyntheticConfig, make_cohort
from .train import train

log = logging.getLogger(__name__)

ENCODER = "synthetic"
# Sized so that the whole demo runs in under 5 minutes on 2 CPU cores.
DEMO_COHORT = SyntheticConfig(
    n_slides=24, n_cancers=3, spots=(250, 650), n_genes=2000, split=(0.55, 0.15, 0.3)
)
DEMO_EPOCHS = 25  # the cosine schedule spans these; the full recipe trains up to 60


@dataclass(frozen=True)
class DemoModel:
    name: str  # row label
    slug: str  # folder name under runs/, pred/, eval/
    train_args: dict = field(default_factory=dict)


DEMO_MODELS = (
    DemoModel("HistoPrism", "histoprism", dict(model="histoprism")),
    DemoModel("HistoPrism, no conditioning", "no-conditioning", dict(conditioning=False)),
    DemoModel("ridge + kNN smoothing", "ridge-knn", dict(model="ridge-knn")),
    DemoModel("ridge (HEST-bench)", "ridge", dict(model="ridge")),
)
COLUMNS = {
    "hvg_micro": "HVG-50 micro",
    "hvg_macro": "HVG-50 macro",
    "gpc_hallmark_micro": "GPC Hallmark micro",
    "gpc_hallmark_macro": "GPC Hallmark macro",
    "gpc_go_micro": "GPC GO micro",
    "gpc_go_macro": "GPC GO macro",
    "all_genes_micro": "all genes",
}


def run_demo(
    out: str | Path,
    *,
    cohort: SyntheticConfig = DEMO_COHORT,
    models: tuple[DemoModel, ...] = DEMO_MODELS,
    epochs: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Generate the cohort in ``out/cohort``, fit every model, score the test slides.

    Returns one row per model plus the attainable ceiling (test split, ``--hvg train``), and
    writes it to ``out/results.csv`` and ``out/results.md``.
    """
    out, epochs = Path(out), epochs or DEMO_EPOCHS
    data = make_cohort(out / "cohort", config=cohort)
    c = Cohort(data)
    rows = []
    for m in models:
        t0 = time.perf_counter()
        run = train(
            data, ENCODER, out / "runs" / m.slug, epochs=epochs, progress=progress, **m.train_args
        )
        seconds = time.perf_counter() - t0
        pred = out / "pred" / m.slug
        predict(run, data, ENCODER, pred, progress=progress)
        metrics = evaluate(pred, c, out / "eval" / m.slug, progress=progress)
        rows.append(_row(m.name, metrics, seconds))
    ceiling = evaluate(data / keys.CEILING_DIR, c, out / "eval" / "ceiling", progress=progress)
    rows.append(_row("ceiling (what the images can show)", ceiling, None))
    table = pd.DataFrame(rows).set_index("model")
    table.to_csv(out / "results.csv")
    write_text_atomic(out / "results.md", pipe_table(table))
    return table


def _row(name: str, metrics: dict, seconds: float | None) -> dict:
    head = metrics["headline"]
    row = {"model": name}
    row.update({label: head.get(key) for key, label in COLUMNS.items()})
    row["train s"] = "—" if seconds is None else f"{seconds:.0f}"
    return row
