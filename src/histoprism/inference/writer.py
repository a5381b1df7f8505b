"""The h5ad tile writer: a predictor's (spots x genes) output streamed into an open h5ad file.

Memory is linear in the number of spots N and never holds N x G: the head is computed in
(spots x genes) tiles written straight into a chunked HDF5 dataset.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from .._core.errors import InputError
from ..expression.pathways import zscore_columns
from ..models.registry import Predictor

CHUNK_BYTES = 256 * 2**20  # most float32 output held at once: one block of (spots, genes)
# HistoPrism's head block, and the HDF5 chunk width: a 2048 x 4096 float32 tile (32 MB) runs at
# ~90% of the machine's GEMM speed, where whole-column blocks of a large slide fall to ~50%
# (benchmarks/)
TILE_SPOTS, TILE_GENES = 2048, 4096
OUTPUTS = ("auto", "dense", "factorised")
# auto: above this size of a dense X, write the factors instead (a 600,000-bin Visium HD slide
# is ~47 GB dense in float16 at 38,982 genes, ~0.6 GB factorised)
DENSE_MAX_BYTES = 4 * 2**30
H5_CHUNK_SPOTS = 256  # HDF5 chunk = (256 spots, <= TILE_GENES genes): 4 MB, whole-chunk writes


def output_bytes(payload: int, n: int, n_sets: int, layers: int) -> int:
    """Least bytes of what ``predict_slide`` writes uncompressed: ``payload`` (X and its
    ``layers`` extra layers, or the hidden layer and head) and the (n, n_sets) float32 pathway
    scores (obsm and obs, and their sd with layers). The lower bound ``check_room`` wants."""
    return payload + n * n_sets * 4 * (3 if layers else 2)


def wants_factors(output: str, predictor: Predictor, dense_bytes: int) -> bool:
    """Whether to write the factors rather than X; factors need a linear head."""
    check_output(output)
    linear = predictor.closed_form_pathways
    if output == "factorised" and not linear:
        raise InputError("--output factorised needs a model with a linear head (histoprism)")
    return linear and (
        output == "factorised" or (output == "auto" and dense_bytes > DENSE_MAX_BYTES)
    )


def check_output(output: str) -> None:
    """InputError unless ``output`` is one of ``OUTPUTS``."""
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got '{output}'")


def dense_dataset(group: h5py.Group, name: str, shape, dtype, chunks) -> h5py.Dataset:
    """An (N, G) chunked array in an h5ad file being written, as anndata encodes a dense X."""
    ds = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def write_x(predictor, prepared, f: h5py.File, shape, dtype, M: np.ndarray) -> np.ndarray:
    """X (N, G) into the open file, streamed in blocks -> (N, S) pathway scores."""
    (n, g), closed_form = shape, predictor.closed_form_pathways
    rows, cols = tile_shape(n, g, whole_columns=not closed_form)
    chunks = (min(n, H5_CHUNK_SPOTS), min(cols, TILE_GENES)) if n and g else None
    X = dense_dataset(f, "X", (n, g), dtype, chunks)
    if closed_form:
        _write_tiles(predictor, prepared, X, rows, cols)
        return predictor.pathway_scores(prepared, M)  # (N, S)
    return _write_columns(predictor, prepared, X, cols, M)


def tile_shape(n: int, g: int, *, whole_columns: bool) -> tuple[int, int]:
    """(spots, genes) of one block of the head's output, at most CHUNK_BYTES of float32.

    ``whole_columns``: every spot in each block, as a predictor whose pathway scores need each
    gene's z-score over the slide must have; its width is a whole number of HDF5 chunks if it can.
    """
    if not whole_columns:
        return min(n, TILE_SPOTS), min(g, TILE_GENES)
    cols = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    return n, min(g, cols // TILE_GENES * TILE_GENES or cols)


def _write_tiles(predictor, prepared, X: h5py.Dataset, rows: int, cols: int) -> None:
    """Stream (rows x cols) tiles of the head into X. Reused buffers (float32, and the file's
    dtype if another) spare an allocation, and its page faults, per tile."""
    n, g = X.shape
    size = min(rows, n) * min(cols, g)
    buf = torch.empty(size, device=prepared.device)
    cast = None if X.dtype == np.float32 else torch.empty(size, dtype=torch_dtype(X.dtype))
    for r, c in tiles(n, g, rows, cols):
        shape = (r.stop - r.start, c.stop - c.start)
        out = buf[: shape[0] * shape[1]].view(shape)  # contiguous, edge tiles too
        block = predictor.predict_genes(prepared, c, r, out=out)
        torch.from_numpy(block).clamp_(min=0)  # in place, multithreaded: log1p is >= 0
        if cast is not None:  # multithreaded, unlike numpy's astype
            block = cast[: block.size].view(shape).copy_(torch.from_numpy(block)).numpy()
        X[r, c] = block


def tiles(n: int, g: int, rows: int, cols: int):
    """(spot rows, panel columns) slices of the (n, g) output, ``rows`` x ``cols`` at most, row
    blocks outermost: the order ``predict_slide`` writes them in."""
    for r in range(0, n, rows):
        for c in range(0, g, cols):
            yield slice(r, min(r + rows, n)), slice(c, min(c + cols, g))


def _write_columns(predictor, prepared, X: h5py.Dataset, cols: int, M: np.ndarray) -> np.ndarray:
    """Any predictor: blocks of whole columns (every spot), z-scored per gene and summed per set
    as they stream into X -> (N, S) pathway scores."""
    n, g = X.shape
    sizes = np.maximum(M.sum(0), 1)
    pathways = np.zeros((n, M.shape[1]), dtype=np.float64)
    for c in range(0, g, cols):
        block = predictor.predict_genes(prepared, slice(c, min(c + cols, g)))  # (N, cols)
        X[:, c : c + block.shape[1]] = _cast(np.maximum(block, 0), X.dtype)  # log1p is >= 0
        in_sets = np.flatnonzero(M[c : c + block.shape[1]].any(1))  # only genes of some set
        pathways += zscore_columns(block[:, in_sets]) @ M[c + in_sets]
    return pathways / sizes


def _cast(block: np.ndarray, dtype) -> np.ndarray:
    """float32 -> the file's dtype, multithreaded (torch) rather than numpy's one-core astype."""
    if block.dtype == dtype:
        return block
    return torch.from_numpy(block).to(torch_dtype(dtype)).numpy()


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (float16, float32, ...)."""
    return getattr(torch, np.dtype(dtype).name)
