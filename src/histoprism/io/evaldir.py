"""EVAL and benchmark folders on disk: the one reader of what ``evaluate`` and ``benchmark`` write.

Data path: EVAL/ (docs/formats.md, "EVAL: evaluation") -> ``load_eval`` -> ``EvalResult``
(metrics.json as a dict, per_slide / per_pathway / per_gene.csv as DataFrames);
EVAL/spatial_maps.h5 <-> ``save_examples`` / ``load_examples`` <-> ``SpatialExample``s;
a benchmark folder (docs/formats.md, "Benchmark directory") -> ``load_benchmark`` ->
``BenchmarkTables``. ``compare`` reads the tables, ``plotting.report`` draws them; both sit above
this module, so neither holds a reader of its own. Every unreadable file is a one-line
``InputError`` naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path

# gene, gene-set and sample names are text: no "NA"/"nan" guessing, only empty cells are missing
# (``evaluate`` writes NaN as an empty cell)
_CSV_NA = dict(keep_default_na=False, na_values=[""])
BENCH_EVAL = "eval"  # bench_dir/eval/<model>/ = that model's EVAL directory

__all__ = [
    "BenchmarkTables",
    "EvalResult",
    "PathwayMaps",
    "SpatialExample",
    "load_benchmark",
    "load_eval",
    "load_examples",
    "read_table",
    "save_examples",
]


# --- tables --------------------------------------------------------------------------------------
def read_table(folder: str | Path, name: str, **kwargs) -> pd.DataFrame:
    """``folder/name`` as a DataFrame (only empty cells are missing values; ``kwargs`` go to
    ``pandas.read_csv``). A missing file or one pandas cannot parse is a one-line
    ``InputError`` on ``folder`` naming ``name``."""
    folder = Path(folder)
    if not (folder / name).is_file():
        raise InputError(f"{name} not found", folder)
    try:
        return pd.read_csv(folder / name, **_CSV_NA, **kwargs)
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError, no sample_id column ...
        problem = " ".join(str(exc).split())  # pandas messages may span lines; ours is one
        raise InputError(f"{name} is not a readable table ({problem})", folder) from exc


def _read_json(folder: Path, name: str) -> dict:
    """``folder/name`` as a JSON object; else a one-line ``InputError`` on ``folder``."""
    if not (folder / name).is_file():
        raise InputError(f"{name} not found", folder)
    try:
        obj = json.loads((folder / name).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{name} is not valid JSON ({exc})", folder) from exc
    if not isinstance(obj, dict):
        raise InputError(f"{name} is not a JSON object", folder)
    return obj


# --- EVAL directory ------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """One model's evaluation, as read back from its EVAL directory.

    metrics: content of metrics.json (``headline``, ``per_cancer``, ...; NaN stored as None).
    per_slide: (n_slides, k) indexed by sample_id: oncotree_code, hvg, all_genes, gpc_<collection>.
    per_pathway: (n_sets_total, 5) collection, gene_set, n_genes_in_panel, s_micro, s_macro.
    per_gene: (n_genes, k) gene, mean_r, pooled_r, ...; None unless asked for (``load_eval``).
    """

    name: str
    metrics: dict
    per_slide: pd.DataFrame
    per_pathway: pd.DataFrame
    per_gene: pd.DataFrame | None = None

    def set_scores(self, collection: str, column: str = "s_micro") -> pd.Series:
        """(n_sets,) ``column`` of one collection's gene sets, indexed by gene_set."""
        pp = self.per_pathway
        table = pp[pp["collection"] == collection] if "collection" in pp else pp.iloc[:0]
        if table.empty:
            return pd.Series(dtype=np.float64, name=column)
        return table.set_index("gene_set")[column].astype(np.float64)


def load_eval(name: str, eval_dir: str | Path, *, per_gene: bool = False) -> EvalResult:
    """Read metrics.json, per_slide.csv and per_pathway.csv (and per_gene.csv when ``per_gene``)
    of ``eval_dir`` as model ``name``.

    Raises a one-line ``InputError`` on ``eval_dir`` when it is missing, when a file is missing
    (the message names them) or when a file does not parse (the message names it).
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise InputError("evaluation directory not found", eval_dir)
    files = [keys.EVAL_METRICS, keys.EVAL_PER_SLIDE, keys.EVAL_PER_PATHWAY]
    files += [keys.EVAL_PER_GENE] if per_gene else []
    missing = [f for f in files if not (eval_dir / f).is_file()]
    if missing:
        raise InputError(
            f"not an evaluation directory: {', '.join(missing)} missing (run evaluate first)",
            eval_dir,
        )
    metrics = _read_json(eval_dir, keys.EVAL_METRICS)
    per_slide = read_table(
        eval_dir,
        keys.EVAL_PER_SLIDE,
        index_col=keys.SPLIT_ID,
        dtype={keys.SPLIT_ID: str, keys.META_CANCER: str},
    )
    per_pathway = read_table(
        eval_dir, keys.EVAL_PER_PATHWAY, dtype={"collection": str, "gene_set": str}
    )
    genes = read_table(eval_dir, keys.EVAL_PER_GENE, dtype={"gene": str}) if per_gene else None
    return EvalResult(name, metrics, per_slide, per_pathway, genes)


# --- spatial maps file: EVAL/spatial_maps.h5 -----------------------------------------------------
MAPS_FORMAT = "histoprism spatial maps"  # root attribute ``format``
MAPS_VERSION = 1  # root attribute ``version``
_MAP_ARRAYS = ("measured", "predicted")


@dataclass
class PathwayMaps:
    """Measured vs predicted pathway scores of a few gene sets on one slide.

    Score of a set at a spot: mean over the set's genes (measured and predicted) of the z-scored
    log1p expression, z per gene across the slide's spots (a constant gene contributes 0).
    measured, predicted: (N, P) float64 scores, column p = ``names[p]``, rows = the spots of the
    ``SpatialExample``.  r: (P,) Pearson r(measured, predicted) on the slide.  n_genes: (P,) int
    genes of each set that entered the score.  collection: where the sets come from ("hallmark").
    """

    collection: str
    names: list[str]
    measured: np.ndarray
    predicted: np.ndarray
    r: np.ndarray
    n_genes: np.ndarray


@dataclass
class SpatialExample:
    """Measured vs predicted expression of a few genes on one slide, for spatial maps.

    coords: (N, 2) float64 spot centres, level-0 pixels (x, y).  measured, predicted: (N, K)
    float64 log1p(counts), column k = ``genes[k]``.  r: (K,) Pearson r of each gene on the slide.
    gene_source: how the genes were chosen ("HVG": best-predicted of the HVG list).
    pathways: pathway scores on the same spots, or None.
    image: (h, w, 3) uint8 slide image under the spots (``spatial.tissue_crop``), or None;
    image_extent: (4,) float64 ``(x0, x1, y0, y1)``, level-0 px of its outer pixel edges (x0 left,
    y0 top), set with ``image``.
    """

    sample_id: str
    cancer: str
    coords: np.ndarray
    genes: list[str]
    measured: np.ndarray
    predicted: np.ndarray
    r: np.ndarray
    gene_source: str = "HVG"
    pathways: PathwayMaps | None = None
    image: np.ndarray | None = None
    image_extent: np.ndarray | None = None


def save_examples(path: str | Path, examples: Sequence[SpatialExample]) -> Path:
    """Write the spatial examples to an HDF5 file (atomically; layout: docs/formats.md, "EVAL:
    evaluation"), so that ``histoprism report`` draws the maps again; return ``path``.

    Group ``examples/{k}`` per example, k = 0, 1, ... in report order; arrays as stored in the
    ``SpatialExample`` (float64, uint8 image), names as UTF-8 strings. No pickle.
    """
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"], f.attrs["version"] = MAPS_FORMAT, MAPS_VERSION
        root = f.create_group("examples")
        root.attrs["n_examples"] = len(examples)
        for k, ex in enumerate(examples):
            g = root.create_group(str(k))
            for name in ("sample_id", "cancer", "gene_source"):
                g.attrs[name] = str(getattr(ex, name))
            _put_strings(g, "genes", ex.genes)
            g["coords"] = np.asarray(ex.coords, dtype=np.float64)
            for name in (*_MAP_ARRAYS, "r"):
                g[name] = np.asarray(getattr(ex, name), dtype=np.float64)
            if ex.image is not None:
                g.create_dataset("image", data=np.asarray(ex.image, np.uint8), compression="gzip")
                g["image_extent"] = np.asarray(ex.image_extent, dtype=np.float64)
            if ex.pathways is not None:
                pw, h = ex.pathways, g.create_group("pathways")
                h.attrs["collection"] = str(pw.collection)
                _put_strings(h, "names", pw.names)
                for name in (*_MAP_ARRAYS, "r"):
                    h[name] = np.asarray(getattr(pw, name), dtype=np.float64)
                h["n_genes"] = np.asarray(pw.n_genes, dtype=np.int64)
    return path


def _put_strings(group: h5py.Group, name: str, values: Sequence[str]) -> None:
    group.create_dataset(name, data=[str(v) for v in values], dtype=h5py.string_dtype())


def load_examples(path: str | Path) -> list[SpatialExample]:
    """The spatial examples ``save_examples`` wrote, in order; ``InputError`` naming ``path``
    when it is missing, not such a file, or inconsistent (array shapes that do not agree)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("spatial maps file not found", path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != MAPS_FORMAT:
                raise InputError(f"not a spatial maps file (no format '{MAPS_FORMAT}')", path)
            root = f["examples"]
            n = int(root.attrs["n_examples"])
            return [_read_example(root[str(k)], path) for k in range(n)]
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"not a readable spatial maps file ({problem})", path) from exc


def _strings(ds) -> list[str]:
    return [str(v) for v in ds.asstr()[()]]


def _read_example(g: h5py.Group, path: Path) -> SpatialExample:
    coords = g["coords"][()]
    n = coords.shape[0] if coords.ndim == 2 and coords.shape[1] == 2 else -1
    pathways = None
    if "pathways" in g:
        h = g["pathways"]
        pathways = PathwayMaps(
            collection=str(h.attrs["collection"]),
            names=_strings(h["names"]),
            measured=h["measured"][()],
            predicted=h["predicted"][()],
            r=h["r"][()],
            n_genes=h["n_genes"][()],
        )
        _check_maps(pathways.names, pathways, n, f"{g.name}/pathways", path)
        if np.shape(pathways.n_genes) != (len(pathways.names),):
            raise InputError(f"{g.name}/pathways: n_genes does not match the names", path)
    ex = SpatialExample(
        sample_id=str(g.attrs["sample_id"]),
        cancer=str(g.attrs["cancer"]),
        coords=coords,
        genes=_strings(g["genes"]),
        measured=g["measured"][()],
        predicted=g["predicted"][()],
        r=g["r"][()],
        gene_source=str(g.attrs["gene_source"]),
        pathways=pathways,
        image=g["image"][()] if "image" in g else None,
        image_extent=g["image_extent"][()] if "image" in g else None,
    )
    _check_maps(ex.genes, ex, n, g.name, path)
    if ex.image is not None and (
        ex.image.ndim != 3 or ex.image.shape[2] != 3 or np.shape(ex.image_extent) != (4,)
    ):
        raise InputError(f"{g.name}: image is not (h, w, 3) with a 4-value extent", path)
    return ex


def _check_maps(names: Sequence[str], maps, n: int, where: str, path: Path) -> None:
    """measured / predicted (n, len(names)) and r (len(names),), n spots >= 0."""
    k = len(names)
    shapes = [np.shape(getattr(maps, a)) for a in _MAP_ARRAYS]
    if n < 0 or any(s != (n, k) for s in shapes) or np.shape(maps.r) != (k,):
        raise InputError(f"{where}: arrays of {k} maps over {n} spots do not agree", path)


# --- benchmark directory -------------------------------------------------------------------------
@dataclass
class BenchmarkTables:
    """What a benchmark folder's report is drawn from.

    table: comparison.csv, one row per model (``model`` column), headline metrics as columns.
    per_cancer: long frame (model, oncotree_code, hvg, gpc_<collection>, ...) of comparison.json.
    per_pathway: model -> its eval/<model>/per_pathway.csv (models without one left out).
    tests: comparison.json ``tests`` as a frame, or None.  reference: comparison.json's, or None.
    """

    table: pd.DataFrame
    per_cancer: pd.DataFrame
    per_pathway: dict[str, pd.DataFrame]
    tests: pd.DataFrame | None
    reference: str | None


def _long_per_cancer(obj) -> pd.DataFrame:
    """comparison.json's per_cancer as a long frame: records, columns, or {model: {code: row}}."""
    if not obj:
        return pd.DataFrame(columns=["model", keys.META_CANCER])
    if isinstance(obj, dict) and "model" not in obj:
        obj = [
            {"model": m, keys.META_CANCER: c, **row}
            for m, by_cancer in obj.items()
            for c, row in by_cancer.items()
        ]
    return pd.DataFrame(obj)


def load_benchmark(bench_dir: str | Path) -> BenchmarkTables:
    """Read comparison.json, comparison.csv and eval/<model>/per_pathway.csv of ``bench_dir``;
    the models are those of comparison.csv, in its order. A missing or unreadable
    comparison file is a one-line ``InputError`` naming it."""
    bench_dir = Path(bench_dir)
    info = _read_json(bench_dir, keys.COMPARE_JSON)
    table = read_table(bench_dir, keys.COMPARE_TABLE)
    by_model = table.set_index("model") if "model" in table.columns else table
    per_pathway = {}
    for m in (str(m) for m in by_model.index):
        folder = bench_dir / BENCH_EVAL / m
        if (folder / keys.EVAL_PER_PATHWAY).exists():
            per_pathway[m] = read_table(
                folder, keys.EVAL_PER_PATHWAY, dtype={"collection": str, "gene_set": str}
            )
    return BenchmarkTables(
        table=table,
        per_cancer=_long_per_cancer(info.get("per_cancer")),
        per_pathway=per_pathway,
        tests=pd.DataFrame(info["tests"]) if info.get("tests") else None,
        reference=info.get("reference"),
    )
