"""A cohort directory (docs/formats.md) -> ``Slide`` records with spots aligned across files."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

from .._core import keys
from .._core.errors import InputError, first_line
from .._core.names import check_name
from ..expression.genes import GeneIdMap, harmonise_counts, panel_counts
from .readers import EmbeddingFile, read_embeddings, read_st
from .readers.hest import hest_pixel_size, read_hest_metadata

log = logging.getLogger(__name__)


@dataclass
class Slide:
    """One slide; row i of every per-spot array is the same spot.

    features: (N, D) float32 patch embeddings.  coords: (N, 2) float64 spot centres, level-0 pixels
    (x, y).  pixel_size_um: µm per level-0 pixel (None if unknown).  counts: (N, G_s) float32 CSR raw
    counts of the measured ``genes`` (G_s,), or None for a slide that was never sequenced.
    """

    id: str
    cancer: str
    barcodes: np.ndarray
    features: np.ndarray
    coords: np.ndarray
    pixel_size_um: float | None = None
    genes: np.ndarray | None = None
    counts: sp.csr_matrix | None = None
    meta: dict = field(default_factory=dict)
    gene_ids: np.ndarray | None = None  # (G_s,) the counts file's var['gene_ids'] (Ensembl), if any
    array_rc: np.ndarray | None = None  # (N, 2) int the counts file's obs array_row/array_col
    scalefactors: dict = field(default_factory=dict)  # the counts file's Space Ranger scale factors

    @property
    def n_spots(self) -> int:
        return len(self.barcodes)

    @property
    def coords_um(self) -> np.ndarray:
        """(N, 2) spot centres in µm (pixels if the pixel size is unknown)."""
        return self.coords * (self.pixel_size_um or 1.0)

    def in_gene_space(self, space: str, idmap: GeneIdMap | None = None) -> Slide:
        """This slide with its counts named by ``space`` ids ('ensembl' or 'symbol') by
        ``genes.harmonise_counts``, the rule evaluation uses too: versions stripped, the file's
        own ``gene_ids`` first, raw counts of columns that land on one id summed before any log1p.
        """
        if self.counts is None:
            return self
        X, names, report = harmonise_counts(
            self.counts, self.genes, to=space, gene_ids=self.gene_ids, idmap=idmap
        )
        if report["n_unmapped"]:
            log.info(
                "%s: %d of %d genes have no %s id",
                self.id,
                report["n_unmapped"],
                report["n_in"],
                space,
            )
        return replace(self, genes=names.astype(str), counts=X, gene_ids=None)

    def log1p_counts(self) -> np.ndarray:
        """(N, G_s) float32 dense log1p(raw counts): the regression target."""
        if self.counts is None:
            raise InputError(f"slide {self.id} has no counts")
        return np.log1p(self.counts.toarray())


def file_gene_ids(st: ad.AnnData) -> np.ndarray | None:
    """(G,) str: a counts file's own Ensembl id per gene (``var['gene_ids']``), or None."""
    return st.var[keys.VAR_GENE_IDS].to_numpy().astype(str) if keys.VAR_GENE_IDS in st.var else None


@dataclass(frozen=True)
class Alignment:
    """Which rows of the counts file and of the embedding file are the same spot."""

    st_rows: np.ndarray  # (M,) int64 rows of the h5ad, increasing
    emb_rows: np.ndarray  # (M,) int64 matching rows of the embedding file
    st_unmatched: int  # spots with counts but no embedding (dropped)
    emb_unmatched: int  # embeddings with no counts (dropped)
    by: str  # "barcode" or "position"


def align_by_barcode(
    pred_barcodes, st_barcodes, *, path: Path | None = None, what: str = "prediction"
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a per-spot file (``what``: a prediction, embeddings) and of the counts file that
    hold the same spot: the one barcode match of training, prediction and evaluation.

    Returns (rows, st_rows), both (M,) int64, ``st_rows`` increasing. Either side may hold extra
    spots, in any order. Raises ``InputError`` on duplicate barcodes in ``pred_barcodes`` or when
    no barcode matches.
    """
    index = pd.Index(np.asarray(pred_barcodes, dtype=str))
    if index.has_duplicates:
        raise InputError(f"duplicate barcode '{index[index.duplicated()][0]}' in {what}", path)
    pos = index.get_indexer(np.asarray(st_barcodes, dtype=str))
    st_rows = np.flatnonzero(pos >= 0)
    if len(st_rows) == 0:
        raise InputError(f"no barcode of the {what} matches a spot of the measured slide", path)
    return pos[st_rows].astype(np.int64), st_rows.astype(np.int64)


def truth_counts(st: ad.AnnData, genes) -> tuple[sp.csr_matrix, np.ndarray]:
    """Raw counts (N, K) of a counts file for the predicted ``genes`` (G,) it measured, and their
    (K,) columns in ``genes``: ``genes.panel_counts``, the rule training builds its targets by
    (an Ensembl prediction on symbol slides maps through ``var['gene_ids']`` or the offline map)."""
    return panel_counts(st.X, st.var_names, genes, gene_ids=file_gene_ids(st))


def align_spots(
    st_barcodes: np.ndarray, st_coords: np.ndarray, emb: EmbeddingFile, *, path: Path | None = None
) -> Alignment:
    """Match spots of a counts file to rows of an embedding file, by barcode or else by position.

    Barcodes may come in any order and either side may hold extra spots. Without barcodes, each
    spot takes the embedding whose centre is nearest, if within half the spot spacing.
    """
    if emb.barcodes is not None:
        emb_rows, st_rows = align_by_barcode(
            emb.barcodes, st_barcodes, path=path, what="embeddings"
        )
        by = "barcode"
    else:
        pos, by = _match_by_position(st_coords, emb.coords), "position"
        st_rows = np.flatnonzero(pos >= 0)
        if len(st_rows) == 0:
            raise InputError("no spot of the counts file matches an embedding (position)", path)
        emb_rows = pos[st_rows]
    return Alignment(
        st_rows=st_rows,
        emb_rows=emb_rows,
        st_unmatched=len(st_barcodes) - len(st_rows),
        emb_unmatched=len(emb.features) - len(st_rows),
        by=by,
    )


def _match_by_position(st_coords: np.ndarray, emb_coords: np.ndarray) -> np.ndarray:
    """(N,) index of the embedding nearest each spot centre, -1 beyond half the spot spacing."""
    if len(st_coords) > 1:
        d_nn, _ = cKDTree(st_coords).query(st_coords, k=2)
        spacing = float(np.median(d_nn[:, 1]))
    else:
        spacing = np.inf
    dist, idx = cKDTree(emb_coords).query(st_coords, k=1)
    idx = np.where(dist <= spacing / 2, idx, -1)
    # one embedding may serve one spot only: keep the closest claim
    order = np.argsort(dist)
    taken = np.zeros(len(emb_coords), dtype=bool)
    out = np.full(len(st_coords), -1, dtype=np.int64)
    for i in order[idx[order] >= 0]:
        if not taken[idx[i]]:
            taken[idx[i]] = True
            out[i] = idx[i]
    return out


class Cohort:
    """A cohort directory: metadata, counts, embeddings and splits.

    Layout: docs/formats.md, "Cohort directory".

    ``split_dir`` overrides ``root/splits``; without either, slides are split by patient (70/15/15,
    ``seed``; every command uses the default, so that they agree) so that no patient is in two
    splits.
    """

    def __init__(self, root: str | Path, *, split_dir: str | Path | None = None, seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError("cohort directory not found", self.root)
        self.metadata = _read_metadata(self.root)
        if split_dir is not None and not Path(split_dir).is_dir():
            raise InputError("split directory not found", split_dir)
        self.splits, self._split_tables = _read_splits(
            Path(split_dir) if split_dir else self.root / keys.SPLITS_DIR
        )
        self._fill_cancer_codes()
        if not self.splits:
            self.splits = _split_by_patient(self.metadata.loc[self.available_ids()], seed=seed)

    # --- paths -------------------------------------------------------------------------------
    def st_path(self, sample_id: str) -> Path:
        return self.root / keys.ST_DIR / f"{sample_id}.h5ad"

    def embedding_path(self, sample_id: str, encoder: str) -> Path:
        """``embeddings/{encoder}/{id}.h5``, or the HistoPrism repository's ``{id}_embeddings.pt``
        when only that exists."""
        folder = self.root / keys.EMBEDDINGS_DIR / encoder
        h5, pt = folder / f"{sample_id}.h5", folder / f"{sample_id}{keys.TORCH_EMBEDDINGS_SUFFIX}"
        return pt if pt.exists() and not h5.exists() else h5

    def patches_path(self, sample_id: str) -> Path:
        """HEST ``patches/{id}.h5`` (may not exist)."""
        return self.root / keys.PATCHES_DIR / f"{sample_id}.h5"

    def wsi_path(self, sample_id: str) -> Path | None:
        """The slide's image: the metadata's ``wsi_path`` (set by ``import --image``), else
        ``wsis/{id}.*`` with a known image suffix; None when there is none."""
        if keys.META_WSI in self.metadata.columns and sample_id in self.metadata.index:
            given = str(self.metadata.at[sample_id, keys.META_WSI]).strip()
            if given and given.lower() != "nan":
                path = Path(given) if Path(given).is_absolute() else self.root / given
                if not path.exists():
                    raise InputError(f"image of sample '{sample_id}' not found", path)
                return path
        for suffix in keys.WSI_SUFFIXES:
            path = self.root / keys.WSI_DIR / f"{sample_id}{suffix}"
            if path.exists():
                return path
        return None

    def available_ids(self) -> list[str]:
        """Metadata ids that have a counts file or an embedding file."""
        have = {p.stem for p in (self.root / keys.ST_DIR).glob("*.h5ad")}
        emb = self.root / keys.EMBEDDINGS_DIR
        have |= {p.stem for p in emb.glob("*/*.h5") if not p.name.startswith(".")}  # not partials
        have |= {p.name.removesuffix(keys.TORCH_EMBEDDINGS_SUFFIX) for p in emb.glob("*/*.pt")}
        return [i for i in self.metadata.index if i in have]

    def select(self, samples: str, *, among: Sequence[str] | None = None) -> list[str]:
        """The ids ``--samples`` names, one rule for every command: 'all' (the ids in ``among``,
        else every available id), a split ('train', 'val', 'test'), or comma-separated ids, each
        checked against the metadata."""
        if samples == "all":
            return list(among) if among is not None else self.ids()
        if samples in keys.SPLIT_NAMES:
            return self.ids(samples)
        return self.listed_ids(samples)

    def listed_ids(self, samples: str) -> list[str]:
        """Comma-separated sample ids (``--samples A,B``), each checked against the metadata."""
        ids = list(dict.fromkeys(s.strip() for s in samples.split(",") if s.strip()))
        for i in ids:
            check_name(i, what="sample id in --samples")
        unknown = [i for i in ids if i not in self.metadata.index]
        if unknown:
            raise InputError(f"sample(s) not in metadata: {', '.join(unknown)}", self.root)
        return ids

    def ids(self, split: str | None = None) -> list[str]:
        """Sample ids of one split ('train', 'val', 'test'), or all available ids."""
        if split is None:
            return self.available_ids()
        if split not in self.splits:
            raise InputError(f"no '{split}' split (have: {', '.join(self.splits) or 'none'})")
        return list(self.splits[split])

    def cancer(self, sample_id: str) -> str:
        """The slide's cancer code; empty codes were filled (oncotree_code_filled, else Unknown)."""
        if sample_id not in self.metadata.index:
            raise InputError(f"sample '{sample_id}' not in metadata", self.root)
        return str(self.metadata.at[sample_id, keys.META_CANCER])

    def pixel_size_um(self, sample_id: str) -> float | None:
        """µm per level-0 pixel: the metadata table's ``pixel_size_um_embedded`` (else
        ``_estimated``), else HEST's ``metadata/{id}.json``; None when neither says."""
        for col in keys.META_PIXEL_SIZE:
            if col in self.metadata.columns and sample_id in self.metadata.index:
                v = pd.to_numeric(self.metadata.at[sample_id, col], errors="coerce")
                if np.isfinite(v) and v > 0:
                    return float(v)
        sidecar = self.root / keys.HEST_METADATA_DIR / f"{sample_id}.json"
        return hest_pixel_size(read_hest_metadata(sidecar)) if sidecar.exists() else None

    # --- slides ------------------------------------------------------------------------------
    def slide(self, sample_id: str, encoder: str, *, counts: bool = True) -> Slide:
        """Load one slide with spots aligned across the counts and embedding files.

        With ``counts=False`` (or no counts file) the slide holds only embeddings: prediction for
        slides that were never sequenced.
        """
        emb = read_embeddings(self.embedding_path(sample_id, encoder))
        meta = self.metadata.loc[sample_id].to_dict() if sample_id in self.metadata.index else {}
        common = dict(
            id=sample_id,
            cancer=self.cancer(sample_id),
            pixel_size_um=self.pixel_size_um(sample_id),
            meta=meta,
        )
        st_path = self.st_path(sample_id)
        if not counts or not st_path.exists():
            if counts:
                raise InputError("counts file not found", st_path)
            if not np.isfinite(emb.coords).all():
                raise InputError(
                    "no spot positions (the file has no coords) and no counts file to take them "
                    "from: a slide that was never sequenced needs coords",
                    emb.path,
                )
            barcodes = emb.barcodes if emb.barcodes is not None else _spot_names(len(emb.features))
            return Slide(barcodes=barcodes, features=emb.features, coords=emb.coords, **common)
        adata = read_st(st_path)
        xy = adata.obsm[keys.OBSM_SPATIAL][:, :2]
        al = align_spots(adata.obs_names.to_numpy(), xy, emb, path=emb.path)
        if al.st_unmatched or al.emb_unmatched:
            log.warning(
                "%s: dropped %d spots without an embedding and %d embeddings without counts (by %s)",
                sample_id, al.st_unmatched, al.emb_unmatched, al.by,
            )  # fmt: skip
        return Slide(
            barcodes=adata.obs_names.to_numpy().astype(str)[al.st_rows],
            features=emb.features[al.emb_rows],
            coords=xy[al.st_rows],
            genes=adata.var_names.to_numpy().astype(str),
            counts=adata.X[al.st_rows],
            gene_ids=file_gene_ids(adata),
            array_rc=_array_rc(adata, al.st_rows),
            scalefactors=_scalefactors(adata),
            **common,
        )

    def _fill_cancer_codes(self) -> None:
        """Empty codes take ``oncotree_code_filled`` (metadata or split files), else 'Unknown'."""
        md = self.metadata
        code = md[keys.META_CANCER].astype("string").str.strip().replace("", pd.NA)
        filled = self._filled_codes()
        code = code.fillna(pd.Series(filled, dtype="string")).fillna(keys.UNKNOWN_CANCER)
        md[keys.META_CANCER] = code.astype(str)

    def _filled_codes(self) -> dict[str, str]:
        filled: dict[str, str] = {}
        for df in [self.metadata.reset_index(drop=True), *self._split_tables]:
            if keys.META_CANCER_FILLED in df.columns:
                idcol = keys.META_ID if keys.META_ID in df.columns else keys.SPLIT_ID
                ok = df[keys.META_CANCER_FILLED].notna() & (df[keys.META_CANCER_FILLED] != "")
                filled.update(
                    zip(
                        df.loc[ok, idcol].astype(str),
                        df.loc[ok, keys.META_CANCER_FILLED],
                        strict=True,
                    )
                )
        return filled


def _array_rc(st: ad.AnnData, rows: np.ndarray) -> np.ndarray | None:
    """(N, 2) int the spots' grid row and column (Space Ranger's array_row/col), None if absent."""
    if not {keys.OBS_ARRAY_ROW, keys.OBS_ARRAY_COL} <= set(st.obs.columns):
        return None
    rc = st.obs[[keys.OBS_ARRAY_ROW, keys.OBS_ARRAY_COL]].to_numpy()[rows]
    return rc.astype(np.int64) if np.isfinite(rc.astype(float)).all() else None


def _scalefactors(st: ad.AnnData) -> dict:
    """The scale factors of the counts file's (first) ``uns['spatial']`` library, or {}."""
    libraries = st.uns.get("spatial", {})
    for library in libraries.values() if isinstance(libraries, dict) else ():
        if isinstance(library, dict) and isinstance(library.get("scalefactors"), dict):
            return {k: float(v) for k, v in library["scalefactors"].items()}
    return {}


def _spot_names(n: int) -> np.ndarray:
    return np.array([f"spot{i}" for i in range(n)], dtype=object)


def metadata_path(root: Path) -> Path | None:
    """The cohort's metadata table: the first of metadata.csv / HEST_v1_1_0.csv that exists."""
    return next((root / n for n in keys.METADATA_FILES if (root / n).exists()), None)


def _read_metadata(root: Path) -> pd.DataFrame:
    path = metadata_path(root)
    if path is None:
        raise InputError(f"no {' or '.join(keys.METADATA_FILES)} in cohort", root)
    md = read_table(path, id_column=keys.META_ID, required=(keys.META_ID, keys.META_CANCER))
    dup = md[keys.META_ID][md[keys.META_ID].duplicated()]
    if len(dup):
        raise InputError(f"duplicate sample id '{dup.iloc[0]}'", path)
    return md.set_index(keys.META_ID, drop=False)


# pandas' default missing-value tokens, applied to every column but the id: an id 'NA' or 'null'
# is a name (a sample may be called that), whereas an empty pixel size is missing
NA_TOKENS = ("", "#N/A", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "<NA>")


def read_table(
    path: Path, *, id_column: str | tuple[str, ...], required: tuple[str, ...] = ()
) -> pd.DataFrame:
    """A UTF-8 CSV table whose id column (the first of ``id_column`` present) is read as text,
    stripped and checked to be names (``names.check_name``); InputError naming the file, and the
    row for a bad id, on anything else."""
    try:
        header = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
        idcols = (id_column,) if isinstance(id_column, str) else id_column
        idcol = next((c for c in idcols if c in header), None)
        na = {c: list(NA_TOKENS) for c in header if c != idcol}
        with warnings.catch_warnings():  # a row longer than the header: refuse, not truncate
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(
                path,
                encoding="utf-8-sig",
                index_col=False,  # never take the first column as an index, whatever the row
                dtype={c: str for c in (idcol, keys.META_CANCER) if c in header},
                keep_default_na=False,
                na_values=na,
            )
    except UnicodeDecodeError as exc:
        raise InputError(
            f"not UTF-8 text (byte {exc.object[exc.start]:#x} at offset {exc.start}): "
            "save the table as UTF-8",
            path,
        ) from exc
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError, OSError) as exc:
        raise InputError(f"cannot read as CSV ({first_line(exc)})", path) from exc
    for col in (*required, idcols[0] if idcol is None else idcol):
        if col not in df.columns:
            raise InputError(f"missing required column '{col}'", path)
    df[idcol] = df[idcol].str.strip()
    for row, value in enumerate(df[idcol], start=2):  # row 1 is the header
        check_name(value, what=f"{idcol} on line {row}", path=path)
    return df


def _read_splits(split_dir: Path) -> tuple[dict[str, list[str]], list[pd.DataFrame]]:
    """{split: ids} and the raw split tables (they may carry ``oncotree_code_filled``)."""
    splits: dict[str, list[str]] = {}
    tables: list[pd.DataFrame] = []
    for name in keys.SPLIT_NAMES:
        path = split_dir / f"{name}_split.csv"
        if not path.exists():
            continue
        df = read_table(path, id_column=(keys.SPLIT_ID, keys.META_ID))
        idcol = keys.SPLIT_ID if keys.SPLIT_ID in df.columns else keys.META_ID
        df = df.rename(columns={idcol: keys.SPLIT_ID})
        dup = df[keys.SPLIT_ID][df[keys.SPLIT_ID].duplicated()]
        if len(dup):
            raise InputError(f"sample id '{dup.iloc[0]}' listed twice", path)
        splits[name] = df[keys.SPLIT_ID].tolist()
        tables.append(df)
    if split_dir.exists() and not splits and split_dir.name != keys.SPLITS_DIR:
        raise InputError("no train/val/test_split.csv in split directory", split_dir)
    return splits, tables


def _split_by_patient(md: pd.DataFrame, *, seed: int) -> dict[str, list[str]]:
    """70/15/15 split of slides by patient (a patient's slides stay together)."""
    patient = md.get(keys.META_PATIENT, pd.Series(md.index, index=md.index))
    patient = patient.fillna(pd.Series(md.index, index=md.index)).astype(str)
    groups = np.array(sorted(set(patient)))
    np.random.default_rng(seed).shuffle(groups)
    n = len(groups)
    n_test = max(1, round(0.15 * n))
    n_val = max(1, round(0.15 * n)) if n >= 3 else 0
    part = {
        "test": set(groups[:n_test]),
        "val": set(groups[n_test : n_test + n_val]),
    }
    out = {"train": [], "val": [], "test": []}
    for sid, p in patient.items():
        split = "test" if p in part["test"] else "val" if p in part["val"] else "train"
        out[split].append(str(sid))
    return out
