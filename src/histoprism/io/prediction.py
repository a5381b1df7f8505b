"""Reading ``PRED/{id}.h5ad``, dense or factorised, one way for every reader.

A dense file holds X (N, G). A factorised file (``predict --output factorised``, the default for
slides whose dense X would pass ``inference.writer.DENSE_MAX_BYTES``, e.g. Visium HD) holds no X but the
model's last hidden layer ``obsm['histoprism_hidden']`` (N, H) and its linear head
``varm['histoprism_head']`` (G, H) + ``var['histoprism_bias']`` (G,): any gene is
max(hidden @ head[g] + bias[g], 0), computed when read, and any gene set's score in closed form
(``pathways.linear_head_scores``). Layout: docs/formats.md, "PRED: predictions".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from .._core import keys
from .._core.errors import InputError
from ..expression.pathways import linear_head_scores, membership, zscore_columns
from .readers import read_h5ad

FACTOR_SLOTS = (
    ("obsm", keys.OBSM_HIDDEN),
    ("varm", keys.VARM_HEAD),
    ("var", keys.VAR_HEAD_BIAS),
)


def predicted_ids(pred: str | Path) -> list[str]:
    """Sample ids of the predictions in a PRED folder (``{id}.h5ad``), sorted; the hidden
    temporaries of a run in progress left out."""
    return sorted(p.stem for p in Path(pred).glob("*.h5ad") if not p.name.startswith("."))


def is_factorised(path: str | Path) -> bool:
    """Whether a prediction file stores the hidden layer and head instead of X."""
    return peek(path)[2]


def peek(path: str | Path) -> tuple[pd.Index, int, bool]:
    """(gene names, number of spots, factorised?) of a prediction, reading neither X nor the
    factors."""
    try:
        with _open(path) as f:
            factorised = "X" not in f and keys.OBSM_HIDDEN in f.get("obsm", {})
            return _index(f, "var"), len(_index(f, "obs")), factorised
    except KeyError as exc:
        raise InputError(f"not a prediction file (no {exc})", path) from None


def gene_columns(names: pd.Index, genes: Sequence[str] | None, path: Path) -> np.ndarray:
    """Columns of ``genes`` among a prediction's gene ``names`` (all when None); InputError
    naming the first gene the prediction does not have."""
    if genes is None:
        return np.arange(len(names))
    genes = [str(g) for g in genes]
    cols = names.get_indexer(genes)
    if (cols < 0).any():
        raise InputError(f"gene '{genes[int(np.argmax(cols < 0))]}' is not in the prediction", path)
    return cols


def read_prediction(path: str | Path, genes: Sequence[str] | None = None) -> ad.AnnData:
    """A prediction as an AnnData with dense X (N, len(genes)) float32 log1p(counts), for the
    ``genes`` given (all by default): a factorised file is multiplied out for those genes only,
    and its factors are left out of the result. Raises ``InputError`` naming the file."""
    path = Path(path)
    pred = read_h5ad(path)
    if pred.n_obs == 0 or pred.n_vars == 0:
        raise InputError("prediction has no spots or no genes", path)
    if pred.var_names.has_duplicates:
        raise InputError(f"duplicate gene '{pred.var_names[pred.var_names.duplicated()][0]}'", path)
    cols = gene_columns(pred.var_names, genes, path)
    if pred.X is None:
        if keys.OBSM_HIDDEN not in pred.obsm:
            raise InputError("prediction has neither X nor a factorised hidden layer", path)
        X = _multiply_out(
            pred.obsm[keys.OBSM_HIDDEN],
            pred.varm[keys.VARM_HEAD][cols],
            pred.var[keys.VAR_HEAD_BIAS].to_numpy()[cols],
        )
        del pred.obsm[keys.OBSM_HIDDEN], pred.varm[keys.VARM_HEAD]
        pred.var = pred.var.drop(columns=[keys.VAR_HEAD_BIAS])
        out = pred[:, cols].copy() if genes is not None else pred
        out.X = X
        return out
    return pred[:, cols].copy() if genes is not None else pred


def read_genes(path: str | Path, genes: Sequence[str]) -> np.ndarray:
    """(N, len(genes)) float32 predicted log1p(counts) of the named genes for every spot, reading
    only what they need (for a factorised file: the hidden layer and those rows of the head)."""
    with _open(path) as f:
        names = _index(f, "var")
        cols = gene_columns(names, genes, Path(path))
        order = np.argsort(cols)  # h5py reads increasing indices
        if "X" in f:
            X = f["X"]
            if not isinstance(X, h5py.Dataset):
                raise InputError("prediction X is not a dense array", path)
            block = X[:, cols[order]]
        else:
            hidden = _factor(f, "obsm", keys.OBSM_HIDDEN, path)[()]
            head = _factor(f, "varm", keys.VARM_HEAD, path)[cols[order]]
            bias = _factor(f, "var", keys.VAR_HEAD_BIAS, path)[cols[order]]
            block = _multiply_out(hidden, head, bias)
    out = np.empty_like(block, dtype=np.float32)
    out[:, order] = block
    return out


def read_pathways(path: str | Path, genesets: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """(N, S) pathway scores (mean z-scored prediction of each set's genes; ``pathways``) for any
    gene sets: in closed form from the factors of a factorised file, from X (as written, >= 0)
    otherwise. Reads only the factors, or the columns of X the sets use. Sets with no gene of
    the panel are left out."""
    with _open(path) as f:
        genes, spots = _index(f, "var"), _index(f, "obs")
        M = membership(genes, genesets)
        keep = np.flatnonzero(M.any(axis=0))
        names, M = [list(genesets)[j] for j in keep], M[:, keep]
        if "X" in f:
            used = np.flatnonzero(M.any(axis=1))  # increasing, as h5py reads
            scores = zscore_columns(f["X"][:, used]) @ M[used] / M.sum(axis=0)
        else:
            hidden, head, bias = (
                torch.from_numpy(np.asarray(_factor(f, g, n, path)[()], dtype=np.float32))
                for g, n in FACTOR_SLOTS
            )
            scores = linear_head_scores(hidden, head, bias, M)
    return pd.DataFrame(scores.astype(np.float32), index=spots, columns=names)


def _multiply_out(hidden: np.ndarray, head: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """max(hidden @ head.T + bias, 0): (N, H), (k, H), (k,) -> (N, k) float32 (torch: threaded)."""
    h = torch.from_numpy(np.ascontiguousarray(hidden)).float()
    w = torch.from_numpy(np.ascontiguousarray(head)).float()
    b = torch.from_numpy(np.ascontiguousarray(bias)).float()
    return torch.addmm(b, h, w.T).clamp_(min=0).numpy()


def _index(f: h5py.File, group: str) -> pd.Index:
    """obs or var names alone, without the columns (600,000 spots x 137 pathway scores)."""
    g = f[group]
    return pd.Index(ad.io.read_elem(g[g.attrs["_index"]]), dtype=str)


def _factor(f: h5py.File, group: str, name: str, path) -> h5py.Dataset:
    if group not in f or name not in f[group]:
        raise InputError(f"prediction has no X and no {group}['{name}']", path)
    return f[group][name]


def _open(path: str | Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read as h5ad ({exc})", path) from exc
