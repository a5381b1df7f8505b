"""Spot-centred patches cut from a whole-slide image at a target pixel size.

Geometry (level-0 pixels, continuous coordinates):

- Pixel (i, j) (row i, column j) covers [j, j+1) x [i, i+1); a point (x, y) has x along columns.
- A spot centre (x, y) is read as in ``obsm['spatial']`` (HEST: integer pixel index, x = column,
  y = row) and taken as the point (x, y), i.e. the top-left corner of level-0 pixel (y, x).
- A patch of ``size`` pixels at ``target_mpp`` spans L = size * target_mpp / wsi.mpp level-0 pixels
  and covers [x - L/2, x + L/2) x [y - L/2, y + L/2). Output pixel (r, c) covers level-0
  [x - L/2 + c L/size, x - L/2 + (c+1) L/size) along x (same along y with r).
- So the patch's centre point (size/2, size/2) is exactly the spot centre (x, y), and for an even
  ``size`` output pixel (size/2, size/2) starts there. At target_mpp == wsi.mpp the patch is
  level-0 pixels [x - size/2, x + size/2) copied without resampling: HEST's own patches, whose
  ``coords`` top-left corner is centre - size/2.

Reading: the pyramid level with the largest downsample not above L/size (never upsampling a
coarser level), an integer-aligned square around the patch with a margin for the filter, then one
antialiased Lanczos resample (Pillow ``resize`` with a float source ``box``) that carries the
fractional offset, so the centre is sub-pixel accurate on every level.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .._core.errors import InputError
from ..io.readers.wsi import WholeSlideImage

LANCZOS_SUPPORT = 3  # Pillow's Lanczos kernel reaches 3 source pixels (x the reduction factor)
TISSUE_FREE = 0.1  # tissue fraction under which a patch counts as tissue-free
# a pixel is tissue when it is coloured (HSV saturation) and not dark: white glass is unsaturated,
# black (scanner border, padding) is too dark for its saturation to mean anything
MIN_SATURATION = 0.08
MIN_BRIGHTNESS = 40


@dataclass
class PatchPlan:
    """How to cut spots out of one slide (shared by all spots)."""

    level: int  # pyramid level read
    downsample: float  # that level's downsample (level-0 px per level px)
    read_px: int  # side of the square read at that level, before resampling (margin included)
    level0_px: float  # side of a patch in level-0 pixels = size * target_mpp / wsi.mpp
    in_bounds: np.ndarray  # (N,) bool: the patch lies fully inside the image
    size: int = 224  # side of the output patch, pixels
    target_mpp: float = 0.5  # µm per output pixel
    margin: int = 0  # level pixels read beyond the patch on each side, for the filter

    @property
    def n_out_of_bounds(self) -> int:
        return int((~self.in_bounds).sum())


def plan_patches(
    wsi: WholeSlideImage, centres: np.ndarray, *, target_mpp: float = 0.5, size: int = 224
) -> PatchPlan:
    """Choose the level and read size for patches of ``size`` px at ``target_mpp`` µm/px.

    Parameters
    ----------
    wsi : the open slide (its ``mpp`` already resolved).
    centres : (N, 2) spot centres (x, y), level-0 pixels.
    """
    centres = _check_centres(wsi, centres)
    if not (target_mpp > 0 and size > 0):
        raise ValueError(f"target_mpp and size must be positive, got {target_mpp}, {size}")
    level0_px = size * target_mpp / wsi.mpp
    level = wsi.best_level(level0_px / size)
    ds = wsi.level_downsamples[level]
    scale = level0_px / ds / size  # level px per output px (>= 1 up to rounding: never upsample)
    margin = math.ceil(LANCZOS_SUPPORT * max(scale, 1.0)) + 1
    read_px = math.ceil(level0_px / ds) + 2 * margin + 1  # + 1: the box starts at a fraction
    half = level0_px / 2
    w, h = wsi.dimensions
    x, y = centres[:, 0], centres[:, 1]
    in_bounds = (x - half >= 0) & (y - half >= 0) & (x + half <= w) & (y + half <= h)
    return PatchPlan(level, ds, read_px, level0_px, in_bounds, size, target_mpp, margin)


def read_patch(wsi: WholeSlideImage, plan: PatchPlan, centre_xy) -> np.ndarray:
    """The patch centred on ``centre_xy`` (x, y level-0 px; geometry in the module docstring).

    Returns (size, size, 3) uint8 RGB; parts outside the image are white.
    """
    ds, side = plan.downsample, plan.level0_px / plan.downsample  # side in level px (float)
    u0 = (float(centre_xy[0]) - plan.level0_px / 2) / ds  # patch's left edge, level px
    v0 = (float(centre_xy[1]) - plan.level0_px / 2) / ds
    x0, y0 = math.floor(u0) - plan.margin, math.floor(v0) - plan.margin
    region = wsi.read_level(plan.level, x0, y0, plan.read_px, plan.read_px)  # (read_px, read_px, 3)
    box = (u0 - x0, v0 - y0, u0 - x0 + side, v0 - y0 + side)
    if plan.size == side and box[0].is_integer() and box[1].is_integer():  # integer crop
        c, r = int(box[0]), int(box[1])
        return region[r : r + plan.size, c : c + plan.size].copy()
    img = Image.fromarray(region).resize((plan.size, plan.size), Image.Resampling.LANCZOS, box=box)
    return np.asarray(img)


def iter_patch_batches(
    wsi: WholeSlideImage,
    centres: np.ndarray,
    *,
    target_mpp: float = 0.5,
    size: int = 224,
    batch_size: int = 64,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Patches of all N spots, in order, ``batch_size`` at a time.

    Yields
    ------
    indices : (B,) int64 rows of ``centres``.
    patches : (B, size, size, 3) uint8 RGB.
    """
    plan = plan_patches(wsi, centres, target_mpp=target_mpp, size=size)
    centres = np.asarray(centres, dtype=np.float64)
    for start in range(0, len(centres), batch_size):
        idx = np.arange(start, min(start + batch_size, len(centres)))
        yield idx, np.stack([read_patch(wsi, plan, centres[i]) for i in idx])  # (B, S, S, 3)


def tissue_fraction(patches: np.ndarray) -> np.ndarray:
    """Fraction of tissue pixels per patch: coloured (saturation) and not dark.

    White glass, grey and black (padding, scanner borders) count as background.

    Parameters
    ----------
    patches : (B, H, W, 3) or (H, W, 3) uint8 RGB.

    Returns
    -------
    (B,) float64 in [0, 1].
    """
    patches = np.asarray(patches)
    if patches.ndim == 3:
        patches = patches[None]
    mx = patches.max(axis=-1).astype(np.int16)  # (B, H, W)
    mn = patches.min(axis=-1).astype(np.int16)
    tissue = (mx - mn >= MIN_SATURATION * np.maximum(mx, 1)) & (mx >= MIN_BRIGHTNESS)
    return tissue.mean(axis=(1, 2))


@dataclass
class PatchReport:
    """What patch extraction found on one slide."""

    n_spots: int
    n_out_of_bounds: int  # patches not fully inside the image (padded white)
    n_tissue_free: int  # patches with tissue fraction < TISSUE_FREE
    slide: str = ""
    level: int = 0  # pyramid level read
    downsample: float = 1.0
    target_mpp: float = 0.5
    size: int = 224
    median_tissue: float = float("nan")  # median tissue fraction over spots

    @classmethod
    def from_plan(cls, plan: PatchPlan, tissue: np.ndarray, *, slide: str = "") -> PatchReport:
        """Report for a plan and the (N,) tissue fractions of its patches."""
        tissue = np.asarray(tissue, dtype=np.float64)
        return cls(
            n_spots=len(plan.in_bounds),
            n_out_of_bounds=plan.n_out_of_bounds,
            n_tissue_free=int((tissue < TISSUE_FREE).sum()),
            slide=slide,
            level=plan.level,
            downsample=plan.downsample,
            target_mpp=plan.target_mpp,
            size=plan.size,
            median_tissue=float(np.median(tissue)) if len(tissue) else float("nan"),
        )

    def summary(self) -> str:
        name = f"{self.slide}: " if self.slide else ""
        return (
            f"{name}{self.n_spots} patches of {self.size} px at {self.target_mpp:g} µm/px "
            f"(level {self.level}, downsample {self.downsample:g}); "
            f"{self.n_out_of_bounds} partly outside the image (padded white), "
            f"{self.n_tissue_free} with < {TISSUE_FREE:.0%} tissue; "
            f"median tissue {self.median_tissue:.0%}"
        )


def _check_centres(wsi: WholeSlideImage, centres) -> np.ndarray:
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 2:
        raise InputError(f"spot centres must be (N, 2) (x, y), got shape {centres.shape}", wsi.path)
    if not np.isfinite(centres).all():
        bad = int((~np.isfinite(centres)).any(axis=1).sum())
        raise InputError(f"{bad} spot centres are not finite", wsi.path)
    return centres
