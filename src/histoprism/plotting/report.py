"""EVAL/ -> report.html: one self-contained page (inline CSS, figures as base64 PNG, no URL).

Data path: an EVAL folder -> ``io.evaldir`` (``load_eval``, ``load_examples``; a benchmark
folder: ``load_benchmark``) -> tables -> ``plotting.figures`` (one ``Figure`` each) -> PNG,
base64 -> sections of HTML -> report.html, written atomically. Every table sits in a container
that scrolls sideways, so a wide one (per slide) stays on the page.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .._core import keys
from .._core.errors import InputError
from .._core.files import write_text_atomic
from ..io.evaldir import BENCH_EVAL, SpatialExample, load_benchmark, load_eval, load_examples
from .figures import (
    by_model,
    gene_pcc_hist,
    headline_bars,
    pathway_maps,
    pathway_ranking,
    pathway_scatter,
    per_cancer_bars,
    per_cancer_model_bars,
    ranked_sets,
    reliability_diagram,
    shown_note,
    spatial_maps,
)

__all__ = ["regenerate", "write_benchmark_report", "write_report"]


# --- HTML ----------------------------------------------------------------------------------------
SCROLL_CLASS = "table-scroll"  # the container of every table: scrolls sideways, within the page
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
div.table-scroll { max-width: 100%; overflow-x: auto; margin: .5em 0 1em; }
table.data { border-collapse: collapse; font-size: .85em; }
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


def _scroll(table_html: str) -> str:
    """A table in a container that scrolls sideways: a wide table stays inside the page."""
    return f'<div class="{SCROLL_CLASS}">{table_html}</div>'


def _table(df: pd.DataFrame, table_id: str, *, index: bool = False) -> str:
    table = df.to_html(
        index=index,
        table_id=table_id,
        classes="data",
        border=0,
        na_rep="—",
        float_format=lambda v: f"{v:.3f}",
    )
    return _scroll(table)


def _kv_table(rows: dict, table_id: str, *, describe: bool = False) -> str:
    head = "<tr><th>metric</th><th>value</th>" + ("<th>meaning</th>" if describe else "") + "</tr>"
    body = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td>"
        + (f"<td>{html.escape(_describe(k))}</td>" if describe else "")
        + "</tr>"
        for k, v in rows.items()
    )
    return _scroll(f'<table id="{table_id}" class="data">{head}{body}</table>')


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
        out += _img(per_cancer_bars(per_cancer), "Mean Pearson r per cancer type (test slides).")
    return out


def _pathway_section(per_pathway: pd.DataFrame) -> str:
    out = ["<h2>Gene Pathway Coherence</h2>"]
    for name, df in per_pathway.groupby("collection", sort=False):
        out.append(f"<h3>{html.escape(str(name))} ({len(df):,} gene sets)</h3>")
        shown, hidden = ranked_sets(df)
        note = shown_note(shown, hidden)
        caption = f"{name}: s_m per gene set, ranked (bars: micro over slides, dots: macro)."
        if hidden:
            caption += f" Shown: {note}; every set is in {keys.EVAL_PER_PATHWAY}."
        out.append(_img(pathway_ranking(per_pathway, collection=str(name)), caption))
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
        out += _img(spatial_maps(ex), caption)
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
        out += _img(pathway_maps(ex), caption)
    return out


def _calibration_section(metrics: dict) -> str:
    """Coverage numbers and the reliability diagram, for predictions with layers['sd']."""
    block = metrics.get("calibration")
    if not block:
        return ""
    numbers = {k: v for k, v in block.items() if not isinstance(v, list | dict)}
    caption = "Empirical against nominal coverage of the central intervals (diagonal: calibrated)."
    return (
        '<h2 id="calibration">Calibration</h2>'
        + _kv_table(numbers, "calibration")
        + _img(reliability_diagram(block), caption)
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
        + _img(gene_pcc_hist(ev.per_gene), "Per-gene Pearson r (per_gene.csv)."),
        _calibration_section(metrics),
        _spatial_section(examples),
    ]
    path = eval_dir / keys.EVAL_REPORT
    write_text_atomic(path, _page(title, body))
    return path


# --- benchmark (several models) -----------------------------------------------------------------
BENCH_FIGURES = "figures"
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
            fig = pathway_scatter(
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
    table = by_model(table)
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
            headline_bars(table, columns=bars),
            "Headline metrics per model.",
            save=figs / "headline.png",
        )
    )
    body.append(_h2("per-cancer", "Per cancer type"))
    for metric in _per_cancer_metrics(per_cancer):
        if metric in per_cancer.columns and len(per_cancer):
            fig = per_cancer_model_bars(per_cancer, metric=metric)
            caption = f"{metric}: mean Pearson r per cancer type and model."
            body.append(_img(fig, caption, save=figs / f"per-cancer-{_slug(metric)}.png"))
    body.append(_scatter_section(per_pathway, reference, figs))
    body.append(_links_section(models, bench_dir))
    path = bench_dir / keys.EVAL_REPORT
    write_text_atomic(path, _page(title, body))
    return path


def regenerate(path: str | Path) -> Path:
    """Rebuild the report of a directory (``histoprism report DIR``); return its path.

    An EVAL directory (metrics.json): ``write_report`` from its tables and the spatial maps kept
    in spatial_maps.h5 (a directory written before it existed: a note instead). A benchmark
    directory (comparison.json): ``write_benchmark_report`` from comparison.csv, comparison.json
    and eval/<model>/per_pathway.csv (``load_benchmark``). Anything else: ``InputError``.
    """
    path = Path(path)
    if (path / keys.EVAL_METRICS).exists():
        return write_report(path)
    if (path / keys.COMPARE_JSON).exists():
        bench = load_benchmark(path)
        return write_benchmark_report(
            path,
            table=bench.table,
            per_cancer=bench.per_cancer,
            per_pathway=bench.per_pathway,
            tests=bench.tests,
            reference=bench.reference,
        )
    raise InputError(
        f"neither {keys.EVAL_METRICS} nor {keys.COMPARE_JSON} here: not a report dir", path
    )
