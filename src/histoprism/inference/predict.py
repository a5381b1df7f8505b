"""Whole-slide inference: run directory + cohort -> ``PRED/{id}.h5ad``.

Output layout: docs/formats.md, "PRED: predictions".

Memory is linear in the number of spots N and never holds N x G: the trunk runs its per-spot layers
in blocks of spots and attention locally above ``full_attention_max_spots`` (model.py); the head
is computed in (spots x genes) tiles streamed straight into the file. HistoPrism's pathway scores
come in closed form from the trunk output (its head is linear), so X is written in one pass.
Under torchrun, each rank predicts its share of the slides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from .._core import keys
from .._core.distributed import local_device, rank_share
from .._core.errors import InputError, first_line
from .._core.files import atomic_path, directory_lock, remove_partials
from .._core.names import child
from .._core.progress import progress_bar
from .._core.storage import check_room, output_dir
from .._core.version import __version__
from ..expression.genes import GeneIdMap, GenePanel
from ..expression.pathways import (
    default_genesets,
    linear_head_scores,
    panel_membership,
    zscore_columns,
)
from ..io.cohort import Cohort, Slide
from ..io.rundir import check_encoder, load_run
from ..io.spatial import spatial_uns
from ..models.cancer_type import CLASSIFIER_FILE, CancerTypeClassifier
from ..models.inputs import CancerVocabulary, input_options, to_tensors
from ..models.network import HistoPrism, ModelConfig
from ..models.registry import Predictor, model_kind

if TYPE_CHECKING:
    from .uncertainty import Uncertainty

log = logging.getLogger(__name__)
CHUNK_BYTES = 256 * 2**20  # most float32 output held at once: one block of (spots, genes)
# HistoPrism's head block, and the HDF5 chunk width: a 2048 x 4096 float32 tile (32 MB) runs at
# ~90% of the machine's GEMM speed, where whole-column blocks of a large slide fall to ~50%
# (benchmarks/)
TILE_SPOTS, TILE_GENES = 2048, 4096
# what obsm['pathways'] holds: equal to decoupler's `waggr` (weights 1) scaled per set
PATHWAY_METHOD = "mean of per-gene z-scored predicted log1p over the set's genes"
OUTPUTS = ("auto", "dense", "factorised")
# auto: above this size of a dense X, write the factors instead (a 600,000-bin Visium HD slide
# is ~47 GB dense in float16 at 38,982 genes, ~0.6 GB factorised)
DENSE_MAX_BYTES = 4 * 2**30
H5_CHUNK_SPOTS = 256  # HDF5 chunk = (256 spots, <= TILE_GENES genes): 4 MB, whole-chunk writes


@dataclass
class HistoPrismPredictor:
    """A trained HistoPrism with the prepare / predict_genes interface of the baselines, plus
    spot ranges and the closed-form pathway scores of its linear head."""

    model: HistoPrism
    vocab: CancerVocabulary
    device: torch.device = torch.device("cpu")
    closed_form_pathways = True  # Predictor protocol: its head is linear (pathway_scores)

    def prepare(self, slide: Slide, *, unknown_cancer: bool = False) -> torch.Tensor:
        """Run everything up to the last layer once: (N, H) on the model's device."""
        cfg = self.model.cfg
        t = to_tensors(slide, vocab=self.vocab, unknown_cancer=unknown_cancer, **input_options(cfg))
        inputs = {k: v.to(self.device) for k, v in t.model_inputs().items() if v is not None}
        with torch.no_grad():
            return self.model.trunk(**inputs)[0]

    def predict_genes(
        self,
        prepared: torch.Tensor,
        cols: slice,
        rows: slice = slice(None),
        *,
        out: torch.Tensor | None = None,
    ) -> np.ndarray:
        """(len(rows), len(cols)) float32 predicted log1p for panel columns ``cols`` of spots
        ``rows``. ``out``: a reused (rows, cols) buffer on the device, which the result then
        shares on the CPU."""
        w, b = self.model.head_out.weight[cols], self.model.head_out.bias[cols]
        with torch.no_grad():
            block = torch.addmm(b, prepared[rows], w.T, out=out)
        return block.cpu().numpy()

    def linear_head(self) -> tuple[np.ndarray, np.ndarray]:
        """The head's (G, H) weight and (G,) bias, float32: X = max(h W' + b, 0)."""
        head = self.model.head_out
        return (
            head.weight.detach().float().cpu().numpy(),
            head.bias.detach().float().cpu().numpy(),
        )

    def pathway_scores(self, prepared: torch.Tensor, membership: np.ndarray) -> np.ndarray:
        """Mean z-scored prediction of each gene set's genes, in closed form from the trunk
        output (the head is linear): (N, H), (G, S) -> (N, S) float64."""
        head = self.model.head_out
        return linear_head_scores(prepared, head.weight, head.bias, membership)


@dataclass
class Run:
    """A loaded run directory: what was trained, on which genes, cancers and encoder."""

    path: Path
    config: dict
    predictor: Predictor
    panel: GenePanel
    vocab: CancerVocabulary

    @property
    def kind(self) -> str:
        return self.config["model"]


def load(
    run_dir: str | Path,
    *,
    attention: str | None = None,
    attention_radius_um: float | None = None,
    device: str | torch.device | None = None,
) -> Run:
    """Load a run directory written by ``train`` (any model kind).

    ``attention`` ("auto" | "full" | "local") and ``attention_radius_um`` override the trained
    HistoPrism's settings for prediction; ``device`` defaults to this rank's GPU, else the CPU.
    """
    config, tensors = load_run(run_dir)
    panel = GenePanel(tuple(config["genes"]))
    vocab = CancerVocabulary(tuple(config["cancers"]))
    try:
        kind = model_kind(config["model"])
    except InputError as exc:
        raise InputError(str(exc), Path(run_dir) / keys.RUN_CONFIG) from None
    try:
        predictor = kind.load_function()(
            config,
            tensors,
            panel=panel,
            vocab=vocab,
            device=torch.device(device) if device is not None else local_device(),
            overrides=dict(attention=attention, attention_radius_um=attention_radius_um),
        )
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        # a config or weights file that does not describe one network: the first line of torch's
        # or the config's complaint (a missing key, a size mismatch, an unknown setting)
        what = f"missing {exc}" if isinstance(exc, KeyError) else first_line(exc)
        raise InputError(f"config and weights do not form a model ({what})", run_dir) from exc
    return Run(Path(run_dir), config, predictor, panel, vocab)


def load_histoprism(
    config: dict,
    tensors: dict,
    *,
    panel: GenePanel,
    vocab: CancerVocabulary,
    device: torch.device,
    overrides: dict,
    **_,
) -> HistoPrismPredictor:
    """The registry's load for ``histoprism``: the saved network, with the prediction-time
    ``overrides`` (attention mode and radius; None keeps the trained setting) on ``device``."""
    cfg = ModelConfig(**config["model_config"])  # settings added since: their defaults
    try:
        cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if cfg.n_genes != len(panel) or cfg.n_conditions != len(vocab.codes):
        raise ValueError(
            f"the network predicts {cfg.n_genes} genes for {cfg.n_conditions} cancer codes; "
            f"the config lists {len(panel)} genes and {len(vocab.codes)} codes"
        )
    model = HistoPrism(cfg)
    model.load_state_dict(tensors)
    return HistoPrismPredictor(model.eval().to(device), vocab, device)


def predict_slide(
    run: Run,
    slide: Slide,
    path: str | Path,
    *,
    genesets: dict[str, list[str]] | None = None,
    unknown_cancer: bool = False,
    dtype: str = "float32",
    image: str | Path | None = None,
    output: str = "auto",
    uncertainty: Uncertainty | None = None,
) -> Path:
    """Predict one slide and write it as an h5ad (atomically).

    Writes ``X`` (N, G) predicted log1p(counts), >= 0, ``obs_names`` barcodes, ``obsm['spatial']``
    (N, 2) level-0 px, ``obs['oncotree_code']`` (condition used), ``obsm['pathways']`` (N, S)
    DataFrame of pathway activity (mean z-scored predicted log1p of the set's genes) and the same
    scores as ``obs`` columns named by set, ``var['gene_ids'/'gene_symbols']``,
    ``uns['spatial'][slide.id]`` (tissue images of ``image``, scale factors: what scanpy and
    squidpy draw with) and ``uns['histoprism']``. ``output`` 'factorised' writes the last hidden
    layer and the linear head instead of X (``prediction.read_prediction`` multiplies them out);
    'auto' does so when a dense X would pass ``DENSE_MAX_BYTES``. ``uncertainty``
    (``uncertainty.load_uncertainty``): X is the members' mean, plus ``layers`` 'sd', 'q025',
    'q10', 'q90', 'q975' and ``obsm['pathways_sd']`` (dense output only).
    """
    predictor = run.predictor
    n, g = slide.n_spots, len(run.panel)
    if uncertainty is None:
        factorised = _factorised(output, predictor, n * g * np.dtype(dtype).itemsize)
        prepared = predictor.prepare(slide, unknown_cancer=unknown_cancer)
    else:
        factorised = uncertainty.check_output(output, n * g * np.dtype(dtype).itemsize)
        prepared = uncertainty.prepare(slide, unknown_cancer=unknown_cancer)
    hidden = getattr(prepared, "hidden", prepared)  # a prompted slide keeps its trunk output
    if isinstance(hidden, torch.Tensor) and not torch.isfinite(hidden).all():
        raise InputError(
            "the model's last hidden layer is not finite on this slide: its embeddings lie "
            "far outside what the model was trained on (another encoder, or unnormalised?)",
            path,
        )
    names, M = panel_membership(
        run.panel, genesets if genesets is not None else default_genesets(run.panel)
    )
    used = run.vocab.codes[run.vocab.index(slide.cancer, fallback=unknown_cancer)]
    if used != slide.cancer:
        log.warning(
            "%s: cancer code '%s' unknown to the model: 'Unknown' token", slide.id, slide.cancer
        )
    skeleton = _skeleton(run, slide, used, image=image)
    if factorised:
        weight, bias = predictor.linear_head()
        skeleton.var[keys.VAR_HEAD_BIAS] = bias
    skeleton.uns[keys.UNS_HISTOPRISM]["output"] = "factorised" if factorised else "dense"
    if hasattr(predictor, "spot_columns"):  # a prompted predictor: which spots were measured
        for name, values in predictor.spot_columns(prepared).items():
            skeleton.obs[name] = values
        skeleton.uns[keys.UNS_HISTOPRISM]["prompt"] = predictor.info
    if uncertainty is not None:
        skeleton.uns[keys.UNS_HISTOPRISM]["uncertainty"] = uncertainty.info()
    item = np.dtype(dtype).itemsize
    layers = 0 if uncertainty is None else 1 + len(keys.LAYER_BOUNDS)  # sd and the interval bounds
    payload = n * prepared.shape[-1] * item + weight.nbytes if factorised else n * g * item
    check_room(path, _output_bytes(payload * (1 + layers), n, len(names), layers))
    with atomic_path(path) as tmp:
        skeleton.write_h5ad(tmp, compression="gzip")  # the images; arrays read often: raw
        with h5py.File(tmp, "a") as f:
            if factorised:
                hidden = prepared.cpu().numpy().astype(dtype, copy=False)
                ad.io.write_elem(f["obsm"], keys.OBSM_HIDDEN, hidden)
                ad.io.write_elem(f["varm"], keys.VARM_HEAD, weight)
                pathways = predictor.pathway_scores(prepared, M)  # (N, S)
            elif uncertainty is not None:
                pathways, pw_sd = uncertainty.write_dense(prepared, f, (n, g), dtype, M)
                sd = pd.DataFrame(pw_sd.astype(np.float32), index=slide.barcodes, columns=names)
                ad.io.write_elem(f["obsm"], keys.OBSM_PATHWAYS_SD, sd)
            else:
                pathways = _write_dense(predictor, prepared, f, (n, g), dtype, M)
            frame = pd.DataFrame(pathways.astype(np.float32), index=slide.barcodes, columns=names)
            ad.io.write_elem(f["obsm"], keys.OBSM_PATHWAYS, frame)
            # by name too, where scanpy's and squidpy's color= looks (set names are not genes)
            del f["obs"]
            named = frame.drop(columns=skeleton.obs.columns, errors="ignore")
            obs = pd.concat([skeleton.obs, named.set_axis(skeleton.obs.index)], axis=1)
            ad.io.write_elem(f, "obs", obs)
    return Path(path)


def _output_bytes(payload: int, n: int, n_sets: int, layers: int) -> int:
    """Least bytes of what ``predict_slide`` writes uncompressed: ``payload`` (X and its
    ``layers`` extra layers, or the hidden layer and head) and the (n, n_sets) float32 pathway
    scores (obsm and obs, and their sd with layers). The lower bound ``check_room`` wants."""
    return payload + n * n_sets * 4 * (3 if layers else 2)


def _factorised(output: str, predictor: Predictor, dense_bytes: int) -> bool:
    """Whether to write the factors rather than X; factors need a linear head."""
    check_output(output)
    linear = predictor.closed_form_pathways
    if output == "factorised" and not linear:
        raise InputError("--output factorised needs a model with a linear head (histoprism)")
    return linear and (
        output == "factorised" or (output == "auto" and dense_bytes > DENSE_MAX_BYTES)
    )


def check_output(output: str) -> None:
    """InputError unless ``output`` is one of ``OUTPUTS``."""
    if output not in OUTPUTS:
        raise InputError(f"output must be one of {', '.join(OUTPUTS)}, got '{output}'")


def dense_dataset(group: h5py.Group, name: str, shape, dtype, chunks) -> h5py.Dataset:
    """An (N, G) chunked array in an h5ad file being written, as anndata encodes a dense X."""
    ds = group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
    ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return ds


def _write_dense(predictor, prepared, f: h5py.File, shape, dtype, M: np.ndarray) -> np.ndarray:
    """X (N, G) into the open file, streamed in blocks -> (N, S) pathway scores."""
    (n, g), closed_form = shape, predictor.closed_form_pathways
    rows, cols = tile_shape(n, g, whole_columns=not closed_form)
    chunks = (min(n, H5_CHUNK_SPOTS), min(cols, TILE_GENES)) if n and g else None
    X = dense_dataset(f, "X", (n, g), dtype, chunks)
    if closed_form:
        _write_tiles(predictor, prepared, X, rows, cols)
        return predictor.pathway_scores(prepared, M)  # (N, S)
    return _write_columns(predictor, prepared, X, cols, M)


def tile_shape(n: int, g: int, *, whole_columns: bool) -> tuple[int, int]:
    """(spots, genes) of one block of the head's output, at most CHUNK_BYTES of float32.

    ``whole_columns``: every spot in each block, as a predictor whose pathway scores need each
    gene's z-score over the slide must have; its width is a whole number of HDF5 chunks if it can.
    """
    if not whole_columns:
        return min(n, TILE_SPOTS), min(g, TILE_GENES)
    cols = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    return n, min(g, cols // TILE_GENES * TILE_GENES or cols)


def _write_tiles(predictor, prepared, X: h5py.Dataset, rows: int, cols: int) -> None:
    """Stream (rows x cols) tiles of the head into X. Reused buffers (float32, and the file's
    dtype if another) spare an allocation, and its page faults, per tile."""
    n, g = X.shape
    size = min(rows, n) * min(cols, g)
    buf = torch.empty(size, device=prepared.device)
    cast = None if X.dtype == np.float32 else torch.empty(size, dtype=torch_dtype(X.dtype))
    for r, c in tiles(n, g, rows, cols):
        shape = (r.stop - r.start, c.stop - c.start)
        out = buf[: shape[0] * shape[1]].view(shape)  # contiguous, edge tiles too
        block = predictor.predict_genes(prepared, c, r, out=out)
        torch.from_numpy(block).clamp_(min=0)  # in place, multithreaded: log1p is >= 0
        if cast is not None:  # multithreaded, unlike numpy's astype
            block = cast[: block.size].view(shape).copy_(torch.from_numpy(block)).numpy()
        X[r, c] = block


def tiles(n: int, g: int, rows: int, cols: int):
    """(spot rows, panel columns) slices of the (n, g) output, ``rows`` x ``cols`` at most, row
    blocks outermost: the order ``predict_slide`` writes them in."""
    for r in range(0, n, rows):
        for c in range(0, g, cols):
            yield slice(r, min(r + rows, n)), slice(c, min(c + cols, g))


def _write_columns(predictor, prepared, X: h5py.Dataset, cols: int, M: np.ndarray) -> np.ndarray:
    """Any predictor: blocks of whole columns (every spot), z-scored per gene and summed per set
    as they stream into X -> (N, S) pathway scores."""
    n, g = X.shape
    sizes = np.maximum(M.sum(0), 1)
    pathways = np.zeros((n, M.shape[1]), dtype=np.float64)
    for c in range(0, g, cols):
        block = predictor.predict_genes(prepared, slice(c, min(c + cols, g)))  # (N, cols)
        X[:, c : c + block.shape[1]] = _cast(np.maximum(block, 0), X.dtype)  # log1p is >= 0
        in_sets = np.flatnonzero(M[c : c + block.shape[1]].any(1))  # only genes of some set
        pathways += zscore_columns(block[:, in_sets]) @ M[c + in_sets]
    return pathways / sizes


def _cast(block: np.ndarray, dtype) -> np.ndarray:
    """float32 -> the file's dtype, multithreaded (torch) rather than numpy's one-core astype."""
    if block.dtype == dtype:
        return block
    return torch.from_numpy(block).to(torch_dtype(dtype)).numpy()


def torch_dtype(dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (float16, float32, ...)."""
    return getattr(torch, np.dtype(dtype).name)


def _skeleton(
    run: Run, slide: Slide, cancer_used: str, *, image: str | Path | None = None
) -> ad.AnnData:
    """Everything of the output AnnData but X and the pathways (streamed in afterwards)."""
    obs = pd.DataFrame({keys.OBS_CANCER: cancer_used}, index=pd.Index(slide.barcodes.astype(str)))
    if slide.array_rc is not None:
        obs[keys.OBS_ARRAY_ROW], obs[keys.OBS_ARRAY_COL] = slide.array_rc.T
    adata = ad.AnnData(obs=obs, var=gene_annotation(run.panel))
    adata.obsm[keys.OBSM_SPATIAL] = np.asarray(slide.coords, dtype=np.float64)
    adata.uns[keys.UNS_SPATIAL] = {
        slide.id: spatial_uns(
            slide.coords,
            image=image,
            scalefactors=slide.scalefactors,
            technology=slide.meta.get(keys.META_TECH),
        )
    }
    adata.uns[keys.UNS_HISTOPRISM] = {
        "version": __version__,
        "model": run.kind,
        "model_id": run.path.resolve().name,
        "encoder": run.config["encoder"],
        "units": keys.UNITS_LOG1P,
        "cancer_requested": slide.cancer,
        "pixel_size_um": slide.pixel_size_um if slide.pixel_size_um else float("nan"),
        "pathways": {"method": PATHWAY_METHOD, "gene_sets": "bundled GPC Hallmark + GO"},
    }
    return adata


def gene_annotation(panel: GenePanel) -> pd.DataFrame:
    """var of a prediction: panel genes as index, ``gene_ids`` (Ensembl) and ``gene_symbols``
    ('' where the bundled table has none), as Space Ranger and scanpy name them."""
    idmap = GeneIdMap.bundled()
    names = np.asarray(panel.genes, dtype=object)
    return pd.DataFrame(
        {
            keys.VAR_GENE_IDS: _or_empty(idmap.to_ensembl(names)),
            keys.VAR_GENE_SYMBOLS: _or_empty(idmap.to_symbol(names)),
        },
        index=pd.Index(panel.genes),
    )


def _or_empty(values: np.ndarray) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def predict(
    model: str | Path | list[str | Path],
    data: str | Path,
    encoder: str,
    out: str | Path,
    *,
    split: str | Path | None = None,
    samples: str = "test",
    unknown_cancer: bool = False,
    dtype: str = "float32",
    attention: str | None = None,
    attention_radius_um: float | None = None,
    images: bool = True,
    output: str = "auto",
    cancer: str | None = None,
    uncertainty: str | None = None,
    members: int | None = None,
    passes: int = 20,
    seed: int = 0,
    prompt_fraction: float | None = None,
    prompt_seed: int = 0,
    progress: bool = True,
) -> list[Path]:
    """Predict the slides ``samples`` ('test', 'all' or comma-separated ids) of a cohort into ``out``.

    Slides with counts are aligned by barcode as in training; slides without counts (never
    sequenced) are predicted from their embeddings alone. ``attention`` / ``attention_radius_um``
    override the model's attention settings (see ``load``). ``images``: put the slide image's
    hires/lowres views in ``uns['spatial']`` when the cohort has one. ``cancer``: condition every
    slide on this code instead of its own, or 'auto' (see ``_cancer_rule``). ``output``: 'dense',
    'factorised' or 'auto' (see ``predict_slide``). Under torchrun (RANK, WORLD_SIZE),
    rank r predicts slides r, r + W, ...: no process group is needed. Returns the paths this
    process wrote.

    ``uncertainty`` 'ensemble' or 'mc-dropout' adds the predictive sd and intervals of the
    measured log1p(counts) (``histoprism.inference.uncertainty``): for 'ensemble', ``model`` is a folder
    of run directories (or a list of them), of which the first ``members`` (default: all) are
    used; for 'mc-dropout', one run and ``passes`` forward passes seeded by ``seed``.

    ``prompt_fraction``: a run fitted with ``train --prompt`` predicts each slide with this share
    of its spots measured (drawn with ``prompt_seed``; ``histoprism.training.prompt``), marked in
    ``obs['prompt']``; evaluation scores the other spots.
    """
    unc = None
    if prompt_fraction is not None and uncertainty is not None:
        raise InputError("--prompt-fraction and --uncertainty cannot be combined (yet)")
    if prompt_fraction is not None and output == "factorised":
        raise InputError(
            "--prompt-fraction writes dense predictions: leave --output factorised out"
        )
    if uncertainty is None:
        run = load(model, attention=attention, attention_radius_um=attention_radius_um)
        check_encoder(run.config, encoder, run_dir=model)
    if prompt_fraction is not None:
        from ..training.prompt import prompted_predictor

        run = replace(run, predictor=prompted_predictor(run, prompt_fraction, prompt_seed))
    cohort = Cohort(data, split_dir=split)
    if uncertainty is not None:
        from .uncertainty import load_uncertainty  # (it imports this module)

        unc = load_uncertainty(
            model, uncertainty, encoder=encoder, cohort=cohort, members=members, passes=passes,
            seed=seed, attention=attention, attention_radius_um=attention_radius_um,
        )  # fmt: skip
        run = unc.runs[0]
    ids = rank_share(_sample_ids(cohort, samples))
    told = _cancer_rule(run, cancer)
    genesets = default_genesets(run.panel)
    out = output_dir(out)
    written: list[Path] = []
    with directory_lock(out, "predicting"), progress_bar(enabled=progress) as bar:
        remove_partials(out)
        task = bar.add_task("predicting", total=len(ids), info="")
        for sample_id in ids:
            # sequenced slides keep the barcodes and spot centres of their counts file
            slide = cohort.slide(sample_id, encoder, counts=cohort.st_path(sample_id).exists())
            slide = replace(slide, cancer=told(slide)) if told else slide
            written.append(
                predict_slide(
                    run,
                    slide,
                    child(out, sample_id, ".h5ad"),
                    genesets=genesets,
                    unknown_cancer=unknown_cancer,
                    dtype=dtype,
                    image=cohort.wsi_path(sample_id) if images else None,
                    output=output,
                    uncertainty=unc,
                )
            )
            bar.update(task, advance=1, info=sample_id)
    return written


def _cancer_rule(run: Run, cancer: str | None):
    """None (each slide's own code), or slide -> the code to condition on: ``cancer`` for every
    slide, or with 'auto' the known type the run's classifier infers from the slide's
    embeddings ('Unknown' below ``MIN_CONFIDENCE``)."""
    if cancer is None:
        return None
    if cancer != "auto":
        return lambda slide: cancer
    path = run.path / CLASSIFIER_FILE
    if not path.exists():
        raise InputError(
            "the run has no cancer-type classifier (written by train since 0.1.0)", path
        )
    clf = CancerTypeClassifier.load(path)

    def infer(slide: Slide) -> str:
        code = clf.code_for(slide.features)
        log.info("%s: conditioned on %s (inferred from its embeddings)", slide.id, code)
        return code

    return infer


def _sample_ids(cohort: Cohort, samples: str) -> list[str]:
    if samples in ("test", "train", "val"):
        return cohort.ids(samples)
    if samples == "all":
        return cohort.ids()
    return cohort.listed_ids(samples)
