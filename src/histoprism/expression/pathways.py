"""Pathway activity: the mean z-scored expression of a gene set's genes, per spot.

One definition for every place that scores a set: the ``obsm['pathways']`` that ``predict``
writes (streamed, or in closed form from HistoPrism's linear head), the measured and predicted
maps of the report, and GPC's per-set aggregation (``membership_matrix``). z is per gene across
the spots of one slide; a constant gene (std within rounding of its mean) contributes 0 and
still counts in the set's mean.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
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


class GeneSets(Mapping[str, list[str]]):
    """Gene sets read once, looked up many times: an immutable ``{set name: genes}``.

    On construction the sets' genes are reduced to their U distinct names and an (S, U) 0/1
    matrix, so that ``membership_matrix`` against any gene list looks up U names instead of
    every set's genes again. Why: a 20,000-set GMT lists ~3 million names; evaluation asks for
    its membership several times (panel check, GPC, each slide's pathway maps).
    """

    def __init__(self, genesets: Mapping[str, Sequence[str]]) -> None:
        self._sets = {str(k): list(v) for k, v in genesets.items()}
        members = list(self._sets.values())
        sizes = np.fromiter(map(len, members), dtype=np.int64, count=len(members))
        flat = np.fromiter(itertools.chain.from_iterable(members), dtype=object, count=sizes.sum())
        codes, distinct = pd.factorize(flat)  # one hash pass over all names
        indptr = np.concatenate([[0], np.cumsum(sizes)])
        # CSR straight from the sets' rows: a gene listed twice in one set is a repeated entry
        # here, made 1 in ``membership`` (sorting 3 million entries to merge them costs more)
        self._matrix = sp.csr_matrix(
            (np.ones(len(codes)), codes, indptr), shape=(len(members), len(distinct))
        )  # (S, U)
        self._genes = pd.Index(distinct, dtype=object)  # (U,)

    def __getitem__(self, name: str) -> list[str]:
        return self._sets[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sets)

    def __len__(self) -> int:
        return len(self._sets)

    def __repr__(self) -> str:
        return f"GeneSets({len(self)} sets, {len(self._genes)} distinct genes)"

    @property
    def genes(self) -> pd.Index:
        """(U,) the distinct genes of all sets, in order of first appearance."""
        return self._genes

    def membership(self, genes: Sequence[str]) -> sp.csr_matrix:
        """(S, G) CSR float64 0/1: row s marks the genes of set s among ``genes`` (unique)."""
        index = pd.Index(np.asarray(genes, dtype=str))
        cols = index.get_indexer(self._genes)  # (U,) column of each distinct gene, -1: absent
        keep = np.flatnonzero(cols >= 0)
        select = sp.csr_matrix(  # (U, G): distinct gene u -> its column
            (np.ones(len(keep)), (keep, cols[keep])), shape=(len(self._genes), len(index))
        )
        M = (self._matrix @ select).tocsr()  # the product sums a set's repeated entries ...
        M.data[:] = 1.0  # ... which count once
        return M


def membership_matrix(genes: Sequence[str], genesets: Mapping[str, Sequence[str]]) -> sp.csr_matrix:
    """(S, G) CSR float64 0/1: row s marks the genes of set s (``genesets`` order) among ``genes``.

    A set's repeated genes count once; genes not in ``genes`` are left out. Pass a ``GeneSets``
    to look up the same sets several times. Sparse, with one hash pass over all names (in
    ``GeneSets``): 20,000 sets of 10-300 genes, or one of 200,000 genes, take about a second;
    a lookup per set into a dense (G, S) matrix took minutes and gigabytes.
    """
    sets = genesets if isinstance(genesets, GeneSets) else GeneSets(genesets)
    return sets.membership(genes)


def membership(genes: Sequence[str], genesets: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(G, S) float32: 1 where gene ``genes[g]`` belongs to set s (sets in ``genesets`` order;
    a set's repeated genes count once). Dense ``membership_matrix``, for the bundled sets that
    ``predict`` writes; score many sets with the sparse one."""
    M = membership_matrix(genes, genesets).tocoo()  # (S, G)
    out = np.zeros(M.shape[::-1], dtype=np.float32)  # float32 from the start: no float64 copy
    out[M.col, M.row] = 1.0
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
    return membership_scores(X, membership_matrix(genes, genesets))


def membership_scores(X: np.ndarray, M: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """``pathway_scores`` for a (S, G) 0/1 ``membership_matrix`` M: (N, S) float64 scores (NaN
    for an empty set) and (S,) int64 genes per set."""
    M = sp.csr_matrix(M, dtype=np.float64)
    counts = np.asarray(M.sum(axis=1)).ravel()  # (S,)
    sums = (M @ zscore_columns(X).T).T  # (N, S): sparse (S, G) @ dense (G, N)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(counts > 0, sums / counts, np.nan)
    return scores, counts.astype(np.int64)


@torch.no_grad()
def linear_head_variance(
    hidden: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each gene's variance over the spots of X = hidden @ weight.T (+ any bias) without forming
    X: (N, H), (G, H) -> the (H,) mean of hidden and the (G,) variances w_g' C w_g, C the (H, H)
    population covariance of hidden; float64, in blocks of spots."""
    n, blocks = len(hidden), hidden.split(SPOT_BLOCK)
    mean = sum(b.double().sum(0) for b in blocks) / max(n, 1)  # (H,)
    cov = sum((b.double() - mean).T @ (b.double() - mean) for b in blocks) / max(n, 1)  # (H, H)
    w = weight.double()
    return mean, ((w @ cov) * w).sum(1)


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
    blocks = hidden.split(SPOT_BLOCK)
    mean, var = linear_head_variance(hidden, weight)
    w = weight.double()  # (G, H)
    sd = var.clamp(min=0).sqrt()  # (G,)
    gene_mean = w @ mean + bias.double()  # (G,)
    const = constant_genes(sd.cpu().numpy(), gene_mean.cpu().numpy())  # as zscore_columns
    m = torch.from_numpy(np.asarray(membership)).to(w)  # (G, S)
    m = m / m.sum(0).clamp(min=1)  # mean over the set's genes
    scale = torch.where(torch.from_numpy(const).to(sd.device), 0.0, 1 / sd.clamp(min=1e-300))
    a = w.T @ (m * scale[:, None])  # (H, S)
    return torch.cat([(b.double() - mean) @ a for b in blocks]).cpu().numpy()  # (N, S)
