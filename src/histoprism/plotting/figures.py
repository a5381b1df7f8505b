"""The evaluation's figures (``hp.pl``): EVAL tables in, a matplotlib ``Figure`` out.

Data path: EVAL/ -> ``io.evaldir`` (``load_eval``: metrics.json, per_gene / per_pathway.csv;
``load_examples``: spatial_maps.h5; ``load_benchmark``: a benchmark folder) -> tables
(DataFrames, Series, ``SpatialExample``s) -> one function per figure -> ``Figure``, which
``plotting.report`` embeds in report.html and a user may show or save.

Each function draws onto ``ax=`` when given (the maps take a (rows, 2) array of axes) and returns
its figure; without it, a new figure. They use matplotlib's object API (``Figure`` on an Agg
canvas), so no pyplot state and no GUI backend are involved: safe in scripts, threads and
headless machines. A table lacking a column a figure needs is a one-line ``InputError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from .._core import keys
from .._core.errors import InputError
from ..io.evaldir import SpatialExample

R_LABEL = "Pearson r"
SCORE_COLUMNS = ("hvg", "all_genes")  # per-cancer bars, followed by every gpc_<collection>
_SET_PREFIX = r"^(HALLMARK|GOBP|GOCC|GOMF)_"
# gene sets in a collection's ranked chart and table; beyond, the best and worst half each (the
# bundled GO's 87 sets are all drawn)
PLOT_MAX_SETS = 100
SET_LABEL_MAX = 80  # characters of a gene-set tick label before it is shortened in the middle

__all__ = [
    "gene_pcc_hist",
    "headline_bars",
    "pathway_maps",
    "pathway_ranking",
    "pathway_scatter",
    "per_cancer_bars",
    "per_cancer_model_bars",
    "reliability_diagram",
    "spatial_maps",
]


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """The given axes and its figure, or a new Agg-backed figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _require(table: pd.DataFrame, columns: Iterable[str], figure: str) -> None:
    """A one-line ``InputError`` when ``table`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        have = ", ".join(map(str, table.columns[:12])) + (", ..." if table.shape[1] > 12 else "")
        raise InputError(
            f"{figure}: the table lacks column(s) {', '.join(missing)} (it has: {have or 'none'})"
        )


def by_model(table: pd.DataFrame) -> pd.DataFrame:
    """A comparison table indexed by model name (a ``model`` column becomes the index)."""
    return table.set_index("model") if "model" in table.columns else table


# --- one model: EVAL tables ----------------------------------------------------------------------
def per_cancer_bars(per_cancer: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Grouped bars of the scores of each cancer type.

    per_cancer: one row per cancer code (index), columns ``n_slides``, ``hvg``, ``all_genes`` and
    ``gpc_<collection>`` (mean Pearson r; metrics.json ``per_cancer``). NaN scores leave a gap.
    """
    _require(per_cancer, ["n_slides"], "per_cancer_bars")
    cols = [c for c in per_cancer.columns if c in SCORE_COLUMNS or c.startswith("gpc_")]
    width_in = min(16.0, max(6.0, 2.5 + 0.45 * len(per_cancer) * len(cols)))  # 29 types fit
    fig, ax = _axes(ax, (width_in, 3.8))
    x = np.arange(len(per_cancer))
    width = 0.8 / max(1, len(cols))
    for k, col in enumerate(cols):
        offset = (k - (len(cols) - 1) / 2) * width
        ax.bar(x + offset, per_cancer[col].to_numpy(dtype=float), width, label=col)
    labels = [
        f"{c}\n(n={n:.0f})" for c, n in zip(per_cancer.index, per_cancer["n_slides"], strict=True)
    ]
    ax.set_xticks(x, labels)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("cancer type (test slides)")
    ax.set_ylabel(f"mean {R_LABEL}")
    ax.set_title("Scores per cancer type")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


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


def shown_note(shown: pd.DataFrame, hidden: int) -> str:
    """'the 50 best and 50 worst of 20,000 scored sets' ('' when none is hidden)."""
    if not hidden:
        return ""
    total = len(shown) + hidden
    best = len(shown) - len(shown) // 2
    return f"the {best} best and {len(shown) // 2} worst of {total:,} scored sets"


def pathway_ranking(
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
    _require(per_pathway, ["collection", "gene_set", "s_micro", "s_macro"], "pathway_ranking")
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
        title += f"\n{shown_note(df, hidden)} shown"
    if unscored:
        title += f"\n{unscored} sets without a scored gene not shown"
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return fig


def gene_pcc_hist(per_gene: pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Histogram of per-gene r: mean over slides and pooled over spots (per_gene.csv columns
    ``mean_r`` and ``pooled_r``)."""
    _require(per_gene, ["mean_r", "pooled_r"], "gene_pcc_hist")
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


def reliability_diagram(calibration: Mapping | pd.DataFrame, *, ax: Axes | None = None) -> Figure:
    """Reliability diagram: empirical against nominal coverage of the central intervals, the
    diagonal being perfect calibration. ``calibration``: metrics.json ``calibration`` (or its
    ``reliability`` list), or the rows of calibration.csv (columns ``nominal``, ``coverage``)."""
    if isinstance(calibration, pd.DataFrame):
        table, block = calibration, {}
    else:
        block = calibration if isinstance(calibration, Mapping) else {}
        rows = block.get("reliability", calibration) if block else calibration
        table = pd.DataFrame(list(rows))
    _require(table, ["nominal", "coverage"], "reliability_diagram")
    fig, ax = _axes(ax, (4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    ax.plot(table["nominal"], table["coverage"], "o-", color="C0", label="predictions")
    for level in (0.8, 0.95):
        hit = table.loc[np.isclose(table["nominal"], level), "coverage"]
        if len(hit):
            ax.annotate(
                f"{hit.iloc[0]:.1%}",
                (level, hit.iloc[0]),
                textcoords="offset points",
                xytext=(-30, 6),
                fontsize=8,
            )
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="empirical coverage")
    ax.set_aspect("equal")
    title = "Calibration of the central intervals"
    if "mean_squared_z" in block:
        title += f"\nmean z² {block['mean_squared_z']:.2f}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


# --- spatial maps: EVAL/spatial_maps.h5 ----------------------------------------------------------
def _map_grid(n_rows: int, axes) -> tuple[Figure, np.ndarray]:
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


def spatial_maps(example: SpatialExample, *, ax=None) -> Figure:
    """Spatial maps of a slide's genes, one row per gene: measured | predicted, same colour scale.

    example: one of spatial_maps.h5 (``io.evaldir.load_examples``). ax: optional (K, 2) array of
    axes, K = ``len(example.genes)``. The scale of a row spans the 1st-99th percentile of both
    maps together, so a flat prediction looks flat. With ``example.image``, the tissue is drawn
    under the spots.
    """
    ex = example
    fig, axes = _map_grid(len(ex.genes), ax)
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


def pathway_maps(example: SpatialExample, *, ax=None) -> Figure:
    """Spatial maps of pathway scores, one row per gene set: measured | predicted, same scale.

    example: one with ``pathways`` (a one-line ``ValueError`` otherwise). ax: optional (P, 2)
    array of axes, P = ``len(example.pathways.names)``.
    """
    ex, pw = example, example.pathways
    if pw is None or not pw.names:
        raise ValueError(f"{ex.sample_id}: the example has no pathway scores")
    fig, axes = _map_grid(len(pw.names), ax)
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


# --- several models: benchmark tables ------------------------------------------------------------
def pathway_scatter(
    s_a: pd.Series,
    s_b: pd.Series,
    *,
    name_a: str,
    name_b: str,
    collection: str,
    ax: Axes | None = None,
) -> Figure:
    """One point per gene set: s_m (micro) of model A on x, of model B on y, with the diagonal.

    s_a, s_b: s_micro indexed by gene-set name (``EvalResult.set_scores(collection)``), aligned
    by name; sets NaN in either are left out. The title gives the share of sets where A (below
    the diagonal) or B (above) is higher.
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


def per_cancer_model_bars(
    per_cancer: pd.DataFrame, *, metric: str = "hvg", ax: Axes | None = None
) -> Figure:
    """Grouped bars of one score per cancer type: x = cancer code, one bar per model.

    per_cancer: long frame with columns ``model``, ``oncotree_code`` and ``metric`` (mean r;
    ``compare.per_cancer_table``).
    """
    _require(per_cancer, ["model", keys.META_CANCER, metric], "per_cancer_model_bars")
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


def headline_bars(
    table: pd.DataFrame,
    *,
    columns: Sequence[str] = ("hvg_micro", "gpc_hallmark_micro", "gpc_go_micro"),
    ax: Axes | None = None,
) -> Figure:
    """The headline comparison: grouped bars (one group per metric, one bar per model), labelled.

    table: one row per model (a ``model`` column or the index; comparison.csv); ``columns``
    missing from it are skipped.
    """
    table = by_model(table)
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
