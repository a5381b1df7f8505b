"""Whole-slide inference: run directory + cohort -> ``PRED/{id}.h5ad`` (DESIGN.md "Outputs").

The head is computed in gene chunks and streamed into the file, so peak memory holds the trunk
activations (N x H) and one chunk (N x chunk), never several N x G copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from . import __version__, keys
from .baselines import BASELINES, load_baseline
from .checkpoint import check_encoder, load_run
from .cohort import Cohort, Slide
from .errors import InputError
from .genes import GENESET_COLLECTIONS, GenePanel, gpc_genesets, looks_like_ensembl
from .io import atomic_path
from .model import HistoPrism, ModelConfig
from .progress import progress_bar
from .tensors import CancerVocabulary, to_tensors

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 2**20  # one (N, chunk) float32 block of the output


@dataclass
class HistoPrismPredictor:
    """A trained HistoPrism with the prepare / predict_genes interface of the baselines."""

    model: HistoPrism
    vocab: CancerVocabulary

    def prepare(self, slide: Slide, *, unknown_cancer: bool = False) -> torch.Tensor:
        """Run everything up to the last layer once: (N, H)."""
        cfg = self.model.cfg
        t = to_tensors(
            slide,
            vocab=self.vocab,
            in_dim=cfg.in_dim,
            neighbours=cfg.neighbours,
            unknown_cancer=unknown_cancer,
        )
        with torch.no_grad():
            return self.model.trunk(**t.model_inputs())[0]

    def predict_genes(self, prepared: torch.Tensor, cols: slice) -> np.ndarray:
        """(N, len(cols)) float32 predicted log1p for the panel columns ``cols``."""
        w, b = self.model.head_out.weight[cols], self.model.head_out.bias[cols]
        with torch.no_grad():
            return torch.addmm(b, prepared, w.T).numpy()


@dataclass
class Run:
    """A loaded run directory: what was trained, on which genes, cancers and encoder."""

    path: Path
    config: dict
    predictor: object
    panel: GenePanel
    vocab: CancerVocabulary

    @property
    def kind(self) -> str:
        return self.config["model"]


def load(run_dir: str | Path) -> Run:
    """Load a run directory written by ``train`` (any model kind)."""
    config, tensors = load_run(run_dir)
    panel = GenePanel(tuple(config["genes"]))
    vocab = CancerVocabulary(tuple(config["cancers"]))
    kind = config["model"]
    if kind == "histoprism":
        model = HistoPrism(ModelConfig(**config["model_config"]))
        model.load_state_dict(tensors)
        predictor = HistoPrismPredictor(model.eval(), vocab)
    elif kind in BASELINES:
        predictor = load_baseline(kind, config, tensors, panel=panel, vocab=vocab)
    else:
        raise InputError(f"unknown model kind '{kind}'", Path(run_dir) / keys.RUN_CONFIG)
    return Run(Path(run_dir), config, predictor, panel, vocab)


def pathway_membership(
    panel: GenePanel, genesets: dict[str, list[str]]
) -> tuple[list[str], np.ndarray]:
    """Sets with at least one panel gene and their (G, S) float32 membership matrix."""
    names, cols = [], []
    for name, genes in genesets.items():
        idx = panel.locate(genes)
        idx = idx[idx >= 0]
        if len(idx):
            names.append(name)
            cols.append(idx)
    M = np.zeros((len(panel), len(names)), dtype=np.float32)
    for j, idx in enumerate(cols):
        M[idx, j] = 1.0
    return names, M


def default_genesets(panel: GenePanel) -> dict[str, list[str]]:
    """The bundled GPC Hallmark + GO sets in the panel's naming (symbols or Ensembl ids)."""
    ids = "ensembl" if looks_like_ensembl(panel.genes) else "symbols"
    sets: dict[str, list[str]] = {}
    for collection in GENESET_COLLECTIONS:
        sets.update(gpc_genesets(collection, ids=ids))
    return sets


def predict_slide(
    run: Run,
    slide: Slide,
    path: str | Path,
    *,
    genesets: dict[str, list[str]] | None = None,
    unknown_cancer: bool = False,
    dtype: str = "float32",
) -> Path:
    """Predict one slide and write it as an h5ad (atomically).

    Writes ``X`` (N, G) predicted log1p(counts), ``obs_names`` barcodes, ``obsm['spatial']`` (N, 2)
    level-0 px, ``obs['oncotree_code']`` (condition used), ``obsm['pathways']`` (N, S) DataFrame of
    pathway activity (mean z-scored predicted log1p of the set's genes), ``uns['histoprism']``.
    """
    prepared = run.predictor.prepare(slide, unknown_cancer=unknown_cancer)
    names, M = pathway_membership(
        run.panel, genesets if genesets is not None else default_genesets(run.panel)
    )
    n, g = slide.n_spots, len(run.panel)
    chunk = max(1, min(g, CHUNK_BYTES // (4 * n)))
    pathways = np.zeros((n, len(names)), dtype=np.float64)
    used = run.vocab.codes[run.vocab.index(slide.cancer, fallback=unknown_cancer)]
    with atomic_path(path) as tmp:
        _skeleton(run, slide, used).write_h5ad(tmp)
        with h5py.File(tmp, "a") as f:
            X = f.create_dataset(
                "X", shape=(n, g), dtype=dtype, chunks=(min(n, 1024), min(g, 1024))
            )
            X.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
            for start in range(0, g, chunk):
                cols = slice(start, min(start + chunk, g))
                block = run.predictor.predict_genes(prepared, cols)  # (N, chunk)
                X[:, cols] = block.astype(dtype)
                pathways += _zscore(block) @ M[cols]  # (N, S) running sum over set genes
            pathways /= np.maximum(M.sum(0), 1)
            frame = pd.DataFrame(pathways.astype(np.float32), index=slide.barcodes, columns=names)
            ad.io.write_elem(f["obsm"], keys.OBSM_PATHWAYS, frame)
    return Path(path)


def _zscore(block: np.ndarray) -> np.ndarray:
    """Per-gene z-score across the slide's spots; constant genes contribute 0."""
    sd = block.std(0)
    return np.where(sd > 0, (block - block.mean(0)) / np.where(sd > 0, sd, 1), 0.0)


def _skeleton(run: Run, slide: Slide, cancer_used: str) -> ad.AnnData:
    """Everything of the output AnnData but X and the pathways (streamed in afterwards)."""
    obs = pd.DataFrame({keys.OBS_CANCER: cancer_used}, index=pd.Index(slide.barcodes.astype(str)))
    adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index(run.panel.genes)))
    adata.obsm[keys.OBSM_SPATIAL] = np.asarray(slide.coords, dtype=np.float64)
    adata.uns[keys.UNS_HISTOPRISM] = {
        "version": __version__,
        "model": run.kind,
        "model_id": run.path.resolve().name,
        "encoder": run.config["encoder"],
        "units": keys.UNITS_LOG1P,
        "cancer_requested": slide.cancer,
        "pixel_size_um": slide.pixel_size_um if slide.pixel_size_um else float("nan"),
    }
    return adata


def predict(
    model: str | Path,
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    split: str | Path | None = None,
    samples: str = "test",
    unknown_cancer: bool = False,
    dtype: str = "float32",
    progress: bool = True,
) -> list[Path]:
    """Predict the slides ``samples`` ('test', 'all' or comma-separated ids) of a cohort into ``out``.

    Slides with counts are aligned by barcode as in training; slides without counts (never
    sequenced) are predicted from their embeddings alone. Returns the written paths.
    """
    run = load(model)
    check_encoder(run.config, encoder, run_dir=model)
    cohort = Cohort(data, split_dir=split)
    ids = _sample_ids(cohort, samples)
    genesets = default_genesets(run.panel)
    written = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("predicting", total=len(ids), info="")
        for sample_id in ids:
            # sequenced slides keep the barcodes and spot centres of their counts file
            slide = cohort.slide(sample_id, encoder, counts=cohort.st_path(sample_id).exists())
            written.append(
                predict_slide(
                    run,
                    slide,
                    Path(out) / f"{sample_id}.h5ad",
                    genesets=genesets,
                    unknown_cancer=unknown_cancer,
                    dtype=dtype,
                )
            )
            bar.update(task, advance=1, info=sample_id)
    return written


def _sample_ids(cohort: Cohort, samples: str) -> list[str]:
    if samples in ("test", "train", "val"):
        return cohort.ids(samples)
    if samples == "all":
        return cohort.ids()
    ids = [s.strip() for s in samples.split(",") if s.strip()]
    unknown = [i for i in ids if i not in cohort.metadata.index]
    if unknown:
        raise InputError(f"sample(s) not in metadata: {', '.join(unknown)}", cohort.root)
    return ids
