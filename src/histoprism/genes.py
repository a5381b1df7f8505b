"""Gene panels, gene sets (GMT) and the bundled reference lists.

Gene names are plain strings: symbols (HEST ``var_names``) or Ensembl ids (the STPath panel). A
``GenePanel`` fixes the order of the model's output columns; slides map their measured genes onto it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

# HEST-bench task folder for each oncotree code that has one (LUNG and LYMPH_IDC are tasks, not codes).
BENCH_TASK = {
    "IDC": "IDC",
    "ILC": "IDC",
    "COAD": "COAD",
    "READ": "READ",
    "PRAD": "PRAD",
    "SKCM": "SKCM",
    "CCRCC": "CCRCC",
    "HCC": "HCC",
    "PAAD": "PAAD",
    "LUAD": "LUNG",
    "LUSC": "LUNG",
}
GENESET_COLLECTIONS = ("hallmark", "go")


def data_path(*parts: str) -> Path:
    """Path of a bundled data file under ``histoprism/data``."""
    return Path(str(resources.files("histoprism").joinpath("data", *parts)))


@dataclass(frozen=True)
class GenePanel:
    """An ordered list of unique gene names: the columns of the model's output.

    ``genes`` (G,) str. ``index`` maps a name to its column.
    """

    genes: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {g: i for i, g in enumerate(self.genes)})
        if len(self.index) != len(self.genes):
            dup = _first_duplicate(self.genes)
            raise InputError(f"duplicate gene '{dup}' in gene panel")

    def __len__(self) -> int:
        return len(self.genes)

    def locate(self, names: np.ndarray | list[str]) -> np.ndarray:
        """Column of each name in the panel, -1 where absent. (n,) str -> (n,) int64."""
        return np.array([self.index.get(str(g), -1) for g in names], dtype=np.int64)


def _first_duplicate(names) -> str | None:
    seen: set[str] = set()
    for g in names:
        if g in seen:
            return g
        seen.add(g)
    return None


def read_gene_list(path: str | Path) -> list[str]:
    """Read a gene list: one name per line, or a CSV/TSV whose first column holds the names.

    Lines starting with '#' and a header line named gene/genes/symbol/gene_id are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("gene list file not found", path)
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.replace("\t", ",").split(",")[0].strip().strip('"')
        names.append(first)
    if names and names[0].lower() in {"gene", "genes", "symbol", "gene_id", "gene_ids", "name"}:
        names = names[1:]
    if not names:
        raise InputError("gene list is empty", path)
    dup = _first_duplicate(names)
    if dup is not None:
        raise InputError(f"duplicate gene '{dup}' in gene list", path)
    return names


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file: ``name<TAB>description<TAB>gene...`` per line -> {name: genes} in file order."""
    path = Path(path)
    if not path.exists():
        raise InputError("gene set file not found", path)
    sets: dict[str, list[str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            raise InputError(f"line {n} is not 'name<TAB>description<TAB>genes...'", path)
        genes = list(dict.fromkeys(g for g in parts[2:] if g))
        sets[parts[0]] = genes
    if not sets:
        raise InputError("no gene sets in file", path)
    return sets


def gpc_genesets(collection: str, *, ids: str = "symbols") -> dict[str, list[str]]:
    """The bundled GPC benchmark sets: ``collection`` 'hallmark' (50) or 'go' (87).

    ``ids`` 'symbols' or 'ensembl' (same sets, gene for gene).
    """
    if collection not in GENESET_COLLECTIONS or ids not in ("symbols", "ensembl"):
        raise InputError(f"unknown gene set collection '{collection}' / ids '{ids}'")
    return read_gmt(data_path("genesets", f"gpc_{collection}.{ids}.gmt"))


def bench_hvg(cancer: str, *, ids: str = "symbols") -> list[str] | None:
    """HEST-bench top-50 HVG list for a cancer code, or None when HEST-bench has no such task."""
    task = BENCH_TASK.get(cancer, cancer)
    name = "var_50genes.json" if ids == "symbols" else "var_50genes_mapped.json"
    path = data_path("hest_bench", task, name)
    if not path.exists():
        return None
    return list(json.loads(path.read_text())["genes"])


def stpath_panel() -> list[str]:
    """The 38,982-gene STPath/HistoPrism panel (Ensembl ids)."""
    return read_gene_list(data_path("stpath_gene_panel.ensembl.txt"))


def gene_table() -> pd.DataFrame:
    """The bundled NCBI human gene table (2022), one row per symbol.

    Index: gene symbol (unique; the first row of a repeated symbol wins). Columns: ``ensembl``
    (str, the first Ensembl id listed, NaN when none) and ``in_panel`` (bool, that id is in the
    STPath panel). A fresh copy on each call; the file is read once per process.
    """
    return _gene_table().copy()


@cache
def _gene_table() -> pd.DataFrame:
    with data_path("genes", "human_genes.ncbi2022.tsv.gz").open("rb") as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str, compression="gzip")
    table = table.drop_duplicates("symbol").set_index("symbol")
    ensembl = table["ensembl_id"].str.split(";").str[0]
    return pd.DataFrame({"ensembl": ensembl, "in_panel": ensembl.isin(set(stpath_panel()))})


def looks_like_ensembl(names) -> bool:
    """True when most names are Ensembl gene ids (ENSG...)."""
    names = list(names)[:200]
    return bool(names) and sum(str(g).startswith("ENS") for g in names) > len(names) / 2
