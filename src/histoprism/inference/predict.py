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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from .._core import keys
from .._core.distributed import rank_share, torchrun_env
from .._core.errors import InputError
from .._core.files import atomic_path, directory_lock, remove_partials
from .._core.names import child
from .._core.progress import progress_bar
from .._core.storage import check_room, output_dir
from .._core.version import __version__
from ..expression.genes import GeneIdMap, GenePanel
from ..expression.pathways import (
    default_genesets,
    panel_membership,
)
from ..io.cohort import Cohort, Slide
from ..io.rundir import check_encoder, weights_notice
from ..io.spatial import spatial_uns
from ..models.cancer_type import CLASSIFIER_FILE, CancerTypeClassifier
from ..models.run import Run, check_hidden, load
from .uncertainty import load_uncertainty
from .writer import output_bytes, wants_factors, write_x

if TYPE_CHECKING:
    from .uncertainty import Uncertainty

log = logging.getLogger(__name__)
# what obsm['pathways'] holds: equal to decoupler's `waggr` (weights 1) scaled per set
PATHWAY_METHOD = "mean of per-gene z-scored predicted log1p over the set's genes"


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
        factorised = wants_factors(output, predictor, n * g * np.dtype(dtype).itemsize)
        prepared = predictor.prepare(slide, unknown_cancer=unknown_cancer)
    else:
        factorised = uncertainty.check_output(output, n * g * np.dtype(dtype).itemsize)
        prepared = uncertainty.prepare(slide, unknown_cancer=unknown_cancer)
    hidden = getattr(prepared, "hidden", prepared)  # a prompted slide keeps its trunk output
    if isinstance(hidden, torch.Tensor):
        check_hidden(hidden, path)
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
    for name, values in predictor.spot_columns(prepared).items():  # e.g. which were measured
        skeleton.obs[name] = values
    skeleton.uns[keys.UNS_HISTOPRISM].update(predictor.uns_info())
    if uncertainty is not None:
        skeleton.uns[keys.UNS_HISTOPRISM]["uncertainty"] = uncertainty.info()
    item = np.dtype(dtype).itemsize
    layers = 0 if uncertainty is None else 1 + len(keys.LAYER_BOUNDS)  # sd and the interval bounds
    payload = n * prepared.shape[-1] * item + weight.nbytes if factorised else n * g * item
    check_room(path, output_bytes(payload * (1 + layers), n, len(names), layers))
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
                pathways = write_x(predictor, prepared, f, (n, g), dtype, M)
            frame = pd.DataFrame(pathways.astype(np.float32), index=slide.barcodes, columns=names)
            ad.io.write_elem(f["obsm"], keys.OBSM_PATHWAYS, frame)
            # by name too, where scanpy's and squidpy's color= looks (set names are not genes)
            del f["obs"]
            named = frame.drop(columns=skeleton.obs.columns, errors="ignore")
            obs = pd.concat([skeleton.obs, named.set_axis(skeleton.obs.index)], axis=1)
            ad.io.write_elem(f, "obs", obs)
    return Path(path)


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
        from ..models.prompt import prompted_predictor

        run = replace(run, predictor=prompted_predictor(run, prompt_fraction, prompt_seed))
    cohort = Cohort(data, split_dir=split)
    if uncertainty is not None:
        unc = load_uncertainty(
            model, uncertainty, encoder=encoder, cohort=cohort, members=members, passes=passes,
            seed=seed, attention=attention, attention_radius_um=attention_radius_um,
        )  # fmt: skip
        run = unc.runs[0]
    ids = rank_share(cohort.select(samples))
    notice = weights_notice(run.config)
    if notice and torchrun_env()[0] == 0:  # once per run, whatever the number of processes
        log.warning("%s", notice)
    told = _cancer_rule(run, cancer)
    genesets = default_genesets(run.panel)
    created = not Path(out).exists()  # a failed run removes the folder it made, if left empty
    out = output_dir(out)
    written: list[Path] = []
    lock = directory_lock(out, "predicting", created=created)
    with lock, progress_bar(enabled=progress) as bar:
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
