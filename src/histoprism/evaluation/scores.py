"""Pure aggregations of the evaluation: arrays and tables in, scores out (docs/metrics.md).

Data path: per-slide Pearson r(i, g) (``evaluate.score_slide``) -> (slides x genes) matrix R
(``slide_gene_correlations``) -> per slide: HVG-50 (``hvg_scores``), all genes
(``all_genes_scores``), per gene set (``geneset_scores``) -> micro (mean over slides) and macro
(mean over cancer types of the mean over their slides) -> the per_gene.csv and per_pathway.csv
tables, metrics.json ``headline`` and ``per_cancer``. Comparing two models: ``win_rate``,
``paired_bootstrap`` over slides, ``sign_test`` over gene sets. Nothing here reads or writes a
file; ``evaluate`` (the driver) and ``compare`` call these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from ..expression.pathways import membership_matrix

__all__ = [
    "all_genes_scores",
    "geneset_scores",
    "gpc_table",
    "headline_scores",
    "hvg_scores",
    "macro",
    "micro",
    "paired_bootstrap",
    "per_cancer_mean",
    "per_cancer_scores",
    "per_gene_table",
    "sign_test",
    "slide_gene_correlations",
    "win_rate",
]


# --- slides x genes -> scores --------------------------------------------------------------------
def slide_gene_correlations(r_by_slide: Mapping[str, pd.Series]) -> pd.DataFrame:
    """(n_slides, G) matrix R of r(i, g) over the union of predicted genes (first-seen order).

    NaN where slide i did not measure, or the model did not predict, gene g.
    """
    if not r_by_slide:
        return pd.DataFrame(dtype=np.float64)
    R = pd.concat(
        list(r_by_slide.values()), axis=1, keys=list(r_by_slide), join="outer", sort=False
    )
    return R.T.astype(np.float64)


def micro(values: pd.Series) -> float:
    """Mean over slides (NaN left out)."""
    return float(pd.Series(values, dtype=np.float64).mean())


def macro(values: pd.Series, cancers: pd.Series) -> float:
    """Mean over cancer types of the mean over their slides (NaN left out at both levels)."""
    return float(per_cancer_mean(values, cancers).mean())


def per_cancer_mean(values: pd.Series, cancers: pd.Series) -> pd.Series:
    """Mean over the slides of each cancer type; ``values`` and ``cancers`` indexed by slide."""
    return pd.Series(values, dtype=np.float64).groupby(cancers.reindex(values.index)).mean()


def hvg_scores(
    R: pd.DataFrame, cancers: pd.Series, hvg: Mapping[str, Sequence[str] | None]
) -> pd.DataFrame:
    """Per slide: mean r over the HVG list of its cancer type (genes with NaN r left out).

    Returns (n_slides, 2): ``hvg`` (NaN without a list) and ``n_hvg`` (genes that had a finite r).
    """
    out = pd.DataFrame({"hvg": np.nan, "n_hvg": 0}, index=R.index)
    slide_cancer = cancers.reindex(R.index)
    for cancer, ids in slide_cancer.groupby(slide_cancer).groups.items():
        genes = list(dict.fromkeys(hvg.get(cancer) or []))
        if genes:
            sub = R.loc[ids].reindex(columns=genes)
            out.loc[ids, "hvg"] = sub.mean(axis=1)
            out.loc[ids, "n_hvg"] = sub.count(axis=1)
    return out


def all_genes_scores(R: pd.DataFrame) -> pd.DataFrame:
    """Per slide: mean r over all its genes with a finite r (``all_genes``) and their number."""
    return pd.DataFrame({"n_genes": R.count(axis=1), "all_genes": R.mean(axis=1)})


def geneset_scores(R: pd.DataFrame, genesets: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """(n_slides, n_sets): mean r(i, g) over the genes g of each set with a finite r on slide i.

    One sparse product with the (sets x genes) ``membership_matrix``: work and memory grow with
    the sets' total size, not sets x genes (20,000 sets over a 38,982-gene panel are 3 GB dense).
    NaN where no gene of the set has a finite r on the slide.
    """
    M = membership_matrix(R.columns, genesets)  # (S, G) sparse
    V = R.to_numpy(dtype=np.float64)  # (n_slides, G)
    ok = np.isfinite(V)
    sums = (M @ np.where(ok, V, 0.0).T).T  # (n_slides, S)
    counts = (M @ ok.T.astype(np.float64)).T
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(counts > 0, sums / counts, np.nan)
    return pd.DataFrame(scores, index=R.index, columns=list(genesets))


def gpc_table(
    scores: pd.DataFrame,
    cancers: pd.Series,
    genesets: Mapping[str, Sequence[str]],
    *,
    panel: pd.Index,
    collection: str,
) -> pd.DataFrame:
    """Tidy GPC table, one row per gene set: collection, gene_set, n_genes_in_panel, s_micro
    (mean over slides of ``scores``), s_macro (mean over cancer types)."""
    by_cancer = scores.groupby(cancers.reindex(scores.index)).mean()
    return pd.DataFrame(
        {
            "collection": collection,
            "gene_set": list(genesets),
            "n_genes_in_panel": membership_matrix(panel, genesets).getnnz(axis=1),
            "s_micro": scores.mean(axis=0).to_numpy(),
            "s_macro": by_cancer.mean(axis=0).to_numpy(),
        }
    )


def win_rate(s_a: pd.Series | np.ndarray, s_b: pd.Series | np.ndarray) -> float:
    """Share of gene sets where model A has the higher s_m than model B.

    Series are aligned by gene-set name, arrays by position; sets NaN in either are ignored, a tie
    is not a win. NaN when no set is comparable.
    """
    if isinstance(s_a, pd.Series) and isinstance(s_b, pd.Series):
        s_a, s_b = s_a.align(s_b, join="inner")
    a, b = np.asarray(s_a, dtype=np.float64), np.asarray(s_b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.mean(a[ok] > b[ok])) if ok.any() else float("nan")


# --- EVAL tables and metrics.json blocks --------------------------------------------------------
def per_gene_table(R: pd.DataFrame, pooled: pd.Series) -> pd.DataFrame:
    """per_gene.csv: gene, mean_r over slides, n_slides with a finite r, pooled_r (``pooled``:
    pooled r per gene); genes with no score dropped."""
    out = pd.DataFrame(
        {
            "mean_r": R.mean(axis=0),
            "n_slides": R.count(axis=0),
            "pooled_r": pooled.reindex(R.columns),
        }
    )
    out = out[(out["n_slides"] > 0) | out["pooled_r"].notna()]
    return out.rename_axis("gene").reset_index()


def headline_scores(
    per_slide: pd.DataFrame, per_pathway: pd.DataFrame, per_gene: pd.DataFrame, cancers: pd.Series
) -> dict[str, float]:
    """metrics.json ``headline`` from the per_slide (hvg, all_genes), per_pathway (collection,
    s_micro, s_macro) and per_gene (pooled_r) tables; ``cancers``: slide -> cancer code."""
    s = per_slide
    head = {"hvg_micro": micro(s["hvg"]), "hvg_macro": macro(s["hvg"], cancers)}
    for name, table in per_pathway.groupby("collection", sort=False):
        head[f"gpc_{name}_micro"] = float(table["s_micro"].mean())
        head[f"gpc_{name}_macro"] = float(table["s_macro"].mean())
    head["all_genes_micro"] = micro(s["all_genes"])
    head["all_genes_macro"] = macro(s["all_genes"], cancers)
    head["pooled_pearson"] = float(per_gene["pooled_r"].mean())
    head["n_genes_pooled"] = int(per_gene["pooled_r"].notna().sum())
    return head


def per_cancer_scores(
    per_slide: pd.DataFrame,
    cancers: pd.Series,
    hvg: Mapping[str, Sequence[str] | None],
    *,
    gpc_by_cancer: Mapping[str, pd.Series],
    pooled_by_cancer: Mapping[str, pd.Series],
) -> dict[str, dict]:
    """metrics.json ``per_cancer``: {cancer: {n_slides, hvg, gpc_<collection>, all_genes,
    pooled_pearson, pooled_hvg}}, cancers in first-seen order.

    gpc_by_cancer: collection -> per cancer, mean over sets; pooled_by_cancer: cancer -> pooled
    r per gene; hvg: cancer -> HVG list (None: no list).
    """
    hvg_mean = per_cancer_mean(per_slide["hvg"], cancers)
    all_mean = per_cancer_mean(per_slide["all_genes"], cancers)
    out = {}
    for c in dict.fromkeys(cancers):
        pooled = pooled_by_cancer[c]
        out[c] = {
            "n_slides": int((cancers == c).sum()),
            "hvg": hvg_mean[c],
            **{f"gpc_{k}": v.get(c, np.nan) for k, v in gpc_by_cancer.items()},
            "all_genes": all_mean[c],
            "pooled_pearson": float(pooled.mean()),
            # HEST-bench's number for a task: pooled r over the task's HVG list
            "pooled_hvg": float(pooled.reindex(hvg.get(c) or []).mean()),
        }
    return out


# --- two models: statistics -----------------------------------------------------------------------
def paired_bootstrap(
    a: pd.Series, b: pd.Series, *, n_boot: int = 10_000, seed: int = 0
) -> dict[str, float]:
    """Bootstrap CI of mean(a - b) over slides, resampling slides with replacement.

    a, b: per-slide scores indexed by sample_id; aligned on the common ids, pairs with a NaN
    dropped. Returns {"diff": mean(a - b), "ci_low", "ci_high" (2.5 / 97.5 percentiles of the
    (n_boot,) resampled means), "n": slides used}; NaN diff and CI when no pair is left.
    Memory: one (n_boot, n) index matrix.
    """
    a, b = a.astype(np.float64).align(b.astype(np.float64), join="inner")
    d = (a - b).dropna().to_numpy()  # (n,)
    n = len(d)
    if n == 0:
        return {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)  # (n_boot,)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(d.mean()), "ci_low": float(low), "ci_high": float(high), "n": n}


def sign_test(s_a: pd.Series, s_b: pd.Series) -> dict[str, float]:
    """Two-sided sign test of model A vs B over gene sets.

    s_a, s_b: (n_sets,) scores indexed by gene set (or (collection, gene_set)); sets NaN in either
    are ignored. Returns wins (A > B), losses, ties, p (exact binomial test of wins among
    wins + losses, ties dropped; NaN when all tie) and win_rate (``win_rate``: ties count
    as non-wins).
    """
    a, b = s_a.astype(np.float64).align(s_b.astype(np.float64), join="inner")
    ok = a.notna() & b.notna()
    a, b = a[ok], b[ok]
    wins, losses = int((a > b).sum()), int((a < b).sum())
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else math.nan
    return {
        "wins": wins,
        "losses": losses,
        "ties": int(ok.sum()) - wins - losses,
        "p": float(p),
        "win_rate": win_rate(a, b),
    }
