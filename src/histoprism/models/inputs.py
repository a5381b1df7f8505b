"""``Slide`` records -> the tensors a model consumes (features, condition, spatial index, targets)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.spatial import cKDTree

from .._core import keys
from .._core.errors import InputError
from ..expression.genes import GenePanel, panel_counts
from ..io.cohort import Slide
from .network import ModelConfig
from .spatial import SpatialPlan, spatial_plan

# context field -> (its ModelConfig vocabulary, the metadata column it reads)
CONTEXT_COLUMNS = {
    "organ": ("organs", keys.META_ORGAN),
    "technology": ("technologies", keys.META_TECH),
}


@dataclass(frozen=True)
class CancerVocabulary:
    """Cancer codes the model knows, in embedding-row order; always contains 'Unknown'."""

    codes: tuple[str, ...]

    @classmethod
    def from_codes(cls, codes) -> CancerVocabulary:
        uniq = sorted({str(c) for c in codes} - {keys.UNKNOWN_CANCER})
        return cls(tuple([*uniq, keys.UNKNOWN_CANCER]))

    @property
    def unknown(self) -> int:
        return self.codes.index(keys.UNKNOWN_CANCER)

    def index(self, code: str, *, fallback: bool = False) -> int:
        """Row of ``code``; an unseen code is an error unless ``fallback`` maps it to 'Unknown'."""
        if code in self.codes:
            return self.codes.index(code)
        if fallback:
            return self.unknown
        raise InputError(
            f"unknown cancer code '{code}' (model knows: {', '.join(self.codes)}); "
            "use --unknown-cancer to predict it with the 'Unknown' token"
        )


@dataclass
class SlideTensors:
    """One slide ready for the model. Row i is spot i of the ``Slide``.

    features (N, D) float32; coords_um (N, 2) float32 µm; neighbours (N, K) int64 or None;
    spatial: sites and rings (``spatial.spatial_plan``) when the model reads them, else None;
    target (N, G_m) float32 log1p(counts) of the measured panel genes at ``target_cols`` (G_m,) int64.
    """

    id: str
    cancer: str
    condition: int
    features: torch.Tensor
    coords_um: torch.Tensor
    neighbours: torch.Tensor | None
    target: torch.Tensor | None = None
    spatial: SpatialPlan | None = None
    centre: torch.Tensor | None = None  # (D,) slide mean the model subtracts (centre_slides)
    target_cols: torch.Tensor | None = None
    context: dict[str, int] = field(default_factory=dict)  # organ/technology index, if used

    @property
    def n_spots(self) -> int:
        return self.features.shape[0]

    def centred_features(self, rows=None) -> torch.Tensor:
        """(n, D) embeddings of ``rows`` (all spots: None) as the model sees them: minus the
        slide's centre where it has one (``centre_slides``)."""
        x = self.features if rows is None else self.features[rows]
        return x if self.centre is None else x - self.centre

    def model_inputs(self, device: torch.device | str | None = None) -> dict:
        """Keyword arguments of ``HistoPrism.forward`` for this slide as a batch of one (on
        ``device`` when given; absent inputs are None)."""
        inputs = dict(
            features=self.features[None],
            condition=torch.tensor([self.condition]),
            coords_um=self.coords_um[None],
            neighbours=None if self.neighbours is None else self.neighbours[None],
            spatial=None if self.spatial is None else [self.spatial],
            centre=None if self.centre is None else self.centre[None],
            **{name: torch.tensor([i]) for name, i in self.context.items()},
        )
        if device is None:
            return inputs
        move = lambda v: [p.to(device) for p in v] if isinstance(v, list) else v.to(device)  # noqa: E731
        return {k: None if v is None else move(v) for k, v in inputs.items()}


def knn_index(coords: np.ndarray, k: int) -> np.ndarray:
    """(N, 2) -> (N, k) indices of each spot's k nearest other spots (itself when N <= k).

    Ties (a hex grid has rings of equidistant spots) are broken by position, not by row, so the
    neighbours of a spot do not depend on the order of spots in the file.
    """
    n = len(coords)
    if n == 1:
        return np.zeros((1, k), dtype=np.int64)
    kk = min(k + 13, n)  # enough candidates to cover the ties of the last ring kept
    dist, idx = cKDTree(coords).query(coords, k=kk)
    x, y = coords[idx, 0], coords[idx, 1]  # (N, kk)
    order = np.lexsort((y, x, np.round(dist, 6)), axis=1)  # distance first, then x, then y
    idx = np.take_along_axis(idx, order, axis=1)[:, 1 : k + 1]  # drop the spot itself (distance 0)
    if idx.shape[1] < k:  # tiny slide: repeat the farthest neighbour
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], k - idx.shape[1], axis=1)], axis=1)
    return idx.astype(np.int64)


def slide_targets(slide: Slide, panel: GenePanel) -> tuple[np.ndarray, np.ndarray]:
    """log1p counts of the panel genes the slide measured (``genes.panel_counts``, the truth
    evaluation scores against): (N, G_m) float32 and (G_m,) int64 panel columns."""
    counts, cols = panel_counts(slide.counts, slide.genes, panel.genes, gene_ids=slide.gene_ids)
    return np.log1p(counts.toarray()).astype(np.float32), cols


def input_options(cfg: ModelConfig) -> dict:
    """The keyword arguments of ``to_tensors`` that a model's config fixes: training and
    prediction call this, so a model always sees its inputs prepared the same way."""
    return dict(
        in_dim=cfg.in_dim,
        neighbours=cfg.neighbours,
        rings_um=cfg.context_rings_um,
        site_um=cfg.site_um,
        centre=cfg.centre_slides,
        context={
            name: getattr(cfg, vocabulary)
            for name, (vocabulary, _) in CONTEXT_COLUMNS.items()
            if name in cfg.context_fields
        },
    )


def context_vocabularies(cfg: ModelConfig, slides: list[Slide]) -> ModelConfig:
    """``cfg`` with the vocabulary of each of its ``context_fields`` taken from the slides'
    metadata (sorted values, "Unknown" last)."""
    updates = {
        vocabulary: CancerVocabulary.from_codes(_context_value(s, column) for s in slides).codes
        for name, (vocabulary, column) in CONTEXT_COLUMNS.items()
        if name in cfg.context_fields
    }
    return replace(cfg, **updates)


def _context_value(slide: Slide, column: str) -> str:
    value = slide.meta.get(column)
    text = "" if value is None else str(value).strip()
    return text if text and text.lower() != "nan" else keys.UNKNOWN_CANCER


def slide_mean(features: np.ndarray) -> np.ndarray:
    """(D,) float32 mean embedding over a slide's (N, D) spots (accumulated in float64): the
    centre ``centre_slides`` subtracts."""
    return features.mean(axis=0, dtype=np.float64).astype(np.float32)


def to_tensors(
    slide: Slide,
    *,
    vocab: CancerVocabulary,
    in_dim: int,
    neighbours: int = 0,
    rings_um: tuple[float, ...] = (),
    site_um: float = 0.0,
    centre: bool = False,
    panel: GenePanel | None = None,
    unknown_cancer: bool = False,
    context: dict[str, tuple[str, ...]] | None = None,
) -> SlideTensors:
    """Convert a ``Slide``; with a ``panel`` and counts, also the targets. ``centre``: subtract
    the slide's mean embedding (``ModelConfig.centre_slides``). ``rings_um``, ``site_um``: the
    model's rings and sites (``spatial.spatial_plan``), computed here once per slide. ``context``: field -> vocabulary
    of the model's context fields (``input_options``); a value outside it is "Unknown".

    Raises ``InputError`` when the embedding dimension differs from the model's ``in_dim``.
    """
    if slide.features.shape[1] != in_dim:
        raise InputError(
            f"slide {slide.id}: embeddings have dimension {slide.features.shape[1]}, "
            f"the model expects {in_dim} (wrong --encoder?)"
        )
    nb = torch.from_numpy(knn_index(slide.coords, neighbours)) if neighbours > 0 else None
    # the model subtracts the centre block by block: no second (N, D) copy of a large slide
    t = SlideTensors(
        id=slide.id,
        cancer=slide.cancer,
        condition=vocab.index(slide.cancer, fallback=unknown_cancer),
        features=torch.from_numpy(np.ascontiguousarray(slide.features, dtype=np.float32)),
        centre=torch.from_numpy(slide_mean(slide.features)) if centre else None,
        coords_um=torch.from_numpy(slide.coords_um.astype(np.float32)),
        neighbours=nb,
        spatial=(
            spatial_plan(slide.coords_um, rings_um, site_um) if rings_um or site_um > 0 else None
        ),
        context={
            name: CancerVocabulary(vocabulary).index(
                _context_value(slide, CONTEXT_COLUMNS[name][1]), fallback=True
            )
            for name, vocabulary in (context or {}).items()
        },
    )
    if panel is not None and slide.counts is not None:
        y, cols = slide_targets(slide, panel)
        if len(cols) == 0:
            raise InputError(f"slide {slide.id}: none of its genes is in the model's gene panel")
        t.target, t.target_cols = torch.from_numpy(y), torch.from_numpy(cols)
    return t


def gene_means(slides: list[SlideTensors], n_genes: int) -> torch.Tensor:
    """(G,) mean log1p target per panel gene over the spots of the slides measuring it (0 if none)."""
    total, count = (
        torch.zeros(n_genes, dtype=torch.float64),
        torch.zeros(n_genes, dtype=torch.float64),
    )
    for s in slides:
        total.index_add_(0, s.target_cols, s.target.sum(0).double())
        count.index_add_(
            0, s.target_cols, torch.full((len(s.target_cols),), float(s.n_spots)).double()
        )
    return (total / count.clamp(min=1)).float()


def feature_stats(slides: list[SlideTensors]) -> tuple[torch.Tensor, torch.Tensor]:
    """(D,) mean and std of the embeddings over all training spots (std floored to avoid /0)."""
    x = torch.cat([s.centred_features() for s in slides]).double()
    return x.mean(0).float(), x.std(0).clamp(min=1e-6).float()
