"""Pathway activity: the mean z-scored expression of a gene set's genes, per spot.

One definition for every place that scores a set: the ``obsm['pathways']`` that ``predict``
writes (streamed, or in closed form from HistoPrism's linear head), the measured and predicted
maps of the report, and GPC's per-set aggregation (``membership``). z is per gene across the
spots of one slide; a constant gene (std within rounding of its mean) contributes 0 and still
counts in the set's mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .correlation import constant_genes
from .genes import GENESET_COLLECTIONS, GenePanel, gpc_genesets, looks_like_ensembl

SPOT_BLOCK = 8192  # spots per float64 copy in linear_head_scores: bounds its temporaries


def zscore_columns(X: np.ndarray) -> np.ndarray:
    """(N, G) float64: each column minus its mean over finite rows, over its std (ddof 0).

    A constant column becomes 0 (``constant_genes``); non-finite entries become 0.
    """
    X = np.asarray(X, dtype=np.float64)
    ok = np.isfinite(X)
    n = np.maximum(ok.sum(axis=0), 1)
    mean = np.where(ok, X, 0.0).sum(axis=0) / n
    d = np.where(ok, X - mean, 0.0)
    std = np.sqrt((d * d).sum(axis=0) / n)
    const = constant_genes(std, mean)
    return np.divide(d, std, out=np.zeros_like(d), where=~const)


def membership(genes: Sequence[str], genesets: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(G, S) float32: 1 where gene ``genes[g]`` belongs to set s (sets in ``genesets`` order;
    a set's repeated genes count once)."""
    index = pd.Index(np.asarray(genes, dtype=str))
    pos = [index.get_indexer(list(dict.fromkeys(m))) for m in genesets.values()]
    cols = np.repeat(np.arange(len(pos)), [len(p) for p in pos])
    rows = np.concatenate(pos) if pos else np.empty(0, dtype=np.int64)
    out = np.zeros((len(index), len(pos)), dtype=np.float32)
    out[rows[rows >= 0], cols[rows >= 0]] = 1.0
    return out


def panel_membership(
    panel: GenePanel, genesets: Mapping[str, Sequence[str]]
) -> tuple[list[str], np.ndarray]:
    """The sets with at least one panel gene, and their (G, S) float32 membership matrix."""
    M = membership(panel.genes, genesets)
    keep = np.flatnonzero(M.any(axis=0))
    return [list(genesets)[j] for j in keep], np.ascontiguousarray(M[:, keep])


def default_genesets(panel: GenePanel) -> dict[str, list[str]]:
    """The bundled GPC Hallmark + GO sets in the panel's naming (symbols or Ensembl ids)."""
    ids = "ensembl" if looks_like_ensembl(panel.genes) else "symbols"
    sets: dict[str, list[str]] = {}
    for collection in GENESET_COLLECTIONS:
        sets.update(gpc_genesets(collection, ids=ids))
    return sets


def pathway_scores(
    X: np.ndarray, genes: Sequence[str], genesets: Mapping[str, Sequence[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-spot pathway scores: mean over each set's genes in ``genes`` of the z-scored ``X``.

    X: (N, G) log1p expression of one slide, column g = ``genes[g]``. Returns (N, S) float64
    scores (NaN for a set with no gene in ``genes``) and (S,) int genes per set.
    """
    M = membership(genes, genesets).astype(np.float64)  # (G, S)
    counts = M.sum(axis=0)  # (S,)
    sums = zscore_columns(X) @ M  # (N, S)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(counts > 0, sums / counts, np.nan)
    return scores, counts.astype(np.int64)


@torch.no_grad()
def linear_head_scores(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, membership: np.ndarray
) -> np.ndarray:
    """``pathway_scores`` of X = hidden @ weight.T + bias without forming X: (N, H), (G, H), (G,),
    (G, S) -> (N, S) float64.

    X - mean(X) = (h - mean(h)) W' and gene g's variance over the spots is w_g' C w_g with C the
    (H, H) covariance of h: the z-scores of all N x G values, averaged per set, are
    (h - mean(h)) @ A with A = W' diag(1/sd) M / set size. Constant genes contribute 0, as in
    ``zscore_columns``. Used where predictions are written and where factorised ones are read.
    """
    n, blocks = len(hidden), hidden.split(SPOT_BLOCK)
    mean = sum(b.double().sum(0) for b in blocks) / n  # (H,)
    cov = sum((b.double() - mean).T @ (b.double() - mean) for b in blocks) / n  # (H, H)
    w = weight.double()  # (G, H)
    sd = ((w @ cov) * w).sum(1).clamp(min=0).sqrt()  # (G,)
    gene_mean = w @ mean + bias.double()  # (G,)
    const = constant_genes(sd.cpu().numpy(), gene_mean.cpu().numpy())  # as zscore_columns
    m = torch.from_numpy(np.asarray(membership)).to(w)  # (G, S)
    m = m / m.sum(0).clamp(min=1)  # mean over the set's genes
    scale = torch.where(torch.from_numpy(const).to(sd.device), 0.0, 1 / sd.clamp(min=1e-300))
    a = w.T @ (m * scale[:, None])  # (H, S)
    return torch.cat([(b.double() - mean) @ a for b in blocks]).cpu().numpy()  # (N, S)
