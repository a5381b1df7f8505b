"""Read an EVAL directory back (docs/formats.md, "EVAL: evaluation"): the one reader of
metrics.json, per_slide.csv, per_gene.csv and per_pathway.csv, used by ``compare`` and ``report``.

It lives in its own module because ``evaluate`` (the writer) imports ``report``, and ``compare``
imports ``evaluate``: a reader in either would close an import cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._core import keys
from .._core.errors import InputError

# gene, gene-set and sample names are text: no "NA"/"nan" guessing, only empty cells are missing
# (``evaluate`` writes NaN as an empty cell)
_CSV_NA = dict(keep_default_na=False, na_values=[""])

__all__ = ["EvalResult", "load_eval"]


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


def _read_csv(eval_dir: Path, name: str, **kwargs) -> pd.DataFrame:
    """One table of the directory; a file pandas cannot parse is an ``InputError`` naming it."""
    try:
        return pd.read_csv(eval_dir / name, **_CSV_NA, **kwargs)
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError, no sample_id column ...
        problem = " ".join(str(exc).split())  # pandas messages may span lines; ours is one
        raise InputError(f"{name} is not a readable table ({problem})", eval_dir) from exc


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
    try:
        metrics = json.loads((eval_dir / keys.EVAL_METRICS).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{keys.EVAL_METRICS} is not valid JSON ({exc})", eval_dir) from exc
    if not isinstance(metrics, dict):
        raise InputError(f"{keys.EVAL_METRICS} is not a JSON object", eval_dir)
    per_slide = _read_csv(
        eval_dir,
        keys.EVAL_PER_SLIDE,
        index_col=keys.SPLIT_ID,
        dtype={keys.SPLIT_ID: str, keys.META_CANCER: str},
    )
    per_pathway = _read_csv(
        eval_dir, keys.EVAL_PER_PATHWAY, dtype={"collection": str, "gene_set": str}
    )
    genes = _read_csv(eval_dir, keys.EVAL_PER_GENE, dtype={"gene": str}) if per_gene else None
    return EvalResult(name, metrics, per_slide, per_pathway, genes)
