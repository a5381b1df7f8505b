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

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import keys
from .errors import InputError
from .io import write_text_atomic

R_LABEL = "Pearson r"
SCORE_COLUMNS = ("hvg", "all_genes")  # per-cancer bars, followed by every gpc_<collection>

__all__ = [
    "SpatialExample",
    "plot_gene_r_hist",
    "plot_pathways",
    "plot_per_cancer",
    "plot_spatial_example",
    "write_report",
]


@dataclass
class SpatialExample:
    """Measured vs predicted expression of a few genes on one slide, for spatial maps.

    coords: (N, 2) float64 spot centres, level-0 pixels (x, y).  measured, predicted: (N, K)
    float64 log1p(counts), column k = ``genes[k]``.  r: (K,) Pearson r of each gene on the slide.
    gene_source: how the genes were chosen ("HVG": best-predicted of the HVG list).
    """

    sample_id: str
    cancer: str
    coords: np.ndarray
    genes: list[str]
    measured: np.ndarray
    predicted: np.ndarray
    r: np.ndarray
    gene_source: str = "HVG"


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


def _short(name: str, width: int = 48) -> str:
    name = re.sub(r"^(HALLMARK|GOBP|GOCC|GOMF)_", "", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_pathways(per_pathway: pd.DataFrame, *, collection: str, ax: Axes | None = None) -> Figure:
    """Ranked GPC s_m of one collection's gene sets: bars = micro (mean over slides), dots = macro.

    per_pathway: the per_pathway.csv table (columns collection, gene_set, s_micro, s_macro).
    """
    df = per_pathway[per_pathway["collection"] == collection]
    unscored = int(df["s_micro"].isna().sum())
    df = df[df["s_micro"].notna()].sort_values("s_micro", ascending=True)  # best on top
    fig, ax = _axes(ax, (7.5, 1.4 + 0.17 * len(df)))
    y = np.arange(len(df))
    ax.barh(y, df["s_micro"].to_numpy(dtype=float), color="#4c72b0", label="micro (slides)")
    ax.plot(df["s_macro"].to_numpy(dtype=float), y, "o", ms=3, color="black", label="macro (types)")
    ax.set_yticks(y, [_short(n) for n in df["gene_set"]], fontsize=6)
    ax.set_ylim(-0.7, len(df) - 0.3)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"s_m: mean {R_LABEL} of the set's genes")
    title = f"Gene Pathway Coherence, {collection} (mean s_m {df['s_micro'].mean():.3f})"
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
    ax.legend(fontsize=8, frameon=False)
    return fig


def plot_spatial_example(ex: SpatialExample, *, axes: np.ndarray | None = None) -> Figure:
    """Spatial maps, one row per gene: measured | predicted on the same colour scale.

    axes: optional (K, 2) array of axes. The scale of a row spans the 1st-99th percentile of
    both maps together, so a flat prediction looks flat.
    """
    k = len(ex.genes)
    if axes is None:
        fig = Figure(figsize=(7.0, 3.0 * k + 0.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(k, 2, squeeze=False)
    axes = np.asarray(axes).reshape(k, 2)
    fig = axes[0, 0].figure
    x, y = ex.coords[:, 0], ex.coords[:, 1]
    size = float(np.clip(6000.0 / max(1, len(x)), 1.0, 30.0))
    for j, gene in enumerate(ex.genes):
        both = np.concatenate([ex.measured[:, j], ex.predicted[:, j]])
        vmin, vmax = np.nanpercentile(both, [1, 99]) if np.isfinite(both).any() else (0.0, 1.0)
        vmax = max(vmax, vmin + 1e-6)
        for col, (values, what) in enumerate(
            ((ex.measured[:, j], "measured"), (ex.predicted[:, j], f"predicted, r = {ex.r[j]:.2f}"))
        ):
            ax = axes[j, col]
            sc = ax.scatter(x, y, c=values, s=size, cmap="viridis", vmin=vmin, vmax=vmax, lw=0)
            ax.set_aspect("equal")
            ax.invert_yaxis()  # image orientation: y grows downwards
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{gene} ({what})", fontsize=9)
        fig.colorbar(sc, ax=list(axes[j]), label="log1p(counts)", shrink=0.85)
    fig.suptitle(f"{ex.sample_id} ({ex.cancer}): best-predicted {ex.gene_source} genes")
    return fig


# --- HTML ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table.data { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
table.data th, table.data td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
table.data th { background: #f3f3f3; } table.data td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: .85em; color: #555; }
p.note { color: #555; font-size: .9em; }
"""

_DESCRIBE = {
    "hvg_micro": "HVG-50: mean r over the cancer type's 50 HVGs, mean over slides",
    "hvg_macro": "HVG-50, mean over cancer types of the mean over their slides",
    "all_genes_micro": "all measured genes: mean r per slide, mean over slides",
    "all_genes_macro": "all measured genes, mean over cancer types",
    "pooled_pearson": "HEST-bench protocol: r per gene over all test spots pooled, mean over genes",
    "n_genes_pooled": "genes measured in every test slide (pooled Pearson)",
}


def _describe(key: str) -> str:
    m = re.fullmatch(r"gpc_(.+)_(micro|macro)", key)
    if m:
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


def _img(fig: Figure, caption: str) -> str:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    cap = html.escape(caption)
    return f'<figure><img src="data:image/png;base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _read_tables(eval_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """metrics.json, per_slide, per_gene, per_pathway of an EVAL directory."""
    paths = [
        eval_dir / n
        for n in (keys.EVAL_METRICS, keys.EVAL_PER_SLIDE, keys.EVAL_PER_GENE, keys.EVAL_PER_PATHWAY)
    ]
    for p in paths:
        if not p.exists():
            raise InputError("evaluation output not found (run evaluate first)", p)
    # gene and sample names are text: no "NA"/"nan" guessing, only empty cells are missing
    read = dict(keep_default_na=False, na_values=[""])
    per_slide = pd.read_csv(paths[1], dtype={keys.SPLIT_ID: str, keys.META_CANCER: str}, **read)
    per_gene = pd.read_csv(paths[2], dtype={"gene": str}, **read)
    per_pathway = pd.read_csv(paths[3], dtype={"collection": str, "gene_set": str}, **read)
    return json.loads(paths[0].read_text()), per_slide, per_gene, per_pathway


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
        out.append(f"<h3>{html.escape(str(name))} ({len(df)} gene sets)</h3>")
        caption = f"{name}: s_m per gene set, ranked (bars: micro over slides, dots: macro)."
        out.append(_img(plot_pathways(per_pathway, collection=str(name)), caption))
        table = _table(df.drop(columns="collection"), f"per-pathway-{_slug(str(name))}")
        out.append(f"<details><summary>table</summary>{table}</details>")
    return "".join(out)


def _spatial_section(examples: Sequence[SpatialExample]) -> str:
    out = "<h2>Spatial maps</h2>"
    if not examples:
        return out + '<p class="note">No spatial maps (they are drawn by evaluate()).</p>'
    for ex in examples:
        caption = (
            f"{ex.sample_id} ({ex.cancer}): measured log1p(counts) vs prediction, "
            f"same colour scale per gene; best-predicted {ex.gene_source} genes."
        )
        out += _img(plot_spatial_example(ex), caption)
    return out


def write_report(eval_dir: str | Path, *, examples: Sequence[SpatialExample] = ()) -> Path:
    """Write ``eval_dir/report.html`` from the EVAL tables; return its path.

    Sections: run, headline, per cancer type (table + bars), per slide, GPC per collection
    (ranked plot + table), per-gene r histogram, spatial maps of ``examples`` (measured vs
    predicted). Self-contained: inline CSS, figures as base64 PNG, no external URL.
    """
    eval_dir = Path(eval_dir)
    metrics, per_slide, per_gene, per_pathway = _read_tables(eval_dir)
    title = f"histoprism evaluation — {metrics.get('n_slides')} slides"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        _overview(metrics),
        "<h2>Headline</h2>" + _kv_table(metrics.get("headline") or {}, "headline", describe=True),
        _cancer_section(metrics),
        "<h2>Per slide</h2>" + _table(per_slide, "per-slide"),
        _pathway_section(per_pathway),
        "<h2>Per gene</h2>"
        + _img(plot_gene_r_hist(per_gene), "Per-gene Pearson r (per_gene.csv)."),
        _spatial_section(examples),
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    path = eval_dir / keys.EVAL_REPORT
    write_text_atomic(path, page)
    return path
