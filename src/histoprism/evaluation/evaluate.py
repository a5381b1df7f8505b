"""Judge predicted expression against measured counts (docs/metrics.md, evaluator 1.0).

Data path: per test slide, spots aligned by barcode and genes by name -> r(i, g), Pearson across
the spots of slide i -> a (slides x genes) matrix R -> HVG-50, GPC and all-genes scores (micro:
mean over slides; macro: mean over cancer types of the mean over their slides). Per-gene
co-moments pooled over slides (Chan's parallel update) give the HEST-bench pooled Pearson without
holding more than one slide in memory. ``evaluate`` writes EVAL/ (metrics.json, per_slide.csv,
per_gene.csv, per_pathway.csv, spatial_maps.h5, report.html).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path, write_text_atomic
from .._core.progress import progress_bar
from ..expression.correlation import (
    MOMENT_COLUMNS,
    comoments,
    dense_block,
    merge_moments,
    pearson_from_moments,
    pearson_per_gene,
    pooled_pearson,
)
from ..expression.genes import (
    GENESET_COLLECTIONS,
    bench_hvg,
    gpc_genesets,
    harmonise_counts,
    looks_like_ensembl,
    read_gene_list,
    read_gmt,
)
from ..expression.pathways import GeneSets, membership_matrix, membership_scores
from ..io.cohort import Cohort, align_by_barcode, file_gene_ids, truth_counts
from ..io.evaldir import PathwayMaps, SpatialExample, save_examples
from ..io.prediction import peek, read_prediction
from ..io.readers import read_st
from ..io.spatial import spatial_library, tissue_crop
from ..plotting.report import write_report
from .calibration import CalibrationTally
from .scores import (
    all_genes_scores,
    geneset_scores,
    gpc_table,
    headline_scores,
    hvg_scores,
    per_cancer_scores,
    per_gene_table,
    slide_gene_correlations,
)

log = logging.getLogger(__name__)

EVALUATOR_VERSION = "1.0"
N_HVG = 50  # genes per cancer type in the HVG score
N_EXAMPLES = 3  # slides shown as spatial maps in the report
N_EXAMPLE_GENES = 3  # best-predicted HVG genes per example slide
N_EXAMPLE_SETS = 2  # best-predicted gene sets per example slide (pathway maps)
EXAMPLE_COLLECTION = "hallmark"  # where the example gene sets come from, if evaluated
MIN_EXAMPLE_SET_GENES = 5  # a set needs this many genes (or the most any set has) to be shown
# a GMT none of whose sets has this many predicted genes is refused (check_panel_overlap): one
# predicted gene already gives a set a score (GPC averages r over the set's scored genes)
MIN_SET_GENES = 1
SLIDE_FACT_COLUMNS = ("cancer_requested", "cancer_used", "pixel_size_um")  # per_slide.csv
_BLOCK = 2**24  # float64 elements per (spots x genes) block: ~128 MB, bounds memory per slide

__all__ = [
    "EVALUATOR_VERSION",
    "SlideScore",
    "check_panel_overlap",
    "evaluate",
    "read_hvg_file",
    "resolve_genesets",
    "resolve_hvg",
    "score_slide",
    "spatial_example",
    "top_variance_genes",
    "train_hvg",
]


# --- one slide ----------------------------------------------------------------------------------
@dataclass
class SlideScore:
    """Scores of one slide.

    r: (G_pred,) Pearson r per predicted gene (index = gene); NaN where not measured or constant.
    moments: co-moments (``MOMENT_COLUMNS`` + ``n_slides``) of the genes measured and predicted,
    for pooling. n_spots: spots of the measured slide; n_spots_matched: of them, in the prediction.
    """

    r: pd.Series
    moments: pd.DataFrame
    n_spots: int
    n_spots_matched: int


def score_slide(pred: ad.AnnData, st: ad.AnnData, *, path: Path | None = None) -> SlideScore:
    """r(i, g) of one slide: ``pred.X`` (log1p, any spot order) vs log1p(``st.X`` raw counts).

    Target = log1p(raw counts), no library-size normalisation. Spots aligned by barcode, genes by
    name; the work goes in blocks of genes so a 38,982-gene panel stays within ~1 GB.
    """
    pred_rows, st_rows = align_by_barcode(pred.obs_names, st.obs_names, path=path)
    genes = pd.Index(pred.var_names.astype(str))
    counts, have = truth_counts(st, genes)  # (N_st, K) raw counts of the genes ``have``
    # matched spots only, column-major: blocks of genes are cheap to cut
    truth = sp.csc_matrix(counts[st_rows])
    all_rows = np.arange(len(st_rows))
    step = max(1, _BLOCK // len(st_rows))
    blocks = []
    for start in range(0, len(have), step):
        k = np.arange(start, min(start + step, len(have)))
        pred_block = dense_block(pred.X, pred_rows, have[k])  # (M, b) log1p
        truth_block = np.log1p(dense_block(truth, all_rows, k))  # (M, b) log1p(raw counts)
        blocks.append(comoments(pred_block, truth_block))
    m = {
        k: np.concatenate([b[k] for b in blocks]) if blocks else np.empty(0) for k in MOMENT_COLUMNS
    }
    moments = pd.DataFrame(m, index=genes[have]).assign(n_slides=1.0)
    r = pd.Series(np.nan, index=genes, name="r")
    r.iloc[have] = pearson_from_moments(m)
    if len(have) == 0:
        log.warning("%s: no predicted gene is measured on this slide", path)
    return SlideScore(r, moments, n_spots=st.n_obs, n_spots_matched=len(st_rows))


def _example_pathways(
    truth: np.ndarray,
    pred: np.ndarray,
    M: sp.csr_matrix,
    names: Sequence[str],
    *,
    collection: str,
    n_sets: int,
) -> PathwayMaps | None:
    """The ``n_sets`` sets with the best r(measured score, predicted score) on the slide.

    truth, pred: (N, G) log1p(counts) and prediction of G genes (measured and predicted); M:
    (S, G) ``membership_matrix`` of the sets ``names`` over them. Candidates: sets with at least
    ``MIN_EXAMPLE_SET_GENES`` genes (or the most any set has). None when no set has a finite r.
    """
    measured, n_genes = membership_scores(truth, M)  # (N, S), (S,)
    predicted, _ = membership_scores(pred, M)
    r = pearson_per_gene(predicted, measured)  # (S,)
    ok = np.isfinite(r) & (n_genes >= min(MIN_EXAMPLE_SET_GENES, max(n_genes.max(initial=0), 1)))
    if not ok.any():
        return None
    best = np.flatnonzero(ok)[np.argsort(-r[ok], kind="stable")][:n_sets]
    return PathwayMaps(
        collection=collection,
        names=[names[i] for i in best],
        measured=measured[:, best],
        predicted=predicted[:, best],
        r=r[best],
        n_genes=n_genes[best],
    )


def spatial_example(
    pred: ad.AnnData,
    st: ad.AnnData,
    r: pd.Series,
    *,
    sample_id: str,
    cancer: str,
    hvg: Sequence[str] | None,
    n_genes: int = N_EXAMPLE_GENES,
    genesets: Mapping[str, Sequence[str]] | None = None,
    collection: str = EXAMPLE_COLLECTION,
    n_sets: int = N_EXAMPLE_SETS,
) -> SpatialExample | None:
    """Measured vs predicted values of the slide's best-predicted HVG genes (all genes without a
    list), for the report's spatial maps; None when no gene has a finite r.

    genesets: the sets of ``collection``; if given, ``pathways`` holds the scores of the
    ``n_sets`` sets best predicted on this slide (see ``pathway_scores``). When the prediction
    carries its slide image (``uns['spatial'][sample_id]``), ``image`` holds the part under the
    spots (``spatial.tissue_crop``).
    """
    pool, source = r.reindex(list(dict.fromkeys(hvg or []))).dropna(), "HVG"
    if pool.empty:
        pool, source = r.dropna(), "all genes"
    if pool.empty:
        return None
    top = pool.sort_values(ascending=False, kind="stable").index[:n_genes]
    pred_rows, st_rows = align_by_barcode(pred.obs_names, st.obs_names)
    pred_genes = pd.Index(pred.var_names.astype(str))
    counts, have = truth_counts(st, pred_genes)  # (N_st, K) raw counts of the genes ``have``
    measured = pd.Index(have).get_indexer(pred_genes.get_indexer(top))  # top genes have an r
    ex = SpatialExample(
        sample_id=sample_id,
        cancer=cancer,
        coords=np.asarray(st.obsm[keys.OBSM_SPATIAL])[st_rows, :2].astype(np.float64),
        genes=[str(g) for g in top],
        measured=np.log1p(dense_block(counts, st_rows, measured)),
        predicted=dense_block(pred.X, pred_rows, pred_genes.get_indexer(top)),
        r=pool[top].to_numpy(dtype=np.float64),
        gene_source=source,
    )
    crop = tissue_crop(spatial_library(pred.uns, sample_id), ex.coords)
    if crop is not None:
        ex.image, ex.image_extent = crop
    if genesets:
        M = membership_matrix(pred_genes[have], genesets)  # (S, K) sets x measured genes
        # only genes in both truth and prediction, and in some set: bounded memory
        k = np.flatnonzero(M.getnnz(axis=0))
        ex.pathways = _example_pathways(
            np.log1p(dense_block(counts, st_rows, k)),
            dense_block(pred.X, pred_rows, have[k]),
            M[:, k],
            list(genesets),
            collection=collection,
            n_sets=n_sets,
        )
    return ex


# --- HVG lists and gene sets --------------------------------------------------------------------
def resolve_hvg(
    hvg: str | Path, cohort: Cohort, cancers: Sequence[str], *, ensembl: bool
) -> dict[str, list[str] | None]:
    """{cancer: HVG list or None} from 'bench' (bundled HEST-bench), 'train' or a file."""
    if str(hvg) == "bench":
        ids = "ensembl" if ensembl else "symbols"
        return {c: bench_hvg(c, ids=ids) for c in cancers}
    if str(hvg) == "train":
        return train_hvg(cohort, cancers, ensembl=ensembl)
    return read_hvg_file(hvg, cancers)


def train_hvg(
    cohort: Cohort, cancers: Sequence[str], *, ensembl: bool = False, n: int = N_HVG
) -> dict[str, list[str] | None]:
    """Top-``n`` genes by variance of log1p counts over all spots of each cancer's training slides
    (genes measured in all of them); None for a cancer type without training slides."""
    train = cohort.ids("train")
    out: dict[str, list[str] | None] = {}
    for cancer in cancers:
        paths = [cohort.st_path(i) for i in train if cohort.cancer(i) == cancer]
        out[cancer] = top_variance_genes(paths, n=n, ensembl=ensembl) if paths else None
    return out


def top_variance_genes(
    paths: Sequence[Path], *, n: int = N_HVG, ensembl: bool = False
) -> list[str]:
    """Top-``n`` genes by variance of log1p(raw counts) over all spots of the slides pooled.

    Only genes measured in every slide count; ties go to the alphabetically first gene. Slides are
    read one at a time and reduced to per-gene sums.
    """
    total: pd.DataFrame | None = None
    for path in paths:
        st = read_st(path)
        space = "ensembl" if ensembl else "symbol"
        x, names, _ = harmonise_counts(st.X, st.var_names, to=space, gene_ids=file_gene_ids(st))
        x = sp.csr_matrix(x, dtype=np.float64)
        x.data = np.log1p(x.data)  # log1p(0) = 0 keeps the matrix sparse
        sums = pd.DataFrame(
            {
                "n": float(st.n_obs),
                "s": np.asarray(x.sum(axis=0)).ravel(),
                "ss": np.asarray(x.multiply(x).sum(axis=0)).ravel(),
            },
            index=pd.Index(names.astype(str)),
        )
        total = sums if total is None else total.add(sums).dropna()  # inner: measured in all
    if total is None or total.empty:
        return []
    var = total["ss"] / total["n"] - (total["s"] / total["n"]) ** 2
    return var.sort_index().sort_values(ascending=False, kind="stable").index[:n].tolist()


def read_hvg_file(path: str | Path, cancers: Sequence[str]) -> dict[str, list[str] | None]:
    """{cancer: genes} from a JSON ``{"genes": [...]}`` or plain one-per-line list (same genes for
    every cancer) or a JSON mapping ``{cancer: [genes] | {"genes": [...]}}``."""
    path = Path(path)
    if not path.is_file():
        raise InputError("HVG list not found (--hvg takes 'train', 'bench' or a file)", path)
    text = path.read_text()
    head = text.lstrip()[:1]
    if path.suffix.lower() == ".json" or (head and head in "{["):
        try:
            lists = _hvg_from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc})", path) from exc
    else:
        lists = read_gene_list(path)
    if isinstance(lists, list):
        return {c: lists for c in cancers}
    return {c: lists.get(c) for c in cancers}


def _hvg_from_json(obj, path: Path) -> list[str] | dict[str, list[str]]:
    def genes(v) -> list[str] | None:
        v = v.get("genes") if isinstance(v, dict) else v
        return [str(g) for g in v] if isinstance(v, list) else None

    if isinstance(obj, list) or (isinstance(obj, dict) and "genes" in obj):
        out = genes(obj)
        if out is not None:
            return out
    elif isinstance(obj, dict) and all(genes(v) is not None for v in obj.values()):
        return {str(c): genes(v) for c, v in obj.items()}
    raise InputError("expected {'genes': [...]}, a list, or {cancer: [genes]}", path)


def resolve_genesets(
    genesets: Sequence[str | Path] | None, *, ensembl: bool, panel: Sequence[str] | None = None
) -> dict[str, GeneSets]:
    """{collection: {set: genes}}: 'gpc' (default) = bundled Hallmark + GO; a GMT path = the
    collection named by the file's stem (``genes.read_gmt``: a malformed file is an
    ``InputError`` naming its line).

    panel: the predicted genes; when given, each GMT is checked against them
    (``check_panel_overlap``). The bundled sets are not: a panel in another vocabulary scores
    them NaN, which the summary shows as n/a.
    """
    ids = "ensembl" if ensembl else "symbols"
    out: dict[str, GeneSets] = {}
    for item in genesets or ["gpc"]:
        if str(item) == "gpc":
            out.update({c: GeneSets(gpc_genesets(c, ids=ids)) for c in GENESET_COLLECTIONS})
            continue
        name = Path(item).name.removesuffix(".gmt") or Path(item).name
        if name in out:
            raise InputError(f"two gene set collections named '{name}'", item)
        sets = GeneSets(read_gmt(item))
        if panel is not None:
            check_panel_overlap(sets, panel, path=Path(item))
        out[name] = sets
    return out


def check_panel_overlap(
    genesets: Mapping[str, Sequence[str]],
    panel: Sequence[str],
    *,
    path: Path | None = None,
    min_genes: int = MIN_SET_GENES,
) -> np.ndarray:
    """Genes of each set among the predicted ``panel``: (S,) int64.

    Sets without any are scored NaN: one warning gives their number. When no set has
    ``min_genes``, nothing of the file can be scored, so it is an ``InputError`` on ``path``
    that says how many of its genes are predicted (and, when it differs, which naming each
    side uses).
    """
    sets = genesets if isinstance(genesets, GeneSets) else GeneSets(genesets)
    M = sets.membership(panel)  # (S, G)
    n_genes = M.getnnz(axis=1)
    if not (n_genes >= min_genes).any():
        overlap = int(np.count_nonzero(M.getnnz(axis=0)))
        what = "a gene" if min_genes == 1 else f"{min_genes} genes"
        problem = (
            f"no gene set has {what} among the {len(panel):,} predicted genes "
            f"({overlap:,} of the file's {len(sets.genes):,} distinct genes are predicted)"
        )
        if looks_like_ensembl(panel) != looks_like_ensembl(sets.genes):
            ids = ("Ensembl ids", "symbols")
            panel_ids, file_ids = ids if looks_like_ensembl(panel) else ids[::-1]
            problem += f"; the predictions name genes by {panel_ids}, the file by {file_ids}"
        raise InputError(problem, path)
    if empty := int(np.count_nonzero(n_genes == 0)):
        log.warning(
            "%s: %d of %d gene sets have no predicted gene; they are scored NaN",
            path or "gene sets",
            empty,
            len(sets),
        )
    return n_genes.astype(np.int64)


# --- EVAL directory -----------------------------------------------------------------------------
def _pick_examples(cancers: pd.Series, n: int = N_EXAMPLES) -> list[str]:
    """Up to ``n`` slides for the spatial maps: one per cancer type first, in slide order."""
    first = cancers.drop_duplicates().index.tolist()
    return (first + [i for i in cancers.index if i not in first])[:n]


@dataclass
class _Setup:
    """What is fixed before any slide is scored."""

    paths: dict[str, Path]  # slide id -> PRED/{id}.h5ad
    cancers: pd.Series  # slide id -> oncotree code
    split: str  # the split evaluated, or "samples"
    hvg_source: str  # 'train', 'bench' or the file
    hvg: dict[str, list[str] | None]  # cancer -> HVG list (None: no list)
    collections: dict[str, GeneSets]  # collection -> {gene set: genes}
    ensembl: bool  # predictions name genes by Ensembl id


def _setup(
    pred_dir: Path,
    cohort: Cohort,
    *,
    split: str,
    hvg: str,
    genesets: Sequence[str] | None,
    samples: Sequence[str] | None,
) -> _Setup:
    """Slides, their prediction files and cancer types, HVG lists and gene sets."""
    ids = list(dict.fromkeys(samples)) if samples else cohort.ids(split)
    if not ids:
        raise InputError(f"no slides to evaluate in the '{split}' split", cohort.root)
    if not pred_dir.is_dir():
        raise InputError("prediction directory not found", pred_dir)
    paths = {i: pred_dir / f"{i}.h5ad" for i in ids}
    for path in paths.values():
        if not path.exists():
            raise InputError("prediction file not found", path)
    cancers = pd.Series({i: cohort.cancer(i) for i in ids}, name=keys.META_CANCER, dtype=object)
    genes = peek(paths[ids[0]])[0]
    ensembl = looks_like_ensembl(genes)
    # gene sets first: a bad GMT fails before the training slides are read for the HVG lists
    collections = resolve_genesets(genesets, ensembl=ensembl, panel=genes)
    return _Setup(
        paths=paths,
        cancers=cancers,
        split="samples" if samples else split,
        hvg_source=str(hvg),
        hvg=resolve_hvg(hvg, cohort, list(dict.fromkeys(cancers)), ensembl=ensembl),
        collections=collections,
        ensembl=ensembl,
    )


@dataclass
class _Run:
    """What the pass over the slides keeps: per-slide r, spot counts, pooled moments, maps."""

    r: dict[str, pd.Series]
    spots: dict[str, tuple[int, int]]  # slide -> (n_spots, n_spots_matched)
    pooled: dict[str, pd.DataFrame]  # cancer -> co-moments pooled over its slides
    examples: list[SpatialExample]
    # slide -> (its prediction's uns['histoprism'] as JSON types, the cancer code it was predicted
    # under: obs['oncotree_code'])
    facts: dict[str, tuple[dict, str | None]] = field(default_factory=dict)
    calibration: CalibrationTally = field(default_factory=CalibrationTally)  # layers['sd'] only


def _score_slides(s: _Setup, cohort: Cohort, *, progress: bool = True) -> _Run:
    """One pass, one slide in memory at a time."""
    run = _Run(r={}, spots={}, pooled={}, examples=[])
    show = set(_pick_examples(s.cancers))
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("evaluating", total=len(s.paths), info="")
        for sid, path in s.paths.items():
            _score_one(s, cohort, sid, path, run, show=sid in show)
            bar.update(task, advance=1, info=sid)
    return run


def _score_one(s: _Setup, cohort: Cohort, sid: str, path: Path, run: _Run, *, show: bool) -> None:
    """Score one slide into ``run``: r, spot counts, pooled moments, spatial example."""
    pred, st = read_prediction(path), read_st(cohort.st_path(sid))
    if keys.OBS_PROMPT in pred.obs:  # spots given to the model measured: scored, they would leak
        prompt = pred.obs[keys.OBS_PROMPT].to_numpy(dtype=bool)
        log.info("%s: %d measured (prompt) spots left out of the scores", sid, int(prompt.sum()))
        pred = pred[~prompt].copy()
    score = score_slide(pred, st, path=path)
    run.r[sid], run.spots[sid] = score.r, (score.n_spots, score.n_spots_matched)
    run.facts[sid] = _prediction_facts(pred)
    run.calibration.add(pred, st, path=path)
    c = s.cancers[sid]
    pooled = run.pooled.get(c)
    run.pooled[c] = score.moments if pooled is None else merge_moments(pooled, score.moments)
    if show:
        name = EXAMPLE_COLLECTION if EXAMPLE_COLLECTION in s.collections else None
        name = name or next(iter(s.collections), None)  # custom GMT only: its first collection
        ex = spatial_example(
            pred,
            st,
            score.r,
            sample_id=sid,
            cancer=c,
            hvg=s.hvg.get(c),
            genesets=s.collections.get(name) if name else None,
            collection=name or EXAMPLE_COLLECTION,
        )
        run.examples += [ex] if ex is not None else []
    log.info(
        "%s: %d of %d spots matched (%d predicted), %d genes scored",
        sid,
        score.n_spots_matched,
        score.n_spots,
        pred.n_obs,
        int(score.r.notna().sum()),
    )


def _prediction_facts(pred: ad.AnnData) -> tuple[dict, str | None]:
    """uns['histoprism'] of a prediction (JSON types) and the cancer code(s) it was predicted
    under (obs['oncotree_code']; None without)."""
    info = pred.uns.get(keys.UNS_HISTOPRISM)
    info = jsonable(dict(info)) if isinstance(info, Mapping) else {}
    if keys.OBS_CANCER not in pred.obs:
        return info, None
    return info, ", ".join(sorted(pred.obs[keys.OBS_CANCER].astype(str).unique())) or None


def _slide_facts(facts: Mapping[str, tuple[dict, str | None]]) -> pd.DataFrame:
    """per_slide.csv's columns on how each slide was predicted: cancer_requested, cancer_used,
    pixel_size_um (empty where the prediction does not say)."""
    rows = {
        sid: {
            "cancer_requested": info.get("cancer_requested"),
            "cancer_used": used,
            "pixel_size_um": info.get("pixel_size_um"),
        }
        for sid, (info, used) in facts.items()
    }
    out = pd.DataFrame.from_dict(rows, orient="index", columns=list(SLIDE_FACT_COLUMNS))
    return out.astype({"pixel_size_um": np.float64})


def _run_model(facts: Mapping[str, tuple[dict, str | None]]) -> dict | None:
    """metrics.json ``model``: the predictions' uns['histoprism'] without the facts of a slide
    (``keys.UNS_SLIDE_FACTS``: per_slide.csv has them). A key whose value differs between files
    holds the list of its values, in slide order; files without uns['histoprism'] are left out."""
    values: dict[str, list] = {}
    for info, _ in facts.values():
        for k, v in info.items():
            if k in keys.UNS_SLIDE_FACTS:
                continue
            seen = values.setdefault(k, [])
            if v not in seen:
                seen.append(v)
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()} or None


@dataclass
class _Tables:
    per_slide: pd.DataFrame
    per_gene: pd.DataFrame
    per_pathway: pd.DataFrame
    gpc_by_cancer: dict[str, pd.Series]  # collection -> per cancer, mean over sets
    pooled_by_cancer: dict[str, pd.Series]  # cancer -> pooled r per gene
    model: dict | None = None  # metrics.json "model": run-level facts of the predictions


def _tables(run: _Run, s: _Setup) -> _Tables:
    R = slide_gene_correlations(run.r)
    spots = pd.DataFrame.from_dict(
        run.spots, orient="index", columns=["n_spots", "n_spots_matched"]
    )
    scores = [all_genes_scores(R), hvg_scores(R, s.cancers, s.hvg)]
    per_slide = pd.concat([s.cancers, _slide_facts(run.facts), spots, *scores], axis=1)
    pathways, gpc_by_cancer = [], {}
    for name, sets in s.collections.items():
        scores = geneset_scores(R, sets)
        per_slide[f"gpc_{name}"] = scores.mean(axis=1)
        gpc_by_cancer[name] = scores.groupby(s.cancers).mean().mean(axis=1)
        pathways.append(gpc_table(scores, s.cancers, sets, panel=R.columns, collection=name))
    counts = s.cancers.value_counts()
    pooled_by_cancer = {c: pooled_pearson(m, int(counts[c])) for c, m in run.pooled.items()}
    pooled = pooled_pearson(functools.reduce(merge_moments, run.pooled.values()), len(s.cancers))
    per_slide.index.name = keys.SPLIT_ID
    cols = [keys.META_CANCER, *SLIDE_FACT_COLUMNS, "n_spots", "n_spots_matched", "n_genes"]
    cols += ["n_hvg", "hvg", "all_genes"]
    per_slide = per_slide[cols + [f"gpc_{c}" for c in s.collections]]
    return _Tables(
        per_slide,
        per_gene_table(R, pooled),
        pd.concat(pathways),
        gpc_by_cancer,
        pooled_by_cancer,
        model=_run_model(run.facts),
    )


def _metrics(s: _Setup, t: _Tables) -> dict:
    """The content of metrics.json (JSON types, NaN as None)."""
    return jsonable(
        {
            "evaluator_version": EVALUATOR_VERSION,
            "n_slides": len(s.cancers),
            "split": s.split,
            "hvg_source": s.hvg_source,
            "hvg_missing": [c for c, g in s.hvg.items() if not g],
            "gene_ids": "ensembl" if s.ensembl else "symbols",
            "gene_sets": {name: len(sets) for name, sets in s.collections.items()},
            "n_spots": int(t.per_slide["n_spots"].sum()),
            "n_spots_matched": int(t.per_slide["n_spots_matched"].sum()),
            "headline": headline_scores(t.per_slide, t.per_pathway, t.per_gene, s.cancers),
            "per_cancer": per_cancer_scores(
                t.per_slide,
                s.cancers,
                s.hvg,
                gpc_by_cancer=t.gpc_by_cancer,
                pooled_by_cancer=t.pooled_by_cancer,
            ),
            "hvg_genes": s.hvg,
            "model": t.model,
        }
    )


def jsonable(obj):
    """Plain JSON types; NaN and inf become null."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray, pd.Index)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    return obj if obj is None or isinstance(obj, str) else str(obj)


def evaluate(
    pred_dir: str | Path,
    cohort: Cohort,
    out_dir: str | Path,
    *,
    split: str = "test",
    hvg: str = "train",
    genesets: list[str] | None = None,
    samples: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Score PRED/{id}.h5ad against the cohort's counts and write EVAL/.

    Outputs: docs/formats.md, "EVAL: evaluation"; definitions: docs/metrics.md.

    Slides: ``samples``, else the cohort's ``split``; a missing prediction is an ``InputError``.
    ``hvg``: 'train', 'bench' or a file (see ``resolve_hvg``); ``genesets``: 'gpc' (bundled
    Hallmark + GO, the default) and/or GMT paths. Writes metrics.json, per_slide.csv,
    per_gene.csv, per_pathway.csv, spatial_maps.h5 (the report's maps) and report.html, each
    atomically; predictions with ``layers['sd']`` (``predict --uncertainty``) add
    metrics.json ``calibration`` and calibration.csv (``calibration.py``); ``progress`` shows a
    bar. Returns the metrics as written to metrics.json (NaN as None).
    """
    setup = _setup(Path(pred_dir), cohort, split=split, hvg=hvg, genesets=genesets, samples=samples)
    run = _score_slides(setup, cohort, progress=progress)
    tables = _tables(run, setup)
    metrics = _metrics(setup, tables)
    if (calibration := run.calibration.write(out_dir)) is not None:  # calibration.csv
        metrics["calibration"] = jsonable(calibration)
    _write_outputs(Path(out_dir), metrics, tables)
    save_examples(Path(out_dir) / keys.EVAL_SPATIAL_MAPS, run.examples)
    write_report(out_dir, examples=run.examples)
    return metrics


def _write_outputs(out_dir: Path, metrics: dict, t: _Tables) -> None:
    write_text_atomic(out_dir / keys.EVAL_METRICS, json.dumps(metrics, indent=2, allow_nan=False))
    for name, df, index in (
        (keys.EVAL_PER_SLIDE, t.per_slide, True),
        (keys.EVAL_PER_GENE, t.per_gene, False),
        (keys.EVAL_PER_PATHWAY, t.per_pathway, False),
    ):
        with atomic_path(out_dir / name) as tmp:
            df.to_csv(tmp, index=index)
