"""EVAL/ -> report.html: one self-contained page (inline CSS, figures as base64 PNG, no URL).

Plot functions take the EVAL tables (or a ``SpatialExample``) and an optional ``ax=``, return the
figure and never show it. They use matplotlib's object API (``Figure`` on an Agg canvas), so no
pyplot state and no GUI backend are involved: safe in scripts, threads and headless machines.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path, write_text_atomic
from ..io.evaldir import load_eval

R_LABEL = "Pearson r"
SCORE_COLUMNS = ("hvg", "all_genes")  # per-cancer bars, followed by every gpc_<collection>

__all__ = [
    "PathwayMaps",
    "SpatialExample",
    "load_examples",
    "plot_gene_r_hist",
    "plot_model_bars",
    "plot_models_per_cancer",
    "plot_pathway_maps",
    "plot_pathway_scatter",
    "plot_pathways",
    "plot_per_cancer",
    "plot_spatial_example",
    "ranked_sets",
    "regenerate",
    "save_examples",
    "write_benchmark_report",
    "write_report",
]


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
    image: (h, w, 3) uint8 slide image under the spots (``spatial_view.tissue_crop``), or None;
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


# --- spatial maps file: EVAL/spatial_maps.h5 ----------------------------------------------------
MAPS_FORMAT = "histoprism spatial maps"  # root attribute ``format``
MAPS_VERSION = 1  # root attribute ``version``
_MAP_ARRAYS = ("measured", "predicted")


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


# --- plots ---------------------------------------------------------------------------------------
def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a new Agg-backed figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_per_cancer(per_cancer: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Grouped bars of the scores of each cancer type.

    per_cancer: one row per cancer code (index), columns ``n_slides``, ``hvg``, ``all_genes`` and
    ``gpc_<collection>`` (mean Pearson r). NaN scores leave a gap.
    """
    cols = [c for c in per_cancer.columns if c in SCORE_COLUMNS or c.startswith("gpc_")]
    width_in = min(16.0, max(6.0, 2.5 + 0.45 * len(per_cancer) * len(cols)))  # 29 types fit
    fig, ax = _axes(ax, (width_in, 3.8))
    x = np.arange(len(per_cancer))
    width = 0.8 / max(1, len(cols))
    for k, col in enumerate(cols):
        offset = (k - (len(cols) - 1) / 2) * width
        ax.bar(x + offset, per_cancer[col].to_numpy(dtype=float), width, label=col)
    labels = [
        f"{c}\n(n={n})" for c, n in zip(per_cancer.index, per_cancer["n_slides"], strict=True)
    ]
    ax.set_xticks(x, labels)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("cancer type (test slides)")
    ax.set_ylabel(f"mean {R_LABEL}")
    ax.set_title("Scores per cancer type")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


_SET_PREFIX = r"^(HALLMARK|GOBP|GOCC|GOMF)_"
# gene sets in a collection's ranked chart and table; beyond, the best and worst half each (the
# bundled GO's 87 sets are all drawn)
PLOT_MAX_SETS = 100
SET_LABEL_MAX = 80  # characters of a gene-set tick label before it is shortened in the middle


def _short(name: str, width: int = 48) -> str:
    name = re.sub(_SET_PREFIX, "", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def _set_labels(names: Sequence[str], width: int = SET_LABEL_MAX) -> list[str]:
    """Tick labels of gene sets, each telling its set apart: the name without its collection
    prefix (HALLMARK_, GOBP_, ...) unless two sets would read alike, then names longer than
    ``width`` cut in the middle (head…tail) unless two would read alike."""
    names = [str(n) for n in names]
    stripped = [re.sub(_SET_PREFIX, "", n) for n in names]
    labels = stripped if len(set(stripped)) == len(set(names)) else names
    head = (width - 1) * 2 // 3
    cut = [v if len(v) <= width else f"{v[:head]}…{v[head + 1 - width :]}" for v in labels]
    return cut if len(set(cut)) == len(set(labels)) else labels


def _fit_width(fig: Figure, labels: Sequence[str], *, fontsize: float, plot_in: float) -> None:
    """Widen ``fig`` so that tick labels as wide as the widest of ``labels`` fit beside a
    ``plot_in``-inch plot: constrained layout then gives them the room instead of clipping."""
    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    widest = max(
        (renderer.get_text_width_height_descent(t, font, ismath=False)[0] for t in labels),
        default=0.0,
    )
    label_in = widest / renderer.points_to_pixels(72.0)  # display px -> inches
    fig.set_size_inches(max(fig.get_figwidth(), label_in + plot_in), fig.get_figheight())


def ranked_sets(df: pd.DataFrame, max_sets: int = PLOT_MAX_SETS) -> tuple[pd.DataFrame, int]:
    """The scored sets of one collection's per_pathway rows, ranked by s_micro (best last), and
    how many of them were left out: beyond ``max_sets``, only the best and the worst half each.

    Why: a chart or table of 20,000 sets is 3,400 inches tall and takes minutes to draw; the
    ends of the ranking are what a reader looks at, and per_pathway.csv holds every set.
    """
    df = df[df["s_micro"].notna()].sort_values("s_micro", ascending=True, kind="stable")
    if len(df) <= max_sets:
        return df, 0
    worst, best = max_sets // 2, max_sets - max_sets // 2
    return pd.concat([df.head(worst), df.tail(best)]), len(df) - max_sets


def _shown_note(shown: pd.DataFrame, hidden: int) -> str:
    """'the 50 best and 50 worst of 20,000 scored sets' ('' when none is hidden)."""
    if not hidden:
        return ""
    total = len(shown) + hidden
    best = len(shown) - len(shown) // 2
    return f"the {best} best and {len(shown) // 2} worst of {total:,} scored sets"


def plot_pathways(
    per_pathway: pd.DataFrame,
    *,
    collection: str,
    ax: Axes | None = None,
    max_sets: int = PLOT_MAX_SETS,
) -> Figure:
    """Ranked GPC s_m of one collection's gene sets: bars = micro (mean over slides), dots = macro.

    per_pathway: the per_pathway.csv table (columns collection, gene_set, s_micro, s_macro).
    Beyond ``max_sets`` scored sets only the best and the worst half each are drawn, on either
    side of a gap, and the title says so (``ranked_sets``); the mean in the title is over all.
    """
    df = per_pathway[per_pathway["collection"] == collection]
    unscored = int(df["s_micro"].isna().sum())
    mean = df["s_micro"].mean()
    df, hidden = ranked_sets(df, max_sets)  # best on top
    labels = _set_labels(df["gene_set"])
    own = ax is None
    fig, ax = _axes(ax, (7.5, 1.4 + 0.17 * (len(df) + (1 if hidden else 0))))
    if own:  # full names, however long: the figure grows to hold them (GO names reach 68 chars)
        _fit_width(fig, labels, fontsize=6, plot_in=5.5)
    y = np.arange(len(df), dtype=np.float64)
    if hidden:  # one empty row between the worst and the best: the ranking is cut there
        y[len(df) // 2 :] += 1.0
        ax.axhline(len(df) // 2, color="grey", linewidth=0.8, linestyle="--")
    ax.barh(y, df["s_micro"].to_numpy(dtype=float), color="#4c72b0", label="micro (slides)")
    ax.plot(df["s_macro"].to_numpy(dtype=float), y, "o", ms=3, color="black", label="macro (types)")
    ax.set_yticks(y, labels, fontsize=6)
    ax.set_ylim(-0.7, y[-1] + 0.7 if len(y) else -0.3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"s_m: mean {R_LABEL} of the set's genes")
    title = f"Gene Pathway Coherence, {collection} (mean s_m {mean:.3f})"
    if hidden:
        title += f"\n{_shown_note(df, hidden)} shown"
    if unscored:
        title += f"\n{unscored} sets without a scored gene not shown"
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return fig


def plot_gene_r_hist(per_gene: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Histogram of per-gene r: mean over slides and pooled over spots (per_gene.csv columns)."""
    fig, ax = _axes(ax, (6.0, 3.5))
    bins = np.linspace(-1.0, 1.0, 41)
    for col, what in (("mean_r", "mean over slides"), ("pooled_r", "pooled spots")):
        v = per_gene[col].dropna().to_numpy(dtype=float)
        if len(v):
            label = f"{what} ({len(v)} genes, median {np.median(v):.3f})"
            ax.hist(v, bins=bins, alpha=0.6, label=label)
    ax.set_xlabel(R_LABEL)
    ax.set_ylabel("genes")
    ax.set_title(f"Per-gene {R_LABEL}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)
    else:  # no gene could be scored: say so on the figure, not with an empty legend
        ax.text(0.5, 0.5, "no gene scored", ha="center", va="center", transform=ax.transAxes)
    return fig


def _map_grid(n_rows: int, axes: np.ndarray | None) -> tuple[Figure, np.ndarray]:
    """(n_rows, 2) axes: the given ones, or a new Agg-backed figure."""
    if axes is None:
        fig = Figure(figsize=(7.0, 3.0 * n_rows + 0.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(n_rows, 2, squeeze=False)
    axes = np.asarray(axes).reshape(n_rows, 2)
    return axes[0, 0].figure, axes


def _draw_map_pairs(
    axes: np.ndarray,
    coords: np.ndarray,
    names: Sequence[str],
    measured: np.ndarray,
    predicted: np.ndarray,
    r: np.ndarray,
    *,
    unit: str,
    image: np.ndarray | None = None,
    extent: np.ndarray | None = None,
) -> None:
    """Row j of ``axes`` (K, 2): measured | predicted column j of (N, K) values at (N, 2) coords.

    The scale of a row spans the 1st-99th percentile of both maps together, so a flat prediction
    looks flat. ``image`` (h, w, 3) with ``extent`` (x0, x1, y0, y1), level-0 px: the tissue,
    drawn under the spots; the view is then the image's extent.
    """
    fig = axes[0, 0].figure
    x, y = coords[:, 0], coords[:, 1]
    size = float(np.clip(6000.0 / max(1, len(x)), 1.0, 30.0))
    if image is not None and extent is None:
        raise ValueError("an image under the maps needs its extent")
    for j, name in enumerate(names):
        both = np.concatenate([measured[:, j], predicted[:, j]])
        vmin, vmax = np.nanpercentile(both, [1, 99]) if np.isfinite(both).any() else (0.0, 1.0)
        vmax = max(vmax, vmin + 1e-6)
        for col, (values, what) in enumerate(
            ((measured[:, j], "measured"), (predicted[:, j], f"predicted, r = {r[j]:.2f}"))
        ):
            ax = axes[j, col]
            if image is not None:
                draw_tissue(ax, image, extent, coords)
            sc = ax.scatter(x, y, c=values, s=size, cmap="viridis", vmin=vmin, vmax=vmax, lw=0)
            ax.set_aspect("equal")
            if image is None:
                ax.invert_yaxis()  # image orientation: y grows downwards
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{_short(name, 36)}\n({what})", fontsize=9)
        fig.colorbar(sc, ax=list(axes[j]), label=unit, shrink=0.85)


def draw_tissue(ax: Axes, image: np.ndarray, extent: np.ndarray, coords: np.ndarray) -> None:
    """The slide image under the spots: pixel (0, 0) at level-0 (x0, y0), y growing downwards.

    The view spans the image and every spot (a spot off the image's edge stays in view).
    """
    x0, x1, y0, y1 = (float(v) for v in extent)
    # extent's (bottom, top) = (y1, y0) puts row 0 at y0
    ax.imshow(image, extent=(x0, x1, y1, y0), origin="upper", interpolation="bilinear", zorder=0)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    ax.set_xlim(min(x0, lo[0]), max(x1, hi[0]))
    ax.set_ylim(max(y1, hi[1]), min(y0, lo[1]))  # inverted: y grows downwards


def plot_spatial_example(ex: SpatialExample, *, axes: np.ndarray | None = None) -> Figure:
    """Spatial maps, one row per gene: measured | predicted on the same colour scale.

    axes: optional (K, 2) array of axes. The scale of a row spans the 1st-99th percentile of
    both maps together, so a flat prediction looks flat. With ``ex.image``, the tissue is drawn
    under the spots.
    """
    fig, axes = _map_grid(len(ex.genes), axes)
    _draw_map_pairs(
        axes,
        ex.coords,
        ex.genes,
        ex.measured,
        ex.predicted,
        ex.r,
        unit="log1p(counts)",
        image=ex.image,
        extent=ex.image_extent,
    )
    fig.suptitle(f"{ex.sample_id} ({ex.cancer}): best-predicted {ex.gene_source} genes")
    return fig


def plot_pathway_maps(ex: SpatialExample, *, axes: np.ndarray | None = None) -> Figure:
    """Spatial maps of pathway scores, one row per gene set: measured | predicted, same scale.

    ex: an example with ``pathways`` (ValueError otherwise). axes: optional (P, 2) array of axes.
    """
    pw = ex.pathways
    if pw is None or not pw.names:
        raise ValueError(f"{ex.sample_id}: the example has no pathway scores")
    fig, axes = _map_grid(len(pw.names), axes)
    unit = "mean z(log1p) of the set's genes"
    _draw_map_pairs(
        axes,
        ex.coords,
        pw.names,
        pw.measured,
        pw.predicted,
        pw.r,
        unit=unit,
        image=ex.image,
        extent=ex.image_extent,
    )
    fig.suptitle(f"{ex.sample_id} ({ex.cancer}): best-predicted {pw.collection} pathway scores")
    return fig


def plot_pathway_scatter(
    s_a: pd.Series,
    s_b: pd.Series,
    *,
    name_a: str,
    name_b: str,
    collection: str,
    ax: Axes | None = None,
) -> Figure:
    """One point per gene set: s_m (micro) of model A on x, of model B on y, with the diagonal.

    s_a, s_b: s_micro indexed by gene-set name, aligned by name; sets NaN in either are left out.
    The title gives the share of sets where A (below the diagonal) or B (above) is higher.
    """
    a, b = s_a.astype(float).align(s_b.astype(float), join="inner")
    ok = a.notna() & b.notna()
    a, b = a[ok].to_numpy(), b[ok].to_numpy()
    fig, ax = _axes(ax, (4.8, 4.8))
    ax.scatter(a, b, s=12, alpha=0.7, color="#4c72b0", label="gene sets")
    both = np.concatenate([a, b])
    lo, hi = (float(both.min()), float(both.max())) if len(both) else (0.0, 1.0)
    pad = 0.05 * max(hi - lo, 1e-3)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{name_a}: s_m ({R_LABEL})")
    ax.set_ylabel(f"{name_b}: s_m ({R_LABEL})")
    n = max(1, len(a))
    ax.set_title(
        f"GPC {collection}, {len(a)} sets\n{name_a} higher on {np.sum(a > b) / n:.0%} of sets, "
        f"{name_b} on {np.sum(b > a) / n:.0%}",
        fontsize=9,
    )
    return fig


def plot_models_per_cancer(
    per_cancer: pd.DataFrame, *, metric: str = "hvg", ax: Axes | None = None
) -> Figure:
    """Grouped bars of one score per cancer type: x = cancer code, one bar per model.

    per_cancer: long frame with columns ``model``, ``oncotree_code`` and ``metric`` (mean r).
    """
    wide = per_cancer.pivot_table(
        index=keys.META_CANCER, columns="model", values=metric, aggfunc="first", sort=False
    )
    wide = wide.reindex(columns=list(dict.fromkeys(per_cancer["model"])))
    n_bars = len(wide) * len(wide.columns)
    fig, ax = _axes(ax, (min(16.0, max(6.0, 2.5 + 0.3 * n_bars)), 3.8))
    x = np.arange(len(wide))
    width = 0.8 / max(1, len(wide.columns))
    for k, model in enumerate(wide.columns):
        offset = (k - (len(wide.columns) - 1) / 2) * width
        ax.bar(x + offset, wide[model].to_numpy(dtype=float), width, label=str(model))
    ax.set_xticks(x, [str(c) for c in wide.index])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("cancer type (test slides)")
    ax.set_ylabel(f"{metric}: mean {R_LABEL}")
    ax.set_title(f"{metric} per cancer type")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _by_model(table: pd.DataFrame) -> pd.DataFrame:
    """The comparison table indexed by model name (a ``model`` column becomes the index)."""
    return table.set_index("model") if "model" in table.columns else table


def plot_model_bars(
    table: pd.DataFrame,
    *,
    columns: Sequence[str] = ("hvg_micro", "gpc_hallmark_micro", "gpc_go_micro"),
    ax: Axes | None = None,
) -> Figure:
    """The headline comparison: grouped bars (one group per metric, one bar per model), labelled.

    table: one row per model (a ``model`` column or the index); ``columns`` missing from it are
    skipped.
    """
    table = _by_model(table)
    cols = [c for c in columns if c in table.columns]
    fig, ax = _axes(ax, (max(6.0, 1.5 + 0.5 * len(cols) * len(table)), 4.0))
    x = np.arange(len(cols))
    width = 0.8 / max(1, len(table))
    for k, (model, row) in enumerate(table[cols].iterrows()):
        offset = (k - (len(table) - 1) / 2) * width
        bars = ax.bar(x + offset, row.to_numpy(dtype=float), width, label=str(model))
        ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
    ax.set_xticks(x, cols)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.set_xlabel("metric")
    ax.set_ylabel(f"mean {R_LABEL}")
    ax.set_title("Models compared")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# --- HTML ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table.data { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
table.data { display: block; max-width: 100%; overflow-x: auto; }
div.grid { display: flex; flex-wrap: wrap; gap: 0 1em; } div.grid figure { width: 48%; }
table.data th, table.data td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
table.data th { background: #f3f3f3; } table.data td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: .85em; color: #555; }
p.note { color: #555; font-size: .9em; }
"""

_DESCRIBE = {k: d for k, (_, d) in keys.HEADLINE_METRICS.items()} | {
    "n_genes_pooled": "genes measured in every test slide (pooled Pearson)",
}


def _describe(key: str) -> str:
    m = re.fullmatch(r"gpc_(.+)_(micro|macro)", key)
    if m and key not in _DESCRIBE:  # a custom gene-set collection
        over = "slides" if m.group(2) == "micro" else "cancer types"
        return f"GPC {m.group(1)}: mean over gene sets of s_m (mean over {over})"
    return _DESCRIBE.get(key, "")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _table(df: pd.DataFrame, table_id: str, *, index: bool = False) -> str:
    return df.to_html(
        index=index,
        table_id=table_id,
        classes="data",
        border=0,
        na_rep="—",
        float_format=lambda v: f"{v:.3f}",
    )


def _kv_table(rows: dict, table_id: str, *, describe: bool = False) -> str:
    head = "<tr><th>metric</th><th>value</th>" + ("<th>meaning</th>" if describe else "") + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td>"
        + (f"<td>{html.escape(_describe(k))}</td>" if describe else "")
        + "</tr>"
        for k, v in rows.items()
    )
    return f'<table id="{table_id}" class="data">{head}{body}</table>'


def _png(fig: Figure) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _img(fig: Figure, caption: str, *, save: Path | None = None) -> str:
    """An inline <figure> of ``fig``; ``save``: also write the PNG there."""
    png = _png(fig)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_bytes(png)
    data = base64.b64encode(png).decode("ascii")
    cap = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _overview(metrics: dict) -> str:
    info = {
        k: metrics.get(k)
        for k in ("evaluator_version", "split", "n_slides", "n_spots", "n_spots_matched")
    }
    info["HVG lists"] = metrics.get("hvg_source")
    info["no HVG list for"] = ", ".join(metrics.get("hvg_missing") or []) or "—"
    info["gene ids"] = metrics.get("gene_ids")
    model = metrics.get("model") or {}
    info.update(
        {
            f"model: {k}": json.dumps(v) if isinstance(v, dict | list) else v
            for k, v in model.items()
            if k
            not in keys.UNS_SLIDE_FACTS  # facts of one slide (older metrics.json) are not the run's
        }
    )
    return "<h2>Run</h2>" + _kv_table(info, "overview")


def _cancer_section(metrics: dict) -> str:
    per_cancer = pd.DataFrame.from_dict(metrics.get("per_cancer") or {}, orient="index")
    per_cancer = per_cancer.apply(pd.to_numeric, errors="coerce")
    per_cancer.index.name = keys.META_CANCER
    out = "<h2>Per cancer type</h2>" + _table(per_cancer, "per-cancer", index=True)
    if len(per_cancer):
        out += _img(plot_per_cancer(per_cancer), "Mean Pearson r per cancer type (test slides).")
    return out


def _pathway_section(per_pathway: pd.DataFrame) -> str:
    out = ["<h2>Gene Pathway Coherence</h2>"]
    for name, df in per_pathway.groupby("collection", sort=False):
        out.append(f"<h3>{html.escape(str(name))} ({len(df):,} gene sets)</h3>")
        shown, hidden = ranked_sets(df)
        note = _shown_note(shown, hidden)
        caption = f"{name}: s_m per gene set, ranked (bars: micro over slides, dots: macro)."
        if hidden:
            caption += f" Shown: {note}; every set is in {keys.EVAL_PER_PATHWAY}."
        out.append(_img(plot_pathways(per_pathway, collection=str(name)), caption))
        rows = shown.iloc[::-1] if hidden else df  # many sets: the charted ones, best first
        table = _table(rows.drop(columns="collection"), f"per-pathway-{_slug(str(name))}")
        summary = f"table ({note}; all in {keys.EVAL_PER_PATHWAY})" if hidden else "table"
        out.append(f"<details><summary>{html.escape(summary)}</summary>{table}</details>")
    return "".join(out)


def _spatial_section(examples: Sequence[SpatialExample] | None) -> str:
    """The maps of ``examples``; None: the directory holds none (written before they were kept)."""
    out = '<h2 id="spatial-maps">Spatial maps</h2>'
    if examples is None:
        return out + (
            f'<p class="note">No spatial maps: this directory has no {keys.EVAL_SPATIAL_MAPS} '
            "(the maps are drawn by evaluate(); run it again to have them here).</p>"
        )
    if not examples:
        return out + '<p class="note">No spatial maps: no slide had a gene with a finite r.</p>'
    for ex in examples:
        caption = (
            f"{ex.sample_id} ({ex.cancer}): measured log1p(counts) vs prediction, "
            f"same colour scale per gene; best-predicted {ex.gene_source} genes."
        )
        out += _img(plot_spatial_example(ex), caption)
    out += '<h3 id="pathway-maps">Pathway maps</h3>'
    with_sets = [ex for ex in examples if ex.pathways is not None and ex.pathways.names]
    if not with_sets:
        return out + '<p class="note">No pathway scores for these slides.</p>'
    out += (
        '<p class="note">Pathway score of a spot: mean over the set\'s genes (measured and '
        "predicted) of log1p expression z-scored per gene across the slide's spots, computed "
        "alike for the measured counts and the prediction; the sets shown are the slide's best "
        "by r(measured score, predicted score).</p>"
    )
    for ex in with_sets:
        pw = ex.pathways
        sets = ", ".join(f"{n} ({k} genes)" for n, k in zip(pw.names, pw.n_genes, strict=True))
        caption = f"{ex.sample_id} ({ex.cancer}): {pw.collection} pathway scores; {sets}."
        out += _img(plot_pathway_maps(ex), caption)
    return out


def _calibration_section(metrics: dict) -> str:
    """Coverage numbers and the reliability diagram, for predictions with layers['sd']."""
    block = metrics.get("calibration")
    if not block:
        return ""
    from ..evaluation.calibration import plot_reliability  # imports scipy.stats: only when needed

    numbers = {k: v for k, v in block.items() if not isinstance(v, list | dict)}
    caption = "Empirical against nominal coverage of the central intervals (diagonal: calibrated)."
    return (
        '<h2 id="calibration">Calibration</h2>'
        + _kv_table(numbers, "calibration")
        + _img(plot_reliability(block), caption)
    )


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_report(eval_dir: str | Path, *, examples: Sequence[SpatialExample] | None = None) -> Path:
    """Write ``eval_dir/report.html`` from the EVAL tables; return its path.

    Sections: run, headline, per cancer type (table + bars), per slide, GPC per collection
    (ranked plot + table), per-gene r histogram, spatial maps of ``examples`` (measured vs
    predicted genes, then pathway scores where ``ex.pathways`` is set; over the tissue where
    ``ex.image`` is set). ``examples`` None: those of ``eval_dir/spatial_maps.h5`` when there is
    one (``load_examples``; an unreadable one is an ``InputError``), else a note.
    Self-contained: inline CSS, figures as base64 PNG, no external URL.
    """
    eval_dir = Path(eval_dir)
    ev = load_eval(eval_dir.name, eval_dir, per_gene=True)
    if examples is None and (eval_dir / keys.EVAL_SPATIAL_MAPS).exists():
        examples = load_examples(eval_dir / keys.EVAL_SPATIAL_MAPS)
    metrics = ev.metrics
    title = f"histoprism evaluation — {metrics.get('n_slides')} slides"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _overview(metrics),
        "<h2>Headline</h2>" + _kv_table(metrics.get("headline") or {}, "headline", describe=True),
        _cancer_section(metrics),
        "<h2>Per slide</h2>" + _table(ev.per_slide.reset_index(), "per-slide"),
        _pathway_section(ev.per_pathway),
        "<h2>Per gene</h2>"
        + _img(plot_gene_r_hist(ev.per_gene), "Per-gene Pearson r (per_gene.csv)."),
        _calibration_section(metrics),
        _spatial_section(examples),
    ]
    path = eval_dir / keys.EVAL_REPORT
    write_text_atomic(path, _page(title, body))
    return path


# --- benchmark (several models) -----------------------------------------------------------------
BENCH_JSON = "comparison.json"  # keys: models, per_cancer, tests, reference
BENCH_CSV = "comparison.csv"
BENCH_FIGURES = "figures"
BENCH_EVAL = "eval"  # bench_dir/eval/<model>/ = that model's EVAL directory
# per-cancer bar charts (without Hallmark: of the first GPC collection)
BENCH_PER_CANCER = ("hvg", "gpc_hallmark")
BENCH_SCATTER = ("hallmark", "go")  # pathway scatter plots: these first, then other collections


def _fmt_p(v) -> str:
    return "—" if v is None or not np.isfinite(float(v)) else f"{float(v):.2g}"


def _per_cancer_metrics(per_cancer: pd.DataFrame) -> list[str]:
    """The per-cancer bar charts: hvg and GPC Hallmark, or the first GPC collection without it."""
    gpc = [str(c) for c in per_cancer.columns if str(c).startswith("gpc_")]
    hvg, hallmark = BENCH_PER_CANCER
    first = hallmark if hallmark in gpc else next(iter(gpc), None)
    return [hvg] + ([first] if first else [])


def _h2(section_id: str, title: str) -> str:
    return f'<h2 id="{section_id}">{html.escape(title)}</h2>'


def _scatter_section(per_pathway: dict[str, pd.DataFrame], reference: str, figs: Path) -> str:
    out = [_h2("pathway-scatter", f"Gene Pathway Coherence: {reference} vs each model")]
    if reference not in per_pathway:
        return out[0] + f'<p class="note">No per_pathway table for {html.escape(reference)}.</p>'
    s_micro = {
        m: df.set_index(["collection", "gene_set"])["s_micro"] for m, df in per_pathway.items()
    }
    # a user's GMT collections too: an EVAL directory may hold neither hallmark nor go
    present = list(dict.fromkeys(per_pathway[reference]["collection"].astype(str)))
    collections = [c for c in BENCH_SCATTER if c in present]
    collections += [c for c in present if c not in BENCH_SCATTER]
    for collection in collections:
        for model in per_pathway:
            ref, other = s_micro[reference], s_micro[model]
            if model == reference or collection not in ref.index.get_level_values(0):
                continue
            if collection not in other.index.get_level_values(0):
                continue
            fig = plot_pathway_scatter(
                ref.xs(collection),
                other.xs(collection),
                name_a=reference,
                name_b=model,
                collection=collection,
            )
            name = f"scatter-{_slug(collection)}-{_slug(model)}"
            caption = f"GPC {collection}: s_m per gene set, {reference} (x) vs {model} (y)."
            out.append(_img(fig, caption, save=figs / f"{name}.png"))
    return out[0] + f'<div class="grid">{"".join(out[1:])}</div>'


def _links_section(models: Sequence[str], bench_dir: Path) -> str:
    items = []
    for m in models:
        href = f"{BENCH_EVAL}/{m}/{keys.EVAL_REPORT}"
        missing = "" if (bench_dir / href).exists() else " (not found)"
        items.append(f'<li><a href="{html.escape(href)}">{html.escape(m)}</a>{missing}</li>')
    return _h2("model-reports", "Reports per model") + f"<ul>{''.join(items)}</ul>"


def write_benchmark_report(
    bench_dir: str | Path,
    *,
    table: pd.DataFrame,
    per_cancer: pd.DataFrame,
    per_pathway: dict[str, pd.DataFrame],
    tests: pd.DataFrame | None = None,
    reference: str | None = None,
) -> Path:
    """Write ``bench_dir/report.html`` comparing several models; return its path.

    table: one row per model (``model`` column or index), headline metrics as columns.
    per_cancer: long frame (model, oncotree_code, hvg, gpc_hallmark, ...). per_pathway: model ->
    its per_pathway.csv frame (collection, gene_set, s_micro). tests: paired tests (model, metric,
    diff, ci_low, ci_high, wins, losses, p; whatever columns exist). reference: the model the
    others are plotted against (default: the first row of ``table``).
    Sections: comparison, significance, headline bars, per cancer type, pathway scatter, links to
    ``eval/<model>/report.html``. Self-contained (inline CSS, base64 PNG, no URL); each figure is
    also written to ``bench_dir/figures/<name>.png``.
    """
    bench_dir = Path(bench_dir)
    figs = bench_dir / BENCH_FIGURES
    table = _by_model(table)
    models = [str(m) for m in table.index]
    reference = reference or (models[0] if models else "")
    title = f"histoprism benchmark — {len(models)} models"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _h2("comparison", "Comparison") + _table(table, "comparison-table", index=True),
        _h2("significance", f"Paired tests against {reference}"),
    ]
    if tests is not None and len(tests):
        if "p" in tests.columns:  # small p-values would read 0.000 at 3 decimals
            tests = tests.assign(p=[_fmt_p(v) for v in tests["p"]])
        counts = [c for c in ("n", "wins", "losses", "ties") if c in tests.columns]
        tests = tests.astype({c: "Int64" for c in counts})  # counts, not measurements
        body.append(_table(tests, "tests-table"))
    else:
        body.append('<p class="note">No paired tests.</p>')
    body.append(_h2("headline-bars", "Headline metrics"))
    bars = ["hvg_micro"] + [c for c in table.columns if re.fullmatch(r"gpc_.+_micro", str(c))]
    body.append(
        _img(
            plot_model_bars(table, columns=bars),
            "Headline metrics per model.",
            save=figs / "headline.png",
        )
    )
    body.append(_h2("per-cancer", "Per cancer type"))
    for metric in _per_cancer_metrics(per_cancer):
        if metric in per_cancer.columns and len(per_cancer):
            fig = plot_models_per_cancer(per_cancer, metric=metric)
            caption = f"{metric}: mean Pearson r per cancer type and model."
            body.append(_img(fig, caption, save=figs / f"per-cancer-{_slug(metric)}.png"))
    body.append(_scatter_section(per_pathway, reference, figs))
    body.append(_links_section(models, bench_dir))
    path = bench_dir / keys.EVAL_REPORT
    write_text_atomic(path, _page(title, body))
    return path


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    if not path.exists():
        raise InputError("file not found", path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], **kwargs)


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


def _regenerate_benchmark(bench_dir: Path) -> Path:
    info = json.loads((bench_dir / BENCH_JSON).read_text())
    table = _read_csv(bench_dir / BENCH_CSV)
    # the models are named by the comparison table, in its order (comparison.json holds its rows)
    models = [str(m) for m in _by_model(table).index]
    per_pathway = {}
    for m in models:
        p = bench_dir / BENCH_EVAL / m / keys.EVAL_PER_PATHWAY
        if p.exists():
            per_pathway[m] = _read_csv(p, dtype={"collection": str, "gene_set": str})
    tests = pd.DataFrame(info["tests"]) if info.get("tests") else None
    return write_benchmark_report(
        bench_dir,
        table=table,
        per_cancer=_long_per_cancer(info.get("per_cancer")),
        per_pathway=per_pathway,
        tests=tests,
        reference=info.get("reference"),
    )


def regenerate(path: str | Path) -> Path:
    """Rebuild the report of a directory (``histoprism report DIR``); return its path.

    An EVAL directory (metrics.json): ``write_report`` from its tables and the spatial maps kept
    in spatial_maps.h5 (a directory written before it existed: a note instead). A benchmark directory
    (comparison.json): ``write_benchmark_report`` from comparison.csv, comparison.json and
    eval/<model>/per_pathway.csv. Anything else: ``InputError``.
    """
    path = Path(path)
    if (path / keys.EVAL_METRICS).exists():
        return write_report(path)
    if (path / BENCH_JSON).exists():
        return _regenerate_benchmark(path)
    raise InputError(f"neither {keys.EVAL_METRICS} nor {BENCH_JSON} here: not a report dir", path)
