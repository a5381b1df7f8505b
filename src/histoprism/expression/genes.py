"""Gene panels, gene sets (GMT) and the bundled reference lists.

Gene names are plain strings: symbols (HEST ``var_names``) or Ensembl ids (the STPath panel). A
``GenePanel`` fixes the order of the model's output columns; slides map their measured genes onto it.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._core.errors import InputError

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
    """Read a GMT file, ``name<TAB>description<TAB>gene...`` per line: {name: genes}, file order.

    Genes repeated within a set count once (first place kept); blank lines are skipped; a UTF-8
    byte-order mark and CRLF line ends are accepted. Anything else that is not a gene set is a
    one-line ``InputError`` naming the file and the line: no text (binary, not UTF-8), a line
    without tab-separated fields, a set without a name or without genes, a set name used twice,
    a file without sets.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("gene set file not found", path)
    if not path.is_file():
        raise InputError("gene set file is not a file", path)
    text = _gmt_text(path)
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    # split on "\n" only: str.splitlines also breaks at \v, \f, \x1c ... and would miscount lines
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if "\t" not in line:
            raise InputError(
                f"line {n} has no tab-separated fields (expected "
                "'name<TAB>description<TAB>gene...'): not a GMT file?",
                path,
            )
        name, _, rest = line.partition("\t")
        name = name.strip()
        if not name:
            raise InputError(f"line {n}: gene set without a name", path)
        if name in first_line:
            raise InputError(
                f"line {n}: gene set '{name}' is also on line {first_line[name]} "
                "(set names must be unique)",
                path,
            )
        # fields after the description; dict.fromkeys: a repeated gene counts once, where first
        # seen (map with C functions: a 20,000-set file lists millions of names)
        unique = dict.fromkeys(map(str.strip, rest.split("\t")[1:]))
        unique.pop("", None)  # empty fields (a trailing tab)
        genes = list(unique)
        if not genes:
            raise InputError(f"line {n}: gene set '{name}' has no genes", path)
        sets[name], first_line[name] = genes, n
    if not sets:
        raise InputError("no gene sets in file (empty GMT)", path)
    return sets


def _gmt_text(path: Path) -> str:
    """The file as text; binary content or invalid UTF-8 is an ``InputError`` with the line."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise InputError(f"line {line}: binary content (NUL byte), not a text GMT file", path)
    try:
        return data.decode("utf-8-sig")  # -sig: drops a byte-order mark, if any
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1  # exc.object: after a BOM
        raise InputError(f"line {line}: not UTF-8 text ({exc.reason})", path) from exc


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


# ---------------------------------------------------------------------------------------------
# Gene identifier mapping (offline: the bundled NCBI table or a user table, never a web call)

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?$")
GENE_ID_SPACES = ("ensembl", "symbol")


def strip_version(name: str) -> str:
    """``ENSG00000121410.12`` -> ``ENSG00000121410``; anything else unchanged."""
    m = _ENSEMBL_RE.match(name)
    return m.group(1) if m else name


@dataclass(frozen=True)
class GeneIdMap:
    """Offline symbol <-> Ensembl gene id map.

    symbol_to_ensembl: official symbol -> its first Ensembl id.  alias_to_symbol: alias -> official
    symbol, only for aliases naming one gene and not themselves an official symbol.
    ensembl_to_symbol: every listed Ensembl id (unversioned) -> the first symbol listing it.
    """

    symbol_to_ensembl: dict[str, str] = field(repr=False)
    alias_to_symbol: dict[str, str] = field(repr=False)
    ensembl_to_symbol: dict[str, str] = field(repr=False)
    source: str = ""

    @classmethod
    def bundled(cls) -> GeneIdMap:
        """The map of the bundled NCBI human gene table (2022); read once per process."""
        return _bundled_idmap()

    @classmethod
    def from_file(cls, path: str | Path) -> GeneIdMap:
        """A user table (TSV or CSV, optionally gzipped): columns symbol, ensembl_id[, alias_symbol].

        ``ensembl_id`` and ``alias_symbol`` may hold several ';'-joined values.
        """
        path = Path(path)
        if not path.exists():
            raise InputError("gene id table not found", path)
        try:
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as fh:
                sep = "\t" if "\t" in fh.readline() else ","
            table = pd.read_csv(path, sep=sep, dtype=str, compression="infer")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read gene id table ({exc})", path) from exc
        missing = {"symbol", "ensembl_id"} - set(table.columns)
        if missing:
            raise InputError(f"gene id table lacks column(s) {sorted(missing)}", path)
        return cls.from_table(table, source=str(path))

    @classmethod
    def from_table(cls, table: pd.DataFrame, *, source: str = "") -> GeneIdMap:
        """Build from a frame with columns symbol, ensembl_id[, alias_symbol] (';'-joined lists)."""
        table = table.dropna(subset=["symbol"]).reset_index(drop=True)
        symbols = table["symbol"].str.strip()
        ens_lists = table["ensembl_id"].fillna("").str.split(";")
        ens = ens_lists.explode().str.strip().map(strip_version)
        ens = ens[ens != ""]
        first_ens = ens.groupby(level=0).first()  # row -> first Ensembl id
        sym_to_ens = pd.Series(first_ens.values, index=symbols[first_ens.index].values)
        sym_to_ens = sym_to_ens[~sym_to_ens.index.duplicated()]
        ens_to_sym = pd.Series(symbols[ens.index].values, index=ens.values)
        ens_to_sym = ens_to_sym[~ens_to_sym.index.duplicated()]
        alias_map: dict[str, str] = {}
        if "alias_symbol" in table.columns:
            alias = table["alias_symbol"].fillna("").str.split(";").explode().str.strip()
            alias = alias[(alias != "") & ~alias.isin(set(symbols))]
            pairs = pd.DataFrame({"alias": alias.values, "symbol": symbols[alias.index].values})
            pairs = pairs.drop_duplicates()
            n_genes = pairs.groupby("alias")["symbol"].transform("size")
            unique = pairs[n_genes == 1]  # an alias of two genes says nothing
            alias_map = dict(zip(unique["alias"], unique["symbol"], strict=True))
        return cls(
            symbol_to_ensembl=sym_to_ens.to_dict(),
            alias_to_symbol=alias_map,
            ensembl_to_symbol=ens_to_sym.to_dict(),
            source=source,
        )

    def to_ensembl(self, names) -> np.ndarray:
        """(n,) symbols, aliases or Ensembl ids -> (n,) object Ensembl ids, None where unknown.

        Ensembl ids pass through with their version suffix stripped.
        """
        out = np.empty(len(names), dtype=object)
        for i, raw in enumerate(names):
            name = str(raw).strip()
            if _ENSEMBL_RE.match(name):
                out[i] = strip_version(name)
                continue
            sym = name if name in self.symbol_to_ensembl else self.alias_to_symbol.get(name)
            out[i] = self.symbol_to_ensembl.get(sym) if sym is not None else None
        return out

    def to_symbol(self, ids) -> np.ndarray:
        """(n,) Ensembl ids (or symbols/aliases) -> (n,) object official symbols, None where unknown."""
        out = np.empty(len(ids), dtype=object)
        for i, raw in enumerate(ids):
            name = str(raw).strip()
            if _ENSEMBL_RE.match(name):
                out[i] = self.ensembl_to_symbol.get(strip_version(name))
            elif name in self.symbol_to_ensembl:
                out[i] = name
            else:
                out[i] = self.alias_to_symbol.get(name)
        return out


@cache
def _bundled_idmap() -> GeneIdMap:
    with data_path("genes", "human_genes.ncbi2022.tsv.gz").open("rb") as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str, compression="gzip")
    return GeneIdMap.from_table(table, source="bundled NCBI human genes 2022")


def sum_columns_by_label(X: sp.spmatrix, labels) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Sum the count columns that share a label.

    X (N, G) sparse raw counts, labels (G,) -> (N, K) CSR sums, the K distinct labels in order of
    first appearance, and (G,) the output column of each input column.
    """
    codes, uniq = pd.factorize(pd.Series(np.asarray(labels, dtype=object).reshape(-1)))
    agg = sp.csr_matrix(  # (G, K): A[j, k] = 1 when column j carries label k
        (np.ones(len(codes), dtype=X.dtype), (np.arange(len(codes)), codes)),
        shape=(len(codes), len(uniq)),
    )
    summed = (X @ agg).tocsr()
    summed.sort_indices()
    return summed, np.asarray(uniq, dtype=object), codes


def gene_ids_in_space(
    names, to: str, *, gene_ids=None, idmap: GeneIdMap | None = None
) -> np.ndarray:
    """(G,) names -> (G,) object ids in space ``to``, None where there is none (the rule of
    ``harmonise_counts``)."""
    if to not in GENE_ID_SPACES:
        raise InputError(f"unknown gene id space '{to}', expected one of {GENE_ID_SPACES}")
    names = np.array([str(g).strip() for g in np.asarray(names, dtype=object).reshape(-1)])
    is_ens = np.array([_ENSEMBL_RE.match(g) is not None for g in names], dtype=bool)
    target = np.full(len(names), None, dtype=object)
    if to == "ensembl":
        target[is_ens] = [strip_version(g) for g in names[is_ens]]
        rest = np.flatnonzero(~is_ens)
        if gene_ids is not None and len(gene_ids) != len(names):
            raise InputError(f"{len(gene_ids)} gene ids for {len(names)} gene names")
        if gene_ids is not None and len(rest):
            ids = np.array([strip_version(str(g).strip()) for g in np.asarray(gene_ids)[rest]])
            ok = np.array([_ENSEMBL_RE.match(g) is not None for g in ids], dtype=bool)
            target[rest[ok]], rest = ids[ok], rest[~ok]
        if len(rest):
            target[rest] = (idmap or GeneIdMap.bundled()).to_ensembl(names[rest])
    else:
        target[~is_ens] = names[~is_ens]
        if is_ens.any():
            target[is_ens] = (idmap or GeneIdMap.bundled()).to_symbol(names[is_ens])
    return target


def harmonise_counts(
    X: sp.spmatrix,
    names,
    *,
    to: str,
    gene_ids=None,
    idmap: GeneIdMap | None = None,
) -> tuple[sp.csr_matrix, np.ndarray, dict[str, int]]:
    """Map the columns of a raw-count matrix to one gene id space, summing duplicates.

    The one rule that training, evaluation, HVG selection and the demo share, so that a gene is
    the same gene everywhere: Ensembl ids lose their version; a name already in ``to`` is kept as
    it is (custom and non-human names survive); a symbol becomes an Ensembl id through the file's
    own ``gene_ids`` when given (exact, Space Ranger's ``var['gene_ids']``), else through the
    offline map (aliases too), and an Ensembl id becomes a symbol through the map; columns
    without an id are dropped; columns that land on one id are summed as raw counts (counts add,
    log1p values do not).

    Parameters
    ----------
    X : (N, G) sparse raw counts.
    names : (G,) column names: symbols, aliases or Ensembl ids, mixed freely.
    to : "ensembl" or "symbol".
    gene_ids : (G,) the file's Ensembl id per column, or None.
    idmap : the map to use; the bundled NCBI table by default (loaded only when needed).

    Returns
    -------
    X2 : (N, G2) CSR, column k the sum of the input columns mapping to ``names2[k]``.
    names2 : (G2,) object, unique target ids in order of first appearance.
    report : ``n_in`` (G), ``n_out`` (G2), ``n_unmapped`` (columns dropped), ``n_merged`` (mapped
        columns folded into another: mapped - G2).
    """
    X = sp.csr_matrix(X)
    target = gene_ids_in_space(names, to, gene_ids=gene_ids, idmap=idmap)
    if X.shape[1] != len(target):
        raise InputError(f"{X.shape[1]} count columns for {len(target)} gene names")
    mapped = np.flatnonzero(pd.notna(target))
    X2, names2, _ = sum_columns_by_label(X[:, mapped], target[mapped])  # (N, G2)
    report = {
        "n_in": len(names),
        "n_out": len(names2),
        "n_unmapped": len(names) - len(mapped),
        "n_merged": len(mapped) - len(names2),
    }
    return X2, np.asarray(names2, dtype=object), report


def panel_counts(
    X: sp.spmatrix,
    names,
    panel_genes,
    *,
    gene_ids=None,
    idmap: GeneIdMap | None = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The truth matrix of a slide for a panel: raw counts of the panel genes the slide measured.

    X (N, G) raw counts named ``names`` (G,), ``gene_ids`` as in ``harmonise_counts``;
    ``panel_genes`` (P,) unique panel (or prediction) gene names, whose id space decides the
    slide's. Returns (N, K) CSR raw counts and (K,) int64 panel columns, increasing.
    """
    panel_genes = pd.Index(np.asarray(panel_genes, dtype=str))
    if not panel_genes.is_unique:
        raise InputError(f"duplicate gene '{panel_genes[panel_genes.duplicated()][0]}' in panel")
    space = "ensembl" if looks_like_ensembl(panel_genes) else "symbol"
    target = gene_ids_in_space(names, space, gene_ids=gene_ids, idmap=idmap)
    pos = np.full(len(target), -1, dtype=np.int64)
    ok = np.flatnonzero(pd.notna(target))
    pos[ok] = panel_genes.get_indexer(target[ok].astype(str))
    used = np.flatnonzero(pos >= 0)  # only these columns are copied: a whole-slide HD matrix is big
    counts, cols, _ = sum_columns_by_label(sp.csr_matrix(X)[:, used], pos[used])
    order = np.argsort(cols.astype(np.int64), kind="stable")
    return counts[:, order].tocsr(), cols[order].astype(np.int64)
