"""Cohort -> the slides a training run fits on: ``TrainingData`` (train / val Slide records, panel,
cancer vocabulary, input statistics) and random crops of large slides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._core.errors import InputError
from .._core.progress import progress_bar
from ..expression.genes import GenePanel, looks_like_ensembl, read_gene_list
from ..io.cohort import Cohort, Slide
from ..models.inputs import (
    CancerVocabulary,
    SlideTensors,
    knn_index,
)
from ..models.spatial import spatial_plan

log = logging.getLogger(__name__)


# --- data ------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """Everything a model is fitted on: aligned slides plus the panel and vocabulary they define."""

    train: list[Slide]
    val: list[Slide]
    panel: GenePanel
    vocab: CancerVocabulary
    encoder: str

    @property
    def in_dim(self) -> int:
        return self.train[0].features.shape[1]


def load_training_data(
    cohort: Cohort,
    encoder: str,
    *,
    genes: str | Path | tuple[str, ...] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainingData:
    """Load train and val slides; the panel is ``genes`` (a gene list file, or the genes
    themselves as a tuple) or every gene measured in a training slide."""
    train_ids, val_ids = cohort.ids("train"), cohort.ids("val") if "val" in cohort.splits else []
    if not train_ids:
        raise InputError("no training slides in the split", cohort.root)
    if not val_ids:  # early stopping needs held-out slides: take a tenth of training
        rng = np.random.default_rng(seed)
        val_ids = sorted(rng.choice(train_ids, max(1, len(train_ids) // 10), replace=False))
        train_ids = [i for i in train_ids if i not in set(val_ids)]
        log.warning("no validation split: holding out %s from training", ", ".join(val_ids))
    with progress_bar(enabled=progress) as bar:
        load = bar.add_task("loading slides", total=len(train_ids) + len(val_ids))
        train = [_load(cohort, i, encoder, bar, load) for i in train_ids]
        val = [_load(cohort, i, encoder, bar, load) for i in val_ids]
    dims = {s.features.shape[1] for s in train + val}
    if len(dims) > 1:
        raise InputError(f"embedding dimensions differ between slides: {sorted(dims)}")
    # counts move to the panel's id space (an Ensembl panel with symbol slides, as HEST-1k's),
    # by the rule evaluation uses: raw counts of several names for one id summed before log1p
    if isinstance(genes, tuple):
        panel = GenePanel(genes)
    else:
        panel = GenePanel(tuple(read_gene_list(genes))) if genes is not None else None
    ensembl = (
        looks_like_ensembl(panel.genes)
        if panel
        else all(looks_like_ensembl(s.genes) for s in train)
    )
    space = "ensembl" if ensembl else "symbol"
    train = [s.in_gene_space(space) for s in train]
    val = [s.in_gene_space(space) for s in val]
    if panel is None:
        panel = GenePanel(tuple(sorted(set().union(*(s.genes for s in train)))))
    vocab = CancerVocabulary.from_codes(s.cancer for s in train + val)
    return TrainingData(train=train, val=val, panel=panel, vocab=vocab, encoder=encoder)


def _load(cohort: Cohort, sample_id: str, encoder: str, bar, task) -> Slide:
    slide = cohort.slide(sample_id, encoder)
    bar.advance(task)
    return slide


def random_crop(slide: SlideTensors, k: int, rng: np.random.Generator) -> SlideTensors:
    """The ``k`` spots nearest to a random spot of the slide (a disc of tissue, in the slide's
    spot order), or the slide itself when it has at most ``k`` spots (``k`` <= 0: no crop).

    Bounds the memory of a training step on a Visium HD-size slide; kNN neighbours, sites and rings
    are recomputed inside the crop, as if its edge were the tissue's.
    """
    if k <= 0 or slide.n_spots <= k:
        return slide
    c = slide.coords_um
    d2 = ((c - c[rng.integers(slide.n_spots)]) ** 2).sum(1)  # (N,) squared µm to the centre
    keep = torch.topk(d2, k, largest=False).indices.sort().values  # (k,)
    nb = slide.neighbours
    if nb is not None:
        nb = torch.from_numpy(knn_index(c[keep].double().numpy(), nb.shape[1]))
    target = slide.target[keep] if slide.target is not None else None
    plan = slide.spatial
    if plan is not None:
        plan = spatial_plan(c[keep].double().numpy(), plan.rings_um, plan.site_um)
    return replace(
        slide,
        features=slide.features[keep],
        coords_um=c[keep],
        neighbours=nb,
        spatial=plan,
        target=target,
    )
