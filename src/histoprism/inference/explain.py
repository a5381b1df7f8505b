"""Attribution of a HistoPrism prediction on one slide: ``histoprism explain``.

For a target (a gene, a gene set, or a list of genes) on one slide, two per-spot maps:

* **Integrated gradients** of the target summed over the slide's spots (or a chosen spot set)
  with respect to the input embeddings (N, D), from the baseline ``model.feature_mean`` (the
  training feature mean when the model standardises its inputs, else zeros: the buffer holds
  zeros then) in ``steps`` midpoint steps; a spot's attribution is the sum of its D components.
  Completeness: the attributions add up to f(x) - f(baseline), up to the quadrature error.
* **Own vs neighbourhood.** Each spot is also predicted with its own embedding *occluded*:
  replaced by the slide's mean embedding, every other spot unchanged (one slide per spot, in
  batches). The spot's own effect is whole - occluded; with d = whole - mean(whole) the spot's
  deviation from the slide mean, ``own`` = (whole - occluded) centred over the slide and
  ``context`` = d - own, so own + context = d. The neighbourhood share of the target is
  mean |context| / (mean |context| + mean |own|): 0 when each spot's prediction comes from its
  own embedding alone, 1 when only its surroundings matter. The model sees an ordinary slide
  with one average spot (a one-spot slide, the reference used before, is far from anything it
  was trained on and moved every programme alike). Cost: N slides of N spots, so at most
  ``SPLIT_SPOTS`` spots (drawn at random, seeded) are occluded; the others' own and context are
  NaN.
* **Attention rollout** (Abnar & Zuidema 2020): each layer's attention averaged over heads, with
  the residual path as 0.5 A + 0.5 I, multiplied through the layers; ``attention_context`` =
  1 - the rollout's diagonal, the share of a spot's final representation that attention drew
  from other spots. It does not depend on the target. Dense attention only, up to
  ``ROLLOUT_SPOTS`` spots (N x N matrices); NaN otherwise.

Targets are linear functionals of the model's last hidden layer (its head is linear):
a gene is its predicted log1p (before the clip at 0 that ``predict`` applies); a gene set or a
gene list is the pathway score of ``obsm['pathways']`` (mean over the set's panel genes of the
prediction z-scored over the slide's spots), with the z-score's mean and sd held at their values
on the whole slide so that the target is a per-spot function.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from .._core.errors import InputError
from .._core.files import atomic_path
from .._core.names import child
from ..expression.correlation import constant_genes
from ..expression.genes import GeneIdMap, GenePanel, looks_like_ensembl
from ..expression.pathways import default_genesets
from ..io.cohort import Cohort, Slide
from ..io.rundir import check_encoder
from ..models.inputs import input_options, to_tensors
from ..models.run import HistoPrismPredictor, Run, check_hidden, load, slide_inputs, trunk_output

log = logging.getLogger(__name__)
STEPS = 32  # integrated-gradient steps (midpoint rule)
STEP_SPOTS = 32_768  # spots per batched forward pass of the IG path: steps x N, bounds memory
SPLIT_SPOTS = 2048  # spots whose own/neighbourhood split is computed (N forward slides each)
ROLLOUT_SPOTS = 4096  # attention rollout: (N, N) float32 matrices up to here
TOP_K = 16  # spots in the top-patches grid
PATCH_UM, PATCH_PX = 112.0, 224  # a 112 µm square around each top spot (Visium pitch ~100 µm)
GENES_PREFIX = "genes:"  # --target genes:A,B,C
OBSM_PREFIX = "attribution_"  # obsm['attribution_<target>'] in a prediction file
COLUMNS = ("ig", "own", "context", "attention_context")  # the columns of that DataFrame, in order
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Target:
    """What is explained: ``kind`` 'gene' or 'gene set', ``genes`` its panel genes, ``label``
    what was asked, ``key`` a file- and obsm-safe name."""

    label: str
    key: str
    kind: str
    genes: tuple[str, ...]

    @property
    def description(self) -> str:
        if self.kind == "gene":
            return f"gene {self.label}: predicted log1p(counts)"
        return (
            f"gene set {self.label} ({len(self.genes)} panel genes): pathway score "
            "(mean z-scored predicted log1p)"
        )


@dataclass
class Explanation:
    """Per-spot attribution of one target on one slide; arrays are (N,) float64, spot order of
    ``barcodes``.

    prediction: the target predicted from the whole slide; occluded: with the spot's embedding
    replaced by the slide mean (NaN for spots beyond ``SPLIT_SPOTS``); attribution: integrated
    gradients summed over the embedding dims (target units); own, context: the split of
    prediction - mean(prediction) (own + context; NaN where occluded is); spots: (N,) bool,
    the spots whose target was summed for the gradients; delta: f(x) - f(baseline) of that sum.
    """

    sample_id: str
    target: Target
    barcodes: np.ndarray
    coords: np.ndarray  # (N, 2) level-0 px (x, y)
    prediction: np.ndarray
    occluded: np.ndarray
    attribution: np.ndarray
    own: np.ndarray
    context: np.ndarray
    spots: np.ndarray
    delta: float
    neighbourhood_share: float
    steps: int
    attention_context: np.ndarray | None = None  # (N,) 1 - rollout diagonal; NaN if not dense

    @property
    def completeness_error(self) -> float:
        """sum(attribution) - (f(x) - f(baseline)): the quadrature error of the IG integral."""
        return float(self.attribution.sum() - self.delta)

    def _attention_context(self) -> np.ndarray:
        if self.attention_context is None:
            return np.full(len(self.barcodes), np.nan)
        return self.attention_context

    def table(self) -> pd.DataFrame:
        """One row per spot: barcode, x, y (level-0 px), prediction, occluded, ig, own, context."""
        return pd.DataFrame(
            {
                "barcode": self.barcodes,
                "x": self.coords[:, 0],
                "y": self.coords[:, 1],
                "prediction": self.prediction,
                "occluded": self.occluded,
                "ig": self.attribution,
                "own": self.own,
                "context": self.context,
                "attention_context": self._attention_context(),
                "in_target": self.spots,
            }
        )


def resolve_target(target: str | Sequence[str], panel: GenePanel) -> Target:
    """A panel gene, a bundled GPC set name (``pathways.default_genesets``), 'genes:A,B,C' or a
    list of genes -> ``Target``. Symbols are mapped to Ensembl ids on an Ensembl panel."""
    if isinstance(target, str) and not target.startswith(GENES_PREFIX):
        if target in panel.index:
            return Target(target, _safe(target), "gene", (target,))
        mapped = _to_panel([target], panel)
        if mapped:
            return Target(target, _safe(target), "gene", tuple(mapped))
        sets = default_genesets(panel)
        if target in sets:
            genes = tuple(dict.fromkeys(g for g in sets[target] if g in panel.index))
            if not genes:
                raise InputError(f"gene set '{target}' has no gene in the model's panel")
            return Target(target, _safe(target), "gene set", genes)
        raise InputError(
            f"target '{target}' is neither a gene of the model's panel nor a bundled GPC gene "
            f"set name; give a gene list as {GENES_PREFIX}A,B,C"
        )
    asked = target[len(GENES_PREFIX) :].split(",") if isinstance(target, str) else list(target)
    asked = list(dict.fromkeys(str(g).strip() for g in asked if str(g).strip()))
    if not asked:
        raise InputError(f"empty gene list in target '{target}'")
    genes = _to_panel(asked, panel)
    missing = [g for g in asked if g not in panel.index and not _to_panel([g], panel)]
    if missing:
        raise InputError(f"genes not in the model's panel: {', '.join(missing[:10])}")
    label = ",".join(asked)
    return Target(label, _safe("genes_" + "_".join(asked)), "gene set", tuple(genes))


def _to_panel(genes: list[str], panel: GenePanel) -> list[str]:
    """The panel names of ``genes`` (as given, or symbol -> Ensembl on an Ensembl panel)."""
    out = [g for g in genes if g in panel.index]
    rest = [g for g in genes if g not in panel.index]
    if rest and looks_like_ensembl(panel.genes):
        ids = GeneIdMap.bundled().to_ensembl(np.asarray(rest, dtype=object))
        out += [str(i) for i in ids if i is not None and str(i) in panel.index]
    return list(dict.fromkeys(out))


def _safe(name: str) -> str:
    """A file- and HDF5-safe key: other characters become '_', at most 100 characters."""
    key = _UNSAFE.sub("_", name).strip("._") or "target"
    return key[:100]


def explain(
    run_dir: str | Path,
    cohort_dir: str | Path,
    encoder: str,
    sample_id: str,
    target: str | Sequence[str],
    *,
    steps: int = STEPS,
    spots: np.ndarray | None = None,
    unknown_cancer: bool = False,
    device: str | torch.device | None = None,
) -> Explanation:
    """Explain ``target`` on slide ``sample_id`` of a cohort for a HistoPrism run (module doc).

    ``spots``: (N,) bool or int indices of the spots whose target the gradients sum (default:
    every spot of the slide, in the order of the slide's aligned spots).
    """
    run = load(run_dir, device=device)
    check_encoder(run.config, encoder, run_dir=run_dir)
    cohort = Cohort(cohort_dir)
    ids = cohort.listed_ids(sample_id)
    if len(ids) != 1:
        raise InputError(f"give one sample id, got '{sample_id}'")
    sid = ids[0]
    slide = cohort.slide(sid, encoder, counts=cohort.st_path(sid).exists())
    return explain_slide(
        run, slide, target, steps=steps, spots=spots, unknown_cancer=unknown_cancer
    )


def explain_slide(
    run: Run,
    slide: Slide,
    target: str | Sequence[str] | Target,
    *,
    steps: int = STEPS,
    spots: np.ndarray | None = None,
    unknown_cancer: bool = False,
) -> Explanation:
    """``explain`` for a loaded run and slide."""
    predictor = run.predictor
    if not isinstance(predictor, HistoPrismPredictor):
        raise InputError(
            f"explain needs a HistoPrism run (gradients through its network), not '{run.kind}'",
            run.path,
        )
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    tgt = target if isinstance(target, Target) else resolve_target(target, run.panel)
    model, device = predictor.model, predictor.device
    t = to_tensors(
        slide, vocab=run.vocab, unknown_cancer=unknown_cancer, **input_options(model.cfg)
    )
    inputs = slide_inputs(t, device)
    n = t.n_spots
    mask = _spot_mask(spots, n)
    hidden = trunk_output(model, t, device)  # (N, H)
    check_hidden(hidden, slide.id)
    a, beta = _functional(model, run.panel, tgt, hidden)
    whole = (hidden.double() @ a + beta).cpu().numpy()  # (N,)
    split = np.sort(np.random.default_rng(0).permutation(n)[:SPLIT_SPOTS])
    occluded = np.full(n, np.nan)
    occluded[split] = _occluded(model, inputs, a, beta, split)
    effect = whole - occluded  # (N,) the spot's own effect, NaN where not computed
    own = effect - np.nanmean(effect)
    context = (whole - whole.mean()) - own
    c, o = np.nanmean(np.abs(context)), np.nanmean(np.abs(own))
    share = float(c / (c + o)) if c + o > 0 else float("nan")
    attribution, delta = _integrated_gradients(model, inputs, a, beta, mask, steps)
    rollout = attention_rollout(model, inputs)
    return Explanation(
        sample_id=slide.id,
        target=tgt,
        barcodes=np.asarray(slide.barcodes).astype(str),
        coords=np.asarray(slide.coords, dtype=np.float64),
        prediction=whole,
        occluded=occluded,
        attribution=attribution,
        own=own,
        context=context,
        spots=mask,
        delta=delta,
        neighbourhood_share=share,
        steps=steps,
        attention_context=None if rollout is None else 1.0 - np.diag(rollout).astype(np.float64),
    )


def _spot_mask(spots: np.ndarray | None, n: int) -> np.ndarray:
    """(N,) bool from None (all), a bool mask or indices."""
    if spots is None:
        return np.ones(n, dtype=bool)
    s = np.asarray(spots)
    if s.dtype == bool:
        if s.shape != (n,):
            raise InputError(f"spot mask has shape {s.shape}, the slide has {n} spots")
        mask = s.copy()
    else:
        if s.size and (s.min() < 0 or s.max() >= n):
            raise InputError(f"spot indices must lie in 0..{n - 1}")
        mask = np.zeros(n, dtype=bool)
        mask[s.astype(np.int64)] = True
    if not mask.any():
        raise InputError("no spot chosen for the target")
    return mask


def _functional(
    model, panel: GenePanel, target: Target, hidden: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The target as t_i = h_i . a + beta of the last hidden layer h (N, H): a (H,) float64.

    Gene: its head row. Gene set: the mean of its genes' z-scores with each gene's mean and sd
    over the slide fixed (what ``obsm['pathways']`` holds; constant genes weigh 0, as there).
    """
    cols = torch.tensor([panel.index[g] for g in target.genes], device=hidden.device)
    w = model.head_out.weight[cols].detach().double()  # (G_t, H)
    b = model.head_out.bias[cols].detach().double()  # (G_t,)
    if target.kind == "gene":
        return w[0], float(b[0])
    x = hidden.double() @ w.T + b  # (N, G_t)
    mean, sd = x.mean(0), x.std(0, unbiased=False)
    const = torch.from_numpy(constant_genes(sd.cpu().numpy(), mean.cpu().numpy())).to(sd.device)
    scale = torch.where(const, 0.0, 1 / sd.clamp(min=1e-300)) / len(cols)  # (G_t,)
    return w.T @ scale, float(((b - mean) * scale).sum())


def _occluded(model, inputs: dict, a: torch.Tensor, beta: float, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) the target of each spot of ``rows`` with its own embedding replaced by the
    slide's mean embedding and the rest of the slide unchanged: one slide per spot, batched
    (at most ``STEP_SPOTS`` spots per forward pass)."""
    x = inputs["features"]  # (1, N, D)
    n = x.shape[1]
    mean = x.mean(1)  # (1, D)
    extra = {k: v for k, v in inputs.items() if k not in ("features", "condition")}
    per_batch = max(1, STEP_SPOTS // max(n, 1))
    out = []
    with torch.no_grad():
        for chunk in torch.from_numpy(rows).to(x.device).split(per_batch):
            m = len(chunk)
            z = x.expand(m, -1, -1).clone()  # (m, N, D)
            z[torch.arange(m), chunk] = mean
            spatial = _repeat(extra, m)
            h = model.trunk(z, inputs["condition"].expand(m), **spatial)  # (m, N, H)
            out.append(h[torch.arange(m), chunk].double() @ a + beta)
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def _repeat(inputs: dict, m: int) -> dict:
    """A slide's non-feature inputs as a batch of ``m`` copies of it (tensors expanded, per-slide
    lists such as the spatial plans repeated)."""
    return {
        k: v * m if isinstance(v, list) else v.expand(m, *v.shape[1:]) for k, v in inputs.items()
    }


def attention_rollout(model, inputs: dict) -> np.ndarray | None:
    """(N, N) float32 attention rollout of a slide (module doc): row i = how much each input spot
    contributes to spot i's last layer, rows summing to 1; local attention as dense attention
    masked to its radius; None above ``ROLLOUT_SPOTS`` spots or where spots are pooled into
    sites (attention is then between sites, not spots)."""
    n = inputs["features"].shape[1]
    plans = inputs.get("spatial") or []
    if n > ROLLOUT_SPOTS or any(p.site is not None for p in plans):
        return None
    local, dense = model.uses_local_attention(n), model.dense_heads(n)
    coords = inputs["coords_um"] if local else None
    seen = []
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for b in model.blocks
    ]
    try:
        with torch.no_grad():
            model.trunk(**inputs)
            rollout = torch.eye(n, device=inputs["features"].device)
            for block, x in zip(model.blocks, seen, strict=True):
                a = block.attention_weights(x, coords, model.cfg.attention_radius_um, dense)
                a = a[0].mean(0)  # (N, N) mean over heads
                rollout = (0.5 * a + 0.5 * torch.eye(n, device=a.device)) @ rollout
    finally:
        for h in hooks:
            h.remove()
    return rollout.cpu().numpy()


def _integrated_gradients(
    model, inputs: dict, a: torch.Tensor, beta: float, mask: np.ndarray, steps: int
) -> tuple[np.ndarray, float]:
    """Integrated gradients of F(x) = sum over the masked spots of t_i(x) along the straight
    path from the baseline ``model.feature_mean`` to the embeddings x (N, D), midpoint rule in
    ``steps`` steps, several steps per batch -> (N,) attribution (summed over D) and
    F(x) - F(baseline)."""
    x = inputs["features"]  # (1, N, D)
    n = x.shape[1]
    base = model.feature_mean.to(x.dtype).expand_as(x)  # (1, N, D): the training mean
    if inputs.get("centre") is not None:  # of centred embeddings: here, plus the slide's centre
        base = base + inputs["centre"][:, None].to(x.dtype)
    diff = x - base
    sel = torch.from_numpy(mask).to(x.device)
    a32 = a.to(x.dtype)
    extra = {k: v for k, v in inputs.items() if k not in ("features", "condition")}
    per_batch = max(1, STEP_SPOTS // max(n, 1))
    grad_sum = torch.zeros_like(x[0])
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    with torch.enable_grad():
        for chunk in alphas.split(per_batch):
            m = len(chunk)
            z = (base + chunk[:, None, None] * diff).requires_grad_(True)  # (m, N, D)
            spatial = _repeat(extra, m)
            h = model.trunk(z, inputs["condition"].expand(m), **spatial)  # (m, N, H)
            (grad,) = torch.autograd.grad((h[:, sel] @ a32).sum(), z)
            grad_sum += grad.sum(0)
    ig = (diff[0] * grad_sum / steps).sum(1)  # (N,)
    with torch.no_grad():
        ends = torch.cat([x, base])  # (2, N, D): F(x) and F(baseline) in one pass
        spatial = _repeat(extra, 2)
        h = model.trunk(ends, inputs["condition"].expand(2), **spatial)[:, sel].double()
        f = (h @ a + beta).sum(1)  # (2,)
    return ig.double().cpu().numpy(), float(f[0] - f[1])


def obsm_key(explanation: Explanation) -> str:
    """``attribution_<target key>``: where ``write_explanation`` puts it."""
    return OBSM_PREFIX + explanation.target.key


def write_explanation(pred_h5ad_path: str | Path, explanation: Explanation) -> Path:
    """Add ``obsm['attribution_<target>']`` to a prediction file, atomically: an (N, 3) float32
    DataFrame indexed by barcode with columns ``ig``, ``own``, ``context`` (``COLUMNS``), rows
    in the file's spot order. An earlier one of the same name is replaced."""
    path = Path(pred_h5ad_path)
    if not path.is_file():
        raise InputError("no such prediction file", path)
    from ..io.readers.hdf5 import check_file

    check_file(path)
    with h5py.File(path, "r") as f:
        if "obs" not in f or "obsm" not in f:
            raise InputError("not a prediction h5ad (no obs/obsm)", path)
        names = pd.Index(ad.io.read_elem(f["obs"]).index.astype(str))
    order = pd.Index(explanation.barcodes).get_indexer(names)
    if len(names) != len(explanation.barcodes) or (order < 0).any():
        raise InputError(
            f"its {len(names)} spots are not the {len(explanation.barcodes)} spots of slide "
            f"{explanation.sample_id} that were explained",
            path,
        )
    values = np.column_stack(
        [
            explanation.attribution,
            explanation.own,
            explanation.context,
            explanation._attention_context(),
        ]
    )
    frame = pd.DataFrame(values[order].astype(np.float32), index=names, columns=list(COLUMNS))
    key = obsm_key(explanation)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            if key in f["obsm"]:
                del f["obsm"][key]
            ad.io.write_elem(f["obsm"], key, frame)
    return path


def plot_explanation(explanation: Explanation, tissue: tuple[np.ndarray, np.ndarray] | None = None):
    """Three maps over the spot positions: the predicted target, its IG attribution and the
    neighbourhood part (context) of each spot's prediction, over the slide image when ``tissue``
    (``spatial.tissue_crop``: image, extent) is given. Returns an Agg-backed Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ex = explanation
    fig = Figure(figsize=(11.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    x, y = ex.coords[:, 0], ex.coords[:, 1]
    size = float(np.clip(6000.0 / max(1, len(x)), 1.0, 30.0))
    unit = "log1p" if ex.target.kind == "gene" else "pathway score"
    panels = (
        (ex.prediction, "predicted", "viridis", False),
        (ex.attribution, f"integrated gradients ({ex.steps} steps)", "RdBu_r", True),
        (ex.context, f"neighbourhood part (share {ex.neighbourhood_share:.2f})", "RdBu_r", True),
    )
    for ax, (values, title, cmap, symmetric) in zip(axes, panels, strict=True):
        if symmetric:
            v = float(np.nanpercentile(np.abs(values), 99)) or 1e-6
            lo, hi = -v, v
        else:
            lo, hi = (float(q) for q in np.nanpercentile(values, [1, 99]))
            hi = max(hi, lo + 1e-6)
        if tissue is not None:
            from ..plotting.figures import draw_tissue

            draw_tissue(ax, tissue[0], tissue[1], ex.coords)
        sc = ax.scatter(x, y, c=values, s=size, cmap=cmap, vmin=lo, vmax=hi, lw=0)
        ax.set_aspect("equal")
        if tissue is None:
            ax.invert_yaxis()  # image orientation: y grows downwards (draw_tissue sets it)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        fig.colorbar(sc, ax=ax, label=unit, shrink=0.8)
    fig.suptitle(f"{ex.sample_id}: {ex.target.description}", fontsize=10)
    return fig


def save_explanation(
    explanation: Explanation,
    out: str | Path,
    *,
    tissue: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """Write ``out/{id}_{target}.png`` (``plot_explanation``, over ``tissue`` when given) and
    ``out/{id}_{target}.csv`` (``Explanation.table``), atomically -> their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("--out is a file, not a folder", out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{explanation.sample_id}_{explanation.target.key}"
    png, csv = child(out, stem, ".png"), child(out, stem, ".csv")
    fig = plot_explanation(explanation, tissue)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    with atomic_path(csv) as tmp:
        explanation.table().to_csv(tmp, index=False)
    return png, csv


def top_spots(explanation: Explanation, k: int = TOP_K) -> np.ndarray:
    """Indices of the ``k`` spots of largest integrated-gradient attribution (those pushing the
    target up most), largest first."""
    order = np.argsort(-explanation.attribution, kind="stable")
    return order[: min(k, len(order))]


def top_patches(
    explanation: Explanation, cohort: Cohort, *, k: int = TOP_K
) -> tuple[np.ndarray, np.ndarray] | None:
    """The slide image under the ``k`` top spots (``top_spots``): (k,) spot indices and
    (k, P, P, 3) uint8 patches, from the slide image (``PATCH_UM`` µm square around each spot
    centre) or else HEST ``patches/{id}.h5`` (by barcode); None when the cohort has neither."""
    sid, rows = explanation.sample_id, top_spots(explanation, k)
    image = cohort.wsi_path(sid)
    if image is not None:
        from ..images.patching import plan_patches, read_patch
        from ..io.readers.wsi import open_wsi  # image readers are an optional extra

        with open_wsi(image, mpp=cohort.pixel_size_um(sid)) as wsi:
            centres = explanation.coords[rows]
            plan = plan_patches(wsi, centres, target_mpp=PATCH_UM / PATCH_PX, size=PATCH_PX)
            return rows, np.stack([read_patch(wsi, plan, c) for c in centres])
    if cohort.patches_path(sid).exists():
        from ..io.readers.hest import read_hest_patches

        patches = read_hest_patches(cohort.patches_path(sid))
        where = pd.Index(patches.barcodes.astype(str)).get_indexer(explanation.barcodes[rows])
        rows = rows[where >= 0]
        if not len(rows):
            return None
        return rows, patches.read(where[where >= 0])
    return None


def plot_top_patches(explanation: Explanation, rows: np.ndarray, patches: np.ndarray):
    """A grid of the top spots' patches, each titled by rank and attribution -> Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(8, len(rows))
    lines = -(-len(rows) // cols)
    fig = Figure(figsize=(1.6 * cols, 1.75 * lines + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(lines, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for rank, (ax, i, patch) in enumerate(zip(axes, rows, patches, strict=False), start=1):
        ax.imshow(patch)
        ax.set_title(f"#{rank} IG {explanation.attribution[i]:.3g}", fontsize=7)
    fig.suptitle(
        f"{explanation.sample_id}: spots that push {explanation.target.label} up most", fontsize=9
    )
    return fig


def save_top_patches(explanation: Explanation, cohort: Cohort, out: str | Path) -> Path | None:
    """``out/{id}_{target}_top.png`` (``plot_top_patches``), or None without a readable image
    (a warning says why: the maps and table do not depend on it)."""
    try:
        got = top_patches(explanation, cohort)
    except InputError as exc:
        log.warning("%s: no top-spot patches (%s)", explanation.sample_id, exc)
        return None
    if got is None:
        return None
    png = child(Path(out), f"{explanation.sample_id}_{explanation.target.key}_top", ".png")
    with atomic_path(png) as tmp:
        plot_top_patches(explanation, *got).savefig(
            tmp, format="png", dpi=110, metadata={"Software": None}
        )
    return png


def slide_tissue(explanation: Explanation, cohort: Cohort) -> tuple[np.ndarray, np.ndarray] | None:
    """The slide image under the explained spots (``spatial.tissue_crop``: image, extent),
    or None when the cohort has no readable image of the slide (a warning says why)."""
    from ..io.spatial import spatial_uns, tissue_crop

    try:
        image = cohort.wsi_path(explanation.sample_id)
        if image is None:
            return None
        return tissue_crop(spatial_uns(explanation.coords, image=image), explanation.coords)
    except InputError as exc:
        log.warning("%s: maps drawn without the slide image (%s)", explanation.sample_id, exc)
        return None


def explain_to_files(
    model: str | Path,
    data: str | Path,
    encoder: str,
    sample: str,
    target: str,
    out: str | Path,
    *,
    pred: str | Path | None = None,
    steps: int = STEPS,
    unknown_cancer: bool = False,
) -> tuple[Explanation, list[Path]]:
    """What ``histoprism explain`` does, with its parameter names (``model``: the run directory,
    ``data``: the cohort, ``sample``: the slide's id): ``explain``, then the PNG and CSV in
    ``out`` (and the top spots' patches when the cohort has the slide's image or HEST patches)
    and, with ``pred`` (a PRED folder), ``obsm['attribution_<target>']`` in ``pred/{id}.h5ad``."""
    if pred is not None and not child(pred, sample, ".h5ad").is_file():
        raise InputError(f"no prediction of {sample} here (run predict first)", pred)
    ex = explain(model, data, encoder, sample, target, steps=steps, unknown_cancer=unknown_cancer)
    cohort = Cohort(data)
    paths = list(save_explanation(ex, out, tissue=slide_tissue(ex, cohort)))
    top = save_top_patches(ex, cohort, out)
    paths += [top] if top is not None else []
    if pred is not None:
        paths.append(write_explanation(child(pred, sample, ".h5ad"), ex))
    return ex, paths


__all__ = [
    "COLUMNS",
    "Explanation",
    "Target",
    "explain",
    "explain_slide",
    "explain_to_files",
    "plot_explanation",
    "plot_top_patches",
    "resolve_target",
    "save_explanation",
    "save_top_patches",
    "top_patches",
    "top_spots",
    "write_explanation",
]
