"""Compare several models' EVAL directories: headline table, per-cancer table, significance.

Data path: EVAL/ of each model (metrics.json, per_slide.csv, per_pathway.csv) -> ``EvalResult``
(``load_eval``, from ``evaldir``: the one EVAL reader, shared with ``report``) -> tidy frames
(one row per model; per model and cancer type; per model and metric) -> COMPARE/
(comparison.csv, comparison.json, comparison.md). Significance: a paired bootstrap over test
slides for per-slide scores, a sign test over gene sets for GPC. All functions but ``load_eval``
and ``write_comparison`` are pure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._core import keys
from .._core.errors import InputError
from .._core.files import atomic_path, write_text_atomic
from ..io.evaldir import EvalResult, load_eval
from .evaluate import jsonable
from .scores import paired_bootstrap, sign_test, win_rate

# output files of ``write_comparison`` (candidates for keys.py)
COMPARE_TABLE, COMPARE_JSON, COMPARE_MD = keys.COMPARE_TABLE, keys.COMPARE_JSON, keys.COMPARE_MD

HEADLINE = tuple(keys.HEADLINE_METRICS)
TIMING = ("train_s", "predict_s", "peak_rss_mb")
DASH = "—"  # NaN in markdown

__all__ = [
    "EvalResult",
    "comparison_table",
    "load_eval",
    "paired_bootstrap",
    "pairwise_tests",
    "per_cancer_table",
    "sign_test",
    "win_rate_matrix",
    "write_comparison",
]


# --- tables -------------------------------------------------------------------------------------
def _names(results: Sequence[EvalResult]) -> list[str]:
    names = [r.name for r in results]
    dup = pd.Index(names)[pd.Index(names).duplicated()]
    if len(dup):
        raise InputError(f"two models named '{dup[0]}'")
    return names


def comparison_table(
    results: Sequence[EvalResult], timing: Mapping[str, Mapping] | None = None
) -> pd.DataFrame:
    """(n_models, 9 [+ 2 per custom collection] [+ 3]) headline scores, index = model name.

    Columns ``HEADLINE`` from metrics["headline"] (missing or None -> NaN), then the
    ``gpc_<collection>_micro/_macro`` of any model's own GMT collections, then ``TIMING``
    (train_s, predict_s, peak_rss_mb) when ``timing`` ({name: {column: value}}) is given.
    """
    names = _names(results)
    heads = [r.metrics.get("headline") or {} for r in results]
    custom = [k for h in heads for k in h if k not in HEADLINE and _is_gpc_headline(k)]
    columns = [*HEADLINE, *dict.fromkeys(custom)]
    rows = [{k: h.get(k) for k in columns} for h in heads]
    table = pd.DataFrame(rows, index=pd.Index(names, name="model"), columns=columns)
    if timing is not None:
        for col in TIMING:
            table[col] = [(timing.get(n) or {}).get(col) for n in names]
    return table.astype(np.float64)


def _is_gpc_headline(key: str) -> bool:
    return key.startswith("gpc_") and key.endswith(("_micro", "_macro"))


def per_cancer_table(results: Sequence[EvalResult]) -> pd.DataFrame:
    """Long table from metrics["per_cancer"]: one row per (model, cancer type).

    Columns: model, oncotree_code, n_slides, hvg, all_genes, gpc_<collection>..., then any other
    per-cancer numbers (pooled_pearson, pooled_hvg); None -> NaN.
    """
    rows = [
        {"model": r.name, keys.META_CANCER: code, **values}
        for r in results
        for code, values in (r.metrics.get("per_cancer") or {}).items()
    ]
    table = pd.DataFrame(rows)
    first = ["model", keys.META_CANCER, "n_slides", "hvg", "all_genes"]
    gpc = sorted({c for c in table.columns if c.startswith("gpc_")}, key=list(table.columns).index)
    rest = [c for c in table.columns if c not in first and c not in gpc]
    table = table.reindex(columns=first + gpc + rest)
    numeric = table.columns[2:]
    table[numeric] = table[numeric].astype(np.float64)
    return table


def win_rate_matrix(results: Sequence[EvalResult], *, collection: str) -> pd.DataFrame:
    """(n_models, n_models) share of ``collection``'s gene sets where row model A's s_micro
    beats column model B's (``scores.win_rate``); diagonal NaN. W[A, B] + W[B, A] + ties = 1."""
    names = _names(results)
    scores = [r.set_scores(collection) for r in results]
    W = np.full((len(names), len(names)), np.nan)
    for i, s_a in enumerate(scores):
        for j, s_b in enumerate(scores):
            if i != j:
                W[i, j] = win_rate(s_a, s_b)
    return pd.DataFrame(W, index=pd.Index(names, name="A"), columns=pd.Index(names, name="B"))


def pairwise_tests(
    results: Sequence[EvalResult],
    *,
    reference: str,
    metrics: Sequence[str] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Reference vs every other model B, one row per (B, metric).

    metrics: per-slide columns to test; default hvg, ``gpc_<collection>`` for every collection
    any model has (bundled or a user's GMT, first seen first), all_genes.
    Columns: reference, model (B), metric, diff, ci_low, ci_high, n (paired bootstrap of
    reference - B over the per-slide column ``metric``), and for ``gpc_<collection>`` metrics
    wins, losses, ties, p, win_rate (sign test of the reference vs B over the collection's gene
    sets, s_micro); NaN where a model lacks the column or collection.
    """
    if metrics is None:
        metrics = ["hvg", *(f"gpc_{c}" for c in _collections(results)), "all_genes"]
    by_name = dict(zip(_names(results), results, strict=True))
    if reference not in by_name:
        raise InputError(f"reference model '{reference}' is not among {list(by_name)}")
    ref = by_name[reference]
    rows = []
    for name, other in by_name.items():
        if name == reference:
            continue
        for metric in metrics:
            boot = paired_bootstrap(
                _column(ref, metric), _column(other, metric), n_boot=n_boot, seed=seed
            )
            row = {"reference": reference, "model": name, "metric": metric, **boot}
            if metric.startswith("gpc_"):
                collection = metric.removeprefix("gpc_")
                row |= sign_test(ref.set_scores(collection), other.set_scores(collection))
            rows.append(row)
    cols = ["reference", "model", "metric", "diff", "ci_low", "ci_high", "n"]
    cols += ["wins", "losses", "ties", "p", "win_rate"]
    return pd.DataFrame(rows).reindex(columns=cols)


def _column(r: EvalResult, metric: str) -> pd.Series:
    """Per-slide column ``metric`` of a model; empty when it has none."""
    if metric in r.per_slide:
        return r.per_slide[metric].astype(np.float64)
    return pd.Series(dtype=np.float64)


# --- COMPARE directory --------------------------------------------------------------------------
def _collections(results: Sequence[EvalResult]) -> list[str]:
    """Gene set collections of any model, in first-seen order."""
    seen = [
        c for r in results if "collection" in r.per_pathway for c in r.per_pathway["collection"]
    ]
    return list(dict.fromkeys(str(c) for c in seen))


def write_comparison(
    out_dir: str | Path,
    results: Sequence[EvalResult],
    *,
    timing: Mapping[str, Mapping] | None = None,
    reference: str | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write comparison.csv, comparison.json and comparison.md to ``out_dir``, each atomically.

    JSON: {"reference", "models" (table records), "per_cancer", "tests", "win_rate":
    {collection: {A: {B: share}}}}, NaN as null. Markdown: headline table, significance of
    ``reference`` (default: the first model) vs the others, win-rate matrices.
    Returns {"csv" | "json" | "md": path}.
    """
    if not results:
        raise InputError("no evaluations to compare")
    out_dir = Path(out_dir)
    reference = results[0].name if reference is None else reference
    table = comparison_table(results, timing)
    tests = pairwise_tests(results, reference=reference, n_boot=n_boot, seed=seed)
    wins = {c: win_rate_matrix(results, collection=c) for c in _collections(results)}
    doc = {
        "reference": reference,
        "models": table.reset_index().to_dict(orient="records"),
        "per_cancer": per_cancer_table(results).to_dict(orient="records"),
        "tests": tests.to_dict(orient="records"),
        "win_rate": {c: W.to_dict(orient="index") for c, W in wins.items()},
    }
    paths = {k: out_dir / f for k, f in (("csv", COMPARE_TABLE), ("json", COMPARE_JSON))}
    paths["md"] = out_dir / COMPARE_MD
    with atomic_path(paths["csv"]) as tmp:
        table.to_csv(tmp)
    write_text_atomic(paths["json"], json.dumps(jsonable(doc), indent=2, allow_nan=False))
    write_text_atomic(paths["md"], comparison_markdown(table, tests, wins, reference=reference))
    return paths


# --- markdown -----------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and not np.isfinite(v)):
        return DASH
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)


def pipe_table(table: pd.DataFrame) -> str:
    """A markdown pipe table of the frame (index first), floats to 3 decimals, NaN as a dash."""
    cols = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in table.iterrows():
        lines.append("| " + " | ".join([str(idx), *(_fmt(v) for v in row)]) + " |")
    return "\n".join(lines) + "\n"


def _significance(tests: pd.DataFrame) -> pd.DataFrame:
    """(n_tests, 4) display frame: model, metric, diff [95% CI], wins/losses, p."""

    def ci(t) -> str:
        if not np.isfinite(t["diff"]):
            return DASH
        return f"{t['diff']:+.3f} [{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}]"

    def sign(t) -> str:
        return DASH if pd.isna(t["wins"]) else f"{int(t['wins'])}/{int(t['losses'])}"

    def p(t) -> str:
        return DASH if pd.isna(t["p"]) else f"{t['p']:.3g}"

    return pd.DataFrame(
        {
            "metric": tests["metric"].to_numpy(),
            "diff [95% CI]": [ci(t) for _, t in tests.iterrows()],
            "sign test wins/losses": [sign(t) for _, t in tests.iterrows()],
            "p": [p(t) for _, t in tests.iterrows()],
        },
        index=pd.Index(tests["model"].to_numpy(), name="vs model"),
    )


def comparison_markdown(
    table: pd.DataFrame, tests: pd.DataFrame, wins: Mapping[str, pd.DataFrame], *, reference: str
) -> str:
    """comparison.md: headline table, significance of ``reference`` vs the others, win rates."""
    parts = ["# Model comparison\n", pipe_table(table)]
    parts += [
        "## Significance\n",
        f"Reference: **{reference}**. diff = reference − model, mean over test slides, 95% CI "
        "from a paired bootstrap over slides; sign test over gene sets (s_micro), two-sided "
        "binomial p, ties dropped.\n",
        pipe_table(_significance(tests)) if len(tests) else "(one model: nothing to test)\n",
    ]
    for collection, W in wins.items():
        parts += [
            f"## Win rate: {collection}\n",
            "Share of gene sets where the row model's s_micro beats the column model's.\n",
            pipe_table(W),
        ]
    return "\n".join(parts)
