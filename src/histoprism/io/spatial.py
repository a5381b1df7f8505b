"""What scanpy and squidpy need to draw a prediction over its tissue, as they read Space Ranger.

``uns['spatial'][library_id]`` holds ``images`` ('hires', 'lowres': (h, w, 3) uint8 views of the
whole slide) and ``scalefactors`` (``tissue_hires_scalef`` / ``tissue_lowres_scalef``: image px per
level-0 px; ``spot_diameter_fullres``: level-0 px), so ``sc.pl.spatial(adata, color=gene)`` and
``sq.pl.spatial_scatter(adata, color=gene)`` need no extra argument. Layout: docs/formats.md,
"PRED: predictions".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .._core import keys
from .._core.errors import InputError

log = logging.getLogger(__name__)

HIRES_PX, LOWRES_PX = 2000, 600  # longest side of Space Ranger's tissue_hires / tissue_lowres
CROP_PX = 800  # longest side of the tissue under an evaluation report's spatial maps
# Spot diameter / centre-to-centre pitch when the counts file does not say: Visium's 55 µm spots
# lie 100 µm apart (ST: 100 / 200); Visium HD bins are squares that tile the plane.
SPOT_TO_PITCH = 0.55
TILED_TECHNOLOGIES = ("visium hd",)


def spot_diameter_px(coords: np.ndarray, technology: str | None = None) -> float:
    """Drawn spot diameter in level-0 px from the spot pitch (median nearest-neighbour distance of
    the (N, 2) centres): 0.55 pitch (Visium's ratio), or the pitch for tiled bins (Visium HD)."""
    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        return 1.0
    d, _ = cKDTree(coords).query(coords, k=2)
    pitch = float(np.median(d[:, 1]))
    tiled = str(technology or "").strip().lower() in TILED_TECHNOLOGIES
    return max(pitch * (1.0 if tiled else SPOT_TO_PITCH), 1.0)


def tissue_images(image: str | Path) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The slide at Space Ranger's two resolutions -> ({'hires', 'lowres'}: (h, w, 3) uint8,
    {'tissue_hires_scalef', 'tissue_lowres_scalef'}: image px per level-0 px)."""
    from .readers.wsi import open_wsi  # image readers are an optional extra

    with open_wsi(image, mpp=1.0) as wsi:  # the pixel size plays no part in a thumbnail
        longest = max(wsi.dimensions)
        images, scales = {}, {}
        for name, px in (("hires", HIRES_PX), ("lowres", LOWRES_PX)):
            side = min(px, longest)
            images[name] = wsi.thumbnail(side)
            scales[f"tissue_{name}_scalef"] = side / longest
    return images, scales


def spatial_uns(
    coords: np.ndarray,
    *,
    image: str | Path | None = None,
    scalefactors: dict | None = None,
    technology: str | None = None,
) -> dict:
    """One library of ``uns['spatial']``: images of ``image`` (when given and readable) and the
    scale factors, keeping an imported Space Ranger folder's ``spot_diameter_fullres``."""
    diameter = spot_diameter_px(coords, technology)
    if scalefactors and scalefactors.get("spot_diameter_fullres"):
        diameter = float(scalefactors["spot_diameter_fullres"])
    images, scales, source = {}, {}, "none"
    if image is not None:
        try:
            images, scales = tissue_images(image)
            source = str(image)
        except (InputError, ImportError) as exc:
            log.warning("%s: no tissue image in the prediction (%s)", image, exc)
    if not images:  # scanpy draws only over some image: a white canvas covering the spots
        images, scales = blank_canvas(coords, diameter)
    factors = {"spot_diameter_fullres": diameter, **scales}
    return {"images": images, "scalefactors": factors, "metadata": {"source_image": source}}


def blank_canvas(coords: np.ndarray, diameter: float) -> tuple[dict, dict]:
    """A white image covering the (N, 2) spot centres (level-0 px) and their radius, longest side
    LOWRES_PX, as both 'hires' and 'lowres' (scanpy and squidpy each look for one by default),
    with its scale factors: what they need to draw a slide that has no image."""
    extent = np.asarray(coords, dtype=np.float64).max(axis=0) + diameter if len(coords) else (1, 1)
    scale = LOWRES_PX / max(float(max(extent)), 1.0)
    w, h = (max(1, int(np.ceil(v * scale))) for v in extent)
    canvas = np.full((h, w, 3), 255, dtype=np.uint8)
    return {"hires": canvas, "lowres": canvas}, {
        "tissue_hires_scalef": scale,
        "tissue_lowres_scalef": scale,
    }


def tissue_crop(
    library: Mapping | None, coords: np.ndarray, *, max_px: int = CROP_PX
) -> tuple[np.ndarray, np.ndarray] | None:
    """The part of a prediction's slide image under its spots, for drawing maps over the tissue.

    library: one ``uns['spatial'][id]`` (``images['hires']``,
    ``scalefactors['tissue_hires_scalef']``, ``metadata['source_image']``). coords: (N, 2) spot
    centres, level-0 px (x, y). Returns
    (image, extent): image (h, w, 3) uint8, the hires view over the spots' bounding box plus a 3 %
    margin, longest side at most ``max_px`` (block means); extent (4,) float64 ``(x0, x1, y0, y1)``,
    level-0 px of its outer pixel edges (x0 left, y0 top: y grows downwards). None without a real
    image (no library, ``source_image`` 'none': the white canvas) or when no spot lies on it.
    """
    try:
        if str(library["metadata"]["source_image"]) == "none":
            return None
        image = np.asarray(library["images"]["hires"])
        scale = float(library["scalefactors"]["tissue_hires_scalef"])
    except (KeyError, TypeError, ValueError):
        return None
    coords = np.asarray(coords, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] < 3 or not len(coords) or not scale > 0:
        return None
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = 0.03 * max(float(np.max(hi - lo)), 1.0) + spot_diameter_px(coords) / 2
    h, w = image.shape[:2]
    c0, r0 = (max(0, int(np.floor(v * scale))) for v in lo - pad)
    c1, r1 = (
        min(w, int(np.ceil((hi[0] + pad) * scale))),
        min(h, int(np.ceil((hi[1] + pad) * scale))),
    )
    if c1 <= c0 or r1 <= r0:
        return None
    k = int(np.ceil(max(c1 - c0, r1 - r0) / max_px))  # block size: longest side <= max_px
    nw, nh = (c1 - c0) // k, (r1 - r0) // k
    if nw == 0 or nh == 0:  # a sliver thinner than one block
        return None
    crop = image[r0 : r0 + nh * k, c0 : c0 + nw * k, :3]
    if k > 1:
        crop = crop.reshape(nh, k, nw, k, 3).mean(axis=(1, 3)).round()
    extent = np.array([c0, c0 + nw * k, r0, r0 + nh * k], dtype=np.float64) / scale
    return np.ascontiguousarray(crop, dtype=np.uint8), extent


def spatial_library(uns: Mapping, library_id: str) -> Mapping | None:
    """``uns['spatial'][library_id]`` of an AnnData's ``uns``; the only library when there is
    one under another name; None without."""
    libraries = uns.get(keys.UNS_SPATIAL)
    if not isinstance(libraries, Mapping) or not libraries:
        return None
    if library_id in libraries:
        return libraries[library_id]
    return next(iter(libraries.values())) if len(libraries) == 1 else None
